"""Command-line flags shared by the training scripts (names follow the project's CLI contract)."""
import argparse
import math
import os
import sys

from finetune.data import BATCHING_MODES


def parse_training_args(description, defaults, demo_defaults, argv=None):
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
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults['lr']})")
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
    p.add_argument("--overwrite", action="store_true", help="start over in a --save-model-dir that holds an earlier "
                                                             "run's checkpoints (deletes only files this script wrote)")
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
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes (default 1)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: table for GPUs, measured on CPU)")
    p.add_argument("--plan-only", action="store_true", help="print the parallel plan for --num-devices and exit "
                                                             "without loading weights")
    p.add_argument("--num-devices", type=int, help="devices for --plan-only (default: this job's world size)")
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="device memory for --plan-only (default 80)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint folder")
    p.add_argument("--demo", action="store_true", help="embedded tiny model, tokenizer and prepared sample data; "
                                                        "offline, CPU-friendly")
    args = p.parse_args(argv)

    defaults = dict(defaults, **demo_defaults) if args.demo else dict(defaults, eval_every=None)
    for name, key in [("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("log_interval", "log_interval"), ("save_model_dir", "save_dir"), ("eval_every", "eval_every")]:
        if getattr(args, name) is None:
            setattr(args, name, defaults[key])
    if not args.demo:  # with --demo the script fills these with the embedded tiny model and data
        args.model_name_or_path = args.model_name_or_path or defaults["model"]
        args.dataset_name_or_path = args.dataset_name_or_path or defaults["dataset"]
    if args.pad_to_block_size:
        args.batching = "block"
    check_numbers(args)
    return args


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's own complaints (unknown flag, not a number) as our one line, printed by rank 0 only."""
        if int(os.environ.get("RANK", "0")) == 0:
            self.print_usage(sys.stderr)
        raise SystemExit(f"error: {message}")


# (flag, lowest, highest, lowest allowed itself): every numeric flag, checked at parse time.
NUMBER_RANGES = [
    ("epochs", 1, None, True), ("batch_size", 1, None, True), ("block_size", 1, None, True),
    ("log_interval", 1, None, True), ("max_steps", 1, None, True), ("save_every", 1, None, True),
    ("keep_last", 1, None, True), ("micro_batch_size", 1, None, True), ("eval_every", 1, None, True),
    ("num_devices", 1, None, True), ("num_workers", 0, None, True), ("skip_nonfinite", 0, None, True),
    ("seed", 0, 2 ** 32 - 1, True),  # NumPy's seeding takes no more
    ("lr", 0, None, False), ("warmup_ratio", 0, 1, True), ("min_lr_ratio", 0, 1, True),
    ("weight_decay", 0, None, True),
    ("max_grad_norm", 0, None, False),  # 0 would clip every update to nothing, a negative norm flips it
    ("peak_tflops", 0, None, False), ("device_memory_gb", 0, None, False),
]


def check_numbers(args):
    """One line for the first numeric flag outside its range (NaN and infinity included), and for a global
    batch that the torchrun processes cannot share: caught before any process group starts. (Under torchrun
    every rank reaches the same verdict; `parallel.errors_from_rank0` lets only rank 0 print it.)"""
    for name, low, high, low_ok in NUMBER_RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise SystemExit(f"error: {flag} must be a finite number (got {value})")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = (f"from {low} to {high}" if high is not None else
                     f"at least {low}" if low_ok else f"greater than {low}")
            raise SystemExit(f"error: {flag} must be {bound} (got {value})")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.plan_only and args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world_size} processes")
    if not args.plan_only and args.micro_batch_size and (args.batch_size // world_size) % args.micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} does not divide the "
                         f"{args.batch_size // world_size} rows each process takes per step")
