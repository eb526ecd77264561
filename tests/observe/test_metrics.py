"""finetune/observe/metrics.py: peak memory is measured from the first step on, reserved memory reported."""
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
