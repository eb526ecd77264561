"""The CUDA-only paths, reproduced on the CPU where their mechanism can be: a process group without a CPU
backend, a rank that runs out of memory in the probe, the rank's own RNG, the saved dtype, the peak reset, the
download barrier. What only a GPU can confirm is checked by benchmarks/gpu_smoke.py."""
import json
import textwrap
import types

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_script, torchrun
from safetensors.torch import load_file

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}
COMMON = ["--block-size", "128", "--batch-size", "8", "--max-steps", "2", "--lr", "1e-2", "--log-interval", "1",
          "--seed", "0", "--num-workers", "0"]


def _worker(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent(body))
    return path


# ---- 1: the default group has a CPU backend beside NCCL -----------------------------------------------------

OFFLOAD_CLIP = """
    import torch, torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from finetune.distributed.backend import process_group_backend
    from finetune.distributed.sharding import shard_model
    from finetune.training import clip_grad_norm
    # NCCL needs GPUs: gloo stands in for it as the "cuda" backend, which CPU tensors never reach.
    backend = process_group_backend(True).replace("nccl", "gloo") if sys.argv[1] == "ours" else sys.argv[1]
    dist.init_process_group(backend)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    shard_model(model, cpu_offload=True)
    ids = torch.randint(64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    sys.stdout.write(f"norm={float(clip_grad_norm(model, 1.0))}\\n")  # one write: the ranks' lines do not interleave
    sys.stdout.flush()
    dist.destroy_process_group()
"""


def test_offloaded_gradients_clip_with_the_process_group_backends(tmp_path):
    worker = _worker(tmp_path, "clip.py", OFFLOAD_CLIP)
    ours = torchrun(2, worker, "ours", timeout=180)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert ours.stdout.count("norm=") == 2
    # The mechanism of the crash: a group whose only backend serves the accelerator cannot reduce host tensors
    # (here the CPU mesh fails already in the forward; on GPUs the shards travel on the device and the clip fails).
    accelerator_only = torchrun(2, worker, "cuda:gloo", timeout=180)
    assert accelerator_only.returncode != 0
    assert "No backend type associated with device type cpu" in accelerator_only.stderr


# ---- 7: each rank saves and restores its own device's RNG ---------------------------------------------------

class FakeCudaRng:
    """torch.cuda's RNG calls for a process bound to device `current` of a node with several GPUs."""

    def __init__(self, current):
        self.current, self.set_calls = current, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([self.current, 7],
                                                                                             dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set_calls.append(
            state.tolist()))

        def every_device(*args):
            raise AssertionError("the states of every visible device were asked for")
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)


def test_rng_state_holds_the_current_device_only(monkeypatch):
    from finetune.checkpoint import checkpointer

    fake = FakeCudaRng(current=5)  # local rank 5 of an 8-GPU node
    fake.install(monkeypatch)
    state = json.loads(json.dumps(checkpointer._rng_state()))
    assert state["cuda"] == [bytes([5, 7]).hex()]
    # Resumed on a 2-GPU node as local rank 1: its state is restored, no IndexError.
    fake.current = 1
    checkpointer._set_rng_state(state)
    assert fake.set_calls == [[5, 7]]


def test_rng_state_of_an_earlier_checkpoint_with_every_device(monkeypatch):
    from finetune.checkpoint import checkpointer

    fake = FakeCudaRng(current=2)
    fake.install(monkeypatch)
    state = json.loads(json.dumps(checkpointer._rng_state()))
    state["cuda"] = [bytes([index, 9]).hex() for index in range(4)]  # written by a version saving all four
    checkpointer._set_rng_state(state)
    assert fake.set_calls == [[2, 9]]


# ---- 5: the final model in the compute dtype; inference in bf16 on GPUs --------------------------------------

def test_saved_dtype_follows_the_compute_dtype():
    from finetune.checkpoint.save_dtype import saved_dtype

    assert saved_dtype("compute", "bf16") == torch.bfloat16
    assert saved_dtype("compute", "no") == torch.float32
    assert saved_dtype("fp32", "bf16") == torch.float32
    assert saved_dtype("none", "bf16") is None
    with pytest.raises(ValueError):
        saved_dtype("fp16", "bf16")


def _weights(folder):
    return load_file(f"{folder}/model.safetensors"), json.loads((folder / "config.json").read_text())


def test_bf16_training_saves_bf16_unless_fp32_is_asked(tiny_run, tmp_path):
    """Two processes with CPU offload (shards gathered from the host) save bf16; one process with
    --save-dtype fp32 saves the fp32 master weights of the same run."""
    common = ["--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", tiny_run["data"], *COMMON,
              "--mixed-precision", "bf16"]
    compute = torchrun(2, TRAIN["llama"], *common, "--save-model-dir", str(tmp_path / "bf16"), "--cpu-offload", "on",
                       timeout=400)
    assert compute.returncode == 0, compute.stderr[-3000:]
    fp32 = run_script(PYTHON, str(TRAIN["llama"]), *common, "--save-model-dir", str(tmp_path / "fp32"),
                      "--save-dtype", "fp32")
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    (half, half_config), (full, full_config) = _weights(tmp_path / "bf16"), _weights(tmp_path / "fp32")
    assert {t.dtype for t in half.values()} == {torch.bfloat16} and half_config["dtype"] == "bfloat16"
    assert {t.dtype for t in full.values()} == {torch.float32} and full_config["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16" / "parallel_plan.json").read_text())["saved_dtype"] == "bfloat16"
    for name in full:  # the same training (bf16 compute either way), saved at two precisions
        torch.testing.assert_close(half[name].float(), full[name], atol=2e-2, rtol=2e-2)


def test_inference_loads_bf16_on_a_gpu_and_fp32_on_a_cpu(tiny_run, monkeypatch):
    import inference

    _, model = inference.load_model(tiny_run["llama"])
    assert model.dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    _, model = inference.load_model(tiny_run["llama"])
    assert model.dtype == torch.bfloat16


# ---- 8: peaks start at the first step; reserved memory is reported -------------------------------------------

def test_metrics_reset_the_peak_and_report_reserved_memory(monkeypatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.observe import metrics

    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2 ** 30)
    gpu = torch.device("cuda", 0)
    backend = types.SimpleNamespace(device=gpu, is_main=False, world_size=1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    logging = types.SimpleNamespace(log_interval=1, peak_tflops=None)
    metrics.MetricsLog(str(tmp_path), backend, model, logging, total_steps=1)
    assert resets == [gpu]
    assert metrics.peak_reserved_gib(gpu) == 3.0
    assert metrics.peak_reserved_gib(torch.device("cpu")) is None


# ---- 4: the probe measures the training step, leaves nothing behind and cannot desync ranks ------------------

class FakeMemory:
    """Allocator figures of a device of `total` bytes whose step peak is `fixed + per_row x rows`."""

    def __init__(self, total, fixed, per_row):
        self.total_bytes, self.fixed, self.per_row = total, fixed, per_row
        self.rows, self.resets = 0, 0

    def total(self):
        return self.total_bytes

    def reset_peak(self):
        self.resets += 1

    def allocated(self):  # between steps: the weights (and the optimiser reserve), a little below the fixed part
        return self.fixed - 5

    def peak(self):
        return self.fixed + self.per_row * self.rows


def _probe_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    import finetune.ops.span_attention  # noqa: F401

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, attention_dropout=0.5, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(config, attn_implementation="packed_spans").train()


def _training_forward(memory, seen):
    def forward(model, batch, num_items_in_batch):
        memory.rows = batch["input_ids"].shape[0]
        seen.append(batch)
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     segment_spans=batch["segment_spans"], labels=batch["labels"],
                     num_items_in_batch=num_items_in_batch, use_cache=False).loss
    return forward


def test_probe_takes_the_largest_fitting_micro_batch_and_leaves_no_state():
    from finetune.plan.probe import probe_micro_batch

    model = _probe_model()
    backend = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                                    all_gather=lambda value: [value])
    memory, seen = FakeMemory(total=100, fixed=30, per_row=12), []
    rng_before = torch.get_rng_state()
    # 0.9 x 100 = 90 bytes hold 30 + 12 x 5; 5 does not divide 16 rows, 4 does.
    chosen = probe_micro_batch(model, backend, 8, 16, 32, _training_forward(memory, seen), memory=memory)
    assert chosen == 4
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout ran, yet the training draws are unchanged
    assert all(p.grad is None for p in model.parameters())
    assert memory.resets >= 3
    # The training step: packed rows (several spans a row), two micro-batches accumulated, at 1 and 2 rows.
    assert [b["input_ids"].shape[0] for b in seen[-4:]] == [1, 1, 2, 2]
    assert all(len(spans) > 1 for b in seen for spans in b["segment_spans"])
    # Never above the plan's micro-batch, and one row where two would not fit.
    assert probe_micro_batch(model, backend, 2, 16, 32, _training_forward(memory, []), memory=memory) == 2
    tight = FakeMemory(total=100, fixed=50, per_row=30)
    assert probe_micro_batch(model, backend, 8, 16, 32, _training_forward(tight, []), memory=tight) == 1


PROBE_RANKS = """
    import torch
    from finetune.distributed.backend import enable_advanced_parallelization
    from finetune.errors import entry_point
    from finetune.plan.probe import probe_micro_batch
    sys.path.insert(0, {tests!r})
    from test_gpu_readiness import FakeMemory, _probe_model, _training_forward

    @entry_point
    def main():
        backend = enable_advanced_parallelization("no")
        from finetune.distributed.sharding import shard_model
        model = _probe_model()
        shard_model(model)
        # Rank 1's device is smaller; with "oom", it runs out of memory in its first forward.
        memory = FakeMemory(total=100 if backend.rank == 0 else 70, fixed=30, per_row=12)
        forward = _training_forward(memory, [])
        if sys.argv[1] == "oom" and backend.rank == 1:
            def forward(model, batch, num_items_in_batch):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        chosen = probe_micro_batch(model, backend, 8, 16, 32, forward, memory=memory)
        sys.stdout.write(f"rank {{backend.rank}} chose {{chosen}}\\n")
        sys.stdout.flush()
        backend.shutdown()
    main()
"""


def test_probe_ranks_agree_and_an_out_of_memory_rank_ends_the_job(tmp_path):
    worker = _worker(tmp_path, "probe.py", PROBE_RANKS.format(tests=str(REPO_ROOT / "tests")))
    agreed = torchrun(2, worker, "fit", timeout=180)
    assert agreed.returncode == 0, agreed.stderr[-3000:]
    # rank 1 holds 0.9 x 70 = 63 bytes: 30 + 12 x 2 -> both ranks take 2 (rank 0 alone would take 4)
    assert "rank 0 chose 2" in agreed.stdout and "rank 1 chose 2" in agreed.stdout
    oom = torchrun(2, worker, "oom", timeout=120)  # before: rank 0 waited in FSDP's collective for ever
    assert oom.returncode != 0
    assert "do not fit in GPU memory" in oom.stderr
    assert "chose" not in oom.stdout


# ---- 6: the others wait for rank 0's download behind a long-timeout barrier ----------------------------------

SLOW_DOWNLOAD = """
    import time
    from transformers import AutoModelForCausalLM
    from finetune.config import ModelConfig
    from finetune.distributed.backend import Backend, enable_advanced_parallelization
    from finetune.model.loading import load_model

    class SlowDownload(AutoModelForCausalLM):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            time.sleep(8)  # rank 0 fetching the weights: longer than the group's timeout
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)

    if sys.argv[2] == "no-barrier":
        Backend.wait_for_download = lambda self: None
    backend = enable_advanced_parallelization("no", timeout_minutes=0.05)  # 3 s
    model = load_model(backend, SlowDownload, ModelConfig(sys.argv[1]))
    sys.stdout.write(f"loaded {sum(p.to_local().sum().item() for p in model.parameters())}\\n")
    sys.stdout.flush()
    backend.shutdown()
"""


def test_ranks_wait_for_the_download_past_the_group_timeout(tiny_run, tmp_path):
    worker = _worker(tmp_path, "download.py", SLOW_DOWNLOAD)
    waited = torchrun(2, worker, tiny_run["llama"], "barrier", timeout=180)
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert waited.stdout.count("loaded") == 2
    unguarded = torchrun(2, worker, tiny_run["llama"], "no-barrier", timeout=180)
    assert unguarded.returncode != 0  # the first collective timed out while rank 0 was still downloading


# ---- 9: the input embedding is an FSDP unit of its own --------------------------------------------------------

def test_embedding_is_its_own_fsdp_unit_unless_tied():
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import modeling_baichuan
    from finetune.distributed.sharding import shard_model

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        baichuan = modeling_baichuan.BaichuanForCausalLM(modeling_baichuan.BaichuanConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            model_max_length=64))
        shard_model(baichuan)
        assert type(baichuan.get_input_embeddings()).__name__.startswith("FSDP")
        assert not type(baichuan.get_output_embeddings()).__name__.startswith("FSDP")
        ids = torch.randint(64, (1, 8))
        baichuan(input_ids=ids, labels=ids).loss.backward()  # the units gather and reduce in order
        assert baichuan.get_input_embeddings().weight.grad is not None
        tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, tie_word_embeddings=True))
        shard_model(tied)
        assert not type(tied.get_input_embeddings()).__name__.startswith("FSDP")
    finally:
        dist.destroy_process_group()


# ---- 10, 11: QLoRA is never offered offload; offload gives the host optimiser the node's cores -------------

def test_qlora_plan_never_offers_cpu_offload(tiny_run):
    plan = ["--model-name-or-path", tiny_run["llama"], "--plan-only", "--num-devices", "1",
            "--device-memory-gb", "0.0005", "--block-size", "128", "--batch-size", "8"]
    lora = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--lora")
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert "offload on" in lora.stdout  # the same plan without 4-bit weights does consider offload
    qlora = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--qlora")
    assert qlora.returncode == 0, qlora.stderr[-2000:]
    assert "offload on" not in qlora.stdout and "cpu_offload: false" in qlora.stdout
    refused = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--qlora", "--cpu-offload", "on")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --qlora runs on one device without FSDP2")


def test_offload_threads_are_the_process_share_of_the_node(monkeypatch):
    import os

    from finetune.distributed.backend import offload_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert offload_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert offload_threads() == 1


# ---- 13: gpu_check measures what it says ----------------------------------------------------------------------

def test_gpu_check_launches_times_and_fails_as_it_should(tiny_run):
    sys_path = str(REPO_ROOT / "benchmarks")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import gpu_check
    finally:
        sys.path.remove(sys_path)
    assert gpu_check.launch_command("train_llama2.py", 1, ["--qlora"])[1].endswith("train_llama2.py")
    assert "torch.distributed.run" in gpu_check.launch_command("train_llama2.py", 1, ["--cpu-offload", "on"])
    assert "torch.distributed.run" in gpu_check.launch_command("train_llama2.py", 2, [])
    rows = [{"step": 1}, {"step": 2}, {"step": 3, "val_loss": 1.0}, {"step": 4}]
    assert [r["step"] for r in gpu_check.timed_rows(rows)] == [2, 4]  # no warm-up, no validation pass
    footer = "error: --batch-size 3 is not divisible by the 2 processes\n[rank0]: ...\ntorchrun: ChildFailedError"
    assert gpu_check.failure_line(footer) == "error: --batch-size 3 is not divisible by the 2 processes"
    result = run_script(PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--steps", "2", "--timeout", "0.5",
                        "--", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", tiny_run["data"])
    assert result.returncode != 0 and "did not finish in 0.5 s" in result.stderr


# ---- 2: one attention kernel per layer for packed rows --------------------------------------------------------

SPANS = [[(0, 5), (5, 17), (17, 24)], [(0, 24)], [(0, 9), (9, 20), (20, 24)]]


def _qkv(kv_heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 24, 8, generator=generator), torch.randn(3, kv_heads, 24, 8, generator=generator),
            torch.randn(3, kv_heads, 24, 8, generator=generator))


def _span_loop(query, key, value):
    """Each example alone, one causal attention per span: the reference."""
    key, value = key.repeat_interleave(4 // key.shape[1], 1), value.repeat_interleave(4 // value.shape[1], 1)
    out = torch.empty_like(query)
    for row, spans in enumerate(SPANS):
        for start, end in spans:
            out[row, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True, scale=0.3)[0]
    return out.transpose(1, 2)


def test_cumulative_lengths_lay_the_rows_end_to_end():
    from finetune.ops.varlen_attention import cumulative_lengths, document_ids

    bounds, longest = cumulative_lengths(SPANS, 24, "cpu")
    assert bounds.tolist() == [0, 5, 17, 24, 48, 57, 68, 72] and bounds.dtype == torch.int32 and longest == 24
    assert document_ids(SPANS, 24, "cpu")[0].tolist() == [0] * 5 + [1] * 12 + [2] * 7
    # The collator gives the padding tail no span: it becomes a sequence of its own, as does a gap between spans.
    bounds, longest = cumulative_lengths([[(0, 5), (7, 10)]], 12, "cpu")
    assert bounds.tolist() == [0, 5, 7, 10, 12] and longest == 5
    assert document_ids([[(0, 5)]], 8, "cpu")[0].tolist() == [0] * 5 + [-1] * 3


def test_varlen_spans_passes_the_flattened_layout_the_kernel_documents(monkeypatch):
    """torch's varlen kernel is CUDA only: a CPU stand-in that follows its documented contract (tokens x heads x
    dim, cumulative lengths, window (-1, 0) = causal, enable_gqa) checks everything our side does."""
    import torch.nn.attention.varlen as varlen

    from finetune.ops.varlen_attention import varlen_spans

    def documented_kernel(query, key, value, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(query)
        for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
            assert max_q >= end - start
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
        return out
    monkeypatch.setattr(varlen, "varlen_attn", documented_kernel)
    query, key, value = _qkv()
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS)
    torch.testing.assert_close(out, _span_loop(query, key, value))


def test_flex_spans_equals_the_span_loop_forward():
    """FlexAttention has no CPU backward in this torch: the forward is checked here, gradients by gpu_smoke.py."""
    from finetune.ops.varlen_attention import flex_spans

    query, key, value = _qkv(seed=1)
    out, _ = flex_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS)
    torch.testing.assert_close(out, _span_loop(query, key, value))


def test_one_kernel_paths_honour_sliding_windows_and_soft_caps(monkeypatch):
    """Mistral's window and Gemma 2's soft-cap on the one-kernel paths: flex computes them in its mask and score;
    varlen gives the window to the kernel and leaves a soft-capped model to the span loop (the kernel has none)."""
    import torch.nn.attention.varlen as varlen

    from finetune.ops.span_attention import packed_spans
    from finetune.ops.varlen_attention import flex_spans, varlen_spans

    query, key, value = _qkv(seed=2)
    for extra in ({"sliding_window": 4}, {"softcap": 1.5}, {"sliding_window": 4, "softcap": 1.5}):
        expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS, **extra)
        assert not torch.allclose(expected, _span_loop(query, key, value), atol=1e-3)  # the setting shows
        out, _ = flex_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS, **extra)
        torch.testing.assert_close(out, expected)

    windows = []

    def windowed_kernel(query, key, value, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
        windows.append(window_size)
        return torch.zeros_like(query)
    monkeypatch.setattr(varlen, "varlen_attn", windowed_kernel)
    varlen_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS, sliding_window=4)
    assert windows == [(3, 0)]  # the query and the 3 keys before it: transformers' window of 4
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS, softcap=1.5)
    assert windows == [(3, 0)]
    expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, segment_spans=SPANS, softcap=1.5)
    torch.testing.assert_close(out, expected)


def test_the_one_kernel_layout_is_built_once_per_forward(monkeypatch):
    """Every layer of a forward gets the same span list: the first layer builds the layout, the rest reuse it; the
    next forward's new list builds it again."""
    import finetune.ops.varlen_attention as one_kernel

    builds = []
    real = one_kernel.document_ids
    monkeypatch.setattr(one_kernel, "document_ids", lambda *args: builds.append(1) or real(*args))
    query, key, value = _qkv(seed=3)
    spans = [list(row) for row in SPANS]
    first, _ = one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, segment_spans=spans)
    again, _ = one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, segment_spans=spans)
    assert len(builds) == 1 and torch.equal(first, again)
    one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, segment_spans=[list(row) for row in SPANS])
    assert len(builds) == 2


# ---- the first GPU run: one command; its dry run here -----------------------------------------------------------

def test_gpu_smoke_dry_run_lists_every_check_and_runs_the_process_group_one(tmp_path):
    result = run_script(PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_smoke.py"), "--dry-run", "--work-dir",
                        str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True
    assert summary["checks"] == ["attention", "process_group", "train", "resume", "offload", "lora"]
    assert summary["process_group"]["ok"] and summary["process_group"]["grad_norm"] > 0
    listed = [line.split(":")[0] for line in result.stdout.splitlines()[:-1] if ": " in line]
    assert {"train", "resume", "offload", "lora", "attention"} <= set(listed)
    assert "--cpu-offload on" in result.stdout and "--lora" in result.stdout and "--resume" in result.stdout


def test_attention_choice_resolves_for_device_and_model(monkeypatch):
    from finetune.errors import FinetuneError
    from finetune.ops.varlen_attention import attention_name

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert attention_name("packed_spans", "auto", gpu, "bf16") == "varlen_spans"  # one kernel per layer
    assert attention_name("packed_spans", "auto", gpu, "no") == "packed_spans"  # FlashAttention needs bf16/fp16
    assert attention_name("packed_spans", "auto", cpu, "no") == "packed_spans"  # the span loop is fastest here
    assert attention_name(None, "auto", gpu, "bf16") is None  # Baichuan's own attention takes the spans
    assert attention_name("packed_spans", "flex", gpu, "bf16") == "flex_spans"
    assert attention_name("packed_spans", "spans", gpu, "bf16") == "packed_spans"
    capability[0] = (7, 5)  # a T4: no FlashAttention
    assert attention_name("packed_spans", "auto", gpu, "bf16") == "packed_spans"
    for model, choice, device in [("packed_spans", "varlen", gpu), ("packed_spans", "flex", cpu), (None, "flex", gpu)]:
        with pytest.raises(FinetuneError):
            attention_name(model, choice, device, "bf16")


def test_one_kernel_attention_is_refused_on_a_cpu_with_one_line(tiny_run, tmp_path):
    run = run_script(PYTHON, str(TRAIN["llama"]), "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
                     tiny_run["data"], "--save-model-dir", str(tmp_path / "out"), *COMMON, "--attn-implementation",
                     "flex")
    assert run.returncode != 0 and "error: --attn-implementation flex needs a GPU" in run.stderr.splitlines()[-1]


# ---- 11: offloaded layouts are ranked by estimated step time ---------------------------------------------------

def test_offload_step_estimate_counts_host_traffic_per_micro_batch():
    from finetune.plan.step_time import step_seconds

    small = sum(step_seconds(13_015_864_320, 1, 4, 64, 1024, checkpointing=False, cpu_offload=True))
    large = sum(step_seconds(13_015_864_320, 1, 32, 8, 1024, checkpointing=True, cpu_offload=True))
    assert 400 < small < 500 and large < small / 3  # the 1 x 80 GB figures: ~450 s against ~120 s
    compute, traffic = step_seconds(13_015_864_320, 8, 4, 8, 1024, checkpointing=False, cpu_offload=False)
    assert traffic == 0 and compute > 0


def test_plan_with_offload_takes_the_fastest_fitting_layout(monkeypatch):
    from finetune.args import parse_training_args
    from finetune.config import from_flags
    from finetune.plan import layout, memory

    def candidate(micro, checkpointing, offload, fits):
        return memory.Candidate(micro, 256 // micro, checkpointing, offload, None, fits)
    calls = []

    def fake_plan_candidates(*args, checkpointing=None, cpu_offload=None, **kwargs):
        calls.append((checkpointing, cpu_offload))
        if checkpointing:  # offload with checkpointing: large micro-batches fit
            found = [candidate(m, True, True, m <= 32) for m in (64, 32, 4)]
            return memory.Plan(next(c for c in found if c.fits), found)
        found = [candidate(4, False, False, False), candidate(4, False, True, True)]
        return memory.Plan(found[1], found)
    monkeypatch.setattr(memory, "plan_candidates", fake_plan_candidates)
    defaults = dict(model="m", dataset="d", save_dir="s", epochs=1, batch_size=256, lr=1e-5, log_interval=1)
    config = from_flags(parse_training_args("", defaults, {}, []))
    result = layout.simulated_plan(config, layout.KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"], 1, 80, 512)
    assert calls == [(None, None), (True, True)]
    assert (result.chosen.micro_batch_size, result.chosen.checkpointing) == (32, True)
    # Checkpointing fixed by the user: the first choice stands, nothing more is simulated.
    calls.clear()
    fixed = from_flags(parse_training_args("", defaults, {}, ["--activation-checkpointing", "off"]))
    monkeypatch.setattr(memory, "plan_candidates", lambda *a, **k: fake_plan_candidates(checkpointing=False))
    assert layout.simulated_plan(fixed, layout.KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"], 1, 80, 512).chosen.micro_batch_size == 4
