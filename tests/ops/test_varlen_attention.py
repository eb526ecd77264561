"""finetune/ops/varlen_attention.py: one attention kernel per layer for packed rows (varlen_spans, flex_spans),
checked on a CPU against the span loop and a stand-in that follows the kernel's documented contract."""

import pytest
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


def flash_varlen_stand_in(query, key, value, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """A CPU stand-in for torch's varlen FlashAttention that refuses what the CUDA kernel refuses: any dtype but
    fp16/bf16, query/key/value of different dtypes, a last dimension that is not contiguous, head dims that are not
    a multiple of 8 up to 256, int32 cumulative lengths that do not cover every token; then it computes each
    sequence with SDPA in fp32, as the kernel accumulates, and returns the input dtype."""
    assert query.dtype in (torch.float16, torch.bfloat16), f"FlashAttention only supports fp16 and bf16, not {query.dtype}"
    assert query.dtype == key.dtype == value.dtype, "query, key and value must have the same dtype"
    assert all(x.dim() == 3 and x.stride(-1) == 1 for x in (query, key, value)), "last dimension must be contiguous"
    assert query.shape[-1] % 8 == 0 and query.shape[-1] <= 256, "head dim must be a multiple of 8, at most 256"
    assert cu_q.dtype == torch.int32 and cu_q[0] == 0 and cu_q[-1] == query.shape[0] and torch.equal(cu_q, cu_k)
    assert max_q == max_k and window_size[1] == 0
    out = torch.empty_like(query)
    for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        assert max_q >= end - start
        q, k, v = (x[start:end].transpose(0, 1)[None].float() for x in (query, key, value))
        mask = None
        if window_size[0] >= 0:
            distance = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
            mask = (distance >= 0) & (distance <= window_size[0])
        attended = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa)
        out[start:end] = attended[0].transpose(0, 1).to(query.dtype)
    return out


def test_varlen_spans_passes_the_flattened_layout_the_kernel_documents(monkeypatch):
    """torch's varlen kernel is CUDA only: the strict stand-in above checks everything our side does."""
    import torch.nn.attention.varlen as varlen

    from finetune.ops.varlen_attention import varlen_spans

    monkeypatch.setattr(varlen, "varlen_attn", flash_varlen_stand_in)
    query, key, value = (x.bfloat16() for x in _qkv())
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _span_loop(*(x.float() for x in (query, key, value))), atol=2e-2, rtol=2e-2)


def test_the_stand_in_refuses_fp32_and_mixed_dtypes_as_flash_attention_does():
    query, key, value = (x.transpose(1, 2).reshape(72, -1, 8).contiguous() for x in _qkv(kv_heads=4))
    bounds = torch.tensor([0, 24, 48, 72], dtype=torch.int32)
    for q, k, v in ((query, key, value), (query, key, value.bfloat16()), (query.bfloat16(), key, value.bfloat16())):
        with pytest.raises(AssertionError):
            flash_varlen_stand_in(q, k, v, bounds, bounds, 24, 24, window_size=(-1, 0))


def test_fp32_weights_under_bf16_autocast_train_through_the_varlen_kernel(tiny_run, monkeypatch):
    """The one-GPU full fine-tune: fp32 master weights, bf16 autocast. Llama's rotary embedding multiplies query and
    key by fp32 cos/sin, so they reach the attention in fp32 beside a bf16 value; FlashAttention refuses that. The
    real training forward and backward run here through the strict stand-in, and match the span loop."""
    import torch.nn.attention.varlen as varlen
    from transformers import AutoModelForCausalLM

    import finetune.ops.varlen_attention  # noqa: F401  (registers varlen_spans)
    from finetune.data.batches import TokenTable, collate_rows, load_prepared_dataset

    monkeypatch.setattr(varlen, "varlen_attn", flash_varlen_stand_in)
    table = TokenTable(load_prepared_dataset(tiny_run["data"])["train"])
    batch = collate_rows(table, [[0, 1, 2], [3, 4]], pad_id=0)
    results = {}
    for attention in ("varlen_spans", "packed_spans"):
        model = AutoModelForCausalLM.from_pretrained(tiny_run["llama"], dtype=torch.float32,
                                                     attn_implementation=attention)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         example_spans=batch["example_spans"], use_cache=False).loss
        loss.backward()
        results[attention] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(results["varlen_spans"][0], results["packed_spans"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results["varlen_spans"][1], results["packed_spans"][1], atol=5e-2, rtol=5e-2)


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

    def windowed_kernel(*args, window_size=(-1, -1), **kwargs):
        windows.append(window_size)
        return flash_varlen_stand_in(*args, window_size=window_size, **kwargs)
    monkeypatch.setattr(varlen, "varlen_attn", windowed_kernel)
    half = [x.bfloat16() for x in (query, key, value)]
    out, _ = varlen_spans(None, *half, None, scaling=0.3, example_spans=SPANS, sliding_window=4)
    assert windows == [(3, 0)]  # the query and the 3 keys before it: transformers' window of 4
    expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, sliding_window=4)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out, _ = varlen_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, softcap=1.5)
    assert windows == [(3, 0)]
    expected, _ = packed_spans(None, query, key, value, None, scaling=0.3, example_spans=SPANS, softcap=1.5)
    torch.testing.assert_close(out, expected)


def test_the_layout_is_the_collators_and_the_flex_mask_is_made_once_per_forward(tiny_run, monkeypatch):
    """The collator builds the layout's tensors once on the host; in the forward no layer builds a layout, and the
    flex block mask is made by the first layer and reused by the others (the next micro-batch makes its own)."""
    import torch.nn.attention.flex_attention as flex
    from transformers import AutoModelForCausalLM

    import finetune.ops.example_spans as example_spans
    import finetune.ops.varlen_attention  # noqa: F401  (registers flex_spans)
    from finetune.data.batches import TokenTable, collate_rows, load_prepared_dataset

    table = TokenTable(load_prepared_dataset(tiny_run["data"])["train"])
    batches = [collate_rows(table, rows, pad_id=0) for rows in ([[0, 1, 2], [3, 4]], [[5, 6], [7]])]
    model = AutoModelForCausalLM.from_pretrained(tiny_run["llama"], dtype=torch.float32,
                                                 attn_implementation="flex_spans")
    assert model.config.num_hidden_layers == 2
    layouts, masks = [], []
    real_layout, real_mask = example_spans.ExampleSpans.__init__, flex.create_block_mask
    monkeypatch.setattr(example_spans.ExampleSpans, "__init__",
                        lambda self, *args: layouts.append(1) or real_layout(self, *args))
    monkeypatch.setattr(flex, "create_block_mask", lambda *args, **kwargs: masks.append(1) or real_mask(*args, **kwargs))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  example_spans=batch["example_spans"], use_cache=False)
    assert layouts == [] and len(masks) == 2  # one mask per forward, none rebuilt by the second layer
