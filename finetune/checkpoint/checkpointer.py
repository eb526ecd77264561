"""Resumable checkpoints that survive preemption: written atomically, found again with `--resume`.

Inside `--save-model-dir` (the run folder: finetune/checkpoint/run_folder.py):
  checkpoints/step-00000040/    complete checkpoints only:
      .metadata, __<r>_0.distcp     PyTorch distributed checkpoint (DCP) of tensors only: each rank writes its
                                    shard of model (frozen weights too) and optimiser state (with LoRA only the
                                    adapters and their optimiser state)
      trainer_state.json            step, epoch, the run's fixed flags, the model's fingerprint, the LR schedule,
                                    `what_ran` (finetune/checkpoint/run_record.py) and `non_tensor_state`: every
                                    non-tensor part of the model and optimiser state (the param_groups), as JSON
      rng_rank<r>.json              each rank's Python, NumPy, torch and CUDA RNG states, as JSON
      checksums.sha256              SHA-256 of every file of the checkpoint (finetune/checkpoint/checksums.py)
  checkpoints/step-00000050.partial/   a checkpoint being written; ignored on resume

Loading a checkpoint runs no code from it: the only pickles read are DCP's `.metadata`, through an unpickler
that builds nothing but DCP's metadata classes, and DCP's tensors, through `torch.load(weights_only=True)`; see
finetune/safe_reader.py. Checkpoints of earlier versions, which pickled the optimiser's settings inside DCP
and the RNG states in rng_rank<r>.pt, are refused.

A checkpoint becomes visible by one rename, after every rank has finished writing, so a job killed in the
middle of a save leaves the previous checkpoint as the newest complete one; its checksums are checked before it
is resumed. `Checkpointer` is what the training scripts use: it locks and checks the folder, resumes or starts
the run, and saves when due or when a stop signal (finetune/checkpoint/signals.py) came.
"""
import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from finetune.checkpoint import run_record, safe_reader
from finetune.checkpoint.checksums import CHECKSUMS, verify_checkpoint, write_checksums
from finetune.checkpoint.rng_state import restore_rng, rng_file, rng_state
from finetune.checkpoint.run_folder import (
    check_save_dir,
    claim_run_dir,
    describe_error,
    fsync_dir,
    keep_run_config,
    list_checkpoints,
    newest_checkpoint_note,
    remove_path,
    start_run_dir,
    truncate_metrics,
    writing,
)
from finetune.checkpoint.signals import StopRequest
from finetune.config import RUN_CONFIG_FILE, RunConfig, write_run_config
from finetune.data.batches import StepRows
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.model import lora

# ----------------------------------------------------------------------------------------------------------
# Tensors go to DCP, everything else to JSON: nothing of a checkpoint needs unpickling to load
# ----------------------------------------------------------------------------------------------------------

def split_tensors(state: dict) -> tuple[dict, dict]:
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


def merge_state(tensors: dict, rest: dict) -> dict:
    """The nested dict that `split_tensors` split into `tensors` and `rest`."""
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = merge_state(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def save_checkpoint(save_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, trainer_state: dict, backend: Backend, keep_last: int) -> str:
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
            json.dump(rng_state(), f)
        backend.barrier()
        if backend.is_main:
            state = dict(trainer_state, step=step, world_size=backend.world_size, model=run_record.model_fingerprint(model),
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
            fsync_dir(root)  # the rename itself must survive a power loss
            for old in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
                remove_path(old)
        backend.barrier()
    except (OSError, CheckpointException) as exc:
        if backend.is_main:  # leave no half-written checkpoint taking up space; the error below says what failed
            with contextlib.suppress(OSError):
                remove_path(partial)
        previous = [c for c in list_checkpoints(save_dir) if c != final]
        kept = f"the previous checkpoint {previous[-1]!r} is intact" if previous else "no earlier checkpoint exists"
        raise FinetuneError(f"could not write the checkpoint for step {step} in {partial!r} "
                            f"({describe_error(exc)}); {kept}") from None
    return final


def _trained_state(model, optimizer):
    """(model state, optimiser state). Full fine-tuning: every weight, frozen ones too, so that a resume whose
    script froze weights that had trained restores them. LoRA: what trains (the adapters); a frozen or 4-bit base,
    and its quantisation constants, are left to the model files."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    adapters = lora.is_lora(model)
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(ignore_frozen_params=adapters))
    if not adapters:
        return model_state, optim_state
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


def read_trainer_state(path: str) -> dict:
    """trainer_state.json of the checkpoint `path`, which is refused unless this version can resume it safely."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"checkpoint {path!r} is unreadable ({exc.__class__.__name__}); "
                            f"nothing was deleted") from None
    if not isinstance(state.get("non_tensor_state"), dict):
        raise FinetuneError(f"checkpoint {path!r} was not written by this version of these scripts (its "
                            f"trainer_state.json lacks non_tensor_state); start over with --overwrite (nothing "
                            f"was deleted)")
    return state


MISSING = object()
# Flags that only set the optimiser and its schedule: --resume-changed may change them, as it may the code
CHANGEABLE = ("lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "max_grad_norm")


def check_same_run(path: str, state: dict, settings: dict, accept_changes: bool = False) -> list[str]:
    """A resumed run is the same run: refuse any flag that differs from the one the checkpoint was written with
    (the data order, the optimiser and its schedule, the run's length). With `accept_changes` (--resume-changed)
    the optimiser's and schedule's flags may differ: returns those differences."""
    accepted = []
    for key, value in settings.items():
        if key == "epoch" or state.get(key, MISSING) == value:
            continue
        if key not in state:
            raise FinetuneError(f"checkpoint {path!r} does not record {key!r}: it was not written by this version "
                                f"of these scripts; start over with --overwrite (nothing was deleted)")
        if key == "dataset":
            raise FinetuneError(f"--dataset-name-or-path: the training split differs from the one of the run "
                                f"being resumed ({path}); resume with the same data. Nothing was deleted")
        if key == "adapters":
            _check_same_adapters(path, state[key], value)
            continue
        then, now = ("not given" if v is None else v for v in (state[key], value))
        flag = "--" + key.replace("_", "-")
        if key in CHANGEABLE and accept_changes:
            accepted.append(f"{flag} {now} now, {then} then")
            continue
        advice = (", or add --resume-changed to continue it with the new value" if key in CHANGEABLE else
                  " (see docs/resume.md)")
        raise FinetuneError(f"{flag} {now} differs from the run being resumed ({flag} {then}, {path}); a resumed "
                            f"run keeps the flags it started with{advice}. Nothing was deleted")
    return accepted


def _check_same_adapters(path, saved, record):
    """LoRA checkpoints hold adapters of one shape, scale and dropout, and no base: refuse other adapter flags."""
    mismatch = lora.resume_mismatch(saved, record)
    if mismatch:
        flag, then, now = mismatch
        raise FinetuneError(f"{flag} differs from the run being resumed ({path}): it has {lora.describe(then)}, "
                            f"this run {lora.describe(now)}; resume with the same adapter flags. Nothing was deleted")


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    backend: Backend, expected_state: dict | None = None, record: dict | None = None,
                    accept_changes: bool = False) -> dict:
    """Restore model, optimiser, schedule and RNG from `path`; returns its trainer state, with `changes`: the
    differences --resume-changed accepted.

    `expected_state` holds the flags the run must share with the checkpoint (`check_same_run`), `record` what
    the run is (run_record.describe): a difference refuses the resume unless `accept_changes`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = read_trainer_state(path)
    changes = check_same_run(path, state, expected_state or {}, accept_changes)
    if state.get("model") != run_record.model_fingerprint(model):
        raise FinetuneError(f"checkpoint {path!r} was written for another model "
                            f"({state.get('model')}); nothing was deleted")
    if record is not None:
        if not isinstance(state.get("what_ran"), dict):
            raise FinetuneError(f"checkpoint {path!r} does not record its optimiser, schedule and trainable "
                                f"parameters: it was not written by this version of these scripts; start over with "
                                f"--overwrite (nothing was deleted)")
        found = run_record.differences(state["what_ran"], record)
        if found and not accept_changes:
            raise FinetuneError(run_record.refusal(path, found))
        changes += found
    if not os.path.isfile(os.path.join(path, ".metadata")):  # DCP would print tracebacks while looking for it
        raise FinetuneError(f"checkpoint {path!r} is corrupt or incomplete (no .metadata); nothing was deleted")
    keep_optimizer = not changes or record is None or run_record.same_optimizer_layout(state["what_ran"], record)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if keep_optimizer:
        tensors = _split_trained_state(model, optimizer)[0]
    else:
        tensors = {"model": _saved_model_state(model, path)}
    _load_tensors(path, tensors)
    try:
        restored = merge_state(tensors, state["non_tensor_state"])
        if keep_optimizer:  # only what was saved is loaded; with LoRA the frozen base came from the model files
            set_state_dict(model, optimizer, model_state_dict=restored["model"],
                           optim_state_dict=restored["optimizer"],
                           options=StateDictOptions(ignore_frozen_params=lora.is_lora(model), strict=False))
        else:  # another optimiser layout: its state starts afresh; every saved weight is restored, frozen or not
            set_model_state_dict(model, restored["model"],
                                 options=StateDictOptions(ignore_frozen_params=False, strict=False))
        if changes:  # this run's code decides the rates: its own settings, its schedule at the resumed step
            for group, values in zip(optimizer.param_groups, settings, strict=True):
                group.update(values)
            run_record.fast_forward(scheduler, state["step"])
        else:
            scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise FinetuneError(f"checkpoint {path!r} is corrupt: its trainer_state.json does not fit this run's "
                            f"optimiser or schedule ({exc.__class__.__name__}); nothing was deleted") from None
    if os.path.isfile(rng_file(path, backend.rank)):  # absent when resuming on more ranks than wrote the checkpoint
        restore_rng(rng_file(path, backend.rank))
    return dict(state, changes=changes, optimizer_kept=keep_optimizer)


def _saved_model_state(model, path):
    """This model's tensors that the checkpoint holds, frozen ones included: after a change of what trains, every
    weight the run being resumed trained is restored."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    saved = safe_reader.tensor_names(path)
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=False))
    return {name: tensor for name, tensor in state.items() if f"model.{name}" in saved}


def _load_tensors(path, tensors):
    try:
        with _quiet_checkpoint_library():
            safe_reader.load_tensors(tensors, path)
    except safe_reader.UnsafeCheckpoint as exc:
        raise FinetuneError(f"{exc}; nothing was deleted") from None
    # DCP wraps storage and format errors in several exception types; its CheckpointException is a BaseException.
    except (Exception, CheckpointException) as exc:
        raise FinetuneError(f"checkpoint {path!r} is corrupt or incomplete ({exc.__class__.__name__}); "
                            f"nothing was deleted") from None


# ----------------------------------------------------------------------------------------------------------
# What the training scripts call
# ----------------------------------------------------------------------------------------------------------

class Checkpointer:
    """The run folder's checkpoints for one training run: resume, save every `--save-every` steps or on a stop
    signal, keep the last `--keep-last`. Made before the model is loaded, so a bad folder, a corrupt checkpoint
    or a flag that differs from the checkpoint's fails fast."""

    def __init__(self, config: RunConfig, backend: Backend, script_name: str) -> None:
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
            raise FinetuneError(f"--save-model-dir {save_dir!r} exists and is not a folder")
        # One run per folder: rank 0 holds the lock, and every rank hears if it could not get it.
        backend.on_rank0(lambda: claim_run_dir(save_dir))
        newest = check_save_dir(save_dir, section.resume, section.overwrite, section.resume_if_possible)
        self.resume_from = newest and self._verified(newest, fall_back=section.resume_if_possible)
        self.accept_changes = section.resume_changed  # --resume-changed: the code or flags changed on purpose
        if self.resume_from:
            check_same_run(self.resume_from, read_trainer_state(self.resume_from), self.run_settings,
                           self.accept_changes)
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
                raise FinetuneError(f"{message}; nothing was deleted (--resume-if-possible falls back to the "
                                    f"newest checkpoint that verifies)")
            if self.backend.is_main:
                print(f"warning: {message}; trying an older one", flush=True)
        raise FinetuneError(f"no checkpoint in {self.save_dir!r} matches its checksums; nothing was deleted")

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
              steps: StepRows, parallel_plan: dict | None = None, token_loss: Callable | None = None) -> int:
        """Register the states a checkpoint holds (model, optimizer, scheduler), then restore the newest
        checkpoint (when resuming) or start a fresh run folder; returns the step reached. `steps`: the run's
        data.StepRows; `token_loss`: the script's per-token loss. A resumed run must be the run the checkpoint
        continues: its optimiser and groups, schedule, trainable parameters and loss (run_record), unless
        --resume-changed. Writes run_config.json: the configuration, what the run is, the parallel plan and the
        data set's fingerprint (a resume keeps the one before it as run_config.N.json)."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_settings["dataset"] = run_record.dataset_fingerprint(steps.lengths)
        self.record = run_record.describe(model, optimizer, scheduler, steps.total_steps, token_loss)
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler, self.backend,
                                    dict(self.run_settings, epoch=0), self.record, self.accept_changes)
            self.step, self.epoch = state["step"], state.get("epoch", 0)
            if self.backend.is_main:
                truncate_metrics(self.save_dir, self.step)
                if state["changes"]:
                    kept = "kept" if state["optimizer_kept"] else "started afresh (its layout changed)"
                    print(f"note: --resume-changed: continuing with {'; '.join(state['changes'])}; the optimiser "
                          f"state is {kept}, the schedule is this run's at step {self.step}", flush=True)
                print(f"resumed from {self.resume_from} at step {self.step}", flush=True)
                if self.step >= steps.total_steps:
                    print(f"nothing to train: the run's {steps.total_steps} steps are done; writing the final "
                          f"model", flush=True)
        self.backend.barrier()
        if self.backend.is_main:
            with writing(os.path.join(self.save_dir, RUN_CONFIG_FILE), self.save_dir):
                if self.resume_from:
                    keep_run_config(self.save_dir)
                resumed = {"checkpoint": self.resume_from, "step": self.step} if self.resume_from else None
                write_run_config(self.config, {"parallel_plan": parallel_plan, "dataset": self.run_settings["dataset"],
                                               "what_ran": run_record.summary(self.record), "resumed_from": resumed})
            if not self.resume_from:
                start_run_dir(self.save_dir, self.script_name)
        self.backend.barrier()
        return self.step

    def after_step(self, step: int, epoch: int) -> bool:
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
                               dict(self.run_settings, epoch=self.epoch, what_ran=self.record), self.backend,
                               self.keep_last)

    @contextlib.contextmanager
    def final_save(self) -> Iterator[None]:
        """Around the final save: when it fails, a checkpoint of the last step is left (written now if there is
        none), so that `--resume` writes the model once the cause is fixed; the error line says which."""
        try:
            yield
        except FinetuneError as exc:
            last = os.path.join(self.save_dir, "checkpoints", f"step-{self.step:08d}")
            if not os.path.isdir(last):
                with contextlib.suppress(FinetuneError):  # the same disk may refuse a checkpoint too
                    self._save()
            if os.path.isdir(last):
                note = (f"checkpoint {last} holds the finished run: fix the cause and run the same command with "
                        f"--resume to write the model")
            else:
                note = newest_checkpoint_note(self.save_dir)
            raise FinetuneError(f"{exc}; {note}") from None


