"""Resumable checkpoints that survive preemption: written atomically, found again with `--resume`.

Layout inside `--save-model-dir`:
  .finetune_run.json            marks the folder as ours (we never touch a folder without it, unless empty)
  metrics.jsonl                 one row per logged step
  checkpoints/step-00000040/    complete checkpoints only: PyTorch distributed checkpoint (each rank writes
                                its shard of model and optimiser; with LoRA only the adapters and their
                                optimiser state), trainer_state.json, rng_rank<r>.pt
  checkpoints/step-00000050.partial/   a checkpoint being written; ignored on resume

A checkpoint becomes visible by one rename, after every rank has finished writing, so a job killed in the
middle of a save leaves the previous checkpoint as the newest complete one. `Checkpointer` is what the training
scripts use: it checks the folder, resumes or starts the run, and saves when due or when a stop signal came.
"""
import json
import os
import random
import re
import shutil
import signal
import threading

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from finetune import lora

RUN_MARKER = ".finetune_run.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


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
    shutil.rmtree(os.path.join(save_dir, "checkpoints"), ignore_errors=True)
    if os.path.isfile(os.path.join(save_dir, RUN_MARKER)):
        shutil.rmtree(os.path.join(save_dir, lora.ADAPTER_DIR), ignore_errors=True)
        for name in os.listdir(save_dir):
            if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
                os.remove(os.path.join(save_dir, name))
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, RUN_MARKER), "w") as f:
        json.dump({"written_by": script_name}, f)
    open(os.path.join(save_dir, "metrics.jsonl"), "w").close()


def truncate_metrics(save_dir, last_step):
    """Drop metric rows logged after `last_step` (by a run that died before its next checkpoint)."""
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
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
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=partial)
        torch.save(_rng_state(), os.path.join(partial, f"rng_rank{backend.rank}.pt"))
        backend.barrier()
        if backend.is_main:
            state = dict(trainer_state, step=step, world_size=backend.world_size,
                         model=model_fingerprint(model), scheduler=scheduler.state_dict())
            with open(os.path.join(partial, "trainer_state.json"), "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(root)  # the rename itself must survive a power loss
            for old in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        backend.barrier()
    except (OSError, CheckpointException) as exc:
        previous = [c for c in list_checkpoints(save_dir) if c != final]
        kept = f"the previous checkpoint {previous[-1]!r} is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise SystemExit(f"error: could not write the checkpoint for step {step} ({reason}); {kept}")
    return final


def _trained_state(model, optimizer):
    """(model state, optimiser state) of what trains: every weight in full fine-tuning, only the adapters with
    LoRA (a frozen or 4-bit base, and its quantisation constants, are left to the model files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    keep = {name for name, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model_state.items() if k in keep}, optim_state


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, model, optimizer, scheduler, backend, expected_state=None):
    """Restore model, optimiser, schedule and RNG from `path`; returns its trainer state.

    `expected_state` holds the settings that decide the data order (seed, batch size, batching): a resumed run
    must use the same ones, or it would replay a different order.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: checkpoint {path!r} is unreadable ({exc.__class__.__name__}); nothing was deleted")
    for key, value in (expected_state or {}).items():
        if key != "epoch" and state.get(key) != value:
            raise SystemExit(f"error: checkpoint {path!r} was written with {key} {state.get(key)!r}, this run has "
                             f"{value!r}; resume with the same settings. Nothing was deleted")
    if state.get("model") != model_fingerprint(model):
        raise SystemExit(f"error: checkpoint {path!r} was written for another model "
                         f"({state.get('model')}); nothing was deleted")
    if not os.path.isfile(os.path.join(path, ".metadata")):  # DCP would print tracebacks while looking for it
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or incomplete (no .metadata); nothing was deleted")
    model_state, optim_state = _trained_state(model, optimizer)
    try:
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
    """Set by SIGTERM/SIGINT (what schedulers send before a kill); the loop checks it after each step."""

    def __init__(self):
        self.event = threading.Event()
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def requested(self):
        return self.event.is_set()


# ----------------------------------------------------------------------------------------------------------
# What the training scripts call
# ----------------------------------------------------------------------------------------------------------

class Checkpointer:
    """The run folder's checkpoints for one training run: resume, save every `--save-every` steps or on a stop
    signal, keep the last `--keep-last`. Made before the model is loaded, so a bad folder fails fast."""

    def __init__(self, args, backend, script_name):
        self.save_dir, self.save_every, self.keep_last = args.save_model_dir, args.save_every, args.keep_last
        self.backend, self.script_name = backend, script_name
        # Settings that fix the data order: a resumed run must use the same ones.
        self.run_settings = {"seed": args.seed, "batch_size": args.batch_size, "batching": args.batching,
                             "block_size": args.block_size}
        # A LoRA checkpoint holds adapters of one shape and no base: resume only into the same adapters.
        adapters = lora.settings(args)
        self.run_settings["adapters"] = adapters.describe() if adapters else None
        self.resume_from = check_save_dir(args.save_model_dir, args.resume, args.overwrite, args.resume_if_possible)
        self.stop = StopRequest()

    def start(self, model, optimizer, scheduler):
        """Restore the newest checkpoint (when resuming) or start a fresh run folder; returns the step reached."""
        step = 0
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler, self.backend,
                                    dict(self.run_settings, epoch=0))
            step = state["step"]
            if self.backend.is_main:
                truncate_metrics(self.save_dir, step)
                print(f"resumed from {self.resume_from} at step {step}", flush=True)
        self.backend.barrier()
        if self.backend.is_main and not self.resume_from:
            start_run_dir(self.save_dir, self.script_name)
        self.backend.barrier()
        return step

    def after_step(self, step, epoch, model, optimizer, scheduler):
        """Save when due or when any rank got a stop signal; True means stop now (the checkpoint is written)."""
        stopping = self.backend.any_rank(self.stop.requested())
        if not (stopping or (self.save_every and step % self.save_every == 0)):
            return False
        path = save_checkpoint(self.save_dir, step, model, optimizer, scheduler, dict(self.run_settings, epoch=epoch),
                               self.backend, self.keep_last)
        if stopping and self.backend.is_main:
            tqdm.write(f"stopped by {self.stop.signal_name or 'a signal'} after step {step}; checkpoint {path} "
                       f"written. Continue with the same command plus --resume.")
        return stopping


def _usual_file_modes(folder):
    """Weights are written through private temporary files (mode 0600); give them the mode of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def save_final_model(model, tokenizer, backend, save_dir, plan):
    """The finished model as `save_pretrained` (safetensors) plus its tokenizer and the parallel plan (rank 0).
    With LoRA: the adapter in `adapter/` and, as the model, the adapter merged into the base."""
    from finetune.parallel import full_state_dict_on_rank0

    adapters = lora.is_lora(model)
    state_dict = full_state_dict_on_rank0(model, backend, trainable_only=adapters)
    if backend.is_main:
        try:
            if adapters:
                lora.save_adapter_and_merged(model, state_dict, save_dir)
            else:
                model.save_pretrained(save_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(save_dir)
            with open(os.path.join(save_dir, "parallel_plan.json"), "w") as f:
                json.dump(plan, f, indent=2)
            _usual_file_modes(save_dir)
            if adapters:
                _usual_file_modes(os.path.join(save_dir, lora.ADAPTER_DIR))
        except OSError as exc:
            raise SystemExit(f"error: could not save the model to {save_dir!r} ({exc.strerror or exc})")
        print(f"saved model and tokenizer to {save_dir}", flush=True)
    backend.barrier()
