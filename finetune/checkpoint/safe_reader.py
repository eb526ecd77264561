"""Reading a PyTorch distributed checkpoint (DCP) without letting the checkpoint folder run code.

DCP's own `FileSystemReader` reads `.metadata` with plain `pickle.load`, and its load planner reads every
non-tensor entry with `torch.load(weights_only=False)`: both run whatever code the folder's writer put there.
`SafeFileSystemReader` reads `.metadata` with an unpickler that builds only the classes a DCP metadata file
holds, and refuses non-tensor entries before any of their bytes are read. Tensors are read by DCP as before,
with `torch.load(weights_only=True)`. Our checkpoints keep everything that is not a tensor as JSON beside the
DCP files (finetune/checkpoint/checkpointer.py), so they need no non-tensor entries.

It overrides `read_metadata` and `read_data` of FileSystemReader, and uses its private `_get_metadata_path`,
`fs` and `load_id`: tests/checkpoint/test_safe_reader.py fails if a torch upgrade changes them.
"""
import os
import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from finetune.errors import FinetuneError

# What DCP pickles into `.metadata`, and nothing else: its metadata classes, tensor shapes, dtypes and layouts,
# and the path it was saved under. Calling any of them with any arguments only builds a plain value.
METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # pathlib._local: Python 3.13 and later
}


class UnsafeCheckpoint(FinetuneError):
    """A checkpoint file holds something that only running code could load (a pickled object)."""


class _ForeignGlobal(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        is_dtype = module == "torch" and isinstance(vars(torch).get(name), torch.dtype)
        if (module, name) in METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise _ForeignGlobal(f"{module}.{name}")


def read_metadata_file(stream: IO[bytes], path: str) -> Metadata:
    """The DCP `Metadata` pickled in `stream` (the file `path`), built without running anything it names."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except _ForeignGlobal as exc:
        raise UnsafeCheckpoint(f"{path} is corrupt or not a checkpoint's metadata: it names {exc}, which loading "
                               f"would have to run; it was not loaded") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path} is corrupt: it holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        # Shards are files of the checkpoint folder itself; a path elsewhere would read another folder's files.
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UnsafeCheckpoint(f"{path} is corrupt: it points to {name!r}, not a file of the checkpoint")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader that unpickles nothing but DCP metadata and reads tensors only. The first refusal is
    kept in `refusal`: DCP wraps its reader's errors, or folds them into the text of another one."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.refusal = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = read_metadata_file(stream, path)
            except UnsafeCheckpoint as exc:
                self.refusal = self.refusal or exc
                raise
        if metadata.storage_meta is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:  # DCP would torch.load(weights_only=False) them: any object, any code
            self.refusal = self.refusal or UnsafeCheckpoint(
                f"checkpoint {str(self.path)!r} stores {pickled[0]!r} as a pickled object, which loading would "
                f"have to run; it was not loaded")
            raise self.refusal
        return super().read_data(plan, planner)


def load_tensors(state_dict: dict, path: str) -> None:
    """dcp.load of `state_dict` (nested dicts of tensors, loaded in place) from the checkpoint folder `path`.
    Raises UnsafeCheckpoint for anything that would run code; DCP's own exceptions for the rest."""
    reader = SafeFileSystemReader(path)
    try:
        dcp.load(state_dict, storage_reader=reader)
    except BaseException:  # DCP's CheckpointException is a BaseException
        if reader.refusal:
            raise reader.refusal from None
        raise


def tensor_names(path: str) -> set[str]:
    """The names of the tensors the checkpoint folder `path` holds, as DCP flattened them ("model.lm_head.weight"),
    read from its `.metadata` alone."""
    return set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)
