"""Check the plan on real hardware: a few real steps of the chosen plan, measured peak memory beside the
simulated figure, tokens/s and MFU, as one JSON line.

    python benchmarks/gpu_check.py --script train_llama2.py --nproc 8 -- --batch-size 256
    python benchmarks/gpu_check.py --script train_baichuan2_13b.py --nproc 1 -- --qlora --batch-size 32

It runs the training script itself (the real code path: bf16 FSDP2 mixed precision, fused AdamW, the
micro-batch probe, CPU offload if the plan chose it) under torchrun for `--steps` optimiser steps into a
temporary folder, then reads the plan the run printed into parallel_plan.json and the rows of metrics.jsonl.
Arguments after `--` go to the training script unchanged (model, data, batch size, LoRA flags, ...). On a CPU
it runs too, with no simulated figure (a CPU run plans no memory).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", choices=("train_llama2.py", "train_baichuan2_13b.py"), default="train_llama2.py")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun (default 1)")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps to run (default 6)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the training script's flags")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.steps < 2:
        p.error("--nproc must be at least 1 and --steps at least 2")
    args.script_args = [a for a in args.script_args if a != "--"]
    return args


def run_check(args):
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(REPO_ROOT / args.script), *args.script_args, "--max-steps", str(args.steps),
                   "--log-interval", "1", "--save-model-dir", os.path.join(out, "run")]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"error: the training run failed ({tail})")
        plan = json.loads(Path(out, "run", "parallel_plan.json").read_text())
        rows = [json.loads(line) for line in Path(out, "run", "metrics.jsonl").read_text().splitlines() if line]
    timed = rows[1:] or rows  # the first step includes warm-up (allocator, compile, probe)
    simulated = plan.get("memory_gib_per_device") or {}
    measured = max(row["peak_memory_gib"] for row in rows)
    return {
        "script": args.script, "processes": args.nproc, "device": plan["device"], "steps": len(rows),
        "micro_batch_size": plan["micro_batch_size"], "accumulation_steps": plan["accumulation_steps"],
        "activation_checkpointing": plan["activation_checkpointing"], "cpu_offload": plan["cpu_offload"],
        "simulated_peak_gib": simulated.get("device_peak"),
        "measured_peak_gib": round(measured, 2),
        "measured_over_simulated": round(measured / simulated["device_peak"], 3) if simulated else None,
        "tokens_per_sec": round(sum(r["tokens"] for r in timed) / sum(r["step_time"] for r in timed), 1),
        "mfu": (round(sum(r["mfu"] for r in timed) / len(timed), 4) if all(r["mfu"] is not None for r in timed)
                else None),
    }


if __name__ == "__main__":
    print(json.dumps(run_check(parse_args())))
