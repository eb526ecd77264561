"""finetune/data/raw_data.py: non-UTF-8 data files and huge lines are refused with one line before reading, and
cutting a long text before tokenizing changes no kept token."""
import json

import pytest
from conftest import PYTHON, run_script

# ---- prepare_dataset.py: encodings and huge lines ---------------------------------------------------------------

def prepare_error(argv):
    import prepare_dataset

    with pytest.raises(SystemExit) as raised:
        prepare_dataset.main(argv)
    message = raised.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def articles(*texts):
    return "".join(json.dumps({"article": text, "highlights": "w21 w22"}, ensure_ascii=False) + "\n"
                   for text in texts)


def test_a_latin1_data_file_is_one_line_naming_it_and_the_place(tiny_run, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(articles("w5 w6", "w7", "w8 café w9").encode("latin-1"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data),
                          "--save-path", str(tmp_path / "out")])
    assert f"data file {data} is not UTF-8 text (line 3, byte " in line and "save it as UTF-8" in line, line
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part-1.jsonl").write_text(articles("w5"))
    (folder / "part-2.jsonl").write_bytes(articles("naïve w6").encode("latin-1"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(folder),
                          "--save-path", str(tmp_path / "out")])
    assert f"data file {folder / 'part-2.jsonl'} is not UTF-8 text (line 1" in line, line
    assert not (tmp_path / "out").exists()


def test_a_line_past_the_limit_is_refused_before_reading(tiny_run, tmp_path, monkeypatch):
    from finetune.data import raw_data

    monkeypatch.setattr(raw_data, "MAX_LINE_BYTES", 2 ** 20)
    monkeypatch.setattr(raw_data, "SCAN_CHUNK_BYTES", 2 ** 16)  # the long line spans many chunks
    data = tmp_path / "long.jsonl"
    data.write_text(articles("w5", " ".join(["w6"] * 2 ** 19), "w7"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data),
                          "--save-path", str(tmp_path / "out")])
    assert line.startswith(f"error: line 2 of data file {data} is over 1 MB"), line


def test_cutting_a_long_text_before_tokenizing_changes_no_kept_token(tiny_run):
    from transformers import AutoTokenizer

    from finetune.data import preparation, recipes

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["llama"])
    long_text = " ".join(f"w{5 + i % 100}" for i in range(20_000))
    batch = {"article": [long_text, "w5 w6"], "highlights": ["w21 w22", " ".join(["w23"] * 5000)]}
    build = recipes.RECIPES["llama2"]["build_prompt"]
    assert preparation.text_budget(tokenizer, 128) < len(long_text)
    cut = preparation.tokenize_examples(batch, build, tokenizer, 128)
    whole = preparation.tokenize_examples(batch, build, tokenizer, 128, char_budget=10 ** 9)
    assert cut == whole and cut["stat_response_cut"] == [False, True]


# Runs a command and prints its peak resident memory in KiB (ru_maxrss of its only child) as the last line.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


@pytest.mark.slow
def test_a_64_mb_line_is_prepared_within_bounded_memory(tiny_run, tmp_path):
    """The article used to be tokenized whole (16M tokens) before being cut to the block: 10.6 GB at the peak.
    Now about 0.9 GB, most of it the JSON reader's (a cold datasets cache: the conversion is measured too)."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as f:
        f.write(articles(" ".join(f"w{5 + i % 90}" for i in range(2 ** 24)), "w5 w6", "w7", "w8"))
    assert data.stat().st_size > 63 * 2 ** 20
    result = run_script(PYTHON, "-c", PEAK_RSS, PYTHON, "prepare_dataset.py", "llama2", "--model-name-or-path",
                        tiny_run["llama"], "--dataset-name-or-path", str(data), "--save-path", str(tmp_path / "out"),
                        "--validation-fraction", "0", env={"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
                                                           "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gib = int(result.stdout.strip().splitlines()[-1]) / 2 ** 20
    assert peak_gib < 2, f"peak resident memory {peak_gib:.2f} GiB"
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["splits"]["train"]
    assert report["examples"] == 4 and report["prompt_truncated"] == 1 and report["length_max"] == 1024
