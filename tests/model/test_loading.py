"""finetune/model/loading.py: load_model on one CPU: fp32 masters, the packed attention, the layout."""
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from finetune.config import ModelConfig
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.model import loading
from finetune.ops import span_attention

CPU = Backend(engine="single", device=torch.device("cpu"))


@dataclass(frozen=True)
class Layout:
    """What load_model reads of plan.layout.Layout."""
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    chunked_loss: bool = False
    attention: str = "auto"


def test_the_tiny_llama_loads_as_fp32_masters_with_the_packed_attention(tiny_run):
    model = loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                               attn_implementation=span_attention.ATTENTION_NAME)
    assert model.config._attn_implementation == span_attention.ATTENTION_NAME
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    saved = load_file(f"{tiny_run['llama']}/model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], value.float()) for name, value in saved.items())
    assert not model.is_gradient_checkpointing


def test_the_loaded_model_keeps_packed_examples_apart(tiny_run):
    model = loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                               attn_implementation=span_attention.ATTENTION_NAME).eval()
    first, second = torch.tensor([[1, 5, 9, 2]]), torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions,
                       example_spans=[[(0, 4), (4, 9)]], use_cache=False).logits[0]
        alone = model(input_ids=second, use_cache=False).logits[0]
    assert torch.allclose(packed[4:], alone, atol=1e-5)


def test_the_layout_turns_on_checkpointing_and_the_chunked_loss(tiny_run):
    plain = loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]))
    model = loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                               Layout(activation_checkpointing=True, chunked_loss=True))
    assert model.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    chunked, whole = model(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    with pytest.raises(FinetuneError, match="the chunked loss is on"):  # it never forms all the logits
        chunked.logits  # noqa: B018
    assert whole.logits is not None
    assert torch.allclose(chunked.loss, whole.loss, atol=1e-5)


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FinetuneError) as raised:
        loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(str(tmp_path / "missing")))
    assert str(raised.value).startswith(f"cannot load the model {str(tmp_path / 'missing')!r}: ")
    assert "\n" not in str(raised.value)


def test_a_truncated_weight_file_is_named(tiny_run, tmp_path):
    folder = shutil.copytree(tiny_run["llama"], tmp_path / "llama")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(FinetuneError, match=f"cannot load the model '{folder}': {weights} is damaged or truncated"):
        loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(str(folder)))


@pytest.mark.parametrize("attention", ["packed_spans", "varlen_spans", "flex_spans"])
def test_every_packed_attention_path_checks_the_model_routes_its_attention(tiny_run, monkeypatch, attention):
    """Under `auto` a GPU loads varlen_spans: a model whose attention bypassed transformers' interface would let
    packed examples attend to each other there, as on the span loop. The check runs for every packed path."""
    checked = []
    monkeypatch.setattr(loading, "attention_name", lambda *args: attention)  # what a GPU would resolve
    monkeypatch.setattr(span_attention, "check_model_routes_attention", lambda model: checked.append(model))
    model = loading.load_model(Backend(engine="single", device=torch.device("cpu")), AutoModelForCausalLM,
                               ModelConfig(tiny_run["llama"]))
    assert checked == [model] and model.config._attn_implementation == attention


def test_a_model_without_transformers_attention_interface_is_refused_for_packed_rows(tiny_run, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)  # as a model with its own attention
    with pytest.raises(FinetuneError, match="^LlamaForCausalLM does not run its attention through transformers' "):
        loading.load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                           attn_implementation=span_attention.ATTENTION_NAME)
