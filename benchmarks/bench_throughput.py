"""Training and data-preparation throughput on this machine, ours beside the peers, side by side, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --threads 1                 # both models, ~25 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --threads 1 --busy          # also under a competing process
    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --quick                     # smoke run, seconds

Models (--models): the demo Llama and the demo Baichuan (finetune.demo.ensure_demo_model), each on its own
recipe's bundled sample by default: Llama on the news-summary sample (summary-length data, ~86 tokens an
example), Baichuan on the customer-support chat sample (support-chat-length data, 150-300 tokens);
--recipe-data puts both models on one sample instead.

Training, every run with the same model weights, fp32, the same torch thread count, `--batch-size` rows per
optimiser step, `--warmup-steps` untimed steps, then `--steps` timed ones; `--repeat` rounds, round-robin over
the runs, the best of each kept:
  tutorial      the training script's loop with --pad-to-block-size: one example per row, padded to --block-size
  packed        the training script's loop with its default packing (ours): several examples per row
  hf_trainer    transformers.Trainer, DataCollatorForSeq2Seq (pads each batch to its longest example), no packing
  trl_packed    TRL's SFTTrainer, packing=True (best-fit, padding-free batches)
  trl_unpacked  TRL's SFTTrainer without packing
(peers: benchmarks/peer_trainers.py; TRL is a benchmark-only dependency: pip install -r benchmarks/requirements.txt.)
Useful tokens/s counts real (non-pad) tokens only; CPU ms/ktok is the process's CPU time per 1000 of them, and
cores = CPU time / wall time of the timed steps (1.0 with --threads 1 when nothing else runs inside the step).
MFU = model FLOPs of those tokens (finetune.observe.metrics.step_flops) / time / the fp32 matmul peak measured here.
--busy runs every configuration a second time, right after the first, beside a competing CPU-bound process
(one busy Python loop), and prints busy factor = quiet tokens/s / busy tokens/s per run.

Preparation: finetune.data.preparation.prepare (batched tokenization) against the tutorial's preprocessing (a
datasets.map without batching: build the prompt, call the tokenizer per example, pad to --block-size).

The last line printed is one JSON object with the ratios and the raw figures (also written to --json-out).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune.data.batches as fu  # noqa: E402
import finetune.data.preparation as preparation  # noqa: E402
import finetune.data.raw_data as raw_data  # noqa: E402
import finetune.ops.span_attention  # noqa: F401,E402  (registers "packed_spans")
import modeling_baichuan  # noqa: F401,E402  (registers Baichuan with the Auto classes)
import prepare_dataset  # noqa: E402
from finetune import demo as demo_assets  # noqa: E402
from finetune.config import ModelConfig  # noqa: E402
from finetune.distributed.backend import enable_advanced_parallelization  # noqa: E402
from finetune.model import size as model_size  # noqa: E402
from finetune.model.loading import load_model  # noqa: E402
from finetune.observe import metrics  # noqa: E402
from finetune.plan.layout import split_global_batch  # noqa: E402
from finetune.training import warmup_cosine_schedule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_trainers  # noqa: E402
from preparation_runs import run_prepare  # noqa: E402

LR = 2e-3  # any value gives the same speed
OURS = ("tutorial", "packed")
RUNS = OURS + peer_trainers.PEERS
HOW = {"tutorial": "our loop, --pad-to-block-size (the tutorial's batching: 1 example/row, padded to block)",
       "packed": "our loop, packed (the default)",
       "hf_trainer": "transformers.Trainer, DataCollatorForSeq2Seq (pad to longest), no packing",
       "trl_packed": "TRL SFTTrainer, packing=True (bfd, padding-free)",
       "trl_unpacked": "TRL SFTTrainer, no packing (pad to longest)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per run (default 8; --quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps before timing, at least 1 (default 2; --quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per optimiser step (default 8; --quick 2)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per row (default 1024; --quick 256)")
    p.add_argument("--models", default="llama2,baichuan2",
                   help="comma list of demo models to run, one after the other: llama2, baichuan2 (default both)")
    p.add_argument("--recipe-data", choices=sorted(prepare_dataset.RECIPES), default=None,
                   help="bundled sample data for every model: baichuan2 = customer-support chat, llama2 = news "
                        "summaries (default: each model's own recipe)")
    p.add_argument("--prepare-repeat", type=int, default=None,
                   help="copies of the sample data for the preparation timing (default 10; --quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run (default: torch's own choice, the core count; --quick 1)")
    p.add_argument("--repeat", type=int, default=None,
                   help="run each training configuration this many times, round-robin, and keep the best "
                        "(default 2; --quick 1)")
    p.add_argument("--only", default=",".join(RUNS + ("prepare",)),
                   help="comma list of parts to run (default: all): " + ", ".join(RUNS + ("prepare",)))
    p.add_argument("--busy", action="store_true",
                   help="also run every configuration beside a competing CPU-bound process; prints the slowdown")
    p.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                   help="TRL's gradient checkpointing (default on, TRL's own default)")
    p.add_argument("--quick", action="store_true", help="smoke run in seconds: tiny sizes, figures not meaningful")
    p.add_argument("--json-out", help="also write the final JSON object to this file")
    args = p.parse_args(argv)
    # --quick: one thread, because a smoke run usually shares the machine with other jobs, and OpenMP
    # threads that outnumber the free cores make every step many times slower.
    quick = dict(steps=1, warmup_steps=1, batch_size=2, block_size=256, prepare_repeat=1, threads=1, repeat=1)
    full = dict(steps=8, warmup_steps=2, batch_size=8, block_size=1024, prepare_repeat=10, threads=None, repeat=2)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "block_size", "prepare_repeat", "threads", "repeat"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if args.warmup_steps < 1:
        raise SystemExit("error: --warmup-steps must be at least 1 (the first step pays one-off costs)")
    args.only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = set(args.only) - set(RUNS + ("prepare",))
    if unknown:
        raise SystemExit(f"error: unknown --only part(s) {sorted(unknown)}")
    if any(name.startswith("trl_") for name in args.only) and importlib.util.find_spec("trl") is None:
        raise SystemExit("error: the trl_* runs need TRL (a benchmark-only dependency): pip install -r "
                         "benchmarks/requirements.txt, or leave them out of --only")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.models or set(args.models) - {"llama2", "baichuan2"}:
        raise SystemExit("error: --models takes llama2, baichuan2 or both")
    return args


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Peak
# ----------------------------------------------------------------------------------------------------------
def measure_peaks(config, rows, block_size, seconds, use_cache=True):
    """The square-matmul peak of finetune/observe/metrics.py plus the model's own matmul shapes at this batch
    (tokens x hidden times hidden x out, for the attention, MLP and output-head weights).

    The peak used for MFU is the best of them, so MFU is never flattered by a slow reference shape."""
    tokens = rows * block_size
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    square = (metrics.measure_cpu_peak_flops(1024, seconds) if use_cache
              else metrics.matmul_rate(1024, 1024, 1024, seconds))
    rates = {
        "square 1024 (finetune.observe.metrics.measure_cpu_peak_flops)": square,
        "square 2048": metrics.matmul_rate(2048, 2048, 2048, seconds),
        f"attn proj {tokens}x{h}x{h}": metrics.matmul_rate(tokens, h, h, seconds),
        f"mlp up {tokens}x{h}x{i}": metrics.matmul_rate(tokens, h, i, seconds),
        f"mlp down {tokens}x{i}x{h}": metrics.matmul_rate(tokens, i, h, seconds),
        f"lm head {tokens}x{h}x{v}": metrics.matmul_rate(tokens, h, v, seconds),
    }
    return max(rates.values()), rates


# ----------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------
def load_fresh_model(model_path, attention=None):
    """The demo model as the training scripts load it on a single CPU process (Llama with "packed_spans",
    Baichuan with its own per-span path); `attention` overrides it (the peers get transformers' "sdpa")."""
    from transformers import AutoModelForCausalLM

    if attention is None and demo_assets.family_of(model_path) == "llama2":
        attention = "packed_spans"
    backend = enable_advanced_parallelization("no")
    model = load_model(backend, AutoModelForCausalLM, ModelConfig(model_path), attn_implementation=attention)
    return backend, model


def plans_for(table, batch_size, block_size, batching, seed, steps_needed):
    """Consecutive epoch plans (as train_llama2.py makes them) until there are enough steps."""
    steps, epoch = [], 0
    while len(steps) < steps_needed:
        plan = fu.plan_epoch(table.lengths, batch_size, block_size, batching, seed, epoch)
        if not plan:
            raise SystemExit(f"error: the data makes fewer than --batch-size {batch_size} rows")
        steps.extend(plan)
        epoch += 1
    return steps[:steps_needed]


def run_our_loop(model_path, table, pad_id, batching, args):
    """train_llama2.py's step, unchanged: collate -> forward(position_ids, example_spans, labels, num_items_in_batch) ->
    backward -> clip -> finite check -> AdamW -> LR schedule -> zero_grad. Single process, fp32."""
    torch.manual_seed(0)
    backend, model = load_fresh_model(model_path)
    device = backend.device
    matmul_weights = model_size.matmul_parameters(model)
    total = args.warmup_steps + args.steps
    micro_batch_size, _ = split_global_batch(args.batch_size, 1, None, device.type, args.block_size)
    pad_to = args.block_size if batching in ("packed", "block") else None
    plan = plans_for(table, args.batch_size, args.block_size, batching, 0, total)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    scheduler = warmup_cosine_schedule(optim, total, 0.03, 0.1)
    # Workers 0 for every run (the Trainer's default too): on 2 cores a loader process only competes for them.
    loader = fu.make_step_loader(table, plan, 0, 1, fu.BatchFormat(micro_batch_size, pad_id, pad_to), workers=0)

    model.train()
    step, start, cpu_start = 0, time.perf_counter(), time.process_time()
    tokens = flops = positions = 0
    losses = []
    for micro_batches, info in loader:
        step_loss = torch.zeros(())
        attended_pairs = 0
        for micro in micro_batches:
            micro = fu.move_to(micro, device)
            outputs = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"],
                            example_spans=micro["example_spans"], labels=micro["labels"],
                            num_items_in_batch=info["step_targets"], use_cache=False)
            outputs.loss.backward()
            step_loss += outputs.loss.detach()
            attended_pairs += micro["attended_pairs"]
            if step >= args.warmup_steps:
                positions += micro["input_ids"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(step_loss))):
            raise SystemExit(f"error: non-finite loss in the {batching} run")
        optim.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(step_loss))
        if step == args.warmup_steps:
            start, cpu_start = time.perf_counter(), time.process_time()
        elif step > args.warmup_steps:
            tokens += info["step_tokens"]
            flops += metrics.step_flops(model.config, matmul_weights, info["step_tokens"], attended_pairs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": args.steps, "tokens": tokens, "positions": positions, "flops": flops,
            "first_loss": losses[0], "last_loss": losses[-1]}


# ----------------------------------------------------------------------------------------------------------
# One model: every run, round-robin
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def competing_process(enabled):
    """A CPU-bound process (one busy Python loop) beside the run, for the busy-machine figures."""
    if not enabled:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # scheduled before the timed steps start
        yield
    finally:
        busy.kill()
        busy.wait()


def run_once(name, model_path, table, train, tokenizer, pad_id, args):
    if name in OURS:
        return run_our_loop(model_path, table, pad_id, "block" if name == "tutorial" else "packed", args)
    torch.manual_seed(0)
    _, model = load_fresh_model(model_path, attention="sdpa")
    return peer_trainers.run_peer(name, model, train, tokenizer, args, LR)


def summarise(run, peak):
    run["tokens_per_sec"] = run["tokens"] / run["seconds"]
    run["step_seconds"] = run["seconds"] / run["steps"]
    run["pad_fraction"] = 1 - run["tokens"] / run["positions"]
    run["cpu_ms_per_ktoken"] = 1e6 * run["cpu_seconds"] / run["tokens"]
    run["cores"] = run["cpu_seconds"] / run["seconds"]
    run["mfu"] = run["flops"] / run["seconds"] / peak if run["flops"] is not None else None
    return run


def keep_best(runs, name, run):
    """The fastest of a run's repeats, with every repeat's seconds listed."""
    seconds = runs.get(name, {}).get("all_seconds", []) + [run["seconds"]]
    if name not in runs or run["seconds"] < runs[name]["seconds"]:
        runs[name] = run
    runs[name]["all_seconds"] = seconds


def bench_model(family, args):
    """All runs of one demo model on its data; returns its figures (and prints its table)."""
    from transformers import AutoConfig, AutoTokenizer

    model_path = demo_assets.ensure_demo_model(family)
    recipe = args.recipe_data or family
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    raw = raw_data.load_raw_dataset(demo_assets.DEMO_SAMPLE_FILES[recipe])
    dataset, _ = preparation.prepare(recipe, prepare_dataset.RECIPES[recipe], tokenizer, raw, block_size=args.block_size)
    train = dataset["train"]
    table = fu.TokenTable(train)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    print(f"\n== {family}: model {model_path} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab "
          f"{config.vocab_size}); data {recipe} sample: {len(table)} train examples, length mean/p50/max "
          f"{table.lengths.mean():.0f}/{int(np.median(table.lengths))}/{table.lengths.max()}; load {load_average()}",
          flush=True)
    peak, peak_rates = measure_peaks(config, args.batch_size, args.block_size, 0.1 if args.quick else 0.5)

    # Round-robin repeats: on a shared machine a burst of other work hits one run, not all; the best is kept.
    # With --busy each run goes again at once beside the competing process, so both see the same machine.
    runs, busy_runs = {}, {}
    names = [name for name in args.only if name in RUNS]  # in the order --only gives
    for repeat in range(args.repeat):
        for name in names:
            for busy in (False, True) if args.busy else (False,):
                label = f"{name}{' (busy)' if busy else ''}"
                print(f"running {label} (repeat {repeat + 1}/{args.repeat}), load {load_average()} ...", flush=True)
                with competing_process(busy):
                    run = run_once(name, model_path, table, train, tokenizer, pad_id, args)
                print(f"  {run['tokens'] / run['seconds']:.0f} useful tok/s, "
                      f"{1e6 * run['cpu_seconds'] / run['tokens']:.0f} CPU ms/ktok, {run['cpu_seconds'] / run['seconds']:.2f} cores",
                      flush=True)
                keep_best(busy_runs if busy else runs, name, run)

    _, rates_after = measure_peaks(config, args.batch_size, args.block_size, 0.1 if args.quick else 0.5,
                                   use_cache=False)  # a burst during the first measurement would flatter MFU
    peak = max(peak, *rates_after.values())
    for run in list(runs.values()) + list(busy_runs.values()):
        summarise(run, peak)
    for name, run in busy_runs.items():
        runs[name]["busy_factor"] = runs[name]["tokens_per_sec"] / run["tokens_per_sec"]

    print(f"\n{family} ({recipe} data)")
    print(f"{'run':<13}{'useful tok/s':>13}{'ours packed/x':>14}{'CPU ms/ktok':>12}{'by CPU':>7}{'cores':>6}"
          f"{'pad':>6}{'MFU':>7}{'busy factor':>12}  how")
    ours = runs.get("packed")
    for name, run in runs.items():
        ratio = ours["tokens_per_sec"] / run["tokens_per_sec"] if ours else None
        run["packed_vs_this"] = ratio
        # The same ratio from CPU time per useful token: what a shared machine's load disturbs least.
        run["packed_vs_this_cpu"] = run["cpu_ms_per_ktoken"] / ours["cpu_ms_per_ktoken"] if ours else None
        print(f"{name:<13}{run['tokens_per_sec']:>13.0f}{fmt(ratio, 14, '.2f')}{run['cpu_ms_per_ktoken']:>12.0f}"
              f"{fmt(run['packed_vs_this_cpu'], 7, '.2f')}"
              f"{run['cores']:>6.2f}{100 * run['pad_fraction']:>5.0f}%{fmt(run['mfu'] and 100 * run['mfu'], 6, '.1f')}%"
              f"{fmt(run.get('busy_factor'), 12, '.2f')}  {HOW[name]}")
    prep = run_prepare(recipe, tokenizer, args.block_size, args.prepare_repeat) if "prepare" in args.only else None
    if prep:
        print(f"preparation, real tokens/s: prepare {prep['prepare']['tokens_per_sec']:.0f}, its tokenize map "
              f"{prep['tokenize_only']['tokens_per_sec']:.0f}, tutorial per-example map "
              f"{prep['tutorial']['tokens_per_sec']:.0f} ({prep['examples']} examples)")
    keys = ("tokens_per_sec", "cpu_seconds", "cpu_ms_per_ktoken", "cores", "step_seconds", "pad_fraction", "mfu",
            "packed_vs_this", "packed_vs_this_cpu", "busy_factor", "all_seconds", "first_loss", "last_loss")
    return {"recipe_data": recipe, "peak_flops": peak, "peak_rates": peak_rates, "prepare": prep,
            "runs": {name: {key: run.get(key) for key in keys} for name, run in runs.items()},
            "busy_runs": {name: {key: run.get(key) for key in keys} for name, run in busy_runs.items()}}


def fmt(value, width, spec=""):
    return f"{'-' if value is None else format(value, spec):>{width}}"


# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    load_before, started = load_average(), time.perf_counter()
    print(f"{args.batch_size} rows x {args.block_size} per step, {args.warmup_steps} warmup + {args.steps} timed steps, "
          f"{args.repeat} round(s); torch {torch.__version__}, {torch.get_num_threads()} threads; load {load_before}",
          flush=True)
    models = {family: bench_model(family, args) for family in args.models}
    load_after = load_average()
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average before {load_before}, after {load_after}")
    result = {
        "packed_vs": {family: {name: run["packed_vs_this"] for name, run in figures["runs"].items()}
                      for family, figures in models.items()},
        "busy_factor": {family: {name: run["busy_factor"] for name, run in figures["runs"].items()}
                        for family, figures in models.items()} if args.busy else None,
        "models": models,
        "config": {"models": args.models, "recipe_data": args.recipe_data, "batch_size": args.batch_size,
                   "block_size": args.block_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                   "threads": torch.get_num_threads(), "repeat": args.repeat, "quick": args.quick,
                   "busy": args.busy, "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                   "torch": torch.__version__},
        "load_average": {"before": load_before, "after": load_after},
    }
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
