"""finetune/observe/metrics.py: peak memory is measured from the first step on, reserved memory reported, FLOPs
follow what trains, and time spent paused (validation) stays out of the step time."""
import types

import torch

# ---- peaks start at the first step; reserved memory is reported -------------------------------------------

def test_metrics_reset_the_peak_and_report_reserved_memory(monkeypatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.observe import metrics

    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2 ** 30)
    gpu = torch.device("cuda", 0)
    backend = types.SimpleNamespace(device=gpu, is_main=False, world_size=1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    logging = types.SimpleNamespace(log_interval=1, peak_tflops=None)
    metrics.MetricsLog(str(tmp_path), backend, model, logging, total_steps=1)
    assert resets == [gpu]
    assert metrics.peak_reserved_gib(gpu) == 3.0
    assert metrics.peak_reserved_gib(torch.device("cpu")) is None


# ---- FLOPs follow requires_grad ----------------------------------------------------------------------------------

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=2))


def test_flops_count_forward_input_and_weight_gradients_by_what_trains():
    from finetune.model.size import attention_width, matmul_parameters
    from finetune.observe.metrics import step_flops, trained_flops

    model = tiny_llama()
    weights, width = matmul_parameters(model), attention_width(model.config)
    per_token, per_pair = trained_flops(model)
    assert per_token * 10 + per_pair * 7 == step_flops(model.config, weights, 10, 7)  # full fine-tuning: as before

    layers = model.model.layers
    model.model.embed_tokens.requires_grad_(False)
    for layer in layers[:2]:  # the bottom half: forward only, no gradient flows down to them
        layer.requires_grad_(False)
    linear = lambda module: sum(m.in_features * m.out_features for m in module.modules()  # noqa: E731
                                if isinstance(m, torch.nn.Linear))
    per_token, per_pair = trained_flops(model)
    assert per_token == 2 * linear(layers[:2]) + 6 * linear(layers[2:]) + 6 * linear(model.lm_head)
    assert per_pair == (2 * 4 + 2 * 12) * width
    model.requires_grad_(False)
    assert trained_flops(model) == (2 * weights, 4 * 4 * width)  # nothing trains: forward only


def test_lora_flops_are_the_frozen_base_with_input_gradients_and_the_adapters_in_full():
    from peft import LoraConfig, get_peft_model

    from finetune.model import lora
    from finetune.model.size import matmul_parameters
    from finetune.observe.metrics import step_flops, trained_flops

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    per_token, per_pair = trained_flops(model)
    assert per_token * 10 + per_pair * 7 == step_flops(model.config, matmul_parameters(model), 10, 7,
                                                       adapter_parameters=lora.count_trainable(model))


# ---- validation stays out of the step's time ----------------------------------------------------------------------

def test_time_spent_paused_stays_out_of_step_time_and_tokens_per_sec(tmp_path):
    import json
    import time

    from finetune.observe.metrics import MetricsLog

    backend = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=1,
                                    all_reduce_sum=lambda tensor: tensor)
    logging = types.SimpleNamespace(log_interval=1, peak_tflops=1.0, report_to=())
    log = MetricsLog(str(tmp_path), backend, tiny_llama(), logging, total_steps=1)
    log.add_step(1000, 0)
    with log.paused():  # what validation takes
        time.sleep(0.5)
    log.log(1, 0, torch.tensor(2.0), 1.0, 1e-3, {"val_loss": 2.5})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step_time"] < 0.25 and row["tokens_per_sec"] > 4000 and row["val_loss"] == 2.5, row
