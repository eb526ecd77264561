"""What each run of bench_throughput.py trains with, and the same read back from a trainer.

A run's `StepSettings`: the rows of one optimiser step and how they are split (micro-batch x accumulation steps),
activation checkpointing, the precision of the weights and of the compute, the optimiser (AdamW, its learning
rate, betas, eps and weight decay), the learning-rate factor of every step, and gradient clipping.

  matched_settings   what every run gets by default: our loop's split of the step on this device (on a CPU
                     about 2k tokens a micro-batch: 2 rows x 4 accumulation steps for 8 rows of 1,024 tokens),
                     checkpointing as --activation-checkpointing says (off by default), fp32, one optimiser and
                     schedule built by `make_optimizer` for every run, clipping at 1.0
  peer_defaults      TRL's own choices where they differ from that (the --peer-defaults rows): the whole step in
                     one micro-batch (no accumulation) and gradient checkpointing on; the rest as matched

`settings_of_trainer` and `settings_of_our_loop` read the settings back from what each run was handed (a
transformers Trainer's own arguments, optimiser and scheduler; our loop's loader, model, optimiser and scheduler),
so a test can check that every run gets the same ones.
"""
import dataclasses

import torch

from finetune.plan.layout import split_global_batch
from finetune.training import warmup_cosine_schedule

LEARNING_RATE = 2e-3  # any value gives the same speed
MAX_GRAD_NORM = 1.0
WARMUP_RATIO, MIN_LR_RATIO = 0.03, 0.1  # the training scripts' defaults


@dataclasses.dataclass(frozen=True)
class StepSettings:
    micro_batch_size: int
    accumulation_steps: int
    activation_checkpointing: bool
    weights_dtype: str
    compute_dtype: str
    optimizer: str
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    lr_factors: tuple[float, ...]  # the schedule's factor at each step, rounded
    max_grad_norm: float

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    @property
    def total_steps(self) -> int:
        return len(self.lr_factors)

    def describe(self) -> str:
        return (f"{self.micro_batch_size} rows x {self.accumulation_steps} accumulation steps, activation "
                f"checkpointing {'on' if self.activation_checkpointing else 'off'}, {self.compute_dtype}, "
                f"{self.optimizer} lr {self.learning_rate:g}, clipping {self.max_grad_norm:g}")


def lr_factors(total_steps: int) -> tuple[float, ...]:
    """The training scripts' schedule (linear warmup, cosine to 10%) at each of `total_steps` steps."""
    return tuple(round(warmup_cosine_schedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), total_steps, WARMUP_RATIO,
                                              MIN_LR_RATIO).lr_lambdas[0](step), 9) for step in range(total_steps))


def matched_settings(batch_size: int, block_size: int, total_steps: int, device_type: str,
                     micro_batch_size: int | None = None, activation_checkpointing: bool = False) -> StepSettings:
    """Every run's settings by default (see the module docstring)."""
    micro, accumulation = split_global_batch(batch_size, 1, micro_batch_size, device_type, block_size)
    return StepSettings(micro, accumulation, activation_checkpointing, "float32", "float32", "AdamW", LEARNING_RATE,
                        (0.9, 0.999), 1e-8, 0.0, lr_factors(total_steps), MAX_GRAD_NORM)


def peer_defaults(matched: StepSettings) -> StepSettings:
    """TRL's own choices of split and checkpointing (per_device_train_batch_size 8 and gradient_checkpointing on
    in SFTConfig): the whole step in one micro-batch, checkpointing on."""
    return dataclasses.replace(matched, micro_batch_size=matched.rows_per_step, accumulation_steps=1,
                               activation_checkpointing=True)


def make_optimizer(model: torch.nn.Module, settings: StepSettings
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and schedule of a run, the same for ours and for every peer (handed to their Trainer)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=settings.betas,
                                  eps=settings.eps, weight_decay=settings.weight_decay, fused=on_cuda)
    return optimizer, warmup_cosine_schedule(optimizer, settings.total_steps, WARMUP_RATIO, MIN_LR_RATIO)


def _optimizer_fields(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                      total_steps: int) -> dict:
    group = optimizer.param_groups[0]
    factors = getattr(scheduler, "lr_lambdas", [None])[0]
    return dict(optimizer=type(optimizer).__name__, learning_rate=float(group.get("initial_lr", group["lr"])),
                betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                lr_factors=tuple(round(factors(step), 9) for step in range(total_steps)) if factors else ())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def settings_of_trainer(trainer) -> StepSettings:
    """The settings a transformers Trainer (or TRL's SFTTrainer) trains with, from its own arguments, optimiser,
    scheduler and model."""
    args = trainer.args
    compute = "bfloat16" if args.bf16 else "float16" if args.fp16 else _dtype_name(trainer.model.dtype)
    return StepSettings(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                        bool(args.activation_checkpointing), _dtype_name(trainer.model.dtype), compute,
                        max_grad_norm=args.max_grad_norm,
                        **_optimizer_fields(trainer.optimizer, trainer.lr_scheduler, args.max_steps))


def settings_of_our_loop(loop) -> StepSettings:
    """The settings of bench_throughput.OurLoop (our training step), from its loader, model, optimiser and
    scheduler."""
    micro_batches, _ = loop.loader.dataset[0]
    model = loop.model
    checkpointing = bool(model.is_activation_checkpointing if hasattr(type(model), "is_activation_checkpointing")
                         else model.is_gradient_checkpointing)  # the name before transformers 5.24
    dtype = _dtype_name(model.dtype)
    return StepSettings(loop.loader.dataset.format.micro_batch_size, len(micro_batches), checkpointing, dtype,
                        dtype, max_grad_norm=loop.max_grad_norm,
                        **_optimizer_fields(loop.optimizer, loop.scheduler, loop.total_steps))
