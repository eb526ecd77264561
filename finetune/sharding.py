"""FSDP2 sharding: one unit per decoder layer plus the root. Training (`parallel.load_model`) and the memory
simulation (`memory_step`) both call `shard_model`, so the plan simulates exactly the sharding that trains."""
import torch
from torch.distributed.device_mesh import DeviceMesh


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks named by `_no_split_modules` anywhere in the model (a peft wrapper included)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    # fully_shard swaps in a subclass (FSDP<Name>), so look through the class hierarchy.
    return [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]


def shard_model(model: torch.nn.Module, bf16_compute: bool = False, cpu_offload: bool = False,
                pin_memory: bool = False, compile_layers: bool = False,
                mesh: DeviceMesh | None = None) -> list[torch.nn.Module]:
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
        if compile_layers:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # Gradients are summed over ranks, not averaged: the loss is already normalised by the global token count.
    # Each unit keeps its own setting; force_sum keeps the reduction a plain SUM, which gloo supports.
    for unit in [*layers, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return layers
