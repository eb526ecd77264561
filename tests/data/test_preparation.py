"""Tests of prepare_dataset.py: prompt formats, label masks, truncation, splits, CLI and its error lines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

import finetune.data.preparation as prep
import prepare_dataset as pd
from finetune.data import recipes
from finetune.data.output import REPORT_FILE
from finetune.data.preparation import IGNORE_INDEX
from finetune.errors import FinetuneError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def llama_tokenizer(demo_cache):
    from finetune import demo as demo_assets

    return demo_assets.load_demo_tokenizer("llama2")


@pytest.fixture(scope="session")
def baichuan_tokenizer(demo_cache):
    from finetune import demo as demo_assets

    return demo_assets.load_demo_tokenizer("baichuan2")


def tokenize_one(recipe, tokenizer, example, block_size=1024, train_on_prompt=False):
    batch = {name: [value] for name, value in example.items()}
    out = prep.tokenize_examples(batch, pd.RECIPES[recipe]["build_prompt"], tokenizer, block_size, train_on_prompt)
    return {name: values[0] for name, values in out.items()}


NEWS = {"article": "The council met on Monday. It agreed to build a new library.",
        "highlights": "Council agrees to build a library.\nWork starts next year."}
SUPPORT = {"instruction": "Where is my order #123456?", "category": "ORDER", "intent": "track_order",
           "response": "1. Open \"My Orders\".\n2. Select the order to see its status."}


def test_prompt_formats_are_the_tutorials():
    assert prep.full_text(recipes.build_llama2_prompt(NEWS)) == f"[SUMMARIZE] {NEWS['article']} [/SUMMARIZE]\n{NEWS['highlights']}"
    assert prep.full_text(recipes.build_baichuan2_prompt(SUPPORT)) == (
        f"[INST] {SUPPORT['instruction']} \n Category is ORDER \n Intent is track_order [/INST]\n{SUPPORT['response']}")


def test_llama2_ids_and_label_mask(llama_tokenizer):
    row = tokenize_one("llama2", llama_tokenizer, NEWS)
    ids, labels = row["input_ids"], row["labels"]
    assert ids[0] == llama_tokenizer.bos_token_id == 1
    assert ids[-1] == llama_tokenizer.eos_token_id == 2 and labels[-1] == 2
    # Exactly the intended text, with the real EOS id rather than the string "</s>".
    assert llama_tokenizer.decode(ids[1:-1]) == prep.full_text(recipes.build_llama2_prompt(NEWS))
    prompt_ids = llama_tokenizer(f"[SUMMARIZE] {NEWS['article']} [/SUMMARIZE]\n")["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert all(label != IGNORE_INDEX for label in labels[len(prompt_ids):])
    assert llama_tokenizer.decode(labels[len(prompt_ids):-1]) == NEWS["highlights"]
    assert not row["stat_prompt_cut"] and not row["stat_response_cut"] and not row["stat_misaligned"]


def test_baichuan2_ids_and_label_mask(baichuan_tokenizer):
    row = tokenize_one("baichuan2", baichuan_tokenizer, SUPPORT)
    ids, labels = row["input_ids"], row["labels"]
    prompt_ids = baichuan_tokenizer(prep.full_text(recipes.build_baichuan2_prompt({**SUPPORT, "response": ""})))["input_ids"]
    assert ids[0] != baichuan_tokenizer.bos_token_id  # Baichuan adds no BOS
    assert ids[:len(prompt_ids)] == prompt_ids and ids[-1] == baichuan_tokenizer.eos_token_id
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    assert baichuan_tokenizer.decode(ids[:-1]) == prep.full_text(recipes.build_baichuan2_prompt(SUPPORT))


def test_parts_tokenized_separately_match_whole_text_on_sample_data(llama_tokenizer, baichuan_tokenizer):
    """Guards the dummy-prefix pitfall: every bundled example decodes back exactly and its labels are the response."""
    from finetune import demo as demo_assets

    for recipe, tokenizer in [("llama2", llama_tokenizer), ("baichuan2", baichuan_tokenizer)]:
        rows = [json.loads(line) for line in open(demo_assets.DEMO_SAMPLE_FILES[recipe], encoding="utf-8")][:60]
        batch = {name: [row[name] for row in rows] for name in rows[0]}
        out = prep.tokenize_examples(batch, pd.RECIPES[recipe]["build_prompt"], tokenizer, block_size=100_000)
        assert sum(out["stat_misaligned"]) == 0
        for row, ids, labels in zip(rows, out["input_ids"], out["labels"]):
            parts = pd.RECIPES[recipe]["build_prompt"](row)
            assert tokenizer.decode(ids[:-1], skip_special_tokens=True) == prep.full_text(parts)
            target = [label for label in labels if label != IGNORE_INDEX]
            assert tokenizer.decode(target[:-1]) == parts["response"] and target[-1] == tokenizer.eos_token_id


def test_real_baichuan2_tokenizer_boundaries_align():
    reference = REPO_ROOT.parent / "shared" / "reference" / "baichuan2" / "tokenizer.model"
    if not reference.exists():
        pytest.skip("real Baichuan2 tokenizer.model not available")
    from modeling_baichuan import BaichuanTokenizer

    tokenizer = BaichuanTokenizer(vocab_file=str(reference))
    row = tokenize_one("baichuan2", tokenizer, SUPPORT)
    assert not row["stat_misaligned"]
    assert tokenizer.decode(row["input_ids"][:-1]) == prep.full_text(recipes.build_baichuan2_prompt(SUPPORT))
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX][:-1]) == SUPPORT["response"]


def test_long_prompt_is_cut_and_response_kept(llama_tokenizer):
    long_news = {"article": " ".join(["The council said the plan would cost more than expected."] * 60),
                 "highlights": NEWS["highlights"]}
    row = tokenize_one("llama2", llama_tokenizer, long_news, block_size=128)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == 128 and row["stat_prompt_cut"] and not row["stat_response_cut"]
    text = llama_tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("[SUMMARIZE] The council said") and f" [/SUMMARIZE]\n{NEWS['highlights']}" in text
    target = [label for label in labels if label != IGNORE_INDEX]
    assert llama_tokenizer.decode(target[:-1]) == NEWS["highlights"] and target[-1] == 2


def test_response_cut_only_when_it_alone_does_not_fit(llama_tokenizer):
    long_summary = {"article": NEWS["article"], "highlights": " ".join(["Council agrees to build a library."] * 40)}
    row = tokenize_one("llama2", llama_tokenizer, long_summary, block_size=48)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == 48 and row["stat_response_cut"] and row["stat_prompt_cut"]
    text = llama_tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("[SUMMARIZE] [/SUMMARIZE]\nCouncil agrees")  # minimal wrapper, article dropped
    assert ids[-1] != llama_tokenizer.eos_token_id  # an unfinished answer gets no EOS
    assert labels[-1] == ids[-1]


def test_block_size_smaller_than_wrapper_is_an_error(llama_tokenizer):
    with pytest.raises(FinetuneError, match="too small"):
        tokenize_one("llama2", llama_tokenizer, NEWS, block_size=3)


def test_train_on_prompt_labels_everything(llama_tokenizer):
    row = tokenize_one("llama2", llama_tokenizer, NEWS, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def make_raw(rows_count, with_validation=False):
    rows = {"article": [f"Story number {i} about the town." for i in range(rows_count)],
            "highlights": [f"Summary {i}." for i in range(rows_count)]}
    splits = {"train": Dataset.from_dict(rows)}
    if with_validation:
        splits["validation"] = Dataset.from_dict({name: values[:7] for name, values in rows.items()})
    return DatasetDict(splits)


def test_split_sizes_seeded_and_kept_validation(llama_tokenizer):
    dataset, report = prep.prepare("llama2", pd.RECIPES["llama2"], llama_tokenizer, make_raw(100), block_size=64)
    assert (len(dataset["train"]), len(dataset["validation"])) == (95, 5)
    assert dataset.column_names == {"train": ["input_ids", "labels"], "validation": ["input_ids", "labels"]}
    again, _ = prep.prepare("llama2", pd.RECIPES["llama2"], llama_tokenizer, make_raw(100), block_size=64)
    other_seed, _ = prep.prepare("llama2", pd.RECIPES["llama2"], llama_tokenizer, make_raw(100), block_size=64, seed=1)
    assert again["validation"]["input_ids"] == dataset["validation"]["input_ids"]
    assert other_seed["validation"]["input_ids"] != dataset["validation"]["input_ids"]
    kept, _ = prep.prepare("llama2", pd.RECIPES["llama2"], llama_tokenizer, make_raw(100, with_validation=True), block_size=64)
    assert (len(kept["train"]), len(kept["validation"])) == (100, 7)
    assert report["splits"]["train"]["examples"] == 95 and report["splits"]["train"]["target_tokens"] > 0


def test_cli_demo_end_to_end(tmp_path, capsys):
    save_path = tmp_path / "out"
    pd.main(["llama2", "--demo", "--block-size", "64", "--save-path", str(save_path), "--max-examples", "40"])
    printed = capsys.readouterr().out
    assert "prompt truncated" in printed and "p50/p90/p99/max" in printed
    dataset = load_from_disk(str(save_path))
    assert set(dataset) == {"train", "validation"}
    for split in dataset.values():
        assert split.column_names == ["input_ids", "labels"]
        for ids, labels in zip(split["input_ids"], split["labels"]):
            assert len(ids) == len(labels) <= 64
    report = json.loads((save_path / REPORT_FILE).read_text())
    assert report["splits"]["train"]["prompt_truncated"] > 0  # most demo examples are longer than 64 tokens
    # Running again replaces our own previous output.
    pd.main(["baichuan2", "--demo", "--save-path", str(save_path), "--max-examples", "20"])
    assert load_from_disk(str(save_path))["train"].num_rows == 19
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_foreign_save_path_is_refused_and_untouched(tmp_path):
    foreign = tmp_path / "my_stuff"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as raised:
        pd.main(["llama2", "--demo", "--save-path", str(foreign)])
    assert str(raised.value).startswith("error: ") and "not a previous prepare_dataset.py output" in str(raised.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"


def write(path, text):
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing file": lambda d: ["--dataset-name-or-path", str(d / "nope.jsonl")],
    "missing column": lambda d: ["--dataset-name-or-path", write(d / "a.jsonl", '{"article": "x"}\n')],
    "empty file": lambda d: ["--dataset-name-or-path", write(d / "b.jsonl", "")],
    "malformed json": lambda d: ["--dataset-name-or-path", write(d / "c.jsonl", '{"article": "x", "highl\n')],
    "number column": lambda d: ["--dataset-name-or-path", write(d / "d.jsonl", '{"article": 5, "highlights": "s"}\n')],
    "block size zero": lambda d: ["--block-size", "0"],
    "block size negative": lambda d: ["--block-size", "-8"],
    "block size below wrapper": lambda d: ["--block-size", "4"],
    "hub id while offline": lambda d: ["--dataset-name-or-path", "someone/not-cached-dataset"],
    "hub tokenizer while offline": lambda d: ["--model-name-or-path", "someone/not-cached-model"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_error_line(case, tmp_path):
    save_path = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        pd.main(["llama2", "--demo", "--save-path", str(save_path)] + BAD_INPUTS[case](tmp_path))
    message = str(raised.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not save_path.exists()
    if case == "missing column":
        assert "highlights" in message


@pytest.mark.slow
def test_error_line_and_exit_code_in_a_real_process(tmp_path):
    """The same errors from a separate process: exit status 1, one `error:` line, no traceback, quickly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad_json = write(tmp_path / "bad.jsonl", "{not json\n")
    for argv in (["llama2", "--demo", "--dataset-name-or-path", bad_json],
                 ["llama2", "--dataset-name-or-path", bad_json, "--model-name-or-path", "meta-llama/Llama-2-13b-hf"]):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), *argv, "--save-path",
                               str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    unknown = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), "gpt9"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert unknown.returncode != 0 and "invalid choice" in unknown.stderr and "Traceback" not in unknown.stderr
