"""Data preparation timed three ways on the same raw examples, for bench_throughput.py: our batched preparation,
its tokenize map alone, and the tutorial's per-example map padded to the block size."""
import copy
import json
import time

import numpy as np
import torch

import finetune.data.preparation as preparation
import prepare_dataset
from finetune import demo as demo_assets


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

    # finetune.data.preparation.prepare end to end: train/validation split, batched tokenization, report statistics.
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


