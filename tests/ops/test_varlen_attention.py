"""finetune/ops/varlen_attention.py: one attention kernel per layer for packed rows (varlen_spans, flex_spans),
checked on a CPU against the span loop and a stand-in that follows the kernel's documented contract."""

import torch

# ---- one attention kernel per layer for packed rows --------------------------------------------------------

SPANS = [[(0, 5), (5, 17), (17, 24)], [(0, 24)], [(0, 9), (9, 20), (20, 24)]]


def _qkv(kv_heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 24, 8, generator=generator), torch.randn(3, kv_heads, 24, 8, generator=generator),
            torch.randn(3, kv_heads, 24, 8, generator=generator))


def _span_loop(query, key, value):
    """Each example alone, one causal attention per span: the reference."""
    key, value = key.repeat_interleave(4 // key.shape[1], 1), value.repeat_interleave(4 // value.shape[1], 1)
    out = torch.empty_like(query)
    for row, spans in enumerate(SPANS):
        for start, end in spans:
            out[row, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True, scale=0.3)[0]
    return out.transpose(1, 2)


def test_cumulative_lengths_lay_the_rows_end_to_end():
    from finetune.ops.varlen_attention import cumulative_lengths, example_ids

    bounds, longest = cumulative_lengths(SPANS, 24, "cpu")
    assert bounds.tolist() == [0, 5, 17, 24, 48, 57, 68, 72] and bounds.dtype == torch.int32 and longest == 24
    assert example_ids(SPANS, 24, "cpu")[0].tolist() == [0] * 5 + [1] * 12 + [2] * 7
    # The collator gives the padding tail no span: it becomes a sequence of its own, as does a gap between spans.
    bounds, longest = cumulative_lengths([[(0, 5), (7, 10)]], 12, "cpu")
    assert bounds.tolist() == [0, 5, 7, 10, 12] and longest == 5
    assert example_ids([[(0, 5)]], 8, "cpu")[0].tolist() == [0] * 5 + [-1] * 3


def test_varlen_spans_passes_the_flattened_layout_the_kernel_documents(monkeypatch):
    """torch's varlen kernel is CUDA only: a CPU stand-in that follows its documented contract (tokens x heads x
    dim, cumulative lengths, window (-1, 0) = causal, enable_gqa) checks everything our side does."""
    import torch.nn.attention.varlen as varlen

    from finetune.ops.varlen_attention import varlen_spans

    def documented_kernel(query, key, value, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(query)
        for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
            assert max_q >= end - start
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
        return out
    monkeypatch.setattr(varlen, "varlen_attn", documented_kernel)
    query, key, value = _qkv()
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS)
    torch.testing.assert_close(out, _span_loop(query, key, value))


def test_flex_spans_equals_the_span_loop_forward():
    """FlexAttention has no CPU backward in this torch: the forward is checked here, gradients by gpu_smoke.py."""
    from finetune.ops.varlen_attention import flex_spans

    query, key, value = _qkv(seed=1)
    out, _ = flex_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS)
    torch.testing.assert_close(out, _span_loop(query, key, value))


def test_one_kernel_paths_honour_sliding_windows_and_soft_caps(monkeypatch):
    """Mistral's window and Gemma 2's soft-cap on the one-kernel paths: flex computes them in its mask and score;
    varlen gives the window to the kernel and leaves a soft-capped model to the span loop (the kernel has none)."""
    import torch.nn.attention.varlen as varlen

    from finetune.ops.span_attention import packed_spans
    from finetune.ops.varlen_attention import flex_spans, varlen_spans

    query, key, value = _qkv(seed=2)
    for extra in ({"sliding_window": 4}, {"softcap": 1.5}, {"sliding_window": 4, "softcap": 1.5}):
        expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, **extra)
        assert not torch.allclose(expected, _span_loop(query, key, value), atol=1e-3)  # the setting shows
        out, _ = flex_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, **extra)
        torch.testing.assert_close(out, expected)

    windows = []

    def windowed_kernel(query, key, value, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
        windows.append(window_size)
        return torch.zeros_like(query)
    monkeypatch.setattr(varlen, "varlen_attn", windowed_kernel)
    varlen_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, sliding_window=4)
    assert windows == [(3, 0)]  # the query and the 3 keys before it: transformers' window of 4
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, softcap=1.5)
    assert windows == [(3, 0)]
    expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, softcap=1.5)
    torch.testing.assert_close(out, expected)


def test_the_one_kernel_layout_is_built_once_per_forward(monkeypatch):
    """Every layer of a forward gets the same span list: the first layer builds the layout, the rest reuse it; the
    next forward's new list builds it again."""
    import finetune.ops.varlen_attention as one_kernel

    builds = []
    real = one_kernel.example_ids
    monkeypatch.setattr(one_kernel, "example_ids", lambda *args: builds.append(1) or real(*args))
    query, key, value = _qkv(seed=3)
    spans = [list(row) for row in SPANS]
    first, _ = one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, example_spans=spans)
    again, _ = one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, example_spans=spans)
    assert len(builds) == 1 and torch.equal(first, again)
    one_kernel.flex_spans(None, query, key, value, None, scaling=0.3, example_spans=[list(row) for row in SPANS])
    assert len(builds) == 2
