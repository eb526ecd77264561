"""The first run on a GPU, in one command: what the CPU tests cannot confirm, checked in at most ~10 minutes on one
H100/H200 with no network. The last line printed is one JSON object with every check's figures.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py             # on a GPU machine
    HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py --dry-run   # anywhere: builds the assets, lists the checks

Checks, in this order (each script in its own process; a check not reached within --budget says so):
  attention      one decoder layer's attention at 13B shape (40 heads x 128, 4 rows x 1024 tokens, 5-12 examples a
                 row): the span loop vs varlen_spans vs flex_spans, forward+backward milliseconds, CUDA kernels
                 launched, and max|diff| / max|reference| of outputs and gradients against the span loop; for
                 full heads (mha), grouped key/value heads (gqa: 8 of 40) and a sliding window (window: 256)
  process_group  CPU offload clips host gradients through the "cuda:nccl,cpu:gloo" group (torchrun, 1 process)
  train          a 2-layer Llama at 13B width through train_llama2.py with --attn-implementation auto (varlen),
                 fp32 master weights under bf16 autocast (benchmarks/gpu_check.py: the probe, simulated vs
                 measured peak, reserved memory, tokens/s, MFU)
  flex           the same through the FlexAttention path inside training (--attn-implementation flex)
  checkpointing  the same with --activation-checkpointing on (the probe measures checkpointed layers)
  baichuan       a 2-layer Baichuan at 13B width (ALiBi) through train_baichuan2_13b.py: its span attention, then
                 its FlexAttention path (--attn-implementation flex: one kernel a layer, ALiBi as a score modifier)
  resume         the Llama: 2 steps with a checkpoint, then --resume to step 4
  offload        2 steps with --cpu-offload on (torchrun, 1 process)
  lora           a one-process --lora run (no torchrun)
  qlora          a one-process --qlora run (4-bit base through bitsandbytes)
The model and data are made here (random weights at 13B width, the demo tokenizer and sample data): nothing is
downloaded. The checks after `train` pass --micro-batch-size so that only `train` plans memory (the plan's first
simulation is its slowest part on a cold machine). The last line is always the JSON summary, whatever failed.
With --dry-run the models are 64 wide and nothing runs on a GPU: the checks and their commands are printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

WIDTH_13B = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, vocab_size=32000)
DRY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=32000)
BLOCK_SIZE = 1024
TRAIN_FLAGS = ["--block-size", str(BLOCK_SIZE), "--batch-size", "8", "--num-workers", "0", "--seed", "0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="build the assets and print the checks; run nothing")
    p.add_argument("--budget", type=float, default=600, help="seconds for all checks together (default 600)")
    p.add_argument("--work-dir", help="where the model, data and runs go (default: a temporary folder)")
    return p.parse_args(argv)


# ---- assets -----------------------------------------------------------------------------------------------

def build_assets(folder: Path, width: dict) -> dict:
    """2-layer Llama and Baichuan models of `width` with their demo tokenizers, and the demo's prepared data."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    import modeling_baichuan
    from finetune import demo
    from finetune.data import recipes

    def saved(name, family, build):
        model_dir = folder / name
        if not (model_dir / "config.json").exists():
            tokenizer_dir = Path(demo.ensure_demo_model(family))
            torch.manual_seed(0)
            build().save_pretrained(model_dir)
            for item in tokenizer_dir.iterdir():
                if "token" in item.name or item.name == "special_tokens_map.json" or item.suffix == ".py":
                    shutil.copy(item, model_dir / item.name)
        return str(model_dir)
    llama = saved("model", "llama2", lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_key_value_heads=width["num_attention_heads"], max_position_embeddings=4096,
        **width)))
    baichuan = saved("baichuan", "baichuan2", lambda: modeling_baichuan.BaichuanForCausalLM(
        modeling_baichuan.BaichuanConfig(num_hidden_layers=2, model_max_length=4096, **width)))
    return {"model": llama, "baichuan": baichuan, "data": recipes.demo_dataset("llama2", BLOCK_SIZE),
            "baichuan_data": recipes.demo_dataset("baichuan2", BLOCK_SIZE)}


# ---- the checks --------------------------------------------------------------------------------------------

def gpu_check_command(assets, steps, *flags, nproc=1, family="llama2"):
    model, data, script = ((assets["model"], assets["data"], "train_llama2.py") if family == "llama2" else
                           (assets["baichuan"], assets["baichuan_data"], "train_baichuan2_13b.py"))
    return [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--script", script, "--nproc",
            str(nproc), "--steps", str(steps), "--", "--model-name-or-path", model, "--dataset-name-or-path", data,
            *TRAIN_FLAGS, *flags]


def train_command(assets, out, *flags):
    return [sys.executable, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", assets["model"],
            "--dataset-name-or-path", assets["data"], "--save-model-dir", str(out), "--log-interval", "1",
            "--save-dtype", "none", *TRAIN_FLAGS, *flags]


def commands(assets, work: Path) -> dict:
    """Every check that runs a script: name -> list of commands (run in order)."""
    clip = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(Path(__file__).resolve()), "--process-group-worker"]
    planned = ["--micro-batch-size", "2"]  # only `train` plans: the memory simulation is slow on a cold machine
    return {
        "process_group": [clip],
        "train": [gpu_check_command(assets, 4)],
        "flex": [gpu_check_command(assets, 3, "--attn-implementation", "flex", *planned)],
        "checkpointing": [gpu_check_command(assets, 3, "--activation-checkpointing", "on")],
        "baichuan": [gpu_check_command(assets, 3, *planned, family="baichuan2"),
                     gpu_check_command(assets, 3, "--attn-implementation", "flex", *planned, family="baichuan2")],
        # stopped by SIGTERM after its first logged step (it checkpoints), then resumed to the end
        "resume": [train_command(assets, work / "resume", "--max-steps", "4", *planned),
                   train_command(assets, work / "resume", "--max-steps", "4", "--resume", *planned)],
        "offload": [gpu_check_command(assets, 2, "--cpu-offload", "on", *planned)],
        "lora": [gpu_check_command(assets, 3, "--lora", *planned)],
        "qlora": [gpu_check_command(assets, 3, "--qlora", *planned)],
    }


def stop_after_first_step(command, deadline):
    """Start a training run and send SIGTERM once its first step is logged: it writes a checkpoint and stops."""
    import signal

    metrics = Path(command[command.index("--save-model-dir") + 1], "metrics.jsonl")
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        while run.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().strip():
                run.send_signal(signal.SIGTERM)
                break
            time.sleep(0.5)
        try:
            out, err = run.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.kill()
            out, err = run.communicate()
    return subprocess.CompletedProcess(command, run.returncode, out, err)


def run_commands(name, command_list, deadline):
    """Run one check's commands; its figures (gpu_check's JSON line) or why it failed."""
    started, last = time.perf_counter(), None
    for index, command in enumerate(command_list):
        left = deadline - time.monotonic()
        if left < 10:
            return {"ok": False, "error": "no time left in --budget"}
        try:
            if name == "resume" and index == 0:
                last = stop_after_first_step(command, deadline)
            else:
                last = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"did not finish in {left:.0f} s"}
        if last.returncode != 0:
            errors = [line for line in last.stderr.splitlines() if line.startswith("error:")]
            return {"ok": False, "error": (errors or last.stderr.strip().splitlines() or ["no output"])[-1]}
    result = {"ok": True, "seconds": round(time.perf_counter() - started, 1)}
    if name == "resume":  # every step logged once, the last one the fourth
        folder = Path(command_list[-1][command_list[-1].index("--save-model-dir") + 1])
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        result.update(ok=steps == [1, 2, 3, 4], logged_steps=steps)
    lines = last.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
    return result


def check_training_flags(command):
    """The training script's own parser accepts the flags a check passes (names drift; a GPU run should not be
    the first to find out)."""
    from finetune.args import parse_training_args

    script = next((a for a in command if a.endswith(".py") and "gpu_smoke" not in a), None)
    if script is None:
        return
    flags = command[command.index("--") + 1:] if "--" in command else command[command.index(script) + 1:]
    defaults = dict(model="", dataset="", save_dir=str(Path(tempfile.gettempdir()) / "gpu_smoke_flags"), epochs=1,
                    batch_size=8, lr=1e-5, log_interval=1)
    parse_training_args("", defaults, {}, flags)


def process_group_worker():
    """Under torchrun: a sharded, offloaded model's gradient clip through the training scripts' process group."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.distributed.backend import enable_advanced_parallelization
    from finetune.distributed.sharding import shard_model
    from finetune.training import clip_grad_norm

    backend = enable_advanced_parallelization()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4))
    on_gpu = backend.device.type == "cuda"
    shard_model(model, bf16_compute=on_gpu, cpu_offload=True, pin_memory=on_gpu)
    ids = torch.randint(256, (1, 32), device=backend.device)
    model(input_ids=ids, labels=ids).loss.backward()
    print(json.dumps({"grad_norm": float(clip_grad_norm(model, 1.0)), "backend": str(backend.device)}))
    backend.shutdown()


# ---- attention at 13B shape ---------------------------------------------------------------------------------

def packed_spans(rows, length, seed=0):
    """Per row, 5-12 examples of random lengths end to end, the way the collator lays them out."""
    generator = torch.Generator().manual_seed(seed)
    spans = []
    for _ in range(rows):
        count = int(torch.randint(5, 13, (1,), generator=generator))
        cuts = sorted(torch.randperm(length - 1, generator=generator)[:count - 1].add(1).tolist())
        bounds = [0, *cuts, length]
        spans.append(list(zip(bounds, bounds[1:])))
    return spans


def attention_paths():
    import finetune.ops.span_attention as span_loop
    import finetune.ops.varlen_attention as one_kernel

    loop = span_loop.packed_spans
    return {"span_loop": loop, "varlen_spans": one_kernel.varlen_spans, "flex_spans": one_kernel.flex_spans}


def time_attention(function, inputs, spans, repeat=5, sliding_window=None):
    """(milliseconds per forward+backward, CUDA kernels per forward+backward, output, gradients)."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        query, key, value = (x.detach().requires_grad_() for x in inputs)
        spans.block_masks.clear()  # a new forward: the flex mask is made again, as in training
        out, _ = function(None, query, key, value, None, scaling=inputs[0].shape[-1] ** -0.5, example_spans=spans,
                          sliding_window=sliding_window)
        out.backward(torch.ones_like(out))
        return out.detach(), [x.grad for x in (query, key, value)]
    out, grads = step()  # warm-up (compiles flex)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sum(1 for event in prof.events() if event.device_type.name == "CUDA")
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3, kernels, out, grads


ATTENTION_CASES = {"mha": dict(kv_heads=40), "gqa": dict(kv_heads=8), "window": dict(kv_heads=8, sliding_window=256)}
RELATIVE_TOLERANCE = 2e-2  # of max|reference|: a few bf16 roundings (2^-8 each) of differently ordered sums


def relative_difference(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max|got - reference| / max|reference|: a scale-free measure (gradients of a long row are small numbers,
    where an absolute tolerance calls a correct kernel wrong)."""
    return float((got.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-12))


def attention_case(kv_heads, sliding_window=None):
    heads, head_dim, rows = 40, 128, 4
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda count: (rows, count, BLOCK_SIZE, head_dim)  # noqa: E731
    inputs = [torch.randn(shape(count), device="cuda", dtype=torch.bfloat16, generator=generator)
              for count in (heads, kv_heads, kv_heads)]
    from finetune.ops.example_spans import ExampleSpans

    spans = ExampleSpans(packed_spans(rows, BLOCK_SIZE), BLOCK_SIZE).to("cuda")
    results, reference = {}, None
    for name, function in attention_paths().items():
        try:
            ms, kernels, out, grads = time_attention(function, inputs, spans, sliding_window=sliding_window)
        except Exception as exc:  # one path failing must not hide the others' figures
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        entry = {"ok": True, "ms_forward_backward": round(ms, 2), "cuda_kernels": kernels}
        if reference is None:
            reference = out, grads
        else:
            entry["relative_diff_output"] = relative_difference(out, reference[0])
            entry["relative_diff_grads"] = max(relative_difference(g, r) for g, r in zip(grads, reference[1]))
            entry["ok"] = max(entry["relative_diff_output"], entry["relative_diff_grads"]) < RELATIVE_TOLERANCE
            if results.get("span_loop", {}).get("ok"):
                entry["speedup_vs_span_loop"] = round(results["span_loop"]["ms_forward_backward"] / ms, 2)
        results[name] = entry
    return {"ok": all(r["ok"] for r in results.values()), **results}


def attention_check():
    cases = {name: attention_case(**case) for name, case in ATTENTION_CASES.items()}
    return {"ok": all(case["ok"] for case in cases.values()), **cases}


# ---- main ---------------------------------------------------------------------------------------------------

def main(argv=None):
    if argv is None and sys.argv[1:] == ["--process-group-worker"]:
        return process_group_worker()
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        assets = build_assets(work, DRY_WIDTH if args.dry_run else WIDTH_13B)
        planned = commands(assets, work)
        if args.dry_run:
            for name, command_list in planned.items():
                for command in command_list:
                    check_training_flags(command)
                    print(f"{name}: {' '.join(command)}")
            print(f"attention: span_loop vs varlen_spans vs flex_spans at 40 heads x 128, 4 x 1024 tokens, cases "
                  f"{', '.join(ATTENTION_CASES)} (CUDA)")
            # The process-group check runs here too: on a CPU through gloo alone, the same code path otherwise.
            summary = {"dry_run": True, "cuda": torch.cuda.is_available(), "checks": ["attention", *planned],
                       "process_group": run_commands("process_group", planned["process_group"], deadline)}
            print(json.dumps(summary))
            return 0 if summary["process_group"]["ok"] else 1
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; use --dry-run to see the checks")
        summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        try:
            summary["attention"] = attention_check()
            for name, command_list in planned.items():
                summary[name] = run_commands(name, command_list, deadline)
        except BaseException as exc:  # the JSON line below is printed whatever happened (Ctrl-C included)
            summary["aborted"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        finally:
            summary["ok"] = "aborted" not in summary and all(
                part["ok"] for part in summary.values() if isinstance(part, dict))
            print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
