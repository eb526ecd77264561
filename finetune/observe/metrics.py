"""Honest speed figures and the training log: model FLOPs per step, device peak, MFU, peak memory, the log line,
metrics.jsonl and, from it, the trackers of --report-to and training_curves.png.

FLOPs count only useful work: 6 x (weights used in matmuls, read off the model) per real token, plus
12 x layers x heads x head_dim per (query, key) pair that attention actually computes for real tokens
(block-diagonal when packed). Padding counts for nothing. With LoRA a frozen weight gets no weight gradient:
4 x per token, and 6 x per adapter weight.
"""
import json
import os
import resource
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from finetune.checkpoint.run_folder import writing
from finetune.model import lora
from finetune.model.size import attention_width, matmul_parameters
from finetune.errors import FinetuneError
from finetune.observe.plot import CURVES_FILE, write_training_curves
from finetune.observe.trackers import Trackers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from finetune.config import LoggingConfig
    from finetune.distributed.backend import Backend

# Dense peak TFLOP/s per GPU for bf16 with fp32 accumulation, what training runs (consumer cards: half their fp16-
# accumulate figure; fp32 is taken as tf32 where the chip has it). Override with --peak-tflops.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0, "GH200": 989.0,
}


def step_flops(config: "PretrainedConfig", matmul_weights: int, tokens: int, attended_pairs: int,
               adapter_parameters: int | None = None) -> int:
    """Training FLOPs (forward + backward) for `tokens` real tokens and the attention pairs among them.
    `matmul_weights`: model_size.matmul_parameters of the model; with `adapter_parameters` (LoRA) the base
    weights are frozen: forward and input gradient only."""
    attention = 12 * config.num_hidden_layers * attention_width(config) * attended_pairs
    if adapter_parameters:
        return (4 * matmul_weights + 6 * adapter_parameters) * tokens + attention
    return 6 * matmul_weights * tokens + attention


def matmul_rate(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """Best fp32 FLOP/s of an (m x k) @ (k x n) matmul with PyTorch's current threads."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


_cpu_peak_cache = {}


def measure_cpu_peak_flops(size: int = 1024, seconds: float = 0.5) -> float:
    """The CPU's fp32 matmul peak as MFU's denominator: a square matmul, measured once per process."""
    if size not in _cpu_peak_cache:
        _cpu_peak_cache[size] = matmul_rate(size, size, size, seconds)
    return _cpu_peak_cache[size]


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure came from) for this device."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key] * 1e12, f"table ({key})"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    if device.type == "cpu":
        return measure_cpu_peak_flops(), "measured fp32 matmul"
    return None, "unknown device"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: allocated GPU memory, or the process's resident set on CPU (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def peak_reserved_gib(device: torch.device) -> float | None:
    """Peak memory the caching allocator held from the GPU since the last reset (what another process could not
    use, fragmentation included); None on a CPU."""
    return torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    """Start the peaks afresh: loading (rank 0 held the whole model) and the probe are not training."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class MetricsLog:
    """The tutorial-shaped log line and one metrics.jsonl row per logged step, sent on to the trackers (rank 0
    writes; all ranks call)."""

    def __init__(self, save_dir: str, backend: "Backend", model: torch.nn.Module, logging: "LoggingConfig",
                 total_steps: int, start_step: int = 0):
        """`logging`: the LoggingConfig section (log interval, peak TFLOP/s for MFU, trackers); `start_step`: the
        step a resumed run starts at (0: a fresh run)."""
        self.backend, self.config = backend, model.config
        self.adapter_parameters = lora.count_trainable(model) if lora.is_lora(model) else None
        self.matmul_weights = matmul_parameters(model)
        self.log_interval, self.total_steps = logging.log_interval, total_steps
        # Only rank 0 writes MFU; on a CPU the peak is measured, and ranks measuring at once would slow each other.
        self.peak_flops, self.peak_source = (device_peak_flops(backend.device, logging.peak_tflops)
                                             if backend.is_main else (None, None))
        self.save_dir, self.path = save_dir, os.path.join(save_dir, "metrics.jsonl")
        self.file = self.trackers = None
        if backend.is_main:
            with writing(self.path, save_dir):  # unbuffered: a failed write leaves nothing to flush at exit
                self.file = open(self.path, "ab", buffering=0)
            if logging.report_to:
                self.trackers = Trackers(save_dir, logging.report_to, start_step)
        reset_peak_memory(backend.device)  # created after loading and probing, just before the first step
        self._start_interval()

    def _start_interval(self):
        self.tokens, self.flops, self.steps, self.started = 0, 0.0, 0, time.perf_counter()

    def add_step(self, step_tokens: int, attended_pairs: int) -> None:
        """Count a finished step: its real tokens (all ranks) and this rank's attended (query, key) pairs."""
        self.tokens += step_tokens
        self.last_step_tokens = step_tokens
        self.steps += 1
        self.flops += step_flops(self.config, self.matmul_weights, step_tokens,
                                 attended_pairs * self.backend.world_size, self.adapter_parameters)

    def due(self, step: int, epoch_end: bool) -> bool:
        return step % self.log_interval == 0 or step == self.total_steps or epoch_end

    def log(self, step: int, epoch: int, step_loss: torch.Tensor, grad_norm: torch.Tensor | float, lr: float,
            val_loss: float | None = None, progress: tqdm | None = None) -> None:
        """Write the row and the line for `step` (every rank calls this: the loss is summed across ranks), send
        the row to the trackers and show its loss and speed on the `progress` bar."""
        loss = self.backend.all_reduce_sum(step_loss.clone()).item()
        elapsed = time.perf_counter() - self.started
        world_peak = self.peak_flops * self.backend.world_size if self.peak_flops else None
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": self.last_step_tokens,
               "step_time": elapsed / self.steps, "tokens_per_sec": self.tokens / elapsed,
               "grad_norm": float(grad_norm), "mfu": self.flops / elapsed / world_peak if world_peak else None,
               "peak_memory_gib": peak_memory_gib(self.backend.device),
               "peak_reserved_gib": peak_reserved_gib(self.backend.device)}
        if val_loss is not None:
            row["val_loss"] = val_loss
        if self.file:
            tqdm.write(f"[Step {step}/{self.total_steps}] | Loss: {loss:.4f} | Duration: {elapsed:.2f} | "
                       f"Throughput: {row['tokens_per_sec']:.2f} tokens/sec"
                       + (f" | Val loss: {val_loss:.4f}" if val_loss is not None else ""))
            with writing(self.path, self.save_dir):  # a full disk: one line, and which checkpoint is there
                line = memoryview((json.dumps(row) + "\n").encode())
                while line:
                    line = line[self.file.write(line):]
            if self.trackers:
                self.trackers.log(row)
            if progress is not None:
                progress.set_postfix_str(f"loss {loss:.4f}, {row['tokens_per_sec']:.0f} tokens/s")
        self._start_interval()

    def close(self) -> None:
        """End of the run (finished or stopped): close the trackers' runs and draw training_curves.png."""
        if self.file:
            self.file.close()
            if self.trackers:
                self.trackers.finish()
            if os.path.getsize(self.path):
                try:
                    write_training_curves(self.save_dir)
                except FinetuneError as exc:  # the model is saved: a picture that cannot be drawn is no failure
                    print(f"warning: {CURVES_FILE} was not drawn: {exc}", flush=True)
