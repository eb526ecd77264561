"""One simulated training step under PyTorch's memory tracker: the model, the step, and its peaks.

Instead of a formula, the step is run: the real model class is built from its config on the meta device,
sharded with FSDP2 `fully_shard` per decoder layer over a fake process group of the planned world size (no
communication happens), materialised as fake tensors (shapes and dtypes, no storage) and put through a
forward, backward and AdamW step under `FSDPMemTracker` (`MemTracker` on one device without FSDP). The tracker
sees every allocation and free; peaks and their breakdown are read from it. One untracked step runs first, so
the tracked one is a steady-state step (AdamW's state exists); with gradient accumulation it runs two
micro-batches, the second meeting the first one's gradients.

Depth. Decoder layers are identical, so a 40-layer step is not run op by op: steps of 3 and 4 layers are, and
the tracker's per-op figures are carried to the full depth segment by segment (deeper_segments). This gives
the same bytes as simulating all 40 layers (equal to the byte: tests/plan/test_memory.py on a 7-layer model,
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
  * the loss: the chunked causal-LM loss of finetune/ops/chunked_loss.py unless chunked_loss=False. Attention is
    one causal span per row, batched: packed training rows attend span by span, but keep the same tensors for
    backward.
  * AdamW single-tensor (foreach off). A fused AdamW on GPUs updates in place as this does; foreach would
    briefly add a copy of the state, and on fake DTensors its sharding propagation is miscounted.
Sizes are bytes of tensor storage. The CUDA caching allocator rounds blocks up and keeps freed ones
reserved, which the 8% headroom of FIT_FRACTION is for.
"""
import contextlib
import dataclasses
import math

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh

from finetune.distributed.sharding import decoder_layers, shard_model
from finetune.plan.torch_internals import BACKWARD, FORWARD, OPTIMIZER, recording_trackers

QLORA_BYTES_PER_WEIGHT = 0.5 + 4 / 64

HOST_WHEN_OFFLOADED = ("Sharded Param", "Sharded Grad", "OptState")

SHALLOW_DEPTHS = (3, 4)  # the least depths with a layer between the first and the last in both


def exceeds(reading: dict, stop: dict | None) -> bool:
    """True when, under the `stop` rule, this reading fits in none of the offload settings it serves."""
    if stop is None:
        return False
    for offload in stop["offloads"]:
        part = reading["offloaded" if offload else "on_device"]
        if part["device_peak"] <= stop["device"] and (not offload or part["host_peak"] <= stop["host"]):
            return False
    return True


def build_model(config_dict: dict, setup: dict) -> torch.nn.Module:
    """The model of `config_dict` on the meta device, with checkpointing, loss and adapters as `setup` says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import finetune.ops.span_attention  # noqa: F401  (registers "packed_spans")
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
        from finetune.ops.chunked_loss import use_chunked_loss

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
            if setup["adapter"] == "qlora" and isinstance(module.base_layer, torch.nn.Linear):  # not experts
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

    def __init__(self, in_features: int, out_features: int, storage_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        item = torch.empty((), dtype=storage_dtype).element_size()
        count = math.ceil(in_features * out_features * QLORA_BYTES_PER_WEIGHT / item)
        self.packed = torch.nn.Parameter(torch.empty(count, dtype=storage_dtype, device="meta"),
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedMatmul.apply(x, self.packed, (self.out_features, self.in_features))


def training_batch(vocab_size: int, micro_batch_size: int, block_size: int) -> dict:
    """Model inputs shaped like one micro-batch of the training scripts, each row one causal sequence."""
    ids = torch.randint(vocab_size, (micro_batch_size, block_size))
    labels = ids.clone()
    labels[:, 0] = -100
    positions = torch.arange(block_size).expand(micro_batch_size, block_size)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "num_items_in_batch": micro_batch_size * (block_size - 1), "use_cache": False}


@dataclasses.dataclass
class PreparedStep:
    """A model, its optimiser with state, and the tensor mode they live in, ready for tracked steps."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    setup: dict
    tensor_mode: object  # a FakeTensorMode, or a no-op context for real tensors


def prepare_step(config_dict: dict, setup: dict, mesh: DeviceMesh | None = None, fake: bool = True) -> PreparedStep:
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


def tracked_step(prepared: PreparedStep, micro_batch_size: int, passes: int = 1) -> tuple[dict, list[str]]:
    """One training step under the tracker; returns (split_segments of its timeline, category names)."""
    model, optimizer = prepared.model, prepared.optimizer
    single_tracker, sharded_tracker = recording_trackers()
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


def split_segments(timeline: list[list[int]], labels: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """{(phase, position): per-op rows of category bytes} for each segment of a step: its phase, and the
    execution position of the decoder layer last entered in it (-1 before the first)."""
    rows = np.asarray(timeline, dtype=np.int64)
    keys = np.asarray(labels, dtype=np.int64)
    return {key: rows[(keys == key).all(axis=1)] for key in sorted(set(labels))}


def readings_from_segments(segments: dict[tuple[int, int], np.ndarray], names: list[str]) -> dict:
    """The step's peaks: with all state on the device, and with the sharded state offloaded to the host."""
    rows = np.concatenate(list(segments.values()))
    on_host = np.isin(names, HOST_WHEN_OFFLOADED)
    total, host = rows.sum(axis=1), rows[:, on_host].sum(axis=1)
    peak, offload_peak = total.argmax(), (total - host).argmax()

    def named(row, keep):
        return {name: int(v) for name, v, k in zip(names, row, keep, strict=True) if v and k}

    return {
        "on_device": {"device_peak": int(total[peak]), "host_peak": 0,
                      "categories": named(rows[peak], np.ones_like(on_host))},
        "offloaded": {"device_peak": int(total[offload_peak] - host[offload_peak]), "host_peak": int(host.max()),
                      "categories": named(rows[offload_peak], ~on_host)},
    }


def deeper_segments(three: dict[tuple[int, int], np.ndarray], four: dict[tuple[int, int], np.ndarray], depth: int,
                    names: list[str]) -> dict[tuple[int, int], np.ndarray]:
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


def simulate_readings(config_dict: dict, setup: dict, runs: list[tuple[int, int]], mesh: DeviceMesh | None = None,
                      stop: dict | None = None, full_depth: bool = False) -> dict[int, dict]:
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
        if exceeds(readings[micro], stop):
            break
    return readings
