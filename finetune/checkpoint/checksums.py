"""Checksums of a checkpoint's files: each rank hashes the files it wrote, rank 0 writes `checksums.sha256`
(`sha256sum -c` format). They catch damage, not tampering: whoever can write the checkpoint can rewrite them."""
import hashlib
import json
import os
import re

from finetune.checkpoint.run_folder import describe_error
from finetune.distributed.backend import Backend

CHECKSUMS = "checksums.sha256"


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hashed_by(name: str, world_size: int) -> int:
    """The rank that hashes a checkpoint file: the one that wrote it (DCP's __R_N.distcp, our rng_rankR.json), so
    the bytes are read where they were just written, not fetched from another node; rank 0 for the rest."""
    written = re.fullmatch(r"__(\d+)_\d+\.distcp|rng_rank(\d+)\.json", name)
    return int(written.group(1) or written.group(2)) % world_size if written else 0


def write_checksums(folder: str, backend: Backend) -> None:
    """Record the SHA-256 of every file in `folder` (each rank hashes what it wrote; rank 0 writes the list)."""
    names = sorted(name for name in os.listdir(folder) if name != CHECKSUMS)
    try:
        mine = {name: _sha256(os.path.join(folder, name)) for name in names
                if hashed_by(name, backend.world_size) == backend.rank}
    except OSError as exc:
        mine = {None: exc}
    sums = {}
    for part in backend.all_gather(mine):
        sums.update(part)
    if None in sums:
        raise sums[None]
    if backend.is_main:
        with open(os.path.join(folder, CHECKSUMS), "w") as f:
            f.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
            f.flush()
            os.fsync(f.fileno())


def verify_checkpoint(path: str, backend: Backend) -> str | None:
    """None if every file of the checkpoint matches the checksum recorded when it was written, else what is
    wrong, naming the file (every rank checks its share and all of them get the same answer)."""
    expected, problem = {}, None
    try:
        with open(os.path.join(path, CHECKSUMS)) as f:
            for line in f:
                digest, name = line.rstrip("\n").split("  ", 1)
                expected[name] = digest
    except FileNotFoundError:
        if _recorded_checksums(path):
            problem = f"{CHECKSUMS} is missing"
    except (OSError, ValueError, UnicodeDecodeError):
        problem = f"{CHECKSUMS} is damaged"
    names = sorted(expected)
    found = []
    for name in [n for n in names if hashed_by(n, backend.world_size) == backend.rank] if problem is None else []:
        file = os.path.join(path, name)
        try:
            if _sha256(file) != expected[name]:
                found.append(f"{name} does not match the checksum recorded when it was written")
        except FileNotFoundError:
            found.append(f"{name} is missing")
        except OSError as exc:
            found.append(f"{name} cannot be read ({describe_error(exc)})")
    found = sorted(sum(backend.all_gather(found), []))
    return problem or (found[0] if found else None)


def _recorded_checksums(path):
    """Whether the checkpoint says it has checksums (checkpoints of earlier versions have none)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return bool(json.load(f).get("checksums"))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return True  # an unreadable state: treat the missing list as damage too
