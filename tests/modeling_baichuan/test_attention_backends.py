"""Attention backends of modeling_baichuan, for the ALiBi (13B-style) and rotary (7B-style) variants: eager, sdpa
and flex_attention (forward; flex has no CPU backward) agree in float32; attn_implementation picks the function;
packed rows through transformers' standard path (restarting position_ids) train exactly like one example at a
time; FlashAttention's plumbing (varlen, unpadding, ALiBi slopes) is checked against a float64 reference kernel
with flash-attn's documented semantics, because flash-attn does not run on a CPU."""

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from test_modeling_baichuan import MASKS, tiny_model
from transformers import AttentionInterface, AutoModelForCausalLM

import modeling_baichuan as mb

VARIANTS = ["alibi_normhead", "rope_normhead"]
TOLERANCE = 1e-5  # float32


def logits_with(model, implementation, ids=None, **kwargs):
    model.config._attn_implementation = implementation
    if ids is not None:
        kwargs["input_ids"] = ids
    with torch.no_grad():
        return model(use_cache=False, **kwargs).logits


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_backends_agree_in_float32(variant):
    model = tiny_model(variant).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 9))
    for mask_name, mask in MASKS.items():
        am = None if mask is None else torch.tensor(mask)
        eager = logits_with(model, "eager", ids, attention_mask=am)
        for implementation in ("sdpa", "flex_attention"):
            other = logits_with(model, implementation, ids, attention_mask=am)
            # every position, padding included: padding attends to itself in every backend
            err = (other - eager).abs().max().item()
            assert err < TOLERANCE, (implementation, mask_name, err)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_attention_cached_decoding(variant):
    model = tiny_model(variant).eval()
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    steps = {}
    for implementation in ("eager", "flex_attention"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            prefill = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
            step = model(ids[:, 7:], attention_mask=mask, cache=getattr(prefill, mb.CACHE_FIELD), use_cache=True)
        steps[implementation] = step.logits
    assert (steps["flex_attention"] - steps["eager"]).abs().max() < TOLERANCE


def counting_attention(calls):
    def attend(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask)
        return mb.eager_attention(module, query, key, value, attention_mask, **kwargs)

    return attend


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention", "baichuan_test_counting"])
def test_attn_implementation_is_chosen_at_load(variant, implementation, tmp_path):
    calls = []
    AttentionInterface.register("baichuan_test_counting", counting_attention(calls))
    source = tiny_model(variant).eval()
    source.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor(MASKS["left_pad"])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    expected = logits_with(source, "sdpa", ids, attention_mask=mask)
    assert (got - expected).abs().max() < TOLERANCE
    if implementation == "baichuan_test_counting":
        # a registered function is called once per layer, with ALiBi (if any) inside its additive mask
        assert len(calls) == model.config.num_hidden_layers
        heads = model.config.num_attention_heads if variant == "alibi_normhead" else 1
        assert calls[0].dtype == torch.float32 and calls[0].shape == (2, heads, 9, 9)


# ------------------------------------------------------------------------------------------------------------
# packed rows
# ------------------------------------------------------------------------------------------------------------

EXAMPLE_LENGTHS = [[5, 9, 3, 7], [11, 2, 6]]  # per row; rows are padded to the longest with a padding tail


def packed_batch():
    """Rows as the training collator lays them out: examples end to end, positions restarting at 0 for every
    example and for the padding tail, example ids 1, 2, ... (0 on padding), no loss on an example's first token."""
    torch.manual_seed(2)
    width = max(sum(row) for row in EXAMPLE_LENGTHS) + 2
    batch = {name: torch.zeros((len(EXAMPLE_LENGTHS), width), dtype=torch.long)
             for name in ("input_ids", "position_ids", "example_ids")}
    batch["labels"] = torch.full((len(EXAMPLE_LENGTHS), width), -100)
    examples, spans = [], []
    for row, lengths in enumerate(EXAMPLE_LENGTHS):
        start, row_spans = 0, []
        for number, length in enumerate(lengths, start=1):
            ids = torch.randint(3, 97, (length,))
            end = start + length
            batch["input_ids"][row, start:end] = ids
            batch["labels"][row, start + 1:end] = ids[1:]
            batch["position_ids"][row, start:end] = torch.arange(length)
            batch["example_ids"][row, start:end] = number
            examples.append(ids)
            row_spans.append((start, end))
            start = end
        batch["position_ids"][row, start:] = torch.arange(width - start)
        row_spans.append((start, width))
        spans.append(row_spans)
    batch["example_spans"] = spans
    return batch, examples


def loss_and_grads(model, calls):
    model.zero_grad()
    total = 0.0
    for kwargs in calls:
        loss = model(use_cache=False, **kwargs).loss
        loss.backward()
        total += loss.detach()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_training_through_standard_path_equals_one_by_one(variant, implementation):
    model = tiny_model(variant).train()
    model.config._attn_implementation = implementation
    batch, examples = packed_batch()
    targets = sum(len(ids) - 1 for ids in examples)
    one_by_one = [dict(input_ids=ids[None], labels=ids[None], num_items_in_batch=targets) for ids in examples]
    expected_loss, expected = loss_and_grads(model, one_by_one)

    common = dict(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=targets)
    forms = {
        "position_ids": dict(position_ids=batch["position_ids"]),  # transformers' padding-free form
        "example_ids": dict(attention_mask=batch["example_ids"], position_ids=batch["position_ids"]),
        "training_spans": dict(attention_mask=batch["example_ids"], position_ids=batch["position_ids"],
                             example_spans=batch["example_spans"]),
    }
    for form, kwargs in forms.items():
        loss, grads = loss_and_grads(model, [dict(common, **kwargs)])
        assert torch.allclose(loss, expected_loss, rtol=1e-5), form
        for name, grad in expected.items():
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), (form, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_tail_outside_every_span_trains_like_a_tail_span_of_its_own(variant):
    """The collator gives the padding tail no span: those positions attend to nothing (zeros), and the loss and
    gradients stay those of a run where the tail has its own span (nothing real attends to padding)."""
    model = tiny_model(variant).train()
    batch, examples = packed_batch()
    targets = sum(len(ids) - 1 for ids in examples)
    common = dict(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=targets,
                  position_ids=batch["position_ids"])
    examples_only = [spans[:-1] for spans in batch["example_spans"]]  # every row here ends in a padding tail
    assert all(spans[-1][1] < batch["input_ids"].shape[1] for spans in examples_only)
    expected_loss, expected = loss_and_grads(model, [dict(common, example_spans=batch["example_spans"])])
    loss, grads = loss_and_grads(model, [dict(common, example_spans=examples_only)])
    assert torch.allclose(loss, expected_loss, rtol=1e-6)
    for name, grad in expected.items():
        assert torch.isfinite(grads[name]).all(), name
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_attention_outside_every_span_is_zero_and_spans_attend_only_within_themselves():
    torch.manual_seed(3)
    query, key, value = (torch.randn(2, 3, 10, 4) for _ in range(3))
    spans = [[(0, 4), (4, 7)], [(2, 9)]]  # row 0: a tail 7..10 in no span; row 1: a gap 0..2 and a tail 9..10
    out = mb.attend_within_spans(query, key, value, None, spans).transpose(1, 2)
    for row, row_spans in enumerate(spans):
        covered = torch.zeros(10, dtype=torch.bool)
        for start, end in row_spans:
            covered[start:end] = True
            expected = torch.nn.functional.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True)
            assert torch.allclose(out[row:row + 1, :, start:end], expected, atol=1e-6)
        assert (out[row, :, ~covered] == 0).all()


def test_position_ids_without_restarts_stay_one_sequence():
    model = tiny_model("alibi_normhead").eval()
    ids = torch.randint(3, 97, (2, 9))
    positions = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(model(ids, position_ids=positions, use_cache=False).logits, model(ids).logits,
                              atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# FlashAttention plumbing, through a reference kernel
# ------------------------------------------------------------------------------------------------------------


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func's documented result in float64: (batch, length, heads, dim) inputs, causal mask aligned to
    the bottom right, ALiBi bias -slope * |i + k_len - q_len - j|."""
    q_len, k_len = q.shape[1], k.shape[1]
    scale = softmax_scale or q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    i = torch.arange(q_len)[:, None] + k_len - q_len
    j = torch.arange(k_len)[None, :]
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.double()[:, None, None] * (i - j).abs()
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func: tokens of all sequences end to end, sequence n is [cu[n], cu[n + 1])."""
    assert int(max_seqlen_q) == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    for n in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = cu_seqlens_q[n], cu_seqlens_q[n + 1], cu_seqlens_k[n], cu_seqlens_k[n + 1]
        out[qs:qe] = reference_flash(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale=softmax_scale,
                                     causal=causal, alibi_slopes=alibi_slopes)[0]
    return out


@pytest.fixture
def reference_flash_kernel(monkeypatch):
    def lazy_import(implementation, *args, **kwargs):
        return ((reference_flash, reference_flash_varlen, None, flash_utils._pad_input, flash_utils._unpad_input),
                (flash_utils._lazy_define_process_function(reference_flash_varlen), dict))

    monkeypatch.setattr(mb, "lazy_import_flash_attention", lazy_import)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lazy_import)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flash_attention_plumbing(variant, reference_flash_kernel):
    model = tiny_model(variant).eval()
    ids = torch.randint(3, 97, (2, 9))
    for mask_name, mask in MASKS.items():
        am = None if mask is None else torch.tensor(mask)
        eager = logits_with(model, "eager", ids, attention_mask=am)
        flash = logits_with(model, "flash_attention_2", ids, attention_mask=am)
        assert (flash - eager).abs().max() < TOLERANCE, mask_name
    batch, _ = packed_batch()  # padding-free rows, batch of 2: cu_seq_lens derived here or passed (Llama's way)
    positions = {"position_ids": batch["position_ids"]}
    (cu_q, cu_k), (max_q, max_k) = flash_utils.prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    varlen = dict(positions, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    eager = logits_with(model, "eager", batch["input_ids"], **positions)
    for implementation, kwargs in (("flash_attention_2", positions), ("flash_attention_2", varlen), ("sdpa", varlen)):
        got = logits_with(model, implementation, batch["input_ids"], **kwargs)
        assert (got - eager).abs().max() < TOLERANCE, (implementation, list(kwargs))
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # cached decoding with left padding
    kwargs = dict(attention_mask=(prompts > 0).long(), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    model.config._attn_implementation = "sdpa"
    expected = model.generate(prompts, **kwargs)
    model.config._attn_implementation = "flash_attention_2"
    assert torch.equal(model.generate(prompts, **kwargs), expected)


@pytest.mark.parametrize("dtype, upcast", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_cpu_sdpa_upcasts_half_precision_only(monkeypatch, dtype, upcast):
    """float32 runs hand their own tensors to transformers' sdpa (no copies); bf16/fp16 attend in float32."""
    seen = {}

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.update(query=query, mask=attention_mask)
        return query.transpose(1, 2), None

    monkeypatch.setitem(mb.ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording_sdpa)
    query, key, value = (torch.randn(1, 2, 5, 4, dtype=dtype) for _ in range(3))
    mask = torch.zeros(1, 2, 5, 5, dtype=dtype)
    out, _ = mb.sdpa_attention(None, query, key, value, mask)
    assert out.dtype == dtype
    if upcast:
        assert seen["query"].dtype == torch.float32 and seen["mask"].dtype == torch.float32
    else:
        assert seen["query"] is query and seen["mask"] is mask


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("as_layout", [False, True])
def test_training_spans_on_flex_attention_are_one_kernel_a_layer_and_equal_the_span_path(variant, as_layout):
    """Loaded with flex_attention, the training scripts' `example_spans` become example ids (one FlexAttention call
    a layer, ALiBi as its score modifier) and give the logits of the span path on every position in a span;
    the collator's layout (with its example ids already a tensor) and plain span lists alike."""
    from finetune.ops.example_spans import ExampleSpans

    batch, _ = packed_batch()
    spans = [row[:-1] for row in batch["example_spans"]]  # the collator gives the padding tail no span
    width = batch["input_ids"].shape[1]
    model = tiny_model(variant).eval()
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  example_spans=ExampleSpans(spans, width) if as_layout else spans)
    span_path = logits_with(model, "sdpa", **inputs)
    routed = []
    real = mb.span_example_ids
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mb, "span_example_ids", lambda *args: routed.append(1) or real(*args))
        flex = logits_with(model, "flex_attention", **inputs)
    assert routed == [1]  # once a forward, for every layer
    inside = batch["example_ids"] > 0
    torch.testing.assert_close(flex[inside], span_path[inside], atol=TOLERANCE, rtol=TOLERANCE)
