"""Naming the weight file that cannot be read, when loading a model or an adapter folder fails.

The libraries report a damaged file by whatever their reader raises (an UnpicklingError, a safetensors header
error, "[Errno 22]"), without its name. After a failed load these checks open each weight file of the folder the
cheap way (the safetensors header, the zip directory of a torch.save file, mapped rather than read) and name
the first that does not open.
"""
import pickle
import zipfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def damaged_weight_file(name_or_folder: str) -> str | None:
    """'<file> is damaged or truncated (<why>)' for the first weight file of a model or adapter folder (or of a
    hub model's local cache) that does not open; None when they all open or there is no folder to look in."""
    folder = _local_folder(name_or_folder)
    if folder is None:
        return None
    for path in _files_loaded(folder):
        problem = weight_file_problem(path)
        if problem:
            return f"{path} is damaged or truncated ({problem})"
    return None


def _files_loaded(folder):
    """The weight files a load reads: the safetensors ones where there are any (transformers and peft prefer
    them), else the .bin ones."""
    by_suffix = {suffix: sorted(p for p in folder.glob(f"*{suffix}") if p.is_file()) for suffix in WEIGHT_SUFFIXES}
    return by_suffix[".safetensors"] or by_suffix[".bin"]


def weight_file_problem(path: str | Path) -> str | None:
    """Why the weight file at `path` does not open, or None."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "it is empty"
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                f.keys()
        else:  # a zip-format torch.save file is mapped, not read; an older pickle-only one must be read
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        return "its pickled data cannot be read"
    except Exception as exc:  # each reader raises its own types
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _local_folder(name_or_folder):
    """The folder holding the files: a local folder, or a hub model's snapshot in the local cache."""
    folder = Path(str(name_or_folder)).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_folder), local_files_only=True))
    except Exception:  # not a hub id, or not cached: nothing on this machine to look at
        return None
