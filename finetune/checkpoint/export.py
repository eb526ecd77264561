"""The final export: the finished model (with LoRA: the adapter and the merged model), its tokenizer and the
parallel plan, written to a staging folder and moved into `--save-model-dir`."""
import contextlib
import json
import os

import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from finetune.checkpoint import save_dtype
from finetune.checkpoint.run_folder import FINAL_STAGING, describe_error, fsync_dir, remove_path
from finetune.distributed.backend import Backend
from finetune.distributed.sharding import full_state_dict_on_rank0, without_tied_copies
from finetune.errors import FinetuneError
from finetune.model import lora


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
    fsync_dir(save_dir)


def save_final_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, backend: Backend, save_dir: str,
                     plan: dict) -> None:
    """The finished model as `save_pretrained` (safetensors) plus its tokenizer and the parallel plan (rank 0),
    written to a temporary folder and moved into place. With LoRA: the adapter in `adapter/` and, as the model,
    the adapter merged into the base. Raises a FinetuneError, on every rank, if it could not be written."""
    adapters = lora.is_lora(model)
    dtype = save_dtype.dtype_of(plan)  # None: no weights (--save-dtype none); LoRA merges in its base's dtype
    state_dict = None
    if dtype is not None:
        state_dict = (full_state_dict_on_rank0(model, backend, trainable_only=True) if adapters else
                      without_tied_copies(model, save_dtype.gathered_state_dict(model, backend.is_main, dtype)))
    backend.on_rank0(lambda: _write_final_files(model, state_dict, tokenizer, save_dir, plan, adapters, dtype))
    if backend.is_main:
        print(f"saved model and tokenizer to {save_dir}", flush=True)


def _write_final_files(model, state_dict, tokenizer, save_dir, plan, adapters, dtype):
    """Rank 0's part of save_final_model: write into the staging folder, then move the files into place."""
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
            save_dtype.record_saved_dtype(staging, dtype)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "parallel_plan.json"), "w") as f:
            json.dump(plan, f, indent=2)
        _usual_file_modes(staging)
        _move_into_place(staging, save_dir)
    except (OSError, SafetensorError) as exc:
        path = getattr(exc, "filename", None) or save_dir
        with contextlib.suppress(OSError):  # the error below is what matters
            remove_path(staging)
        raise FinetuneError(f"could not save the final model to {path!r} ({describe_error(exc)})") from None
