"""The run configuration: built once from the flags and their defaults, frozen, one section per component.

Helpers take the section they need. `run_config.json` in the save folder is `RunConfig.to_dict()`, and a
resumed run is compared against the settings a checkpoint fixes (`RunConfig.fixed_on_resume()`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from finetune.checkpoint.run_folder import open_new
from finetune.model.lora import LoraSettings
from finetune.observe import provenance

RUN_CONFIG_FILE = "run_config.json"


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    dataset_name_or_path: str
    block_size: int = 1024
    batching: str = "packed"      # packed | longest | block
    num_workers: int = 1

    @property
    def pad_to(self) -> int | None:
        """Rows are padded to the block, except with --batching longest (to the longest in the micro-batch)."""
        return None if self.batching == "longest" else self.block_size


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int               # rows per optimiser step, across all processes
    epochs: int
    max_steps: int | None
    seed: int = 0
    skip_nonfinite: int = 0


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class ParallelConfig:
    mixed_precision: str = "auto"            # auto | bf16 | no
    micro_batch_size: int | None = None      # None: planned
    activation_checkpointing: str = "auto"   # auto | on | off
    cpu_offload: str = "auto"
    chunked_loss: str = "auto"
    attn_implementation: str = "auto"       # auto | spans | varlen | flex (packed rows' attention)


@dataclass(frozen=True)
class PlanOnlyConfig:
    """`--plan-only`: plan for a machine that is not this one, load nothing."""
    enabled: bool = False
    num_devices: int | None = None
    device_memory_gb: float = 80.0
    host_memory_gb: float = 512.0


@dataclass(frozen=True)
class CheckpointConfig:
    save_model_dir: str
    save_every: int | None = None
    keep_last: int = 2
    resume: bool = False
    resume_if_possible: bool = False
    overwrite: bool = False
    save_dtype: str = "compute"   # compute (bf16 after bf16 training) | fp32 (the master weights)
    resume_changed: bool = False  # resume although the optimiser, schedule, trainables or loss changed


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 10
    eval_every: int | None = None
    peak_tflops: float | None = None
    report_to: tuple[str, ...] = ()   # --report-to: the trackers that get metrics.jsonl's rows too


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    parallel: ParallelConfig
    plan_only: PlanOnlyConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    lora: LoraSettings | None = None   # --lora / --qlora; None for full fine-tuning
    demo: bool = False
    flags: dict | None = None          # every command-line flag after its default and --demo's, as parsed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fixed_on_resume(self) -> dict:
        """What a checkpoint fixes: a resumed run with other values would not continue the same run."""
        return {"seed": self.training.seed, "batch_size": self.training.batch_size, "batching": self.data.batching,
                "block_size": self.data.block_size, "lr": self.optimizer.lr,
                "warmup_ratio": self.optimizer.warmup_ratio, "min_lr_ratio": self.optimizer.min_lr_ratio,
                "weight_decay": self.optimizer.weight_decay, "max_grad_norm": self.optimizer.max_grad_norm,
                "max_steps": self.training.max_steps,
                "epochs": None if self.training.max_steps else self.training.epochs}


def from_flags(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed, checked and defaulted training flags (finetune.args)."""
    lora = None
    if args.lora:
        lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            targets=tuple(args.lora_target_modules.split(",")), quantize_4bit=bool(args.qlora),
                            base=args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    return RunConfig(
        model=ModelConfig(args.model_name_or_path, args.trust_remote_code),
        data=DataConfig(args.dataset_name_or_path, args.block_size, args.batching, args.num_workers),
        training=TrainingConfig(args.batch_size, args.epochs, args.max_steps, args.seed, args.skip_nonfinite),
        optimizer=OptimizerConfig(args.lr, args.weight_decay, args.warmup_ratio, args.min_lr_ratio,
                                  args.max_grad_norm),
        parallel=ParallelConfig(args.mixed_precision, args.micro_batch_size, args.activation_checkpointing,
                                args.cpu_offload, args.chunked_loss, args.attn_implementation),
        plan_only=PlanOnlyConfig(args.plan_only, args.num_devices, args.device_memory_gb, args.host_memory_gb),
        checkpoint=CheckpointConfig(args.save_model_dir, args.save_every, args.keep_last, args.resume,
                                    args.resume_if_possible, args.overwrite, args.save_dtype,
                                    args.resume_changed),
        logging=LoggingConfig(args.log_interval, args.eval_every, args.peak_tflops, tuple(args.report_to)),
        lora=lora,
        demo=args.demo,
        flags=dict(vars(args)),
    )


def run_config_json(config: RunConfig, extra: dict | None = None) -> str:
    """The text of run_config.json: the configuration, what the run decided (`extra`: the plan, the data set's
    fingerprint), the library versions and the scripts' git commit."""
    provenance_record = {"library_versions": provenance.library_versions(), "git": provenance.git_commit()}
    return json.dumps({**config.to_dict(), **(extra or {}), **provenance_record}, indent=2, sort_keys=True,
                      default=str) + "\n"


def write_run_config(config: RunConfig, extra: dict | None = None) -> str:
    """Write run_config.json into the save folder (atomically: a reader never sees half a file)."""
    path = os.path.join(config.checkpoint.save_model_dir, RUN_CONFIG_FILE)
    staging = path + ".partial"
    with open_new(staging) as f:  # a link at the staging name is removed, never written through
        f.write(run_config_json(config, extra).encode())
    os.replace(staging, path)
    return path
