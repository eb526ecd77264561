"""The parallel plan: micro-batch, gradient accumulation, activation checkpointing, CPU offload, memory.

MoAI's Advanced Parallelization picks these by itself; here the backend hook asks this module, and the memory
figures come from a simulated training step of the real model shape under PyTorch's own memory tracker
(finetune/plan/memory.py), not from a formula. `--plan-only` prints the candidates and the chosen plan for a target
machine without loading any weights (shapes of the common hub models are known offline); a real run on GPUs
plans against its own devices, then probes the micro-batch for real. A CPU run needs no memory plan: it takes
micro-batches of about 2k tokens.
"""
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from finetune.checkpoint.save_dtype import dtype_name, saved_dtype
from finetune.config import RunConfig
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.model import lora, size
from finetune.ops.chunked_loss import loss_description
from finetune.plan import memory, step_time
from finetune.plan.probe import probe_micro_batch

# Shapes of the models this collection targets, so `--plan-only` works offline and without downloading.
KNOWN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "meta-llama/Llama-2-70b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "baichuan-inc/Baichuan2-7B-Base": dict(model_type="baichuan", vocab_size=125696, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32),
    "baichuan-inc/Baichuan2-13B-Base": dict(model_type="baichuan", vocab_size=125696, hidden_size=5120, intermediate_size=13696,
                                            num_hidden_layers=40, num_attention_heads=40),
}
KNOWN_CONFIGS["baichuan-inc/Baichuan2-13B-Chat"] = KNOWN_CONFIGS["baichuan-inc/Baichuan2-13B-Base"]
KNOWN_CONFIGS["meta-llama/Llama-2-13b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"]

# What count_parameters and the simulation size the model by.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

GIB = 1024 ** 3
HOST_MEMORY_GB_DEFAULT = 512  # a common 8-GPU server's host memory, for --plan-only


def count_parameters(cfg: dict) -> int:
    """Parameters of the model of config dict `cfg`, counted on a meta-device copy (a tied weight once)."""
    return size.parameter_count(size.meta_model(cfg))


def count_active_parameters(cfg: dict) -> int:
    """The parameters a token computes with (fewer than all for a mixture of experts)."""
    return size.active_parameter_count(size.meta_model(cfg))


def model_shape(model_name_or_path: str, trust_remote_code: bool = False) -> dict:
    """The config fields the plan needs, from a local folder or the table of known hub models (a local
    config.json is read as JSON: nothing of the folder is imported)."""
    local = os.path.join(model_name_or_path, "config.json")
    if os.path.isfile(local):
        return check_shape(read_config_file(local), local)
    if model_name_or_path in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[model_name_or_path])
    try:  # another hub model: its config.json is a small download
        from transformers import AutoConfig

        from finetune.model.remote_code import refusing_remote_code
        with refusing_remote_code(model_name_or_path):
            config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError):
        raise FinetuneError(f"no config.json in {model_name_or_path!r}, it could not be downloaded, and it is "
                            f"not one of {sorted(KNOWN_CONFIGS)}") from None
    return check_shape(config, f"the config of {model_name_or_path}")


def read_config_file(path: str) -> dict:
    """A config.json as a dict; a file that is not one is an error naming it (the plan reads it raw, before
    transformers would)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        config = json.loads(text) if text.strip() else None
    except OSError as exc:
        raise FinetuneError(f"cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise FinetuneError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if config is None:
        raise FinetuneError(f"{path} is empty")
    if not isinstance(config, dict):
        raise FinetuneError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    return config


def check_shape(config: dict, source: str) -> dict:
    """The fields the plan sizes the model by must be there (a Llama- or Baichuan-style config)."""
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise FinetuneError(f"{source} names no model_type (e.g. \"llama\" or \"baichuan\")")
    bad = [name for name in SHAPE_FIELDS
           if isinstance(config.get(name), bool) or not isinstance(config.get(name), int) or config[name] < 1]
    if bad:
        raise FinetuneError(f"{source} lacks {', '.join(bad)} as positive integers; the plan needs a Llama- or "
                            f"Baichuan-style config")
    return config


CPU_MICRO_BATCH_TOKENS = 2048  # measured on the demo model: ~2k tokens per forward keep a CPU's caches warm


def split_global_batch(batch_size: int, world_size: int, micro_batch_size: int | None = None,
                       device_type: str = "cpu", block_size: int = 1024) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps) for `batch_size` rows per step over `world_size` ranks."""
    if batch_size <= 0:
        raise FinetuneError("--batch-size must be a positive number of rows")
    if batch_size % world_size:
        raise FinetuneError(f"--batch-size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    if micro_batch_size is None:
        # CPUs run fastest on a couple of thousand tokens at a time; GPUs start from the largest power of two
        # and the probe backs off from there.
        start = max(1, CPU_MICRO_BATCH_TOKENS // block_size) if device_type == "cpu" else per_rank
        micro_batch_size = min(per_rank, 2 ** int(math.log2(start)))
        while per_rank % micro_batch_size:
            micro_batch_size //= 2
    if micro_batch_size <= 0 or per_rank % micro_batch_size:
        raise FinetuneError(f"--micro-batch-size {micro_batch_size} does not divide the {per_rank} rows "
                            f"each process takes per step")
    return micro_batch_size, per_rank // micro_batch_size


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of this process's AdamW state (two fp32 moments per trainable element it holds). Under FSDP2 a
    parameter is a DTensor whose numel() is the whole tensor's; this process holds only its local shard."""
    return 8 * sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                   for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Layout:
    """How each process runs a step: decided once before loading, confirmed on GPUs by the probe after it."""
    micro_batch_size: int
    accumulation_steps: int
    activation_checkpointing: bool
    cpu_offload: bool
    chunked_loss: bool
    memory_gib_per_device: dict | None = None   # the simulated figures of this layout (GPUs), if it was planned
    attention: str = "auto"   # --attn-implementation; parallel.load_model resolves it for the model and device


def _toggle(value):
    return {"auto": None, "on": True, "off": False}[value]


def training_kind(adapters: lora.LoraSettings | None) -> str:
    return "qlora" if adapters and adapters.quantize_4bit else "lora" if adapters else "full"


def offload_choice(config: RunConfig) -> bool | None:
    """--cpu-offload as the plan takes it: QLoRA runs on one device without FSDP2, so it is never offered offload
    (whose advice, torchrun, --qlora then refuses)."""
    if training_kind(config.lora) == "qlora":
        if config.parallel.cpu_offload == "on":
            raise FinetuneError("--qlora runs on one device without FSDP2, which CPU offload needs; use "
                                "--cpu-offload off (or auto)")
        return False
    return _toggle(config.parallel.cpu_offload)


def simulated_plan(config: RunConfig, model_shape_dict: dict, world_size: int, device_memory_gb: float,
                   host_memory_gb: float) -> memory.Choice:
    """memory.plan_candidates for this RunConfig: every candidate layout with its simulated memory, and the
    choice. When only offloaded layouts fit, the offloaded ones with activation checkpointing are simulated too and
    the fitting layout with the least estimated step time wins (step_time: offload pays host traffic per
    micro-batch, so fewer, larger micro-batches are faster)."""
    adapters, parallel = config.lora, config.parallel
    lora_kwargs = (dict(r=adapters.rank, lora_alpha=adapters.alpha, lora_dropout=adapters.dropout,
                        **lora.peft_targets(lora.resolve_targets(size.meta_model(model_shape_dict),
                                                                 adapters.targets))) if adapters else None)
    adapter = {"full": "none"}.get(training_kind(adapters), training_kind(adapters))
    checkpointing = _toggle(parallel.activation_checkpointing)

    def simulate(**overrides):
        settings = {"checkpointing": checkpointing, "cpu_offload": offload_choice(config), **overrides}
        return memory.plan_candidates(model_shape_dict, world_size, config.training.batch_size,
                                      config.data.block_size, device_memory_gb, host_memory_gb, precision="bf16",
                                      adapter=adapter, lora=lora_kwargs, micro_batch_size=parallel.micro_batch_size,
                                      chunked_loss=parallel.chunked_loss != "off", **settings)
    try:
        result = simulate()
        if result.chosen is None or not result.chosen.cpu_offload or checkpointing is not None:
            return result
        with_checkpointing = simulate(checkpointing=True, cpu_offload=True).candidates
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None
    candidates = [c for c in result.candidates if not (c.cpu_offload and c.checkpointing)] + with_checkpointing
    chosen = step_time.fastest(candidates, count_parameters(model_shape_dict), world_size, config.data.block_size,
                               active_parameters=count_active_parameters(model_shape_dict))
    return memory.Choice(chosen, candidates, rule=result.rule + "; among offloaded layouts that fit, the least "
                       "estimated step time (compute + host-device traffic)")


def estimate_facts(result: memory.Choice, model_shape_dict: dict, world_size: int,
                   block_size: int) -> list[tuple[str, object]]:
    """The chosen layout's estimated step time as plan lines (a ranking figure, not a measurement)."""
    if result.chosen is None:
        return []
    c = result.chosen
    compute, traffic = step_time.step_seconds(count_parameters(model_shape_dict), world_size, c.micro_batch_size,
                                              c.accumulation_steps, block_size, c.checkpointing, c.cpu_offload,
                                              active_parameters=count_active_parameters(model_shape_dict))
    return [("estimated_step_seconds", round(compute + traffic, 1)),
            ("estimated_step_breakdown", f"compute {compute:.1f} s at {step_time.ASSUMED_MFU:.0%} of "
                                         f"{step_time.DEFAULT_PEAK_FLOPS / 1e12:g} TFLOP/s + host-device traffic "
                                         f"{traffic:.1f} s at {step_time.HOST_LINK_BYTES_PER_S / 1e9:g} GB/s")]


def plan_lines(result: memory.Choice, header: str, facts: Iterable[tuple[str, object]] = ()) -> list[str]:
    """The candidates (the chosen one marked *), then `facts` and the chosen plan as `key: value` lines."""
    chosen = result.chosen or next((c for c in result.candidates if c.memory is not None), result.candidates[-1])
    simulated = sum(c.memory is not None for c in result.candidates)
    lines = [f"[parallel plan] {header}",
             f"  number of candidates: {len(result.candidates)} ({simulated} simulated); rule: {result.rule}"]
    lines += ["    " + line for line in result.lines()]
    lines += [f"  {key}: {value}" for key, value in facts]
    lines += [f"  micro_batch_size: {chosen.micro_batch_size}", f"  accumulation_steps: {chosen.accumulation_steps}",
              f"  activation_checkpointing: {str(chosen.checkpointing).lower()}",
              f"  cpu_offload: {str(chosen.cpu_offload).lower()}"]
    if chosen.memory is not None:
        gib = chosen.memory.gib()
        lines += [f"  memory_gib_per_device: {gib['device_peak']}",
                  f"  host_memory_gib_per_device: {gib['host']}",
                  "  memory_breakdown_gib: " + json.dumps({k: v for k, v in gib.items()
                                                           if k not in ("device_peak", "host")})]
    lines.append(f"  fits: {str(result.chosen is not None).lower()}")
    return lines


def moe_facts(model: torch.nn.Module) -> list[tuple[str, object]]:
    """A mixture-of-experts model's plan lines: the parameters a token uses, and how the experts are run and
    sharded; none for a dense model."""
    if not size.expert_parameters(model):
        return []
    config = model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return [("active_parameters", size.active_parameter_count(model)),
            ("experts", f"{config.num_experts_per_tok} of {experts} per token; FLOPs and MFU count the active "
                        f"parameters, memory all of them; under FSDP2 each expert tensor is sharded along the "
                        f"expert dimension with its decoder layer and gathered whole for the layer's compute (no "
                        f"expert parallelism)")]


def plan_only(config: RunConfig, backend: Backend) -> int:
    """`--plan-only`: print the simulated plan for `--num-devices` x `--device-memory-gb` and load nothing."""
    shape = model_shape(config.model.name_or_path, config.model.trust_remote_code)
    target, adapters = config.plan_only, config.lora
    world = target.num_devices or backend.world_size
    if adapters and adapters.quantize_4bit and world > 1:
        raise FinetuneError("--qlora runs on one device; plan it with --num-devices 1, or use --lora")
    result = simulated_plan(config, shape, world, target.device_memory_gb, target.host_memory_gb)
    training = training_kind(adapters)
    model = size.meta_model(shape)
    parameters = size.parameter_count(model)
    trainable = lora.adapter_parameters(model, adapters.rank, adapters.targets) if adapters else parameters
    experts = moe_facts(model)
    header = (f"{config.model.name_or_path}, {training} fine-tuning, {world} x {target.device_memory_gb:g} GB "
              f"devices, {target.host_memory_gb:g} GB host, global batch {config.training.batch_size} x "
              f"{config.data.block_size} tokens")
    facts = [("world_size", world), ("device_memory_gb", target.device_memory_gb),
             ("host_memory_gb", target.host_memory_gb), ("training", training), ("parameters", parameters),
             ("trainable_parameters", trainable), *experts,
             *estimate_facts(result, shape, world, config.data.block_size)]
    if backend.is_main:
        print("\n".join(plan_lines(result, header, facts)), flush=True)
    return 0


def host_memory_gb() -> float:
    """This machine's physical memory in GB (2**30 bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def _simulated_layout(config, backend):
    """The simulated plan for this job's own devices and host memory (printed), as layout entries."""
    device_gb = torch.cuda.get_device_properties(backend.device).total_memory / GIB
    local = int(os.environ.get("LOCAL_WORLD_SIZE", backend.world_size))
    shape = model_shape(config.model.name_or_path, config.model.trust_remote_code)
    result = simulated_plan(config, shape, backend.world_size, device_gb,
                            host_memory_gb() * backend.world_size / max(1, local))
    facts = estimate_facts(result, shape, backend.world_size, config.data.block_size)
    print("\n".join(plan_lines(result, "this job", facts)), flush=True)
    if result.chosen is None:
        raise FinetuneError("no layout of this job fits its devices' memory (see the candidates above); "
                            "use more GPUs, --lora or --qlora, or a smaller --block-size")
    chosen = result.chosen
    return dict(micro_batch_size=chosen.micro_batch_size, accumulation_steps=chosen.accumulation_steps,
                activation_checkpointing=chosen.checkpointing, cpu_offload=chosen.cpu_offload,
                memory_gib_per_device=chosen.memory.gib() if chosen.memory else None)


def choose_layout(config: RunConfig, backend: Backend) -> Layout:
    """The layout of this job before the model loads.

    On a CPU: micro-batches of about 2k tokens, no checkpointing unless asked. On GPUs: the simulated plan for
    this job's devices and host memory (the probe after loading confirms the micro-batch for real).
    """
    parallel = config.parallel
    micro, accumulation = split_global_batch(config.training.batch_size, backend.world_size,
                                             parallel.micro_batch_size, backend.device.type, config.data.block_size)
    layout = Layout(micro_batch_size=micro, accumulation_steps=accumulation,
                    activation_checkpointing=parallel.activation_checkpointing == "on",
                    cpu_offload=bool(offload_choice(config)), attention=parallel.attn_implementation,
                    # fp32 logits of a whole micro-batch are GiBs for large vocabularies on GPUs; a CPU has room
                    chunked_loss=parallel.chunked_loss == "on" or (parallel.chunked_loss == "auto"
                                                                   and backend.device.type == "cuda"))
    if backend.device.type == "cuda":  # rank 0 simulates; every rank takes its choice (or its error)
        planned = layout
        layout = backend.on_rank0(lambda: dataclasses.replace(planned, **_simulated_layout(config, backend)))
    if layout.cpu_offload and backend.engine != "fsdp2":
        raise FinetuneError("CPU offload runs through FSDP2: start the job with torchrun (one process per GPU, "
                            "--nproc_per_node 1 on one GPU)")
    return layout


def confirm_on_device(model: torch.nn.Module, backend: Backend, config: RunConfig, layout: Layout,
                      forward: Callable[..., torch.Tensor]) -> Layout:
    """The final layout. On GPUs, unless --micro-batch-size is given: measure real training steps (`forward`, the
    script's) and take the largest micro-batch up to the planned one that fits (the simulation counts tensors, not
    the allocator's fragmentation)."""
    if backend.device.type != "cuda" or config.parallel.micro_batch_size is not None:
        return layout
    per_rank = config.training.batch_size // backend.world_size
    micro = probe_micro_batch(model, backend, layout.micro_batch_size, per_rank, config.data.block_size, forward,
                              optimizer_bytes=0 if layout.cpu_offload else optimizer_state_bytes(model))
    if micro == layout.micro_batch_size:
        return layout
    # the simulated figure was for the planned micro-batch
    return dataclasses.replace(layout, micro_batch_size=micro, accumulation_steps=per_rank // micro,
                               memory_gib_per_device=None)


def _base(model):
    """The model under a peft wrapper (the one the loss is patched into)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def describe_parallel_plan(model: torch.nn.Module, backend: Backend, config: RunConfig, layout: Layout) -> dict:
    """Print the parallel plan the job runs with (rank 0) and return it as a dict (saved with the model as
    parallel_plan.json)."""
    adapters = lora.is_lora(model)
    parameters = sum(p.numel() for p in model.parameters())  # the whole model's: a DTensor counts its full shape
    trainable = lora.count_trainable(model)  # what requires grad, after any freezing in the script
    plan = {"engine": backend.engine, "world_size": backend.world_size, "device": str(backend.device),
            "sharding": "FSDP2 per decoder layer" if backend.engine == "fsdp2" else "none (one device)",
            "global_batch_rows": config.training.batch_size, "block_size": config.data.block_size,
            **dataclasses.asdict(layout),
            "dtype": "bf16 compute, fp32 master weights and reduction" if backend.mixed_precision == "bf16"
            else "fp32",
            "saved_dtype": dtype_name(saved_dtype(config.checkpoint.save_dtype, backend.mixed_precision)),
            "attention": getattr(model.config, "_attn_implementation", None),  # as resolved for model and device
            # The memory plan ran each row as one causal SDPA call (its flash kernel keeps q, k, v, the output
            # and a log-sum-exp per query, as varlen and flex do); the probe measures the real kernel on GPUs.
            **({"memory_simulated_with": "sdpa per row"} if backend.device.type == "cuda" else {}),
            "training": "lora" if adapters else "full",
            "trainable_parameters": trainable, "frozen_parameters": parameters - trainable,
            **dict(moe_facts(_base(model))),
            "loss": loss_description(_base(model).token_loss_chunk) if hasattr(_base(model), "token_loss_chunk")
            else "the model's own"}
    if backend.is_main:
        shown = {k: str(v).lower() if isinstance(v, bool) else v for k, v in plan.items()}
        print("\n".join(["[parallel plan]"] + [f"  {k}: {v}" for k, v in shown.items()]), flush=True)
    return plan
