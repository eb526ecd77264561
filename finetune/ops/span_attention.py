"""Attention for packed rows: causal attention inside each example's own span, nothing across.

A block-diagonal mask gives the right answer but still computes every (query, key) pair of the row and throws
most of them away; on a 1024-token row holding five examples that is about five times the useful work, plus a
dense mask to build. Here each example's span gets its own causal attention call, so only the pairs that count
are computed.

Importing this module registers the implementation as "packed_spans" with transformers (the name holds no
"sdpa": transformers treats any name containing it as SDPA, which some models, Gemma 2, refuse). The training
scripts load the model with `attn_implementation="packed_spans"` and pass each row's spans (computed on the
host by the collator, so no device sync) as the `example_spans` keyword of the forward call. Without spans it
falls back to ordinary causal attention. Saved models keep the standard attention.

Each span computes what the model's own attention computes on that example alone: its query scaling (Gemma's
query_pre_attn_scalar arrives as `scaling`), the sliding window of the layer (Mistral, Phi-3, Gemma 2/3 local
layers: the last `sliding_window` keys, the query's own included), attention logit soft-capping (Gemma 2) and
attention sinks (gpt-oss's `s_aux`: a learned logit per head that joins each query's softmax denominator and
attends to nothing). An attention keyword it cannot honour is refused with one line rather than ignored.
"""
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from finetune.errors import FinetuneError

ATTENTION_NAME = "packed_spans"
# Keywords that reach the attention and change nothing here: positions are already in the rotary embedding,
# training runs without a cache, and the rest are the forward call's own (the loss's token count, which outputs
# to return: a mixture-of-experts model's router-logits flag travels down with the other keywords).
IGNORED_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
                            "output_attentions", "output_hidden_states", "return_dict", "is_causal", "layer_idx",
                            "num_items_in_batch", "output_router_logits"})


def check_attention_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse any attention keyword this path does not honour (attention sinks, say) instead of dropping it."""
    unknown = sorted(key for key, value in kwargs.items() if key not in IGNORED_KWARGS and value is not None)
    if unknown:
        raise FinetuneError(f"the packed attention cannot honour {', '.join(unknown)} of {type(module).__name__}; "
                            f"this model cannot be trained with packed rows here")


def check_model_routes_attention(model: torch.nn.Module) -> None:
    """A model whose attention does not go through transformers' attention interface never sees the spans:
    its packed examples would attend to each other. Refuse it."""
    if not getattr(model, "_supports_attention_backend", False):
        raise FinetuneError(f"{type(model).__name__} does not run its attention through transformers' attention "
                            f"interface, so packed rows would attend across examples; it cannot be trained with packed rows")


def window_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (length, length) mask: causal, and each query sees only its last `sliding_window` keys (itself
    included), as transformers' sliding-window mask; None when that is plain causal attention."""
    if sliding_window is None or length <= sliding_window:
        return None
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    return (distance >= 0) & (distance < sliding_window)


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       softcap: float | None, sinks: torch.Tensor | None, mask: torch.Tensor | None,
                       dropout: float = 0.0) -> torch.Tensor:
    """Causal attention with the scores formed explicitly, for what SDPA has no step for: the logits soft-capped,
    softcap * tanh(logits / softcap), before the softmax (Gemma 2), and attention sinks, one logit per head
    (heads,) added to each query's softmax denominator and then dropped (gpt-oss). (batch, heads, length,
    head_dim) in and out."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        length = query.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).float()
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs.to(query.dtype), p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def span_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None,
                   dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one example (or a whole unpacked row) as the model computes it alone, with its
    sliding window, soft-cap and sinks; key/value heads already expanded to the query heads."""
    mask = window_mask(query.shape[-2], sliding_window, query.device)
    if softcap or sinks is not None:
        scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        return explicit_attention(query, key, value, scale, softcap, sinks, mask, dropout)
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)


def packed_spans(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 example_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    sliding_window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    check_attention_kwargs(module, kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if example_spans is None:
        if attention_mask is not None:
            raise ValueError(f"{ATTENTION_NAME} needs example_spans, or no attention_mask (plain causal attention)")
        out = span_attention(query, key, value, scaling, dropout, sliding_window, softcap, sinks)
        return out.transpose(1, 2).contiguous(), None
    out = torch.zeros_like(query)  # positions in no span (the padding tail) attend to nothing
    for row, spans in enumerate(example_spans):
        for start, end in spans:
            out[row:row + 1, :, start:end] = span_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                scaling, dropout, sliding_window, softcap, sinks)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, packed_spans)
