"""Other causal LMs through the same scripts: Llama 3, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 and Phi-3.

Tiny look-alikes of each family are built offline from transformers' own config classes, with random weights,
a sliding window shorter than the examples and soft-caps small enough that dropping either changes the logits.
Packed rows must compute what the model computes on each example alone with its default attention.
"""
import copy

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, _word_tokenizer, assert_one_line_error, make_random_dataset, run_script

import finetune.data.batches as fu
from finetune.checkpoint import export
from finetune.distributed.backend import Backend
from finetune.model import lora, size
from finetune.model.lora import LoraSettings
from finetune.ops import span_attention
from finetune.ops.chunked_loss import use_chunked_loss
from finetune.plan import layout

VOCAB = 128
WINDOW = 4  # shorter than most examples below
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_config(family):
    import transformers as tf

    if family == "llama3":
        return tf.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))
    if family == "qwen2":  # biases on q/k/v, tied embeddings
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms; heads x head_dim (64) is not hidden_size (32), as in Qwen3-0.6B
        return tf.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "gemma2":  # local and global layers, attention and final-logit soft-capping, its own scaling
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.2,
                               final_logit_softcapping=0.7, query_pre_attn_scalar=24)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**dict(COMMON, num_hidden_layers=3), head_dim=16, sliding_window=WINDOW,
                                   query_pre_attn_scalar=24, final_logit_softcapping=0.7,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**COMMON, sliding_window=WINDOW)
    raise ValueError(family)


FAMILIES = ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
# What each family's packed path must honour beyond causal attention: the config fields that, set to None,
# change the model's output on these examples.
HONOURED = {"mistral": ("sliding_window",), "phi3": ("sliding_window",), "gemma3": ("sliding_window",),
            "gemma2": ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")}
LENGTHS = (7, 12, 3, 9)


def build(config, attention=None, state=None):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # from_config writes the attention into the config it is given
    model = AutoModelForCausalLM.from_config(config, **({"attn_implementation": attention} if attention else {}))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def examples(seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in LENGTHS:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        out.append((ids, [-100] * (length // 3) + ids[length // 3:]))
    return out


def packed_batch(rows):
    """One packed row of `rows` ((ids, labels) pairs), as the training collator lays it out."""
    class Table:
        lengths = np.array([len(ids) for ids, _ in rows])

        def example(self, index):
            return np.array(rows[index][0]), np.array(rows[index][1])

    return fu.collate_rows(Table(), [list(range(len(rows)))], pad_id=0, pad_to=40)


def packed_forward(model, batch, **kwargs):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 example_spans=batch["example_spans"], use_cache=False, **kwargs)


def alone(reference, rows):
    """Each example through the model alone: its logits, and the token-weighted sum of its losses."""
    logits, loss_sum = [], 0.0
    for ids, labels in rows:
        out = reference(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), num_items_in_batch=1)
        logits.append(out.logits[0])
        loss_sum = loss_sum + out.loss
    return torch.cat(logits), loss_sum


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_loss_equal_each_example_alone(family):
    torch.manual_seed(0)
    config = family_config(family)
    reference = build(config)  # transformers' default attention for the family (eager for Gemma 2)
    packed = build(config, span_attention.ATTENTION_NAME, reference.state_dict())
    rows = examples()
    batch = packed_batch(rows)
    used = sum(LENGTHS)
    with torch.no_grad():
        want_logits, want_loss_sum = alone(reference, rows)
        got = packed_forward(packed, batch, labels=batch["labels"], num_items_in_batch=batch["num_targets"])
        assert torch.allclose(got.logits[0, :used], want_logits, atol=2e-5, rtol=0)
        assert got.loss.item() == pytest.approx(want_loss_sum.item() / batch["num_targets"], abs=2e-6)

        chunked = use_chunked_loss(build(config, span_attention.ATTENTION_NAME, reference.state_dict()))
        loss = packed_forward(chunked, batch, labels=batch["labels"], num_items_in_batch=batch["num_targets"]).loss
        assert loss.item() == pytest.approx(want_loss_sum.item() / batch["num_targets"], abs=2e-6)

        for field in HONOURED.get(family, ()):  # the test can fail: without the field the logits move
            dropped = copy.deepcopy(config)
            setattr(dropped, field, None)
            other = build(dropped, span_attention.ATTENTION_NAME, reference.state_dict())
            difference = (packed_forward(other, batch).logits[0, :used] - want_logits).abs().max()
            assert difference > 1e-2, field


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_chunked_loss_gradients_equal_the_models_own_loss(family):
    torch.manual_seed(0)
    config = family_config(family)
    plain = build(config, span_attention.ATTENTION_NAME)
    chunked = use_chunked_loss(build(config, span_attention.ATTENTION_NAME, plain.state_dict()))
    batch = packed_batch(examples(1))
    for model in (plain, chunked):
        packed_forward(model, batch, labels=batch["labels"], num_items_in_batch=batch["num_targets"]).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def lora_settings(base="unused", targets=("auto",), rank=4):
    return LoraSettings(rank=rank, alpha=8.0, dropout=0.0, targets=tuple(targets), quantize_4bit=False, base=base)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_default_targets_trains_the_models_own_linear_layers(family):
    torch.manual_seed(0)
    config = family_config(family)
    model = lora.add_adapters(build(config, span_attention.ATTENTION_NAME), lora_settings())
    wanted = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(model.lora_settings.targets) == wanted
    layers = config.num_hidden_layers
    assert sum(1 for name, _ in model.named_modules() if name.endswith("lora_A.default")) == layers * len(wanted)
    assert lora.count_trainable(model) == lora.adapter_parameters(size.meta_model(config.to_dict()), 4,
                                                                  ("auto",))
    losses = train_steps(model)
    assert losses[-1] < losses[0]


def train_steps(model, steps=3):
    """A few AdamW steps on one packed batch; the losses. Every trainable parameter must get a gradient."""
    model.train()
    batch = packed_batch(examples(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = packed_forward(model, batch, labels=batch["labels"], num_items_in_batch=batch["num_targets"]).loss
        loss.backward()
        idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not idle, f"no gradient reaches {idle}"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_counts_parameters_and_matmul_weights_of_the_model_itself(family):
    config = family_config(family)
    model = build(config)
    assert layout.count_parameters(config.to_dict()) == sum(p.numel() for p in model.parameters())
    h, heads, kv, inner, vocab = 32, 4, 2, 48, VOCAB
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inner
    assert size.matmul_parameters(model) == config.num_hidden_layers * per_layer + vocab * h
    assert size.attention_width(config) == heads * head_dim


def test_qwen3_0_6b_shape_counts_its_real_size():
    """Qwen3-0.6B: 16 query heads of 128 (2048 wide) over a hidden size of 1024; its model card says 0.6B, of
    which 0.44B outside the (tied) embedding. A hidden_size formula said 0.51B."""
    vocab, h, inner, layers, q_width, kv_width, head_dim = 151936, 1024, 3072, 28, 16 * 128, 8 * 128, 128
    shape = dict(model_type="qwen3", vocab_size=vocab, hidden_size=h, intermediate_size=inner,
                 num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8, head_dim=head_dim,
                 tie_word_embeddings=True)
    per_layer = 2 * h * q_width + 2 * h * kv_width + 3 * h * inner + 2 * head_dim + 2 * h  # + q/k and layer norms
    non_embedding = layers * per_layer + h
    assert layout.count_parameters(shape) == vocab * h + non_embedding
    assert round(non_embedding / 1e9, 2) == 0.44 and round(layout.count_parameters(shape) / 1e9, 1) == 0.6


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_a_tied_embedding_is_saved_once_and_loads_as_the_same_model(tmp_path, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build(family_config(family), span_attention.ATTENTION_NAME)
    class NoTokenizer:  # the final save writes the tokenizer too; this test is about the weights
        def save_pretrained(self, folder):
            pass

    backend = Backend(engine="single", device=torch.device("cpu"), world_size=1)
    for saved_dtype in ("float32", "bfloat16"):  # both ways the full fine-tuning save gathers
        export.save_final_model(model, NoTokenizer(), backend, str(tmp_path), {"saved_dtype": saved_dtype})
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == {name for name in model.state_dict() if name != "lm_head.weight"}
    export.save_final_model(model, NoTokenizer(), backend, str(tmp_path), {"saved_dtype": "float32"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, build(family_config(family), state=model.state_dict())(
            input_ids=ids).logits)


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    torch.manual_seed(0)
    build(family_config("phi3")).save_pretrained(root / "model")
    _word_tokenizer(VOCAB).save_pretrained(root / "model")
    return root


@pytest.mark.slow
def test_phi3_trains_with_lora_and_plans_its_exact_size_through_the_script(phi3_folder):
    data = make_random_dataset(phi3_folder / "data", num_train=8, num_valid=2, max_len=20)
    model_dir = str(phi3_folder / "model")
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", model_dir,
                        "--dataset-name-or-path", data, "--save-model-dir", str(phi3_folder / "out"), "--lora",
                        "--batch-size", "2", "--block-size", "64", "--max-steps", "2", "--log-interval", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = (phi3_folder / "out" / "adapter" / "adapter_config.json").read_text()
    assert "qkv_proj" in adapter and "gate_up_proj" in adapter
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", model_dir,
                        "--plan-only", "--num-devices", "1", "--device-memory-gb", "80", "--lora", "--block-size", "64",
                        "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    model = build(family_config("phi3"))
    lines = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert int(lines["parameters"]) == sum(p.numel() for p in model.parameters())
    adapters = lora.add_adapters(model, lora_settings(rank=16))  # the script's default rank
    assert int(lines["trainable_parameters"]) == lora.count_trainable(adapters)


@pytest.mark.slow
def test_a_bad_target_next_to_auto_is_one_line(phi3_folder):
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path",
                        str(phi3_folder / "model"), "--plan-only", "--lora", "--lora-target-modules", "auto,q_proj")
    assert "auto stands alone" in assert_one_line_error(result)
