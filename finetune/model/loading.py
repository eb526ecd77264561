"""Loading a causal LM for training: fp32 master weights, the attention for packed rows, adapters, and placement on
one device or sharded with FSDP2 (rank 0 reads the checkpoint; the others build on the meta device and receive
their shards)."""
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from finetune.distributed.backend import Backend, offload_threads
from finetune.distributed.sharding import shard_model
from finetune.errors import FinetuneError
from finetune.model import lora
from finetune.model.remote_code import refusing_remote_code
from finetune.model.weight_files import damaged_weight_file
from finetune.ops import span_attention
from finetune.ops.chunked_loss import DEFAULT_CHUNK_TOKENS, use_token_loss
from finetune.ops.varlen_attention import KERNEL_NAMES, attention_name

if TYPE_CHECKING:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from finetune.config import ModelConfig



class _PlacementLayout(Protocol):
    """What load_model reads of plan.layout.Layout (that module imports this one, so it is not imported here)."""
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
               adapters: lora.LoraSettings | None = None) -> torch.nn.Module:
    """Load fp32 master weights and place them: whole on one device, or sharded per layer under torchrun.

    `model` is the ModelConfig section (where from, whether its own code may run); `layout` (plan.layout.Layout)
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
            loaded = _load_and_place(backend, model_class, model_path, checkpointing, attn_implementation,
                                     model.trust_remote_code, adapters, cpu_offload)
        if attn_implementation in (span_attention.ATTENTION_NAME, *KERNEL_NAMES.values()):  # every packed path
            span_attention.check_model_routes_attention(loaded)
        # The script's token_loss, inside the model's own forward (where FSDP2 gathers the head): a chunk of
        # tokens at a time, or from the whole micro-batch's logits with --chunked-loss off
        use_token_loss(loaded.get_base_model() if adapters else loaded, DEFAULT_CHUNK_TOKENS if chunked else None)
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


def _load_and_place(backend, model_class, model_path, gradient_checkpointing, attn_implementation, trust_remote_code,
                    adapters, cpu_offload):
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
                    cpu_offload=cpu_offload, pin_memory=backend.device.type == "cuda")
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None

    model.to_empty(device="cpu" if cpu_offload else backend.device)
    if cpu_offload:  # buffers (rotary frequencies, ...) are not sharded or offloaded: they live on the device
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(backend.device)
    # Rank 0 may still be downloading the weights: the first NCCL collective (below) would time out meanwhile.
    backend.wait_for_download()
    if cpu_offload and backend.is_main and backend.world_size > 1:
        # Offloaded shards live in host memory, so the weights go out from rank 0 over gloo (TCP), not NCCL.
        print(f"note: --cpu-offload on: rank 0 sends the weights to the other {backend.world_size - 1} rank(s) "
              f"over gloo, {weight_bytes(full_state) / 2 ** 30:.1f} GiB each; on a slow network this takes a while",
              flush=True)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    # Non-persistent buffers (rotary frequencies, ...) are not in the state dict: send rank 0's copies.
    for name, buffer in model.named_buffers():
        if backend.is_main:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def weight_bytes(state_dict: dict) -> int:
    """Bytes of the tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in state_dict.values() if torch.is_tensor(t))
