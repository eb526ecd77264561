"""finetune/model/size.py: parameter and matmul counts read off the model, and from its meta-device copy."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config

from finetune.errors import FinetuneError
from finetune.model import size

H, INNER, VOCAB, HEADS, KV_HEADS, LAYERS = 32, 64, 128, 4, 2, 2


def tiny_config(**changes):
    return LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=INNER, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS), **changes})


def test_parameter_count_is_that_of_the_model():
    model = LlamaForCausalLM(tiny_config())
    assert size.parameter_count(model) == sum(p.numel() for p in model.parameters())
    kv = KV_HEADS * H // HEADS
    per_layer = 2 * H * H + 2 * H * kv + 3 * H * INNER + 2 * H  # q, o; k, v; the MLP; two norms
    assert size.parameter_count(model) == 2 * VOCAB * H + LAYERS * per_layer + H


def test_a_tied_embedding_counts_once_as_a_parameter_and_twice_in_matmuls():
    untied = LlamaForCausalLM(tiny_config())
    tied = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    assert size.parameter_count(untied) - size.parameter_count(tied) == VOCAB * H
    assert size.matmul_parameters(tied) == size.matmul_parameters(untied)  # the head still multiplies every token


def test_matmul_parameters_are_the_linear_layers_the_head_included():
    model = LlamaForCausalLM(tiny_config())
    kv = KV_HEADS * H // HEADS
    assert size.matmul_parameters(model) == LAYERS * (2 * H * H + 2 * H * kv + 3 * H * INNER) + VOCAB * H


def test_lora_layers_are_left_out_of_the_matmul_weights():
    class Adapted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)
            self.proj_lora = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(8, 2), "lora_B": torch.nn.Linear(2, 4)})

    assert size.matmul_parameters(Adapted()) == 8 * 4  # counted apart (finetune/model/lora.py)


def test_the_meta_model_has_the_real_models_shapes_without_memory():
    config = tiny_config()
    real = LlamaForCausalLM(config)
    meta = size.meta_model({**config.to_dict(), "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"})
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert size.parameter_count(meta) == size.parameter_count(real)


def test_attention_width_uses_head_dim_where_it_is_not_hidden_over_heads():
    assert size.attention_width(tiny_config()) == H
    assert size.attention_width(Qwen3Config(hidden_size=32, num_attention_heads=4, head_dim=16)) == 64


def test_a_config_transformers_cannot_build_is_one_line_when_sizing():
    with pytest.raises(FinetuneError, match="cannot build a 'no_such_family' causal LM from its config"):
        size.meta_model(dict(model_type="no_such_family", hidden_size=32))
