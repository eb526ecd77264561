"""Attention for packed rows in one kernel per layer: each example attends causally to itself only.

The span loop (finetune/ops/span_attention.py) calls attention once per example span: right everywhere and the
fastest on a CPU, but on a GPU a 13B step at 4 x 1024 tokens with 5-12 examples a row is tens of thousands of
small kernel launches. Here the same spans become one call per layer:

  "varlen_spans"  torch's variable-length FlashAttention (torch.nn.attention.varlen), given the cumulative example
                  lengths of the whole micro-batch flattened into one sequence. CUDA only.
  "flex_spans"    FlexAttention with an example mask (same example and causal), compiled on GPUs.

A layer with attention sinks (gpt-oss) goes to the span loop on both, as a soft-capped layer does on varlen: the
kernels have no step for them, and the span loop computes them exactly.

Both take the forward's `example_spans`, the collator's ExampleSpans (finetune/ops/example_spans.py): the span
lists with the cumulative lengths and example ids already built as tensors on the host, so no layer builds a
layout and the training scripts pass the same keywords whatever the attention. Importing
this module registers both names with transformers. benchmarks/gpu_smoke.py checks them against the span loop
on a GPU (outputs and gradients) and times them.
"""
import torch
from transformers import AttentionInterface

from finetune.errors import FinetuneError
from finetune.ops.example_spans import ExampleSpans, layout_of
from finetune.ops.span_attention import check_attention_kwargs, packed_spans

ATTENTION_CHOICES = ("auto", "spans", "varlen", "flex")
KERNEL_NAMES = {"varlen": "varlen_spans", "flex": "flex_spans"}


HALF = (torch.float16, torch.bfloat16)


def common_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, half_only: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query, key and value in one dtype, as the kernels require. With fp32 master weights under bf16 autocast
    the rotary embedding multiplies query and key by fp32 cos/sin, so they arrive in fp32 beside a bf16 value:
    all three take the autocast dtype (else the value's half dtype). `half_only`: FlashAttention (varlen) runs in
    fp16/bf16 alone, so fp32 everywhere is refused."""
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) == 1 and (not half_only or query.dtype in HALF):
        return query, key, value
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
    else:
        target = next((x.dtype for x in (value, key, query) if x.dtype in HALF), None if half_only else value.dtype)
    if target is None or (half_only and target not in HALF):
        raise FinetuneError(f"--attn-implementation varlen runs FlashAttention, which computes in fp16 or bf16 only "
                            f"(got {', '.join(sorted(str(d) for d in dtypes))}); use --mixed-precision bf16 or "
                            f"--attn-implementation spans")
    return query.to(target), key.to(target), value.to(target)


def _no_dropout(name, dropout):
    if dropout:
        raise ValueError(f"{name} has no attention dropout; set attention_dropout to 0 or use the span loop")


def varlen_spans(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 example_spans: list[list[tuple[int, int]]] | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    from torch.nn.attention.varlen import varlen_attn

    sliding_window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    if softcap or kwargs.get("s_aux") is not None:
        # FlashAttention's varlen kernel has no logit soft-cap and no attention sinks: the span loop computes
        # them exactly
        return packed_spans(module, query, key, value, attention_mask, scaling, dropout, example_spans,
                            softcap=softcap, sliding_window=sliding_window, **kwargs)
    check_attention_kwargs(module, kwargs)
    _no_dropout("varlen_spans", dropout)
    rows, heads, length, head_dim = query.shape
    layout = layout_of(example_spans, rows, length, query.device)
    query, key, value = common_dtype(query, key, value, half_only=True)

    def flat(x):  # (batch, heads, length, dim) -> (batch x length, heads, dim), contiguous as the kernel needs
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], head_dim).contiguous()
    out = varlen_attn(flat(query), flat(key), flat(value), layout.cu_seqlens, layout.cu_seqlens, layout.max_length,
                      layout.max_length,
                      scale=scaling, window_size=(-1 if sliding_window is None else sliding_window - 1, 0),
                      enable_gqa=key.shape[1] != heads)
    return out.view(rows, length, heads, head_dim), None


_compiled_flex = None


def _flex():
    """flex_attention, compiled once per process on GPUs (eager elsewhere: the CPU runs it unfused)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


def flex_block_mask(layout: ExampleSpans, sliding_window: int | None) -> object:
    """The FlexAttention block mask of this micro-batch (same example and causal, within the window), made once
    per forward and window: every layer and each checkpointed layer's recomputation reuse it. Compiled on GPUs."""
    from torch.nn.attention.flex_attention import create_block_mask

    if sliding_window not in layout.block_masks:
        example = layout.example_ids

        def same_example_causal(b, h, q, kv):
            keep = (example[b, q] == example[b, kv]) & (q >= kv)
            return keep if sliding_window is None else keep & (q - kv < sliding_window)  # the last `window` keys
        device = example.device
        layout.block_masks[sliding_window] = create_block_mask(same_example_causal, len(layout), None, layout.length,
                                                               layout.length, device=device,
                                                               _compile=device.type == "cuda")
    return layout.block_masks[sliding_window]


def flex_spans(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               example_spans: list[list[tuple[int, int]]] | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    sliding_window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    if kwargs.get("s_aux") is not None:  # attention sinks have no score modifier: the span loop computes them
        return packed_spans(module, query, key, value, attention_mask, scaling, dropout, example_spans,
                            softcap=softcap, sliding_window=sliding_window, **kwargs)
    check_attention_kwargs(module, kwargs)
    _no_dropout("flex_spans", dropout)
    rows, heads, length, _ = query.shape
    layout = layout_of(example_spans, rows, length, query.device)
    query, key, value = common_dtype(query, key, value, half_only=False)

    def capped(score, b, h, q, kv):  # Gemma 2's attention logit soft-cap
        return softcap * torch.tanh(score / softcap)
    if query.device.type == "cuda":  # one compiled kernel for every row count (probe, training, validation tail)
        for x in (query, key, value):
            torch._dynamo.mark_dynamic(x, 0)
    out = _flex()(query, key, value, block_mask=flex_block_mask(layout, sliding_window),
                  score_mod=capped if softcap else None, scale=scaling, enable_gqa=key.shape[1] != heads)
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
    Baichuan's ALiBi attention does; `flex` then loads its own FlexAttention path, one kernel a layer with ALiBi
    as a score modifier). `auto`: one varlen kernel per layer on an Ampere-or-newer GPU computing in bf16, the
    span loop elsewhere (on a CPU it is the fastest: one small attention per example, no mask) and for Baichuan.
    """
    if choice not in ATTENTION_CHOICES:
        raise FinetuneError(f"--attn-implementation must be one of {', '.join(ATTENTION_CHOICES)}, not {choice!r}")
    if choice == "auto":
        fastest = varlen_available(device) and mixed_precision == "bf16"
        return KERNEL_NAMES["varlen"] if fastest and span_loop_name else span_loop_name
    if choice == "spans":
        return span_loop_name
    if span_loop_name is None and choice == "varlen":
        raise FinetuneError("--attn-implementation varlen: torch's varlen kernel has no ALiBi (Baichuan); use flex, "
                            "spans or auto")
    if device.type != "cuda":
        raise FinetuneError(f"--attn-implementation {choice} needs a GPU (varlen is CUDA FlashAttention; FlexAttention "
                            f"has no CPU backward); use spans or auto on a CPU")
    if choice == "varlen" and not varlen_available(device):
        raise FinetuneError("--attn-implementation varlen needs torch's varlen attention on an Ampere or newer GPU")
    if choice == "varlen" and mixed_precision != "bf16":
        raise FinetuneError("--attn-implementation varlen computes in bf16 (FlashAttention has no fp32); use "
                            "--mixed-precision bf16, or spans or flex")
    if span_loop_name is None:  # Baichuan: its own FlexAttention path, ALiBi as a score modifier
        return "flex_attention"
    return KERNEL_NAMES[choice]


AttentionInterface.register("varlen_spans", varlen_spans)
AttentionInterface.register("flex_spans", flex_spans)
