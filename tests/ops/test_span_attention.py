"""finetune/ops/span_attention.py: packed rows give each example what it gets alone."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.errors import FinetuneError
from finetune.ops import span_attention

LENGTHS = (5, 9, 3)
WIDTH = 20  # 17 tokens of examples, then a padding tail of 3


def tiny_llama(attention):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)
    return LlamaForCausalLM._from_config(config, attn_implementation=attention, dtype=torch.float32).eval()


def test_packed_logits_equal_each_example_alone():
    reference = tiny_llama("sdpa")
    packed = tiny_llama(span_attention.ATTENTION_NAME)
    packed.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 128, (length,), generator=generator) for length in LENGTHS]
    ids = torch.cat(examples + [torch.zeros(WIDTH - sum(LENGTHS), dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(length) for length in LENGTHS] + [torch.arange(WIDTH - sum(LENGTHS))])[None]
    starts = [0, 5, 14]
    spans = [[(start, start + length) for start, length in zip(starts, LENGTHS)]]
    with torch.no_grad():
        logits = packed(input_ids=ids, position_ids=positions, example_spans=spans, use_cache=False).logits[0]
        for start, example in zip(starts, examples):
            alone = reference(input_ids=example[None], use_cache=False).logits[0]
            assert torch.allclose(logits[start:start + len(example)], alone, atol=1e-5, rtol=0)
        # Attending across examples would change them: the check above can fail.
        causal = reference(input_ids=ids[:, :sum(LENGTHS)], use_cache=False).logits[0]
        assert not torch.allclose(causal[5:14], logits[5:14], atol=1e-3)


def qkv(batch=1, heads=4, kv_heads=4, length=12, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, length, dim, generator=generator),
            torch.randn(batch, kv_heads, length, dim, generator=generator),
            torch.randn(batch, kv_heads, length, dim, generator=generator))


def reference_attention(query, key, value, scaling=None, window=None, softcap=None):
    """Causal attention written out: scores, optional soft-cap, window and causal mask, softmax."""
    scaling = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    length = query.shape[-2]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ value


def test_each_span_attends_only_within_itself_and_the_tail_to_nothing():
    query, key, value = qkv(batch=2)
    spans = [[(0, 4), (4, 10)], [(0, 12)]]  # row 0: positions 10 and 11 are padding, in no span
    out, weights = span_attention.packed_spans(torch.nn.Module(), query, key, value, None, example_spans=spans)
    assert weights is None and out.shape == (2, 12, 4, 8)  # (batch, length, heads, head_dim)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            want = reference_attention(*(t[row:row + 1, :, start:end] for t in (query, key, value)))
            assert torch.allclose(out[row, start:end], want[0].transpose(0, 1), atol=1e-5)
    assert torch.equal(out[0, 10:], torch.zeros(2, 4, 8))


def test_without_spans_it_is_plain_causal_attention_and_a_mask_is_refused():
    query, key, value = qkv()
    out, _ = span_attention.packed_spans(torch.nn.Module(), query, key, value, None)
    assert torch.allclose(out, reference_attention(query, key, value).transpose(1, 2), atol=1e-5)
    with pytest.raises(ValueError, match="packed_spans needs example_spans"):
        span_attention.packed_spans(torch.nn.Module(), query, key, value, torch.ones(1, 1, 12, 12))


def test_grouped_key_value_heads_are_shared_by_their_query_heads():
    query, key, value = qkv(heads=4, kv_heads=2)
    out, _ = span_attention.packed_spans(torch.nn.Module(), query, key, value, None, example_spans=[[(0, 12)]])
    expanded = [t.repeat_interleave(2, dim=1) for t in (key, value)]  # query heads 0, 1 share kv head 0
    assert torch.allclose(out, reference_attention(query, *expanded).transpose(1, 2), atol=1e-5)


def test_scaling_sliding_window_and_softcap_are_honoured():
    query, key, value = qkv()
    out, _ = span_attention.packed_spans(torch.nn.Module(), query, key, value, None, scaling=0.3, sliding_window=4,
                                         softcap=0.5, example_spans=[[(0, 12)]])
    want = reference_attention(query, key, value, scaling=0.3, window=4, softcap=0.5)
    assert torch.allclose(out, want.transpose(1, 2), atol=1e-5)
    plain, _ = span_attention.packed_spans(torch.nn.Module(), query, key, value, None, example_spans=[[(0, 12)]])
    assert not torch.allclose(out, plain, atol=1e-3)


def test_window_mask_keeps_the_last_keys_of_each_query():
    assert span_attention.window_mask(4, None, torch.device("cpu")) is None
    assert span_attention.window_mask(4, 4, torch.device("cpu")) is None  # the window covers the whole example
    assert span_attention.window_mask(4, 2, torch.device("cpu")).int().tolist() == [[1, 0, 0, 0],
                                                                                   [1, 1, 0, 0],
                                                                                   [0, 1, 1, 0],
                                                                                   [0, 0, 1, 1]]


def test_keywords_that_change_nothing_are_ignored():
    query, key, value = qkv()
    out, _ = span_attention.packed_spans(torch.nn.Module(), query, key, value, None, position_ids=torch.arange(12),
                                         use_cache=False, layer_idx=0, num_items_in_batch=7, example_spans=None)
    assert torch.allclose(out, F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2),
                          atol=1e-6)


def test_attention_the_packed_path_cannot_honour_is_refused():
    query = torch.randn(1, 2, 5, 8)
    with pytest.raises(FinetuneError, match="cannot honour head_mask of Linear"):
        span_attention.packed_spans(torch.nn.Linear(1, 1), query, query, query, None, head_mask=torch.zeros(2))
    with pytest.raises(FinetuneError, match="does not run its attention through transformers' attention interface"):
        span_attention.check_model_routes_attention(torch.nn.Linear(1, 1))


def test_attention_sinks_join_each_querys_softmax_as_gpt_oss_computes_them():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups = torch.nn.Parameter(torch.tensor([1.5, -0.5, 0.0, 2.0])), 2
    spans = [[(0, 5), (5, 12)]]
    got, _ = span_attention.packed_spans(module, query, key, value, None, scaling=0.3, example_spans=spans,
                                         s_aux=module.sinks, sliding_window=3)
    for start, end in spans[0]:
        length = end - start
        allowed = span_attention.window_mask(length, 3, query.device)
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        want, _ = eager_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                          value[:, :, start:end], mask, scaling=0.3)
        assert torch.allclose(got[:, start:end], want, atol=1e-6)
    without, _ = span_attention.packed_spans(module, query, key, value, None, scaling=0.3, example_spans=spans,
                                             sliding_window=3)
    assert (without - got).abs().max() > 0.1  # the sinks change the output: the test can fail


def test_the_one_kernel_paths_leave_attention_sinks_to_the_span_loop():
    from finetune.ops import varlen_attention

    torch.manual_seed(0)
    query = torch.randn(1, 2, 9, 8)
    sinks, spans = torch.tensor([1.0, -1.0]), [[(0, 4), (4, 9)]]
    want, _ = span_attention.packed_spans(None, query, query, query, None, example_spans=spans, s_aux=sinks)
    for path in (varlen_attention.varlen_spans, varlen_attention.flex_spans):
        got, _ = path(None, query, query, query, None, example_spans=spans, s_aux=sinks)
        assert torch.equal(got, want)
