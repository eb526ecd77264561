"""Data helpers for the training scripts: load a prepared dataset, plan batches, build masks and labels, loaders.

A prepared dataset (see prepare_dataset.py) holds one tokenised example per row: `input_ids`, and `labels`
with -100 where no loss is taken. Everything here works from each example's true length, never from a pad
id, so a real token that happens to share the pad id is never masked.

Batching modes (one optimiser step = `batch_size` rows of at most `block_size` tokens):
  packed       several examples per row, each whole (finetune/data/packing.py); attention never crosses examples.
  longest      one example per row, each micro-batch padded to its longest row.
  block        one example per row, padded to `block_size` (the tutorial's batching).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.data.packing import pack_examples
from finetune.errors import FinetuneError
from finetune.ops.example_spans import ExampleSpans

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from finetune.config import DataConfig, ModelConfig, TrainingConfig
    from finetune.distributed.backend import Backend

IGNORE_INDEX = -100
BATCHING_MODES = ("packed", "longest", "block")


def load_prepared_dataset(path: str) -> DatasetDict:
    """The DatasetDict written by prepare_dataset.py, with a one-line error for anything else."""
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise FinetuneError(f"dataset folder {path!r} not found; run prepare_dataset.py first")
    try:
        dataset = load_from_disk(path)
    except Exception as exc:  # datasets raises several types for a folder it cannot read
        raise FinetuneError(f"{path!r} is not a prepare_dataset.py output folder ({exc.__class__.__name__})") from None
    if not hasattr(dataset, "keys") or "train" not in dataset:
        raise FinetuneError(f"{path!r} has no 'train' split; run prepare_dataset.py to make one")
    for name in dataset:
        missing = {"input_ids", "labels"} - set(dataset[name].column_names)
        if missing:
            raise FinetuneError(f"split {name!r} of {path!r} lacks column(s) {sorted(missing)}")
    return dataset


def tokenizer_and_pad_id(model: ModelConfig) -> tuple[PreTrainedTokenizerBase, int]:
    """(tokenizer, pad id) of the ModelConfig `model`: the model's tokenizer, with EOS standing in as padding
    where it has no pad token (Llama 2). Padding is masked by true lengths, never by this id."""
    from transformers import AutoTokenizer

    from finetune.model.hub import require_local_or_reachable, root_cause_message
    from finetune.model.remote_code import refusing_remote_code

    require_local_or_reachable(model.name_or_path)
    try:
        with refusing_remote_code(model.name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    except FinetuneError:
        raise  # already the one line (a folder's own code refused)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"cannot load the tokenizer of {model.name_or_path!r}: "
                            f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # a garbled config.json (`[]`) fails in transformers' fallback reader with a TypeError
        raise FinetuneError(f"cannot load the tokenizer of {model.name_or_path!r}: "
                            f"{root_cause_message(exc)}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def check_block_size(config: PretrainedConfig, block_size: int) -> None:
    """Rows longer than the model's positions would train on positions it never had."""
    max_length = getattr(config, "model_max_length", None) or config.max_position_embeddings
    if max_length < block_size:
        raise FinetuneError(f"--block-size {block_size} exceeds the model's length limit {max_length}")


def load_token_tables(data: DataConfig) -> tuple[TokenTable, TokenTable | None]:
    """(train, validation or None) TokenTables of the DataConfig's prepared dataset, every example within its
    block size."""
    path, block_size = data.dataset_name_or_path, data.block_size
    dataset = load_prepared_dataset(path)
    train = TokenTable(dataset["train"])
    validation = TokenTable(dataset["validation"]) if len(dataset.get("validation", [])) else None
    too_long = sum(int((table.lengths > block_size).sum()) for table in (train, validation) if table)
    if too_long:
        raise FinetuneError(f"{too_long} examples are longer than --block-size {block_size}; run "
                            f"prepare_dataset.py with --block-size {block_size}")
    if not train.num_targets.sum():  # else every step's loss is 0/0, reported as a non-finite loss
        raise FinetuneError(f"no targets to learn in {path!r}: every label of the training split is -100 "
                            f"(an example's first token never counts); prepare it with labels on the responses")
    return train, validation


def check_token_ids(config: PretrainedConfig, *tables: TokenTable | None) -> None:
    """Token ids beyond the model's vocabulary (data prepared with another tokenizer) and labels that are neither
    -100 nor a token id would fail deep inside the forward pass: say so once, before training."""
    vocab = config.vocab_size
    for table in (t for t in tables if t is not None):
        if table.input_ids.min() < 0 or table.input_ids.max() >= vocab:
            found = table.input_ids.max() if table.input_ids.max() >= vocab else table.input_ids.min()
            raise FinetuneError(f"the dataset holds token id {found}, but the model's vocabulary has {vocab} "
                                f"ids (0 to {vocab - 1}); was it prepared with another model's tokenizer?")
        labels = table.labels[table.labels != IGNORE_INDEX]
        if len(labels) and (labels.min() < 0 or labels.max() >= vocab):
            found = labels.max() if labels.max() >= vocab else labels.min()
            raise FinetuneError(f"the dataset holds label {found}; a label must be -100 (no loss) or a token "
                                f"id below the model's vocabulary size {vocab}")


class TokenTable:
    """All examples of one split as flat int arrays plus offsets: fast to slice from data-loader workers."""

    def __init__(self, split: Dataset) -> None:
        table = split.with_format("arrow")[:] if len(split) else None
        if table is None:
            raise FinetuneError("the dataset split is empty")
        ids = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        self.offsets = ids.offsets.to_numpy().astype(np.int64)
        self.input_ids = ids.values.to_numpy().astype(np.int64)
        self.labels = labels.values.to_numpy().astype(np.int64)
        if not np.array_equal(self.offsets, labels.offsets.to_numpy()):
            raise FinetuneError("input_ids and labels differ in length in some example")
        self.lengths = np.diff(self.offsets)
        if (self.lengths == 0).any():
            raise FinetuneError("the dataset has empty examples")
        # Targets an example contributes: its first label is never predicted (nothing precedes it in the row).
        has_target = self.labels != IGNORE_INDEX
        has_target[self.offsets[:-1]] = False
        self.num_targets = np.add.reduceat(has_target, self.offsets[:-1]).astype(np.int64)

    def __len__(self):
        return len(self.lengths)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.labels[start:end]


def plan_epoch(lengths: np.ndarray, batch_size: int, block_size: int, batching: str, seed: int,
               epoch: int) -> list[list[list[int]]]:
    """The rows of every optimiser step of one epoch: a list of steps, each `batch_size` rows of example indices.

    Same seed and epoch give the same plan on every process, which is what lets ranks split a global batch
    without talking to each other and lets a resumed run replay the exact order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if batching == "packed":
        rows = pack_examples(lengths, block_size, order)
        rows = [rows[i] for i in rng.permutation(len(rows))]  # mix long and short rows across steps
    else:
        rows = [[int(i)] for i in order]
    num_steps = len(rows) // batch_size  # drop_last, as in the tutorial
    return [rows[s * batch_size:(s + 1) * batch_size] for s in range(num_steps)]


# Counting the steps of packed epochs means packing each of them; a run may ask for at most this many example
# placements (epochs x examples; under a minute of packing) before it starts.
PACKING_COUNT_BUDGET = 10 ** 7


@dataclass(frozen=True)
class BatchFormat:
    """How rows become a micro-batch on this process: how many rows, the id that fills padding (masked by true
    lengths, never by this id), and the width rows are padded to (None: the longest row of the micro-batch)."""
    micro_batch_size: int
    pad_id: int
    pad_to: int | None


class StepRows:
    """The rows of the run's optimiser steps, epoch after epoch; an epoch's plan is built only when reached.

    With one example per row every epoch has the same number of steps. A packed epoch's row count depends on
    its order, so its steps are counted by packing it (the plan itself is not kept). `total_steps` is
    `max_steps` when given (it overrides `epochs`), else the steps of `epochs` epochs.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, block_size: int, batching: str, seed: int, epochs: int,
                 max_steps: int | None = None) -> None:
        self.lengths, self.batch_size, self.block_size = lengths, batch_size, block_size
        self.batching, self.seed = batching, seed
        self._counts, self._latest = {}, (None, None)
        if not self.steps_in_epoch(0):
            raise FinetuneError(f"the training split makes fewer than --batch-size {batch_size} rows; "
                                f"use a smaller --batch-size or more data")
        if max_steps:
            self.total_steps = max_steps
        elif batching != "packed":
            self.total_steps = epochs * self.steps_in_epoch(0)
        elif epochs * len(lengths) > PACKING_COUNT_BUDGET:
            raise FinetuneError(f"--epochs {epochs}: counting the steps would mean packing "
                                f"{epochs * len(lengths):.3g} examples; give --max-steps instead (one epoch is about "
                                f"{self.steps_in_epoch(0)} steps)")
        else:
            self.total_steps = sum(self.steps_in_epoch(epoch) for epoch in range(epochs))

    def steps_in_epoch(self, epoch: int) -> int:
        if self.batching != "packed":
            return len(self.lengths) // self.batch_size
        if epoch not in self._counts:
            self._counts[epoch] = len(self.epoch_plan(epoch))
        return self._counts[epoch]

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """The rows of every step of `epoch` (see `plan_epoch`); the latest one is kept."""
        if self._latest[0] != epoch:
            self._latest = (epoch, plan_epoch(self.lengths, self.batch_size, self.block_size, self.batching,
                                              self.seed, epoch))
        return self._latest[1]

    def epochs(self, start_step: int = 0) -> Iterator[tuple[int, list[list[list[int]]], int]]:
        """(epoch, its plan, its first step) for each epoch with steps in [start_step, total_steps)."""
        epoch = first = 0
        if self.batching != "packed":  # equal epochs: jump straight to the one holding start_step
            epoch = start_step // self.steps_in_epoch(0)
            first = epoch * self.steps_in_epoch(0)
        while first < self.total_steps:
            count = self.steps_in_epoch(epoch)
            if start_step < first + count:
                yield epoch, self.epoch_plan(epoch), first
            first += count
            epoch += 1


def step_rows(lengths: np.ndarray, data: DataConfig, training: TrainingConfig) -> StepRows:
    """The rows of every step of the run (epochs built lazily) and its `total_steps`, for the DataConfig and
    TrainingConfig sections of the run configuration (`max_steps` overrides `epochs`)."""
    return StepRows(lengths, training.batch_size, data.block_size, data.batching, training.seed, training.epochs,
                    training.max_steps)


def rank_micro_batches(step_rows: list[list[int]], rank: int, world_size: int,
                       micro_batch_size: int) -> list[list[list[int]]]:
    """This rank's share of one global batch, cut into micro-batches (lists of rows)."""
    per_rank = len(step_rows) // world_size
    mine = step_rows[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def collate_rows(table: TokenTable, rows: list[list[int]], pad_id: int, pad_to: int | None = None) -> dict:
    """Tensors for a micro-batch of rows; each row is a list of example indices laid end to end.

    Returns input_ids, labels, position_ids (restarting at 0 for every example, and for the padding tail) and
    example_spans (per row, the (start, end) of each example, as plain ints: the models attend within each span,
    and the padding tail, in no span, gets no attention at all), plus plain-int counts for logging.
    """
    row_lengths = [int(sum(table.lengths[i] for i in row)) for row in rows]
    width = pad_to or max(row_lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    example_spans = []  # per row, (start, end) of each example
    attended_pairs = 0
    for r, row in enumerate(rows):
        spans = []
        start = 0
        for index in row:
            ids, labs = table.example(index)
            end = start + len(ids)
            input_ids[r, start:end] = torch.from_numpy(ids)
            labels[r, start:end] = torch.from_numpy(labs)
            # The first token of an example would be "predicted" from the previous example's last token.
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start:end] = torch.arange(len(ids))
            attended_pairs += len(ids) * (len(ids) + 1) // 2
            spans.append((start, end))
            start = end
        position_ids[r, start:] = torch.arange(width - start)
        example_spans.append(spans)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "example_spans": ExampleSpans(example_spans, width),  # also its tensors for the one-kernel attentions
        "num_tokens": sum(row_lengths),
        "num_targets": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "attended_pairs": attended_pairs,
    }


class StepDataset(torch.utils.data.Dataset):
    """Item s = this rank's micro-batches for optimiser step s of an epoch plan (built in loader workers)."""

    def __init__(self, table: TokenTable, plan: list[list[list[int]]], rank: int, world_size: int,
                 batch_format: BatchFormat) -> None:
        self.table, self.plan = table, plan
        self.rank, self.world_size, self.format = rank, world_size, batch_format

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, step):
        rows = self.plan[step]
        micro_batches = [
            collate_rows(self.table, micro, self.format.pad_id, self.format.pad_to)
            for micro in rank_micro_batches(rows, self.rank, self.world_size, self.format.micro_batch_size)
        ]
        # Whole-step counts over all ranks, computed from the plan alone so no process has to ask another.
        examples = [i for row in rows for i in row]
        step_info = {
            "step_tokens": int(self.table.lengths[examples].sum()),
            "step_targets": int(self.table.num_targets[examples].sum()),
            "last_in_epoch": step == len(self.plan) - 1,
        }
        return micro_batches, step_info


def make_step_loader(table: TokenTable, plan: list[list[list[int]]], rank: int, world_size: int,
                     batch_format: BatchFormat, start_step: int = 0, workers: int = 1, pin_memory: bool = False,
                     stop_step: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over steps `start_step` (for exact resume) to `stop_step` (default: all) of one epoch plan."""
    dataset = StepDataset(table, plan, rank, world_size, batch_format)
    steps = list(range(start_step, len(plan) if stop_step is None else min(stop_step, len(plan))))
    return torch.utils.data.DataLoader(
        dataset,
        sampler=steps,
        batch_size=None,  # each item is already a full step
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def epoch_loaders(table: TokenTable, steps: StepRows, start_step: int, backend: Backend, batch_format: BatchFormat,
                  workers: int = 1) -> Iterator[tuple[int, torch.utils.data.DataLoader]]:
    """(epoch, loader) for each epoch that has steps in [start_step, total_steps); together the loaders yield
    exactly those steps, in order, so a resumed run continues where it stopped and a finished one trains nothing."""
    for epoch, plan, first in steps.epochs(start_step):
        yield epoch, make_step_loader(table, plan, backend.rank, backend.world_size, batch_format,
                                      start_step=max(0, start_step - first), workers=workers,
                                      pin_memory=backend.device.type == "cuda",
                                      stop_step=steps.total_steps - first)


def validation_rows(table: TokenTable | None, data: DataConfig, seed: int) -> list[list[int]]:
    """Rows of the validation split, packed (or not) like training rows (DataConfig `data`); computed once."""
    if table is None:
        return []
    return [row for rows in plan_epoch(table.lengths, 1, data.block_size, data.batching, seed, 0) for row in rows]


def move_to(batch: dict, device: torch.device) -> dict:
    """Tensors of a micro-batch (and the layout's, in example_spans) on `device`, non-blocking from pinned memory;
    plain ints stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v.to(device)
            if isinstance(v, ExampleSpans) else v for k, v in batch.items()}
