"""Backend.on_rank0: rank 0 does the work, every rank gets its result or the same FinetuneError."""
import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, torchrun

from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError

ONE_PROCESS = Backend(engine="single", device=torch.device("cpu"))


def disk_full():
    raise FinetuneError("the disk is full")


def test_one_process_gets_the_result_or_the_error():
    assert ONE_PROCESS.on_rank0(lambda: {"micro_batch_size": 4}) == {"micro_batch_size": 4}
    with pytest.raises(FinetuneError, match="^the disk is full$"):
        ONE_PROCESS.on_rank0(disk_full)


SCRIPT = """
import json, sys
sys.path.insert(0, REPO_DIR)
from finetune.errors import FinetuneError
from finetune.distributed.backend import enable_advanced_parallelization

backend = enable_advanced_parallelization()
ran = []

def work(fail):
    ran.append(backend.rank)
    if fail:
        raise FinetuneError(f"failed on rank {backend.rank}")
    return {"chosen_by": backend.rank}

outcome = {"rank": backend.rank, "result": backend.on_rank0(lambda: work(False))}
try:
    backend.on_rank0(lambda: work(True))
except FinetuneError as exc:
    outcome["error"] = str(exc)
outcome["ran"] = ran
with open(OUT_DIR + f"/rank{backend.rank}.json", "w") as f:
    json.dump(outcome, f)
backend.shutdown()
"""


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_under_torchrun_every_rank_gets_rank0s_result_and_its_error(tmp_path):
    script = tmp_path / "on_rank0.py"
    script.write_text(SCRIPT.replace("REPO_DIR", repr(str(REPO_ROOT))).replace("OUT_DIR", repr(str(tmp_path))))
    result = torchrun(2, script)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["result"] == {"chosen_by": 0}, outcome
        assert outcome["error"] == "failed on rank 0", outcome
        assert outcome["ran"] == ([0, 0] if rank == 0 else []), outcome  # the work ran on rank 0 alone
