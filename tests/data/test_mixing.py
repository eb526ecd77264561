"""finetune/data/mixing.py: sources mixed by weight, seeded and repeatable, validation carved out first."""
import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from finetune.data.mixing import check_weights, format_mixing_report, mix_sources, sample_rows
from finetune.errors import FinetuneError


def test_mixing_sources_over_and_under_samples_by_weight():
    a = DatasetDict(train=Dataset.from_dict({"text": [f"a{i}" for i in range(10)]}))
    b = DatasetDict(train=Dataset.from_dict({"text": [f"b{i}" for i in range(30)]}))
    mixed, report = mix_sources({"a": a, "b": b}, [3, 1], seed=0, validation_fraction=0)
    texts = mixed["train"]["text"]
    assert len(texts) == 40 and sum(t.startswith("a") for t in texts) == 30  # 3/4 of 40: every a row 3 times
    assert all(texts.count(f"a{i}") == 3 for i in range(10)) and len({t for t in texts if t[0] == "b"}) == 10
    assert [row["rows_used"] for row in report] == [30, 10] and report[0]["times_used"] == 3
    assert mix_sources({"a": a, "b": b}, [3, 1], seed=0, validation_fraction=0)[0]["train"]["text"] == texts
    assert mix_sources({"a": a, "b": b}, [3, 1], seed=1, validation_fraction=0)[0]["train"]["text"] != texts
    # Validation rows are carved out before sampling: none of them is repeated into train.
    mixed, _ = mix_sources({"a": a, "b": b}, [3, 1], seed=0, validation_fraction=0.2)
    assert len(mixed["validation"]) == 8 and not set(mixed["validation"]["text"]) & set(mixed["train"]["text"])


def test_sample_rows_takes_whole_copies_then_distinct_rows():
    rows = sample_rows(10, 25, np.random.default_rng(0))
    counts = np.bincount(rows, minlength=10)
    assert len(rows) == 25 and sorted(counts.tolist()) == [2] * 5 + [3] * 5  # two copies, then 5 rows once more
    assert rows[:20].tolist() == list(range(10)) * 2
    under = sample_rows(10, 4, np.random.default_rng(0))
    assert len(set(under.tolist())) == 4  # an under-sample repeats nothing
    assert sample_rows(10, 4, np.random.default_rng(0)).tolist() == under.tolist()


def test_equal_weights_give_each_source_its_share_of_the_total():
    a = DatasetDict(train=Dataset.from_dict({"text": [f"a{i}" for i in range(6)]}))
    b = DatasetDict(train=Dataset.from_dict({"text": [f"b{i}" for i in range(18)]}))
    mixed, report = mix_sources({"a": a, "b": b}, check_weights(["a", "b"], None), seed=5, validation_fraction=0)
    assert [(row["share"], row["rows_used"]) for row in report] == [(0.5, 12), (0.5, 12)]
    texts = mixed["train"]["text"]
    assert all(texts.count(f"a{i}") == 2 for i in range(6))  # 12 of 6 rows: each twice
    b_rows = [t for t in texts if t[0] == "b"]
    assert len(b_rows) == len(set(b_rows)) == 12  # 12 of 18 rows: a sample without repeats


def test_weights_are_checked():
    assert check_weights(["x", "y"], None) == [1.0, 1.0]
    assert check_weights(["x", "y"], [2, 0.5]) == [2.0, 0.5]
    with pytest.raises(FinetuneError, match="--dataset-weights has 1 values for 2 sources"):
        check_weights(["x", "y"], [1.0])
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, float("nan")], [float("inf"), 1.0]):
        with pytest.raises(FinetuneError, match="--dataset-weights must be positive numbers"):
            check_weights(["x", "y"], bad)


def test_sources_with_clashing_column_types_are_one_line():
    a = DatasetDict(train=Dataset.from_dict({"text": ["a0", "a1"]}))
    b = DatasetDict(train=Dataset.from_dict({"text": [1, 2]}))
    with pytest.raises(FinetuneError, match="^the sources cannot be mixed: ") as raised:
        mix_sources({"a": a, "b": b}, [1, 1], validation_fraction=0)
    assert "\n" not in str(raised.value)


def test_the_report_says_what_each_source_gave():
    report = [{"source": "a.jsonl", "weight": 3.0, "share": 0.75, "rows": 10, "rows_used": 30, "times_used": 3.0}]
    assert format_mixing_report(report) == \
        "  source a.jsonl: weight 3 (75.0% of the mixture), 10 training rows -> 30 drawn (3 times each)"
