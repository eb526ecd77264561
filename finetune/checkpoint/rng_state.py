"""Every RNG state of a rank as plain JSON (Python, NumPy, torch, this process's own CUDA device), for a
checkpoint's rng_rank<r>.json: nothing of it needs unpickling to load."""
import json
import os
import random

import numpy as np
import torch

from finetune.errors import FinetuneError


def _hex(byte_tensor):
    return byte_tensor.numpy().tobytes().hex()


def _byte_tensor(text):
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


def rng_state() -> dict:
    """Every RNG state of this process as plain JSON values (torch's states as hex)."""
    _, python_words, python_gauss = random.getstate()
    _, numpy_words, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {"python": list(python_words), "python_gauss": python_gauss,
            "numpy": numpy_words.tolist(), "numpy_pos": int(numpy_pos),
            "numpy_gauss": [int(numpy_has_gauss), float(numpy_gauss)],
            "torch": _hex(torch.get_rng_state()),
            # This process's own device only: a resume with fewer GPUs per node must still find its state.
            "cuda": [_hex(torch.cuda.get_rng_state())] if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Set this process's RNGs from `rng_state()`'s JSON values."""
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"][0]))  # this process's own device's


def rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rng_rank{rank}.json")


def restore_rng(path: str) -> None:
    """Set this process's RNGs from the file `path`; anything unusable in it is one error line naming it."""
    try:
        with open(path) as f:
            set_rng_state(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as exc:
        raise FinetuneError(f"checkpoint file {path!r} is corrupt: not the RNG state it should hold "
                            f"({exc.__class__.__name__}); nothing was deleted") from None
