"""finetune/data/packing.py: every example whole in one row, rows filled, the same rows for the same order, and
little padding on the bundled samples."""
import numpy as np
import pytest

from finetune import demo
from finetune.data import batches, recipes
from finetune.data.packing import pack_examples, padding_share


def placed_once_within(rows, lengths, block_size):
    return sorted(i for row in rows for i in row) == list(range(len(lengths))) and all(
        lengths[row].sum() <= block_size for row in rows)


def test_a_row_takes_examples_in_order_then_closes_with_the_pair_that_fills_it():
    # 6 leaves 4, room for two more at most: the longest single (3) would leave 1 empty, the pair 2 + 2 fills it.
    assert pack_examples(np.array([6, 3, 2, 2]), 10, range(4)) == [[0, 2, 3], [1]]
    # Equal lengths: in order while three more fit, then the next two in order close the row.
    assert pack_examples(np.ones(10, dtype=int), 5, range(9, -1, -1)) == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]


def test_an_example_too_long_for_the_space_left_waits_for_a_later_row():
    # 5 leaves 5; 7 is next in order but does not fit: the longest that fits (3) goes in, 7 opens the next row.
    assert pack_examples(np.array([5, 7, 3, 1, 1]), 10, range(5)) == [[0, 2, 3, 4], [1]]


def test_every_example_once_whole_within_the_block_and_the_same_rows_for_the_same_order():
    for low, high, block_size in ((1, 64, 64), (5, 300, 512), (600, 1025, 1024), (10, 60, 1024)):
        lengths = np.random.default_rng(low).integers(low, high, 2000)
        order = np.random.default_rng(1).permutation(2000)
        rows = pack_examples(lengths, block_size, order)
        assert placed_once_within(rows, lengths, block_size)
        assert pack_examples(lengths, block_size, order) == rows
        assert pack_examples(lengths, block_size, order[::-1]) != rows


def test_short_examples_fill_rows_to_within_one_row_of_the_ideal():
    lengths = np.random.default_rng(0).integers(5, 300, 5000)
    rows = pack_examples(lengths, 1024, np.random.default_rng(1).permutation(5000))
    assert len(rows) <= np.ceil(lengths.sum() / 1024) + 1


def test_an_example_longer_than_the_block_gets_a_row_of_its_own():
    rows = pack_examples(np.array([3, 12, 4]), 8, range(3))
    assert sorted(map(sorted, rows)) == [[0, 2], [1]]
    assert pack_examples(np.array([], dtype=int), 8, []) == []


def test_padding_share_counts_the_positions_no_example_fills():
    assert padding_share(np.array([3, 5, 8]), [[0, 1], [2]], 8) == 0
    assert padding_share(np.array([3, 5, 8]), [[0], [2]], 8) == 5 / 16
    assert padding_share(np.array([3]), [], 8) == 0


@pytest.mark.parametrize("recipe", ["llama2", "baichuan2"])
def test_the_bundled_samples_pack_with_at_most_3_percent_padding(recipe):
    """The rows the training steps get (seeded epoch plans of 8 rows a step, as bench_throughput.py and the demos
    use them) on each recipe's bundled sample prepared with its demo tokenizer, 1,024 tokens a row."""
    from datasets import load_from_disk

    split = load_from_disk(demo.ensure_demo_dataset(recipe, recipes.RECIPES[recipe], block_size=1024))["train"]
    lengths = batches.TokenTable(split).lengths
    for epoch in range(3):
        rows = [row for step in batches.plan_epoch(lengths, 8, 1024, "packed", seed=0, epoch=epoch) for row in step]
        assert padding_share(lengths, rows, 1024) <= 0.03, (recipe, epoch)
