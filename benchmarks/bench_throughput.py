"""Training and data-preparation throughput on this machine, ours beside the peers, at matched settings, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --threads 1 --peer-defaults  # both models, all runs
    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --threads 1 --busy          # also under a competing process
    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --quick                     # smoke run, seconds

Models (--models): the demo Llama and the demo Baichuan (finetune.demo.ensure_demo_model), each on its own
recipe's bundled sample by default: Llama on the news-summary sample (summary-length data, ~86 tokens an
example), Baichuan on the customer-support chat sample (support-chat-length data, 150-300 tokens);
--recipe-data puts both models on one sample instead.

Matched settings (step_settings.py), the same for every run: the same model weights, `--batch-size` rows per
optimiser step split the same way (our loop's micro-batch on this device, or --micro-batch-size, times the
accumulation steps that make the step), activation checkpointing off for all (--activation-checkpointing on: on
for all), fp32, one AdamW and learning-rate schedule and clipping at 1.0, the same torch thread count;
`--warmup-steps` untimed steps, then `--steps` timed ones (nothing else inside them: no validation, logging or
saving); `--repeat` rounds, round-robin over the runs, the best of each kept:
  tutorial      the training script's loop with --pad-to-block-size: one example per row, padded to --block-size
  packed        the training script's loop with its default packing (ours): several examples per row
  hf_trainer    transformers.Trainer, DataCollatorForSeq2Seq (pads each micro-batch to its longest example)
  trl_packed    TRL's SFTTrainer, packing=True (bfd: a micro-batch's rows as one padding-free sequence)
  trl_unpacked  TRL's SFTTrainer without packing
--peer-defaults adds trl_packed_defaults and trl_unpacked_defaults: TRL with its own split and checkpointing (the
whole step in one micro-batch, gradient checkpointing on), the way TRL runs unless told otherwise.
(peers: benchmarks/peer_trainers.py; TRL is a benchmark-only dependency: pip install -r benchmarks/requirements.txt.)

Figures of the timed steps: useful tokens/s counts real (non-pad) tokens only; CPU ms/ktok is the process's CPU
time per 1000 of them; cores = CPU time / wall time (1.0 with --threads 1 when nothing else runs inside the
step); pad = the share of positions no token fills; MFU = model FLOPs of those tokens
(finetune.observe.metrics.step_flops) / time / the fp32 matmul peak measured here; loss = the loss of the last
step. Our loop's step time is split into data, forward, backward and optimizer; --profile adds one more pass of
the packed runs under torch.profiler and prints the ops that take the most time. The load average is printed
before and after every run; a run taken while it was above the machine's core count is flagged (`!`): its
figures are not comparable. --busy runs every configuration a second time, right after the first, beside a
competing CPU-bound process (one busy Python loop), and prints busy factor = quiet tokens/s / busy tokens/s.

Preparation: finetune.data.preparation.prepare (batched tokenization) against the tutorial's preprocessing (a
datasets.map without batching: build the prompt, call the tokenizer per example, pad to --block-size).

The last line printed is one JSON object with the ratios and the raw figures (also written to --json-out).
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune.data.batches as fu  # noqa: E402
import finetune.data.preparation as preparation  # noqa: E402
import finetune.data.raw_data as raw_data  # noqa: E402
import finetune.ops.span_attention  # noqa: F401,E402  (registers "packed_spans")
import modeling_baichuan  # noqa: F401,E402  (registers Baichuan with the Auto classes)
import peer_trainers  # noqa: E402
import prepare_dataset  # noqa: E402
import step_profile  # noqa: E402
import step_settings  # noqa: E402
from finetune import demo as demo_assets  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from finetune.observe import metrics  # noqa: E402
from our_loop import PHASES, build_our_loop, load_fresh_model, run_our_loop  # noqa: E402
from preparation_runs import run_prepare  # noqa: E402

OURS = ("tutorial", "packed")
RUNS = OURS + peer_trainers.PEERS
ALL_RUNS = RUNS + peer_trainers.PEERS_AT_DEFAULTS
PROFILED = ("packed", "trl_packed", "trl_unpacked")
HOW = {"tutorial": "our loop, --pad-to-block-size (the tutorial's batching: 1 example/row, padded to block)",
       "packed": "our loop, packed (the default)",
       "hf_trainer": "transformers.Trainer, DataCollatorForSeq2Seq (pad to longest), no packing",
       "trl_packed": "TRL SFTTrainer, packing=True (bfd, padding-free)",
       "trl_unpacked": "TRL SFTTrainer, no packing (pad to longest)",
       "trl_packed_defaults": "TRL SFTTrainer, packing=True, TRL's defaults: one micro-batch, checkpointing on",
       "trl_unpacked_defaults": "TRL SFTTrainer, no packing, TRL's defaults: one micro-batch, checkpointing on"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per run (default 8; --quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps before timing, at least 1 (default 2; --quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per optimiser step (default 8; --quick 2)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per micro-batch for every run (default: our loop's choice on this device, about 2k "
                        "tokens on a CPU); the step is --batch-size / this accumulation steps")
    p.add_argument("--block-size", type=int, default=None, help="tokens per row (default 1024; --quick 256)")
    p.add_argument("--activation-checkpointing", choices=("off", "on"), default="off",
                   help="activation checkpointing for every run (default off)")
    p.add_argument("--peer-defaults", action="store_true",
                   help="also run TRL at its own defaults (one micro-batch a step, gradient checkpointing on): "
                        f"{', '.join(peer_trainers.PEERS_AT_DEFAULTS)}")
    p.add_argument("--models", default="llama2,baichuan2",
                   help="comma list of demo models to run, one after the other: llama2, baichuan2 (default both)")
    p.add_argument("--recipe-data", choices=sorted(prepare_dataset.RECIPES), default=None,
                   help="bundled sample data for every model: baichuan2 = customer-support chat, llama2 = news "
                        "summaries (default: each model's own recipe)")
    p.add_argument("--prepare-repeat", type=int, default=None,
                   help="copies of the sample data for the preparation timing (default 10; --quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run (default: torch's own choice, the core count; --quick 1)")
    p.add_argument("--repeat", type=int, default=None,
                   help="run each training configuration this many times, round-robin, and keep the best "
                        "(default 2; --quick 1)")
    p.add_argument("--only", default=None,
                   help="comma list of parts to run, in this order (default: all, with --peer-defaults its runs "
                        "too): " + ", ".join(ALL_RUNS + ("prepare",)))
    p.add_argument("--busy", action="store_true",
                   help="also run every configuration beside a competing CPU-bound process; prints the slowdown")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, one more pass of " + ", ".join(PROFILED) + " under torch.profiler; "
                        "prints the ops that take the most time in the timed steps")
    p.add_argument("--quick", action="store_true", help="smoke run in seconds: tiny sizes, figures not meaningful")
    p.add_argument("--json-out", help="also write the final JSON object to this file")
    args = p.parse_args(argv)
    # --quick: one thread, because a smoke run usually shares the machine with other jobs, and OpenMP
    # threads that outnumber the free cores make every step many times slower.
    quick = dict(steps=1, warmup_steps=1, batch_size=2, block_size=256, prepare_repeat=1, threads=1, repeat=1)
    full = dict(steps=8, warmup_steps=2, batch_size=8, block_size=1024, prepare_repeat=10, threads=None, repeat=2)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "block_size", "prepare_repeat", "threads", "repeat", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if args.warmup_steps < 1:
        raise SystemExit("error: --warmup-steps must be at least 1 (the first step pays one-off costs)")
    default_only = RUNS + (peer_trainers.PEERS_AT_DEFAULTS if args.peer_defaults else ()) + ("prepare",)
    args.only = [part.strip() for part in (args.only or ",".join(default_only)).split(",") if part.strip()]
    unknown = set(args.only) - set(ALL_RUNS + ("prepare",))
    if unknown:
        raise SystemExit(f"error: unknown --only part(s) {sorted(unknown)}")
    if any(name.startswith("trl_") for name in args.only) and importlib.util.find_spec("trl") is None:
        raise SystemExit("error: the trl_* runs need TRL (a benchmark-only dependency): pip install -r "
                         "benchmarks/requirements.txt, or leave them out of --only")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.models or set(args.models) - {"llama2", "baichuan2"}:
        raise SystemExit("error: --models takes llama2, baichuan2 or both")
    try:
        args.matched = run_settings(args)
    except FinetuneError as exc:
        raise SystemExit(f"error: {exc}") from None
    return args


def run_settings(args) -> step_settings.StepSettings:
    """The matched settings of every run (step_settings.matched_settings) for these flags on this device."""
    return step_settings.matched_settings(args.batch_size, args.block_size, args.warmup_steps + args.steps,
                                          "cuda" if torch.cuda.is_available() else "cpu", args.micro_batch_size,
                                          args.activation_checkpointing == "on")


def settings_for(name: str, matched: step_settings.StepSettings) -> step_settings.StepSettings:
    return step_settings.peer_defaults(matched) if name in peer_trainers.PEERS_AT_DEFAULTS else matched


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busier_than_cores(*loads) -> bool:
    """Whether a 1-minute load average of `loads` was above the machine's core count (figures not comparable)."""
    return any(load is not None and load[0] > (os.cpu_count() or 1) for load in loads)


# ----------------------------------------------------------------------------------------------------------
# Peak
# ----------------------------------------------------------------------------------------------------------
def measure_peaks(config, rows, block_size, seconds, use_cache=True):
    """The square-matmul peak of finetune/observe/metrics.py plus the model's own matmul shapes at this micro-batch
    (tokens x hidden times hidden x out, for the attention, MLP and output-head weights).

    The peak used for MFU is the best of them, so MFU is never flattered by a slow reference shape."""
    tokens = rows * block_size
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    square = (metrics.measure_cpu_peak_flops(1024, seconds) if use_cache
              else metrics.matmul_rate(1024, 1024, 1024, seconds))
    rates = {
        "square 1024 (finetune.observe.metrics.measure_cpu_peak_flops)": square,
        "square 2048": metrics.matmul_rate(2048, 2048, 2048, seconds),
        f"attn proj {tokens}x{h}x{h}": metrics.matmul_rate(tokens, h, h, seconds),
        f"mlp up {tokens}x{h}x{i}": metrics.matmul_rate(tokens, h, i, seconds),
        f"mlp down {tokens}x{i}x{h}": metrics.matmul_rate(tokens, i, h, seconds),
        f"lm head {tokens}x{h}x{v}": metrics.matmul_rate(tokens, h, v, seconds),
    }
    return max(rates.values()), rates


# ----------------------------------------------------------------------------------------------------------
# One model: every run, round-robin
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def competing_process(enabled):
    """A CPU-bound process (one busy Python loop) beside the run, for the busy-machine figures."""
    if not enabled:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # scheduled before the timed steps start
        yield
    finally:
        busy.kill()
        busy.wait()


def run_once(name, data, args, profiler=None):
    """One run of `name` at its settings; `data` = (model path, token table, train split, tokenizer, pad id)."""
    model_path, table, train, tokenizer, pad_id = data
    settings = settings_for(name, args.matched)
    load_before = load_average()
    if name in OURS:
        loop = build_our_loop(model_path, table, pad_id, "block" if name == "tutorial" else "packed", settings,
                              args.block_size)
        run = run_our_loop(loop, args.warmup_steps, profiler)
    else:
        torch.manual_seed(0)
        _, model = load_fresh_model(model_path, attention="sdpa")
        run = peer_trainers.run_peer(name, model, train, tokenizer, settings, args.block_size, args.warmup_steps,
                                     profiler)
    run["load_before"], run["load_after"] = load_before, load_average()
    run["busy_machine"] = busier_than_cores(load_before, run["load_after"])
    return run


def summarise(run, peak):
    run["tokens_per_sec"] = run["tokens"] / run["seconds"]
    run["step_seconds"] = run["seconds"] / run["steps"]
    run["step_seconds_median"] = float(np.median(run["step_seconds_each"]))
    run["pad_fraction"] = 1 - run["tokens"] / run["positions"]
    run["cpu_ms_per_ktoken"] = 1e6 * run["cpu_seconds"] / run["tokens"]
    run["cores"] = run["cpu_seconds"] / run["seconds"]
    run["mfu"] = run["flops"] / run["seconds"] / peak if run["flops"] is not None else None
    run["loss_last"], run["loss_step"] = run["losses"][-1], len(run["losses"])
    return run


def keep_best(runs, name, run):
    """The fastest of a run's repeats, with every repeat's seconds listed (and whether any was on a busy machine)."""
    seconds = runs.get(name, {}).get("all_seconds", []) + [run["seconds"]]
    busy = runs.get(name, {}).get("any_busy_machine", False) or run["busy_machine"]
    if name not in runs or run["seconds"] < runs[name]["seconds"]:
        runs[name] = run
    runs[name]["all_seconds"], runs[name]["any_busy_machine"] = seconds, busy


def profile_runs(names, data, args, vocab_size):
    """One more pass of `names` under torch.profiler (timed steps only): where their time goes."""
    summaries = {}
    for name in names:
        profiler = step_profile.new_profiler()
        run_once(name, data, args, profiler)
        summaries[name] = step_profile.summarise_profile(profiler, vocab_size)
        step_profile.print_profile(name, summaries[name])
    return summaries


def print_table(family, recipe, runs, args):
    loss_column = f"loss@{args.warmup_steps + args.steps}"
    print(f"\n{family} ({recipe} data); matched: {args.matched.describe()}")
    print(f"{'run':<22}{'useful tok/s':>13}{'ours packed/x':>14}{'CPU ms/ktok':>12}{'by CPU':>7}{'cores':>6}"
          f"{'pad':>6}{'MFU':>7}{loss_column:>9}{'load before>after':>19}{'busy factor':>12}  how")
    ours = runs.get("packed")
    for name, run in runs.items():
        ratio = ours["tokens_per_sec"] / run["tokens_per_sec"] if ours else None
        run["packed_vs_this"] = ratio
        # The same ratio from CPU time per useful token: what a shared machine's load disturbs least.
        run["packed_vs_this_cpu"] = run["cpu_ms_per_ktoken"] / ours["cpu_ms_per_ktoken"] if ours else None
        load = f"{(run['load_before'] or ['-'])[0]}>{(run['load_after'] or ['-'])[0]}"
        print(f"{name:<22}{run['tokens_per_sec']:>13.0f}{fmt(ratio, 14, '.2f')}{run['cpu_ms_per_ktoken']:>12.0f}"
              f"{fmt(run['packed_vs_this_cpu'], 7, '.2f')}{run['cores']:>6.2f}{100 * run['pad_fraction']:>5.1f}%"
              f"{fmt(run['mfu'] and 100 * run['mfu'], 6, '.1f')}%{run['loss_last']:>9.3f}"
              f"{load + (' !' if run['any_busy_machine'] else '  '):>19}{fmt(run.get('busy_factor'), 12, '.2f')}"
              f"  {HOW[name]}")
    for name in OURS:
        if name in runs:
            phases = runs[name]["phases"]
            total = sum(phases.values()) or 1
            print(f"{name} step time ({runs[name]['step_seconds']:.3f} s a step): " + ", ".join(
                f"{phase} {100 * phases[phase] / total:.0f}%" for phase in PHASES))


def bench_model(family, args):
    """All runs of one demo model on its data; returns its figures (and prints its table)."""
    from transformers import AutoConfig, AutoTokenizer

    model_path = demo_assets.ensure_demo_model(family)
    recipe = args.recipe_data or family
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    raw = raw_data.load_raw_dataset(demo_assets.DEMO_SAMPLE_FILES[recipe])
    dataset, _ = preparation.prepare(recipe, prepare_dataset.RECIPES[recipe], tokenizer, raw, block_size=args.block_size)
    train = dataset["train"]
    table = fu.TokenTable(train)
    data = (model_path, table, train, tokenizer, pad_id)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    print(f"\n== {family}: model {model_path} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab "
          f"{config.vocab_size}); data {recipe} sample: {len(table)} train examples, length mean/p50/max "
          f"{table.lengths.mean():.0f}/{int(np.median(table.lengths))}/{table.lengths.max()}; load {load_average()}",
          flush=True)
    seconds = 0.1 if args.quick else 0.5
    peak, peak_rates = measure_peaks(config, args.matched.micro_batch_size, args.block_size, seconds)

    # Round-robin repeats: on a shared machine a burst of other work hits one run, not all; the best is kept.
    # With --busy each run goes again at once beside the competing process, so both see the same machine.
    runs, busy_runs = {}, {}
    names = [name for name in args.only if name in ALL_RUNS]  # in the order --only gives
    for repeat in range(args.repeat):
        for name in names:
            for busy in (False, True) if args.busy else (False,):
                label = f"{name}{' (busy)' if busy else ''}"
                print(f"running {label} (repeat {repeat + 1}/{args.repeat}), load {load_average()} ...", flush=True)
                with competing_process(busy):
                    run = run_once(name, data, args)
                print(f"  {run['tokens'] / run['seconds']:.0f} useful tok/s, {1e6 * run['cpu_seconds'] / run['tokens']:.0f} "
                      f"CPU ms/ktok, {run['cpu_seconds'] / run['seconds']:.2f} cores, loss {run['losses'][-1]:.3f}; "
                      f"load {run['load_after']}{' (busier than the cores: not comparable)' if run['busy_machine'] else ''}",
                      flush=True)
                keep_best(busy_runs if busy else runs, name, run)

    _, rates_after = measure_peaks(config, args.matched.micro_batch_size, args.block_size, seconds,
                                   use_cache=False)  # a burst during the first measurement would flatter MFU
    peak = max(peak, *rates_after.values())
    for run in list(runs.values()) + list(busy_runs.values()):
        summarise(run, peak)
    for name, run in busy_runs.items():
        runs[name]["busy_factor"] = runs[name]["tokens_per_sec"] / run["tokens_per_sec"]
    print_table(family, recipe, runs, args)
    profiled = [name for name in PROFILED if name in names]
    profile = profile_runs(profiled, data, args, config.vocab_size) if args.profile else None
    prep = run_prepare(recipe, tokenizer, args.block_size, args.prepare_repeat) if "prepare" in args.only else None
    if prep:
        print(f"preparation, real tokens/s: prepare {prep['prepare']['tokens_per_sec']:.0f}, its tokenize map "
              f"{prep['tokenize_only']['tokens_per_sec']:.0f}, tutorial per-example map "
              f"{prep['tutorial']['tokens_per_sec']:.0f} ({prep['examples']} examples)")
    keys = ("tokens_per_sec", "cpu_seconds", "cpu_ms_per_ktoken", "cores", "step_seconds", "step_seconds_median",
            "pad_fraction", "mfu", "packed_vs_this", "packed_vs_this_cpu", "busy_factor", "all_seconds",
            "losses", "loss_last", "loss_step", "phases", "load_before", "load_after", "busy_machine",
            "any_busy_machine")
    return {"recipe_data": recipe, "peak_flops": peak, "peak_rates": peak_rates, "prepare": prep, "profile": profile,
            "runs": {name: {key: run.get(key) for key in keys} for name, run in runs.items()},
            "busy_runs": {name: {key: run.get(key) for key in keys} for name, run in busy_runs.items()}}


def fmt(value, width, spec=""):
    return f"{'-' if value is None else format(value, spec):>{width}}"


# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    load_before, started = load_average(), time.perf_counter()
    print(f"{args.batch_size} rows x {args.block_size} per step, {args.warmup_steps} warmup + {args.steps} timed steps, "
          f"{args.repeat} round(s); torch {torch.__version__}, {torch.get_num_threads()} threads; {os.cpu_count()} "
          f"cores, load {load_before}\nmatched settings (every run): {args.matched.describe()}", flush=True)
    if any(name in peer_trainers.PEERS_AT_DEFAULTS for name in args.only):
        print(f"TRL's defaults (*_defaults runs): {step_settings.peer_defaults(args.matched).describe()}")
    models = {family: bench_model(family, args) for family in args.models}
    load_after = load_average()
    busy = [f"{family} {name}" for family, figures in models.items() for name, run in figures["runs"].items()
            if run["any_busy_machine"]]
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average before {load_before}, after {load_after}")
    if busy:
        print(f"WARNING: the load average was above the machine's {os.cpu_count()} cores during {', '.join(busy)}: "
              f"those figures are not comparable; rerun on a quiet machine")
    result = {
        "packed_vs": {family: {name: run["packed_vs_this"] for name, run in figures["runs"].items()}
                      for family, figures in models.items()},
        "busy_factor": {family: {name: run["busy_factor"] for name, run in figures["runs"].items()}
                        for family, figures in models.items()} if args.busy else None,
        "models": models,
        "config": {"models": args.models, "recipe_data": args.recipe_data, "batch_size": args.batch_size,
                   "block_size": args.block_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                   "threads": torch.get_num_threads(), "repeat": args.repeat, "quick": args.quick,
                   "busy": args.busy, "matched": dataclasses.asdict(args.matched),
                   "peer_defaults": dataclasses.asdict(step_settings.peer_defaults(args.matched)),
                   "cores": os.cpu_count(), "torch": torch.__version__},
        "load_average": {"before": load_before, "after": load_after},
        "busy_machine_runs": busy,
    }
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
