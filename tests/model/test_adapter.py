"""finetune/model/adapter.py: inference.py --adapter refuses a broken adapter folder or one of another base model
with one line, and applies a sound one."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import inference_error
import torch


EXAMPLE = ["--example", '{"article": "w5 w6"}', "--max-new-tokens", "2"]


# ---- inference.py --adapter ---------------------------------------------------------------------------------

def save_adapter(model_dir, folder, targets=("q_proj", "v_proj")):
    """A LoRA adapter of the model in `model_dir`, with non-zero B so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM",
                                      base_model_name_or_path=str(model_dir)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


def other_llama(tiny_run, folder, **changes):
    """The tiny Llama with some config fields changed (another base model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_run["llama"])
    for name, value in changes.items():
        setattr(config, name, value)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    deeper = other_llama(tiny_run, root / "deeper_llama", num_hidden_layers=3)
    wider = other_llama(tiny_run, root / "wider_llama", hidden_size=64, intermediate_size=128)
    return {"good": save_adapter(tiny_run["llama"], root / "good"), "deeper_base": deeper,
            "of_deeper": save_adapter(deeper, root / "of_deeper"), "of_wider": save_adapter(wider, root / "of_wider"),
            "root": root}


def adapter_variant(adapters, folder, config=None, text=None, weights=None):
    """A copy of the good adapter with its config's fields changed (`config`), or replaced (`text`), or its
    weight file's bytes changed (`weights`)."""
    shutil.copytree(adapters["good"], folder)
    config_file = folder / "adapter_config.json"
    if config is not None:
        config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), **config)))
    if text is not None:
        config_file.write_text(text)
    if weights is not None:
        weight_file = folder / "adapter_model.safetensors"
        weight_file.write_bytes(weights(weight_file.read_bytes()))
    return folder


@pytest.mark.parametrize("change, expected", [
    (dict(text="[1, 2]"), "adapter_config.json must hold a JSON object, not a list"),
    (dict(text='{"peft_type": "LORA", "r": 4'), "adapter_config.json is not valid JSON"),
    (dict(config={"peft_type": "NO_SUCH_TYPE"}), "peft_type is 'NO_SUCH_TYPE'"),
    (dict(config={"r": "four"}), "r must be a positive integer, got 'four'"),
    (dict(config={"lora_alpha": float("nan")}), "lora_alpha must be a positive finite number, got nan"),
    (dict(config={"lora_dropout": 2}), "lora_dropout must be at least 0 and below 1"),
    (dict(weights=lambda data: data[:len(data) // 2]), "adapter_model.safetensors is damaged or truncated"),
], ids=["list", "not-json", "unknown-peft-type", "r-a-string", "alpha-nan", "dropout-2", "truncated-weights"])
def test_a_broken_adapter_folder_is_one_line_naming_its_file(tiny_run, adapters, tmp_path, capsys, change, expected):
    folder = adapter_variant(adapters, tmp_path / "adapter", **change)
    line = inference_error(["--model-dir", tiny_run["llama"], "--adapter", str(folder), *EXAMPLE], capsys)
    assert str(folder) in line and expected in line, line


def test_a_damaged_bin_adapter_file_is_named(tiny_run, adapters, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = adapter_variant(adapters, tmp_path / "adapter")
    weights = folder / "adapter_model.bin"
    torch.save(load_file(folder / "adapter_model.safetensors"), weights)
    (folder / "adapter_model.safetensors").unlink()
    weights.write_bytes(b"garbage" + weights.read_bytes()[:100])
    line = inference_error(["--model-dir", tiny_run["llama"], "--adapter", str(folder), *EXAMPLE], capsys)
    assert f"{weights} is damaged or truncated" in line, line


def without_base_name(adapters, name, folder):
    """An adapter whose config names no base, so that only the shapes can tell."""
    shutil.copytree(adapters[name], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
    return folder


@pytest.mark.parametrize("adapter, base, expected", [
    ("of_deeper", "llama", "was trained on"),  # by its base_model_name_or_path
    ("of_deeper-unnamed", "llama", "adapts model.layers.2.self_attn.q_proj, which --model-dir"),
    ("good-unnamed", "deeper_base", "has no weights for 2 of the layers"),
    ("of_wider-unnamed", "llama", "as 64 -> 32 features, but in --model-dir"),  # head_dim stays 8
])
def test_an_adapter_of_another_base_model_is_refused(tiny_run, adapters, tmp_path, capsys, adapter, base, expected):
    name, _, unnamed = adapter.partition("-")
    folder = without_base_name(adapters, name, tmp_path / "adapter") if unnamed else adapters[name]
    model_dir = tiny_run["llama"] if base == "llama" else str(adapters[base])
    if base != "llama":
        shutil.copy(Path(tiny_run["llama"]) / "tokenizer.json", model_dir)
        shutil.copy(Path(tiny_run["llama"]) / "tokenizer_config.json", model_dir)
    line = inference_error(["--model-dir", model_dir, "--adapter", str(folder), *EXAMPLE], capsys)
    assert expected in line, line


def test_hub_names_are_compared_and_local_copies_of_the_base_pass(tiny_run, tmp_path):
    from finetune.errors import FinetuneError
    from finetune.model.adapter import check_same_base

    with pytest.raises(FinetuneError, match="was trained on meta-llama/Llama-2-7b-hf"):
        check_same_base("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "adapter")
    check_same_base("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf", "adapter")
    check_same_base("meta-llama/Llama-2-13b-hf", tiny_run["llama"], "adapter")  # not comparable: shapes decide
    check_same_base(tiny_run["llama"], str(shutil.copytree(tiny_run["llama"], tmp_path / "copy")), "adapter")


def test_a_sound_adapter_still_applies(tiny_run, adapters, capsys):
    import inference

    outputs = []
    for extra in ([], ["--adapter", str(adapters["good"])]):
        assert inference.main(["--model-dir", tiny_run["llama"], *extra, "--max-new-tokens", "8",
                               "--example", '{"article": "w5 w6 w7"}']) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]
