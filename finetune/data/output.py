"""The output folder of prepare_dataset.py (`--save-path`): held by one run at a time, written beside the old
output and swapped in, so that a kill at any moment leaves the previous output or the new one; what an
interrupted run left is recovered by the next."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import DatasetDict

REPORT_FILE = "prepare_report.json"
MADE_BY = "prepare_dataset.py"


def is_our_output(folder: str | Path) -> bool:
    try:
        report = json.loads((Path(folder) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("made_by") == MADE_BY and (Path(folder) / "dataset_dict.json").exists()


def save_dataset_and_report(dataset: DatasetDict, report: dict, folder: str | Path) -> None:
    dataset.save_to_disk(str(folder))
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def output_folder(save_path: str) -> tuple[Path, list[Path]]:
    """--save-path as an absolute folder path, and the folders above it that had to be created for it."""
    target = Path(save_path).expanduser().resolve()
    if not target.name:
        raise FinetuneError(f"--save-path {save_path} names no folder")
    if target.exists() and not target.is_dir():
        raise FinetuneError(f"--save-path {save_path} exists and is not a folder; not touching it")
    created = [folder for folder in target.parents if not folder.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as problem:  # a file on the way, no permission, a read-only disk
        raise FinetuneError(f"--save-path {save_path}: cannot create its parent folder ({problem.strerror})") from None
    return target, created


def check_save_path(save_path: str) -> None:
    """Refuse a --save-path we would have to clobber: a file, or a folder this script did not write."""
    target = Path(save_path).expanduser()
    if target.exists():
        if not target.is_dir():
            raise FinetuneError(f"--save-path {save_path} exists and is not a folder; not touching it")
        if any(target.iterdir()) and not is_our_output(target):
            raise FinetuneError(f"--save-path {save_path} exists and is not a previous prepare_dataset.py output; "
                               "choose another path or remove it yourself")


# The new output is written into .NAME.tmp beside NAME and swapped in; without an atomic swap the previous output
# waits in .NAME.old between two renames. Every run holds .NAME.lock meanwhile, so such folders found by the
# holder are an interrupted run's (".NAME.tmp-xxxx" / ".NAME.old-PID": from versions without the lock).
def _work_paths(target):
    return target.parent / f".{target.name}.tmp", target.parent / f".{target.name}.old"


def _leftovers(target):
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)(-\w+)?")
    found = [path for path in target.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)  # newest first


def recover_leftovers(target: Path) -> str | None:
    """Finish what an interrupted write left beside `target`: put a previous output that was moved aside but
    never replaced back in place, and delete half-written or replaced folders. Returns what it did, or None."""
    leftovers = _leftovers(target)
    restored = None
    if not target.exists():
        restored = next((path for path in leftovers if path.name.startswith(f".{target.name}.old")), None)
        if restored is not None:
            os.replace(restored, target)
    for path in leftovers:
        if path != restored:
            shutil.rmtree(path, ignore_errors=True)
    if restored is not None:
        return f"restored the previous output from {restored.name}, left by an interrupted run"
    if leftovers:
        return f"removed {', '.join(path.name for path in leftovers)}, left by an interrupted run"
    return None


def _exchange(first, second):
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(first))


@contextmanager
def claim_save_path(save_path: str) -> Iterator[Path]:
    """Hold --save-path for one run: refuse a file, a foreign folder, or a folder another run is writing; recover
    what an interrupted run left. Yields the absolute folder to pass to write_output."""
    target, created = output_folder(save_path)
    lock_path = target.parent / f".{target.name}.lock"
    while True:
        try:
            handle = open(lock_path, "a")
        except OSError as problem:
            raise FinetuneError(f"--save-path {save_path}: cannot create {lock_path} ({problem.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FinetuneError(f"another prepare_dataset.py run is writing --save-path {save_path}; wait for it to "
                               "finish or choose another path") from None
        try:  # the lock file may have been removed by the run that held it just before; take the new one then
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        note = recover_leftovers(target)
        if note:
            print(f"note: --save-path {save_path}: {note}")
        check_save_path(save_path)
        yield target
    finally:
        try:  # unlinked before unlocking: a run that opened the file meanwhile sees it is gone and starts over
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                os.unlink(lock_path)
        except FileNotFoundError:
            pass
        handle.close()
        for folder in created if not target.exists() else []:  # a failed run leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break


def write_output(dataset: DatasetDict, report: dict, target: Path) -> str:
    """Save into `target` (from claim_save_path, still held) so that a kill at any moment leaves the previous
    output or the new one there (or, where paths cannot be swapped atomically, beside it until the next run)."""
    tmp, old = _work_paths(target)
    try:
        try:
            save_dataset_and_report(dataset, report, tmp)
        except OSError as problem:  # a full disk, a quota, a read-only file system
            raise FinetuneError(f"could not write the new output for {target}: {problem.strerror or problem}") from None
        if not target.exists():
            os.replace(tmp, target)
        elif not _exchange(tmp, target):
            os.replace(target, old)
            os.replace(tmp, target)
    finally:  # on success this deletes the replaced output; after an error it puts the previous one back
        recover_leftovers(target)
    return str(target)
