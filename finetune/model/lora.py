"""LoRA and QLoRA: train low-rank adapters (peft) on a frozen base, optionally loaded in 4-bit NF4 (bitsandbytes).

`--lora` freezes the base (bf16 under bf16 compute, fp32 otherwise) and adds adapters to the chosen linear layers
of every decoder block; `--qlora` loads the base's decoder linear layers in 4-bit NF4 with bf16 compute (one
device only). Adapters always keep fp32 master weights and AdamW state. `parallel.load_model` adds them on every
rank before FSDP2 shards the model, so rank 0's initial adapters reach all ranks with the base weights.

The final save writes `adapter/` (a peft adapter naming its base) and, in the save folder itself, the adapter
merged into a copy of the base in the dtype the base trained in (bf16 for QLoRA: the merge goes into the
unquantised base): an ordinary model folder that loads with AutoModelForCausalLM and no peft.
"""
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from finetune.distributed.sharding import decoder_layers
from finetune.errors import FinetuneError
from finetune.model import size

ADAPTER_DIR = "adapter"
AUTO_TARGETS = "auto"  # --lora-target-modules default: the model's own decoder linear layers
# bitsandbytes (imported by peft) warns on every CPU start that an optional faster 4-bit kernel is missing;
# its own fallback works, so the warning is only noise in the log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _Placement(Protocol):
    """What these helpers read of parallel.Backend (which imports this module, so it is not imported here)."""
    engine: str
    device: torch.device
    mixed_precision: str


@dataclass(frozen=True)
class LoraSettings:
    """The adapter shape and how the base is held: the `lora` section of the run configuration."""
    rank: int
    alpha: float
    dropout: float
    targets: tuple
    quantize_4bit: bool
    base: str                 # hub id or folder of the base model, named in the saved adapter
    trust_remote_code: bool = False

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores of the adapters: a resumed run must train adapters of the same shape, scale
        and dropout. The targets are a set: the order they were named in changes nothing."""
        return {"kind": "qlora" if self.quantize_4bit else "lora", "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout, "targets": sorted(self.targets)}


# The adapter flags a resumed run must keep, by the record() field they set.
RESUME_FLAGS = {"kind": "--lora/--qlora", "rank": "--lora-rank", "alpha": "--lora-alpha",
                "dropout": "--lora-dropout", "targets": "--lora-target-modules"}


def describe(record: dict[str, Any] | None) -> str:
    """A record() as words, for error lines."""
    if record is None:
        return "no adapters (full fine-tuning)"
    kind = "qlora (4-bit NF4 base)" if record["kind"] == "qlora" else "lora"
    dropout = f" dropout {record['dropout']:g}"
    return f"{kind} rank {record['rank']} alpha {record['alpha']:g}{dropout} on {','.join(record['targets'])}"


def resume_mismatch(saved: dict[str, Any] | None, record: dict[str, Any] | None
                    ) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None] | None:
    """The first adapter flag in which this run (`record`, a record() or None) differs from the checkpoint's
    `saved` adapters, as (flag, the checkpoint's record, this run's); None when they agree."""
    if saved is None or record is None:
        return None if saved is record else (RESUME_FLAGS["kind"], saved, record)
    for key, flag in RESUME_FLAGS.items():
        if saved.get(key) != record[key]:
            return flag, saved, record
    return None


def base_dtype(settings: LoraSettings, mixed_precision: str) -> torch.dtype:
    """The frozen base needs no fp32 master copy: bf16 whenever compute is bf16, and always for QLoRA."""
    return torch.bfloat16 if settings.quantize_4bit or mixed_precision == "bf16" else torch.float32


def check_backend(settings: LoraSettings | None, backend: _Placement) -> None:
    """QLoRA's 4-bit base is not sharded: it runs on one device (one GPU, or a CPU bitsandbytes supports)."""
    if settings and settings.quantize_4bit and backend.engine != "single":
        raise FinetuneError(f"--qlora runs on one device (one GPU or the CPU), not under {backend.engine}; "
                            f"use --lora to shard a bf16 base over several GPUs")


def base_load_kwargs(settings: LoraSettings, backend: _Placement) -> dict[str, Any]:
    """from_pretrained arguments for the frozen base: its dtype, and for QLoRA the 4-bit quantisation."""
    kwargs = {"dtype": base_dtype(settings, backend.mixed_precision)}
    if settings.quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise FinetuneError(f"--qlora needs bitsandbytes ({exc}); pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": backend.device}  # quantised while loading, straight onto its device
    return kwargs


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Names (last part) of the linear layers inside the decoder blocks: what adapters can target."""
    return sorted({name.rsplit(".", 1)[-1] for layer in decoder_layers(model)
                   for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)})


def expert_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """A mixture of experts' weight tensors, (experts, in, out), one per projection, by target name: the module
    and the parameter, `experts.gate_up_proj` (one per decoder block; an example of each)."""
    found = {}
    for name, p in size.expert_parameters(model).items():  # biases, (experts, out), are not adapted
        if p.dim() == 3:
            found.setdefault(".".join(name.rsplit(".", 2)[-2:]), p)
    return found


def resolve_targets(model: torch.nn.Module, targets: tuple) -> tuple:
    """What adapters go on: `auto` is every linear layer inside the decoder blocks, found from the model (Llama's
    seven projections, Phi-3's fused qkv_proj and gate_up_proj, Baichuan's W_pack), and a mixture of experts'
    expert tensors (`experts.gate_up_proj`, `experts.down_proj`); the routers stay as trained."""
    available = decoder_linear_names(model) + sorted(expert_tensors(model))
    if tuple(targets) == (AUTO_TARGETS,):
        return tuple(available)
    missing = [name for name in targets if name not in available]
    if missing:
        raise FinetuneError(f"--lora-target-modules names {missing}, not linear layers or expert tensors of this "
                            f"model's decoder blocks (they are: {','.join(available)})")
    return tuple(targets)


def peft_targets(targets: tuple) -> dict[str, list[str] | None]:
    """LoraConfig's two target lists: linear layers by name, and expert tensors (a dotted `module.parameter`),
    which peft adapts as whole tensors (target_parameters)."""
    modules = [name for name in targets if "." not in name]
    tensors = [name for name in targets if "." in name]
    return {"target_modules": modules or None, **({"target_parameters": tensors} if tensors else {})}


def add_adapters(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Freeze `model` and wrap it in a peft model with LoRA adapters on `settings.targets` in every block.

    Adapters start as peft initialises them (A random, B zero), from the current torch RNG: every process that
    calls this after the same seed gets the same adapters, and under FSDP2 rank 0's are broadcast anyway.
    """
    from peft import LoraConfig, get_peft_model

    settings = dataclasses.replace(settings, targets=resolve_targets(model, settings.targets))
    tensors = [name for name in settings.targets if "." in name]
    if tensors and settings.dropout:
        raise FinetuneError(f"LoRA on the expert tensors ({','.join(tensors)}) takes no dropout: peft adds the "
                            f"adapter to the whole tensor, not to each token's input; use --lora-dropout 0, or "
                            f"--lora-target-modules without them")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        **peft_targets(settings.targets), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=settings.base)
    with warnings.catch_warnings():  # peft still calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)  # freezes every base parameter; adapters in fp32
    model.lora_settings = settings
    if settings.quantize_4bit:
        # On a CPU, bitsandbytes repacks a 4-bit layer for its fast inference kernel the first time the layer
        # runs in eval mode without grad (validation), and that kernel has no backward: later training steps
        # would silently pass no gradient through the base. Keep the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return getattr(model, "lora_settings", None) is not None


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Parameters the optimiser updates (all of them in full fine-tuning, the adapters with LoRA)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter_and_merged(model: torch.nn.Module, adapter_state: dict[str, torch.Tensor], save_dir: str) -> None:
    """Rank 0: `adapter/` from the gathered adapter weights, then the merge into a fresh copy of the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = model.lora_settings
    adapter_dir = os.path.join(save_dir, ADAPTER_DIR)
    model.save_pretrained(adapter_dir, state_dict=adapter_state, safe_serialization=True)
    # peft's own merge, into the base as it is on disk (not the 4-bit copy): what a user loading the adapter gets.
    dtype = torch.bfloat16 if settings.quantize_4bit else next(
        p.dtype for name, p in model.named_parameters() if not p.requires_grad)
    base = AutoModelForCausalLM.from_pretrained(settings.base, dtype=dtype,
                                                trust_remote_code=settings.trust_remote_code)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(save_dir, safe_serialization=True)


# ----------------------------------------------------------------------------------------------------------
# Sizes for the memory plan (from a meta-device copy of the model)
# ----------------------------------------------------------------------------------------------------------

def adapter_parameters(model: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: rank x (in + out) per targeted linear layer of every decoder block, and rank x experts
    x (in + out) per targeted expert tensor, read off the model (a meta-device copy will do); `targets` may be
    `auto`."""
    names = set(resolve_targets(model, targets))
    total = 0
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            last = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and last in names:
                total += rank * (module.in_features + module.out_features)
            for key, p in module.named_parameters(recurse=False):
                if f"{last}.{key}" in names and p.dim() == 3:
                    total += rank * p.shape[0] * (p.shape[1] + p.shape[2])
    return total
