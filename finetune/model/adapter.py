"""Checks of a saved LoRA adapter folder before peft applies it to a base model (`inference.py --adapter`).

peft trusts the folder: a config that is not an object or names an unknown type is a traceback, a NaN alpha
shows up only as NaN probabilities inside generate, and an adapter made for another base model is applied with
every target the base lacks silently dropped. Here each is one error line naming the file or the mismatch.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.model.hub import looks_like_path
from finetune.model.weight_files import weight_file_problem

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names, in the order it prefers them
# Config fields that fix a decoder's shape: two local base folders that agree on these hold the same model shape.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")


def read_adapter(adapter_dir: str, model_dir: str) -> tuple[dict, dict[str, tuple[int, int]]]:
    """(config, adapter_shapes) of a sound LoRA adapter folder naming no other base than `model_dir`; checked
    before the base model loads. check_targets_fit then compares the shapes with the loaded base."""
    config = read_adapter_config(adapter_dir)
    check_same_base(config.get("base_model_name_or_path"), model_dir, adapter_dir)
    return config, adapter_shapes(adapter_dir)


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json as a dict, with the LoRA fields peft computes with checked."""
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise FinetuneError(f"--adapter {adapter_dir} is not a folder")
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinetuneError(f"--adapter {adapter_dir} holds no {CONFIG_FILE}; is it a peft adapter folder?") from None
    except OSError as exc:
        raise FinetuneError(f"cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise FinetuneError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise FinetuneError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    problem = lora_config_problem(config)
    if problem:
        raise FinetuneError(f"{path}: {problem}")
    return config


def lora_config_problem(config: dict) -> str | None:
    """What in a LoRA adapter config peft would fail on, or compute nonsense with; None if nothing."""
    if config.get("peft_type") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (\"LORA\") can be applied"
    if not _positive_int(config.get("r")):
        return f"r must be a positive integer, got {config.get('r')!r}"
    if not _positive_number(config.get("lora_alpha")):
        return f"lora_alpha must be a positive finite number, got {config.get('lora_alpha')!r}"
    dropout = config.get("lora_dropout", 0.0)
    if not (_number(dropout) and 0 <= dropout < 1):
        return f"lora_dropout must be at least 0 and below 1, got {dropout!r}"
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return f"target_modules must be a list of layer names, got {targets!r}"
    for field, valid, what in (("rank_pattern", _positive_int, "positive integers"),
                               ("alpha_pattern", _positive_number, "positive finite numbers")):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(map(valid, pattern.values())):
            return f"{field} must map layer names to {what}, got {pattern!r}"
    return None


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value):
    return _number(value) and math.isfinite(value) and value > 0


def check_same_base(recorded: str | None, model_dir: str, adapter_dir: str) -> None:
    """The base the adapter names (base_model_name_or_path) must be --model-dir where the two can be compared:
    two hub ids by name, two local folders by the model shape in their config.json. A hub id against a local
    folder (a download of it, perhaps) is left to the shapes of the targets."""
    if not isinstance(recorded, str) or not recorded:
        return
    if _is_hub_id(recorded) and _is_hub_id(model_dir):
        same = recorded == model_dir
    elif os.path.isdir(recorded) and os.path.isdir(model_dir):  # a copy of the base elsewhere is the same base
        same = os.path.samefile(recorded, model_dir) or _shape(recorded) in (None, _shape(model_dir))
    else:
        return
    if not same:
        raise FinetuneError(f"the adapter {adapter_dir} was trained on {recorded} (its base_model_name_or_path), "
                            f"not on --model-dir {model_dir}; pass that base as --model-dir")


def _is_hub_id(name):
    return not os.path.exists(name) and not looks_like_path(name)


def _shape(model_dir):
    """The shape fields of a local model folder's config.json; None when it cannot be read."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {field: config.get(field) for field in SHAPE_FIELDS} if isinstance(config, dict) else None


def adapter_shapes(adapter_dir: str) -> dict[str, tuple[int, int]]:
    """{module path in the base model: (in_features, out_features)} of every LoRA-adapted linear layer, read
    from the weight file's header (lora_A is rank x in, lora_B out x rank)."""
    path = next((Path(adapter_dir) / name for name in WEIGHT_FILES if (Path(adapter_dir) / name).is_file()), None)
    if path is None:
        raise FinetuneError(f"--adapter {adapter_dir} holds no {' or '.join(WEIGHT_FILES)}")
    problem = weight_file_problem(path)
    if problem:
        raise FinetuneError(f"{path} is damaged or truncated ({problem})")
    shapes = {}
    for key, shape in _tensor_shapes(path).items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind in ("A.weight", "B.weight") and len(shape) == 2:
            known = shapes.setdefault(module, [None, None])
            known[0 if kind == "A.weight" else 1] = shape[1] if kind == "A.weight" else shape[0]
    return {module: tuple(sizes) for module, sizes in shapes.items()}


def _tensor_shapes(path):
    """{name: shape} of a weight file, without reading its tensors' data."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    import torch

    return {name: tuple(t.shape) for name, t in torch.load(path, map_location="meta", weights_only=True).items()}


def check_targets_fit(config: dict, shapes: dict[str, tuple[int, int]], model: torch.nn.Module, adapter_dir: str,
                      model_dir: str) -> None:
    """Every layer the adapter holds weights for must be a linear layer of that shape in the model, and every
    linear layer its target names pick out must have weights in it (a base of another depth fails here)."""
    import torch

    for module_path, (in_features, out_features) in shapes.items():
        try:
            layer = model.get_submodule(module_path)
        except AttributeError:
            raise FinetuneError(f"the adapter {adapter_dir} adapts {module_path}, which --model-dir {model_dir} does "
                                f"not have: it was trained on another base model") from None
        if not isinstance(layer, torch.nn.Linear):
            continue
        in_features, out_features = in_features or layer.in_features, out_features or layer.out_features
        if (layer.in_features, layer.out_features) != (in_features, out_features):
            raise FinetuneError(f"the adapter {adapter_dir} adapts {module_path} as {in_features} -> {out_features} "
                                f"features, but in --model-dir {model_dir} it is {layer.in_features} -> "
                                f"{layer.out_features}: the adapter was trained on another base model")
    targets = config["target_modules"]
    if isinstance(targets, str) or config.get("layers_to_transform") or config.get("exclude_modules"):
        return  # peft's pattern rules: not repeated here
    missing = [name for name, layer in model.named_modules() if isinstance(layer, torch.nn.Linear)
               and name.rpartition(".")[2] in targets and name not in shapes]
    if missing:
        raise FinetuneError(f"the adapter {adapter_dir} has no weights for {len(missing)} of the layers its "
                            f"target_modules name in --model-dir {model_dir} (the first: {missing[0]}): it was "
                            f"trained on another base model")
