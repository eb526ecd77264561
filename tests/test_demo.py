"""Tests of finetune/demo.py: demo tokenizers, tiny models, cached prepared data, concurrent builds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.data import recipes
from finetune import demo as demo_assets

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_llama_demo_tokenizer_behaves_like_llama2():
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.ensure_demo_tokenizer("llama2"))
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert 3000 <= len(tokenizer) <= 4000
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None  # like Llama 2
    text = "Storm Agnes hit Port Ardley on Monday.\n\n  Winds reached 120 km/h; 3 people were rescued. ☂"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2  # BOS added, EOS not
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # whitespace, digits, bytes survive
    # Stable ids: the tokenizer is trained deterministically from the bundled data.
    assert tokenizer("Hello world")["input_ids"] == [1, 1775, 2127, 367]


def test_baichuan_demo_tokenizer_behaves_like_baichuan2():
    import modeling_baichuan  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.ensure_demo_tokenizer("baichuan2"))
    assert type(tokenizer).__name__ == "BaichuanTokenizer"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>", "\n"]) == [195, 196, 5]
    text = "Hello, where is order #123456?\nThanks"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "Hello"  # no dummy prefix, no BOS
    assert 5 in ids and tokenizer.decode(ids) == text


@pytest.mark.parametrize("recipe", ["llama2", "baichuan2"])
def test_demo_model_reloads_with_identical_weights(recipe):
    if recipe == "baichuan2":
        import modeling_baichuan  # noqa: F401
    folder = demo_assets.ensure_demo_model(recipe)
    assert any(name.endswith(".safetensors") for name in os.listdir(folder))
    first = AutoModelForCausalLM.from_pretrained(folder)
    second = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert first.config.hidden_size == 256 and first.config.num_hidden_layers == 4
    assert first.config.vocab_size == len(tokenizer)
    assert next(first.parameters()).dtype == torch.float32
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tokenizer("The council met")["input_ids"]])
    loss = first(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(len(tokenizer) * 1.0)).item()) < 1.5
    assert demo_assets.ensure_demo_model(recipe) == folder  # cached


def test_demo_dataset_is_cached_per_block_size():
    from datasets import load_from_disk

    folder = recipes.demo_dataset("baichuan2", block_size=512)
    assert recipes.demo_dataset("baichuan2", block_size=512) == folder
    dataset = load_from_disk(folder)
    assert set(dataset) == {"train", "validation"} and dataset["train"].column_names == ["input_ids", "labels"]
    assert max(len(ids) for ids in dataset["train"]["input_ids"]) <= 512
    assert "-b512-" in Path(folder).name


def test_cache_key_changes_with_version(monkeypatch):
    before = demo_assets._fingerprint("x")
    monkeypatch.setattr(demo_assets, "DEMO_ASSETS_VERSION", "changed")
    assert demo_assets._fingerprint("x") != before


@pytest.mark.slow
def test_two_processes_building_at_once_agree(tmp_path):
    """Both callers succeed and see one complete folder; the build happens once (lock + rename)."""
    env = {**os.environ, "FINETUNE_DEMO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code = "from finetune import demo; print(demo.ensure_demo_model('llama2'))"
    workers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], results
    folders = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / ".complete").exists() and (folder / "config.json").exists()
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
