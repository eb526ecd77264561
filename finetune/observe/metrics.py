"""Honest speed figures and the training log: model FLOPs per step, device peak, MFU, peak memory, the log line,
metrics.jsonl and, from it, the trackers of --report-to and training_curves.png.

FLOPs count only useful work, read off the model's `requires_grad`: per real token, 2 x each weight used in a
matmul (forward), 2 x more where backward passes through its decoder layer (input gradient: something in the layer
or below it trains), 2 x more where the weight itself trains (weight gradient): 6 x in full fine-tuning, 4 x for
LoRA's frozen base (6 x per adapter weight) and 2 x for frozen layers below every trainable one. Attention adds
12 x heads x head_dim per (query, key) pair it computes for real tokens (block-diagonal when packed) in each layer
backward passes through, 4 x in the others. Padding counts for nothing. A mixture-of-experts layer counts its router in full and
each expert tensor at the share a token runs (num_experts_per_tok / experts; model/size.py).
"""
import contextlib
import json
import os
import re
import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from finetune.checkpoint.run_folder import writing
from finetune.errors import FinetuneError
from finetune.model.size import active_share, attention_width, expert_parameters
from finetune.observe.plot import CURVES_FILE, write_training_curves
from finetune.ops.router_loss import find_router_aux
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


# A decoder layer's own module name: model.layers.3 (Llama, Baichuan), base_model.model.model.layers.3 (peft)
_LAYER = re.compile(r"(^|\.)layers\.\d+$")


def trained_flops(model: torch.nn.Module) -> tuple[int, int]:
    """(FLOPs per real token of the matmuls, FLOPs per attended (query, key) pair) of a training step, from which
    parameters require grad. Backward runs through a decoder layer when anything in it or below it trains (the
    embeddings, earlier layers); a frozen layer below every trainable one runs forward only. Outside the layers
    (the output head), below means earlier in the model's module order."""
    width, share = attention_width(model.config), active_share(model)
    experts = {id(p) for p in expert_parameters(model).values() if p.dim() == 3}
    # LoRA on an expert tensor (peft's ParamWrapper) adds B @ A to the whole tensor once per forward, not per
    # token: its adapters are no per-token matmul, and the tensor's own gradient is computed for them.
    wrappers = {name: module for name, module in model.named_modules() if type(module).__name__ == "ParamWrapper"}
    wrapped, adapted = tuple(name + "." for name in wrappers), set()
    for name, module in wrappers.items():
        inner = name
        while type(module).__name__ == "ParamWrapper":
            inner, module = inner + ".base_layer", module.base_layer
        adapted.add(f"{inner}.{wrappers[name].parameter_name}")
    per_token = per_pair = 0
    below = False  # a trainable parameter in a module seen earlier
    layer, layer_backward = None, False
    for name, module in model.named_modules():
        if _LAYER.search(name):
            layer = name + "."
            layer_backward = below or any(p.requires_grad for p in module.parameters())
            per_pair += (12 if layer_backward else 4) * width
        input_gradient = layer_backward if layer and name.startswith(layer) else below
        if isinstance(module, torch.nn.Linear):
            if not (name.startswith(wrapped) and ".lora_" in name):
                per_token += (2 + 2 * input_gradient + 2 * module.weight.requires_grad) * module.in_features \
                    * module.out_features
        elif getattr(module, "num_experts", None):  # a router (every token) or the experts (top_k of them)
            for key, p in module.named_parameters(recurse=False):
                if p.dim() == 2 and key == "weight":
                    per_token += (2 + 2 * input_gradient + 2 * p.requires_grad) * p.numel()
                elif id(p) in experts:
                    trains = p.requires_grad or f"{name}.{key}" in adapted
                    per_token += round((2 + 2 * input_gradient + 2 * trains) * share * p.numel())
        below = below or any(p.requires_grad for p in module.parameters(recurse=False))
    if not per_pair:  # no decoder layers found by name: every layer as backward needs it
        trains = any(p.requires_grad for p in model.parameters())
        per_pair = (12 if trains else 4) * model.config.num_hidden_layers * width
    return per_token, per_pair


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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """The tutorial-shaped log line and one metrics.jsonl row per logged step, sent on to the trackers (rank 0
    writes; all ranks call)."""

    def __init__(self, save_dir: str, backend: "Backend", model: torch.nn.Module, logging: "LoggingConfig",
                 total_steps: int, start_step: int = 0):
        """`logging`: the LoggingConfig section (log interval, peak TFLOP/s for MFU, trackers); `start_step`: the
        step a resumed run starts at (0: a fresh run)."""
        self.backend, self.config = backend, model.config
        self.token_flops, self.pair_flops = trained_flops(model)  # read now: after any freezing in the script
        # A mixture-of-experts model's load-balancing loss, logged apart (what the probe's calls kept is dropped)
        self.router_aux, self.last_aux = find_router_aux(model), None
        if self.router_aux:
            self.router_aux.take()
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
        self.last_aux = self.router_aux.take() if self.router_aux else None
        self.steps += 1
        self.flops += self.token_flops * step_tokens + self.pair_flops * attended_pairs * self.backend.world_size

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep what runs inside (validation) out of the interval's time: `step_time` and `tokens_per_sec` are
        those of the training steps alone. The device is synchronised on entry and exit (rare, so cheap), so no
        queued work of a step is counted as validation, nor the other way round."""
        synchronize(self.backend.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.backend.device)
            self.started += time.perf_counter() - start

    def due(self, step: int, epoch_end: bool) -> bool:
        return step % self.log_interval == 0 or step == self.total_steps or epoch_end

    def log(self, step: int, epoch: int, step_loss: torch.Tensor, grad_norm: torch.Tensor | float,
            lr: float | list[float], validation: dict[str, float] | float | None = None,
            progress: tqdm | None = None) -> None:
        """Write the row and the line for `step` (every rank calls this: the loss is summed across ranks), send
        the row to the trackers and show its loss and speed on the `progress` bar. `lr`: each parameter group's
        learning rate (group 0's is `lr`, the others `lr_group1`, ...); `validation`: Validation.run's figures
        (val_loss, val_accuracy, ...) when it ran, or a validation loss alone."""
        loss = self.backend.all_reduce_sum(step_loss.clone()).item()
        aux = {}
        if self.router_aux:  # the step's loss holds coefficient x aux; logged apart, so loss stays the token loss
            aux["aux_loss"] = self.backend.all_reduce_sum(
                torch.zeros((), device=step_loss.device) if self.last_aux is None else self.last_aux).item()
            loss -= self.router_aux.coefficient * aux["aux_loss"]
        elapsed = time.perf_counter() - self.started
        world_peak = self.peak_flops * self.backend.world_size if self.peak_flops else None
        lrs = [lr] if isinstance(lr, (int, float)) else list(lr)
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lrs[0], "tokens": self.last_step_tokens,
               "step_time": elapsed / self.steps, "tokens_per_sec": self.tokens / elapsed,
               "grad_norm": float(grad_norm), "mfu": self.flops / elapsed / world_peak if world_peak else None,
               "peak_memory_gib": peak_memory_gib(self.backend.device),
               "peak_reserved_gib": peak_reserved_gib(self.backend.device), **aux,
               **{f"lr_group{group}": value for group, value in enumerate(lrs[1:], start=1)}}
        figures = {"val_loss": validation} if isinstance(validation, (int, float)) else validation or {}
        row.update(figures)
        if self.file:
            shown = "".join(f" | Val {name.removeprefix('val_').replace('_', ' ')}: {value:.4f}"
                            for name, value in figures.items())
            tqdm.write(f"[Step {step}/{self.total_steps}] | Loss: {loss:.4f} | Duration: {elapsed:.2f} | "
                       f"Throughput: {row['tokens_per_sec']:.2f} tokens/sec"
                       + "".join(f" | Aux loss: {value:.4f}" for value in aux.values()) + shown)
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
