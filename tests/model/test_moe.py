"""Mixture-of-experts models through the same scripts: Mixtral, Qwen3-MoE and gpt-oss.

Tiny look-alikes built offline from transformers' own config classes: 4 experts, 2 per token; Mixtral with a
sliding window, gpt-oss with its attention sinks, biases and alternating sliding and full layers. Packed rows must
compute what the model computes on each example alone; LoRA covers the attention and the experts; the plan counts
all parameters for memory and the active ones for FLOPs.
"""
import copy
import json

import pytest
import torch
from conftest import (PYTHON, REPO_ROOT, _word_tokenizer, assert_one_line_error, make_random_dataset, run_script,
                      torchrun)
from model.test_model_families import COMMON, VOCAB, alone, examples, packed_batch, packed_forward, train_steps

from finetune.errors import FinetuneError
from finetune.model import lora, size
from finetune.model.lora import LoraSettings
from finetune.observe.metrics import trained_flops
from finetune.ops import span_attention
from finetune.ops.chunked_loss import use_token_loss
from finetune.plan import layout

FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]
EXPERTS, TOP_K = 4, 2


def moe_config(family, **changes):
    import transformers as tf

    if family == "mixtral":
        config = tf.MixtralConfig(**COMMON, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=4)
    elif family == "qwen3_moe":  # q/k norms, heads x head_dim (64) is not hidden_size, its own expert width
        config = tf.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                   moe_intermediate_size=24)
    elif family == "gpt_oss":  # attention sinks, biases everywhere, sliding and full layers alternating
        config = tf.GptOssConfig(**COMMON, head_dim=16, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                 sliding_window=4)
    else:
        raise ValueError(family)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def build(config, attention=None, state=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                             **({"attn_implementation": attention} if attention else {}))
    if state is not None:
        model.load_state_dict(state)
    if hasattr(model.model.layers[0].self_attn, "sinks"):  # large enough that ignoring them shows
        for layer in model.model.layers:
            layer.self_attn.sinks.data = torch.tensor([1.5, -1.0, 0.5, 2.0])
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_loss_equal_each_example_alone(family):
    torch.manual_seed(0)
    config = moe_config(family)
    reference = build(config)  # the family's default attention (eager for gpt-oss)
    rows = examples()
    batch = packed_batch(rows)
    used = sum(len(ids) for ids, _ in rows)
    with torch.no_grad():
        want_logits, want_loss_sum = alone(reference, rows)
        for chunk in (1024, None):  # the chunked loss and the whole-logits loss
            packed = use_token_loss(build(config, span_attention.ATTENTION_NAME, reference.state_dict()), chunk)
            loss = packed_forward(packed, batch, labels=batch["labels"], num_items_in_batch=batch["num_targets"]).loss
            assert loss.item() == pytest.approx(want_loss_sum.item() / batch["num_targets"], abs=2e-6)
        packed = build(config, span_attention.ATTENTION_NAME, reference.state_dict())
        assert torch.allclose(packed_forward(packed, batch).logits[0, :used], want_logits, atol=2e-5, rtol=0)


def test_gpt_oss_sinks_are_honoured_and_dropping_them_changes_the_logits(monkeypatch):
    from transformers import AttentionInterface

    torch.manual_seed(0)
    config = moe_config("gpt_oss")
    reference = build(config)
    rows = examples()
    batch = packed_batch(rows)
    used = sum(len(ids) for ids, _ in rows)

    def without_sinks(module, query, key, value, attention_mask, s_aux=None, **kwargs):
        return span_attention.packed_spans(module, query, key, value, attention_mask, **kwargs)
    AttentionInterface.register("packed_spans_no_sinks", without_sinks)
    with torch.no_grad():
        want, _ = alone(reference, rows)
        dropped = build(config, "packed_spans_no_sinks", reference.state_dict())
        assert (packed_forward(dropped, batch).logits[0, :used] - want).abs().max() > 1e-2


def lora_settings(targets=("auto",), rank=4, dropout=0.0):
    return LoraSettings(rank=rank, alpha=8.0, dropout=dropout, targets=tuple(targets), quantize_4bit=False,
                        base="unused")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_auto_covers_the_attention_and_the_experts_and_trains(family):
    torch.manual_seed(0)
    config = moe_config(family)
    model = lora.add_adapters(build(config, span_attention.ATTENTION_NAME), lora_settings())
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"} == set(
        model.lora_settings.targets)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in name and "lora_A" in name for name in trainable)
    assert not any(".gate." in name or ".router." in name for name in trainable)  # the routers stay as trained
    assert lora.count_trainable(model) == lora.adapter_parameters(size.meta_model(config.to_dict()), 4, ("auto",))
    losses = train_steps(model)
    assert losses[-1] < losses[0]


def test_lora_on_expert_tensors_refuses_dropout_in_one_line():
    model = build(moe_config("mixtral"), span_attention.ATTENTION_NAME)
    with pytest.raises(FinetuneError, match="takes no dropout"):
        lora.add_adapters(model, lora_settings(dropout=0.1))
    named = lora.add_adapters(build(moe_config("mixtral")), lora_settings(("q_proj", "experts.down_proj")))
    assert {name.split(".")[-4] for name, p in named.named_parameters() if p.requires_grad} == {"q_proj", "experts"}


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_counts_all_parameters_for_memory_and_the_active_ones_for_flops(family):
    config = moe_config(family)
    model = build(config)
    total = sum(p.numel() for p in model.parameters())
    assert layout.count_parameters(config.to_dict()) == total
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert experts and size.expert_parameters(model).keys() == {
        name for name, p in model.named_parameters() if ".experts." in name}
    idle = sum(p.numel() for p in experts) * (EXPERTS - TOP_K) // EXPERTS
    assert size.active_parameter_count(model) == layout.count_active_parameters(config.to_dict()) == total - idle
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    routers = config.num_hidden_layers * EXPERTS * config.hidden_size
    expert_weights = sum(p.numel() for p in experts if p.dim() == 3) * TOP_K // EXPERTS
    assert size.matmul_parameters(model) == linear + routers + expert_weights
    model.train()
    per_token, _ = trained_flops(model)
    assert per_token == 6 * size.matmul_parameters(model)  # full fine-tuning: every active weight x 6


def test_flops_of_lora_on_the_experts_count_the_active_expert_weights_not_the_adapters_per_token():
    config = moe_config("mixtral")
    model = lora.add_adapters(build(config), lora_settings(("q_proj", "experts.down_proj")))
    per_token, _ = trained_flops(model)
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, k_v_o = h * h, 2 * h * 16 + h * h
    down, gate_up = EXPERTS * h * inner * TOP_K // EXPERTS, EXPERTS * 2 * inner * h * TOP_K // EXPERTS
    router, head, rank = EXPERTS * h, VOCAB * h, 4
    # q_proj's adapters run per token (6 x each); the adapted down_proj tensor gets its weight gradient (6 x);
    # the other frozen weights in the layers 4 x (backward passes through them); the head 4 x (above the layers).
    per_layer = 4 * (q + k_v_o + gate_up + router) + 6 * rank * (h + h) + 6 * down
    assert per_token == layers * per_layer + 4 * head


def model_folder(root, family, coefficient):
    """`root`/model: a tiny look-alike asking for the router's aux loss, with a word tokenizer; `root`/data."""
    torch.manual_seed(0)
    build(moe_config(family, output_router_logits=True, router_aux_loss_coef=coefficient)).save_pretrained(
        root / "model")
    _word_tokenizer(VOCAB).save_pretrained(root / "model")
    make_random_dataset(root / "data", num_train=40, num_valid=4, max_len=20)
    return root


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss", 0.5)


@pytest.mark.slow
def test_gpt_oss_trains_with_lora_logs_the_aux_loss_and_the_merge_reloads_in_plain_transformers(gpt_oss_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = str(gpt_oss_folder / "data")
    model_dir, out = str(gpt_oss_folder / "model"), gpt_oss_folder / "out"
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", model_dir,
                        "--dataset-name-or-path", data, "--save-model-dir", str(out), "--lora", "--lr", "1e-2",
                        "--batch-size", "4", "--micro-batch-size", "2", "--block-size", "64", "--max-steps", "2",
                        "--log-interval", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(1.0 < row["aux_loss"] < EXPERTS for row in rows)  # balanced routing gives top_k, the worst experts
    assert "Aux loss" in result.stdout + result.stderr
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 4, 90]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5)
        untouched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert (merged(input_ids=ids).logits - untouched(input_ids=ids).logits).abs().max() > 1e-3  # it trained


@pytest.mark.slow
def test_plan_only_counts_gpt_oss_exactly(gpt_oss_folder):
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path",
                        str(gpt_oss_folder / "model"), "--plan-only", "--num-devices", "2", "--device-memory-gb", "80",
                        "--lora", "--block-size", "64", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    model = build(moe_config("gpt_oss"))
    assert int(lines["parameters"]) == sum(p.numel() for p in model.parameters())
    assert int(lines["active_parameters"]) == size.active_parameter_count(model) < int(lines["parameters"])
    assert lines["experts"].startswith("2 of 4 per token")
    adapters = lora.add_adapters(model, lora_settings(rank=16))  # the script's default rank
    assert int(lines["trainable_parameters"]) == lora.count_trainable(adapters)


def test_a_model_whose_attention_takes_a_keyword_we_cannot_honour_is_still_refused_in_one_line(tmp_path):
    model = build(moe_config("mixtral"), span_attention.ATTENTION_NAME)
    query = torch.zeros(1, 4, 3, 8)
    with pytest.raises(FinetuneError, match="cannot honour attention_chunk_size of MixtralAttention"):
        span_attention.packed_spans(model.model.layers[0].self_attn, query, query, query, None,
                                    attention_chunk_size=8)


@pytest.mark.slow
def test_a_bad_expert_target_is_one_line(gpt_oss_folder):
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path",
                        str(gpt_oss_folder / "model"), "--plan-only", "--lora", "--block-size", "64",
                        "--lora-target-modules", "experts.up_proj")
    assert "experts.gate_up_proj" in assert_one_line_error(result)


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("mixtral"), "mixtral", 0.02)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_fsdp2_ranks_train_mixtral_as_one_process_does(mixtral_folder, kind):
    args = ["--model-name-or-path", str(mixtral_folder / "model"), "--dataset-name-or-path",
            str(mixtral_folder / "data"), "--batch-size", "4", "--micro-batch-size", "2", "--block-size", "64",
            "--max-steps", "2", "--log-interval", "1", "--lr", "1e-2", *(["--lora"] if kind == "lora" else [])]
    train = str(REPO_ROOT / "train_llama2.py")
    runs = {}
    for name, launch in (("one", lambda *a: run_script(PYTHON, train, *a)), ("two", lambda *a: torchrun(2, train, *a))):
        out = mixtral_folder / f"{kind}_{name}"
        result = launch(*args, "--save-model-dir", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one, two = runs["one"], runs["two"]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    assert two[0]["aux_loss"] == pytest.approx(one[0]["aux_loss"], abs=1e-5)  # weighted alike across ranks
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-4)
