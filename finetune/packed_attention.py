"""Attention for packed rows: causal attention inside each example's own span, nothing across.

A block-diagonal mask gives the right answer but still computes every (query, key) pair of the row and throws
most of them away; on a 1024-token row holding five examples that is about five times the useful work, plus a
dense mask to build. Here each example's span gets its own causal `scaled_dot_product_attention`, so only the
pairs that count are computed.

Importing this module registers the implementation as "packed_sdpa" with transformers. The training scripts
load Llama with `attn_implementation="packed_sdpa"` and pass each row's spans (computed on the host by the
collator, so no device sync) as the `segment_spans` keyword of the forward call. Without spans it falls back to
ordinary causal attention. Saved models keep the standard attention.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface


def packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segment_spans=None,
                **kwargs):
    """query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim), None."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if segment_spans is None:
        if attention_mask is not None:
            raise ValueError("packed_sdpa needs segment_spans, or no attention_mask (plain causal attention)")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None
    out = torch.zeros_like(query)  # positions in no span (the padding tail) attend to nothing
    for row, spans in enumerate(segment_spans):
        for start, end in spans:
            out[row:row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("packed_sdpa", packed_sdpa)
