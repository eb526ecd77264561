"""Peak memory of one training step, measured by PyTorch's own memory tracker on a simulated step, and the
plan's choice rule built on it.

The step itself (the model built from its config, sharded over a fake process group, run on fake tensors
under the tracker) is finetune/plan/memory_step.py; the readings are cached on disk (finetune/plan/memory_cache.py)
and simulated in a child process (finetune/plan/memory_process.py).

    memory = simulate_step_memory(config, world_size=8, micro_batch_size=4, block_size=1024)
    plan = plan_candidates(config, world_size=8, batch_size=256, block_size=1024, device_memory_gb=80)
    plan.chosen, plan.candidates, plan.lines()

Results are cached on disk per configuration (FINETUNE_MEMORY_CACHE, default ~/.cache/finetune/memory). The
simulations run in one child process per call (`python -m finetune.plan.memory_process`).

    python -m finetune.plan.memory --config config.json --world-size 8 --batch-size 256 --device-memory-gb 80
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError, entry_point
from finetune.plan import memory_cache, memory_process

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 1024 ** 3
FIT_FRACTION = 0.92  # of device memory a plan may use: allocator rounding, fragmentation, CUDA context
ADAPTERS = ("none", "lora", "qlora")
PRECISIONS = ("bf16", "fp32")
# Largest micro-batch a plan considers. The simulated step's time grows with its tokens (the chunked loss walks
# them 1024 at a time: ~15 s more per million), and a 13B model fits about 8k tokens per pass on an 80 GB GPU.
MAX_MICRO_BATCH_TOKENS = 2 ** 18
PREFERENCE_RULE = (f"fastest that fits: no CPU offload before offload, no activation checkpointing before "
                   f"checkpointing, then the largest micro-batch; fits = device peak <= {FIT_FRACTION:.0%} of "
                   f"device memory and, with offload, the host need of the node's devices <= host memory")

# How the trackers' categories add up to the reported breakdown.
GROUPS = {
    "parameters": ("Sharded Param", "Unsharded Param", "All Gather", "Parameter", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "activations": ("Activation", "Inputs", "Other"),
    "temporaries": ("Temp",),
}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Memory of one training step per device, in bytes, as the tracker measured it."""
    device_peak: int
    host: int  # host memory the offloaded state needs per device (0 without offload)
    breakdown: dict  # parameters / gradients / optimizer / activations / temporaries at the device peak
    tracker: dict  # the tracker's own categories at the device peak

    def gib(self) -> dict[str, float]:
        """The figures in GiB, rounded, for printing and plan files."""
        return {"device_peak": round(self.device_peak / GIB, 2), "host": round(self.host / GIB, 2),
                **{k: round(v / GIB, 2) for k, v in self.breakdown.items()}}


@dataclasses.dataclass(frozen=True)
class Candidate:
    micro_batch_size: int
    accumulation_steps: int
    checkpointing: bool
    cpu_offload: bool
    memory: StepMemory | None  # None when not simulated, `note` says why
    fits: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The candidate layouts with their simulated memory, and the one chosen by `rule` (the printed plan)."""
    chosen: Candidate | None  # None when no candidate fits
    candidates: list
    rule: str = PREFERENCE_RULE

    def lines(self) -> list[str]:
        """One printable line per candidate, the chosen one marked."""
        out = []
        for c in self.candidates:
            mark = "*" if c is self.chosen else " "
            head = (f"{mark} micro {c.micro_batch_size:>4} x accumulation {c.accumulation_steps:<4} "
                    f"checkpointing {'on ' if c.checkpointing else 'off'} offload {'on ' if c.cpu_offload else 'off'}")
            if c.memory is None:
                out.append(f"{head}  not simulated: {c.note}")
                continue
            g = c.memory.gib()
            host = f" host {g['host']:.1f} GiB" if c.cpu_offload else ""
            out.append(f"{head}  peak {g['device_peak']:.1f} GiB{host}  {'fits' if c.fits else 'too big'}")
        return out


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------

def simulate_step_memory(model_config: PretrainedConfig | dict, world_size: int, micro_batch_size: int,
                         block_size: int, checkpointing: bool = False, cpu_offload: bool = False,
                         precision: str = "bf16", adapter: str = "none", lora: dict | None = None,
                         chunked_loss: bool = True, accumulation_steps: int = 1) -> StepMemory:
    """Peak memory per device of one training step of this configuration (a StepMemory).

    model_config: a transformers config or its dict, with `model_type` ("llama", "baichuan", ...).
    accumulation_steps: micro-batches per optimiser step; from 2 on, the simulated step runs two, so that the
    second one meets the gradients of the first, as every micro-batch after the first does.
    precision: "bf16" (bf16 compute, fp32 master weights) or "fp32". adapter: "none", "lora" or "qlora".
    lora: peft LoraConfig keywords (r, lora_alpha, lora_dropout, target_modules) for the adapters.
    """
    config = _config_dict(model_config)
    setup = _setup(world_size, block_size, checkpointing, cpu_offload, precision, adapter, lora, chunked_loss)
    with memory_process.SimulationChild() as child:
        readings = memory_cache.readings(config, setup, [(micro_batch_size, _passes(accumulation_steps))], None, child)
    return _step_memory(readings[micro_batch_size], cpu_offload)


def plan_candidates(model_config: PretrainedConfig | dict, world_size: int, batch_size: int, block_size: int,
                    device_memory_gb: float, host_memory_gb: float = 512, devices_per_node: int | None = None,
                    precision: str = "bf16", adapter: str = "none", lora: dict | None = None,
                    chunked_loss: bool = True, micro_batch_size: int | None = None,
                    checkpointing: bool | None = None, cpu_offload: bool | None = None,
                    exhaustive: bool = False) -> Choice:
    """Candidate layouts of a global batch of `batch_size` rows with their simulated memory, and the chosen one
    (PREFERENCE_RULE).

    Candidates: micro-batch sizes that are powers of two dividing the rows each device takes per step (or the
    given `micro_batch_size`), activation checkpointing off/on and CPU offload off/on (or the given values).
    Memory sizes are GiB (torch's total_memory / 2**30); `host_memory_gb` is one node's, shared by its
    `devices_per_node` devices (default: all `world_size`). A candidate with accumulation runs two
    micro-batches in its simulated step (see simulate_step_memory).

    By default only what the choice needs is simulated: settings in order of preference, each from the
    smallest micro-batch up to the first that does not fit (memory only grows with the micro-batch), and none
    after the first setting with a fit. Readings of other settings that come with the same run (offload on
    and off, on several devices) are kept. The others have memory None and a note; `exhaustive` simulates all.
    """
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of the {world_size} devices")
    per_device = batch_size // world_size
    micros = [micro_batch_size] if micro_batch_size else _micro_batch_sizes(per_device, block_size)
    if micros[0] < 1 or per_device % micros[0]:
        raise ValueError(f"micro-batch {micros[0]} does not divide the {per_device} rows each device takes")
    if micros[0] > 1 and micros[0] * block_size > MAX_MICRO_BATCH_TOKENS:
        raise ValueError(f"a micro-batch of {micros[0]} x {block_size} tokens is past the {MAX_MICRO_BATCH_TOKENS} "
                         f"tokens a plan simulates; choose a smaller --micro-batch-size")
    device_limit = device_memory_gb * GIB * FIT_FRACTION
    host_limit = host_memory_gb * GIB / (devices_per_node or world_size)
    config = _config_dict(model_config)
    runs = [(micro, _passes(per_device // micro)) for micro in micros]
    settings = [(offload, ckpt) for offload in ([cpu_offload] if cpu_offload is not None else [False, True])
                for ckpt in ([checkpointing] if checkpointing is not None else [False, True])]

    def setup_of(offload, ckpt):
        return _setup(world_size, block_size, ckpt, offload, precision, adapter, lora, chunked_loss)

    def fits(memory, offload):
        return memory.device_peak <= device_limit and (not offload or memory.host <= host_limit)

    readings = {}  # setup (as JSON) -> {micro: reading}; on several devices one setup serves both offloads
    with memory_process.SimulationChild() as child:
        for offload, ckpt in settings:
            setup = setup_of(offload, ckpt)
            stop = None if exhaustive else {"device": device_limit, "host": host_limit, "offloads": [offload]}
            found = memory_cache.readings(config, setup, runs, stop, child)
            readings.setdefault(json.dumps(setup, sort_keys=True), {}).update(found)
            if not exhaustive and any(fits(_step_memory(r, offload), offload) for r in found.values()):
                break

    candidates, reached_fit = [], False
    for offload, ckpt in settings:
        found = readings.get(json.dumps(setup_of(offload, ckpt), sort_keys=True), {})
        for micro in micros:
            memory = _step_memory(found[micro], offload) if micro in found else None
            note = "" if memory else ("a preferred setting fits" if reached_fit
                                      else "a smaller micro-batch already does not fit")
            candidates.append(Candidate(micro, per_device // micro, ckpt, offload, memory,
                                        memory is not None and fits(memory, offload), note))
        reached_fit = reached_fit or any(c.fits for c in candidates)
    chosen = next((c for c in candidates if c.fits), None)
    return Choice(chosen, candidates)


def _passes(accumulation_steps):
    """Micro-batches the simulated step runs: a second one meets the first one's gradients."""
    return 2 if accumulation_steps >= 2 else 1


def _micro_batch_sizes(rows, block_size):
    """Powers of two dividing `rows`, largest first, of at most MAX_MICRO_BATCH_TOKENS tokens (one row at least)."""
    return [2 ** k for k in range(int(math.log2(rows)), -1, -1)
            if rows % 2 ** k == 0 and (k == 0 or 2 ** k * block_size <= MAX_MICRO_BATCH_TOKENS)]


# ----------------------------------------------------------------------------------------------------------
# Configurations and readings
# ----------------------------------------------------------------------------------------------------------

def _config_dict(model_config):
    config = model_config if isinstance(model_config, dict) else model_config.to_dict()
    if not config.get("model_type"):
        raise ValueError("the model config names no model_type (e.g. 'llama' or 'baichuan')")
    if not config.get("num_hidden_layers"):
        raise ValueError("the model config names no num_hidden_layers")
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "quantization_config")}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def _setup(world_size, block_size, checkpointing, cpu_offload, precision, adapter, lora, chunked_loss):
    """What decides one simulation. CPU offload only decides the engine on one device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if world_size < 1 or block_size < 2:
        raise ValueError("world size must be at least 1 and block size at least 2")
    lora = {"target_modules": "all-linear", **(lora or {})} if adapter != "none" else {}
    return {"engine": "fsdp2" if world_size > 1 or cpu_offload else "single", "world_size": world_size,
            "block_size": block_size, "checkpointing": bool(checkpointing), "precision": precision,
            "adapter": adapter, "lora": lora, "chunked_loss": bool(chunked_loss)}


def _step_memory(reading, cpu_offload):
    part = reading["offloaded" if cpu_offload else "on_device"]
    breakdown = {group: sum(part["categories"].get(name, 0) for name in names) for group, names in GROUPS.items()}
    return StepMemory(part["device_peak"], part["host_peak"], breakdown, dict(part["categories"]))


def _print_plan(args):
    """`python -m finetune.plan.memory --config config.json ...`: the candidate table of a target machine."""
    try:
        config = json.loads(Path(args.config).read_text())
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"cannot read the model config {args.config!r}: {exc}") from None
    try:
        plan = plan_candidates(config, args.world_size, args.batch_size, args.block_size, args.device_memory_gb,
                               args.host_memory_gb, precision=args.precision, adapter=args.adapter,
                               chunked_loss=not args.plain_loss, exhaustive=args.exhaustive)
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None
    print("\n".join([f"rule: {plan.rule}", *plan.lines()]))
    if plan.chosen:
        print(f"chosen: {json.dumps(plan.chosen.memory.gib())}")
    else:
        print("chosen: none fits")


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated training-step memory of a model on a target machine.")
    parser.add_argument("--config", help="the model's config.json (with model_type)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="global rows per optimiser step")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--device-memory-gb", type=float, default=80)
    parser.add_argument("--host-memory-gb", type=float, default=512)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--adapter", choices=ADAPTERS, default="none")
    parser.add_argument("--plain-loss", action="store_true", help="simulate the model's own loss, not chunked")
    parser.add_argument("--exhaustive", action="store_true", help="simulate every candidate")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config is required")
    _print_plan(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
