"""Resumable checkpoints that survive preemption: written atomically, found again with `--resume`.

Layout inside `--save-model-dir`:
  .finetune_run.json            marks the folder as ours (we never touch a folder without it, unless empty)
  metrics.jsonl                 one row per logged step
  checkpoints/step-00000040/    complete checkpoints only: PyTorch distributed checkpoint (each rank writes
                                its shard of model and optimiser; with LoRA only the adapters and their
                                optimiser state), trainer_state.json, rng_rank<r>.pt
  checkpoints/step-00000050.partial/   a checkpoint being written; ignored on resume
  checkpoints/step-00000040/checksums.sha256   SHA-256 of every file of the checkpoint (`sha256sum -c` format)

A checkpoint becomes visible by one rename, after every rank has finished writing, so a job killed in the
middle of a save leaves the previous checkpoint as the newest complete one; its checksums are checked before it
is resumed. The folder is locked (flock) for the life of a run, so two runs never write into it at once.
`Checkpointer` is what the training scripts use: it locks and checks the folder, resumes or starts the run, and
saves when due or when a stop signal came.
"""
import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings

import numpy as np
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from finetune import lora

RUN_MARKER = ".finetune_run.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "checksums.sha256"
FINAL_STAGING = ".final_model.partial"  # the final model is written here, then moved into place


# ----------------------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------------------

def list_checkpoints(save_dir):
    """Complete checkpoints, oldest first."""
    root = os.path.join(save_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := CHECKPOINT_PATTERN.match(name))]
    return [path for _, path in sorted(found)]


def describe_error(exc):
    """The cause of a failed read or write in a few words ("no space left on device", "read-only file system")."""
    if isinstance(exc, CheckpointException) and exc.failures:  # DCP wraps each rank's own exception
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc)
    wrapped = re.search(r'message: "([^"]+)"', text)  # safetensors quotes the OS error inside its own text
    if wrapped:
        return wrapped.group(1)[:1].lower() + wrapped.group(1)[1:]
    return text.splitlines()[0] if text.strip() else exc.__class__.__name__


def newest_checkpoint_note(save_dir):
    checkpoints = list_checkpoints(save_dir)
    return (f"the newest complete checkpoint is {checkpoints[-1]}; continue from it with --resume" if checkpoints
            else "no checkpoint has been written yet")


@contextlib.contextmanager
def writing(what, save_dir=None):
    """Turn a failed write (full or read-only disk, a file where a folder should be) into one error line that
    names the path and the cause, and says which checkpoint is still there."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        path = getattr(exc, "filename", None) or what
        note = f"; {newest_checkpoint_note(save_dir)}" if save_dir else ""
        raise SystemExit(f"error: could not write {path!r} ({describe_error(exc)}){note}") from None


_locked_fds = []  # run folders this process holds locked


def _drop_locks_in_child():
    # A forked child (a data-loader worker) must not keep the folder locked after the run itself has died.
    for fd in _locked_fds:
        os.close(fd)
    _locked_fds.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock_run_dir(save_dir):
    """Hold an exclusive lock on the run folder until this process ends (the OS drops it however the process
    ends, so a crashed run never blocks its own --resume). Returns an error line if another run holds it."""
    try:
        fd = os.open(save_dir, os.O_RDONLY)
    except OSError as exc:
        return f"error: cannot open --save-model-dir {save_dir!r} ({describe_error(exc)})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (f"error: another run is using --save-model-dir {save_dir!r} (it holds the folder's lock); wait "
                f"for it to end or choose another folder")
    except OSError as exc:  # a file system without flock (some network mounts): run unguarded, but say so
        os.close(fd)
        print(f"warning: cannot lock {save_dir!r} ({describe_error(exc)}); make sure no other run uses it",
              flush=True)
        return None
    _locked_fds.append(fd)
    return None


def release_run_locks():
    """Drop this process's folder locks (for callers that run several trainings in one process)."""
    while _locked_fds:
        os.close(_locked_fds.pop())


def _create_run_dir(save_dir):
    """Create `save_dir` (and missing parents); ones still empty when the process exits are removed again, so a
    run refused before it wrote anything leaves the disk as it found it."""
    missing, path = [], os.path.abspath(save_dir)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    with writing(save_dir):
        os.makedirs(save_dir, exist_ok=True)
    for folder in reversed(missing):  # atexit runs the last registered first: innermost first
        atexit.register(_remove_if_empty, folder)


def _remove_if_empty(folder):
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def check_save_dir(save_dir, resume, overwrite, resume_if_possible=False):
    """Refuse a folder that is unsafe to write into; returns the checkpoint to resume from (or None).

    Every rank calls this before anything is written, so all of them reach the same verdict.
    """
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise SystemExit(f"error: --save-model-dir {save_dir!r} exists and is not a folder")
    ours = os.path.isfile(os.path.join(save_dir, RUN_MARKER))
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not ours:
        raise SystemExit(f"error: --save-model-dir {save_dir!r} holds files this script did not write; "
                         f"choose an empty or new folder")
    checkpoints = list_checkpoints(save_dir) if ours else []
    if resume_if_possible and checkpoints:
        return checkpoints[-1]
    if resume:
        if not checkpoints:
            raise SystemExit(f"error: --resume: no complete checkpoint in {save_dir!r}")
        return checkpoints[-1]
    if checkpoints and not overwrite:
        raise SystemExit(f"error: {save_dir!r} holds checkpoints of an earlier run; pass --resume to continue "
                         f"it or --overwrite to start over")
    return None


def start_run_dir(save_dir, script_name):
    """Mark `save_dir` as ours and start a fresh run in it (rank 0 only). Removes only files we wrote: old
    checkpoints and the earlier final weights, so a new run that dies never leaves a folder that looks finished."""
    with writing(save_dir):
        shutil.rmtree(os.path.join(save_dir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(save_dir, FINAL_STAGING), ignore_errors=True)
        if os.path.isfile(os.path.join(save_dir, RUN_MARKER)):
            shutil.rmtree(os.path.join(save_dir, lora.ADAPTER_DIR), ignore_errors=True)
            for name in os.listdir(save_dir):
                if name.startswith("model") and (name.endswith(".safetensors") or
                                                 name.endswith(".safetensors.index.json")):
                    os.remove(os.path.join(save_dir, name))
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, RUN_MARKER), "w") as f:
            json.dump({"written_by": script_name}, f)
        open(os.path.join(save_dir, "metrics.jsonl"), "w").close()


def _logged_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill, or a blank line
        return float("inf")


def truncate_metrics(save_dir, last_step):
    """Drop metric rows logged after `last_step` (by a run that died before its next checkpoint)."""
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if _logged_step(line) <= last_step]
    with writing(path, save_dir):
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------------

def _rng_state():
    numpy_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)), "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state):
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def model_fingerprint(model):
    """Parameter names and full shapes: enough to tell a checkpoint of another model apart."""
    config = model.config
    return {"model_type": config.model_type, "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_parameters": sum(int(np.prod(p.shape)) for p in model.parameters())}


def save_checkpoint(save_dir, step, model, optimizer, scheduler, trainer_state, backend, keep_last):
    """Write a resumable checkpoint for `step` (every rank calls this), then prune old ones."""
    import torch.distributed.checkpoint as dcp

    root = os.path.join(save_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    partial = final + ".partial"
    try:
        if backend.is_main:
            for name in os.listdir(root) if os.path.isdir(root) else []:
                if name.endswith(".partial"):  # left by a run killed while saving
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.makedirs(partial)
        backend.barrier()
        model_state, optim_state = _trained_state(model, optimizer)
        with _quiet_checkpoint_library():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=partial)
        torch.save(_rng_state(), os.path.join(partial, f"rng_rank{backend.rank}.pt"))
        backend.barrier()
        if backend.is_main:
            state = dict(trainer_state, step=step, world_size=backend.world_size,
                         model=model_fingerprint(model), scheduler=scheduler.state_dict(), checksums=CHECKSUMS)
            with open(os.path.join(partial, "trainer_state.json"), "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
        backend.barrier()
        write_checksums(partial, backend)
        if backend.is_main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(root)  # the rename itself must survive a power loss
            for old in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        backend.barrier()
    except (OSError, CheckpointException) as exc:
        if backend.is_main:  # leave no half-written checkpoint taking up space
            shutil.rmtree(partial, ignore_errors=True)
        previous = [c for c in list_checkpoints(save_dir) if c != final]
        kept = f"the previous checkpoint {previous[-1]!r} is intact" if previous else "no earlier checkpoint exists"
        raise SystemExit(f"error: could not write the checkpoint for step {step} in {partial!r} "
                         f"({describe_error(exc)}); {kept}")
    return final


def _trained_state(model, optimizer):
    """(model state, optimiser state) of what trains: every weight in full fine-tuning, only the adapters with
    LoRA (a frozen or 4-bit base, and its quantisation constants, are left to the model files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    keep = {name for name, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model_state.items() if k in keep}, optim_state


@contextlib.contextmanager
def _quiet_checkpoint_library():
    """DCP logs tracebacks and warnings (on the root logger) while it looks for metadata it cannot read; our own
    one-line error says all of it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hashed_by(name, world_size):
    """The rank that hashes a checkpoint file: the one that wrote it (DCP's __R_N.distcp, our rng_rankR.pt), so
    the bytes are read where they were just written, not fetched from another node; rank 0 for the rest."""
    written = re.fullmatch(r"__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt", name)
    return int(written.group(1) or written.group(2)) % world_size if written else 0


def write_checksums(folder, backend):
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


def verify_checkpoint(path, backend):
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


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trainer_state(path):
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError
        return state
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: checkpoint {path!r} is unreadable ({exc.__class__.__name__}); nothing was deleted")


def check_same_run(path, state, settings):
    """A resumed run is the same run: refuse any flag that differs from the one the checkpoint was written with
    (the data order, the optimiser and its schedule, the run's length). Settings the checkpoint does not record
    (checkpoints of earlier versions) are not compared."""
    for key, value in settings.items():
        if key == "epoch" or key not in state or state[key] == value:
            continue
        if key == "dataset":
            raise SystemExit(f"error: --dataset-name-or-path: the training split differs from the one of the run "
                             f"being resumed ({path}); resume with the same data. Nothing was deleted")
        if key == "adapters":
            _check_same_adapters(path, state[key], value)
            continue
        then, now = ("not given" if v is None else v for v in (state[key], value))
        flag = "--" + key.replace("_", "-")
        raise SystemExit(f"error: {flag} {now} differs from the run being resumed ({flag} {then}, {path}); a "
                         f"resumed run keeps the flags it started with (see README, Preemption and resume). "
                         f"Nothing was deleted")


def _check_same_adapters(path, saved, record):
    """LoRA checkpoints hold adapters of one shape, scale and dropout, and no base: refuse other adapter flags."""
    mismatch = lora.resume_mismatch(saved, record)
    if mismatch:
        flag, then, now = mismatch
        raise SystemExit(f"error: {flag} differs from the run being resumed ({path}): it has {lora.describe(then)}, "
                         f"this run {lora.describe(now)}; resume with the same adapter flags. Nothing was deleted")


def load_checkpoint(path, model, optimizer, scheduler, backend, expected_state=None):
    """Restore model, optimiser, schedule and RNG from `path`; returns its trainer state.

    `expected_state` holds the settings the run must share with the checkpoint (`check_same_run`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_trainer_state(path)
    check_same_run(path, state, expected_state or {})
    if state.get("model") != model_fingerprint(model):
        raise SystemExit(f"error: checkpoint {path!r} was written for another model "
                         f"({state.get('model')}); nothing was deleted")
    if not os.path.isfile(os.path.join(path, ".metadata")):  # DCP would print tracebacks while looking for it
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or incomplete (no .metadata); nothing was deleted")
    model_state, optim_state = _trained_state(model, optimizer)
    try:
        with _quiet_checkpoint_library():
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    # DCP wraps storage and format errors in several exception types; its CheckpointException is a BaseException.
    except (Exception, dcp.api.CheckpointException) as exc:
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or incomplete ({exc.__class__.__name__}); "
                         f"nothing was deleted")
    # Only what trains was saved (LoRA: the adapters); the frozen base came from the model files.
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{backend.rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than wrote the checkpoint
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ----------------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------------

class StopRequest:
    """Set by SIGTERM/SIGINT (what schedulers send before a kill); the loop checks it after each step.

    The same stop often arrives twice within moments (torchrun passes on a signal its workers may already have
    had from the terminal or the scheduler): a repeat changes nothing, one checkpoint is written. A second
    Ctrl-C later than that stops at once, without a checkpoint, with one error line.
    """
    REPEAT_SECONDS = 5.0

    def __init__(self, save_dir=None):
        self.event = threading.Event()
        self.signal_name, self.first_at, self.save_dir = None, None, save_dir
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.event.is_set():
            self.signal_name, self.first_at = signal.Signals(signum).name, time.monotonic()
            self.event.set()
        elif signum == signal.SIGINT and time.monotonic() - self.first_at > self.REPEAT_SECONDS:
            note = newest_checkpoint_note(self.save_dir) if self.save_dir else ""
            raise SystemExit(f"error: stopped at once by a second SIGINT, without writing a checkpoint; {note}")

    def requested(self):
        return self.event.is_set()


# ----------------------------------------------------------------------------------------------------------
# What the training scripts call
# ----------------------------------------------------------------------------------------------------------

def fixed_settings(args):
    """The flags a resumed run must share with the run it continues: they fix the data order, the optimiser and
    its schedule, and the run's length. Everything else may change on resume (see the README)."""
    return {"seed": args.seed, "batch_size": args.batch_size, "batching": args.batching,
            "block_size": args.block_size, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
            "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "max_steps": args.max_steps,
            "epochs": None if args.max_steps else args.epochs}


def dataset_fingerprint(lengths):
    """The training split as far as the data order sees it: how many examples, and their lengths."""
    return {"examples": int(len(lengths)),
            "lengths_sha256": hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()}


class Checkpointer:
    """The run folder's checkpoints for one training run: resume, save every `--save-every` steps or on a stop
    signal, keep the last `--keep-last`. Made before the model is loaded, so a bad folder, a corrupt checkpoint
    or a flag that differs from the checkpoint's fails fast."""

    def __init__(self, args, backend, script_name):
        self.save_dir, self.save_every, self.keep_last = args.save_model_dir, args.save_every, args.keep_last
        self.backend, self.script_name = backend, script_name
        self.run_settings = fixed_settings(args)
        # A LoRA checkpoint holds adapters of one shape and no base: resume only into the same adapters.
        adapters = lora.settings(args)
        self.run_settings["adapters"] = adapters.record() if adapters else None
        self.step = self.epoch = 0
        save_dir = args.save_model_dir
        if os.path.exists(save_dir) and not os.path.isdir(save_dir):
            raise SystemExit(f"error: --save-model-dir {save_dir!r} exists and is not a folder")
        # One run per folder: rank 0 holds the lock, and every rank hears if it could not get it.
        problem = None
        if backend.is_main:
            try:
                _create_run_dir(save_dir)
                problem = lock_run_dir(save_dir)
            except SystemExit as exc:
                problem = str(exc.code)
        problem = backend.all_gather(problem)[0]
        if problem:
            raise SystemExit(problem)
        newest = check_save_dir(save_dir, args.resume, args.overwrite, args.resume_if_possible)
        self.resume_from = newest and self._verified(newest, fall_back=args.resume_if_possible)
        if self.resume_from:
            check_same_run(self.resume_from, read_trainer_state(self.resume_from), self.run_settings)
        self.stop = StopRequest(save_dir)

    def _verified(self, newest, fall_back):
        """`newest` if its files match their checksums; with --resume-if-possible the newest one that does."""
        candidates = list_checkpoints(self.save_dir)[::-1] if fall_back else [newest]
        for path in candidates:
            problem = verify_checkpoint(path, self.backend)
            if problem is None:
                return path
            message = f"checkpoint {path!r} is corrupt: {problem}"
            if not fall_back:
                raise SystemExit(f"error: {message}; nothing was deleted (--resume-if-possible falls back to the "
                                 f"newest checkpoint that verifies)")
            if self.backend.is_main:
                print(f"warning: {message}; trying an older one", flush=True)
        raise SystemExit(f"error: no checkpoint in {self.save_dir!r} matches its checksums; nothing was deleted")

    def start(self, model, optimizer, scheduler, run_plan):
        """Restore the newest checkpoint (when resuming) or start a fresh run folder; returns the step reached."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_settings["dataset"] = dataset_fingerprint(run_plan.lengths)
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler, self.backend,
                                    dict(self.run_settings, epoch=0))
            self.step, self.epoch = state["step"], state.get("epoch", 0)
            if self.backend.is_main:
                truncate_metrics(self.save_dir, self.step)
                print(f"resumed from {self.resume_from} at step {self.step}", flush=True)
                if self.step >= run_plan.total_steps:
                    print(f"nothing to train: the run's {run_plan.total_steps} steps are done; writing the final "
                          f"model", flush=True)
        self.backend.barrier()
        if self.backend.is_main and not self.resume_from:
            start_run_dir(self.save_dir, self.script_name)
        self.backend.barrier()
        return self.step

    def after_step(self, step, epoch, model, optimizer, scheduler):
        """Save when due or when any rank got a stop signal; True means stop now (the checkpoint is written)."""
        self.step, self.epoch = step, epoch
        stopping = self.backend.any_rank(self.stop.requested())
        if not (stopping or (self.save_every and step % self.save_every == 0)):
            return False
        path = self._save()
        if stopping and self.backend.is_main:
            tqdm.write(f"stopped by {self.stop.signal_name or 'a signal'} after step {step}; checkpoint {path} "
                       f"written. Continue with the same command plus --resume.")
        return stopping

    def _save(self):
        return save_checkpoint(self.save_dir, self.step, self.model, self.optimizer, self.scheduler,
                               dict(self.run_settings, epoch=self.epoch), self.backend, self.keep_last)

    @contextlib.contextmanager
    def final_save(self):
        """Around the final save: when it fails, a checkpoint of the last step is left (written now if there is
        none), so that `--resume` writes the model once the cause is fixed; the error line says which."""
        try:
            yield
        except SystemExit as exc:
            last = os.path.join(self.save_dir, "checkpoints", f"step-{self.step:08d}")
            if not os.path.isdir(last):
                with contextlib.suppress(SystemExit):  # the same disk may refuse a checkpoint too
                    self._save()
            if os.path.isdir(last):
                note = (f"checkpoint {last} holds the finished run: fix the cause and run the same command with "
                        f"--resume to write the model")
            else:
                note = newest_checkpoint_note(self.save_dir)
            raise SystemExit(f"{exc.code}; {note}" if isinstance(exc.code, str) else exc.code) from None


def _usual_file_modes(folder):
    """Weights are written through private temporary files (mode 0600); give them the mode of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def _move_into_place(staging, save_dir):
    """Move the finished files from `staging` into `save_dir`, weights last and their index after them: until
    the last rename the folder holds no weights that could pass for the finished model."""
    def order(name):
        weights = name.startswith("model") and ".safetensors" in name
        return (weights, name.endswith(".index.json"), name)
    for name in sorted(os.listdir(staging), key=order):
        target = os.path.join(save_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
    _fsync_dir(save_dir)


def save_final_model(model, tokenizer, backend, save_dir, plan):
    """The finished model as `save_pretrained` (safetensors) plus its tokenizer and the parallel plan (rank 0),
    written to a temporary folder and moved into place. With LoRA: the adapter in `adapter/` and, as the model,
    the adapter merged into the base. Raises SystemExit with one line, on every rank, if it could not be written."""
    from finetune.parallel import full_state_dict_on_rank0

    adapters = lora.is_lora(model)
    state_dict = full_state_dict_on_rank0(model, backend, trainable_only=adapters)
    problem = None
    if backend.is_main:
        staging = os.path.join(save_dir, FINAL_STAGING)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            if adapters:
                lora.save_adapter_and_merged(model, state_dict, staging)
                _usual_file_modes(os.path.join(staging, lora.ADAPTER_DIR))
            else:
                model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            with open(os.path.join(staging, "parallel_plan.json"), "w") as f:
                json.dump(plan, f, indent=2)
            _usual_file_modes(staging)
            _move_into_place(staging, save_dir)
        except (OSError, SafetensorError) as exc:
            problem = f"error: could not save the final model to {save_dir!r} ({describe_error(exc)})"
            shutil.rmtree(staging, ignore_errors=True)
    problem = backend.all_gather(problem)[0]
    if problem:
        raise SystemExit(problem)
    if backend.is_main:
        print(f"saved model and tokenizer to {save_dir}", flush=True)
