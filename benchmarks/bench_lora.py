"""LoRA against full fine-tuning, side by side in one run: trainable parameters, step time, checkpoint size and
the loss after the same steps.

    HF_HUB_OFFLINE=1 python benchmarks/bench_lora.py            # demo Llama, a few minutes on a 2-core CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_lora.py --quick    # smoke run (figures meaningless)

Each run is `train_llama2.py --demo` itself (same seed, data order, batch and steps; one checkpoint written at
the last step), once with full fine-tuning and once with `--lora` (default rank and targets). Runs alternate
`--repeat` times and the faster median step time of each is kept. Figures:
  trainable parameters   full: every parameter; LoRA: the adapters (from parallel_plan.json)
  step time              median seconds per optimiser step over the steps after the first (metrics.jsonl)
  checkpoint size        bytes of the checkpoint folder of the last step (model or adapters, optimiser, state)
  loss                   the training loss logged at the last step, and the validation loss after it
  peak memory            the process's peak resident memory (metrics.jsonl)

The last line printed is one JSON object with the ratios (LoRA / full) and the raw figures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="optimiser steps per run (default 20; --quick 3)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 8; --quick 2)")
    p.add_argument("--block-size", type=int, help="tokens per row (default 512; --quick 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="full fine-tuning's learning rate (default 2e-3)")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA's learning rate (default 2e-3)")
    p.add_argument("--repeat", type=int, help="runs of each, alternating; the faster kept (default 2; --quick 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: torch's choice; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run in seconds: tiny sizes, figures not meaningful")
    p.add_argument("--json-out", help="also write the final JSON object to this file")
    args = p.parse_args(argv)
    # --quick: one thread, since a smoke run usually shares the machine and oversubscribed cores crawl.
    preset = dict(steps=3, batch_size=2, block_size=256, repeat=1, threads=1) if args.quick else \
        dict(steps=20, batch_size=8, block_size=512, repeat=2)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "block_size", "repeat", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if args.steps < 2:
        raise SystemExit("error: --steps must be at least 2 (the first step pays one-off costs)")
    return args


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(args, lora, out):
    """One training run; returns its figures."""
    command = [sys.executable, str(REPO_ROOT / "train_llama2.py"), "--demo", "--save-model-dir", str(out),
               "--max-steps", str(args.steps), "--save-every", str(args.steps), "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--log-interval", "1", "--eval-every", "100000",
               "--num-workers", "0", "--lr", str(args.lora_lr if lora else args.lr), "--seed", "0"]
    if lora:
        command.append("--lora")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {'LoRA' if lora else 'full'} run failed: "
                         f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan = json.loads((out / "parallel_plan.json").read_text())
    timed = [r["step_time"] for r in rows[1:] if "val_loss" not in r] or [rows[-1]["step_time"]]
    return {"trainable_parameters": plan.get("trainable_parameters", plan["parameters"]),
            "parameters": plan["parameters"],
            "step_time": statistics.median(timed),
            "checkpoint_bytes": folder_bytes(out / "checkpoints" / f"step-{args.steps:08d}"),
            "final_loss": rows[-1]["loss"], "first_loss": rows[0]["loss"], "val_loss": rows[-1].get("val_loss"),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows)}


def main(argv=None):
    args = parse_args(argv)
    load_before = os.getloadavg()
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):
            for name in ("full", "lora"):
                figures = run(args, name == "lora", Path(tmp) / f"{name}{round_}")
                print(f"{name:>4} round {round_ + 1}: step {figures['step_time']:.3f} s, loss {figures['final_loss']:.4f}",
                      flush=True)
                if name not in best or figures["step_time"] < best[name]["step_time"]:
                    best[name] = figures
    full, lora = best["full"], best["lora"]
    print(f"\n{'':24}{'full':>14}{'LoRA':>14}{'LoRA/full':>12}")
    for key, fmt in (("trainable_parameters", "{:,}"), ("step_time", "{:.3f} s"), ("checkpoint_bytes", "{:,}"),
                     ("final_loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("peak_memory_gib", "{:.2f} GiB")):
        ratio = lora[key] / full[key] if full[key] else float("nan")
        print(f"{key:24}{fmt.format(full[key]):>14}{fmt.format(lora[key]):>14}{ratio:>12.3f}")
    summary = {
        "trainable_ratio": lora["trainable_parameters"] / full["trainable_parameters"],
        "step_time_ratio": lora["step_time"] / full["step_time"],
        "checkpoint_size_ratio": lora["checkpoint_bytes"] / full["checkpoint_bytes"],
        "final_loss": {"full": full["final_loss"], "lora": lora["final_loss"]},
        "val_loss": {"full": full["val_loss"], "lora": lora["val_loss"]},
        "full": full, "lora": lora,
        "config": {k: getattr(args, k) for k in ("steps", "batch_size", "block_size", "lr", "lora_lr", "repeat",
                                                 "threads", "quick")},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    }
    line = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(line)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
