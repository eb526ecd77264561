"""finetune/ops/example_spans.py: the packed micro-batch's layout as span lists and as the tensors the one-kernel
attentions take."""
import pickle

import torch

from finetune.ops.example_spans import ExampleSpans, layout_of

SPANS = [[(0, 5), (5, 17), (17, 24)], [(0, 24)], [(0, 9), (9, 20), (20, 24)]]


def test_cumulative_lengths_lay_the_rows_end_to_end():
    layout = ExampleSpans(SPANS, 24)
    assert layout == SPANS  # read as the plain span lists by the span loop and Baichuan's attention
    assert layout.cu_seqlens.tolist() == [0, 5, 17, 24, 48, 57, 68, 72] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_length == 24
    assert layout.example_ids[0].tolist() == [0] * 5 + [1] * 12 + [2] * 7
    # The collator gives the padding tail no span: it becomes a sequence of its own, as does a gap between spans.
    gaps = ExampleSpans([[(0, 5), (7, 10)]], 12)
    assert gaps.cu_seqlens.tolist() == [0, 5, 7, 10, 12] and gaps.max_length == 5
    assert ExampleSpans([[(0, 5)]], 8).example_ids[0].tolist() == [0] * 5 + [-1] * 3


def test_the_layout_survives_a_loader_worker_and_moves_with_the_batch():
    layout = ExampleSpans(SPANS, 24)
    layout.block_masks[None] = "made for one forward"
    again = pickle.loads(pickle.dumps(layout))  # what a DataLoader worker sends back
    assert again == SPANS and torch.equal(again.cu_seqlens, layout.cu_seqlens) and again.max_length == 24
    moved = layout.to("cpu")
    assert moved == SPANS and torch.equal(moved.example_ids, layout.example_ids) and moved.block_masks == {}


def test_plain_lists_and_none_are_laid_out_where_no_collator_made_them():
    assert layout_of(None, 2, 6, torch.device("cpu")).cu_seqlens.tolist() == [0, 6, 12]
    made = ExampleSpans(SPANS, 24)
    assert layout_of(made, 3, 24, torch.device("cpu")) is made
    assert layout_of([list(row) for row in SPANS], 3, 24, torch.device("cpu")).cu_seqlens.tolist() == \
        made.cu_seqlens.tolist()
