"""finetune/data/mixing.py: --dataset-weights that overflow are refused, and one source spelled two ways (a
relative path, a link) is refused like one named twice, before anything is read."""
import os

import pytest
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
