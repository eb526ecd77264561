"""finetune/model/gguf.py: a GGUF file made into a model folder once; the scripts given a .gguf path say how."""
import json
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script

from finetune.errors import FinetuneError
from finetune.model.gguf import convert, refuse_gguf


def test_a_gguf_path_is_refused_with_the_conversion_command():
    with pytest.raises(FinetuneError, match=r"is a GGUF file; convert it once .*python -m finetune.model.gguf "
                                            r"models/m.Q4.gguf \./m.Q4$"):
        refuse_gguf("models/m.Q4.gguf")
    refuse_gguf("models/m")  # a folder passes


@pytest.mark.slow
def test_the_scripts_given_a_gguf_file_say_the_conversion_in_one_line(tmp_path):
    line = assert_one_line_error(run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path",
                                            "x.gguf", "--save-model-dir", str(tmp_path / "out"), "--plan-only"))
    assert "python -m finetune.model.gguf x.gguf ./x" in line
    line = assert_one_line_error(run_script(PYTHON, str(REPO_ROOT / "prepare_dataset.py"), "chat", "--demo",
                                            "--model-name-or-path", "x.gguf", "--save-path", str(tmp_path / "d")))
    assert "python -m finetune.model.gguf x.gguf ./x" in line and not (tmp_path / "d").exists()
    line = assert_one_line_error(run_script(PYTHON, str(REPO_ROOT / "inference.py"), "--model-dir", "x.gguf",
                                            "--example", '{"article": "w"}'))
    assert "--model-dir x.gguf is a GGUF file" in line


def test_converting_refuses_a_missing_file_and_an_existing_folder(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        convert(str(tmp_path / "none.gguf"), str(tmp_path / "out"))
    (tmp_path / "real.gguf").write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    with pytest.raises(FinetuneError, match="exists; give a new folder"):
        convert(str(tmp_path / "real.gguf"), str(tmp_path / "out"))


@pytest.mark.slow
def test_smollm2_converts_to_a_folder_plain_transformers_loads(smollm2):
    """The folder holds ordinary safetensors, no quantisation entry, and a tokenizer with its chat template; the
    model it loads is SmolLM2-135M (30 layers of 576, 9 query and 3 key/value heads, tied embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])  # real weights, not random ones
