"""finetune/data/batches.py: packing, epoch plans, the token table and collated micro-batches."""
import numpy as np
import pytest
from conftest import make_random_dataset
from datasets import Dataset, DatasetDict

from finetune.config import DataConfig, ModelConfig
from finetune.data import batches
from finetune.data.batches import BatchFormat, StepRows, TokenTable, collate_rows
from finetune.errors import FinetuneError


def table_of(examples):
    """A TokenTable of (ids, labels) pairs."""
    return TokenTable(Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                         "labels": [labels for _, labels in examples]}))


EXAMPLES = [([1, 10, 11, 12, 2], [-100, -100, 11, 12, 2]),   # 3 targets
            ([1, 20, 21, 2], [1, 20, 21, 2]),                # the first label is never predicted: 3 targets
            ([1, 30, 31, 32, 33, 34, 2], [-100] * 7)]        # no targets


# ---- packing and plans ------------------------------------------------------------------------------------------

def test_packing_closes_each_row_with_what_fills_it_most():
    # 6 opens a row (4 left, room for at most two more): the 4 fills it. 5 opens the next (5 left): the pair
    # 2 + 3 fills it, where the longest single (3) would leave 2 empty.
    assert batches.pack_examples(np.array([6, 5, 4, 3, 2]), 10, range(5)) == [[0, 2], [1, 4, 3]]


def test_packing_places_every_example_once_within_the_block():
    lengths = np.random.default_rng(0).integers(1, 64, 500)
    order = np.random.default_rng(1).permutation(500)
    rows = batches.pack_examples(lengths, 64, order)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(lengths[row].sum() <= 64 for row in rows)
    assert len(rows) < 500 * 0.75  # packing, not one example per row (mean length 32 of a 64 block)
    assert batches.pack_examples(lengths, 64, order) == rows  # deterministic


def test_epoch_plans_are_the_same_for_the_same_seed_and_epoch_only():
    lengths = np.random.default_rng(0).integers(1, 30, 200)
    plan = batches.plan_epoch(lengths, 4, 64, "packed", seed=3, epoch=0)
    assert batches.plan_epoch(lengths, 4, 64, "packed", seed=3, epoch=0) == plan
    assert batches.plan_epoch(lengths, 4, 64, "packed", seed=3, epoch=1) != plan
    assert batches.plan_epoch(lengths, 4, 64, "packed", seed=4, epoch=0) != plan
    assert all(len(step) == 4 for step in plan)
    one_per_row = batches.plan_epoch(lengths, 8, 64, "longest", seed=3, epoch=0)
    assert len(one_per_row) == 200 // 8  # the last partial batch is dropped
    rows = [row for step in one_per_row for row in step]
    assert all(len(row) == 1 for row in rows) and len({row[0] for row in rows}) == 200


def test_step_rows_count_the_run_and_resume_at_any_step():
    lengths = np.full(10, 5)
    steps = StepRows(lengths, batch_size=2, block_size=8, batching="block", seed=0, epochs=3)
    assert steps.total_steps == 15 and steps.steps_in_epoch(2) == 5
    assert [(epoch, first) for epoch, _, first in steps.epochs(start_step=7)] == [(1, 5), (2, 10)]
    assert list(steps.epochs(start_step=15)) == []  # a finished run trains nothing more
    assert StepRows(lengths, 2, 8, "block", 0, epochs=3, max_steps=4).total_steps == 4
    packed = StepRows(np.random.default_rng(0).integers(1, 8, 50), 2, 8, "packed", 0, epochs=2)
    assert packed.total_steps == len(packed.epoch_plan(0)) + len(packed.epoch_plan(1))
    with pytest.raises(FinetuneError, match="fewer than --batch-size 11 rows"):
        StepRows(lengths, 11, 8, "block", 0, epochs=1)


def test_a_rank_takes_its_share_of_a_step_in_micro_batches():
    rows = [[i] for i in range(8)]
    assert batches.rank_micro_batches(rows, rank=1, world_size=2, micro_batch_size=2) == [[[4], [5]], [[6], [7]]]
    assert batches.rank_micro_batches(rows, rank=0, world_size=4, micro_batch_size=4) == [[[0], [1]]]


# ---- the token table ----------------------------------------------------------------------------------------------

def test_token_table_lengths_targets_and_examples():
    table = table_of(EXAMPLES)
    assert len(table) == 3 and table.lengths.tolist() == [5, 4, 7]
    assert table.num_targets.tolist() == [3, 3, 0]
    ids, labels = table.example(1)
    assert ids.tolist() == EXAMPLES[1][0] and labels.tolist() == EXAMPLES[1][1]


@pytest.mark.parametrize("examples, message", [
    ([([1, 2, 3], [1, 2])], "differ in length"),
    ([([1, 2], [1, 2]), ([], [])], "empty examples"),
])
def test_token_table_refuses_broken_rows(examples, message):
    with pytest.raises(FinetuneError, match=message):
        table_of(examples)


def test_token_ids_and_labels_must_fit_the_vocabulary():
    class Config:
        vocab_size = 35

    batches.check_token_ids(Config, table_of(EXAMPLES), None)
    Config.vocab_size = 34
    with pytest.raises(FinetuneError, match="token id 34, but the model's vocabulary has 34 ids"):
        batches.check_token_ids(Config, table_of(EXAMPLES))
    with pytest.raises(FinetuneError, match="holds label -5"):
        batches.check_token_ids(Config, table_of([([1, 2], [-100, -5])]))


def test_prepared_data_is_checked_against_the_block_size(tmp_path):
    path = make_random_dataset(tmp_path / "data", num_train=20, num_valid=4, min_len=8, max_len=40)
    train, validation = batches.load_token_tables(DataConfig(path, block_size=64))
    assert len(train) == 20 and len(validation) == 4
    with pytest.raises(FinetuneError, match=r"examples are longer than --block-size 16; run prepare_dataset.py"):
        batches.load_token_tables(DataConfig(path, block_size=16))
    with pytest.raises(FinetuneError, match="not found; run prepare_dataset.py first"):
        batches.load_prepared_dataset(str(tmp_path / "missing"))
    DatasetDict(validation=Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]})).save_to_disk(
        str(tmp_path / "no_train"))
    with pytest.raises(FinetuneError, match="has no 'train' split"):
        batches.load_prepared_dataset(str(tmp_path / "no_train"))


def test_a_hub_tokenizer_while_offline_is_one_line():
    with pytest.raises(FinetuneError) as raised:
        batches.tokenizer_and_pad_id(ModelConfig("no-such-org/no-such-model"))
    assert str(raised.value).startswith("cannot load the tokenizer of 'no-such-org/no-such-model'")
    assert "\n" not in str(raised.value)


# ---- collated micro-batches -------------------------------------------------------------------------------------

def test_collate_lays_examples_end_to_end_with_spans_and_restarting_positions():
    table = table_of(EXAMPLES)
    batch = collate_rows(table, [[0, 1], [2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 2, 1, 20, 21, 2],
                                           [1, 30, 31, 32, 33, 34, 2, 0, 0]]
    # Each example's first label is masked: it would be "predicted" from the example before it.
    assert batch["labels"].tolist() == [[-100, -100, 11, 12, 2, -100, 20, 21, 2], [-100] * 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]]
    assert batch["example_spans"] == [[(0, 5), (5, 9)], [(0, 7)]]  # the padding tail (7, 9) is in no span
    assert batch["num_tokens"] == 16
    assert batch["num_targets"] == int(table.num_targets.sum()) == 6
    assert batch["attended_pairs"] == 5 * 6 // 2 + 4 * 5 // 2 + 7 * 8 // 2


def test_collate_pads_to_the_block_when_asked():
    batch = collate_rows(table_of(EXAMPLES), [[1]], pad_id=7, pad_to=6)
    assert batch["input_ids"].tolist() == [[1, 20, 21, 2, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 20, 21, 2, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert batch["example_spans"] == [[(0, 4)]]


def test_a_pad_id_that_is_a_real_token_is_never_masked():
    batch = collate_rows(table_of(EXAMPLES), [[1], [0]], pad_id=2)  # 2 is EOS, a target
    assert batch["labels"][0].tolist() == [-100, 20, 21, 2, -100]
    assert batch["num_targets"] == 6


def test_the_step_loader_yields_this_ranks_micro_batches_from_the_start_step():
    table = table_of(EXAMPLES * 4)
    plan = [[[i], [i + 1]] for i in range(0, 12, 2)]  # 6 steps of 2 rows
    loader = batches.make_step_loader(table, plan, rank=1, world_size=2, batch_format=BatchFormat(1, 0, 8),
                                      start_step=4, workers=0)
    steps = list(loader)
    assert len(steps) == 2
    micro_batches, info = steps[0]
    assert len(micro_batches) == 1 and micro_batches[0]["input_ids"].shape == (1, 8)
    assert micro_batches[0]["input_ids"][0].tolist() == EXAMPLES[9 % 3][0] + [0, 0, 0]  # rank 1's row, [9]
    assert info == {"step_tokens": int(table.lengths[[8, 9]].sum()), "step_targets": 3, "last_in_epoch": False}
    assert steps[1][1]["last_in_epoch"]
