"""Several data sources in one preparation, mixed in given proportions (--dataset-weights).

Each source keeps its own validation split (or has one carved out, seeded, before any sampling, so no repeated
row can land on both sides). The training mixture has as many rows as the sources' training splits together;
source i gets weight_i / sum(weights) of them: whole copies of its rows plus a seeded sample of the rest when
that is more than it has (over-sampling), a seeded sample when less (under-sampling). The mixture is shuffled
with the same seed. What each source gave is reported (prepare_report.json, "sources").
"""
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.preparation import split_train_validation
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import DatasetDict


def source_identity(name: str) -> tuple:
    """What makes two --dataset-name-or-path entries the same source: the file or folder itself for a local path
    (however it is spelled: `./a.jsonl`, a link to it, a hard link), the name for a hub data set."""
    try:
        found = os.stat(name)
    except (OSError, ValueError):  # not a local path: a hub name (ValueError: a NUL byte in it)
        return ("name", name)
    return ("file", found.st_dev, found.st_ino)


def check_sources(sources: list[str]) -> None:
    """Refuse a source given twice, by any spelling: it would be counted (and weighted) as two."""
    seen = {}
    for name in sources:
        identity = source_identity(name)
        if identity in seen:
            first = seen[identity]
            same = f"{first!r} twice" if first == name else f"{first!r} and {name!r}, which are the same file"
            raise FinetuneError(f"--dataset-name-or-path names {same}; give the source once, with a larger "
                                f"weight in --dataset-weights")
        seen[identity] = name


def check_weights(sources: list[str], weights: list[float] | None) -> list[float]:
    """The weights of `sources` (all 1 when none are given); a source named twice, by any spelling, is refused."""
    if weights is None:
        check_sources(sources)
        return [1.0] * len(sources)
    if len(weights) != len(sources):
        raise FinetuneError(f"--dataset-weights has {len(weights)} values for {len(sources)} sources in "
                            "--dataset-name-or-path; give one weight per source")
    if not all(np.isfinite(weight) and weight > 0 for weight in weights):
        raise FinetuneError(f"--dataset-weights must be positive numbers, got {' '.join(map(str, weights))}")
    # Each share is weight / sum: a sum past the largest float would make every share 0.
    if not math.isfinite(sum(weights)):
        raise FinetuneError(f"--dataset-weights {' '.join(map(str, weights))} add up past the largest number "
                            f"this can hold; give relative sizes, such as 3 1")
    check_sources(sources)
    return [float(weight) for weight in weights]


def sample_rows(num_rows: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """`wanted` row indices of a source of `num_rows`: whole copies, then a sample without repeats."""
    copies, rest = divmod(wanted, num_rows)
    return np.concatenate([np.tile(np.arange(num_rows), copies), rng.permutation(num_rows)[:rest]]).astype(np.int64)


def mix_sources(sources: dict, weights: list[float], seed: int = 0,
                validation_fraction: float = 0.05) -> tuple["DatasetDict", list[dict]]:
    """(DatasetDict train/validation, report rows) of `sources` (name -> DatasetDict with the same columns)."""
    from datasets import DatasetDict, concatenate_datasets

    rng = np.random.default_rng(seed)
    splits = {name: split_train_validation(source, seed=seed, validation_fraction=validation_fraction)
              for name, source in sources.items()}
    total = sum(len(split["train"]) for split in splits.values())
    shares = np.array(weights) / sum(weights)
    trains, validations, report = [], [], []
    for (name, split), weight, share in zip(splits.items(), weights, shares, strict=True):
        rows = len(split["train"])
        wanted = max(1, int(round(total * share)))
        trains.append(split["train"].select(sample_rows(rows, wanted, rng)))
        if "validation" in split:
            validations.append(split["validation"])
        report.append({"source": name, "weight": weight, "share": round(float(share), 6), "rows": rows,
                       "rows_used": wanted, "times_used": round(wanted / rows, 4)})
    try:
        train = concatenate_datasets(trains).shuffle(seed=seed).flatten_indices()
        mixed = DatasetDict(train=train)
        if validations:
            mixed["validation"] = concatenate_datasets(validations).flatten_indices()
    except ValueError as problem:  # columns of different types
        raise FinetuneError(f"the sources cannot be mixed: {str(problem).splitlines()[0]}") from None
    return mixed, report


def format_mixing_report(report: list[dict]) -> str:
    return "\n".join(f"  source {row['source']}: weight {row['weight']:g} ({row['share']:.1%} of the mixture), "
                     f"{row['rows']} training rows -> {row['rows_used']} drawn ({row['times_used']:g} times each)"
                     for row in report)
