"""The one backend hook: call `enable_advanced_parallelization()` before the model is loaded.

On the MoAI Platform it defers to `torch.moreh.option.enable_advanced_parallelization()`, which parallelises
the unchanged script by itself. Everywhere else it does the same job with stock PyTorch:

  python train.py ...                              one GPU, or the CPU
  torchrun --standalone --nproc_per_node N ...     N processes on one node
  torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29400 ...   several nodes

Under torchrun it starts the process group (nccl on GPUs, gloo on CPU), binds each rank to its device, loads
the weights once per job and shards the model with FSDP2 (finetune/model/loading.py,
finetune/distributed/sharding.py); the plan (finetune/plan/) turns the global `--batch-size` into per-rank
micro-batches and gradient-accumulation steps.
"""
import contextlib
import datetime
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist

from finetune.errors import FinetuneError

T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class Backend:
    """Where this process runs and how the job is laid out; returned by the hook."""
    engine: str                 # "moreh", "fsdp2" or "single"
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    mixed_precision: str = "no"  # "bf16" or "no"
    control_group: object = None  # a gloo group for small host-side agreements (stop flags)
    download_group: object = None  # a gloo group with a long timeout: the others wait there while rank 0 downloads

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast where FSDP's own mixed precision is not doing the casting."""
        if self.mixed_precision == "bf16" and not (self.engine == "fsdp2" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (host-side, no device sync)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(value.item())

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control_group)
        return gathered

    def on_rank0(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only and give every rank its outcome: what it returned (small, picklable), or
        the same FinetuneError. Every rank must call it, as any collective."""
        outcome = (None, None)
        if self.is_main:
            try:
                outcome = (work(), None)
            except FinetuneError as exc:  # every rank must hear it, not wait in the gather
                outcome = (None, str(exc))
        result, problem = self.all_gather(outcome)[0]
        if problem is not None:
            raise FinetuneError(problem)
        return result

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)

    def wait_for_download(self) -> None:
        """Every rank waits here (gloo, hours of timeout) until rank 0 has fetched the weights."""
        if self.distributed:
            dist.barrier(group=self.download_group or self.control_group)

    def shutdown(self) -> None:
        self.control_group = self.download_group = None  # a held reference would keep the group alive past destroy_process_group
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def enable_advanced_parallelization(mixed_precision: str = "auto", timeout_minutes: float = 30) -> Backend:
    """Set up the job for this process; call once, before the model is loaded."""
    if importlib.util.find_spec("torch.moreh") is not None:  # present only on the MoAI Platform
        importlib.import_module("torch.moreh").option.enable_advanced_parallelization()
        return Backend(engine="moreh", device=torch.device("cuda"),
                       mixed_precision="no" if mixed_precision == "no" else "bf16")

    has_cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if has_cuda else "no"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # `python script.py`: one device. Under torchrun even one process runs through FSDP2 (CPU offload needs it).
    if world_size == 1 and "LOCAL_RANK" not in os.environ:
        device = torch.device("cuda", 0) if has_cuda else torch.device("cpu")
        return Backend(engine="single", device=device, mixed_precision=mixed_precision)

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if has_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # A bounded timeout turns a peer that died mid-collective into an error here instead of a hang.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(process_group_backend(has_cuda), timeout=timeout, device_id=device if has_cuda else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if has_cuda else dist.group.WORLD
    # Waiting for rank 0 to download the weights may take hours; only this gloo group waits that long.
    download = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=DOWNLOAD_TIMEOUT_HOURS))
    return Backend(engine="fsdp2", device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   mixed_precision=mixed_precision, control_group=control, download_group=download)


DOWNLOAD_TIMEOUT_HOURS = 24


def offload_threads() -> int:
    """CPU threads for this process under CPU offload: its share of the node's cores. torchrun sets one thread
    per process (OMP_NUM_THREADS=1), which leaves AdamW over billions of host-side parameters on one core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def process_group_backend(has_cuda: bool) -> str:
    """The default group's backends: NCCL for GPU tensors and gloo beside it for CPU tensors. CPU offload keeps
    gradients on the host, so clipping reduces their norms there; an NCCL-only group refuses that ("No backend
    type associated with device type cpu")."""
    return "cuda:nccl,cpu:gloo" if has_cuda else "gloo"
