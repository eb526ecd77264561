"""finetune/checkpoint/export.py: the final folder reloads with identical weights; failures are one line."""
import json
import os
import stat

import pytest
import torch
from conftest import _word_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from finetune.checkpoint import export
from finetune.checkpoint.run_folder import FINAL_STAGING
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.model import lora

CPU = Backend(engine="single", device=torch.device("cpu"))
IDS = torch.tensor([[1, 5, 9, 33, 70, 2]])


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def reload(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def assert_usual_modes(folder):
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_the_saved_folder_reloads_with_identical_weights(tmp_path):
    model = tiny_llama()
    plan = {"saved_dtype": "float32", "micro_batch_size": 2}
    export.save_final_model(model, _word_tokenizer(128), CPU, str(tmp_path), plan)
    assert json.loads((tmp_path / "parallel_plan.json").read_text()) == plan
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / FINAL_STAGING).exists()
    loaded = reload(tmp_path)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert_usual_modes(tmp_path)


def test_a_bf16_run_saves_bf16_weights(tmp_path):
    model = tiny_llama()
    export.save_final_model(model, _word_tokenizer(128), CPU, str(tmp_path), {"saved_dtype": "bfloat16"})
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    for name, value in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16)), name
    assert next(p for p in model.parameters()).dtype == torch.float32  # the master weights are left as they were


def test_save_dtype_none_writes_the_tokenizer_and_plan_but_no_weights(tmp_path):
    export.save_final_model(tiny_llama(), _word_tokenizer(128), CPU, str(tmp_path), {"saved_dtype": "none"})
    names = set(os.listdir(tmp_path))
    assert "parallel_plan.json" in names and "tokenizer.json" in names
    assert not [name for name in names if name.endswith(".safetensors") or name == "config.json"]


def test_a_second_save_replaces_the_first_and_a_leftover_staging_folder(tmp_path):
    (tmp_path / FINAL_STAGING).mkdir()
    (tmp_path / FINAL_STAGING / "model.safetensors").write_bytes(b"half of an earlier save")
    export.save_final_model(tiny_llama(), _word_tokenizer(128), CPU, str(tmp_path), {"saved_dtype": "float32"})
    changed = tiny_llama()
    with torch.no_grad():
        changed.lm_head.weight.add_(1.0)
    export.save_final_model(changed, _word_tokenizer(128), CPU, str(tmp_path), {"saved_dtype": "float32"})
    assert not (tmp_path / FINAL_STAGING).exists()
    assert torch.equal(reload(tmp_path).lm_head.weight, changed.lm_head.weight)


def test_lora_saves_the_adapter_and_the_merged_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # as the training scripts load it
    model = lora.add_adapters(base, lora.LoraSettings(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"),
                                                      quantize_4bit=False, base=str(tmp_path / "base")))
    with torch.no_grad():  # B starts at zero; a trained adapter changes the model
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
        want = model(input_ids=IDS).logits
    out = tmp_path / "out"
    out.mkdir()
    export.save_final_model(model, _word_tokenizer(128), CPU, str(out), {"saved_dtype": "float32"})
    adapter = json.loads((out / lora.ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "base") and adapter["r"] == 4
    assert (out / lora.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    merged = reload(out)
    assert not any("lora" in name for name in merged.state_dict())  # an ordinary model folder, no peft needed
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, want, atol=1e-5)
    assert_usual_modes(out)


def test_a_save_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(FinetuneError) as raised:
        export.save_final_model(tiny_llama(), _word_tokenizer(128), CPU, str(tmp_path / "a_file"),
                                {"saved_dtype": "float32"})
    message = str(raised.value)
    assert message.startswith("could not save the final model to ") and message.endswith("(not a directory)")
    assert "\n" not in message and (tmp_path / "a_file").read_text() == "not a folder"
