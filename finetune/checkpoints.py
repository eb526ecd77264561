"""Resumable checkpoints that survive preemption: written atomically, found again with `--resume`.

Layout inside `--save-model-dir`:
  .finetune_run.json            marks the folder as ours (we never touch a folder without it, unless empty)
  metrics.jsonl                 one row per logged step
  checkpoints/step-00000040/    complete checkpoints only:
      .metadata, __<r>_0.distcp     PyTorch distributed checkpoint (DCP) of tensors only: each rank writes its
                                    shard of model and optimiser state (with LoRA only the adapters and their
                                    optimiser state)
      trainer_state.json            step, epoch, the run's fixed flags, the model's fingerprint, the LR schedule,
                                    and `non_tensor_state`: every non-tensor part of the model and optimiser state
                                    (the optimiser's param_groups), as JSON
      rng_rank<r>.json              each rank's Python, NumPy, torch and CUDA RNG states, as JSON
      checksums.sha256              SHA-256 of every file of the checkpoint (`sha256sum -c` format)
  checkpoints/step-00000050.partial/   a checkpoint being written; ignored on resume

Loading a checkpoint runs no code from it: the only pickles read are DCP's `.metadata`, through an unpickler
that builds nothing but DCP's metadata classes, and DCP's tensors, through `torch.load(weights_only=True)`; see
finetune/safe_checkpoint.py. Checkpoints of earlier versions, which pickled the optimiser's settings inside DCP
and the RNG states in rng_rank<r>.pt, are refused. The checksums catch damage, not tampering: whoever can write
the checkpoint can rewrite them.

A checkpoint becomes visible by one rename, after every rank has finished writing, so a job killed in the
middle of a save leaves the previous checkpoint as the newest complete one; its checksums are checked before it
is resumed. The folder is locked (flock) for the life of a run, so two runs never write into it at once.
`Checkpointer` is what the training scripts use: it locks and checks the folder, resumes or starts the run, and
saves when due or when a stop signal came. No path the run writes or deletes may be a symbolic link
(`check_no_links`), so a run never changes anything outside its folder.
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

from finetune import final_weights, lora, safe_checkpoint
from finetune.config import RUN_CONFIG_FILE, write_run_config
from finetune.errors import FinetuneError

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


def remove_path(path):
    """Delete `path` if it is there: a file, a symbolic link (the link itself, never what it points to) or a
    folder with everything in it (links inside it are removed as links). Errors are raised, never ignored."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


# What a run keeps in its folder and writes into or deletes from. A symbolic link at one of these paths would
# send those writes and deletions to wherever it points (another run's checkpoints, say).
KEPT_IN_RUN_DIR = (RUN_MARKER, "metrics.jsonl", "checkpoints", lora.ADAPTER_DIR)


def check_no_links(save_dir):
    """Refuse a run folder with a symbolic link where the run writes or deletes, naming the link."""
    paths = [os.path.join(save_dir, name) for name in KEPT_IN_RUN_DIR]
    root = os.path.join(save_dir, "checkpoints")
    if os.path.isdir(root) and not os.path.islink(root):
        paths += [os.path.join(root, name) for name in sorted(os.listdir(root))]
    for path in paths:
        if os.path.islink(path):
            raise FinetuneError(f"{path} is a symbolic link: a run never writes or deletes through links out of "
                                f"--save-model-dir, so nothing was changed; replace it with a real folder or file, "
                                f"or choose another --save-model-dir")


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
    check_no_links(save_dir)
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
        remove_path(os.path.join(save_dir, "checkpoints"))
        remove_path(os.path.join(save_dir, FINAL_STAGING))
        if os.path.isfile(os.path.join(save_dir, RUN_MARKER)):
            remove_path(os.path.join(save_dir, lora.ADAPTER_DIR))
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

def _hex(byte_tensor):
    return byte_tensor.numpy().tobytes().hex()


def _byte_tensor(text):
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


def _rng_state():
    """Every RNG state of this process as plain JSON values (torch's states as hex)."""
    _, python_words, python_gauss = random.getstate()
    _, numpy_words, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {"python": list(python_words), "python_gauss": python_gauss,
            "numpy": numpy_words.tolist(), "numpy_pos": int(numpy_pos),
            "numpy_gauss": [int(numpy_has_gauss), float(numpy_gauss)],
            "torch": _hex(torch.get_rng_state()),
            # This process's own device only: a resume with fewer GPUs per node must still find its state.
            "cuda": [_hex(torch.cuda.get_rng_state())] if torch.cuda.is_available() else []}


def _set_rng_state(state):
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if torch.cuda.is_available() and state["cuda"]:
        # Earlier checkpoints hold every visible device's state: this device's is the one at its index.
        saved = state["cuda"]
        own = saved[torch.cuda.current_device()] if len(saved) > torch.cuda.current_device() else saved[0]
        torch.cuda.set_rng_state(_byte_tensor(own))


def rng_file(folder, rank):
    return os.path.join(folder, f"rng_rank{rank}.json")


def restore_rng(path):
    """Set this process's RNGs from the file `path`; anything unusable in it is one error line naming it."""
    try:
        with open(path) as f:
            _set_rng_state(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as exc:
        raise FinetuneError(f"checkpoint file {path!r} is corrupt: not the RNG state it should hold "
                            f"({exc.__class__.__name__}); nothing was deleted") from None


# ----------------------------------------------------------------------------------------------------------
# Tensors go to DCP, everything else to JSON: nothing of a checkpoint needs unpickling to load
# ----------------------------------------------------------------------------------------------------------

def split_tensors(state):
    """(tensors, rest): the nested dict `state` as two nested dicts of its shape, one holding its tensors and
    the other every other value (the optimiser's param_groups), for DCP and JSON respectively."""
    tensors, rest = {}, {}
    for key, value in state.items():
        if isinstance(value, dict):
            tensors[key], nested = split_tensors(value)
            if nested:
                rest[key] = nested
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def merge_state(tensors, rest):
    """The nested dict that `split_tensors` split into `tensors` and `rest`."""
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = merge_state(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


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
                    remove_path(os.path.join(root, name))
            os.makedirs(partial)
        backend.barrier()
        tensors, rest = _split_trained_state(model, optimizer)
        with _quiet_checkpoint_library():
            dcp.save(tensors, checkpoint_id=partial)
        with open(rng_file(partial, backend.rank), "w") as f:
            json.dump(_rng_state(), f)
        backend.barrier()
        if backend.is_main:
            state = dict(trainer_state, step=step, world_size=backend.world_size, model=model_fingerprint(model),
                         scheduler=scheduler.state_dict(), non_tensor_state=rest, checksums=CHECKSUMS)
            with open(os.path.join(partial, "trainer_state.json"), "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
        backend.barrier()
        write_checksums(partial, backend)
        if backend.is_main:
            remove_path(final)
            os.rename(partial, final)
            _fsync_dir(root)  # the rename itself must survive a power loss
            for old in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
                remove_path(old)
        backend.barrier()
    except (OSError, CheckpointException) as exc:
        if backend.is_main:  # leave no half-written checkpoint taking up space; the error below says what failed
            with contextlib.suppress(OSError):
                remove_path(partial)
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


def _split_trained_state(model, optimizer):
    """(tensors, rest) of `_trained_state`: the tensors for DCP, the rest for trainer_state.json."""
    model_state, optim_state = _trained_state(model, optimizer)
    return split_tensors({"model": model_state, "optimizer": optim_state})


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
    """The rank that hashes a checkpoint file: the one that wrote it (DCP's __R_N.distcp, our rng_rankR.json), so
    the bytes are read where they were just written, not fetched from another node; rank 0 for the rest."""
    written = re.fullmatch(r"__(\d+)_\d+\.distcp|rng_rank(\d+)\.json", name)
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
    """trainer_state.json of the checkpoint `path`, which is refused unless this version can resume it safely."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: checkpoint {path!r} is unreadable ({exc.__class__.__name__}); nothing was deleted")
    if not isinstance(state.get("non_tensor_state"), dict):
        raise FinetuneError(f"checkpoint {path!r} was written by an earlier version of these scripts, which stored "
                            f"the optimiser's settings and the RNG states as pickles; loading those could run "
                            f"code, so it is not resumed. Start over with --overwrite (nothing was deleted)")
    return state


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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_trainer_state(path)
    check_same_run(path, state, expected_state or {})
    if state.get("model") != model_fingerprint(model):
        raise SystemExit(f"error: checkpoint {path!r} was written for another model "
                         f"({state.get('model')}); nothing was deleted")
    if not os.path.isfile(os.path.join(path, ".metadata")):  # DCP would print tracebacks while looking for it
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or incomplete (no .metadata); nothing was deleted")
    tensors, _ = _split_trained_state(model, optimizer)
    try:
        with _quiet_checkpoint_library():
            safe_checkpoint.load_tensors(tensors, path)
    except safe_checkpoint.UnsafeCheckpoint as exc:
        raise FinetuneError(f"{exc}; nothing was deleted") from None
    # DCP wraps storage and format errors in several exception types; its CheckpointException is a BaseException.
    except (Exception, CheckpointException) as exc:
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or incomplete ({exc.__class__.__name__}); "
                         f"nothing was deleted")
    try:
        restored = merge_state(tensors, state["non_tensor_state"])
        # Only what trains was saved (LoRA: the adapters); the frozen base came from the model files.
        set_state_dict(model, optimizer, model_state_dict=restored["model"], optim_state_dict=restored["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise FinetuneError(f"checkpoint {path!r} is corrupt: its trainer_state.json does not fit this run's "
                            f"optimiser or schedule ({exc.__class__.__name__}); nothing was deleted") from None
    if os.path.isfile(rng_file(path, backend.rank)):  # absent when resuming on more ranks than wrote the checkpoint
        restore_rng(rng_file(path, backend.rank))
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

def dataset_fingerprint(lengths):
    """The training split as far as the data order sees it: how many examples, and their lengths."""
    return {"examples": int(len(lengths)),
            "lengths_sha256": hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()}


class Checkpointer:
    """The run folder's checkpoints for one training run: resume, save every `--save-every` steps or on a stop
    signal, keep the last `--keep-last`. Made before the model is loaded, so a bad folder, a corrupt checkpoint
    or a flag that differs from the checkpoint's fails fast."""

    def __init__(self, config, backend, script_name):
        """`config`: the RunConfig; its checkpoint section says where and how often, and the settings it fixes
        (`fixed_on_resume`) must match those of a checkpoint it resumes."""
        section = config.checkpoint
        self.config, self.save_dir, self.save_every, self.keep_last = (config, section.save_model_dir,
                                                                      section.save_every, section.keep_last)
        self.backend, self.script_name = backend, script_name
        # The flags a resumed run must share with the run it continues: they fix the data order, the optimiser
        # and its schedule, and the run's length. A LoRA checkpoint holds adapters of one shape and no base.
        self.run_settings = dict(config.fixed_on_resume(),
                                 adapters=config.lora.record() if config.lora else None)
        self.step = self.epoch = 0
        save_dir = section.save_model_dir
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
        newest = check_save_dir(save_dir, section.resume, section.overwrite, section.resume_if_possible)
        self.resume_from = newest and self._verified(newest, fall_back=section.resume_if_possible)
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

    def start(self, model, optimizer, scheduler, steps, parallel_plan=None):
        """Register the states a checkpoint holds (model, optimizer, scheduler), then restore the newest
        checkpoint (when resuming) or start a fresh run folder; returns the step reached. `steps`: the run's
        data.StepRows. Writes run_config.json: the configuration, the parallel plan and the data set's
        fingerprint."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_settings["dataset"] = dataset_fingerprint(steps.lengths)
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler, self.backend,
                                    dict(self.run_settings, epoch=0))
            self.step, self.epoch = state["step"], state.get("epoch", 0)
            if self.backend.is_main:
                truncate_metrics(self.save_dir, self.step)
                print(f"resumed from {self.resume_from} at step {self.step}", flush=True)
                if self.step >= steps.total_steps:
                    print(f"nothing to train: the run's {steps.total_steps} steps are done; writing the final "
                          f"model", flush=True)
        self.backend.barrier()
        if self.backend.is_main:
            with writing(os.path.join(self.save_dir, RUN_CONFIG_FILE), self.save_dir):
                write_run_config(self.config, {"parallel_plan": parallel_plan,
                                               "dataset": self.run_settings["dataset"]})
            if not self.resume_from:
                start_run_dir(self.save_dir, self.script_name)
        self.backend.barrier()
        return self.step

    def after_step(self, step, epoch):
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
        source, target = os.path.join(staging, name), os.path.join(save_dir, name)
        if os.path.isdir(source):  # a folder (adapter/) cannot replace another one in one rename
            remove_path(target)
        os.replace(source, target)
    os.rmdir(staging)
    _fsync_dir(save_dir)


def save_final_model(model, tokenizer, backend, save_dir, plan):
    """The finished model as `save_pretrained` (safetensors) plus its tokenizer and the parallel plan (rank 0),
    written to a temporary folder and moved into place. With LoRA: the adapter in `adapter/` and, as the model,
    the adapter merged into the base. Raises SystemExit with one line, on every rank, if it could not be written."""
    from finetune.parallel import full_state_dict_on_rank0

    adapters = lora.is_lora(model)
    dtype = final_weights.dtype_of(plan)  # None: no weights (--save-dtype none); LoRA merges in its base's dtype
    state_dict = None
    if dtype is not None:
        state_dict = (full_state_dict_on_rank0(model, backend, trainable_only=True) if adapters
                      else final_weights.gathered_state_dict(model, backend.is_main, dtype))
    problem = None
    if backend.is_main:
        staging = os.path.join(save_dir, FINAL_STAGING)
        try:
            remove_path(staging)  # left by an earlier save; a link there is removed, not followed
            if dtype is None:
                os.makedirs(staging)
            elif adapters:
                lora.save_adapter_and_merged(model, state_dict, staging)
                _usual_file_modes(os.path.join(staging, lora.ADAPTER_DIR))
            else:
                model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
                final_weights.record_saved_dtype(staging, dtype)
            tokenizer.save_pretrained(staging)
            with open(os.path.join(staging, "parallel_plan.json"), "w") as f:
                json.dump(plan, f, indent=2)
            _usual_file_modes(staging)
            _move_into_place(staging, save_dir)
        except (OSError, SafetensorError) as exc:
            path = getattr(exc, "filename", None) or save_dir
            problem = f"error: could not save the final model to {path!r} ({describe_error(exc)})"
            with contextlib.suppress(OSError):  # the error above is what matters
                remove_path(staging)
    problem = backend.all_gather(problem)[0]
    if problem:
        raise SystemExit(problem)
    if backend.is_main:
        print(f"saved model and tokenizer to {save_dir}", flush=True)
