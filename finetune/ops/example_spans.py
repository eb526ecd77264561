"""The layout of a packed micro-batch, made once by the collator for every attention path.

`ExampleSpans` is the list the span loop and Baichuan's attention read (per row, the (start, end) of each example;
the padding tail is in no span) and also carries the same layout as tensors for the one-kernel paths, built on the
host in the loader worker and moved to the device with the batch:

    cu_seqlens   int32 (n + 1,): the rows laid end to end, each example a sequence; the padding tail and any gap
                 between spans are sequences of their own (the varlen kernel needs every position covered)
    max_length   the longest of those sequences
    example_ids  int32 (rows, length): the index of the span each position is in, -1 in none (FlexAttention)

It also keeps the FlexAttention block masks made during one forward (one per sliding window), so the layers and
the recomputation of checkpointed layers reuse them; the next micro-batch is a new object.
"""
from collections.abc import Sequence

import torch

Spans = Sequence[Sequence[tuple[int, int]]]


class ExampleSpans(list):
    """Per row, a list of (start, end) of the examples packed in it, plus `cu_seqlens`, `max_length`,
    `example_ids` and `block_masks` (see the module docstring)."""

    def __init__(self, spans: Spans, length: int) -> None:
        super().__init__([[(int(start), int(end)) for start, end in row] for row in spans])
        self.length = int(length)
        bounds, longest = [0], 1
        ids = torch.full((len(self), self.length), -1, dtype=torch.int32)
        for row, row_spans in enumerate(self):
            for index, (start, end) in enumerate(row_spans):
                ids[row, start:end] = index
            for start, end in sorted(row_spans) + [(self.length, self.length)]:
                for low, high in ((bounds[-1] - row * self.length, start), (start, end)):  # a gap, then the span
                    if high > low:
                        bounds.append(row * self.length + high)
                        longest = max(longest, high - low)
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        self.max_length = longest
        self.example_ids = ids
        self.block_masks: dict = {}

    def to(self, device: torch.device | str) -> "ExampleSpans":
        """The same layout with its tensors on `device` (non-blocking: the collator's tensors come from the host)."""
        moved = ExampleSpans.__new__(ExampleSpans)
        moved.extend(self)
        moved.length, moved.max_length, moved.block_masks = self.length, self.max_length, {}
        moved.cu_seqlens = self.cu_seqlens.to(device, non_blocking=True)
        moved.example_ids = self.example_ids.to(device, non_blocking=True)
        return moved


def layout_of(example_spans: Spans | None, rows: int, length: int, device: torch.device) -> ExampleSpans:
    """`example_spans` as an ExampleSpans on `device`: the collator's own object as it is; a plain list (a caller
    without the collator) or None (every row one example) is laid out here, once per call."""
    if isinstance(example_spans, ExampleSpans) and example_spans.length == length:
        return example_spans if example_spans.cu_seqlens.device == device else example_spans.to(device)
    return ExampleSpans(example_spans if example_spans is not None else [[(0, length)]] * rows, length).to(device)
