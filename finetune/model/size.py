"""Sizes read off the model itself, not a formula over `hidden_size`: parameter counts for the plan, the weights
that take part in matmuls for FLOPs and MFU. Without weights (`--plan-only`) the model is built on the meta
device from its config, so grouped-query attention, a head_dim that is not hidden_size / heads (Qwen3), fused
projections (Phi-3, Baichuan) and tied embeddings all count as they are."""
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


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights used in a matmul for every token: every linear layer of the model, the output head included
    (once per use even when tied to the embedding); LoRA adapters are left out (counted apart), and a 4-bit
    layer counts its full in x out shape."""
    return sum(module.in_features * module.out_features for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}")


def attention_width(config: "PretrainedConfig") -> int:
    """Query heads x head_dim: the width of the (query . key) and (probabilities . value) products."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim
