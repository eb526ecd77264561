"""Check the plan on real hardware: a few real steps of the chosen plan, measured peak memory beside the
simulated figure, tokens/s and MFU, as one JSON line.

    python benchmarks/gpu_check.py --script train_llama2.py --nproc 8 -- --batch-size 256
    python benchmarks/gpu_check.py --script train_baichuan2_13b.py -- --qlora --batch-size 32

It runs the training script itself (the real code path: bf16 mixed precision, fused AdamW, the micro-batch
probe, CPU offload if the plan chose it) for `--steps` optimiser steps into a temporary folder, then reads the
plan the run printed into parallel_plan.json and the rows of metrics.jsonl. One process runs as `python
script.py` (the one-GPU path, the only one --qlora takes) unless the script's flags ask for CPU offload, which
runs through torchrun. Arguments after `--` go to the training script unchanged (model, data, batch size, LoRA
flags, ...). Measured: steps after the first (allocator warm-up, probe) that ran no validation pass; peak memory
since the first step (loading and the probe not counted). No final weights are written (`--save-dtype none`).
On a CPU it runs too, with no simulated figure (a CPU run plans no memory).
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
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) (default 1)")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps to run (default 6)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the run is stopped (default 1800)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the training script's flags")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.steps < 2 or args.timeout <= 0:
        p.error("--nproc must be at least 1, --steps at least 2 and --timeout positive")
    args.script_args = [a for a in args.script_args if a != "--"]
    return args


def launch_command(script, nproc, script_args):
    """`python script.py` for one process, torchrun for several or for CPU offload (it runs through FSDP2)."""
    offload = any(a == "--cpu-offload" and b == "on" for a, b in zip(script_args, script_args[1:]))
    if nproc == 1 and not offload:
        return [sys.executable, str(REPO_ROOT / script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO_ROOT / script)]


def failure_line(stderr):
    """The script's own `error:` line (torchrun prints its failure report after it), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def timed_rows(rows):
    """The steps to time: not the first (warm-up) and none that ran a validation pass."""
    timed = [row for row in rows[1:] if "val_loss" not in row]
    return timed or rows[-1:]


def run_check(args):
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as out:
        command = [*launch_command(args.script, args.nproc, args.script_args), *args.script_args,
                   "--max-steps", str(args.steps), "--log-interval", "1", "--save-dtype", "none",
                   "--save-model-dir", os.path.join(out, "run")]
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: the training run did not finish in {args.timeout:g} s") from None
        if done.returncode != 0:
            raise SystemExit(f"error: the training run failed ({failure_line(done.stderr)})")
        plan = json.loads(Path(out, "run", "parallel_plan.json").read_text())
        rows = [json.loads(line) for line in Path(out, "run", "metrics.jsonl").read_text().splitlines() if line]
    timed = timed_rows(rows)
    simulated = plan.get("memory_gib_per_device") or {}
    measured = max(row["peak_memory_gib"] for row in rows)
    reserved = [row.get("peak_reserved_gib") for row in rows]
    return {
        "script": args.script, "processes": args.nproc, "launcher": "python" if command[1] != "-m" else "torchrun",
        "device": plan["device"], "steps": len(rows), "timed_steps": len(timed),
        "micro_batch_size": plan["micro_batch_size"], "accumulation_steps": plan["accumulation_steps"],
        "activation_checkpointing": plan["activation_checkpointing"], "cpu_offload": plan["cpu_offload"],
        "simulated_peak_gib": simulated.get("device_peak"),
        "measured_peak_gib": round(measured, 2),
        "measured_reserved_gib": round(max(reserved), 2) if None not in reserved else None,
        "measured_over_simulated": round(measured / simulated["device_peak"], 3) if simulated else None,
        "step_time": round(sum(r["step_time"] for r in timed) / len(timed), 3),
        "tokens_per_sec": round(sum(r["tokens"] for r in timed) / sum(r["step_time"] for r in timed), 1),
        "mfu": (round(sum(r["mfu"] for r in timed) / len(timed), 4) if all(r["mfu"] is not None for r in timed)
                else None),
    }


if __name__ == "__main__":
    print(json.dumps(run_check(parse_args())))
