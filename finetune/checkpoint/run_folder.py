"""The run folder (`--save-model-dir`): its marker, its lock, what a fresh run clears, metrics.jsonl, and the
one-line wording of a failed write.

  .finetune_run.json            marks the folder as ours (we never touch a folder without it, unless empty)
  metrics.jsonl                 one row per logged step
  run_config.json               what the run (or its latest resumed part) ran with; run_config.N.json: earlier parts
  checkpoints/step-00000040/    complete checkpoints only (finetune/checkpoint/checkpointer.py)
  .final_model.partial/         the final model while it is written (finetune/checkpoint/export.py)

The folder is locked (flock) for the life of a run, so two runs never write into it at once. No path the run
writes or deletes may be a symbolic link (`check_no_links`), so a run never changes anything outside its folder;
a file staged under a name of its own (`NAME.partial`, `NAME.tmp`) is written with `open_new`, which removes a
link there instead of following it.
"""
import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import BinaryIO

from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from finetune.errors import FinetuneError
from finetune.model import lora

RUN_MARKER = ".finetune_run.json"

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
RUN_CONFIG_PART = re.compile(r"^run_config\.(\d+)\.json$")  # an earlier part of a resumed run

FINAL_STAGING = ".final_model.partial"  # the final model is written here, then moved into place


def list_checkpoints(save_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(save_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := CHECKPOINT_PATTERN.match(name))]
    return [path for _, path in sorted(found)]


def describe_error(exc: BaseException) -> str:
    """The cause of a failed read or write in a few words ("no space left on device", "read-only file system")."""
    if isinstance(exc, CheckpointException) and exc.failures:  # DCP wraps each rank's own exception
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc)
    wrapped = re.search(r'message: "([^"]+)"', text)  # safetensors quotes the OS error inside its own text
    if wrapped:
        return wrapped.group(1)[:1].lower() + wrapped.group(1)[1:]
    return text.splitlines()[0] if text.strip() else exc.__class__.__name__


def newest_checkpoint_note(save_dir: str) -> str:
    checkpoints = list_checkpoints(save_dir)
    return (f"the newest complete checkpoint is {checkpoints[-1]}; continue from it with --resume" if checkpoints
            else "no checkpoint has been written yet")


@contextlib.contextmanager
def writing(what: str, save_dir: str | None = None) -> Iterator[None]:
    """Turn a failed write (full or read-only disk, a file where a folder should be) into one error line that
    names the path and the cause, and says which checkpoint is still there."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        path = getattr(exc, "filename", None) or what
        note = f"; {newest_checkpoint_note(save_dir)}" if save_dir else ""
        raise FinetuneError(f"could not write {path!r} ({describe_error(exc)}){note}") from None


_locked_fds = []  # run folders this process holds locked


def _drop_locks_in_child():
    # A forked child (a data-loader worker) must not keep the folder locked after the run itself has died.
    for fd in _locked_fds:
        os.close(fd)
    _locked_fds.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock_run_dir(save_dir: str) -> None:
    """Hold an exclusive lock on the run folder until this process ends (the OS drops it however the process
    ends, so a crashed run never blocks its own --resume). A FinetuneError if another run holds it."""
    try:
        fd = os.open(save_dir, os.O_RDONLY)
    except OSError as exc:
        raise FinetuneError(f"cannot open --save-model-dir {save_dir!r} ({describe_error(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FinetuneError(f"another run is using --save-model-dir {save_dir!r} (it holds the folder's lock); "
                            f"wait for it to end or choose another folder") from None
    except OSError as exc:  # a file system without flock (some network mounts): run unguarded, but say so
        os.close(fd)
        print(f"warning: cannot lock {save_dir!r} ({describe_error(exc)}); make sure no other run uses it",
              flush=True)
        return None
    _locked_fds.append(fd)
    return None


def claim_run_dir(save_dir: str) -> None:
    """Create the run folder (rank 0) and lock it for this run."""
    create_run_dir(save_dir)
    lock_run_dir(save_dir)


def release_run_locks() -> None:
    """Drop this process's folder locks (for callers that run several trainings in one process)."""
    while _locked_fds:
        os.close(_locked_fds.pop())


def create_run_dir(save_dir: str) -> None:
    """Create `save_dir` (and missing parents); ones still empty when the process exits are removed again, so a
    run refused before it wrote anything leaves the disk as it found it."""
    missing, path = [], os.path.abspath(save_dir)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    with writing(save_dir):
        os.makedirs(save_dir, exist_ok=True)
    for folder in reversed(missing):  # atexit runs the last registered first: innermost first
        atexit.register(_remove_if_empty, folder)


def _remove_if_empty(folder):
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def remove_path(path: str) -> None:
    """Delete `path` if it is there: a file, a symbolic link (the link itself, never what it points to) or a
    folder with everything in it (links inside it are removed as links). Errors are raised, never ignored."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def open_new(path: str) -> BinaryIO:
    """`path` opened to write a new file (binary): whatever is there (a file an interrupted write left, a
    symbolic link) is removed first, and the file is created only if nothing took its place, so no write ever
    goes through a link."""
    remove_path(path)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o666), "wb")


# What a run keeps in its folder and writes into or deletes from (the trackers' folders with --report-to). A
# symbolic link at one of these paths would send those writes and deletions to wherever it points (another run's
# checkpoints, say).
KEPT_IN_RUN_DIR = (RUN_MARKER, "metrics.jsonl", "checkpoints", lora.ADAPTER_DIR, "tensorboard", "wandb", "mlruns")


def check_no_links(save_dir: str) -> None:
    """Refuse a run folder with a symbolic link where the run writes or deletes, naming the link."""
    paths = [os.path.join(save_dir, name) for name in KEPT_IN_RUN_DIR]
    root = os.path.join(save_dir, "checkpoints")
    if os.path.isdir(root) and not os.path.islink(root):
        paths += [os.path.join(root, name) for name in sorted(os.listdir(root))]
    for path in paths:
        if os.path.islink(path):
            raise FinetuneError(f"{path} is a symbolic link: a run never writes or deletes through links out of "
                                f"--save-model-dir, so nothing was changed; replace it with a real folder or file, "
                                f"or choose another --save-model-dir")


def check_save_dir(save_dir: str, resume: bool, overwrite: bool, resume_if_possible: bool = False) -> str | None:
    """Refuse a folder that is unsafe to write into; returns the checkpoint to resume from (or None).

    Every rank calls this before anything is written, so all of them reach the same verdict.
    """
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise FinetuneError(f"--save-model-dir {save_dir!r} exists and is not a folder")
    ours = os.path.isfile(os.path.join(save_dir, RUN_MARKER))
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not ours:
        raise FinetuneError(f"--save-model-dir {save_dir!r} holds files this script did not write; "
                            f"choose an empty or new folder")
    check_no_links(save_dir)
    checkpoints = list_checkpoints(save_dir) if ours else []
    if resume_if_possible and checkpoints:
        return checkpoints[-1]
    if resume:
        if not checkpoints:
            raise FinetuneError(f"--resume: no complete checkpoint in {save_dir!r}")
        return checkpoints[-1]
    if checkpoints and not overwrite:
        raise FinetuneError(f"{save_dir!r} holds checkpoints of an earlier run; pass --resume to continue "
                            f"it or --overwrite to start over")
    return None


def start_run_dir(save_dir: str, script_name: str) -> None:
    """Mark `save_dir` as ours and start a fresh run in it (rank 0 only). Removes only files we wrote: old
    checkpoints and the earlier final weights, so a new run that dies never leaves a folder that looks finished."""
    with writing(save_dir):
        remove_path(os.path.join(save_dir, "checkpoints"))
        remove_path(os.path.join(save_dir, FINAL_STAGING))
        if os.path.isfile(os.path.join(save_dir, RUN_MARKER)):
            remove_path(os.path.join(save_dir, lora.ADAPTER_DIR))
            for name in os.listdir(save_dir):
                if RUN_CONFIG_PART.match(name):  # an earlier run's parts; this run's run_config.json is new
                    os.remove(os.path.join(save_dir, name))
                if name.startswith("model") and (name.endswith(".safetensors") or
                                                 name.endswith(".safetensors.index.json")):
                    os.remove(os.path.join(save_dir, name))
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, RUN_MARKER), "w") as f:
            json.dump({"written_by": script_name}, f)
        open(os.path.join(save_dir, "metrics.jsonl"), "w").close()


def keep_run_config(save_dir: str) -> str | None:
    """Before a resumed run writes its run_config.json, keep the one of the part before it as run_config.N.json
    (1: the run's first part, 2: its first resume, ...); returns that path."""
    path = os.path.join(save_dir, "run_config.json")
    if not os.path.isfile(path):
        return None
    parts = [int(m.group(1)) for name in os.listdir(save_dir) if (m := RUN_CONFIG_PART.match(name))]
    kept = os.path.join(save_dir, f"run_config.{max(parts, default=0) + 1}.json")
    os.replace(path, kept)
    return kept


def _logged_step(line):
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):  # a row cut short by a kill, a blank line
        return float("inf")
    return step if isinstance(step, int) and not isinstance(step, bool) else float("inf")  # not a row we wrote


def truncate_metrics(save_dir: str, last_step: int) -> None:
    """Drop metric rows logged after `last_step` (by a run that died before its next checkpoint), and rows that
    are not a run's rows at all."""
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is dropped like any other damaged row
        rows = [line for line in f if _logged_step(line) <= last_step]
    with writing(path, save_dir):
        with open_new(path + ".tmp") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
