"""Attention for packed rows in one kernel per layer: each example attends causally to itself only.

The span loop (finetune/ops/span_attention.py) calls attention once per example span: right everywhere and the
fastest on a CPU, but on a GPU a 13B step at 4 x 1024 tokens with 5-12 examples a row is tens of thousands of
small kernel launches. Here the same spans become one call per layer:

  "varlen_spans"  torch's variable-length FlashAttention (torch.nn.attention.varlen), given the cumulative example
                  lengths of the whole micro-batch flattened into one sequence. CUDA only.
  "flex_spans"    FlexAttention with a example mask (same example and causal), compiled on GPUs.

Both take the forward's `example_spans` (per row, the (start, end) of each example and of the padding tail, as
the collator makes them), so the training scripts pass the same keywords whatever the attention. Importing
this module registers both names with transformers. benchmarks/gpu_smoke.py checks them against the span loop
on a GPU (outputs and gradients) and times them.
"""
from collections.abc import Callable

import torch
from transformers import AttentionInterface

from finetune.errors import FinetuneError
from finetune.ops.span_attention import check_attention_kwargs, packed_spans

ATTENTION_CHOICES = ("auto", "spans", "varlen", "flex")
KERNEL_NAMES = {"varlen": "varlen_spans", "flex": "flex_spans"}


def cumulative_lengths(example_spans: list[list[tuple[int, int]]], length: int,
                       device: torch.device | str) -> tuple[torch.Tensor, int]:
    """(cu_seqlens as int32 on `device`, longest sequence) of the rows laid end to end: row r's span (s, e) is
    (r x length + s, r x length + e) of the flattened micro-batch. Positions in no span (the padding tail) form
    sequences of their own: the kernel needs every position covered, and no example attends to them."""
    bounds, longest = [0], 1
    for row, spans in enumerate(example_spans):
        for start, end in sorted(spans) + [(length, length)]:
            for low, high in ((bounds[-1] - row * length, start), (start, end)):  # a gap before the span, the span
                if high > low:
                    bounds.append(row * length + high)
                    longest = max(longest, high - low)
    return torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True), longest


def example_ids(example_spans: list[list[tuple[int, int]]], length: int, device: torch.device | str) -> torch.Tensor:
    """(rows, length) index of the span each position belongs to; -1 for positions in no span (padding), which
    attend only among themselves."""
    ids = torch.full((len(example_spans), length), -1, dtype=torch.int32)
    for row, spans in enumerate(example_spans):
        for index, (start, end) in enumerate(spans):
            ids[row, start:end] = index
    return ids.to(device, non_blocking=True)


_layout_of_this_forward = (None, None, None)  # (example_spans, what was built, the layout): the list is held so
                                              # its id cannot be reused by another


def _per_forward(example_spans: object, build: Callable[..., object], length: int, device: torch.device) -> object:
    """`build(spans, length, device)` once per forward: every decoder layer receives the same `example_spans`
    list, so the layout (a Python loop over the spans and a host-to-device copy) is made by the first layer and
    reused by the rest; a new list, length or device builds it again."""
    global _layout_of_this_forward
    what = (build, length, device)
    held, built, layout = _layout_of_this_forward
    if example_spans is not None and held is example_spans and built == what:
        return layout
    layout = build(example_spans, length, device)
    _layout_of_this_forward = (example_spans, what, layout)
    return layout


def _no_dropout(name, dropout):
    if dropout:
        raise ValueError(f"{name} has no attention dropout; set attention_dropout to 0 or use the span loop")


def varlen_spans(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 example_spans: list[list[tuple[int, int]]] | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    from torch.nn.attention.varlen import varlen_attn

    sliding_window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    if softcap:  # FlashAttention's varlen kernel has no logit soft-cap: the span loop computes it exactly
        return packed_spans(module, query, key, value, attention_mask, scaling, dropout, example_spans,
                            softcap=softcap, sliding_window=sliding_window, **kwargs)
    check_attention_kwargs(module, kwargs)
    _no_dropout("varlen_spans", dropout)
    rows, heads, length, head_dim = query.shape
    spans = example_spans if example_spans is not None else [[(0, length)]] * rows
    cu_seqlens, longest = _per_forward(spans, cumulative_lengths, length, query.device)

    def flat(x):  # (batch, heads, length, dim) -> (batch x length, heads, dim)
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], head_dim)
    out = varlen_attn(flat(query), flat(key), flat(value), cu_seqlens, cu_seqlens, longest, longest,
                      scale=scaling, window_size=(-1 if sliding_window is None else sliding_window - 1, 0),
                      enable_gqa=key.shape[1] != heads)
    return out.view(rows, length, heads, head_dim), None


_compiled_flex = None


def _flex():
    """flex_attention, compiled once per process on GPUs (eager elsewhere: the CPU runs it unfused)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


def flex_spans(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               example_spans: list[list[tuple[int, int]]] | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    from torch.nn.attention.flex_attention import create_block_mask

    sliding_window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    check_attention_kwargs(module, kwargs)
    _no_dropout("flex_spans", dropout)
    rows, heads, length, _ = query.shape
    spans = example_spans if example_spans is not None else [[(0, length)]] * rows
    example = _per_forward(spans, example_ids, length, query.device)

    def same_example_causal(b, h, q, kv):
        keep = (example[b, q] == example[b, kv]) & (q >= kv)
        return keep if sliding_window is None else keep & (q - kv < sliding_window)  # the last `window` keys

    def capped(score, b, h, q, kv):  # Gemma 2's attention logit soft-cap
        return softcap * torch.tanh(score / softcap)
    mask = create_block_mask(same_example_causal, rows, None, length, length, device=query.device)
    out = _flex()(query, key, value, block_mask=mask, score_mod=capped if softcap else None, scale=scaling,
                  enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


def varlen_available(device: torch.device) -> bool:
    """torch's varlen attention is FlashAttention: CUDA, Ampere (compute capability 8.0) or newer."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def attention_name(span_loop_name: str | None, choice: str, device: torch.device, mixed_precision: str) -> str | None:
    """The attention a training script's model loads with, for `--attn-implementation` `choice`.

    `span_loop_name` is the script's span-loop attention (None: the model's own code takes the spans, as
    Baichuan's ALiBi attention does). `auto`: one varlen kernel per layer on an Ampere-or-newer GPU computing in
    bf16, the span loop elsewhere (on a CPU it is the fastest: one small attention per example, no mask).
    """
    if choice not in ATTENTION_CHOICES:
        raise FinetuneError(f"--attn-implementation must be one of {', '.join(ATTENTION_CHOICES)}, not {choice!r}")
    if choice == "auto":
        fastest = varlen_available(device) and mixed_precision == "bf16"
        return KERNEL_NAMES["varlen"] if fastest and span_loop_name else span_loop_name
    if choice == "spans":
        return span_loop_name
    if span_loop_name is None:
        raise FinetuneError(f"--attn-implementation {choice}: this model's own attention takes the packed spans "
                            f"(Baichuan's ALiBi); use spans or auto")
    if device.type != "cuda":
        raise FinetuneError(f"--attn-implementation {choice} needs a GPU (varlen is CUDA FlashAttention; FlexAttention "
                            f"has no CPU backward); use spans or auto on a CPU")
    if choice == "varlen" and not varlen_available(device):
        raise FinetuneError("--attn-implementation varlen needs torch's varlen attention on an Ampere or newer GPU")
    return KERNEL_NAMES[choice]


AttentionInterface.register("varlen_spans", varlen_spans)
AttentionInterface.register("flex_spans", flex_spans)
