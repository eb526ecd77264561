"""The one backend hook: call `enable_advanced_parallelization()` before the model is loaded.

On the MoAI Platform it defers to `torch.moreh.option.enable_advanced_parallelization()`, which parallelises
the unchanged script by itself. Everywhere else it does the same job with stock PyTorch:

  python train.py ...                              one GPU, or the CPU
  torchrun --standalone --nproc_per_node N ...     N processes on one node
  torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29400 ...   several nodes

Under torchrun it starts the process group (nccl on GPUs, gloo on CPU), binds each rank to its device, loads
the weights once per job (rank 0 reads the checkpoint, the others build on the meta device and receive their
shards) and shards the model with FSDP2 `fully_shard`, one unit per decoder layer. It also turns the global
`--batch-size` into per-rank micro-batches and gradient-accumulation steps, and prints the chosen plan.
"""
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


@dataclass
class Backend:
    """Where this process runs and how the job is laid out; returned by the hook."""
    engine: str                 # "moreh", "fsdp2" or "single"
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    mixed_precision: str = "no"  # "bf16" or "no"
    control_group: object = None  # a gloo group for small host-side agreements (stop flags)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def autocast(self):
        """bf16 autocast where FSDP's own mixed precision is not doing the casting."""
        if self.mixed_precision == "bf16" and not (self.engine == "fsdp2" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag):
        """True on every rank if `flag` is true on any rank (host-side, no device sync)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(value.item())

    def barrier(self):
        if self.distributed:
            dist.barrier(group=self.control_group)

    def shutdown(self):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def enable_advanced_parallelization(mixed_precision="auto", timeout_minutes=30):
    """Set up the job for this process; call once, before the model is loaded."""
    if importlib.util.find_spec("torch.moreh") is not None:  # present only on the MoAI Platform
        importlib.import_module("torch.moreh").option.enable_advanced_parallelization()
        return Backend(engine="moreh", device=torch.device("cuda"),
                       mixed_precision="no" if mixed_precision == "no" else "bf16")

    has_cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if has_cuda else "no"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = torch.device("cuda", 0) if has_cuda else torch.device("cpu")
        return Backend(engine="single", device=device, mixed_precision=mixed_precision)

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if has_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # A bounded timeout turns a peer that died mid-collective into an error here instead of a hang.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group("nccl" if has_cuda else "gloo", timeout=timeout,
                            device_id=device if has_cuda else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if has_cuda else dist.group.WORLD
    return Backend(engine="fsdp2", device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   mixed_precision=mixed_precision, control_group=control)


# ----------------------------------------------------------------------------------------------------------
# Model loading and sharding
# ----------------------------------------------------------------------------------------------------------

def decoder_layers(model):
    """The repeated blocks named by the model's `_no_split_modules` (one FSDP unit each)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def load_model(backend, model_class, model_path, gradient_checkpointing=False, compile_layers=False,
               attn_implementation=None, trust_remote_code=False):
    """Load fp32 master weights and place them: whole on one device, or sharded per layer under torchrun."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if backend.engine != "fsdp2":
        model = model_class.from_pretrained(model_path, dtype=torch.float32, **kwargs)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile_layers:
            for layer in decoder_layers(model):
                layer.compile()
        return model.to(backend.device)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Only rank 0 reads the checkpoint into host memory; every rank builds an empty (meta) copy to shard.
    full_state, buffers = {}, {}
    if backend.is_main:
        full_model = model_class.from_pretrained(model_path, dtype=torch.float32, **kwargs)
        full_state = full_model.state_dict()
        buffers = {name: b.clone() for name, b in full_model.named_buffers()}
        del full_model
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=torch.float32, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    policy = MixedPrecisionPolicy()
    if backend.mixed_precision == "bf16" and backend.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        raise SystemExit(f"error: {type(model).__name__} names no decoder layer in _no_split_modules; cannot shard it")
    for layer in layers:
        if compile_layers:
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # Gradients are summed over ranks, not averaged: the loss is already normalised by the global token count.
    # Each FSDP unit keeps its own setting; force_sum keeps the reduction a plain SUM, which gloo supports.
    for unit in [*layers, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)

    model.to_empty(device=backend.device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    # Non-persistent buffers (rotary frequencies, ...) are not in the state dict: send rank 0's copies.
    for name, buffer in model.named_buffers():
        if backend.is_main:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def full_state_dict_on_rank0(model, backend):
    """The whole model's weights as ordinary CPU tensors on rank 0 (empty elsewhere), for save_pretrained."""
    if backend.engine != "fsdp2":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------------
# Batch split and the printed plan
# ----------------------------------------------------------------------------------------------------------

CPU_MICRO_BATCH_TOKENS = 2048  # measured on the demo model: ~2k tokens per forward keep a CPU's caches warm


def split_global_batch(batch_size, world_size, micro_batch_size=None, device_type="cpu", block_size=1024):
    """(micro_batch_size, accumulation_steps) for `batch_size` rows per step over `world_size` ranks."""
    if batch_size <= 0:
        raise SystemExit("error: --batch-size must be a positive number of rows")
    if batch_size % world_size:
        raise SystemExit(f"error: --batch-size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    if micro_batch_size is None:
        # CPUs run fastest on a couple of thousand tokens at a time; GPUs start from the largest power of two
        # and the probe backs off from there.
        start = max(1, CPU_MICRO_BATCH_TOKENS // block_size) if device_type == "cpu" else per_rank
        micro_batch_size = min(per_rank, 2 ** int(math.log2(start)))
        while per_rank % micro_batch_size:
            micro_batch_size //= 2
    if micro_batch_size <= 0 or per_rank % micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {micro_batch_size} does not divide the {per_rank} rows "
                         f"each process takes per step")
    return micro_batch_size, per_rank // micro_batch_size


def count_parameters(cfg):
    """Parameters of a Llama-style decoder from its shape (Baichuan's fused W_pack has the same count)."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_dim = h // heads * cfg.get("num_key_value_heads", heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


def estimate_memory(cfg, world_size, micro_batch_size, block_size, checkpointing, mixed_precision):
    """Bytes per device: fp32 master weights, gradients and AdamW state sharded over ranks, plus activations."""
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
    return {
        "parameters": params,
        "weights": shard * 4 + (gathered_layer if world_size > 1 else 0),
        "gradients": shard * 4,
        "optimizer": shard * 8,
        "activations": activations,
    }


def describe_plan(cfg, engine, world_size, batch_size, micro_batch_size, accumulation, block_size,
                  checkpointing, mixed_precision, device_name, device_memory_gb=None):
    """The plan as a dict (also written to the run folder) and as printable lines."""
    memory = estimate_memory(cfg, world_size, micro_batch_size, block_size, checkpointing, mixed_precision)
    total = sum(v for k, v in memory.items() if k != "parameters")
    plan = {
        "engine": engine, "world_size": world_size, "device": device_name,
        "sharding": "FSDP2 per decoder layer" if world_size > 1 else "none (one device)",
        "global_batch_rows": batch_size, "micro_batch_size": micro_batch_size,
        "accumulation_steps": accumulation, "block_size": block_size,
        "activation_checkpointing": bool(checkpointing),
        "dtype": "bf16 compute, fp32 master weights and reduction" if mixed_precision == "bf16" else "fp32",
        "parameters": memory["parameters"],
        "memory_gib_per_device": {k: round(v / GIB, 2) for k, v in memory.items() if k != "parameters"},
        "memory_gib_per_device_total": round(total / GIB, 2),
    }
    if device_memory_gb:
        plan["fits"] = total / GIB <= device_memory_gb * 0.92
    lines = ["[parallel plan]"] + [f"  {k}: {v}" for k, v in plan.items()]
    return plan, lines


def plan_for_budget(cfg, world_size, batch_size, block_size, device_memory_gb, mixed_precision="bf16",
                    micro_batch_size=None):
    """Largest micro-batch (power of two dividing the per-rank rows) that fits, switching on checkpointing if
    that is what it takes; the arithmetic behind `--plan-only`."""
    per_rank = split_global_batch(batch_size, world_size, 1)[1]
    candidates = [micro_batch_size] if micro_batch_size else [m for m in (2 ** k for k in range(12, -1, -1))
                                                               if m <= per_rank and per_rank % m == 0]
    for checkpointing in (False, True):
        for micro in candidates:
            memory = estimate_memory(cfg, world_size, micro, block_size, checkpointing, mixed_precision)
            if sum(v for k, v in memory.items() if k != "parameters") / GIB <= device_memory_gb * 0.92:
                return micro, per_rank // micro, checkpointing
    return candidates[-1], per_rank // candidates[-1], True


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


def probe_micro_batch(model, backend, micro_batch_size, per_rank, block_size):
    """On a GPU: run a real forward+backward at full width and halve the micro-batch until it fits.

    Memory for the optimiser state (allocated only at the first step) is held aside while probing. Every rank
    probes the same synthetic rows, so all of them run out of memory at the same point and agree on the size.
    """
    params = sum(p.numel() for p in model.parameters())  # local shard sizes under FSDP
    reserve = torch.empty(8 * params, dtype=torch.uint8, device=backend.device)  # two fp32 AdamW moments
    generator = torch.Generator(device=backend.device).manual_seed(0)
    micro = micro_batch_size
    while True:
        try:
            ids = torch.randint(model.config.vocab_size, (micro, block_size), device=backend.device,
                                generator=generator)
            with backend.autocast():
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if backend.distributed:
            flag = torch.tensor([0 if fits else 1], device=backend.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            fits = flag.item() == 0
        if fits or micro == 1:
            break
        micro //= 2
        while per_rank % micro:
            micro -= 1
    del reserve
    if not fits:
        raise SystemExit(f"error: one row of {block_size} tokens does not fit in GPU memory; use "
                         f"--activation-checkpointing on, a smaller --block-size, or more GPUs")
    return micro
