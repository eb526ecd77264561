"""finetune/checkpoint/run_folder.py: staged files never go through a link, a resumed run's metrics.jsonl keeps
only the rows it can read, and the trackers' folders are refused as links like the run's own. Also the marker, the lock, a fresh start and write errors."""
import json
from finetune.checkpoint import run_folder
import errno
import fcntl
import os
import pytest
from conftest import snapshot
from finetune.errors import FinetuneError



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


@pytest.fixture(autouse=True)
def no_lock_left_behind():
    yield
    run_folder.release_run_locks()


def make_checkpoints(save_dir, *steps):
    for step in steps:
        (save_dir / "checkpoints" / f"step-{step:08d}").mkdir(parents=True, exist_ok=True)


def ours(tmp_path, name="run"):
    """A run folder a fresh run has started in."""
    save_dir = tmp_path / name
    run_folder.start_run_dir(str(save_dir), "train_llama2.py")
    return save_dir


def test_a_new_or_empty_folder_is_accepted(tmp_path):
    assert run_folder.check_save_dir(str(tmp_path / "new"), resume=False, overwrite=False) is None
    (tmp_path / "empty").mkdir()
    assert run_folder.check_save_dir(str(tmp_path / "empty"), resume=False, overwrite=False) is None


def test_a_foreign_folder_or_a_file_is_refused(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    for flags in (dict(resume=False, overwrite=False), dict(resume=False, overwrite=True),
                  dict(resume=True, overwrite=False)):
        with pytest.raises(FinetuneError, match="holds files this script did not write"):
            run_folder.check_save_dir(str(foreign), **flags)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FinetuneError, match="exists and is not a folder"):
        run_folder.check_save_dir(str(tmp_path / "file"), resume=False, overwrite=False)


def test_start_run_dir_marks_the_folder_and_starts_metrics(tmp_path):
    save_dir = ours(tmp_path)
    assert json.loads((save_dir / run_folder.RUN_MARKER).read_text()) == {"written_by": "train_llama2.py"}
    assert (save_dir / "metrics.jsonl").read_text() == ""
    assert run_folder.check_save_dir(str(save_dir), resume=False, overwrite=False) is None


def test_checkpoints_decide_between_resume_overwrite_and_refusal(tmp_path):
    save_dir = ours(tmp_path)
    with pytest.raises(FinetuneError, match="--resume: no complete checkpoint"):
        run_folder.check_save_dir(str(save_dir), resume=True, overwrite=False)
    assert run_folder.check_save_dir(str(save_dir), False, False, resume_if_possible=True) is None
    make_checkpoints(save_dir, 10, 9, 100)
    (save_dir / "checkpoints" / "step-00000200.partial").mkdir()  # not complete: never listed
    (save_dir / "checkpoints" / "step-300").mkdir()
    newest = str(save_dir / "checkpoints" / "step-00000100")
    assert run_folder.list_checkpoints(str(save_dir)) == [
        str(save_dir / "checkpoints" / f"step-{step:08d}") for step in (9, 10, 100)]
    with pytest.raises(FinetuneError, match="holds checkpoints of an earlier run; pass --resume"):
        run_folder.check_save_dir(str(save_dir), resume=False, overwrite=False)
    assert run_folder.check_save_dir(str(save_dir), resume=True, overwrite=False) == newest
    assert run_folder.check_save_dir(str(save_dir), False, False, resume_if_possible=True) == newest
    assert run_folder.check_save_dir(str(save_dir), resume=False, overwrite=True) is None
    assert run_folder.newest_checkpoint_note(str(save_dir)) == \
        f"the newest complete checkpoint is {newest}; continue from it with --resume"


def test_a_fresh_run_clears_only_what_a_run_wrote(tmp_path):
    save_dir = ours(tmp_path)
    make_checkpoints(save_dir, 2)
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "notes.txt", "model_card.md"):
        (save_dir / name).write_text(name)
    (save_dir / "adapter").mkdir()
    (save_dir / run_folder.FINAL_STAGING).mkdir()
    (save_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    run_folder.start_run_dir(str(save_dir), "train_baichuan2_13b.py")
    assert sorted(os.listdir(save_dir)) == sorted([run_folder.RUN_MARKER, "metrics.jsonl", "notes.txt",
                                                   "model_card.md"])
    assert (save_dir / "metrics.jsonl").read_text() == ""
    assert json.loads((save_dir / run_folder.RUN_MARKER).read_text()) == {"written_by": "train_baichuan2_13b.py"}


@pytest.mark.parametrize("where", ["checkpoints", "metrics.jsonl", run_folder.RUN_MARKER, "adapter",
                                   "checkpoints/step-00000004"])
def test_a_link_where_the_run_writes_is_refused_and_nothing_changes(tmp_path, where):
    elsewhere = tmp_path / "another_run"
    (elsewhere / "step-00000004").mkdir(parents=True)
    (elsewhere / "step-00000004" / "model.distcp").write_text("precious")
    (elsewhere / "metrics.jsonl").write_text('{"step": 4}\n')
    save_dir = ours(tmp_path)
    make_checkpoints(save_dir, 2)
    link = save_dir / where
    run_folder.remove_path(str(link))
    target = elsewhere / ("metrics.jsonl" if where in ("metrics.jsonl", run_folder.RUN_MARKER) else "step-00000004")
    link.symlink_to(target)
    before = snapshot(elsewhere)
    with pytest.raises(FinetuneError) as raised:
        run_folder.check_save_dir(str(save_dir), resume=False, overwrite=True)
    assert str(raised.value).startswith(f"{link} is a symbolic link")
    assert snapshot(elsewhere) == before


def test_remove_path_removes_a_link_never_what_it_points_to(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    inside = tmp_path / "folder"
    inside.mkdir()
    (inside / "link").symlink_to(target)
    (tmp_path / "link").symlink_to(target)
    run_folder.remove_path(str(tmp_path / "link"))
    run_folder.remove_path(str(inside))
    run_folder.remove_path(str(tmp_path / "never_there"))  # nothing to do, no error
    assert not (tmp_path / "link").exists() and not inside.exists()
    assert (target / "keep.txt").read_text() == "keep"


def test_a_folder_locked_by_another_run_is_refused(tmp_path):
    save_dir = ours(tmp_path)
    other_run = os.open(save_dir, os.O_RDONLY)
    fcntl.flock(other_run, fcntl.LOCK_EX)
    try:
        with pytest.raises(FinetuneError, match="another run is using --save-model-dir"):
            run_folder.lock_run_dir(str(save_dir))
    finally:
        os.close(other_run)
    run_folder.lock_run_dir(str(save_dir))  # the other run has ended
    probe = os.open(save_dir, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # this run now holds it
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run_folder.release_run_locks()
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    finally:
        os.close(probe)


def test_locking_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"cannot open --save-model-dir '.*missing' \(no such file or directory\)"):
        run_folder.lock_run_dir(str(tmp_path / "missing"))


def test_claimed_folders_still_empty_at_exit_are_removed_again(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(run_folder.atexit, "register", lambda function, *args: at_exit.append((function, args)))
    run_folder.claim_run_dir(str(tmp_path / "a" / "b" / "c"))
    assert (tmp_path / "a" / "b" / "c").is_dir()
    run_folder.release_run_locks()
    (tmp_path / "a" / "kept.txt").write_text("written by the run")
    for function, args in reversed(at_exit):  # atexit runs the last registered first
        function(*args)
    assert sorted(os.listdir(tmp_path)) == ["a"] and sorted(os.listdir(tmp_path / "a")) == ["kept.txt"]


def test_truncate_metrics_drops_rows_after_the_checkpoint_and_a_cut_row(tmp_path):
    save_dir = ours(tmp_path)
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3, 4)]
    (save_dir / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "lo')
    run_folder.truncate_metrics(str(save_dir), last_step=3)
    assert (save_dir / "metrics.jsonl").read_text() == "".join(rows[:3])
    run_folder.truncate_metrics(str(tmp_path / "no_metrics_here"), 3)  # nothing to truncate: no error


def test_a_failed_write_is_one_line_naming_the_path_the_cause_and_the_checkpoint(tmp_path):
    save_dir = ours(tmp_path)
    make_checkpoints(save_dir, 6)
    with pytest.raises(FinetuneError) as raised:
        with run_folder.writing("the checkpoint", str(save_dir)):
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-00000008/a.distcp")
    assert str(raised.value) == ("could not write '/runs/x/checkpoints/step-00000008/a.distcp' (no space left on "
                                 f"device); the newest complete checkpoint is {save_dir}/checkpoints/step-00000006; "
                                 "continue from it with --resume")
    with pytest.raises(FinetuneError, match=r"^could not write 'metrics.jsonl' \(read-only file system\)$"):
        with run_folder.writing("metrics.jsonl"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(KeyError):  # not a write error: left alone
        with run_folder.writing("x"):
            raise KeyError("x")


def test_describe_error_gives_the_cause_in_a_few_words():
    assert run_folder.describe_error(OSError(errno.EACCES, "Permission denied")) == "permission denied"
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    assert run_folder.describe_error(wrapped) == "no space left on device"
    assert run_folder.describe_error(ValueError("first line\nsecond line")) == "first line"
    assert run_folder.describe_error(ValueError("")) == "ValueError"


def test_each_resume_keeps_the_run_config_before_it_and_a_fresh_run_clears_them(tmp_path):
    assert run_folder.keep_run_config(str(tmp_path)) is None  # nothing to keep yet
    for part in range(3):
        kept = run_folder.keep_run_config(str(tmp_path))
        assert kept is None or kept.endswith(f"run_config.{part}.json")
        (tmp_path / "run_config.json").write_text(json.dumps({"part": part}))
    assert json.loads((tmp_path / "run_config.1.json").read_text()) == {"part": 0}
    assert json.loads((tmp_path / "run_config.2.json").read_text()) == {"part": 1}
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"part": 2}
    (tmp_path / run_folder.RUN_MARKER).write_text("{}")
    (tmp_path / "run_config.notes.json").write_text("{}")  # not a part: not ours to remove
    run_folder.start_run_dir(str(tmp_path), "train_llama2.py")
    assert sorted(p.name for p in tmp_path.glob("run_config*")) == ["run_config.json", "run_config.notes.json"]
