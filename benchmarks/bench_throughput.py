"""Training and data-preparation throughput on this machine, side by side, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py            # about 3 minutes on a 2-core CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py --quick    # smoke run, seconds

Model: the demo Llama (finetune.demo.ensure_demo_model("llama2")). Data: the bundled customer-support chat
sample (prepare_dataset's baichuan2 recipe, typical example 150-300 tokens), tokenized with the Llama demo
tokenizer; --recipe-data llama2 uses the bundled news-summary sample instead.

Training, every run with the same model weights, fp32, the same torch thread count, `--batch-size` rows per
optimiser step, `--warmup-steps` untimed steps, then `--steps` timed ones; `--repeat` rounds, the best kept:
  tutorial    train_llama2.py's loop with --batching block: one example per row, padded to --block-size
  packed      train_llama2.py's loop with its default --batching packed: several examples per row
  hf_trainer  transformers.Trainer, its out-of-the-box settings for a tokenized causal-LM set with labels:
              DataCollatorForSeq2Seq (pads each batch to its longest example, labels with -100),
              random sampling (no length grouping), no packing, per_device_train_batch_size = --batch-size
Useful tokens/s counts real (non-pad) tokens only. MFU = model FLOPs of those tokens (finetune.metrics.step_flops)
/ time / the fp32 matmul peak measured here in the same run.

Preparation: finetune.preparation.prepare (batched tokenization) against the tutorial's preprocessing (a
datasets.map without batching: build the prompt, call the tokenizer per example, pad to --block-size).

The last line printed is one JSON object with the ratios and the raw figures (also written to --json-out).
"""
import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune.data as fu  # noqa: E402
from finetune import metrics, model_size  # noqa: E402
import finetune.packed_attention  # noqa: F401,E402  (registers "packed_spans")
import finetune.preparation as preparation  # noqa: E402
import finetune.raw_data as raw_data  # noqa: E402
import prepare_dataset  # noqa: E402
from finetune import demo as demo_assets  # noqa: E402
from finetune import parallel  # noqa: E402
from finetune.config import ModelConfig  # noqa: E402
from finetune.training import warmup_cosine_schedule  # noqa: E402

MODEL_RECIPE = "llama2"  # the demo Llama model and tokenizer are used for every data recipe
LR = 2e-3  # any value gives the same speed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per run (default 8; --quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps before timing, at least 1 (default 2; --quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per optimiser step (default 8; --quick 2)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per row (default 1024; --quick 256)")
    p.add_argument("--recipe-data", choices=sorted(prepare_dataset.RECIPES), default="baichuan2",
                   help="bundled sample data to train on: baichuan2 = customer-support chat (default), "
                        "llama2 = news summaries (long examples)")
    p.add_argument("--prepare-repeat", type=int, default=None,
                   help="copies of the sample data for the preparation timing (default 10; --quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run (default: torch's own choice, the core count; --quick 1)")
    p.add_argument("--repeat", type=int, default=None,
                   help="run each training configuration this many times, round-robin, and keep the best "
                        "(default 2; --quick 1)")
    p.add_argument("--only", default="tutorial,packed,hf_trainer,prepare",
                   help="comma list of parts to run (default: all): tutorial, packed, hf_trainer, prepare")
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
    for name in ("steps", "batch_size", "block_size", "prepare_repeat", "threads", "repeat"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if args.warmup_steps < 1:
        raise SystemExit("error: --warmup-steps must be at least 1 (the first step pays one-off costs)")
    args.only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = set(args.only) - {"tutorial", "packed", "hf_trainer", "prepare"}
    if unknown:
        raise SystemExit(f"error: unknown --only part(s) {sorted(unknown)}")
    return args


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Peak
# ----------------------------------------------------------------------------------------------------------
def measure_peaks(config, rows, block_size, seconds, use_cache=True):
    """The square-matmul peak of finetune/metrics.py plus the model's own matmul shapes at this batch
    (tokens x hidden times hidden x out, for the attention, MLP and output-head weights).

    The peak used for MFU is the best of them, so MFU is never flattered by a slow reference shape."""
    tokens = rows * block_size
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    square = (metrics.measure_cpu_peak_flops(1024, seconds) if use_cache
              else metrics.matmul_rate(1024, 1024, 1024, seconds))
    rates = {
        "square 1024 (finetune.metrics.measure_cpu_peak_flops)": square,
        "square 2048": metrics.matmul_rate(2048, 2048, 2048, seconds),
        f"attn proj {tokens}x{h}x{h}": metrics.matmul_rate(tokens, h, h, seconds),
        f"mlp up {tokens}x{h}x{i}": metrics.matmul_rate(tokens, h, i, seconds),
        f"mlp down {tokens}x{i}x{h}": metrics.matmul_rate(tokens, i, h, seconds),
        f"lm head {tokens}x{h}x{v}": metrics.matmul_rate(tokens, h, v, seconds),
    }
    return max(rates.values()), rates


# ----------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------
def load_fresh_model(model_path):
    """The demo model exactly as train_llama2.py loads it on a single CPU process."""
    from transformers import AutoModelForCausalLM

    backend = parallel.enable_advanced_parallelization("no")
    model = parallel.load_model(backend, AutoModelForCausalLM, ModelConfig(model_path), attn_implementation="packed_spans")
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


def run_our_loop(model_path, table, pad_id, batching, args):
    """train_llama2.py's step, unchanged: collate -> forward(position_ids, segment_spans, labels, num_items_in_batch) ->
    backward -> clip -> finite check -> AdamW -> LR schedule -> zero_grad. Single process, fp32."""
    torch.manual_seed(0)
    backend, model = load_fresh_model(model_path)
    device = backend.device
    matmul_weights = model_size.matmul_parameters(model)
    total = args.warmup_steps + args.steps
    micro_batch_size, _ = parallel.split_global_batch(args.batch_size, 1, None, device.type, args.block_size)
    pad_to = args.block_size if batching in ("packed", "block") else None
    plan = plans_for(table, args.batch_size, args.block_size, batching, 0, total)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    scheduler = warmup_cosine_schedule(optim, total, 0.03, 0.1)
    # Workers 0 for every run (the Trainer's default too): on 2 cores a loader process only competes for them.
    loader = fu.make_step_loader(table, plan, 0, 1, fu.BatchFormat(micro_batch_size, pad_id, pad_to), workers=0)

    model.train()
    step, start = 0, time.perf_counter()
    tokens = flops = positions = 0
    losses = []
    for micro_batches, info in loader:
        step_loss = torch.zeros(())
        attended_pairs = 0
        for micro in micro_batches:
            micro = fu.move_to(micro, device)
            outputs = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"],
                            segment_spans=micro["segment_spans"], labels=micro["labels"],
                            num_items_in_batch=info["step_targets"], use_cache=False)
            outputs.loss.backward()
            step_loss += outputs.loss.detach()
            attended_pairs += micro["attended_pairs"]
            if step >= args.warmup_steps:
                positions += micro["input_ids"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(step_loss))):
            raise SystemExit(f"error: non-finite loss in the {batching} run")
        optim.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(step_loss))
        if step == args.warmup_steps:
            start = time.perf_counter()
        elif step > args.warmup_steps:
            tokens += info["step_tokens"]
            flops += metrics.step_flops(model.config, matmul_weights, info["step_tokens"], attended_pairs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": args.steps, "tokens": tokens, "positions": positions, "flops": flops,
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_hf_trainer(model_path, train_split, tokenizer, args):
    """transformers.Trainer as a user would set it up for this data: no packing, pad to the longest example of
    each batch, random order, fp32, torch AdamW with the same learning rate; logging, eval and saving off."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    _, model = load_fresh_model(model_path)
    tokenizer = copy.copy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # same pad id as train_llama2.py; the attention mask hides it
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=fu.IGNORE_INDEX)
    batch_tokens, batch_positions = [], []

    def collate(features):
        batch = seq2seq(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        batch_positions.append(batch["input_ids"].numel())
        return batch

    step_ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append(time.perf_counter())

    total = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory(prefix="bench_hf_trainer_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=total,
            learning_rate=LR,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",  # torch.optim.AdamW, as in our loop (the library's default is the fused variant)
            train_sampling_strategy="random",  # the default; no length grouping
            dataloader_num_workers=0,
            dataloader_drop_last=True,
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_split, data_collator=collate,
                          callbacks=[StepClock()])
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line; ours comes below
            trainer.train()
    if len(step_ends) != total:
        raise SystemExit(f"error: the Trainer ran {len(step_ends)} steps, expected {total}")
    # Batch k is collated for step k; the warmup steps' batches come first.
    timed = slice(args.warmup_steps, total)
    tokens = sum(batch_tokens[timed])
    return {"seconds": step_ends[-1] - step_ends[args.warmup_steps - 1], "steps": args.steps, "tokens": tokens,
            "positions": sum(batch_positions[timed]), "flops": None}


# ----------------------------------------------------------------------------------------------------------
# Preparation runs
# ----------------------------------------------------------------------------------------------------------
def raw_in_memory(recipe, repeat):
    """The bundled sample `repeat` times over, as an in-memory DatasetDict (no cache files, so no run can
    be served from an earlier run's cache)."""
    from datasets import Dataset, DatasetDict

    with open(demo_assets.DEMO_SAMPLE_FILES[recipe], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return DatasetDict(train=Dataset.from_list(rows * repeat))


def tutorial_preprocess_fn(recipe, tokenizer, block_size):
    """The tutorial's per-example preprocessing: one prompt string, tokenized and padded to the block size,
    returned as tensors (labels are made later, in its training loop, from the attention mask)."""
    if recipe == "baichuan2":
        def prompt(example):
            return (f"[INST] {example['instruction']} \n Category is {example['category']} \n "
                    f"Intent is {example['intent']} [/INST]\n{example['response']}")
    else:
        def prompt(example):
            return f"[SUMMARIZE] {example['article']} [/SUMMARIZE]\n{example['highlights']}"

    def preprocess(example):
        tokenized = tokenizer(prompt(example), padding="max_length", truncation=True, max_length=block_size)
        return {"input_ids": torch.tensor(tokenized["input_ids"]),
                "attention_mask": torch.tensor(tokenized["attention_mask"])}
    return preprocess


def run_prepare(recipe, tokenizer, block_size, repeat):
    """Seconds and real tokens/s of three ways to tokenize the same raw examples."""
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    raw = raw_in_memory(recipe, repeat)
    examples = len(raw["train"])
    timings = {}

    # finetune.preparation.prepare end to end: train/validation split, batched tokenization, report statistics.
    start = time.perf_counter()
    _, report = preparation.prepare(recipe, prepare_dataset.RECIPES[recipe], tokenizer, raw, block_size=block_size)
    timings["prepare"] = (time.perf_counter() - start, sum(split["tokens"] for split in report["splits"].values()))

    # Its tokenization step alone (what report["tokenize_seconds"] times), on the whole set at once.
    start = time.perf_counter()
    tokenized = raw["train"].map(
        preparation.tokenize_examples, batched=True, batch_size=1000,
        fn_kwargs=dict(build_prompt=prepare_dataset.RECIPES[recipe]["build_prompt"], tokenizer=tokenizer,
                       block_size=block_size, prefix_ids=preparation.leading_special_ids(tokenizer)),
        remove_columns=raw["train"].column_names)
    seconds = time.perf_counter() - start
    lengths = tokenized.with_format("arrow")["input_ids"]
    timings["tokenize_only"] = (seconds, int(lengths.combine_chunks().offsets[-1].as_py()) if len(tokenized) else 0)

    # The tutorial: dataset.with_format("torch").map(preprocess), one example at a time, padded to the block.
    tutorial_tokenizer = copy.copy(tokenizer)
    if tutorial_tokenizer.pad_token is None:
        tutorial_tokenizer.pad_token = tutorial_tokenizer.eos_token
    start = time.perf_counter()
    padded = raw["train"].with_format("torch").map(tutorial_preprocess_fn(recipe, tutorial_tokenizer, block_size))
    seconds = time.perf_counter() - start
    mask = padded.with_format("arrow")["attention_mask"].combine_chunks()
    timings["tutorial"] = (seconds, int(np.asarray(mask.values if hasattr(mask, "values") else mask).sum()))
    return {"examples": examples,
            **{name: {"seconds": s, "tokens": n, "tokens_per_sec": n / s} for name, (s, n) in timings.items()}}


# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = load_average()
    started = time.perf_counter()

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_path = demo_assets.ensure_demo_model(MODEL_RECIPE)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    raw = raw_data.load_raw_dataset(demo_assets.DEMO_SAMPLE_FILES[args.recipe_data])
    dataset, _ = preparation.prepare(args.recipe_data, prepare_dataset.RECIPES[args.recipe_data], tokenizer, raw,
                                     block_size=args.block_size)
    train = dataset["train"]
    table = fu.TokenTable(train)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)

    print(f"model {model_path} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab "
          f"{config.vocab_size}); data {args.recipe_data} sample: {len(table)} train examples, length "
          f"mean/p50/max {table.lengths.mean():.0f}/{int(np.median(table.lengths))}/{table.lengths.max()}; "
          f"{args.batch_size} rows x {args.block_size} per step, {args.warmup_steps} warmup + {args.steps} timed "
          f"steps; torch {torch.__version__}, {threads} threads; load average {load_before}", flush=True)

    peak, peak_rates = measure_peaks(config, args.batch_size, args.block_size, 0.1 if args.quick else 0.5)
    print("fp32 matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak_rates.items())
          + f" GFLOP/s -> {peak / 1e9:.1f} GFLOP/s used for MFU", flush=True)

    # Round-robin repeats (--repeat): on a shared machine a burst of other work hits one run, not all, and the
    # best of each run's repeats is reported.
    runs = {}
    batching_of = {"tutorial": "block", "packed": "packed"}
    for repeat in range(args.repeat):
        for name in ("tutorial", "packed", "hf_trainer"):
            if name not in args.only:
                continue
            print(f"running {name}" + (f" (repeat {repeat + 1}/{args.repeat})" if args.repeat > 1 else "") + " ...",
                  flush=True)
            if name == "hf_trainer":
                run = run_hf_trainer(model_path, train, tokenizer, args)
            else:
                run = run_our_loop(model_path, table, pad_id, batching_of[name], args)
            run["all_seconds"] = runs.get(name, {}).get("all_seconds", []) + [run["seconds"]]
            if name not in runs or run["seconds"] < runs[name]["seconds"]:
                runs[name] = run
            else:
                runs[name]["all_seconds"] = run["all_seconds"]
    for name, run in runs.items():
        run["tokens_per_sec"] = run["tokens"] / run["seconds"]
        run["step_seconds"] = run["seconds"] / run["steps"]
        run["pad_fraction"] = 1 - run["tokens"] / run["positions"]
        if run["flops"] is not None:
            run["mfu"] = run["flops"] / run["seconds"] / peak

    prep = None
    if "prepare" in args.only:
        print("timing preparation ...", flush=True)
        prep = run_prepare(args.recipe_data, tokenizer, args.block_size, args.prepare_repeat)

    # The peak again after the training runs, keeping each shape's best: a burst of other work during the first
    # measurement would otherwise lower the reference and flatter MFU.
    _, rates_after = measure_peaks(config, args.batch_size, args.block_size, 0.1 if args.quick else 0.5,
                                   use_cache=False)
    peak_rates = {name: max(rate, rates_after[name]) for name, rate in peak_rates.items()}
    if max(peak_rates.values()) > peak:
        for run in runs.values():
            if run.get("mfu") is not None:
                run["mfu"] *= peak / max(peak_rates.values())
        peak = max(peak_rates.values())
    print("fp32 matmul peak, best of before and after: "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak_rates.items()) + f" GFLOP/s -> {peak / 1e9:.1f}",
          flush=True)

    load_after = load_average()
    print()
    print(f"{'run':<12} {'useful tok/s':>13} {'s/step':>8} {'real tokens':>12} {'pad share':>10} {'MFU':>7}  how")
    how = {"tutorial": "train_llama2 loop, --batching block (1 example/row, padded to block)",
           "packed": "train_llama2 loop, --batching packed (default)",
           "hf_trainer": "transformers.Trainer, DataCollatorForSeq2Seq (pad to longest), no packing"}
    for name, run in runs.items():
        mfu = f"{100 * run['mfu']:.1f}%" if run.get("mfu") is not None else "-"
        print(f"{name:<12} {run['tokens_per_sec']:>13.0f} {run['step_seconds']:>8.2f} {run['tokens']:>12} "
              f"{100 * run['pad_fraction']:>9.1f}% {mfu:>7}  {how[name]}")
    if prep:
        print(f"\n{'prepare':<14} {'real tok/s':>11} {'seconds':>8} {'real tokens':>12}  "
              f"({prep['examples']} examples, block {args.block_size})")
        prep_how = {"prepare": "finetune.preparation.prepare end to end (split, batched map, report)",
                    "tokenize_only": "its datasets.map(tokenize_examples, batched=True) alone",
                    "tutorial": f"tutorial: with_format('torch').map(preprocess), per example, padded to {args.block_size}"}
        for name, how_text in prep_how.items():
            entry = prep[name]
            print(f"{name:<14} {entry['tokens_per_sec']:>11.0f} {entry['seconds']:>8.2f} {entry['tokens']:>12}  {how_text}")
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average before {load_before}, after {load_after}")

    def ratio(a, b):
        return a / b if a is not None and b else None

    def tps(name):
        return runs[name]["tokens_per_sec"] if name in runs else None

    result = {
        "packed_vs_tutorial": ratio(tps("packed"), tps("tutorial")),
        "packed_vs_hf_trainer": ratio(tps("packed"), tps("hf_trainer")),
        "mfu_packed": runs["packed"]["mfu"] if "packed" in runs else None,
        "prepare_vs_tutorial": ratio(prep["prepare"]["tokens_per_sec"], prep["tutorial"]["tokens_per_sec"]) if prep else None,
        "tokenize_only_vs_tutorial": (ratio(prep["tokenize_only"]["tokens_per_sec"], prep["tutorial"]["tokens_per_sec"])
                                      if prep else None),
        "tokens_per_sec": {name: run["tokens_per_sec"] for name, run in runs.items()},
        "step_seconds": {name: run["step_seconds"] for name, run in runs.items()},
        "timed_seconds_all_repeats": {name: run["all_seconds"] for name, run in runs.items()},
        "pad_fraction": {name: run["pad_fraction"] for name, run in runs.items()},
        "mfu": {name: run.get("mfu") for name, run in runs.items()},
        "prepare_tokens_per_sec": {name: prep[name]["tokens_per_sec"] for name in prep if name != "examples"} if prep else None,
        "prepare_examples": prep["examples"] if prep else None,
        "peak_flops": peak,
        "peak_rates": peak_rates,
        "config": {"recipe_data": args.recipe_data, "batch_size": args.batch_size, "block_size": args.block_size,
                   "steps": args.steps, "warmup_steps": args.warmup_steps, "threads": threads, "quick": args.quick,
                   "repeat": args.repeat,
                   "torch": torch.__version__},
        "load_average": {"before": load_before, "after": load_after},
    }
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
