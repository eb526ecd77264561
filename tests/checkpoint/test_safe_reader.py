"""finetune/safe_reader.py: DCP checkpoints read without running anything the folder's writer put there.

The payloads below write a marker file when they are unpickled; loading must refuse them before that. The first
tests pin the parts of torch that SafeFileSystemReader relies on, so a torch upgrade that changes them fails
here, loudly, rather than silently reopening the hole or breaking every resume.
"""
import inspect
import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import MarkerPayload
from torch.distributed.checkpoint.filesystem import FileSystemReader

from finetune.checkpoint import safe_reader
from finetune.checkpoint.safe_reader import SafeFileSystemReader, UnsafeCheckpoint, load_tensors

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def small_state():
    """Tensors of the shapes and dtypes a checkpoint holds (an AdamW state included)."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()["state"]
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": {"state": {str(k): dict(v) for k, v in state.items()}},
            "other": {"bf16": torch.ones(2, dtype=torch.bfloat16), "int": torch.arange(3)}}


def zeros_like(state):
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in state.items()}


@pytest.fixture
def checkpoint(tmp_path):
    state = small_state()
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    return tmp_path / "ckpt", state


# ---- what the reader relies on in torch ---------------------------------------------------------------------

def test_torch_still_has_what_the_safe_reader_overrides_and_uses(checkpoint):
    path, _ = checkpoint
    stock, safe = FileSystemReader(str(path)), SafeFileSystemReader(str(path))
    # The private parts it calls.
    assert callable(stock._get_metadata_path) and hasattr(stock.fs, "create_stream") and stock.load_id
    # The stock reader still unpickles .metadata from the same file and stamps the load id: what the override
    # replaces. If torch reads metadata differently now, revisit read_metadata.
    source = inspect.getsource(FileSystemReader.read_metadata)
    assert "pickle.load" in source and "_get_metadata_path" in source and "load_id" in source, source
    # Non-tensor entries still reach the planner through read_data, where the override refuses them.
    assert "BYTE_IO" in inspect.getsource(FileSystemReader.read_data)
    # Every global a real .metadata names is allowed, and the result is what the stock reader builds.
    expected, got = stock.read_metadata(), safe.read_metadata()
    assert got.state_dict_metadata == expected.state_dict_metadata
    assert got.storage_data == expected.storage_data
    assert got.storage_meta.load_id == safe.load_id


def leaves(state, prefix=""):
    for key, value in state.items():
        yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]


def test_tensors_load_through_the_safe_reader(checkpoint):
    path, state = checkpoint
    restored = zeros_like(state)
    load_tensors(restored, str(path))
    expected, got = dict(leaves(state)), dict(leaves(restored))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


# ---- payloads ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_metadata_file_that_runs_code_is_refused(checkpoint, tmp_path):
    path, state = checkpoint
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(MarkerPayload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata .*builtins\.exec"):
        load_tensors(zeros_like(state), str(path))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["under a tensor's name", "as an entry of its own"])
def test_a_pickled_entry_is_never_unpickled(checkpoint, tmp_path, where):
    path, state = checkpoint
    marker = tmp_path / "ran"
    tampered = zeros_like(state)
    if where == "under a tensor's name":
        tampered["model"]["weight"] = MarkerPayload(marker)
    else:
        tampered["optimizer"]["param_groups"] = MarkerPayload(marker)
    for name in os.listdir(path):
        os.remove(path / name)
    dcp.save(tampered, checkpoint_id=str(path))  # plain DCP writes it, with valid metadata
    assert not marker.exists()
    template = zeros_like(state)
    if where == "under a tensor's name":
        with pytest.raises(UnsafeCheckpoint, match="'model.weight' as a pickled object"):
            load_tensors(template, str(path))
    else:  # never asked for: only tensors are loaded
        load_tensors(template, str(path))
        assert torch.equal(template["model"]["bias"], torch.zeros(3))
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(checkpoint):
    path, state = checkpoint
    metadata = FileSystemReader(str(path)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere/" + info.relative_path
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match="not a file of the checkpoint"):
        load_tensors(zeros_like(state), str(path))


def test_only_dcp_metadata_classes_and_plain_values_are_allowed():
    allowed = {module for module, _ in safe_reader.METADATA_GLOBALS}
    assert allowed <= {"torch", "torch.serialization", "torch.distributed.checkpoint.metadata",
                       "torch.distributed.checkpoint.filesystem", "pathlib", "pathlib._local"}
    for module, name in [("builtins", "exec"), ("os", "system"), ("torch", "load"), ("torch", "save"),
                         ("torch.serialization", "load"), ("builtins", "getattr"), ("torch", "Tensor")]:
        data = f"c{module}\n{name}\n.".encode()  # a pickle naming just that global
        with pytest.raises(UnsafeCheckpoint, match=f"{module}.{name}"):
            safe_reader.read_metadata_file(io.BytesIO(data), "x/.metadata")
