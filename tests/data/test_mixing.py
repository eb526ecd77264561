"""finetune/data/mixing.py: --dataset-weights that overflow are refused, and one source spelled two ways (a
relative path, a link) is refused like one named twice, before anything is read. Also the weighted sampling itself."""
import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from finetune.data.mixing import check_weights, format_mixing_report, mix_sources, sample_rows
from finetune.errors import FinetuneError
import os

from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script


def refusal(sources, weights):
    from finetune.data.mixing import check_weights
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError) as error:
        check_weights(sources, weights)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("weights", [[1e308, 1e308], [1.7e308, 1.7e308, 1.0]])
def test_weights_that_add_up_past_the_largest_float_are_refused(weights):
    sources = [f"s{i}" for i in range(len(weights))]
    assert refusal(sources, weights) == (f"--dataset-weights {' '.join(map(str, weights))} add up past the largest "
                                         f"number this can hold; give relative sizes, such as 3 1")


@pytest.mark.parametrize("weights", [[float("inf"), 1.0], [float("nan"), 1.0], [0.0, 1.0], [-1.0, 1.0]])
def test_weights_that_are_not_positive_numbers_are_refused(weights):
    assert refusal(["a", "b"], weights).startswith("--dataset-weights must be positive numbers")


def test_large_but_summable_weights_keep_their_ratio():
    from finetune.data.mixing import check_weights

    assert check_weights(["a", "b"], [1e307, 3e307]) == [1e307, 3e307]


def test_one_file_spelled_two_ways_is_one_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"article": "w5", "highlights": "w6"}\n')
    (tmp_path / "b.jsonl").write_text('{"article": "w7", "highlights": "w8"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    os.link(tmp_path / "b.jsonl", tmp_path / "hard.jsonl")
    for first, second in [("a.jsonl", "./a.jsonl"), ("a.jsonl", "link.jsonl"), ("a.jsonl", str(tmp_path / "a.jsonl")),
                          ("b.jsonl", "hard.jsonl"), (".", str(tmp_path))]:
        for weights in (None, [1.0, 2.0]):
            assert refusal([first, second], weights) == (
                f"--dataset-name-or-path names {first!r} and {second!r}, which are the same file; give the source "
                f"once, with a larger weight in --dataset-weights")
    assert "names 'org/data' twice" in refusal(["org/data", "org/data"], None)
    from finetune.data.mixing import check_weights

    assert check_weights(["a.jsonl", "b.jsonl", "org/data"], None) == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_prepare_dataset_refuses_one_file_given_as_two_sources(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"article": "w5", "highlights": "w6"}\n')
    (tmp_path / "link.jsonl").symlink_to(data)

    def prepare(*args):
        return run_script(PYTHON, str(REPO_ROOT / "prepare_dataset.py"), "llama2", "--demo", "--save-path",
                          str(tmp_path / "out"), "--dataset-name-or-path", *args, cwd=tmp_path, timeout=120)

    for second in ("./a.jsonl", "link.jsonl"):
        assert "which are the same file" in assert_one_line_error(prepare("a.jsonl", second))
    data.with_name("b.jsonl").write_text(data.read_text())
    line = assert_one_line_error(prepare("a.jsonl", "b.jsonl", "--dataset-weights", "1e308", "1e308"))
    assert "add up past the largest number" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "link.jsonl"]


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
