"""Faults and bad inputs from an adversarial pass: every case must end in one `error:` line (or a clean stop),
no traceback, nothing on disk lost, and a resumed run that ends bit for bit where an uninterrupted one does.

Most cases are scenarios that run the training script's main() several times. To pay the imports once they run
in two driver processes (`drive`), in this process's place: each main() call has its stdout and stderr captured
at the file-descriptor level and its exit turned into an exit code, as `python train_llama2.py ...` would give.
The pytest tests below only read each scenario's verdict. Flag parsing and run planning are tested directly;
torchrun cases run real jobs.
"""
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, make_random_dataset, snapshot

from finetune.errors import FinetuneError

TESTS = Path(__file__).resolve().parent
ENV = {"OMP_NUM_THREADS": "1"}
STEPS, SAVE_EVERY = 6, 3

Result = namedtuple("Result", "returncode stdout stderr")


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------

SCENARIOS = {}  # name -> (driver group, function(lab))


def scenario(group):
    def register(function):
        SCENARIOS[function.__name__] = (group, function)
        return function
    return register


def run_main(argv, script="llama"):
    """main(argv) of a training script in this process, as a Result like that of `python train_*.py argv`."""
    from finetune.checkpoint import run_folder

    module = importlib.import_module({"llama": "train_llama2", "baichuan": "train_baichuan2_13b"}[script])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = module.main(argv) or 0
        except SystemExit as exc:  # what the interpreter does with it
            code = exc.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            run_folder.release_run_locks()  # the process would end here, and the OS would drop the lock
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return Result(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


class Lab:
    """What a scenario works with: the tiny model and data, fresh folders, and one shared reference run."""

    def __init__(self, tiny, root):
        self.tiny, self.root = tiny, Path(root)
        self._reference = None

    def folder(self, name):
        path = self.root / name
        assert not path.exists()
        return path

    def args(self, save_dir, **flags):
        values = {"model_name_or_path": self.tiny["llama"], "dataset_name_or_path": self.tiny["data"],
                  "block_size": 128, "batch_size": 4, "lr": 1e-3, "max_steps": STEPS, "save_every": SAVE_EVERY,
                  "num_workers": 0, "log_interval": 1, "seed": 0, "save_model_dir": save_dir}
        values.update(flags)
        out = []
        for name, value in values.items():
            if value is True:
                out.append("--" + name.replace("_", "-"))
            elif value is not None and value is not False:
                out += ["--" + name.replace("_", "-"), str(value)]
        return out

    def train(self, save_dir, script="llama", **flags):
        return run_main(self.args(save_dir, **flags), script)

    def reference(self):
        """An uninterrupted run of STEPS steps with checkpoints at steps 3 and 6."""
        if self._reference is None:
            self._reference = self.folder("reference")
            ok(self.train(self._reference))
        return self._reference

    def copy_of_reference(self, name, keep_final_model=False, drop_checkpoints=()):
        path = self.folder(name)
        shutil.copytree(self.reference(), path)
        if not keep_final_model:
            (path / "model.safetensors").unlink()
        for step in drop_checkpoints:
            shutil.rmtree(path / "checkpoints" / f"step-{step:08d}")
        return path


def drive(group, tiny, root, results_path):
    """Run the scenarios of `group` (all, or those named in $FAULT_SCENARIOS); write name -> verdict."""
    only = [name for name in os.environ.get("FAULT_SCENARIOS", "").split(",") if name]
    lab = Lab(tiny, root)
    results = {}
    for name, (function_group, function) in SCENARIOS.items():
        if function_group != group or (only and name not in only):
            continue
        started = time.monotonic()
        try:
            function(lab)
            results[name] = "ok"
        except pytest.skip.Exception as exc:
            results[name] = f"skip: {exc.msg}"
        except BaseException:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.monotonic() - started:.1f} s", flush=True)
    Path(results_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def verdicts(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    tiny = {key: tiny_run[key] for key in ("llama", "baichuan", "data")}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ENV)
    jobs = []
    for group in (1, 2):
        results = root / f"results{group}.json"
        code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}, {str(REPO_ROOT)!r}]; import test_faults; "
                f"test_faults.drive({group}, {tiny!r}, {str(root / f'group{group}')!r}, {str(results)!r})")
        (root / f"group{group}").mkdir()
        jobs.append((results, subprocess.Popen([PYTHON, "-c", code], cwd=REPO_ROOT, env=env, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    found, logs = {}, ""
    for results, job in jobs:
        log, _ = job.communicate(timeout=600)
        logs += log
        if results.exists():
            found.update(json.loads(results.read_text()))
    return found, logs


# ----------------------------------------------------------------------------------------------------------
# Helpers for scenarios
# ----------------------------------------------------------------------------------------------------------

def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def one_error_line(result):
    return assert_one_line_error(result)


def same_weights(dir_a, dir_b):
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ in {different}"


def metric_rows(save_dir):
    rows = [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r["loss"], r["lr"], r["tokens"]) for r in rows]


def checkpoint_names(save_dir):
    root = Path(save_dir) / "checkpoints"
    return sorted(os.listdir(root)) if root.is_dir() else []


def messages(stderr):
    """stderr without progress bars: what a reader would take for messages."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.strip() and "it/s]" not in line and "s/it]" not in line
            and "%|" not in line]


@contextlib.contextmanager
def patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def deadline(seconds):
    """Turn a hang (the old eager planning of every epoch) into a failure."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def signal_at_step(step, *signals):
    """A stand-in for AdamW.step that sends `signals` to this process during optimiser step `step`."""
    import torch

    real, calls = torch.optim.AdamW.step, []

    def step_and_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(self, *args, **kwargs)
    return patched(torch.optim.AdamW, "step", step_and_signal)


# ----------------------------------------------------------------------------------------------------------
# 1. Resuming a finished run
# ----------------------------------------------------------------------------------------------------------

@scenario(1)
def resuming_a_finished_run_trains_nothing_and_writes_the_missing_model(lab):
    reference = lab.reference()
    run = lab.copy_of_reference("finished")  # stopped after its last checkpoint, before the final save
    for _ in range(2):  # the model missing, then there
        result = ok(lab.train(run, resume=True))
        assert "nothing to train" in result.stdout, result.stdout[-2000:]
        assert f"[Step {STEPS + 1}/" not in result.stdout + result.stderr
        same_weights(run, reference)
        assert metric_rows(run) == metric_rows(reference)


@scenario(1)
def sigterm_during_the_last_step_then_resume_writes_the_same_model(lab):
    run = lab.folder("sigterm_last_step")
    with signal_at_step(STEPS, signal.SIGTERM):
        stopped = ok(lab.train(run))
    assert f"stopped by SIGTERM after step {STEPS}" in stopped.stdout, stopped.stdout[-2000:]
    assert not (run / "model.safetensors").exists()
    resumed = ok(lab.train(run, resume=True))
    assert "nothing to train" in resumed.stdout and f"[Step {STEPS + 1}/" not in resumed.stdout
    same_weights(run, lab.reference())
    assert metric_rows(run) == metric_rows(lab.reference())


# ----------------------------------------------------------------------------------------------------------
# 2. One run per folder
# ----------------------------------------------------------------------------------------------------------

@scenario(1)
def a_second_run_into_a_locked_folder_is_refused_at_once(lab):
    from finetune.checkpoint import run_folder

    run = lab.copy_of_reference("locked", drop_checkpoints=[STEPS])
    holder = os.open(run, os.O_RDONLY)  # another run, as far as flock is concerned
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        before = snapshot(run)
        for flags in (dict(resume=True), dict(overwrite=True)):
            started = time.monotonic()
            line = one_error_line(lab.train(run, **flags))
            assert "another run" in line and str(run) in line, line
            assert time.monotonic() - started < 20  # before the model is loaded
        assert snapshot(run) == before
    finally:
        os.close(holder)
    ok(lab.train(run, resume=True))  # once the other run is gone
    same_weights(run, lab.reference())

    # A data-loader worker forked while the folder is locked must not keep it locked once the run is gone.
    assert run_folder.lock_run_dir(str(run)) is None
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(ready_write, b"x")
        time.sleep(3)
        os._exit(0)
    try:
        os.read(ready_read, 1)
        run_folder.release_run_locks()  # the run ends; its worker lives on for a moment
        probe = os.open(run, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the worker still holds the lock
        finally:
            os.close(probe)
    finally:
        os.waitpid(child, 0)


# ----------------------------------------------------------------------------------------------------------
# 3 and 9. Damaged checkpoints
# ----------------------------------------------------------------------------------------------------------

def flip_bits(path, at=0.5):
    data = bytearray(Path(path).read_bytes())
    index = int(len(data) * at)
    data[index] ^= 0b00100100
    Path(path).write_bytes(bytes(data))


@scenario(1)
def flipped_bits_in_a_checkpoint_are_caught_and_resume_if_possible_falls_back(lab):
    run = lab.copy_of_reference("bit_rot")
    newest = run / "checkpoints" / f"step-{STEPS:08d}"
    flip_bits(next(newest.glob("*.distcp")))
    before = snapshot(run)
    line = one_error_line(lab.train(run, resume=True))
    assert str(newest) in line and ".distcp" in line and "checksum" in line, line
    assert snapshot(run) == before

    resumed = ok(lab.train(run, resume_if_possible=True))
    assert f"resumed from {run / 'checkpoints' / f'step-{SAVE_EVERY:08d}'} at step {SAVE_EVERY}" in resumed.stdout
    assert str(newest) in resumed.stdout  # the warning says which one was skipped
    same_weights(run, lab.reference())
    assert metric_rows(run) == metric_rows(lab.reference())


@scenario(1)
def corrupt_checkpoint_metadata_gives_only_the_error_line(lab):
    run = lab.copy_of_reference("bad_metadata")
    newest = run / "checkpoints" / f"step-{STEPS:08d}"
    flip_bits(newest / ".metadata", at=0.1)
    # Damage the checksums cannot see (it happened before they were taken): the checkpoint library must fail,
    # quietly.
    manifest = newest / "checksums.sha256"
    if manifest.exists():
        names = [line.split("  ", 1)[1] for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(f"{hashlib.sha256((newest / name).read_bytes()).hexdigest()}  {name}\n"
                                    for name in names))
    result = lab.train(run, resume=True)
    line = one_error_line(result)
    assert "corrupt" in line and str(newest) in line, line
    assert messages(result.stderr) == [line], result.stderr


# ----------------------------------------------------------------------------------------------------------
# 8. What may change on resume
# ----------------------------------------------------------------------------------------------------------

@scenario(1)
def flags_the_checkpoint_fixes_are_refused_on_resume_and_the_others_may_change(lab):
    run = lab.copy_of_reference("changed_flags", drop_checkpoints=[STEPS])
    other_data = make_random_dataset(lab.root / "other_data", seed=1)
    before = snapshot(run)
    for flags, flag in [(dict(lr=5e-2), "--lr"), (dict(max_steps=16), "--max-steps"),
                        (dict(max_steps=None, epochs=3), "--max-steps"), (dict(seed=1), "--seed"),
                        (dict(warmup_ratio=0.5), "--warmup-ratio"), (dict(min_lr_ratio=0.5), "--min-lr-ratio"),
                        (dict(weight_decay=0.1), "--weight-decay"), (dict(max_grad_norm=0.5), "--max-grad-norm"),
                        (dict(batching="block"), "--batching"), (dict(batch_size=8), "--batch-size"),
                        (dict(dataset_name_or_path=other_data), "--dataset-name-or-path")]:
        line = one_error_line(lab.train(run, resume=True, **flags))
        assert line.startswith(f"error: {flag}"), (flags, line)
    assert snapshot(run) == before
    # Flags that do not change the result may change.
    ok(lab.train(run, resume=True, save_every=2, keep_last=1, log_interval=2, eval_every=2, num_workers=1,
                 skip_nonfinite=1))
    same_weights(run, lab.reference())

    by_epochs = lab.folder("by_epochs")
    ok(lab.train(by_epochs, max_steps=None, epochs=1, save_every=2))
    line = one_error_line(lab.train(by_epochs, max_steps=None, epochs=3, resume=True))
    assert line.startswith("error: --epochs 3") and "--epochs 1" in line, line


# ----------------------------------------------------------------------------------------------------------
# 4. Full, read-only or misplaced disks
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size):
    """A small file system of its own (needs root and a kernel that lets us mount)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk):
    """Take every free byte of `disk` with one file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return filler


@scenario(2)
def a_failed_final_save_leaves_a_checkpoint_and_resume_writes_the_model(lab):
    """The final save_pretrained raises safetensors' own error type (not an OSError)."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    run = lab.folder("final_save_fails")
    with patched(transformers.modeling_utils, "safe_save_file", no_space):
        line = one_error_line(lab.train(run, save_every=4))
    assert str(run) in line and "no space left on device" in line and f"step-{STEPS:08d}" in line, line
    assert not (run / "model.safetensors").exists() and not (run / ".final_model.partial").exists()
    assert not (run / "config.json").exists()
    resumed = ok(lab.train(run, save_every=4, resume=True))
    assert "nothing to train" in resumed.stdout
    same_weights(run, lab.reference())


@scenario(2)
def a_full_disk_at_the_final_save_loses_nothing(lab):
    with tmpfs(lab.root / "full_disk", "6m") as disk:
        run = disk / "run"
        from finetune.checkpoint import save_dtype

        real, filler = save_dtype.gathered_state_dict, []

        def fill_then_gather(*args, **kwargs):
            filler.append(fill(disk))
            return real(*args, **kwargs)
        with patched(save_dtype, "gathered_state_dict", fill_then_gather):
            result = lab.train(run, save_every=4)
        line = one_error_line(result)
        assert str(run) in line and "no space left on device" in line and "step-00000004" in line, line
        assert checkpoint_names(run) == ["step-00000004"]  # no half-written checkpoint either
        assert not (run / "model.safetensors").exists() and not (run / ".final_model.partial").exists()
        filler[0].unlink()
        ok(lab.train(run, save_every=4, resume=True))
        same_weights(run, lab.reference())
        assert metric_rows(run) == metric_rows(lab.reference())


@scenario(2)
def a_full_disk_at_the_metrics_file_gives_one_line(lab):
    with tmpfs(lab.root / "full_for_metrics", "4m") as disk:
        run = disk / "run"
        from finetune.checkpoint import checkpointer

        real = checkpointer.start_run_dir

        def start_then_fill(*args):
            real(*args)
            fill(disk)
        with patched(checkpointer, "start_run_dir", start_then_fill):
            line = one_error_line(lab.train(run))
        assert str(run / "metrics.jsonl") in line and "no space left on device" in line, line


@scenario(2)
def a_read_only_disk_gives_one_line(lab):
    with tmpfs(lab.root / "read_only", "4m") as disk:
        run = disk / "run"
        shutil.copytree(lab.copy_of_reference("for_read_only", drop_checkpoints=[STEPS]), run)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = snapshot(disk)
        line = one_error_line(lab.train(run, resume=True))
        assert str(run) in line and "read-only file system" in line, line
        line = one_error_line(lab.train(disk / "new_run"))
        assert str(disk / "new_run") in line and "read-only file system" in line, line
        assert snapshot(disk) == before


@scenario(2)
def a_save_folder_under_a_file_gives_one_line(lab):
    file = lab.root / "a_file"
    file.write_text("not a folder")
    line = one_error_line(lab.train(file / "run"))
    assert str(file / "run") in line and "not a directory" in line, line
    assert file.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------------------
# 7. Many epochs
# ----------------------------------------------------------------------------------------------------------

@scenario(2)
def a_billion_epochs_start_at_once_or_are_refused_with_one_line(lab):
    run = lab.folder("billion_epochs")
    with signal_at_step(2, signal.SIGTERM), deadline(60):
        result = ok(lab.train(run, max_steps=None, epochs=10 ** 9, batching="block", save_every=None))
    steps_per_epoch = 96 // 4
    assert f"[Step 2/{10 ** 9 * steps_per_epoch}]" in result.stdout, result.stdout[-2000:]
    assert "stopped by SIGTERM after step 2" in result.stdout
    line = one_error_line(lab.train(lab.folder("billion_packed_epochs"), max_steps=None, epochs=10 ** 9))
    assert "--epochs 1000000000" in line and "--max-steps" in line, line


# ----------------------------------------------------------------------------------------------------------
# 13. Signals twice
# ----------------------------------------------------------------------------------------------------------

@scenario(2)
def a_stop_signal_sent_twice_still_writes_one_checkpoint(lab):
    from finetune.checkpoint import signals

    for sig in (signal.SIGINT, signal.SIGTERM):
        run = lab.folder(f"twice_{sig.name}")
        with signal_at_step(2, sig, sig):
            result = ok(lab.train(run))
        assert result.stdout.count(f"stopped by {sig.name} after step 2") == 1, result.stdout[-2000:]
        assert checkpoint_names(run) == ["step-00000002"]
    # A second Ctrl-C well after the first: stop at once, with one line.
    run = lab.folder("twice_late")
    with signal_at_step(2, signal.SIGINT, signal.SIGINT), patched(signals.StopRequest, "REPEAT_SECONDS", -1):
        line = one_error_line(lab.train(run))
    assert "second SIGINT" in line, line
    assert not any(name.endswith(".partial") for name in checkpoint_names(run))


# ----------------------------------------------------------------------------------------------------------
# 5 and 13. Data the model cannot learn from
# ----------------------------------------------------------------------------------------------------------

def dataset_with_labels(folder, label):
    from datasets import Dataset, DatasetDict

    ids = [[1] + [5 + i % 100 for i in range(n)] + [2] for n in range(10, 50)]
    labels = [[-100] * 3 + [label] * (len(row) - 3) for row in ids]
    DatasetDict(train=Dataset.from_dict({"input_ids": ids, "labels": labels})).save_to_disk(str(folder))
    return folder


@scenario(1)
def token_ids_and_labels_the_model_cannot_take_are_refused_before_training(lab):
    cases = [(make_random_dataset(lab.root / "other_tokenizer", vocab_size=300), "llama", ["token id 299", "128"]),
             (dataset_with_labels(lab.root / "label_minus_5", -5), "baichuan", ["label -5", "-100", "128"]),
             (dataset_with_labels(lab.root / "no_targets", -100), "llama", ["no targets to learn"])]
    for data, model, words in cases:
        before = snapshot(data)
        run = lab.folder(f"run_{Path(data).name}")
        result = lab.train(run, model, dataset_name_or_path=data, model_name_or_path=lab.tiny[model])
        line = one_error_line(result)
        assert all(word in line for word in words), line
        assert "[Step" not in result.stdout  # before training
        assert snapshot(data) == before and not checkpoint_names(run)


# ----------------------------------------------------------------------------------------------------------
# 6. Flag values no one means, refused at parse time
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, flag", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"), (["--warmup-ratio", "nan"], "--warmup-ratio"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--max-grad-norm", "0"], "--max-grad-norm"), (["--max-grad-norm", "inf"], "--max-grad-norm"),
    (["--min-lr-ratio", "-2"], "--min-lr-ratio"), (["--peak-tflops", "-5"], "--peak-tflops"),
    (["--peak-tflops", "0"], "--peak-tflops"), (["--lr", "inf"], "--lr"), (["--num-workers", "-1"], "--num-workers"),
    (["--plan-only", "--device-memory-gb", "0"], "--device-memory-gb"),
    (["--plan-only", "--device-memory-gb", "nan"], "--device-memory-gb"), (["--num-devices", "0"], "--num-devices"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite"), (["--keep-last", "0"], "--keep-last"),
    (["--epochs", "abc"], "--epochs"),
])
def test_numeric_flags_outside_their_range_give_one_line_at_parse_time(flags, flag):
    from finetune.args import parse_training_args

    with pytest.raises(FinetuneError) as raised:
        parse_training_args("", {"model": "m", "dataset": "d", "save_dir": "s", "epochs": 1, "batch_size": 8,
                                 "lr": 1e-5, "log_interval": 1}, {}, flags)
    assert flag in str(raised.value) and "\n" not in str(raised.value), raised.value


def test_the_defaults_and_edge_values_pass():
    from finetune.args import parse_training_args

    defaults = {"model": "m", "dataset": "d", "save_dir": "s", "epochs": 1, "batch_size": 8, "lr": 1e-5,
                "log_interval": 1}
    args = parse_training_args("", defaults, {}, ["--seed", "0", "--warmup-ratio", "0", "--min-lr-ratio", "1",
                                                   "--weight-decay", "0", "--num-workers", "0"])
    assert args.seed == 0 and args.max_grad_norm == 1.0


# ----------------------------------------------------------------------------------------------------------
# 7. Epochs are planned when they are reached
# ----------------------------------------------------------------------------------------------------------

def eager_steps(lengths, batch_size, block_size, batching, seed, epochs):
    """What the run trains, the plain way: every epoch's plan, one after the other."""
    from finetune.data import batches

    return [(epoch, rows) for epoch in range(epochs)
            for rows in batches.plan_epoch(lengths, batch_size, block_size, batching, seed, epoch)]


@pytest.mark.parametrize("batching", ["packed", "block"])
def test_the_lazy_plan_trains_exactly_the_steps_of_every_epoch_and_resumes_anywhere(batching):
    from finetune.data import batches

    lengths = np.random.default_rng(0).integers(5, 100, 103)
    expected = eager_steps(lengths, 4, 128, batching, 3, 4)
    run = batches.StepRows(lengths, 4, 128, batching, 3, 4)
    assert run.total_steps == len(expected)
    for start in (0, 1, len(expected) // 2, len(expected) - 1, len(expected)):
        got = [(epoch, rows) for epoch, plan, first in run.epochs(start)
               for rows in plan[max(0, start - first):run.total_steps - first]]
        assert got == expected[start:], start
    capped = batches.StepRows(lengths, 4, 128, batching, 3, 100, max_steps=len(expected) + 5)
    got = [(epoch, rows) for epoch, plan, first in capped.epochs(0) for rows in plan[:capped.total_steps - first]]
    assert got == eager_steps(lengths, 4, 128, batching, 3, 5)[:len(expected) + 5]


def test_a_billion_epochs_are_counted_without_building_them():
    import tracemalloc

    from finetune.data import batches

    lengths = np.random.default_rng(0).integers(5, 100, 103)
    tracemalloc.start()
    try:
        with deadline(10):
            run = batches.StepRows(lengths, 4, 128, "block", 0, 10 ** 9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.total_steps == 10 ** 9 * (103 // 4) and peak < 10 * 2 ** 20
    epoch, plan, first = next(run.epochs(run.total_steps - 1))  # the last epoch, straight away
    assert epoch == 10 ** 9 - 1 and first == run.total_steps - len(plan)
    with pytest.raises(FinetuneError, match="--max-steps"):
        batches.StepRows(lengths, 4, 128, "packed", 0, 10 ** 9)


# ----------------------------------------------------------------------------------------------------------
# 12 and 2. torchrun: one error line, every rank refused
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_bad_flag_and_locked_folder_print_one_error_line(tiny_run, tmp_path):
    lab = Lab(tiny_run, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    holder = os.open(locked, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another run holds the folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ENV)
    script = str(REPO_ROOT / "train_llama2.py")
    jobs = {name: subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                    script, *lab.args(folder, **flags)], cwd=REPO_ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            for name, folder, flags in [("batch", tmp_path / "run", dict(batch_size=5)),
                                        ("locked", locked, {})]}
    try:
        outputs = {name: job.communicate(timeout=240) for name, job in jobs.items()}
    finally:
        os.close(holder)
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    for name, (out, err) in outputs.items():
        assert jobs[name].returncode != 0
        ours = [line for line in (out + err).splitlines() if "error:" in line]
        assert len(ours) == 1, out + err  # once, not once per rank
        # Our line is the last one our processes print; after it comes only torchrun's own failure report.
        after = err.split(ours[0], 1)[1] if ours[0] in err else err
        assert not [line for line in after.splitlines()
                    if line.startswith(("error", "warning", "[Step", "[parallel", "resumed"))], after
        assert not [line for line in after.splitlines()
                    if 'File "' in line and "site-packages" not in line and "<frozen" not in line], after
    assert "--batch-size 5" in [l for l in (outputs["batch"][0] + outputs["batch"][1]).splitlines()
                                if "error:" in l][0]
    assert str(locked) in [l for l in (outputs["locked"][0] + outputs["locked"][1]).splitlines() if "error:" in l][0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# The tests: one per scenario
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(name, verdicts):
    found, logs = verdicts
    if name not in found:
        pytest.fail(f"scenario {name} did not run:\n{logs[-5000:]}")
    if found[name].startswith("skip: "):
        pytest.skip(found[name][6:])
    assert found[name] == "ok", found[name]
