"""The child process that runs memory simulations (`python -m finetune.plan.memory_process`): the fake process group
must be the default one, which a training process under torchrun already has. One JSON line per job in (the
model config, the setup, the runs and the stop rule), one per result out."""
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from finetune.plan.memory_step import simulate_readings

REPO_ROOT = Path(__file__).resolve().parents[2]

class SimulationChild:
    """`python -m finetune.plan.memory_process`, started on the first job and kept for the next ones (its
    imports take several seconds); one JSON line per job in, one per result out."""

    def __init__(self) -> None:
        self.process = None

    def __enter__(self) -> "SimulationChild":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process.stderr.close()
            self.process.stdout.close()

    def simulate(self, config: dict, job: dict) -> dict[int, dict]:
        """{micro: reading} of one job (setup, runs, stop rule)."""
        if self.process is None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
            self.process = subprocess.Popen([sys.executable, "-m", "finetune.plan.memory_process"], cwd=REPO_ROOT,
                                            env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)
        self.process.stdin.write(json.dumps({"config": config, **job}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.stdin.close()
            last = (self.process.stderr.read().strip().splitlines() or ["no output"])[-1]
            self.process.wait()
            self.process = None
            raise RuntimeError(f"memory simulation failed: {last}")
        answer = json.loads(line)
        if "error" in answer:  # the configuration cannot be simulated (e.g. block size too long)
            raise ValueError(answer["error"])
        return {int(micro): reading for micro, reading in answer["readings"].items()}


def child_main(lines: Iterable[str], out: TextIO) -> None:
    """Child-process side: one job per line, over a fake process group of the job's world size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    mesh = None
    for line in lines:
        job = json.loads(line)
        setup = job["setup"]
        if setup["engine"] == "fsdp2" and (mesh is None or mesh.size() != setup["world_size"]):
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group("fake", rank=0, world_size=setup["world_size"], store=FakeStore())
            mesh = init_device_mesh("cpu", (setup["world_size"],))  # outside fake mode
        try:
            readings = simulate_readings(job["config"], setup, [tuple(run) for run in job["runs"]],
                                         mesh if setup["engine"] == "fsdp2" else None, job["stop"])
            answer = {"readings": readings}
        except ValueError as exc:
            answer = {"error": str(exc)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    child_main(sys.stdin, sys.stdout)
