"""Tests for modeling_baichuan: numerics against a float64 reference written from SPEC.md, masks, caching,
generation, release-folder loading without remote code, and the tokenizer (against sentencepiece itself)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import modeling_baichuan as mb

REAL_TOKENIZER = Path(__file__).resolve().parents[2].parent / "shared/reference/baichuan2/tokenizer.model"

VARIANTS = {
    # 6 heads: not a power of two, so the second slope series is used.
    "alibi_normhead": dict(position_embedding="alibi", norm_head=True, num_attention_heads=6, hidden_size=48),
    "rope_normhead": dict(position_embedding="rope", norm_head=True, num_attention_heads=4, hidden_size=32),
    "v1_plainhead": dict(position_embedding="alibi", norm_head=False, num_attention_heads=4, hidden_size=32),
}

MASKS = {
    "none": None,
    "right_pad": [[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
    "left_pad": [[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1]],
    "packed": [[1, 1, 1, 2, 2, 3, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2, 2]],
}


def tiny_config(variant="alibi_normhead", **overrides):
    values = dict(
        vocab_size=97,
        intermediate_size=64,
        num_hidden_layers=2,
        model_max_length=128,
        initializer_range=0.2,  # large weights so position and mask mistakes show up in the logits
    )
    values.update(VARIANTS[variant])
    values.update(overrides)
    return mb.BaichuanConfig(**values)


def tiny_model(variant="alibi_normhead", seed=0, **overrides):
    torch.manual_seed(seed)
    model = mb.BaichuanForCausalLM(tiny_config(variant, **overrides))
    with torch.no_grad():  # non-trivial norm weights and an un-normalised head, to exercise both
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.lm_head.weight.mul_(3.0)
    return model


# ------------------------------------------------------------------------------------------------------------
# float64 reference, written directly from SPEC.md
# ------------------------------------------------------------------------------------------------------------


def spec_slopes(n):
    def series(k):
        return [(2 ** (-8 / k)) ** (i + 1) for i in range(k)]

    p = 1
    while p * 2 <= n:
        p *= 2
    if p == n:
        return series(n)
    return series(p) + [series(2 * p)[i] for i in range(0, 2 * p, 2)][: n - p]


def spec_positions(mask_row):
    """Position of each token inside its example (left padding skipped)."""
    out, count = [], {}
    for value in mask_row:
        if value == 0:
            out.append(0)
        else:
            out.append(count.get(value, 0))
            count[value] = count.get(value, 0) + 1
    return out


def reference_logits(model, input_ids, mask=None, position_ids=None):
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    batch, length = input_ids.shape
    heads = cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    m = torch.ones(batch, length, dtype=torch.long) if mask is None else torch.as_tensor(mask)
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(i + 1):
                allowed[b, i, j] = m[b, i] > 0 and m[b, j] > 0 and m[b, i] == m[b, j]
    if position_ids is None:
        position_ids = torch.tensor([spec_positions(row.tolist()) for row in m])

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rotate(x):  # x: (batch, length, heads, hd); rotate-half convention
        half = hd // 2
        freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        angle = position_ids.double()[:, :, None, None] * freq
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)

    x = sd["model.embed_tokens.weight"][input_ids]
    slopes = torch.tensor(spec_slopes(heads), dtype=torch.float64)
    distance = (torch.arange(length)[None, :] - torch.arange(length)[:, None]).double()
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        n = rms(x, sd[p + "input_layernorm.weight"])
        qkv = n @ sd[p + "self_attn.W_pack.weight"].T
        q, k, v = (qkv[..., i * cfg.hidden_size : (i + 1) * cfg.hidden_size].view(batch, length, heads, hd) for i in range(3))
        if cfg.uses_rope:
            q, k = rotate(q), rotate(k)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        if not cfg.uses_rope:
            scores = scores + slopes[None, :, None, None] * distance
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
        attn = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch, length, cfg.hidden_size)
        h = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        n = rms(h, sd[p + "post_attention_layernorm.weight"])
        up = F.silu(n @ sd[p + "mlp.gate_proj.weight"].T) * (n @ sd[p + "mlp.up_proj.weight"].T)
        x = h + up @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"]
    if cfg.uses_norm_head:
        head = head / head.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return x @ head.T


def real_positions(mask):
    if mask is None:
        return torch.ones(2, 9, dtype=torch.bool)
    return torch.as_tensor(mask) > 0


# ------------------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------------------


def test_slopes_follow_spec():
    expected_40 = [2 ** (-(i + 1) / 4) for i in range(32)] + [2 ** (-(2 * k + 1) / 8) for k in range(8)]
    assert mb.alibi_slopes(40) == pytest.approx(expected_40, rel=1e-12)
    assert mb.alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rel=1e-12)
    for n in (1, 2, 4, 5, 6, 8, 12, 32, 40):
        assert mb.alibi_slopes(n) == pytest.approx(spec_slopes(n), rel=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_float64_reference(variant):
    model = tiny_model(variant)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 9))
    for mask_name, mask in MASKS.items():
        expected = reference_logits(model, ids, mask)
        keep = real_positions(mask)
        for train in (True, False):
            model.train(train)
            am = None if mask is None else torch.tensor(mask)
            with torch.no_grad():
                logits = model(ids, attention_mask=am, use_cache=False).logits
            assert not torch.isnan(logits).any()
            err = (logits.double() - expected)[keep].abs().max().item()
            assert err < 1e-4, (variant, mask_name, train, err)


def test_rope_uses_explicit_position_ids():
    model = tiny_model("rope_normhead").eval()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor(MASKS["packed"])
    positions = torch.tensor([spec_positions(r) for r in MASKS["packed"]])
    with torch.no_grad():
        default = model(ids, attention_mask=mask).logits
        explicit = model(ids, attention_mask=mask, position_ids=positions).logits
        # rotary is relative, so only a change in the distances inside an example may show
        running = positions * 3
        shifted = model(ids, attention_mask=mask, position_ids=running).logits
    keep = mask > 0
    assert torch.allclose(default[keep], explicit[keep], atol=1e-6)
    assert not torch.allclose(default[keep], shifted[keep], atol=1e-3)
    expected = reference_logits(model, ids, mask, position_ids=running)
    assert (shifted.double() - expected)[keep].abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_packed_examples_equal_separate_runs(variant):
    model = tiny_model(variant).eval()
    ids = torch.randint(3, 97, (1, 9))
    mask = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 0, 0]])
    with torch.no_grad():
        packed = model(ids, attention_mask=mask).logits[0]
        for start, end in ((0, 3), (3, 5), (5, 7)):
            alone = model(ids[:, start:end]).logits[0]
            assert torch.allclose(packed[start:end], alone, atol=1e-5)


def test_all_padding_row_gives_no_nan():
    model = tiny_model("alibi_normhead").train()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_shift_ignore_index_and_z_loss():
    model = tiny_model("alibi_normhead", z_loss_weight=2e-4).eval()
    ids = torch.randint(3, 97, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5:] = -100
    out = model(ids, labels=labels)
    logits = out.logits.double()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    z = 2e-4 * (shift_logits.max(-1).values ** 2).mean()
    assert out.loss.item() == pytest.approx((ce + z).item(), rel=1e-5)

    plain = tiny_model("alibi_normhead").eval()  # z_loss_weight defaults to 0
    out = plain(ids, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97).double(), shift_labels, ignore_index=-100)
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-5)


def test_norm_head_gradient_flows_through_normalisation():
    model = tiny_model("alibi_normhead").train()
    ids = torch.randint(3, 97, (2, 6))
    model(ids, labels=ids).loss.backward()
    w, g = model.lm_head.weight.detach(), model.lm_head.weight.grad
    # Gradient of a function of w / |w| is orthogonal to w row-wise.
    assert (w * g).sum(-1).abs().max() < 1e-5 * g.abs().max() * w.abs().max() * w.shape[1]
    before = model.lm_head.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert torch.equal(model.lm_head.weight, before)  # stored weight never normalised in place


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing):
        model = tiny_model("alibi_normhead").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(3)
        ids = torch.randint(3, 97, (2, 9))
        mask = torch.tensor(MASKS["packed"])
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, a = grads(False)
    loss_b, b = grads(True)
    assert torch.allclose(loss_a, loss_b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_bf16_forward():
    model = tiny_model("alibi_normhead").eval()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor(MASKS["packed"])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model16 = model.to(torch.bfloat16)
        out = model16(ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    keep = mask > 0
    assert (out.logits.float() - ref)[keep].abs().max() < 0.25 * ref.abs().max()


def test_config_inference_and_release_quirks():
    cfg13 = mb.BaichuanConfig(gradient_checkpointing=[False], auto_map={"AutoConfig": "x.y"})
    assert not cfg13.uses_rope and cfg13.uses_norm_head and cfg13.gradient_checkpointing is False
    assert "auto_map" not in cfg13.to_dict()
    cfg7 = mb.BaichuanConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    assert cfg7.uses_rope and cfg7.uses_norm_head
    v1 = mb.BaichuanConfig(vocab_size=64000)
    assert not v1.uses_rope and not v1.uses_norm_head
    forced = mb.BaichuanConfig(hidden_size=4096, num_attention_heads=32, position_embedding="alibi", norm_head=False)
    assert not forced.uses_rope and not forced.uses_norm_head



# (key, bad value): each must be refused with one ValueError line that names the key
BAD_CONFIG_VALUES = [
    ("norm_head", "false"),  # a string is truthy: it used to train and save as norm_head true
    ("norm_head", [0]),
    ("num_attention_heads", 0),  # used to be a ZeroDivisionError
    ("vocab_size", "4000"),  # used to fail inside transformers' token id check
    ("hidden_size", 100),  # not a multiple of the 40 heads
    ("intermediate_size", -1),
    ("num_hidden_layers", 2.0),
    ("model_max_length", True),
    ("max_position_embeddings", 0),
    ("use_cache", "true"),
    ("tie_word_embeddings", 1),
    ("gradient_checkpointing", ["false"]),
    ("position_embedding", "rotary"),
    ("rms_norm_eps", 0),
    ("rope_theta", float("nan")),
    ("initializer_range", -0.02),
    ("z_loss_weight", "2e-4"),
]


@pytest.mark.parametrize("key, value", BAD_CONFIG_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG_VALUES])
def test_config_refuses_wrong_types_and_ranges_naming_the_key(key, value):
    with pytest.raises(ValueError) as refused:
        mb.BaichuanConfig(**{key: value})
    message = str(refused.value)
    assert message.startswith(f"Baichuan config: {key} ") and "\n" not in message, message


def test_config_accepts_json_booleans_nulls_and_the_release_quirks():
    config = mb.BaichuanConfig(norm_head=False, position_embedding=None, max_position_embeddings=None,
                               z_loss_weight=None, use_cache=False, gradient_checkpointing=[False])
    assert config.norm_head is False and config.uses_norm_head is False and config.z_loss_weight == 0.0
    assert config.gradient_checkpointing is False and config.max_position_embeddings == config.model_max_length
    assert mb.BaichuanConfig(gradient_checkpointing=(True,)).gradient_checkpointing is True


# the broken config.json values reported from the field
BAD_CONFIG_FILES = [("norm_head", "false"), ("norm_head", [0]), ("num_attention_heads", 0), ("vocab_size", "4000")]


def test_bad_config_json_is_one_clear_error_through_every_loader(tmp_path):
    saved = tmp_path / "good"
    tiny_model("alibi_normhead").save_pretrained(saved)
    values = json.loads((saved / "config.json").read_text())
    for n, (key, value) in enumerate(BAD_CONFIG_FILES):
        folder = tmp_path / f"bad{n}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**values, key: value}))
        for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained,
                     mb.BaichuanConfig.from_pretrained, mb.BaichuanForCausalLM.from_pretrained):
            with pytest.raises(ValueError, match=f"^Baichuan config: {key} must be") as refused:
                load(folder)
            assert refused.value.__context__ is None and refused.value.__cause__ is None  # the root cause itself
    array = tmp_path / "array"
    array.mkdir()
    (array / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object of settings, got the array"):
        mb.BaichuanConfig.from_pretrained(array)
    # AutoConfig reads the file before any Baichuan code runs: its own message, one ValueError line too
    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_pretrained(array)

def test_init_weights_from_config():
    torch.manual_seed(0)
    model = mb.BaichuanForCausalLM(tiny_config("alibi_normhead", initializer_range=0.02))
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(48))
    assert torch.count_nonzero(model.model.embed_tokens.weight[0]) == 0
    assert 0.01 < model.model.layers[0].self_attn.W_pack.weight.std().item() < 0.03
    ids = torch.randint(3, 97, (2, 8))
    assert torch.isfinite(model(ids, labels=ids).loss)


# ------------------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_cache_equals_recompute(variant):
    model = tiny_model(variant).eval()
    ids = torch.randint(3, 97, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    # and the incremental logits agree with a full forward
    with torch.no_grad():
        full = model(with_cache).logits
        out = model(with_cache[:, :5], use_cache=True)
        cache = getattr(out, mb.CACHE_FIELD)
        assert cache is not None and cache.get_seq_length() == 5
        step = model(with_cache[:, 5:6], cache=cache, use_cache=True).logits
    assert torch.allclose(step[:, 0], full[:, 5], atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_left_padded_greedy_generation_cache_equals_recompute(variant):
    model = tiny_model(variant).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_cache_is_read_under_either_argument_name():
    model = tiny_model().eval()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefill = model(ids[:, :6], use_cache=True)
            step = model(ids[:, 6:], use_cache=True, **{name: getattr(prefill, mb.CACHE_FIELD)}).logits[:, -1]
            assert torch.allclose(step, full, atol=1e-5), name
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 6:], cache=prefill, past_key_values=prefill)


def test_generation_prints_no_cache_deprecation(capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    model = tiny_model().eval()
    model.generate(torch.randint(3, 97, (1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    captured = capfd.readouterr()
    assert "deprecated" not in captured.out + captured.err


@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_batched_left_padded_generation_equals_one_by_one(variant):
    model = tiny_model(variant).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **kwargs)[0, len(prompt):]
        assert torch.equal(batched[row], alone), (row, batched[row], alone)


def test_build_chat_input():
    class FakeTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    tok = FakeTokenizer()
    messages = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert mb.build_chat_input(tok, messages) == [195, 97, 98, 196, 99, 195, 100, 196]
    assert mb.build_chat_input(tok, messages[:1]) == [195, 97, 98, 196]
    # oldest round dropped when the budget (model_max_length - max_new_tokens) is exceeded
    assert mb.build_chat_input(tok, messages, max_new_tokens=10, model_max_length=14) == [195, 100, 196]


# ------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnew lines  ",
    "数字 12345 和 3.14159 mixed 中文 text",
    "<reserved_106>你好<reserved_107>Hi there!",
    "emoji 🙂 and rare 龘 characters",
    "",
]


@pytest.fixture(scope="module")
def tiny_sp_model(tmp_path_factory):
    """A small SentencePiece model trained like Baichuan's (BPE, byte fallback, split digits, no dummy prefix)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    lines = [f"sample line {i} with words like hello world model token {i * 7}" for i in range(300)]
    lines += ["中文 句子 你好 世界 模型 训练"] * 50
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tok"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["\n", "\t"] + [f"<reserved_{i}>" for i in range(2, 12)],
        character_coverage=1.0,
        minloglevel=2,
    )
    return str(folder / "tok.model")


def check_tokenizer_matches_sentencepiece(tokenizer, model_file):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    batch = tokenizer(TEXTS, add_special_tokens=False).input_ids
    for text, ids in zip(TEXTS, batch):
        assert ids == sp.encode(text), text
        assert tokenizer(text).input_ids == ids  # no BOS/EOS by default
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 0
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_tiny_tokenizer_matches_sentencepiece_and_reloads(tiny_sp_model, tmp_path):
    tok = mb.BaichuanTokenizer(vocab_file=tiny_sp_model)
    check_tokenizer_matches_sentencepiece(tok, tiny_sp_model)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "BaichuanTokenizer"
    assert saved["add_bos_token"] is False and saved["add_eos_token"] is False
    assert (tmp_path / "tokenizer.model").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is mb.BaichuanTokenizer
    check_tokenizer_matches_sentencepiece(reloaded, tiny_sp_model)
    padded = reloaded(["hello world", "hi"], add_special_tokens=False, padding=True, return_tensors="pt")
    assert padded.input_ids.shape[0] == 2 and (padded.input_ids[padded.attention_mask == 0] == 0).all()


def test_real_tokenizer_reproduces_release_ids():
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"real Baichuan2 tokenizer not found at {REAL_TOKENIZER}")
    tok = mb.BaichuanTokenizer(vocab_file=str(REAL_TOKENIZER))
    assert len(tok) == 125696
    check_tokenizer_matches_sentencepiece(tok, str(REAL_TOKENIZER))
    assert tok.convert_tokens_to_ids("<reserved_106>") == 195
    assert tok.convert_tokens_to_ids("<reserved_107>") == 196
    assert tok("<reserved_106>", add_special_tokens=False).input_ids == [195]
    assert tok("\n", add_special_tokens=False).input_ids == [5]
    digits = tok.convert_ids_to_tokens(tok("2024", add_special_tokens=False).input_ids)
    assert digits == ["2", "0", "2", "4"]
    assert tok.convert_ids_to_tokens(tok("Hello", add_special_tokens=False).input_ids)[0].startswith("H")
    assert tok("<s>hi</s>", add_special_tokens=False).input_ids[0] == 1
    assert tok.decode([195, 1, 2], skip_special_tokens=True) == "<reserved_106>"
    tok.add_bos_token = True
    tok.add_eos_token = True
    assert tok("hi").input_ids[0] == 1 and tok("hi").input_ids[-1] == 2


# ------------------------------------------------------------------------------------------------------------
# release-style folder: load without remote code, train a step, generate, save, reload
# ------------------------------------------------------------------------------------------------------------


def write_release_folder(folder: Path, model, sp_model_file):
    """Lay a folder out the way the Baichuan2 release does: remote-code auto_map, sharded .bin + index."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps({
        "_from_model_config": True,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "tokenizer_class": "BaichuanTokenizer",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "gradient_checkpointing": [False],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "model_max_length": cfg.model_max_length,
        "model_type": "baichuan",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.29.2",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
        # tiny sizes cannot imply the variant, so say it
        "position_embedding": "alibi",
        "norm_head": True,
    }, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True},
        "model_max_length": 4096,
        "pad_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True},
        "sp_model_kwargs": {},
        "tokenizer_class": "BaichuanTokenizer",
        "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True},
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}))
    (folder / "tokenizer.model").write_bytes(Path(sp_model_file).read_bytes())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        shard_name = f"pytorch_model-0000{n}-of-00002.bin"
        torch.save({k: state[k] for k in shard}, folder / shard_name)
        weight_map.update({k: shard_name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def test_release_folder_round_trip(tiny_sp_model, tmp_path):
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=tiny_sp_model).get_piece_size()
    source = tiny_model("alibi_normhead", vocab_size=vocab).eval()
    release = tmp_path / "release"
    write_release_folder(release, source, tiny_sp_model)

    config = AutoConfig.from_pretrained(release)
    assert type(config) is mb.BaichuanConfig and config.gradient_checkpointing is False
    tok = AutoTokenizer.from_pretrained(release)
    assert type(tok) is mb.BaichuanTokenizer
    model = AutoModelForCausalLM.from_pretrained(release)
    assert type(model) is mb.BaichuanForCausalLM
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    # one training step on a chat-formatted example
    prompt = mb.build_chat_input(tok, [{"role": "user", "content": "hello world"}])
    answer = tok("model token", add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == len(prompt) + 4
    tok.decode(generated[0, len(prompt):], skip_special_tokens=True)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    saved_config = json.loads((saved / "config.json").read_text())
    assert saved_config["model_type"] == "baichuan"
    # our own code, not the release's remote code the source folder pointed at
    assert saved_config["auto_map"] == {"AutoConfig": "modeling_baichuan.BaichuanConfig",
                                        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
    assert saved_config["position_embedding"] == "alibi" and saved_config["norm_head"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # lm_head is saved as trained, not normalised
    assert not torch.allclose(reloaded.lm_head.weight.norm(dim=-1), torch.ones(vocab))
    assert type(AutoTokenizer.from_pretrained(saved)) is mb.BaichuanTokenizer


# ------------------------------------------------------------------------------------------------------------
# the transformers model contract
# ------------------------------------------------------------------------------------------------------------


def test_return_dict_false_gives_tuples():
    model = tiny_model("alibi_normhead").eval()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        as_dict = model(ids, labels=ids, use_cache=False)
        as_tuple = model(ids, labels=ids, use_cache=False, return_dict=False)
        base = model.model(ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(base[0], model.model(ids, use_cache=False).last_hidden_state)
    model.config.return_dict = False  # the config default is honoured too
    with torch.no_grad():
        assert isinstance(model(ids, use_cache=False), tuple)


def test_config_output_hidden_states_is_honoured():
    model = tiny_model("rope_normhead").eval()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        assert model(ids).hidden_states is None
        model.config.output_hidden_states = True
        out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    with torch.no_grad():
        assert model(ids, output_hidden_states=False).hidden_states is None  # the keyword wins


@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_output_attentions_returns_weights(variant):
    model = tiny_model(variant).eval()  # default backend: sdpa, which has no weights of its own
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor(MASKS["packed"])
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    weights = out.attentions[0]
    assert weights.shape == (2, model.config.num_attention_heads, 9, 9)
    assert torch.allclose(weights.sum(-1), torch.ones(2, model.config.num_attention_heads, 9))
    assert weights[0, :, 2, 3:].abs().max() == 0 and weights[0, :, 4, :3].abs().max() == 0  # no look across
    assert torch.allclose(weights[0, :, 7], F.one_hot(torch.tensor(7), 9).float().expand_as(weights[0, :, 7]))
    assert torch.allclose(out.logits, plain, atol=1e-5)


def test_generation_with_attentions_and_assistant():
    model = tiny_model("alibi_normhead").eval()
    assistant = tiny_model("alibi_normhead", seed=5).eval()
    ids = torch.randint(3, 97, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **kwargs), greedy)
    out = model.generate(ids, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True,
                         **kwargs)
    assert torch.equal(out.sequences, greedy)
    assert len(out.attentions) == 6 and len(out.attentions[0]) == model.config.num_hidden_layers
    assert out.attentions[0][0].shape[-2:] == (5, 5) and out.attentions[1][0].shape[-2:] == (1, 6)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_padding_outputs_do_not_depend_on_padding_amount(variant, implementation):
    model = tiny_model(variant).eval()
    model.set_attn_implementation(implementation)
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        alone = model(torch.tensor([prompt])).logits[0]
        pad_logits = []
        for left, right in ((1, 0), (4, 0), (0, 3), (2, 2)):
            ids = torch.tensor([[0] * left + prompt + [0] * right])
            mask = (ids > 0).long()
            logits = model(ids, attention_mask=mask).logits[0]
            assert torch.isfinite(logits).all()
            assert torch.allclose(logits[left:left + len(prompt)], alone, atol=1e-5)
            pad_logits.append(logits[mask[0] == 0])
    pads = torch.cat(pad_logits)
    assert torch.allclose(pads, pads[:1].expand_as(pads), atol=1e-5)


@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_torch_export_and_static_cache_generation(variant):
    model = tiny_model(variant).eval()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor(MASKS["packed"])
    exported = torch.export.export(model, args=(ids,), kwargs={"attention_mask": mask, "use_cache": False})
    for m in (mask, torch.ones_like(mask), torch.tensor(MASKS["left_pad"])):
        with torch.no_grad():
            expected = model(ids, attention_mask=m, use_cache=False).logits
            got = exported.module()(ids, attention_mask=m, use_cache=False).logits
        assert torch.allclose(got, expected, atol=1e-5)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    kwargs = dict(attention_mask=(prompts > 0).long(), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    assert torch.equal(model.generate(prompts, cache_implementation="static", **kwargs),
                       model.generate(prompts, **kwargs))


def test_shift_labels_equal_shifted_labels():
    model = tiny_model("alibi_normhead").eval()
    ids = torch.randint(3, 97, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    shift = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        from_labels = model(ids, labels=labels, use_cache=False).loss
        from_shift = model(ids, shift_labels=shift, use_cache=False).loss
        # shift_labels win over labels (sequence parallel passes both)
        both = model(ids, labels=torch.full_like(ids, 3), shift_labels=shift, use_cache=False).loss
        summed = model(ids, shift_labels=shift, num_items_in_batch=4, use_cache=False).loss
    count = (shift != -100).sum()
    assert torch.allclose(from_shift, from_labels) and torch.allclose(both, from_labels)
    assert torch.allclose(summed, from_labels * count / 4)


# ------------------------------------------------------------------------------------------------------------
# variant resolution and folders other tools load
# ------------------------------------------------------------------------------------------------------------

# Just the parts the variant scan reads; written for these tests, not taken from the release.
RELEASE_CODE_13B = '''
import torch
from torch import nn

def build_alibi_bias(num_heads, max_positions):
    pass

class NormHead(nn.Module):
    pass
'''
RELEASE_CODE_7B = '''
import torch

class RotaryEmbedding(torch.nn.Module):
    pass

class NormHead(torch.nn.Module):
    pass
'''


def write_config_without_variant(folder: Path, hidden_size=48, vocab_size=101, heads=6, code=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = mb.BaichuanConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_attention_heads=heads,
                               intermediate_size=64, num_hidden_layers=1, position_embedding="alibi", norm_head=False)
    values = config.to_dict()
    del values["position_embedding"], values["norm_head"]
    values["auto_map"] = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                          "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
    (folder / "config.json").write_text(json.dumps(values))
    if code is not None:
        (folder / "modeling_baichuan.py").write_text(code)
    return folder


def test_variant_read_from_release_code_file(tmp_path, caplog):
    caplog.set_level("INFO", logger=mb.logger.name)
    # a 13B fine-tune with a resized vocabulary: the sizes would say "plain head"
    folder = write_config_without_variant(tmp_path / "13b", hidden_size=48, vocab_size=101, code=RELEASE_CODE_13B)
    config = AutoConfig.from_pretrained(folder)
    assert config.position_embedding == "alibi" and config.norm_head is True
    assert "modeling_baichuan.py" in caplog.text and "norm_head=True" in caplog.text
    direct = mb.BaichuanConfig.from_pretrained(folder)
    assert direct.norm_head is True
    # hidden 4096 would say rotary anyway; here the code says it for a size that would not
    folder7 = write_config_without_variant(tmp_path / "7b", hidden_size=48, vocab_size=101, code=RELEASE_CODE_7B)
    config7 = AutoConfig.from_pretrained(folder7)
    assert config7.position_embedding == "rope" and config7.norm_head is True


def test_variant_falls_back_to_sizes_with_a_warning(tmp_path, caplog):
    folder = write_config_without_variant(tmp_path / "plain", hidden_size=48, vocab_size=101)
    with caplog.at_level("WARNING", logger=mb.logger.name):
        config = AutoConfig.from_pretrained(folder)
    assert config.position_embedding == "alibi" and config.norm_head is False
    assert "vocab_size 101" in caplog.text and "hidden_size 48" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=mb.logger.name):
        assert mb.BaichuanConfig(hidden_size=4096, num_attention_heads=32).uses_rope
        assert mb.BaichuanConfig(vocab_size=125696).uses_norm_head
    assert "hidden_size 4096" in caplog.text


def test_saved_config_holds_resolved_variant(tmp_path):
    folder = write_config_without_variant(tmp_path / "release", code=RELEASE_CODE_13B)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["position_embedding"] == "alibi" and saved["norm_head"] is True
    (tmp_path / "out" / "modeling_baichuan.py").unlink()  # the keys alone must carry the variant
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.uses_norm_head


def test_saved_code_file_is_self_contained():
    import ast
    import sys

    tree = ast.parse(Path(mb.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed


@pytest.mark.slow
def test_saved_folder_loads_with_remote_code_in_fresh_process(tiny_sp_model, tmp_path):
    import subprocess
    import sys

    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=tiny_sp_model).get_piece_size()
    model = tiny_model("rope_normhead", vocab_size=vocab).eval()
    folder = tmp_path / "saved model"
    model.save_pretrained(folder)
    mb.BaichuanTokenizer(vocab_file=tiny_sp_model).save_pretrained(folder)
    assert (folder / "modeling_baichuan.py").read_text() == Path(mb.__file__).read_text()
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "modeling_baichuan.BaichuanTokenizer"
    ids = torch.randint(3, vocab, (2, 6))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")

    script = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import modeling_baichuan
    sys.exit("the repository's modeling_baichuan is importable")
except ImportError:
    pass
folder, expected = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert model.config.uses_rope and model.config.uses_norm_head
with torch.no_grad():
    assert torch.allclose(model(expected["ids"]).logits, expected["logits"], atol=1e-5)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
assert type(tokenizer).__name__ == "BaichuanTokenizer" and tokenizer("hello world").input_ids
model.generate(expected["ids"][:1], max_new_tokens=2, do_sample=False)
print("ok")
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # -I: isolated, so neither the working directory nor PYTHONPATH puts this repository on the path
    result = subprocess.run([sys.executable, "-I", "-c", script, str(folder), str(tmp_path / "expected.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
