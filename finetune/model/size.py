"""Sizes read off the model itself, not a formula over `hidden_size`: parameter counts for the plan, the weights
that take part in matmuls for FLOPs and MFU. Without weights (`--plan-only`) the model is built on the meta
device from its config, so grouped-query attention, a head_dim that is not hidden_size / heads (Qwen3), fused
projections (Phi-3, Baichuan) and tied embeddings all count as they are.

Mixture-of-experts layers (Mixtral, Qwen3-MoE, gpt-oss) hold their experts as one tensor per projection, (experts,
..., ...), in a module with `num_experts`, beside a router whose (experts, hidden) weight scores every token. Each
token runs `num_experts_per_tok` of the experts: memory counts every parameter, FLOPs and MFU the active ones
(the router in full, each expert tensor at top_k / experts)."""
from typing import TYPE_CHECKING

import torch

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Fields of a config.json that describe the files, not the model's shape.
NOT_SHAPE = ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "quantization_config")


def meta_model(config_dict: dict) -> torch.nn.Module:
    """The causal LM of a config dict (with its model_type) on the meta device: shapes only, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)

    fields = {key: value for key, value in config_dict.items() if not key.startswith("_") and key not in NOT_SHAPE}
    model_type = fields.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise FinetuneError(f"cannot build a {model_type!r} causal LM from its config to size it "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model, a tied weight once."""
    return sum(p.numel() for p in model.parameters())


def active_share(model: torch.nn.Module) -> float:
    """The share of each expert's weights a token uses: num_experts_per_tok / the number of experts (1 for a
    dense model)."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return min(1.0, top_k / experts) if experts and top_k else 1.0


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The experts' own parameters by name: those of a module with `num_experts` that hold one slice per expert
    (weights (experts, in, out) and biases (experts, out)); a router's (experts, hidden) weight is not one."""
    found = {}
    for name, module in model.named_modules():
        if not getattr(module, "num_experts", None) or isinstance(module, torch.nn.Linear):
            continue
        for key, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and p.shape[0] == module.num_experts and not (p.dim() == 2 and key == "weight"):
                found[f"{name}.{key}"] = p
    return found


def router_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Routers' (experts, hidden) weights by name: a matmul every token runs in full."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if getattr(module, "num_experts", None) and not isinstance(module, torch.nn.Linear)
            and isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.dim() == 2}


def active_parameter_count(model: torch.nn.Module) -> int:
    """Parameters a token uses: all but the experts it is not routed to (parameter_count for a dense model)."""
    idle = (1 - active_share(model)) * sum(p.numel() for p in expert_parameters(model).values())
    return parameter_count(model) - round(idle)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights used in a matmul for every token: every linear layer of the model, the output head included
    (once per use even when tied to the embedding), routers, and the experts' weight tensors at the share a token
    runs; LoRA adapters are left out (counted apart), and a 4-bit layer counts its full in x out shape."""
    linear = sum(module.in_features * module.out_features for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}")
    experts = sum(p.numel() for p in expert_parameters(model).values() if p.dim() == 3)
    return linear + sum(p.numel() for p in router_weights(model).values()) + round(active_share(model) * experts)


def attention_width(config: "PretrainedConfig") -> int:
    """Query heads x head_dim: the width of the (query . key) and (probabilities . value) products."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim
