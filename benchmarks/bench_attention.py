"""What each attention backend costs for a packed training micro-batch, side by side, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_attention.py             # a few minutes on a 2-core CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_attention.py --quick     # smoke run, figures meaningless

Models: demo-size (hidden 256, 4 layers, 4 heads, intermediate 688, vocabulary 4000, float32) Baichuan with
ALiBi (13B-style), Baichuan with rotary positions (7B-style), transformers' LlamaForCausalLM, Mistral and
Gemma 2 (both with a 64-token sliding window, Gemma 2 also soft-capped), all with the same weights for every
option of one model. Micro-batch: --rows rows of --row-length tokens, each holding
about --examples-per-row examples of random lengths end to end plus a short padding tail, laid out the way
the training collator does (positions restarting at 0 per example, the spans of the examples, labels -100 on
each example's first token and on padding). Both training scripts pass those spans (`example_spans`); the other
options are the standard forms a caller without spans uses, for comparison: example ids 1, 2, ... (made from
the spans here) for Baichuan's `attention_mask`, restarting `position_ids` alone for both models.

Options, each a way of telling the model where the examples are:
  per_span       what both training scripts pass: position_ids and example_spans=... (Baichuan's own keyword,
                 the others' "packed_spans"): one SDPA call per example span
  sdpa           transformers' standard padding-free form: position_ids only (restarting), no mask, sdpa
                 (not Gemma 2: SDPA has no soft-capping)
  sdpa_example_ids  Baichuan only: attention_mask=example_ids, sdpa
  eager          position_ids only, eager attention
  flex           position_ids only, flex_attention (forward only: FlexAttention has no CPU backward)

Figures: seconds per micro-batch for forward + backward (training) and for a forward alone (no_grad), the
best of --repeat rounds that go round-robin over the options, after --warmup untimed calls (flex compiles
then; its first-call time is printed apart). "vs per_span" is per_span's time / the option's time (above 1 is
faster). aten ops = operators dispatched by one forward (a count of the small copies and fills).
The last line is one JSON object with every figure.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, LlamaForCausalLM, MistralConfig  # noqa: E402

import modeling_baichuan  # noqa: E402
from finetune.ops import span_attention  # noqa: F401,E402  (registers the per-span function "packed_spans")

MODELS = ("baichuan_alibi", "baichuan_rope", "llama", "mistral", "gemma2")
WINDOW = 64  # mistral and gemma2: a sliding window shorter than most examples, so it binds
SIZES = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
VOCAB_SIZE = 4000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2, help="rows per micro-batch (default 2)")
    p.add_argument("--row-length", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--examples-per-row", type=int, default=10, help="examples packed per row (default 10)")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds over all options (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per option first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles, ~1 minute)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rows x 128 tokens, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.row_length, args.examples_per_row, args.repeat = 128, 3, 1
    if args.rows < 1 or args.row_length < 8 or not 1 <= args.examples_per_row <= args.row_length // 4:
        raise SystemExit("error: need --rows >= 1, --row-length >= 8 and 1 <= --examples-per-row <= row length / 4")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise SystemExit(f"error: unknown --models {sorted(unknown)}; choose from {','.join(MODELS)}")
    if args.repeat < 1 or args.warmup < 1:
        raise SystemExit("error: --repeat and --warmup must be at least 1")
    return args


def packed_micro_batch(rows, row_length, examples_per_row, seed=0):
    """Tensors as the training collator builds them (see the module docstring); the padding tail is its own
    span with positions restarting at 0."""
    generator = torch.Generator().manual_seed(seed)
    batch = {name: torch.zeros((rows, row_length), dtype=torch.long)
             for name in ("input_ids", "position_ids", "example_ids")}
    batch["labels"] = torch.full((rows, row_length), -100)
    spans = []
    for row in range(rows):
        used = row_length - int(torch.randint(0, row_length // 16 + 1, (1,), generator=generator))
        cuts = torch.randperm(used - 1, generator=generator)[: examples_per_row - 1].add(1).sort().values.tolist()
        bounds = [0] + cuts + [used]
        row_spans = []
        for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            ids = torch.randint(3, VOCAB_SIZE, (end - start,), generator=generator)
            batch["input_ids"][row, start:end] = ids
            batch["labels"][row, start + 1:end] = ids[1:]
            batch["position_ids"][row, start:end] = torch.arange(end - start)
            batch["example_ids"][row, start:end] = number
            row_spans.append((start, end))
        batch["position_ids"][row, used:] = torch.arange(row_length - used)
        if used < row_length:
            row_spans.append((used, row_length))
        spans.append(row_spans)
    batch["example_spans"] = spans
    batch["targets"] = int((batch["labels"] != -100).sum())
    return batch


def build_model(name):
    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(vocab_size=VOCAB_SIZE, num_key_value_heads=SIZES["num_attention_heads"],
                             max_position_embeddings=4096, tie_word_embeddings=False, **SIZES)
        return LlamaForCausalLM(config)
    if name == "mistral":
        return AutoModelForCausalLM.from_config(MistralConfig(
            vocab_size=VOCAB_SIZE, num_key_value_heads=SIZES["num_attention_heads"], max_position_embeddings=4096,
            sliding_window=WINDOW, **SIZES))
    if name == "gemma2":  # every other layer local, attention and final-logit soft-capping
        return AutoModelForCausalLM.from_config(Gemma2Config(
            vocab_size=VOCAB_SIZE, num_key_value_heads=SIZES["num_attention_heads"], max_position_embeddings=4096,
            head_dim=SIZES["hidden_size"] // SIZES["num_attention_heads"], sliding_window=WINDOW, **SIZES))
    position = "alibi" if name == "baichuan_alibi" else "rope"
    config = modeling_baichuan.BaichuanConfig(vocab_size=VOCAB_SIZE, position_embedding=position, norm_head=True,
                                              model_max_length=4096, **SIZES)
    return modeling_baichuan.BaichuanForCausalLM(config)


def options_for(name, batch, with_flex):
    """option -> (attn_implementation, forward keywords beyond input_ids / labels)."""
    positions = {"position_ids": batch["position_ids"]}
    # what the training scripts pass
    per_span = {**positions, "example_spans": batch["example_spans"]}
    baichuan = name.startswith("baichuan")
    options = {"per_span": ("sdpa" if baichuan else "packed_spans", per_span)}
    if name != "gemma2":  # transformers' SDPA has no soft-capping and refuses Gemma 2
        options["sdpa"] = ("sdpa", positions)
    if baichuan:
        options["sdpa_example_ids"] = ("sdpa", {"attention_mask": batch["example_ids"], **positions})
    options["eager"] = ("eager", positions)
    if with_flex:
        options["flex"] = ("flex_attention", positions)
    return options


def call(model, implementation, batch, kwargs, train):
    model.set_attn_implementation(implementation)
    inputs = dict(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=batch["targets"],
                  use_cache=False, **kwargs)
    start = time.perf_counter()
    if train:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
    else:
        with torch.no_grad():
            loss = model(**inputs).loss
    return time.perf_counter() - start, loss.item()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, implementation, batch, kwargs):
    counter = OpCounter()
    with counter:
        call(model, implementation, batch, kwargs, train=False)
    attention = sum(n for op, n in counter.ops.items() if "attention" in op)
    small = sum(counter.ops[op] for op in ("copy_", "fill_", "zero_", "zeros", "empty", "slice", "select"))
    return {"aten_ops": sum(counter.ops.values()), "attention_calls": attention, "copy_fill_slice_ops": small}


def measure(name, batch, args):
    model = build_model(name).train()
    options = options_for(name, batch, not args.no_flex)
    modes = {option: ("forward",) if implementation == "flex_attention" else ("train", "forward")
             for option, (implementation, _) in options.items()}
    result = {option: {"first_call_s": None, "train_s": [], "forward_s": [], "loss": None, "aten_ops": None,
                       "attention_calls": None, "copy_fill_slice_ops": None} for option in options}
    for option, (implementation, kwargs) in options.items():
        for _ in range(args.warmup):
            seconds, loss = call(model, implementation, batch, kwargs, train=False)
            result[option]["first_call_s"] = result[option]["first_call_s"] or seconds
            result[option]["loss"] = loss
        if implementation != "flex_attention":  # a compiled kernel: its ops are not dispatched one by one
            result[option].update(count_ops(model, implementation, batch, kwargs))
    for _ in range(args.repeat):  # round-robin, so machine load drifts hit every option alike
        for option, (implementation, kwargs) in options.items():
            for mode in modes[option]:
                seconds, _ = call(model, implementation, batch, kwargs, train=mode == "train")
                result[option][f"{mode}_s"].append(seconds)
    for option in options:
        for mode in ("train", "forward"):
            times = result[option].pop(f"{mode}_s")
            result[option][f"{mode}_best_s"] = min(times) if times else None
    return result


def ratio(baseline, value):
    return None if baseline is None or value is None else baseline / value


def report(all_results):
    for name, result in all_results.items():
        base = result["per_span"]
        print(f"\n{name}  (loss per option, all should agree: "
              + ", ".join(f"{o} {r['loss']:.5f}" for o, r in result.items()) + ")")
        print(f"{'option':<14}{'fwd+bwd s':>10}{'vs per_span':>12}{'fwd s':>9}{'vs per_span':>12}"
              f"{'aten ops':>10}{'attn calls':>11}{'copy/fill/slice':>16}{'1st call s':>11}")
        for option, r in result.items():
            train_ratio = ratio(base["train_best_s"], r["train_best_s"])
            forward_ratio = ratio(base["forward_best_s"], r["forward_best_s"])
            r["train_vs_per_span"], r["forward_vs_per_span"] = train_ratio, forward_ratio

            print(f"{option:<14}{fmt(r['train_best_s'], 10, '.3f')}{fmt(train_ratio, 12, '.2f')}"
                  f"{fmt(r['forward_best_s'], 9, '.3f')}{fmt(forward_ratio, 12, '.2f')}{fmt(r['aten_ops'], 10)}"
                  f"{fmt(r['attention_calls'], 11)}{fmt(r['copy_fill_slice_ops'], 16)}"
                  f"{fmt(r['first_call_s'], 11, '.2f')}")


def fmt(value, width, spec=""):
    return f"{'-' if value is None else format(value, spec):>{width}}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = packed_micro_batch(args.rows, args.row_length, args.examples_per_row)
    load_before = os.getloadavg()
    results = {name: measure(name, batch, args) for name in args.models.split(",")}
    report(results)
    summary = {
        "settings": {**{k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
                     "spans_per_row": [len(s) for s in batch["example_spans"]], "sizes": SIZES,
                     "vocab_size": VOCAB_SIZE},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
