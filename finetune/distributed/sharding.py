"""FSDP2 sharding: one unit per decoder layer, one for the input embedding, plus the root. Training
(`model.loading.load_model`) and the memory simulation (`plan.memory_step`) both call `shard_model`, so the plan simulates
exactly the sharding that trains."""
import torch
from torch.distributed.device_mesh import DeviceMesh

from finetune.distributed.backend import Backend


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks named by `_no_split_modules` anywhere in the model (a peft wrapper included)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    # fully_shard swaps in a subclass (FSDP<Name>), so look through the class hierarchy.
    return [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]


def shard_model(model: torch.nn.Module, bf16_compute: bool = False, cpu_offload: bool = False,
                pin_memory: bool = False, mesh: DeviceMesh | None = None) -> list[torch.nn.Module]:
    """Shard `model` in place with FSDP2 `fully_shard` per decoder layer and at the root; returns the layers.

    bf16_compute: parameters gathered in bf16, gradients reduced in fp32 (master weights stay fp32).
    cpu_offload: sharded weights, gradients and optimiser state live in host memory (CPUOffloadPolicy).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer in _no_split_modules; cannot shard it")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    embedding = own_unit_embedding(model)
    if embedding is not None:
        fully_shard(embedding, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # Gradients are summed over ranks, not averaged: the loss is already normalised by the global token count.
    # Each unit keeps its own setting; force_sum keeps the reduction a plain SUM, which gloo supports.
    for unit in [*layers, *([embedding] if embedding is not None else []), model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return layers


def own_unit_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The input embedding, to shard as a unit of its own (Baichuan2 13B's is 0.64B parameters: in the root unit it
    would stay gathered for the whole step). None when the output head shares its weight: one unit must hold it.

    The output head stays in the root: the chunked loss reads its weight inside the root's forward."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get else None
    if not isinstance(embedding, torch.nn.Embedding):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is not None and getattr(head, "weight", None) is embedding.weight else embedding


def full_state_dict_on_rank0(model: torch.nn.Module, backend: Backend,
                             trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights as ordinary CPU tensors on rank 0 (empty elsewhere), for save_pretrained;
    with `trainable_only`, just the parameters that train (LoRA adapters), gathered the same way."""
    if backend.engine != "fsdp2":
        keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
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
