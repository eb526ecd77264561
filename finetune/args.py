"""Command-line flags shared by the training scripts (names follow the project's CLI contract)."""
import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from finetune.checkpoint.save_dtype import SAVE_DTYPES
from finetune.config import RunConfig, from_flags
from finetune.data.batches import BATCHING_MODES
from finetune.errors import FinetuneError
from finetune.model.gguf import refuse_gguf
from finetune.observe.trackers import BACKENDS, REACH_TIMEOUT, parse_report_to
from finetune.ops.varlen_attention import ATTENTION_CHOICES

LORA_LR = 2e-4  # the default --lr with --lora / --qlora
# Upper bounds far past any real job, so a typo (an extra zero or ten) is one line at parse time rather than an
# allocator traceback or a plan that runs for hours. A plan's cost grows with the simulated process count
# (FSDP2 shards every parameter into that many pieces): 8,192 devices plan as fast as 8, 65,536 take minutes.
MAX_DEVICES = 8192
MAX_BATCH_ROWS = 2 ** 20      # rows per optimiser step: a billion tokens at --block-size 1024
MAX_LORA_RANK = 8192          # the widest layers here (Llama 2 70B) are 8192: a higher rank adds nothing


def parse_run_config(description: str, defaults: dict, demo_defaults: dict,
                     demo_assets: Callable[[int], tuple[str, str]] | None = None,
                     argv: Sequence[str] | None = None) -> RunConfig:
    """The frozen RunConfig of a training script's command line. With --demo, `demo_assets(block_size)` gives
    (model folder, prepared dataset folder) of the embedded tiny model and sample data for the paths not given."""
    args = parse_training_args(description, defaults, demo_defaults, argv)
    if args.demo and demo_assets is not None and not (args.model_name_or_path and args.dataset_name_or_path):
        model, dataset = demo_assets(args.block_size)
        args.model_name_or_path = args.model_name_or_path or model
        args.dataset_name_or_path = args.dataset_name_or_path or dataset
    return from_flags(args)


def parse_training_args(description: str, defaults: dict, demo_defaults: dict,
                        argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the flags of a training script; `defaults` hold the tutorial's values, `demo_defaults` those of
    --demo. A flag the user gives always wins over both."""
    flag_names = {"save_dir": "save-model-dir"}
    demo_summary = ", ".join(f"--{flag_names.get(name, name.replace('_', '-'))} {value}"
                             for name, value in demo_defaults.items())
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"--demo defaults (any flag given still wins): {demo_summary}; the model, "
                       f"tokenizer and prepared data are the embedded tiny ones.")
    p.add_argument("--model-name-or-path", help=f"hub id or local folder (default {defaults['model']})")
    p.add_argument("--dataset-name-or-path", help=f"a prepare_dataset.py output folder (default {defaults['dataset']})")
    p.add_argument("--epochs", type=int, help=f"passes over the data (default {defaults['epochs']})")
    p.add_argument("--batch-size", type=int,
                   help=f"rows of --block-size tokens per optimiser step, across all processes (default {defaults['batch_size']})")
    p.add_argument("--block-size", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults['lr']}; {LORA_LR} with --lora "
                                            f"or --qlora)")
    p.add_argument("--log-interval", type=int, help=f"steps between log lines (default {defaults['log_interval']})")
    p.add_argument("--save-model-dir", help=f"output folder: final model, tokenizer, metrics, checkpoints "
                                            f"(default {defaults['save_dir']})")
    p.add_argument("--seed", type=int, default=0, help="all randomness, data order included (default 0)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (overrides --epochs)")
    p.add_argument("--save-every", type=int, help="steps between resumable checkpoints (default: none; a stop "
                                                   "signal still writes one)")
    p.add_argument("--keep-last", type=int, default=2, help="resumable checkpoints to keep (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-model-dir")
    p.add_argument("--resume-if-possible", action="store_true",
                   help="like --resume, but start fresh when there is no checkpoint yet (for requeued jobs)")
    p.add_argument("--resume-changed", action="store_true",
                   help="--resume although the optimiser, its groups, the schedule, the trainable parameters or "
                        "the loss differ from the checkpoint's (code edits or their flags); this run's code applies "
                        "from the resumed step (docs/customising.md)")
    p.add_argument("--overwrite", action="store_true", help="start over in a --save-model-dir that holds an earlier "
                                                             "run's checkpoints (deletes only files this script wrote)")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="compute",
                   help="dtype of the final model: compute (bf16 after bf16 training, half the size), fp32 "
                        "(the master weights) or none (no weights: timing runs) (default compute)")
    p.add_argument("--batching", choices=BATCHING_MODES, default="packed",
                   help="packed: several examples per row, no attention across them (default); longest: one example "
                        "per row padded to the longest in its micro-batch; block: one per row padded to --block-size")
    p.add_argument("--pad-to-block-size", action="store_true", help="the tutorial's batching (same as --batching block)")
    p.add_argument("--micro-batch-size", type=int, help="rows per forward pass on each process (default: chosen "
                                                         "automatically; the rest is gradient accumulation)")
    p.add_argument("--eval-every", type=int, help="steps between validation passes (also at the end of each epoch)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup (default 0.03)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    p.add_argument("--skip-nonfinite", type=int, default=0,
                   help="steps with a non-finite loss or gradient to skip before stopping (default 0)")
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), default="auto",
                   help="auto: bf16 compute on GPUs, fp32 on CPU; master weights are always fp32")
    p.add_argument("--activation-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="recompute activations in backward to save memory (auto: when the plan needs it)")
    p.add_argument("--attn-implementation", choices=ATTENTION_CHOICES, default="auto",
                   help="attention for packed rows: spans (one attention per example, fastest on a CPU), varlen "
                        "(one FlashAttention varlen kernel per layer, CUDA), flex (FlexAttention example mask, "
                        "CUDA); auto picks the fastest correct one for the device (default auto)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes (default 1)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: table for GPUs, measured on CPU)")
    p.add_argument("--report-to", default="none",
                   help=f"also send metrics.jsonl's rows and run_config.json to these trackers: "
                        f"{', '.join(BACKENDS)} (comma-separated) or none (default none). A tracker's server (W&B "
                        f"online, MLflow over http) must accept a connection within {REACH_TIMEOUT} s, checked "
                        f"before the run starts")
    p.add_argument("--plan-only", action="store_true", help="print the parallel plan for --num-devices and exit "
                                                             "without loading weights")
    p.add_argument("--num-devices", type=int, help="devices for --plan-only (default: this job's world size)")
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="device memory for --plan-only (default 80)")
    p.add_argument("--host-memory-gb", type=float, default=512.0,
                   help="host memory of one node for --plan-only (default 512, a common GPU server's); a real run "
                        "uses this machine's")
    p.add_argument("--chunked-loss", choices=("auto", "on", "off"), default="auto",
                   help="compute the loss a chunk of tokens at a time, never holding fp32 logits for a whole "
                        "micro-batch (auto: on GPUs; on a CPU the plain loss is faster)")
    p.add_argument("--cpu-offload", choices=("auto", "on", "off"), default="auto",
                   help="keep sharded master weights, gradients and optimiser state in host memory (FSDP2 "
                        "CPUOffloadPolicy); auto: when the plan needs it to fit")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint folder")
    p.add_argument("--demo", action="store_true", help="embedded tiny model, tokenizer and prepared sample data; "
                                                        "offline, CPU-friendly")
    lora = p.add_argument_group("LoRA / QLoRA (train low-rank adapters on a frozen base; the output is the merged "
                                "model plus adapter/)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters (peft); the base stays frozen "
                                                          "(bf16 under bf16 compute)")
    lora.add_argument("--qlora", action="store_true", help="--lora on a base loaded in 4-bit NF4 with bf16 compute "
                                                           "(bitsandbytes); one device")
    lora.add_argument("--lora-rank", type=int, help="rank r of each adapter (default 16)")
    lora.add_argument("--lora-alpha", type=float, help="adapter scale alpha; updates are scaled by alpha/r "
                                                       "(default 32)")
    lora.add_argument("--lora-dropout", type=float, help="dropout on the adapter input, 0 <= p < 1 (default 0: "
                                                         "runs on any number of processes then agree)")
    lora.add_argument("--lora-target-modules",
                      help="comma-separated names of the decoder-block linear layers (q_proj) or expert tensors "
                           "(experts.down_proj) that get adapters, or auto: every linear layer inside the model's "
                           "decoder blocks and a mixture of experts' expert tensors, found from the model (default "
                           "auto)")
    args = p.parse_args(argv)

    lr_given = args.lr is not None
    defaults = dict(defaults, **demo_defaults) if args.demo else dict(defaults, eval_every=None)
    for name, key in [("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("log_interval", "log_interval"), ("save_model_dir", "save_dir"), ("eval_every", "eval_every")]:
        if getattr(args, name) is None:
            setattr(args, name, defaults[key])
    if not args.demo:  # with --demo the script fills these with the embedded tiny model and data
        args.model_name_or_path = args.model_name_or_path or defaults["model"]
        args.dataset_name_or_path = args.dataset_name_or_path or defaults["dataset"]
    if args.model_name_or_path:
        refuse_gguf(args.model_name_or_path)  # a .gguf file: the one-line conversion to a folder
    if args.pad_to_block_size:
        args.batching = "block"
    if args.resume_changed and not args.resume_if_possible:
        args.resume = True  # it is a resume that accepts changes
    check_numbers(args)
    _check_lora_args(args, lr_given)
    args.report_to = parse_report_to(args.report_to)  # a tracker that is not installed: one line, now
    return args


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's own complaints (unknown flag, not a number) as our one line, printed by rank 0 only."""
        if int(os.environ.get("RANK", "0")) == 0:
            self.print_usage(sys.stderr)
        raise FinetuneError(message)


# (flag, lowest, highest, lowest allowed itself): every numeric flag, checked at parse time.
NUMBER_RANGES = [
    ("epochs", 1, None, True), ("batch_size", 1, MAX_BATCH_ROWS, True), ("block_size", 1, None, True),
    ("log_interval", 1, None, True), ("max_steps", 1, None, True), ("save_every", 1, None, True),
    ("keep_last", 1, None, True), ("micro_batch_size", 1, MAX_BATCH_ROWS, True), ("eval_every", 1, None, True),
    ("num_devices", 1, MAX_DEVICES, True), ("num_workers", 0, None, True), ("skip_nonfinite", 0, None, True),
    ("seed", 0, 2 ** 32 - 1, True),  # NumPy's seeding takes no more
    ("lr", 0, None, False), ("warmup_ratio", 0, 1, True), ("min_lr_ratio", 0, 1, True),
    ("weight_decay", 0, None, True),
    ("max_grad_norm", 0, None, False),  # 0 would clip every update to nothing, a negative norm flips it
    ("peak_tflops", 0, None, False), ("device_memory_gb", 0, None, False),
    ("host_memory_gb", 0, None, False),
]


def check_numbers(args: argparse.Namespace) -> None:
    """One line for the first numeric flag outside its range (NaN and infinity included), and for a global
    batch that the torchrun processes cannot share: caught before any process group starts. (Under torchrun
    every rank reaches the same verdict; `parallel.errors_from_rank0` lets only rank 0 print it.)"""
    for name, low, high, low_ok in NUMBER_RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise FinetuneError(f"{flag} must be a finite number (got {value})")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = (f"from {low} to {high}" if high is not None else
                     f"at least {low}" if low_ok else f"greater than {low}")
            raise FinetuneError(f"{flag} must be {bound} (got {value})")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.plan_only and args.batch_size % world_size:
        raise FinetuneError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    if not args.plan_only and args.micro_batch_size and (args.batch_size // world_size) % args.micro_batch_size:
        raise FinetuneError(f"--micro-batch-size {args.micro_batch_size} does not divide the "
                            f"{args.batch_size // world_size} rows each process takes per step")


def _check_lora_args(args, lr_given):
    """Fill the adapter defaults for --lora / --qlora; adapter flags without either are a mistake."""
    given = [f"--{name.replace('_', '-')}" for name in ("lora_rank", "lora_alpha", "lora_dropout",
                                                          "lora_target_modules") if getattr(args, name) is not None]
    if not (args.lora or args.qlora):
        if given:
            raise FinetuneError(f"{' '.join(given)} needs --lora or --qlora")
        return
    args.lora = True  # --qlora is LoRA on a 4-bit base
    if not lr_given and not args.demo:  # adapters start from zero and need a far larger step than full weights
        args.lr = LORA_LR
    args.lora_rank = 16 if args.lora_rank is None else args.lora_rank
    args.lora_alpha = 32.0 if args.lora_alpha is None else args.lora_alpha
    args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
    if args.lora_target_modules is None:
        args.lora_target_modules = "auto"  # found from the model when it loads
    if not 1 <= args.lora_rank <= MAX_LORA_RANK:
        raise FinetuneError(f"--lora-rank must be positive and at most {MAX_LORA_RANK} (got {args.lora_rank})")
    if not (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)):
        raise FinetuneError(f"--lora-alpha must be a positive number (got {args.lora_alpha})")
    if not 0 <= args.lora_dropout < 1:
        raise FinetuneError(f"--lora-dropout must be at least 0 and below 1 (got {args.lora_dropout})")
    names = [name.strip() for name in args.lora_target_modules.split(",")]
    if not all(part.isidentifier() for name in names for part in name.split(".")) or len(set(names)) != len(names):
        raise FinetuneError(f"--lora-target-modules must be distinct layer names separated by commas, like "
                            f"q_proj,v_proj or experts.down_proj (got {args.lora_target_modules!r})")
    if "auto" in names and len(names) > 1:
        raise FinetuneError(f"--lora-target-modules auto stands alone (got {args.lora_target_modules!r})")
    args.lora_target_modules = ",".join(names)
