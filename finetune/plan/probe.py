"""The micro-batch probe: on GPUs, measure a real training step and take the largest micro-batch that fits.

It never catches an out-of-memory error to try again. Under FSDP2 every forward and backward is a chain of
collectives: a rank that ran out of memory mid-forward and went on to the next attempt would wait in a
collective its peers never reach. Instead the probe measures the peak of one-row and (where that leaves room)
two-row steps, fits peak = fixed + per_row x rows, and every rank takes the smallest micro-batch that the others'
memory allows, agreed on the host. An out-of-memory error in a measured step ends the job with one line.

The measured step is the training step: packed rows through the training forward (the same attention path),
two micro-batches accumulated into the gradients, the optimiser state held aside where the first update will
allocate it. Nothing is left behind: the gradients are freed, every RNG is as it was, the peaks are reset.
"""
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.data.batches import collate_rows, move_to
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.distributed.backend import Backend

FIT_FRACTION = 0.9  # of the device's memory: the allocator's fragmentation and the NCCL buffers need the rest
EXAMPLES_PER_ROW = 4  # the probe's packed rows hold examples of a quarter block each


class DeviceMemory:
    """The caching allocator's figures for one GPU (a stand-in with the same methods replaces it in tests)."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset_peak(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class _SyntheticExamples:
    """Random examples of `length` tokens, as the TokenTable that collate_rows reads."""

    def __init__(self, count: int, length: int, vocab_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = np.full(count, length, dtype=np.int64)
        self._ids = rng.integers(0, vocab_size, size=(count, length), dtype=np.int64)

    def example(self, index):
        return self._ids[index], self._ids[index]


def probe_batch(rows: int, block_size: int, vocab_size: int) -> dict:
    """A packed micro-batch of `rows` full rows, laid out as the collator lays out training rows."""
    length = max(1, block_size // EXAMPLES_PER_ROW)
    per_row = block_size // length
    examples = _SyntheticExamples(rows * per_row, length, vocab_size)
    return collate_rows(examples, [list(range(r * per_row, (r + 1) * per_row)) for r in range(rows)], 0, block_size)


def step_peak(model: torch.nn.Module, backend: "Backend", forward: Callable, rows: int, block_size: int,
              memory: DeviceMemory) -> int:
    """Peak bytes of two accumulated micro-batches of `rows` rows (forward and backward), gradients then freed."""
    memory.reset_peak()
    try:
        for _ in range(2):
            batch = move_to(probe_batch(rows, block_size, model.config.vocab_size), backend.device)
            with backend.autocast():
                loss = forward(model, batch, num_items_in_batch=max(1, 2 * batch["num_targets"]))
            loss.backward()
    except torch.OutOfMemoryError:
        # Not retried: the other ranks may be inside a collective this rank will never join. Ending the
        # process ends the job (torchrun stops the others).
        raise FinetuneError(f"{rows} row(s) of {block_size} tokens do not fit in GPU memory; use "
                            f"--activation-checkpointing on, a smaller --block-size, or more GPUs") from None
    peak = memory.peak()
    model.zero_grad(set_to_none=True)
    return peak


def largest_fitting(fixed: float, per_row: float, limit: float, upper: int, per_rank: int) -> int:
    """The largest micro-batch <= `upper` that divides `per_rank` with fixed + per_row x rows <= limit (at least 1)."""
    best = 1
    for rows in range(1, upper + 1):
        if per_rank % rows == 0 and fixed + per_row * rows <= limit:
            best = rows
    return best


def probe_micro_batch(model: torch.nn.Module, backend: "Backend", micro_batch_size: int, per_rank: int,
                      block_size: int, forward: Callable, optimizer_bytes: int = 0,
                      memory: DeviceMemory | None = None) -> int:
    """The micro-batch every rank can run: at most `micro_batch_size` (the simulated plan's), dividing `per_rank`.

    `optimizer_bytes` of device memory are held aside while measuring (the AdamW state the first step allocates;
    0 with CPU offload). `memory` defaults to the GPU's allocator figures.
    """
    memory = memory or DeviceMemory(backend.device)
    devices = [backend.device] if backend.device.type == "cuda" else []
    was_training = model.training
    # The training step, in training mode: from_pretrained leaves the model in eval mode, where checkpointed
    # layers keep every activation (they only checkpoint while training) and dropout is off.
    model.train()
    try:
        with torch.random.fork_rng(devices=devices):  # dropout draws here must not shift the training run's draws
            reserve = torch.empty(optimizer_bytes, dtype=torch.uint8, device=backend.device)
            one = step_peak(model, backend, forward, 1, block_size, memory)
            before = memory.allocated()
            limit = FIT_FRACTION * memory.total()
            # A second measurement only where the first says two rows fit even if everything it added doubled,
            # and only if every rank says so: a rank measuring alone would wait in FSDP collectives the others
            # never join.
            wanted = min(micro_batch_size, per_rank) >= 2 and one + (one - before) <= limit
            two = None
            if all(backend.all_gather(wanted)):
                two = step_peak(model, backend, forward, 2, block_size, memory)
            del reserve
    finally:
        model.train(was_training)
    memory.reset_peak()
    if two is None:
        mine = 1
    else:
        per_row = max(two - one, 0)
        mine = largest_fitting(one - per_row, per_row, limit, micro_batch_size, per_rank)
    # Host-side agreement (gloo): every rank gets here, so none waits in a collective another has left.
    return min(backend.all_gather(mine))

