"""Never lose a run: periodic checkpoints, atomic saves, exact resume, stop signals, non-finite losses.

Every run here is a real training process on the tiny fixture models. An interrupted-and-resumed run must end
with the same weights, bit for bit, and the same metric rows as a run that never stopped (CPU, fixed seed).
Runs are shared through module-scoped fixtures to keep the file fast.
"""
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script, torchrun
from safetensors.torch import load_file

SCRIPT = str(REPO_ROOT / "train_llama2.py")
# One thread per process: the tiny models run fastest that way, and a busy machine does not slow them down.
ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 20
SAVE_EVERY = 4
# Short rows and a large-ish learning rate so every step visibly changes the weights.
COMMON = ["--block-size", "128", "--batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0",
          "--seed", "0", "--save-every", str(SAVE_EVERY), "--keep-last", "2"]


def train_args(tiny, save_dir, max_steps=MAX_STEPS, *extra):
    return ["--model-name-or-path", tiny["llama"], "--dataset-name-or-path", tiny["data"],
            "--save-model-dir", str(save_dir), "--max-steps", str(max_steps), *COMMON, *extra]


def python(script, *args):
    return run_script(PYTHON, script, *args, env=ENV)


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def checkpoint_names(save_dir):
    root = Path(save_dir) / "checkpoints"
    return sorted(os.listdir(root)) if root.is_dir() else []


def metric_rows(save_dir):
    """The reproducible part of metrics.jsonl (timings left out)."""
    with open(Path(save_dir) / "metrics.jsonl") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"], r["tokens"]) for r in map(json.loads, f) if r]


def assert_same_weights(dir_a, dir_b):
    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ in {different}"


def assert_same_run(resumed_dir, reference_dir):
    assert_same_weights(resumed_dir, reference_dir)
    assert metric_rows(resumed_dir) == metric_rows(reference_dir)


def wrapper_script(folder, name, patch):
    """A script that applies `patch` (Python source) and then runs train_llama2.main() with its own argv."""
    path = Path(folder) / name
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent(patch) +
                    "\nimport train_llama2\nsys.exit(train_llama2.main(sys.argv[1:]))\n")
    return str(path)


def popen(*args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ENV)
    return subprocess.Popen(list(args), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def last_logged_step(save_dir):
    path = Path(save_dir) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # not there yet, or a row half-written
        return 0
    return max((r["step"] for r in rows), default=0)


def interrupt_when_logged(proc, save_dir, past_step, sig, timeout=120):
    """Send `sig` to `proc` once a metrics row beyond `past_step` exists; returns (returncode, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while last_logged_step(save_dir) <= past_step:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before it could be interrupted:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no metrics row appeared in time")
        time.sleep(0.02)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not stop after {sig.name}:\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """An uninterrupted run with a checkpoint every SAVE_EVERY steps."""
    save_dir = tmp_path_factory.mktemp("resume") / "reference"
    check_ok(python(SCRIPT, *train_args(tiny_run, save_dir)))
    return save_dir


@pytest.mark.slow
def test_save_every_writes_complete_checkpoints_and_keeps_the_last_k(reference):
    import torch.distributed.checkpoint as dcp

    assert checkpoint_names(reference) == [f"step-{MAX_STEPS - SAVE_EVERY:08d}", f"step-{MAX_STEPS:08d}"]
    newest = reference / "checkpoints" / f"step-{MAX_STEPS:08d}"
    files = set(os.listdir(newest))
    assert {".metadata", "trainer_state.json", "rng_rank0.json"} <= files
    assert any(name.endswith(".distcp") for name in files)
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == MAX_STEPS and state["seed"] == 0 and state["world_size"] == 1
    assert "epoch" in state and state["scheduler"]["last_epoch"] == MAX_STEPS
    rng = json.loads((newest / "rng_rank0.json").read_text())
    assert {"python", "numpy", "torch"} <= set(rng)
    assert state["non_tensor_state"]["optimizer"]["param_groups"][0]["lr"] > 0  # beside DCP, as JSON

    # The checkpoint holds the model as it was at that step: here, the final weights.
    final = load_file(str(reference / "model.safetensors"))
    restored = {"model": {name: torch.zeros_like(t) for name, t in final.items()}}
    dcp.load(restored, checkpoint_id=str(newest))
    assert all(torch.equal(restored["model"][name], final[name]) for name in final)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoints_and_resume_matches(tiny_run, reference, tmp_path):
    """SIGKILL in the middle of the third save: the two earlier checkpoints (keep-last 2) survive, the
    half-written folder is ignored, and --resume ends exactly where the uninterrupted run did."""
    killer = wrapper_script(tmp_path, "kill_during_save.py", """
        import os, signal
        import torch.distributed.checkpoint as dcp
        real_save, calls = dcp.save, []
        def save_then_die(*args, **kwargs):
            calls.append(1)
            real_save(*args, **kwargs)  # shards on disk, but the checkpoint is not complete yet
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        dcp.save = save_then_die
    """)
    save_dir = tmp_path / "run"
    killed = python(killer, *train_args(tiny_run, save_dir))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    third = f"step-{3 * SAVE_EVERY:08d}"
    assert checkpoint_names(save_dir) == [f"step-{SAVE_EVERY:08d}", f"step-{2 * SAVE_EVERY:08d}", third + ".partial"]
    assert any(name.endswith(".distcp") for name in os.listdir(save_dir / "checkpoints" / (third + ".partial")))
    # A later half-written checkpoint full of junk must be ignored as well.
    junk = save_dir / "checkpoints" / "step-00000099.partial"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"\x00garbage")
    (junk / "trainer_state.json").write_text("{not json")

    resumed = check_ok(python(SCRIPT, *train_args(tiny_run, save_dir), "--resume"))
    assert f"at step {2 * SAVE_EVERY}" in resumed.stdout
    assert_same_run(save_dir, reference)
    complete = [name for name in checkpoint_names(save_dir) if not name.endswith(".partial")]
    assert complete == [f"step-{MAX_STEPS - SAVE_EVERY:08d}", f"step-{MAX_STEPS:08d}"]
    assert not (save_dir / "checkpoints" / (third + ".partial")).exists()


@pytest.mark.slow
def test_sigterm_then_sigint_stop_cleanly_and_resume_matches(tiny_run, reference, tmp_path):
    save_dir = tmp_path / "run"
    args = train_args(tiny_run, save_dir)

    code, out, err = interrupt_when_logged(popen(PYTHON, SCRIPT, *args), save_dir, 0, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "--resume" in out and "SIGTERM" in out, out[-2000:]
    stopped_at = int(checkpoint_names(save_dir)[-1].removeprefix("step-"))
    assert 0 < stopped_at < MAX_STEPS
    assert not (save_dir / "model.safetensors").exists()

    code, out, err = interrupt_when_logged(popen(PYTHON, SCRIPT, *args, "--resume"), save_dir, stopped_at + 1,
                                           signal.SIGINT)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "--resume" in out and "SIGINT" in out, out[-2000:]
    assert f"at step {stopped_at}" in out
    assert int(checkpoint_names(save_dir)[-1].removeprefix("step-")) > stopped_at

    check_ok(python(SCRIPT, *args, "--resume"))
    assert_same_run(save_dir, reference)


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_after_skipping_the_allowed_ones(tiny_run, tmp_path):
    """NaN losses on the 3rd and 6th forward passes (one per step) with --skip-nonfinite 1: step 3's update is
    skipped (the step still counts, so data and step numbers stay aligned), step 6 stops the run, and the
    checkpoint of step 4 stays."""
    nan_loss = wrapper_script(tmp_path, "nan_loss.py", """
        from transformers import LlamaForCausalLM
        real_forward, calls = LlamaForCausalLM.forward, []
        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            calls.append(1)
            if len(calls) in (3, 6):  # the script's token_loss takes its loss from these logits
                out.logits = out.logits * float("nan")
            return out
        LlamaForCausalLM.forward = forward
    """)
    save_dir = tmp_path / "run"
    result = python(nan_loss, "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
                        tiny_run["data"], "--save-model-dir", str(save_dir), "--max-steps", "10", "--block-size",
                        "128", "--batch-size", "4", "--log-interval", "1", "--num-workers", "0", "--save-every", "2",
                        "--skip-nonfinite", "1")
    last = assert_one_line_error(result)
    assert "non-finite" in last and "step 6" in last, last
    assert "step-00000004" in last, last
    assert "skipped the update of step 3" in result.stdout
    assert checkpoint_names(save_dir) == ["step-00000002", "step-00000004"]
    state = json.loads((save_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert [row[0] for row in metric_rows(save_dir)] == [1, 2, 3, 4, 5]
    assert not (save_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_overwrite_starts_over_and_keeps_files_we_did_not_write(tiny_run, reference, tmp_path):
    save_dir = tmp_path / "run"
    shutil.copytree(reference, save_dir)
    (save_dir / "my_notes.txt").write_text("keep me")
    check_ok(python(SCRIPT, *train_args(tiny_run, save_dir, 2), "--overwrite"))
    assert checkpoint_names(save_dir) == []  # the earlier run's checkpoints are gone, none due in 2 steps
    assert [row[0] for row in metric_rows(save_dir)] == [1, 2]
    assert (save_dir / "my_notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------
# Two processes under torchrun
# ----------------------------------------------------------------------------------------------------------

TWO_PROC_STEPS = 12


def torchrun_popen(*args):
    return popen(PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *args,
                 start_new_session=True)


@pytest.mark.distributed
def test_two_processes_sigterm_checkpoint_on_every_rank_and_resume_matches(tiny_run, tmp_path):
    reference_dir = tmp_path / "reference"
    save_dir = tmp_path / "run"
    args = train_args(tiny_run, save_dir, TWO_PROC_STEPS)
    # The uninterrupted reference runs alongside the interrupted run to save wall time.
    reference_proc = torchrun_popen(*train_args(tiny_run, reference_dir, TWO_PROC_STEPS))
    try:
        code, out, err = interrupt_when_logged(torchrun_popen(*args), save_dir, 0, signal.SIGTERM)
        ref_out, ref_err = reference_proc.communicate(timeout=300)
    finally:
        if reference_proc.poll() is None:
            os.killpg(reference_proc.pid, signal.SIGKILL)
    assert reference_proc.returncode == 0, ref_err[-3000:]

    # torchrun passes the signal on to both workers; each finishes its step and they write one checkpoint.
    # torchrun itself then exits 1 with its own SignalException, as the README says; the workers must end
    # without a traceback and without torchrun having to kill them.
    assert code == 1, err[-3000:]
    assert "Continue with the same command plus --resume" in out, out[-2000:] + err[-3000:]
    assert f'File "{SCRIPT}"' not in err and err.count("Traceback") == err.count("SignalException: Process"), err
    assert "forcefully" not in err, err[-3000:]
    names = checkpoint_names(save_dir)
    assert names and not any(name.endswith(".partial") for name in names), names
    newest = save_dir / "checkpoints" / names[-1]
    assert {"rng_rank0.json", "rng_rank1.json", "trainer_state.json"} <= set(os.listdir(newest))
    assert json.loads((newest / "trainer_state.json").read_text())["world_size"] == 2
    assert not (save_dir / "model.safetensors").exists()

    check_ok(torchrun(2, SCRIPT, *args, "--resume", env=ENV))
    assert_same_run(save_dir, reference_dir)

