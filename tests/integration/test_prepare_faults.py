"""prepare_dataset.py under faults: nonsense flags and paths are one error line before any work; Ctrl-C or a
full disk while writing keeps the previous output."""
import errno
from pathlib import Path

import pytest
from conftest import error_of

import prepare_dataset as pd
from finetune.data import output


# ---- prepare_dataset.py: flags and paths ------------------------------------------------------------------------

def test_prepare_rejects_nonsense_numbers_before_any_work(tmp_path):
    save_path = tmp_path / "out"
    for flag, value in [("--seed", "-1"), ("--validation-fraction", "nan"), ("--validation-fraction", "inf"),
                        ("--validation-fraction", "1"), ("--validation-fraction", "-0.1"), ("--block-size", "0"),
                        ("--block-size", "-8"), ("--max-examples", "-3"), ("--max-examples", "0")]:
        message = error_of(pd.main, ["llama2", "--demo", "--save-path", str(save_path), flag, value])
        assert message.startswith(f"error: {flag} must be"), message
    assert not save_path.exists()


def test_prepare_save_path_under_a_file_or_naming_no_folder_is_one_error_line(tiny_source, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert "cannot create its parent folder" in error_of(pd.main, tiny_source + ["--save-path", str(a_file / "out")])
    assert "names no folder" in error_of(pd.main, tiny_source + ["--save-path", "/"])
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["articles.jsonl",
                                                                                              "notes.txt"]


def test_prepare_names_an_empty_data_folder_and_a_tokenizer_file(tiny_run, tiny_source, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = tiny_source[:-1] + [str(tmp_path / "empty"), "--save-path", str(tmp_path / "out")]
    assert "holds no files" in error_of(pd.main, argv)
    argv = ["llama2", "--model-name-or-path", str(Path(tiny_run["llama"]) / "tokenizer.json")] + tiny_source[3:]
    assert "is a file" in error_of(pd.main, argv + ["--save-path", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_folders_it_created(tiny_source, tmp_path):
    save_path = tmp_path / "new" / "deeper" / "out"
    error_of(pd.main, tiny_source[:-1] + [str(tmp_path / "missing.jsonl"), "--save-path", str(save_path)])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_ctrl_c_or_a_full_disk_while_writing_keeps_the_previous_output(tiny_source, tmp_path, monkeypatch, fault):
    save_path = tmp_path / "out"
    pd.main(tiny_source + ["--save-path", str(save_path)])
    before = snapshot(tmp_path)
    real_save = output.save_dataset_and_report

    def failing(dataset, report, folder):
        real_save(dataset, report, folder)
        raise fault

    monkeypatch.setattr(output, "save_dataset_and_report", failing)
    try:
        message = error_of(pd.main, tiny_source + ["--save-path", str(save_path), "--max-examples", "2"])
    except (KeyboardInterrupt, OSError) as escaped:
        pytest.fail(f"{escaped!r} ended prepare_dataset.py with a traceback")
    assert ("interrupted" if fault is KeyboardInterrupt else "No space left") in message
    assert snapshot(tmp_path) == before


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
