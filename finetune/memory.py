"""Peak memory of one training step, measured by PyTorch's own memory tracker on a simulated step.

Instead of a formula, the step is run: the real model class is built from its config on the meta device,
sharded with FSDP2 `fully_shard` per decoder layer over a fake process group of the planned world size (no
communication happens), materialised as fake tensors (shapes and dtypes, no storage) and put through a
forward, backward and AdamW step under `FSDPMemTracker` (`MemTracker` on one device without FSDP). The tracker
sees every allocation and free; peaks and their breakdown are read from it. One untracked step runs first, so
the tracked one is a steady-state step (AdamW's state exists); with gradient accumulation it runs two
micro-batches, the second meeting the first one's gradients.

    memory = simulate_step_memory(config, world_size=8, micro_batch_size=4, block_size=1024)
    plan = plan_candidates(config, world_size=8, batch_size=256, block_size=1024, device_memory_gb=80)
    plan.chosen, plan.candidates, plan.lines()

Depth. Decoder layers are identical, so a 40-layer step is not run op by op: steps of 3 and 4 layers are, and
the tracker's per-op figures are carried to the full depth segment by segment (deeper_segments). This gives
the same bytes as simulating all 40 layers (equal to the byte: tests/test_memory_plan.py on a 7-layer model,
and the 13B models) in a fraction of the time.

How the simulated step maps onto the real one:
  * bf16: FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` over fp32 master weights; on one
    device without FSDP, fp32 weights under bf16 autocast (the single-device path of the training scripts).
    fp32: no casting.
  * CPU offload (FSDP2 `CPUOffloadPolicy`): FSDP2 needs CUDA streams for a CUDA mesh, so the simulation runs
    on a CPU mesh and one run serves both readings: with offload, the sharded parameters, sharded gradients
    and optimiser state (with its step temporaries) count as host memory, everything else as device memory.
    On one device, offload means FSDP2 over a one-rank group; without offload, the plain single-device path.
  * lora: peft adapters (`lora` = LoraConfig keywords; all linear layers of the decoder when no
    target_modules are given) on a frozen base stored in the compute dtype; adapters keep fp32 weights.
    qlora: the same, each adapted base layer replaced by a stand-in holding its 4-bit NF4 weights as packed
    bytes, 0.5 B per weight plus an fp32 scale per 64 weights (bitsandbytes' block size, no double
    quantisation), in a compute-dtype container as FSDP-QLoRA stores them (`bnb_4bit_quant_storage`); forward
    and backward each dequantise one layer's weight into a temporary, as bitsandbytes' MatMul4Bit does.
  * the loss: the chunked causal-LM loss of finetune/chunked_loss.py unless chunked_loss=False. Attention is
    one causal span per row, batched: packed training rows attend span by span, but keep the same tensors for
    backward.
  * AdamW single-tensor (foreach off). A fused AdamW on GPUs updates in place as this does; foreach would
    briefly add a copy of the state, and on fake DTensors its sharding propagation is miscounted.
Sizes are bytes of tensor storage. The CUDA caching allocator rounds blocks up and keeps freed ones
reserved, which the 8% headroom of FIT_FRACTION is for.

Results are cached on disk per configuration (FINETUNE_MEMORY_CACHE, default ~/.cache/finetune/memory). The
simulations run in one child process per call (`python -m finetune.memory --simulate`): the fake process group
must be the default one, which a training process under torchrun already has.

    python -m finetune.memory --config config.json --world-size 8 --batch-size 256 --device-memory-gb 80
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from finetune.sharding import decoder_layers, shard_model

GIB = 1024 ** 3
FIT_FRACTION = 0.92  # of device memory a plan may use: allocator rounding, fragmentation, CUDA context
ADAPTERS = ("none", "lora", "qlora")
PRECISIONS = ("bf16", "fp32")
QLORA_BYTES_PER_WEIGHT = 0.5 + 4 / 64
# Largest micro-batch a plan considers. The simulated step's time grows with its tokens (the chunked loss walks
# them 1024 at a time: ~15 s more per million), and a 13B model fits about 8k tokens per pass on an 80 GB GPU.
MAX_MICRO_BATCH_TOKENS = 2 ** 18
PREFERENCE_RULE = (f"fastest that fits: no CPU offload before offload, no activation checkpointing before "
                   f"checkpointing, then the largest micro-batch; fits = device peak <= {FIT_FRACTION:.0%} of "
                   f"device memory and, with offload, the host need of the node's devices <= host memory")
REPO_ROOT = Path(__file__).resolve().parents[1]

# How the trackers' categories add up to the reported breakdown.
GROUPS = {
    "parameters": ("Sharded Param", "Unsharded Param", "All Gather", "Parameter", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "activations": ("Activation", "Inputs", "Other"),
    "temporaries": ("Temp",),
}
HOST_WHEN_OFFLOADED = ("Sharded Param", "Sharded Grad", "OptState")
FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"  # the kinds of phase of a step
SHALLOW_DEPTHS = (3, 4)  # the least depths with a layer between the first and the last in both


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Memory of one training step per device, in bytes, as the tracker measured it."""
    device_peak: int
    host: int  # host memory the offloaded state needs per device (0 without offload)
    breakdown: dict  # parameters / gradients / optimizer / activations / temporaries at the device peak
    tracker: dict  # the tracker's own categories at the device peak

    def gib(self):
        """The figures in GiB, rounded, for printing and plan files."""
        return {"device_peak": round(self.device_peak / GIB, 2), "host": round(self.host / GIB, 2),
                **{k: round(v / GIB, 2) for k, v in self.breakdown.items()}}


@dataclasses.dataclass(frozen=True)
class Candidate:
    micro_batch_size: int
    accumulation_steps: int
    checkpointing: bool
    cpu_offload: bool
    memory: StepMemory | None  # None when not simulated, `note` says why
    fits: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    chosen: Candidate | None  # None when no candidate fits
    candidates: list
    rule: str = PREFERENCE_RULE

    def lines(self):
        """One printable line per candidate, the chosen one marked."""
        out = []
        for c in self.candidates:
            mark = "*" if c is self.chosen else " "
            head = (f"{mark} micro {c.micro_batch_size:>4} x accumulation {c.accumulation_steps:<4} "
                    f"checkpointing {'on ' if c.checkpointing else 'off'} offload {'on ' if c.cpu_offload else 'off'}")
            if c.memory is None:
                out.append(f"{head}  not simulated: {c.note}")
                continue
            g = c.memory.gib()
            host = f" host {g['host']:.1f} GiB" if c.cpu_offload else ""
            out.append(f"{head}  peak {g['device_peak']:.1f} GiB{host}  {'fits' if c.fits else 'too big'}")
        return out


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------

def simulate_step_memory(model_config, world_size, micro_batch_size, block_size, checkpointing=False,
                         cpu_offload=False, precision="bf16", adapter="none", lora=None, chunked_loss=True,
                         accumulation_steps=1):
    """Peak memory per device of one training step of this configuration (a StepMemory).

    model_config: a transformers config or its dict, with `model_type` ("llama", "baichuan", ...).
    accumulation_steps: micro-batches per optimiser step; from 2 on, the simulated step runs two, so that the
    second one meets the gradients of the first, as every micro-batch after the first does.
    precision: "bf16" (bf16 compute, fp32 master weights) or "fp32". adapter: "none", "lora" or "qlora".
    lora: peft LoraConfig keywords (r, lora_alpha, lora_dropout, target_modules) for the adapters.
    """
    config = _config_dict(model_config)
    setup = _setup(world_size, block_size, checkpointing, cpu_offload, precision, adapter, lora, chunked_loss)
    with _SimulationChild() as child:
        readings = _readings(config, setup, [(micro_batch_size, _passes(accumulation_steps))], None, child)
    return _step_memory(readings[micro_batch_size], cpu_offload)


def plan_candidates(model_config, world_size, batch_size, block_size, device_memory_gb, host_memory_gb=512,
                    devices_per_node=None, precision="bf16", adapter="none", lora=None, chunked_loss=True,
                    micro_batch_size=None, checkpointing=None, cpu_offload=None, exhaustive=False):
    """Candidate layouts of a global batch of `batch_size` rows with their simulated memory, and the chosen one
    (PREFERENCE_RULE).

    Candidates: micro-batch sizes that are powers of two dividing the rows each device takes per step (or the
    given `micro_batch_size`), activation checkpointing off/on and CPU offload off/on (or the given values).
    Memory sizes are GiB (torch's total_memory / 2**30); `host_memory_gb` is one node's, shared by its
    `devices_per_node` devices (default: all `world_size`). A candidate with accumulation runs two
    micro-batches in its simulated step (see simulate_step_memory).

    By default only what the choice needs is simulated: settings in order of preference, each from the
    smallest micro-batch up to the first that does not fit (memory only grows with the micro-batch), and none
    after the first setting with a fit. Readings of other settings that come with the same run (offload on
    and off, on several devices) are kept. The others have memory None and a note; `exhaustive` simulates all.
    """
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of the {world_size} devices")
    per_device = batch_size // world_size
    micros = [micro_batch_size] if micro_batch_size else _micro_batch_sizes(per_device, block_size)
    if micros[0] < 1 or per_device % micros[0]:
        raise ValueError(f"micro-batch {micros[0]} does not divide the {per_device} rows each device takes")
    if micros[0] > 1 and micros[0] * block_size > MAX_MICRO_BATCH_TOKENS:
        raise ValueError(f"a micro-batch of {micros[0]} x {block_size} tokens is past the {MAX_MICRO_BATCH_TOKENS} "
                         f"tokens a plan simulates; choose a smaller --micro-batch-size")
    device_limit = device_memory_gb * GIB * FIT_FRACTION
    host_limit = host_memory_gb * GIB / (devices_per_node or world_size)
    config = _config_dict(model_config)
    runs = [(micro, _passes(per_device // micro)) for micro in micros]
    settings = [(offload, ckpt) for offload in ([cpu_offload] if cpu_offload is not None else [False, True])
                for ckpt in ([checkpointing] if checkpointing is not None else [False, True])]

    def setup_of(offload, ckpt):
        return _setup(world_size, block_size, ckpt, offload, precision, adapter, lora, chunked_loss)

    def fits(memory, offload):
        return memory.device_peak <= device_limit and (not offload or memory.host <= host_limit)

    readings = {}  # setup (as JSON) -> {micro: reading}; on several devices one setup serves both offloads
    with _SimulationChild() as child:
        for offload, ckpt in settings:
            setup = setup_of(offload, ckpt)
            stop = None if exhaustive else {"device": device_limit, "host": host_limit, "offloads": [offload]}
            found = _readings(config, setup, runs, stop, child)
            readings.setdefault(json.dumps(setup, sort_keys=True), {}).update(found)
            if not exhaustive and any(fits(_step_memory(r, offload), offload) for r in found.values()):
                break

    candidates, reached_fit = [], False
    for offload, ckpt in settings:
        found = readings.get(json.dumps(setup_of(offload, ckpt), sort_keys=True), {})
        for micro in micros:
            memory = _step_memory(found[micro], offload) if micro in found else None
            note = "" if memory else ("a preferred setting fits" if reached_fit
                                      else "a smaller micro-batch already does not fit")
            candidates.append(Candidate(micro, per_device // micro, ckpt, offload, memory,
                                        memory is not None and fits(memory, offload), note))
        reached_fit = reached_fit or any(c.fits for c in candidates)
    chosen = next((c for c in candidates if c.fits), None)
    return Plan(chosen, candidates)


def _passes(accumulation_steps):
    """Micro-batches the simulated step runs: a second one meets the first one's gradients."""
    return 2 if accumulation_steps >= 2 else 1


def _micro_batch_sizes(rows, block_size):
    """Powers of two dividing `rows`, largest first, of at most MAX_MICRO_BATCH_TOKENS tokens (one row at least)."""
    return [2 ** k for k in range(int(math.log2(rows)), -1, -1)
            if rows % 2 ** k == 0 and (k == 0 or 2 ** k * block_size <= MAX_MICRO_BATCH_TOKENS)]


def cache_dir():
    return Path(os.environ.get("FINETUNE_MEMORY_CACHE") or Path.home() / ".cache" / "finetune" / "memory")


# ----------------------------------------------------------------------------------------------------------
# Configurations, cache and the child process
# ----------------------------------------------------------------------------------------------------------

def _config_dict(model_config):
    config = model_config if isinstance(model_config, dict) else model_config.to_dict()
    if not config.get("model_type"):
        raise ValueError("the model config names no model_type (e.g. 'llama' or 'baichuan')")
    if not config.get("num_hidden_layers"):
        raise ValueError("the model config names no num_hidden_layers")
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "quantization_config")}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def _setup(world_size, block_size, checkpointing, cpu_offload, precision, adapter, lora, chunked_loss):
    """What decides one simulation. CPU offload only decides the engine on one device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if world_size < 1 or block_size < 2:
        raise ValueError("world size must be at least 1 and block size at least 2")
    lora = {"target_modules": "all-linear", **(lora or {})} if adapter != "none" else {}
    return {"engine": "fsdp2" if world_size > 1 or cpu_offload else "single", "world_size": world_size,
            "block_size": block_size, "checkpointing": bool(checkpointing), "precision": precision,
            "adapter": adapter, "lora": lora, "chunked_loss": bool(chunked_loss)}


def _cache_key(config, setup, micro, passes):
    import transformers

    # The simulating code is part of the key: a change to it must not reuse old figures.
    sources = b"".join((REPO_ROOT / "finetune" / name).read_bytes() for name in ("memory.py", "chunked_loss.py",
                                                                               "sharding.py"))
    text = json.dumps([config, setup, micro, passes, torch.__version__, transformers.__version__,
                       hashlib.sha256(sources).hexdigest()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _readings(config, setup, runs, stop, child):
    """{micro: reading} for `runs` [(micro-batch size, micro-batches per step)] of one setup, smallest first,
    from the cache or simulated by `child`; with a stop rule, up to the first size that fits in none of the
    offload settings it names."""
    runs, readings = sorted(runs), {}
    folder = cache_dir()

    def entry(micro):
        return folder / f"{_cache_key(config, setup, micro, dict(runs)[micro])}.json"

    for index, (micro, passes) in enumerate(runs):
        cached = _cached_reading(entry(micro))
        if cached is None:
            fresh = child.simulate(config, {"setup": setup, "runs": runs[index:], "stop": stop})
            for fresh_micro, reading in fresh.items():
                _store_reading(entry(fresh_micro), reading)
            return {**readings, **fresh}
        readings[micro] = cached
        if _exceeds(readings[micro], stop):
            break
    return readings


# Cache folders this process found unusable: noted once each, then planned without.
_UNUSABLE_CACHES = set()


def _cached_reading(path):
    """The reading cached at `path`; None when there is none, or when it is broken (one warning naming it: the
    caller recomputes it, and the fresh reading replaces it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # not cached yet, or the cache location is no folder
        return None
    except (OSError, ValueError) as exc:  # a folder in its place, unreadable bytes, an I/O error
        problem = getattr(exc, "strerror", None) or str(exc)
    else:
        try:
            reading = json.loads(text)
        except ValueError:
            problem = "not valid JSON; truncated?"
        else:
            problem = _reading_problem(reading)
            if problem is None:
                return reading
    print(f"warning: memory-plan cache entry {path} is broken ({problem}); recomputing it", file=sys.stderr,
          flush=True)
    return None


def _reading_problem(reading):
    """Why a cached reading cannot be believed (a peak must be a byte count: a whole number, not negative), or
    None."""
    if not isinstance(reading, dict):
        return f"a JSON {type(reading).__name__}, not a reading"
    for part in ("on_device", "offloaded"):
        figures = reading.get(part)
        if not isinstance(figures, dict):
            return f"no {part} figures"
        for key in ("device_peak", "host_peak"):
            if not _is_byte_count(figures.get(key)):
                return f"{part} {key} is {figures.get(key)!r}"
        categories = figures.get("categories")
        if not isinstance(categories, dict) or not all(map(_is_byte_count, categories.values())):
            return f"{part} categories are not byte counts"
    return None


def _is_byte_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _store_reading(path, reading):
    """Cache a fresh reading. Where the cache cannot be written (a file in its place, a read-only disk, no
    permission), say so once and plan without it: the figures are the same, only slower next time."""
    folder = path.parent
    if folder in _UNUSABLE_CACHES or path.is_dir():  # a folder in the entry's place was already reported
        return
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(reading), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _UNUSABLE_CACHES.add(folder)
        reason = "a file is in its place" if folder.is_file() else exc.strerror or exc
        print(f"note: cannot write the memory-plan cache {folder} ({reason}); planning without it "
              f"(set FINETUNE_MEMORY_CACHE to a writable folder)", file=sys.stderr, flush=True)


def _exceeds(reading, stop):
    """True when, under the `stop` rule, this reading fits in none of the offload settings it serves."""
    if stop is None:
        return False
    for offload in stop["offloads"]:
        part = reading["offloaded" if offload else "on_device"]
        if part["device_peak"] <= stop["device"] and (not offload or part["host_peak"] <= stop["host"]):
            return False
    return True


class _SimulationChild:
    """`python -m finetune.memory --simulate`, started on the first job and kept for the next ones (its
    imports take several seconds); one JSON line per job in, one per result out."""

    def __init__(self):
        self.process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process.stderr.close()
            self.process.stdout.close()

    def simulate(self, config, job):
        """{micro: reading} of one job (setup, runs, stop rule)."""
        if self.process is None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
            self.process = subprocess.Popen([sys.executable, "-m", "finetune.memory", "--simulate"], cwd=REPO_ROOT,
                                            env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)
        self.process.stdin.write(json.dumps({"config": config, **job}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.stdin.close()
            last = (self.process.stderr.read().strip().splitlines() or ["no output"])[-1]
            self.process.wait()
            self.process = None
            raise RuntimeError(f"memory simulation failed: {last}")
        answer = json.loads(line)
        if "error" in answer:  # the configuration cannot be simulated (e.g. block size too long)
            raise ValueError(answer["error"])
        return {int(micro): reading for micro, reading in answer["readings"].items()}


def _step_memory(reading, cpu_offload):
    part = reading["offloaded" if cpu_offload else "on_device"]
    breakdown = {group: sum(part["categories"].get(name, 0) for name in names) for group, names in GROUPS.items()}
    return StepMemory(part["device_peak"], part["host_peak"], breakdown, dict(part["categories"]))


# ----------------------------------------------------------------------------------------------------------
# The model of a simulation
# ----------------------------------------------------------------------------------------------------------

def build_model(config_dict, setup):
    """The model of `config_dict` on the meta device, with checkpointing, loss and adapters as `setup` says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import finetune.packed_attention  # noqa: F401  (registers "packed_spans", the Llama script's attention)
    import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)

    fields = dict(config_dict)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if getattr(config, "max_position_embeddings", setup["block_size"]) < setup["block_size"]:
        raise ValueError(f"block size {setup['block_size']} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    attention = {"attn_implementation": "packed_spans"} if config.model_type != "baichuan" else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **attention)
    if setup["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup["chunked_loss"]:
        from finetune.chunked_loss import use_chunked_loss

        use_chunked_loss(model)
    if setup["adapter"] != "none":
        model = _with_adapters(model, setup)
    return model


def _with_adapters(model, setup):
    """peft LoRA adapters over a frozen base in the compute dtype (a 4-bit stand-in base for qlora)."""
    from peft import LoraConfig, get_peft_model

    base_dtype = torch.bfloat16 if setup["precision"] == "bf16" else torch.float32
    model.to(base_dtype)
    peft_model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **setup["lora"]}))
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            for adapter in (*module.lora_A.values(), *module.lora_B.values()):
                adapter.float()  # trainable adapters keep fp32 master weights
            if setup["adapter"] == "qlora":
                base = module.base_layer
                module.base_layer = FourBitLinearStandIn(base.in_features, base.out_features, base_dtype)
    return peft_model


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantised into a temporary in forward and again in backward; W takes no gradient."""

    @staticmethod
    def forward(ctx, x, packed, shape):
        ctx.shape = shape
        return x @ x.new_empty(shape).t()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ grad_output.new_empty(ctx.shape), None, None


class FourBitLinearStandIn(torch.nn.Module):
    """A frozen 4-bit base layer for memory simulation: packed weights and scales (QLORA_BYTES_PER_WEIGHT
    each) in a `storage_dtype` container. Its outputs are not meaningful numbers."""

    def __init__(self, in_features, out_features, storage_dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        item = torch.empty((), dtype=storage_dtype).element_size()
        count = math.ceil(in_features * out_features * QLORA_BYTES_PER_WEIGHT / item)
        self.packed = torch.nn.Parameter(torch.empty(count, dtype=storage_dtype, device="meta"),
                                         requires_grad=False)

    def forward(self, x):
        return _DequantizedMatmul.apply(x, self.packed, (self.out_features, self.in_features))


def training_batch(vocab_size, micro_batch_size, block_size):
    """Model inputs shaped like one micro-batch of the training scripts, each row one causal sequence."""
    ids = torch.randint(vocab_size, (micro_batch_size, block_size))
    labels = ids.clone()
    labels[:, 0] = -100
    positions = torch.arange(block_size).expand(micro_batch_size, block_size)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "num_items_in_batch": micro_batch_size * (block_size - 1), "use_cache": False}


# ----------------------------------------------------------------------------------------------------------
# The tracked step
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreparedStep:
    """A model, its optimiser with state, and the tensor mode they live in, ready for tracked steps."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    setup: dict
    tensor_mode: object  # a FakeTensorMode, or a no-op context for real tensors


def prepare_step(config_dict, setup, mesh=None, fake=True):
    """Build, shard (engine "fsdp2": needs the `mesh` of setup["world_size"] ranks) and materialise the model
    (as fake tensors, or real ones to validate the simulation), then run one untracked step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_model(config_dict, setup)
    if setup["engine"] == "fsdp2":
        shard_model(model, bf16_compute=setup["precision"] == "bf16", mesh=mesh)
    tensor_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with tensor_mode:
        model.to_empty(device="cpu")
        if not fake:
            _fill_for_a_real_run(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                      foreach=False, fused=False)
    prepared = PreparedStep(model, optimizer, setup, tensor_mode)
    _warm_up(prepared)
    return prepared


def _fill_for_a_real_run(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
        for buffer in model.buffers():
            buffer.zero_()


def _train_step(prepared, micro_batch_size, passes=1, enter_phase=lambda phase: None):
    """`passes` micro-batches of forward and backward, then the optimiser step, as the training scripts run
    them; `enter_phase` is told where each phase starts."""
    model, optimizer, setup = prepared.model, prepared.optimizer, prepared.setup
    autocast = contextlib.nullcontext()
    if setup["engine"] == "single" and setup["precision"] == "bf16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    for _ in range(passes):
        enter_phase(FORWARD)
        batch = training_batch(model.config.vocab_size, micro_batch_size, setup["block_size"])
        with autocast:
            loss = model(**batch).loss
        enter_phase(BACKWARD)
        loss.backward()
    enter_phase(OPTIMIZER)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _warm_up(prepared):
    """One untracked step, so that the tracked one sees the steady state: AdamW's state exists and FSDP has
    done its first-step initialisation. It also fills DTensor's sharding-propagation cache; on a cold cache,
    propagation allocates global-shape fake tensors inside the tracker's fake mode, which it would count."""
    with prepared.tensor_mode:
        _train_step(prepared, 1)


def tracked_step(prepared, micro_batch_size, passes=1):
    """One training step under the tracker; returns (split_segments of its timeline, category names)."""
    model, optimizer = prepared.model, prepared.optimizer
    single_tracker, sharded_tracker = _recording_trackers()
    layers = set(decoder_layers(model))
    layer_paths = {name: i for i, name in enumerate(n for n, m in model.named_modules() if m in layers)}
    with prepared.tensor_mode:
        if prepared.setup["engine"] == "fsdp2":
            tracker = sharded_tracker(model, optimizer)
        else:
            tracker = single_tracker()
            tracker.track_external(model, optimizer)
        tracker.start_timeline(layer_paths)
        with tracker:
            _train_step(prepared, micro_batch_size, passes, tracker.enter_phase)
    return split_segments(tracker.timeline, tracker.labels), tracker.category_names()


def _recording_trackers():
    """MemTracker / FSDPMemTracker that record, after every op, the bytes held in each of their categories,
    labelled with the phase of the step and the execution position of the decoder layer running.

    PyTorch's trackers also keep per-module peak snapshots after every op; that is most of their time and
    unused here, so this replaces it with one row per op."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class TimelineRecorder:
        def start_timeline(self, layer_paths):
            """layer_paths: {module path of each decoder layer under the root: its index}."""
            self.categories = list(self._ref_class)
            self.layer_paths = layer_paths
            self.timeline, self.labels = [], []
            self.phase, self.kind, self.position, self.layer = -1, FORWARD, -1, None

        def enter_phase(self, kind):
            """The step's code marks its phases (FSDP's last gradient reduction, for one, runs after the
            tracker itself has left backward)."""
            self.phase, self.kind, self.position, self.layer = self.phase + 1, kind, -1, None
            if kind == FORWARD:
                self.reset_mod_stats()  # the trackers refuse a second forward of the root otherwise

        def _update_peak_stats(self, peak_state):
            layer = self._running_layer()
            if layer is not None and layer != self.layer:  # the next layer in execution order
                self.layer, self.position = layer, self.position + 1
            for snapshot in self._curr_mem_snap.values():  # one device: everything runs on the CPU here
                self.timeline.append([snapshot.get(category, 0) for category in self.categories])
                self.labels.append((self.phase, self.position))

        def _running_layer(self):
            # Module names look like "RootClass.model.layers.3". Where one layer hands over to the next, both
            # are open for a moment: take the newer one (forward runs up the layers, backward down).
            open_layers = [self.layer_paths.get(name.partition(".")[2]) for name in self._mod_tracker.parents]
            open_layers = [index for index in open_layers if index is not None]
            if not open_layers:
                return None
            return max(open_layers) if self.kind == FORWARD else min(open_layers)

        def category_names(self):
            return [category.value for category in self.categories]

    class SingleDeviceTracker(TimelineRecorder, MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # PyTorch's version hooks every parameter to label its gradient, which fails on frozen ones (a
            # LoRA base): label only the trainable ones.
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            for param in module.parameters() if install_grad_hooks else ():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._label_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._label_gradient(p.grad)))
            return memory

        def _label_gradient(self, grad):
            self._update_and_maybe_create_winfos(grad, self._ref_class.GRAD)

    class ShardedTracker(TimelineRecorder, FSDPMemTracker):
        pass

    return SingleDeviceTracker, ShardedTracker


# ----------------------------------------------------------------------------------------------------------
# From the tracker's rows to peaks, and from shallow steps to the full depth
# ----------------------------------------------------------------------------------------------------------

def split_segments(timeline, labels):
    """{(phase, position): per-op rows of category bytes} for each segment of a step: its phase, and the
    execution position of the decoder layer last entered in it (-1 before the first)."""
    rows = np.asarray(timeline, dtype=np.int64)
    keys = np.asarray(labels, dtype=np.int64)
    return {key: rows[(keys == key).all(axis=1)] for key in sorted(set(labels))}


def readings_from_segments(segments, names):
    """The step's peaks: with all state on the device, and with the sharded state offloaded to the host."""
    rows = np.concatenate(list(segments.values()))
    on_host = np.isin(names, HOST_WHEN_OFFLOADED)
    total, host = rows.sum(axis=1), rows[:, on_host].sum(axis=1)
    peak, offload_peak = total.argmax(), (total - host).argmax()

    def named(row, keep):
        return {name: int(v) for name, v, k in zip(names, row, keep) if v and k}

    return {
        "on_device": {"device_peak": int(total[peak]), "host_peak": 0,
                      "categories": named(rows[peak], np.ones_like(on_host))},
        "offloaded": {"device_peak": int(total[offload_peak] - host[offload_peak]), "host_peak": int(host.max()),
                      "categories": named(rows[offload_peak], ~on_host)},
    }


def deeper_segments(three, four, depth, names):
    """The segments of a `depth`-layer step that can hold its peaks, from steps of 3 and 4 layers.

    Decoder layers are identical, so between two points of a step each layer passed adds the same bytes, op
    for op. A segment outside the layers, or at the first or the last layer of a phase, therefore holds bytes
    affine in the depth; one at an inner layer, affine in the depth and in the layer's position, so that over
    the inner positions each op's bytes are largest at the first or the last inner layer. Segments are
    carried op by op where both depths run the same ops in them, else by their peak rows (the optimiser step,
    whose op count grows with the parameter count)."""
    low, high = SHALLOW_DEPTHS
    on_host = np.isin(names, HOST_WHEN_OFFLOADED)

    def aligned(*segments):
        if len({segment.shape for segment in segments}) == 1:
            return segments
        return tuple(_peak_rows(segment, on_host) for segment in segments)

    deeper = {}
    for (phase, position), rows in three.items():
        if position in (-1, 0):
            low_rows, high_rows = aligned(rows, four[(phase, position)])
            deeper[(phase, position)] = low_rows + (depth - low) * (high_rows - low_rows)
    for phase in {phase for phase, position in three if position >= 0}:
        last_low, last_high = aligned(three[(phase, low - 1)], four[(phase, high - 1)])
        deeper[(phase, depth - 1)] = last_low + (depth - low) * (last_high - last_low)
        inner_low, inner_high, next_high = aligned(three[(phase, 1)], four[(phase, 1)], four[(phase, 2)])
        per_depth, per_position = inner_high - inner_low, next_high - inner_high
        for position in (1, depth - 2):
            deeper[(phase, position)] = inner_high + (position - 1) * per_position + (depth - high) * per_depth
    if any((rows < 0).any() for rows in deeper.values()):
        raise RuntimeError("memory extrapolation over depth produced negative sizes; the layers differ")
    return deeper


def _peak_rows(rows, on_host):
    """The rows of a segment at its device peak, its device peak with offload, and its host peak."""
    total, host = rows.sum(axis=1), rows[:, on_host].sum(axis=1)
    return rows[[total.argmax(), (total - host).argmax(), host.argmax()]]


def simulate_readings(config_dict, setup, runs, mesh=None, stop=None, full_depth=False):
    """{micro: reading} for `runs` [(micro-batch size, micro-batches per step)] of one setup, smallest first,
    stopping as `stop` says (see _exceeds).

    The model is simulated at its own depth up to 4 layers (or with full_depth), else at 3 and 4 layers and
    carried to its depth by deeper_segments."""
    depth = config_dict["num_hidden_layers"]
    depths = [depth] if full_depth or depth <= SHALLOW_DEPTHS[-1] else list(SHALLOW_DEPTHS)
    prepared = [prepare_step(dict(config_dict, num_hidden_layers=d), setup, mesh) for d in depths]
    readings = {}
    for micro, passes in sorted(runs):
        steps = [tracked_step(p, micro, passes) for p in prepared]
        names = steps[0][1]
        segments = steps[0][0] if len(steps) == 1 else deeper_segments(steps[0][0], steps[1][0], depth, names)
        readings[micro] = readings_from_segments(segments, names)
        if _exceeds(readings[micro], stop):
            break
    return readings


def _child_main(lines, out):
    """Child-process side: one job per line, over a fake process group of the job's world size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    mesh = None
    for line in lines:
        job = json.loads(line)
        setup = job["setup"]
        if setup["engine"] == "fsdp2" and (mesh is None or mesh.size() != setup["world_size"]):
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group("fake", rank=0, world_size=setup["world_size"], store=FakeStore())
            mesh = init_device_mesh("cpu", (setup["world_size"],))  # outside fake mode
        try:
            readings = simulate_readings(job["config"], setup, [tuple(run) for run in job["runs"]],
                                         mesh if setup["engine"] == "fsdp2" else None, job["stop"])
            answer = {"readings": readings}
        except ValueError as exc:
            answer = {"error": str(exc)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def _print_plan(args):
    """`python -m finetune.memory --config config.json ...`: the candidate table of a target machine."""
    try:
        config = json.loads(Path(args.config).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read the model config {args.config!r}: {exc}")
    try:
        plan = plan_candidates(config, args.world_size, args.batch_size, args.block_size, args.device_memory_gb,
                               args.host_memory_gb, precision=args.precision, adapter=args.adapter,
                               chunked_loss=not args.plain_loss, exhaustive=args.exhaustive)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    print("\n".join([f"rule: {plan.rule}", *plan.lines()]))
    if plan.chosen:
        print(f"chosen: {json.dumps(plan.chosen.memory.gib())}")
    else:
        print("chosen: none fits")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Simulated training-step memory of a model on a target machine.")
    parser.add_argument("--config", help="the model's config.json (with model_type)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="global rows per optimiser step")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--device-memory-gb", type=float, default=80)
    parser.add_argument("--host-memory-gb", type=float, default=512)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--adapter", choices=ADAPTERS, default="none")
    parser.add_argument("--plain-loss", action="store_true", help="simulate the model's own loss, not chunked")
    parser.add_argument("--exhaustive", action="store_true", help="simulate every candidate")
    parser.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.simulate:
        _child_main(sys.stdin, sys.stdout)
        return 0
    if not args.config:
        parser.error("--config is required")
    _print_plan(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
