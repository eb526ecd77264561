"""Tests for modeling_baichuan: numerics against a float64 reference written from SPEC.md, masks, caching,
generation, release-folder loading without remote code, and the tokenizer (against sentencepiece itself)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modeling_baichuan as mb
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REAL_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/reference/baichuan2/tokenizer.model"

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
    """Position of each token inside its segment (left padding skipped)."""
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
        # rotary is relative, so only a change in the distances inside a segment may show
        running = positions * 3
        shifted = model(ids, attention_mask=mask, position_ids=running).logits
    keep = mask > 0
    assert torch.allclose(default[keep], explicit[keep], atol=1e-6)
    assert not torch.allclose(default[keep], shifted[keep], atol=1e-3)
    expected = reference_logits(model, ids, mask, position_ids=running)
    assert (shifted.double() - expected)[keep].abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["alibi_normhead", "rope_normhead"])
def test_packed_segments_equal_separate_runs(variant):
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


def test_init_weights_from_config():
    torch.manual_seed(0)
    model = mb.BaichuanForCausalLM(tiny_config("alibi_normhead", initializer_range=0.02))
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(48))
    assert torch.count_nonzero(model.model.embed_tokens.weight[0]) == 0
    assert 0.01 < model.model.layers[0].self_attn.W_pack.weight.std().item() < 0.03
    ids = torch.randint(3, 97, (2, 8))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_alibi_bias_is_cached_once():
    model = tiny_model("alibi_normhead").eval()
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        model(ids)
        first = dict(model.model._alibi_cache)
        model(ids[:, :5])
    assert len(model.model._alibi_cache) == 1
    assert all(model.model._alibi_cache[k] is first[k] for k in first)


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
        step = model(with_cache[:, 5:6], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[:, 0], full[:, 5], atol=1e-5)


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
    assert saved_config["model_type"] == "baichuan" and "auto_map" not in saved_config
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # lm_head is saved as trained, not normalised
    assert not torch.allclose(reloaded.lm_head.weight.norm(dim=-1), torch.ones(vocab))
    assert type(AutoTokenizer.from_pretrained(saved)) is mb.BaichuanTokenizer
