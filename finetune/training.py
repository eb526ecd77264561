"""Pieces of the training loop that are the same for every model: the schedule, clipping, the non-finite
guard and the validation pass. The loop itself stays in the training scripts."""
import inspect
import math
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from finetune.checkpoint.run_folder import list_checkpoints
from finetune.data.batches import BatchFormat, TokenTable, collate_rows, move_to
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.ops.chunked_loss import IGNORE_INDEX


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (every device): weight init of new layers, dropout, sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                           min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr_ratio` of the peak."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` and return the total norm as a plain tensor (gathered across shards under FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """Keeps a non-finite loss or gradient from reaching the weights; stops the run after `allowed` skips."""

    def __init__(self, allowed: int, save_dir: str, backend: Backend) -> None:
        self.allowed, self.save_dir, self.backend = allowed, save_dir, backend
        self.skipped = 0

    def update_is_finite(self, step_loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """True when the update of `step` may be applied (on every rank alike). The one host sync of a step."""
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
        if not self.backend.any_rank(not finite):
            return True
        self.skipped += 1
        if self.skipped > self.allowed:
            last = list_checkpoints(self.save_dir)
            kept = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise FinetuneError(f"non-finite loss or gradient norm at step {step}{kept}")
        if self.backend.is_main:
            tqdm.write(f"warning: skipped the update of step {step}: non-finite loss or gradient norm")
        return False


class Validation:
    """One pass over the whole validation split, every rank taking its share of the rows, measuring with its own
    plain cross-entropy whatever the training loss is: `val_loss` (token-weighted), `val_accuracy` (share of
    target tokens whose most likely next token is the target) and `val_<name>` for each figure `metrics` adds.

    `forward` is the script's: validation passes it a `token_loss` of its own, which sees each chunk's logits.
    `metrics(logits, targets, batch, positions)` returns {name: (sum, count)} for one chunk; the figure is the
    split's total sum over its total count.
    """

    def __init__(self, table: TokenTable | None, rows: list, forward: Callable, backend: Backend,
                 batch_format: BatchFormat, every: int | None = None, metrics: Callable | None = None) -> None:
        if "token_loss" not in inspect.signature(forward).parameters:
            raise FinetuneError("forward() must take a token_loss argument and pass it on to the model: validation "
                                "measures through it (docs/customising.md)")
        self.table, self.rows, self.forward, self.backend = table, rows, forward, backend
        self.format, self.every, self.metrics = batch_format, every, metrics

    def due(self, step: int, epoch_end: bool) -> bool:
        return bool(self.rows) and (epoch_end or bool(self.every and step % self.every == 0))

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """{"val_loss": ..., "val_accuracy": ..., "val_<name>": ...} over the split (every rank calls this)."""
        backend, device, micro = self.backend, self.backend.device, self.format.micro_batch_size
        sums: dict[str, torch.Tensor] = {}  # name: (sum, count) as a 2-vector, in the order first met
        weight, calls = 1.0, [0]

        def add(name, total, count):
            pair = torch.stack([torch.as_tensor(total, device=device).float().sum(),
                                torch.as_tensor(count, device=device).float().sum()])
            sums[name] = sums[name] + weight * pair if name in sums else weight * pair

        def measure(logits, targets, batch, positions):
            calls[0] += 1
            counted = targets != IGNORE_INDEX
            losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
            add("loss", losses.sum(), counted.sum())
            add("accuracy", ((logits.argmax(dim=-1) == targets) & counted).sum(), counted.sum())
            for name, (total, count) in (self.metrics(logits, targets, batch, positions) if self.metrics
                                         else {}).items():
                if name in ("loss", "accuracy"):
                    raise FinetuneError(f"validation_metrics: {name!r} is built in; give the figure another name")
                add(name, total, count)
            return losses

        model.eval()
        chunk = backend.world_size * micro
        with torch.no_grad():
            for start in range(0, len(self.rows), chunk):
                mine = self.rows[start:start + chunk][backend.rank * micro:(backend.rank + 1) * micro]
                weight = 1.0 if mine else 0.0  # a rank with no rows left still joins the sharded forward
                batch = move_to(collate_rows(self.table, mine or self.rows[:1], self.format.pad_id,
                                             self.format.pad_to), device)
                before = calls[0]
                with backend.autocast():
                    self.forward(model, batch, num_items_in_batch=1, token_loss=measure)
                if calls[0] == before:
                    raise FinetuneError("forward() did not pass token_loss on to the model (model(..., labels=..., "
                                        "token_loss=...)), so validation could not measure; see "
                                        "docs/customising.md")
        model.train()
        names = list(sums)
        totals = backend.all_reduce_sum(torch.stack([sums[name] for name in names]))
        return {f"val_{name}": (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}

    def loss(self, model: torch.nn.Module) -> float:
        """The validation loss alone (the same pass as `run`)."""
        return self.run(model)["val_loss"]
