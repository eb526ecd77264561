"""finetune/checkpoint/run_folder.py: staged files never go through a link, a resumed run's metrics.jsonl keeps
only the rows it can read, and the trackers' folders are refused as links like the run's own."""
import json

import pytest


def outside_file(tmp_path):
    outside = tmp_path / "someone_elses.txt"
    outside.write_text("someone else's work")
    return outside


def test_open_new_removes_a_link_or_a_leftover_and_never_writes_through(tmp_path):
    from finetune.checkpoint.run_folder import open_new

    outside = outside_file(tmp_path)
    staged = tmp_path / "state.json.partial"
    staged.symlink_to(outside)
    with open_new(str(staged)) as f:
        f.write(b"new")
    assert outside.read_text() == "someone else's work"
    assert not staged.is_symlink() and staged.read_bytes() == b"new"
    with open_new(str(staged)) as f:  # what an interrupted write left is replaced
        f.write(b"newer")
    assert staged.read_bytes() == b"newer"


def test_a_link_at_the_metrics_staging_name_is_not_followed(tmp_path):
    from finetune.checkpoint.run_folder import truncate_metrics

    outside = outside_file(tmp_path)
    rows = [json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    (tmp_path / "metrics.jsonl.tmp").symlink_to(outside)
    truncate_metrics(str(tmp_path), 2)
    assert outside.read_text() == "someone else's work"
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    assert not (tmp_path / "metrics.jsonl.tmp").exists() and not (tmp_path / "metrics.jsonl.tmp").is_symlink()


def test_resuming_drops_the_rows_that_are_not_a_runs_rows(tmp_path):
    """Rows that are not UTF-8, not an object, or whose step is not a whole number were not written by a run:
    dropped like a row cut short, never a traceback."""
    from finetune.checkpoint.run_folder import truncate_metrics

    good = [json.dumps({"step": step, "loss": 1.0}).encode() + b"\n" for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_bytes(good[0] + b'{"step": 1, "note": "\xff\xfe"}\n5\n[1]\n'
                                             + b'{"step": "1"}\n{"step": true}\n' + b"[" * 100_000 + b"\n"
                                             + good[1])
    truncate_metrics(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(good)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlruns"])
def test_a_linked_tracker_folder_is_refused_naming_it(tmp_path, name):
    from finetune.checkpoint.run_folder import RUN_MARKER, check_save_dir
    from finetune.errors import FinetuneError

    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / name).symlink_to(elsewhere)
    with pytest.raises(FinetuneError, match=f"^{run / name} is a symbolic link"):
        check_save_dir(str(run), resume=False, overwrite=True)
