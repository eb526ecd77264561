"""The parallel plan: micro-batch, gradient accumulation, activation checkpointing and memory per device.

MoAI's Advanced Parallelization picks these by itself; here the backend hook asks this module. `--plan-only`
prints a plan for a target machine without loading any weights (shapes of the common hub models are known
offline); a real run on GPUs plans against the device's memory, then probes the micro-batch for real.
"""
import json
import os

import torch

from finetune import lora
from finetune.parallel import probe_micro_batch, split_global_batch

# Shapes of the models this collection targets, so `--plan-only` works offline and without downloading.
KNOWN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "meta-llama/Llama-2-70b-hf": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "baichuan-inc/Baichuan2-7B-Base": dict(vocab_size=125696, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32),
    "baichuan-inc/Baichuan2-13B-Base": dict(vocab_size=125696, hidden_size=5120, intermediate_size=13696,
                                            num_hidden_layers=40, num_attention_heads=40),
}
KNOWN_CONFIGS["baichuan-inc/Baichuan2-13B-Chat"] = KNOWN_CONFIGS["baichuan-inc/Baichuan2-13B-Base"]
KNOWN_CONFIGS["meta-llama/Llama-2-13b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"]

GIB = 1024 ** 3


def count_parameters(cfg):
    """Parameters of a Llama-style decoder from its shape (Baichuan's fused W_pack has the same count)."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_dim = h // heads * cfg.get("num_key_value_heads", heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


def estimate_memory(cfg, world_size, micro_batch_size, block_size, checkpointing, mixed_precision, adapters=None):
    """Bytes per device: fp32 master weights, gradients and AdamW state sharded over ranks, plus activations.

    With `adapters` ({"trainable": adapter parameters, "quantized": 4-bit base?}, --lora / --qlora) the base is
    frozen: only its weights (bf16 under bf16 compute; with --qlora the decoder's linear layers in 4-bit NF4),
    no gradients or optimiser state for it; the adapters hold fp32 weights, gradients and AdamW state.
    Activations are taken to be those of full fine-tuning (the adapters' own are rank-sized and left out).
    """
    params = count_parameters(cfg)
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    act_bytes = 2 if mixed_precision == "bf16" else 4
    tokens = micro_batch_size * block_size
    # Saved tensors per token in one decoder layer: ~10 hidden-sized (norms, q/k/v, attention out, residuals)
    # and 4 intermediate-sized (gate, up, activation, product) tensors; checkpointing keeps only layer inputs.
    per_layer_token = (10 * h + 4 * i) * act_bytes
    if checkpointing:
        activations = tokens * (layers * h * act_bytes + per_layer_token)
    else:
        activations = tokens * layers * per_layer_token
    activations += tokens * vocab * 4 * 2  # fp32 logits and their gradient
    shard = params / world_size
    gathered_layer = 2 * (params - 2 * vocab * h) / layers * act_bytes  # two unsharded layers in flight
    if adapters:
        trainable = adapters["trainable"]
        base_bytes = 2 if mixed_precision == "bf16" else 4
        base = params * base_bytes
        if adapters.get("quantized"):
            quantized = lora.quantized_linear_parameters(cfg)
            base = quantized * lora.NF4_BYTES_PER_PARAMETER + (params - quantized) * 2
            gathered_layer = 0
        return {
            "parameters": params,
            "trainable_parameters": trainable,
            "weights": (base + trainable * 4) / world_size + (gathered_layer if world_size > 1 else 0),
            "gradients": trainable * 4 / world_size,
            "optimizer": trainable * 8 / world_size,
            "activations": activations,
        }
    return {
        "parameters": params,
        "weights": shard * 4 + (gathered_layer if world_size > 1 else 0),
        "gradients": shard * 4,
        "optimizer": shard * 8,
        "activations": activations,
    }


def describe_plan(cfg, engine, world_size, batch_size, micro_batch_size, accumulation, block_size,
                  checkpointing, mixed_precision, device_name, device_memory_gb=None, adapters=None):
    """The plan as a dict (also written to the run folder) and as printable lines."""
    memory = estimate_memory(cfg, world_size, micro_batch_size, block_size, checkpointing, mixed_precision,
                             adapters)
    total = _total(memory)
    plan = {
        "engine": engine, "world_size": world_size, "device": device_name,
        "sharding": "FSDP2 per decoder layer" if world_size > 1 else "none (one device)",
        "global_batch_rows": batch_size, "micro_batch_size": micro_batch_size,
        "accumulation_steps": accumulation, "block_size": block_size,
        "activation_checkpointing": bool(checkpointing),
        "dtype": "bf16 compute, fp32 master weights and reduction" if mixed_precision == "bf16" else "fp32",
        "parameters": memory["parameters"],
        "memory_gib_per_device": {k: round(v / GIB, 2) for k, v in memory.items() if k not in COUNTS},
        "memory_gib_per_device_total": round(total / GIB, 2),
    }
    if adapters:
        plan["training"] = ("QLoRA: 4-bit NF4 frozen base, bf16 compute" if adapters.get("quantized") else
                            f"LoRA: {'bf16' if mixed_precision == 'bf16' else 'fp32'} frozen base")
        plan["trainable_parameters"] = memory["trainable_parameters"]
    if device_memory_gb:
        plan["fits"] = total / GIB <= device_memory_gb * 0.92
    lines = ["[parallel plan]"] + [f"  {k}: {v}" for k, v in plan.items()]
    return plan, lines


def plan_for_budget(cfg, world_size, batch_size, block_size, device_memory_gb, mixed_precision="bf16",
                    micro_batch_size=None, adapters=None):
    """Largest micro-batch (power of two dividing the per-rank rows) that fits, switching on checkpointing if
    that is what it takes; the arithmetic behind `--plan-only`."""
    per_rank = split_global_batch(batch_size, world_size, 1)[1]
    candidates = [micro_batch_size] if micro_batch_size else [m for m in (2 ** k for k in range(12, -1, -1))
                                                               if m <= per_rank and per_rank % m == 0]
    for checkpointing in (False, True):
        for micro in candidates:
            memory = estimate_memory(cfg, world_size, micro, block_size, checkpointing, mixed_precision, adapters)
            if _total(memory) / GIB <= device_memory_gb * 0.92:
                return micro, per_rank // micro, checkpointing
    return candidates[-1], per_rank // candidates[-1], True


COUNTS = ("parameters", "trainable_parameters")  # entries of estimate_memory() that are not bytes


def _total(memory):
    return sum(v for k, v in memory.items() if k not in COUNTS)


def adapter_plan(args, shape):
    """What the memory plan needs to know of --lora / --qlora (None for full fine-tuning)."""
    settings = lora.settings(args)
    if not settings:
        return None
    return {"trainable": lora.adapter_parameters(shape, settings.rank, settings.targets),
            "quantized": settings.quantize_4bit}


def model_shape(model_name_or_path):
    """The config fields the plan needs, from a local folder or the table of known hub models."""
    local = os.path.join(model_name_or_path, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            return json.load(f)
    if model_name_or_path in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[model_name_or_path])
    try:  # another hub model: its config.json is a small download
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(model_name_or_path).to_dict()
    except (OSError, ValueError):
        raise SystemExit(f"error: no config.json in {model_name_or_path!r}, it could not be downloaded, and it is "
                         f"not one of {sorted(KNOWN_CONFIGS)}") from None


def plan_only(args, backend):
    """`--plan-only`: print the plan for `--num-devices` x `--device-memory-gb` and load nothing."""
    shape = model_shape(args.model_name_or_path)
    world = args.num_devices or backend.world_size
    adapters = adapter_plan(args, shape)
    if adapters and adapters["quantized"] and world > 1:
        raise SystemExit("error: --qlora runs on one device; plan it with --num-devices 1, or use --lora")
    micro, accumulation, checkpointing = plan_for_budget(shape, world, args.batch_size, args.block_size,
                                                         args.device_memory_gb, "bf16", args.micro_batch_size,
                                                         adapters)
    _, lines = describe_plan(shape, "fsdp2" if world > 1 else "single", world, args.batch_size, micro, accumulation,
                             args.block_size, checkpointing, "bf16", f"{world} x {args.device_memory_gb:g} GB",
                             args.device_memory_gb, adapters)
    if backend.is_main:
        print("\n".join(lines))
    return 0


def choose_layout(args, backend):
    """(micro_batch_size, accumulation_steps, activation_checkpointing) for this job before the model loads.

    On a CPU: micro-batches of about 2k tokens, no checkpointing unless asked. On GPUs with `auto`: the
    largest micro-batch the plan fits in device memory (the probe after loading confirms it for real).
    """
    micro, accumulation = split_global_batch(args.batch_size, backend.world_size, args.micro_batch_size,
                                             backend.device.type, args.block_size)
    checkpointing = args.activation_checkpointing == "on"
    if args.activation_checkpointing == "auto" and backend.device.type == "cuda":
        memory_gb = torch.cuda.get_device_properties(backend.device).total_memory / 2 ** 30
        shape = model_shape(args.model_name_or_path)
        micro, accumulation, checkpointing = plan_for_budget(
            shape, backend.world_size, args.batch_size, args.block_size, memory_gb, backend.mixed_precision,
            args.micro_batch_size, adapter_plan(args, shape))
    return micro, accumulation, checkpointing


def confirm_on_device(model, backend, args, micro, accumulation):
    """On GPUs, unless --micro-batch-size is given: run real steps, halving the micro-batch until one fits."""
    if backend.device.type != "cuda" or args.micro_batch_size is not None:
        return micro, accumulation
    per_rank = args.batch_size // backend.world_size
    micro = probe_micro_batch(model, backend, micro, per_rank, args.block_size)
    return micro, per_rank // micro


def print_and_save_plan(model, backend, args, micro, accumulation, checkpointing):
    """Print the chosen plan (rank 0) and return it as a dict for parallel_plan.json."""
    adapters = None
    if lora.is_lora(model):  # counted on the model itself
        adapters = {"trainable": lora.count_trainable(model), "quantized": model.lora_settings.quantize_4bit}
    plan, lines = describe_plan(model.config.to_dict(), backend.engine, backend.world_size, args.batch_size, micro,
                                accumulation, args.block_size, checkpointing, backend.mixed_precision,
                                str(backend.device), adapters=adapters)
    if backend.is_main:
        print("\n".join(lines), flush=True)
    return plan
