"""finetune/checkpoint/checksums.py: checksums written, verified, and damage named by file."""
import hashlib
import json
import os

import pytest
import torch

from finetune.checkpoint.checksums import CHECKSUMS, hashed_by, verify_checkpoint, write_checksums
from finetune.distributed.backend import Backend

CPU = Backend(engine="single", device=torch.device("cpu"))


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "step-00000002"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(os.urandom(4096))
    (folder / "rng_rank0.json").write_text('{"python": 1}')
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "checksums": True}))
    write_checksums(str(folder), CPU)
    return folder


def test_the_list_is_sha256sum_format_of_every_other_file(checkpoint):
    lines = (checkpoint / CHECKSUMS).read_text().splitlines()
    expected = [f"{hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()}  {name}"
                for name in sorted(os.listdir(checkpoint)) if name != CHECKSUMS]
    assert lines == expected and len(lines) == 3


def test_an_untouched_checkpoint_verifies(checkpoint):
    assert verify_checkpoint(str(checkpoint), CPU) is None


def test_a_flipped_byte_is_found_naming_the_file(checkpoint):
    path = checkpoint / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify_checkpoint(str(checkpoint), CPU) == \
        "__0_0.distcp does not match the checksum recorded when it was written"


def test_a_missing_or_unreadable_file_is_named(checkpoint):
    (checkpoint / "rng_rank0.json").unlink()
    assert verify_checkpoint(str(checkpoint), CPU) == "rng_rank0.json is missing"
    (checkpoint / "rng_rank0.json").mkdir()  # a folder where the file was: it cannot be read
    assert verify_checkpoint(str(checkpoint), CPU) == "rng_rank0.json cannot be read (is a directory)"


def test_a_missing_list_is_damage_unless_the_checkpoint_predates_checksums(checkpoint):
    (checkpoint / CHECKSUMS).unlink()
    assert verify_checkpoint(str(checkpoint), CPU) == f"{CHECKSUMS} is missing"
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2}))  # an earlier version's checkpoint
    assert verify_checkpoint(str(checkpoint), CPU) is None
    (checkpoint / "trainer_state.json").write_text("{not json")  # unreadable: the missing list counts as damage
    assert verify_checkpoint(str(checkpoint), CPU) == f"{CHECKSUMS} is missing"


def test_a_garbled_list_is_damage(checkpoint):
    (checkpoint / CHECKSUMS).write_text("no two spaces on this line\n")
    assert verify_checkpoint(str(checkpoint), CPU) == f"{CHECKSUMS} is damaged"
    (checkpoint / CHECKSUMS).write_bytes(b"\xff\xfe  __0_0.distcp\n")
    assert verify_checkpoint(str(checkpoint), CPU) == f"{CHECKSUMS} is damaged"


def test_a_rank_that_is_not_main_hashes_only_its_files_and_writes_no_list(tmp_path):
    class SecondRank(Backend):
        def all_gather(self, obj):
            self.gathered = obj
            return [obj]

    (tmp_path / "__0_0.distcp").write_bytes(b"rank 0")
    (tmp_path / "__1_0.distcp").write_bytes(b"rank 1")
    (tmp_path / ".metadata").write_bytes(b"rank 0 too")
    rank1 = SecondRank(engine="fsdp2", device=torch.device("cpu"), rank=1, world_size=2)
    write_checksums(str(tmp_path), rank1)
    assert rank1.gathered == {"__1_0.distcp": hashlib.sha256(b"rank 1").hexdigest()}
    assert not (tmp_path / CHECKSUMS).exists()


def test_each_rank_hashes_the_checkpoint_files_it_wrote():
    """A rank reads back for its checksum only what it just wrote (no other node's shards); rank 0 the rest."""
    files = ["__0_0.distcp", "__1_0.distcp", "__3_1.distcp", "rng_rank2.json", ".metadata", "trainer_state.json"]
    assert [hashed_by(name, 4) for name in files] == [0, 1, 3, 2, 0, 0]
    assert hashed_by("__5_0.distcp", 4) == 1  # a checkpoint of 8 processes verified by 4: every file has a rank
