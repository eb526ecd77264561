"""Honest speed figures: model FLOPs per step, device peak, MFU and peak memory.

FLOPs count only useful work: 6 x (weights used in matmuls) per real token, plus 12 x layers x hidden per
(query, key) pair that attention actually computes for real tokens (block-diagonal when packed). Padding
counts for nothing.
"""
import resource
import time

import torch

# Dense peak TFLOP/s per GPU for bf16 (fp32 is taken as tf32 where the chip has it). Override with --peak-tflops.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0, "GH200": 989.0,
}


def matmul_parameters(config):
    """Weights that take part in a matmul for every token: all linear layers and the output head."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_dim = h // heads * (getattr(config, "num_key_value_heads", None) or heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def step_flops(config, tokens, attended_pairs):
    """Training FLOPs (forward + backward) for `tokens` real tokens and the attention pairs among them."""
    return 6 * matmul_parameters(config) * tokens + 12 * config.num_hidden_layers * config.hidden_size * attended_pairs


def matmul_rate(m, k, n, seconds=0.5):
    """Best fp32 FLOP/s of an (m x k) @ (k x n) matmul with PyTorch's current threads."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


_cpu_peak_cache = {}


def measure_cpu_peak_flops(size=1024, seconds=0.5):
    """The CPU's fp32 matmul peak as MFU's denominator: a square matmul, measured once per process."""
    if size not in _cpu_peak_cache:
        _cpu_peak_cache[size] = matmul_rate(size, size, size, seconds)
    return _cpu_peak_cache[size]


def device_peak_flops(device, override_tflops=None):
    """(peak FLOP/s, where the figure came from) for this device."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key] * 1e12, f"table ({key})"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    if device.type == "cpu":
        return measure_cpu_peak_flops(), "measured fp32 matmul"
    return None, "unknown device"


def peak_memory_gib(device):
    """Peak memory so far: allocated GPU memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB
