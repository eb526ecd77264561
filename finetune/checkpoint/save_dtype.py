"""The finished model's weights for `save_pretrained`: gathered one tensor at a time, in the dtype they are saved in.

Full fine-tuning keeps fp32 master weights, but a bf16 run computes in bf16 and its users load bf16: saving fp32
doubles the folder (52 GB for Llama 2 13B) and rank 0's host memory while gathering. So the saved dtype is the
training compute dtype unless `--save-dtype fp32` asks for the master weights. Each shard is cast before it is
gathered, so the traffic and rank 0's copy are in the saved dtype too.
"""
import json
import os

import torch

SAVE_DTYPES = ("compute", "fp32", "none")


def saved_dtype(save_dtype: str, mixed_precision: str) -> torch.dtype | None:
    """The dtype the final weights are written in: `compute` follows the training compute dtype, `fp32` keeps the
    master weights, `none` writes no weights (timing runs, benchmarks/gpu_check.py)."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, not {save_dtype!r}")
    if save_dtype == "none":
        return None
    return torch.bfloat16 if save_dtype == "compute" and mixed_precision == "bf16" else torch.float32


def dtype_name(dtype: torch.dtype | None) -> str:
    """How parallel_plan.json records it: "bfloat16", "float32" or "none"."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def dtype_of(plan: dict) -> torch.dtype | None:
    """The saved dtype a parallel plan records (None: no weights)."""
    name = plan.get("saved_dtype", "float32")
    return None if name == "none" else getattr(torch, name)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor  # integer buffers keep their type


def gathered_state_dict(model: torch.nn.Module, is_main: bool, dtype: torch.dtype) -> dict:
    """The whole model's state dict as CPU tensors in `dtype` on the main rank (empty elsewhere).

    Every rank must call it: a sharded (DTensor) entry is cast on its shard, gathered, and copied to the host
    before the next one, so no rank ever holds more than one full tensor on its device.
    """
    state = {}
    for name, value in model.state_dict().items():
        value = _cast(value.detach(), dtype)
        if hasattr(value, "full_tensor"):
            mesh_device = value.device_mesh.device_type
            if value.device.type != mesh_device:  # CPU offload: the shard is on the host, the group on the device
                value = value.to(mesh_device)
            value = value.full_tensor()
        if is_main:
            state[name] = value.cpu()
    return state


def record_saved_dtype(folder: str, dtype: torch.dtype) -> None:
    """save_pretrained writes the parameters' dtype (fp32 masters) into config.json; write the saved one."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
