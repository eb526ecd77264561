"""Our training step as train_llama2.py runs it, built from a run's StepSettings and timed per phase, for
bench_throughput.py.

The step, unchanged: collate -> forward(position_ids, example_spans, labels, num_items_in_batch) -> backward (each
micro-batch) -> clip -> finite check -> AdamW -> LR schedule -> zero_grad. Single process, fp32. Each timed step's
wall time is split into phases: `data` (the loader handing over the step's micro-batches), `forward` (the model's
forward, the loss included), `backward`, and `optimizer` (clipping, the finite check, AdamW, the schedule,
zero_grad).
"""
import dataclasses
import time
import types

import torch
from step_settings import StepSettings, make_optimizer

import finetune.data.batches as fu
from finetune import demo as demo_assets
from finetune.config import ModelConfig
from finetune.distributed.backend import enable_advanced_parallelization
from finetune.model import size as model_size
from finetune.model.loading import load_model
from finetune.observe import metrics

PHASES = ("data", "forward", "backward", "optimizer")


def load_fresh_model(model_path, attention=None, activation_checkpointing=False):
    """The demo model as the training scripts load it on a single process (Llama with "packed_spans", Baichuan with
    its own per-span path); `attention` overrides it (the peers get transformers' "sdpa")."""
    from transformers import AutoModelForCausalLM

    if attention is None and demo_assets.family_of(model_path) == "llama2":
        attention = "packed_spans"
    backend = enable_advanced_parallelization("no")
    layout = types.SimpleNamespace(activation_checkpointing=activation_checkpointing, cpu_offload=False,
                                   chunked_loss=False, attention="auto")
    model = load_model(backend, AutoModelForCausalLM, ModelConfig(model_path), layout=layout,
                       attn_implementation=attention)
    return backend, model


def plans_for(table, batch_size, block_size, batching, seed, steps_needed):
    """Consecutive epoch plans (as train_llama2.py makes them) until there are enough steps."""
    steps, epoch = [], 0
    while len(steps) < steps_needed:
        plan = fu.plan_epoch(table.lengths, batch_size, block_size, batching, seed, epoch)
        if not plan:
            raise SystemExit(f"error: the data makes fewer than --batch-size {batch_size} rows")
        steps.extend(plan)
        epoch += 1
    return steps[:steps_needed]


@dataclasses.dataclass
class OurLoop:
    """Everything our step uses; step_settings.settings_of_our_loop reads its settings back from it."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: torch.utils.data.DataLoader
    max_grad_norm: float
    total_steps: int
    device: torch.device


def build_our_loop(model_path, table, pad_id, batching, settings: StepSettings, block_size) -> OurLoop:
    """Our loop over `settings.total_steps` steps of `batching` rows ("packed", or "block": one example a row,
    padded to the block, the tutorial's batching)."""
    torch.manual_seed(0)
    backend, model = load_fresh_model(model_path, activation_checkpointing=settings.activation_checkpointing)
    plan = plans_for(table, settings.rows_per_step, block_size, batching, 0, settings.total_steps)
    optimizer, scheduler = make_optimizer(model, settings)
    # Workers 0 for every run (the Trainer's default too): on 2 cores a loader process only competes for them.
    pad_to = block_size if batching in ("packed", "block") else None
    loader = fu.make_step_loader(table, plan, 0, 1, fu.BatchFormat(settings.micro_batch_size, pad_id, pad_to),
                                 workers=0)
    return OurLoop(model, optimizer, scheduler, loader, settings.max_grad_norm, settings.total_steps, backend.device)


def run_our_loop(loop: OurLoop, warmup_steps: int, profiler=None) -> dict:
    """Train every step of `loop`; the figures of the steps after the first `warmup_steps` (`profiler`, a
    torch.profiler.profile, records those steps)."""
    model, device = loop.model, loop.device
    matmul_weights = model_size.matmul_parameters(model)
    cuda = device.type == "cuda"

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    model.train()
    step, start, cpu_start = 0, now(), time.process_time()
    tokens = flops = positions = 0
    losses, step_seconds, phases = [], [], dict.fromkeys(PHASES, 0.0)
    mark = start
    for micro_batches, info in loop.loader:
        timed = step >= warmup_steps
        spent = dict.fromkeys(PHASES, 0.0)
        spent["data"] = now() - mark
        step_loss = torch.zeros((), device=device)
        attended_pairs = 0
        for micro in micro_batches:
            micro = fu.move_to(micro, device)
            begin = now()
            outputs = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"],
                            example_spans=micro["example_spans"], labels=micro["labels"],
                            num_items_in_batch=info["step_targets"], use_cache=False)
            middle = now()
            outputs.loss.backward()
            spent["forward"] += middle - begin
            spent["backward"] += now() - middle
            step_loss += outputs.loss.detach()
            attended_pairs += micro["attended_pairs"]
            if timed:
                positions += micro["input_ids"].numel()
        begin = now()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
        if not (bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(step_loss))):
            raise SystemExit("error: non-finite loss in our loop")
        loop.optimizer.step()
        loop.scheduler.step()
        model.zero_grad(set_to_none=True)
        mark = now()
        spent["optimizer"] = mark - begin
        step += 1
        losses.append(float(step_loss))
        if step == warmup_steps:
            start, cpu_start, mark = now(), time.process_time(), now()
            if profiler is not None:
                profiler.start()
        elif timed:
            tokens += info["step_tokens"]
            flops += metrics.step_flops(model.config, matmul_weights, info["step_tokens"], attended_pairs)
            step_seconds.append(sum(spent.values()))
            for name, seconds in spent.items():
                phases[name] += seconds
    seconds, cpu_seconds = now() - start, time.process_time() - cpu_start
    if profiler is not None:
        profiler.stop()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": step - warmup_steps, "tokens": tokens,
            "positions": positions, "flops": flops, "losses": losses, "step_seconds_each": step_seconds,
            "phases": phases}
