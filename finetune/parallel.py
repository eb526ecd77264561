"""The one backend hook: call `enable_advanced_parallelization()` before the model is loaded.

On the MoAI Platform it defers to `torch.moreh.option.enable_advanced_parallelization()`, which parallelises
the unchanged script by itself. Everywhere else it does the same job with stock PyTorch:

  python train.py ...                              one GPU, or the CPU
  torchrun --standalone --nproc_per_node N ...     N processes on one node
  torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29400 ...   several nodes

Under torchrun it starts the process group (nccl on GPUs, gloo on CPU), binds each rank to its device, loads
the weights once per job (rank 0 reads the checkpoint, the others build on the meta device and receive their
shards) and shards the model with FSDP2 `fully_shard`, one unit per decoder layer. It also turns the global
`--batch-size` into per-rank micro-batches and gradient-accumulation steps, and prints the chosen plan.
"""
import contextlib
import datetime
import functools
import gc
import importlib
import importlib.util
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

import torch
import torch.distributed as dist

from finetune import lora, packed_attention
from finetune.chunked_loss import use_chunked_loss
from finetune.errors import FinetuneError, error_line
from finetune.remote_code import refusing_remote_code
from finetune.sharding import decoder_layers, shard_model
from finetune.varlen_attention import attention_name
from finetune.weight_files import damaged_weight_file

if TYPE_CHECKING:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from finetune.config import ModelConfig

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


def errors_from_rank0(main: Callable[P, T]) -> Callable[P, T]:
    """Decorate a script's main(): under torchrun every rank meets the same bad input, so only rank 0 prints the
    `error:` line and the other ranks just exit non-zero (torchrun adds its own failure report after it).
    An error that only another rank met (its own disk, say) is printed by that rank, naming it."""
    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            try:
                return main(*args, **kwargs)
            except FinetuneError as exc:
                raise SystemExit(error_line(exc)) from None
        except SystemExit as exc:
            rank = int(os.environ.get("RANK", "0"))
            if isinstance(exc.code, str) and rank != 0:
                # torchrun stops every worker once one has failed: leave rank 0 the time to say why. Its stop
                # signal must end this process silently, so the training loop's stop handler is removed first.
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                time.sleep(10)
                # Still running: rank 0 did not fail, so this error is this rank's alone. It starts a line of its
                # own, whatever rank 0's progress bar has written.
                print(f"\nerror: [rank {rank}] {exc.code.removeprefix('error: ')}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            raise
        finally:
            # Sharded parameters and their hooks form reference cycles that keep process-group state alive. Free
            # them while the interpreter is whole: torn down at exit, gloo's threads can abort a finished run.
            gc.collect()
    return run


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


# ----------------------------------------------------------------------------------------------------------
# Model loading and sharding
# ----------------------------------------------------------------------------------------------------------

class _PlacementLayout(Protocol):
    """What load_model reads of plan.Layout (plan imports this module, so it is not imported here)."""
    @property
    def activation_checkpointing(self) -> bool: ...
    @property
    def cpu_offload(self) -> bool: ...
    @property
    def chunked_loss(self) -> bool: ...
    @property
    def attention(self) -> str: ...


def load_model(backend: Backend, model_class: "type[AutoModelForCausalLM] | type[PreTrainedModel]",
               model: "ModelConfig", layout: _PlacementLayout | None = None, attn_implementation: str | None = None,
               adapters: lora.LoraSettings | None = None, compile_layers: bool = False) -> torch.nn.Module:
    """Load fp32 master weights and place them: whole on one device, or sharded per layer under torchrun.

    `model` is the ModelConfig section (where from, whether its own code may run); `layout` (plan.Layout)
    says whether to checkpoint activations, offload to the CPU and compute the loss in chunks. With
    `adapters` (LoraSettings: --lora / --qlora) the base is frozen (bf16 or 4-bit) and LoRA adapters are added
    before placing, on every rank, so FSDP2 shards base and adapters alike.
    """
    model_path = model.name_or_path
    checkpointing, cpu_offload, chunked = ((layout.activation_checkpointing, layout.cpu_offload, layout.chunked_loss)
                                           if layout else (False, False, False))
    if cpu_offload:
        torch.set_num_threads(offload_threads())  # the optimiser step runs on the host
    lora.check_backend(adapters, backend)
    attn_implementation = attention_name(attn_implementation, layout.attention if layout else "auto",
                                         backend.device, backend.mixed_precision)
    try:
        with refusing_remote_code(model_path):
            loaded = _load_and_place(backend, model_class, model_path, checkpointing, compile_layers,
                                     attn_implementation, model.trust_remote_code, adapters, cpu_offload)
        if attn_implementation == packed_attention.ATTENTION_NAME:
            packed_attention.check_model_routes_attention(loaded)
        if chunked:  # the loss a chunk of tokens at a time, inside the model's own forward (FSDP2 gathers)
            use_chunked_loss(loaded.get_base_model() if adapters else loaded)
        return loaded
    except FinetuneError:
        raise  # already the one line (a folder's own code refused, a model that cannot be sharded)
    except Exception as exc:
        damaged = damaged_weight_file(model_path)  # whatever the reader raised, a damaged file is the cause
        if damaged:
            raise FinetuneError(f"cannot load the model {model_path!r}: {damaged}") from None
        if isinstance(exc, (OSError, ValueError)):
            raise FinetuneError(f"cannot load the model {model_path!r}: {str(exc).splitlines()[0]}") from None
        if not (adapters and adapters.quantize_4bit and isinstance(exc, (RuntimeError, NotImplementedError,
                                                                           ImportError))):
            raise
        raise FinetuneError(f"--qlora: bitsandbytes cannot load a 4-bit model on {backend.device} here "
                            f"({str(exc).splitlines()[0]})") from None


def _load_and_place(backend, model_class, model_path, gradient_checkpointing, compile_layers, attn_implementation,
                    trust_remote_code, adapters, cpu_offload):
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if adapters:
        kwargs.update(lora.base_load_kwargs(adapters, backend))
    if backend.engine != "fsdp2":
        model = model_class.from_pretrained(model_path, **kwargs)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapters:
            model = lora.add_adapters(model, adapters)
        if compile_layers:
            for layer in decoder_layers(model):
                layer.compile()
        # A 4-bit base is already on its device (quantised while loading) and refuses .to().
        return model if adapters and adapters.quantize_4bit else model.to(backend.device)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # Only rank 0 reads the checkpoint into host memory; every rank builds an empty (meta) copy to shard.
    full_state, buffers = {}, {}
    if backend.is_main:
        full_model = model_class.from_pretrained(model_path, **kwargs)
        if adapters:  # rank 0's initial adapters go out with the base weights
            full_model = lora.add_adapters(full_model, adapters)
        full_state = full_model.state_dict()
        buffers = {name: b.clone() for name, b in full_model.named_buffers()}
        del full_model
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = model_class.from_config(config, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters:
        with torch.device("meta"):
            model = lora.add_adapters(model, adapters)

    # CPU offload: sharded master weights, gradients and optimiser state stay in host memory; FSDP2 copies each
    # unit's shard to the device for its forward and backward.
    try:
        shard_model(model, bf16_compute=backend.mixed_precision == "bf16" and backend.device.type == "cuda",
                    cpu_offload=cpu_offload, pin_memory=backend.device.type == "cuda", compile_layers=compile_layers)
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None

    model.to_empty(device="cpu" if cpu_offload else backend.device)
    if cpu_offload:  # buffers (rotary frequencies, ...) are not sharded or offloaded: they live on the device
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(backend.device)
    # Rank 0 may still be downloading the weights: the first NCCL collective (below) would time out meanwhile.
    backend.wait_for_download()
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    # Non-persistent buffers (rotary frequencies, ...) are not in the state dict: send rank 0's copies.
    for name, buffer in model.named_buffers():
        if backend.is_main:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def full_state_dict_on_rank0(model: torch.nn.Module, backend: Backend,
                             trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights as ordinary CPU tensors on rank 0 (empty elsewhere), for save_pretrained;
    with `trainable_only`, just the parameters that train (LoRA adapters), gathered the same way."""
    if backend.engine != "fsdp2":
        keep = lora.trainable_names(model) if trainable_only else None
        return without_tied_copies(model, {k: v.detach().cpu() for k, v in model.state_dict().items()
                                           if keep is None or k in keep})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return without_tied_copies(model, get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)))


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` less the weights tied to another one (a tied output head is the embedding): save_pretrained
    given separate tensors would write both, and the folder would then hold an extra `lm_head.weight`."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: tensor for name, tensor in state_dict.items() if not (name in tied and tied[name] in state_dict)}


# ----------------------------------------------------------------------------------------------------------
# Batch split and the printed plan
# ----------------------------------------------------------------------------------------------------------

CPU_MICRO_BATCH_TOKENS = 2048  # measured on the demo model: ~2k tokens per forward keep a CPU's caches warm


def split_global_batch(batch_size: int, world_size: int, micro_batch_size: int | None = None,
                       device_type: str = "cpu", block_size: int = 1024) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps) for `batch_size` rows per step over `world_size` ranks."""
    if batch_size <= 0:
        raise FinetuneError("--batch-size must be a positive number of rows")
    if batch_size % world_size:
        raise FinetuneError(f"--batch-size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    if micro_batch_size is None:
        # CPUs run fastest on a couple of thousand tokens at a time; GPUs start from the largest power of two
        # and the probe backs off from there.
        start = max(1, CPU_MICRO_BATCH_TOKENS // block_size) if device_type == "cpu" else per_rank
        micro_batch_size = min(per_rank, 2 ** int(math.log2(start)))
        while per_rank % micro_batch_size:
            micro_batch_size //= 2
    if micro_batch_size <= 0 or per_rank % micro_batch_size:
        raise FinetuneError(f"--micro-batch-size {micro_batch_size} does not divide the {per_rank} rows "
                            f"each process takes per step")
    return micro_batch_size, per_rank // micro_batch_size


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of this process's AdamW state (two fp32 moments per trainable element it holds). Under FSDP2 a
    parameter is a DTensor whose numel() is the whole tensor's; this process holds only its local shard."""
    return 8 * sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                   for p in model.parameters() if p.requires_grad)
