"""The engine behind prepare_dataset.py: tokenise examples with a recipe, split, and report.

A recipe (defined in prepare_dataset.py) is a dict with `build_prompt`, a function that splits an example into
head, body, tail and response strings, and `columns`, the text columns it reads. Everything here is
recipe-agnostic: tokenisation that keeps the response, label masks, the train/validation split and the report.
Loading local or hub data is finetune/data/raw_data.py; the atomic write of the output folder, finetune/data/output.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from finetune.data.output import MADE_BY
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def require(ok: bool, message: str) -> None:
    """A command-line check in one line: stop with `error: message` unless `ok`."""
    if not ok:
        raise FinetuneError(message)


def full_text(parts: dict[str, str]) -> str:
    return parts["head"] + parts["body"] + parts["tail"] + parts["response"]


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------
def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before any text (Llama: [BOS]; Baichuan: none)."""
    with_specials = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = with_specials.index(without[0]) if without and without[0] in with_specials else 0
    return list(with_specials[:start])


def text_budget(tokenizer: PreTrainedTokenizerBase, block_size: int) -> int:
    """Characters of one text column that can matter for an example of `block_size` tokens.

    A token covers at most as many characters as its longest vocabulary entry (SentencePiece's "▁" and
    byte-level BPE's "Ġ" stand for one character; Llama 2's longest piece is 16 characters, Baichuan2's 32). So
    the first block_size x longest characters of a text hold at least block_size tokens, more than an example
    keeps; twice that leaves the tokens kept far from the cut, where the cut cannot change them. Texts are cut
    to it before tokenizing: a 64 MB article is not tokenized whole (16M tokens, gigabytes) to keep 1k."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * block_size * max(longest, 1)


def clip_text(value: str, budget: int) -> str:
    return value[:budget] if isinstance(value, str) and len(value) > budget else value


def tokenize_examples(batch: dict[str, list], build_prompt: Callable[[dict], dict[str, str]],
                      tokenizer: PreTrainedTokenizerBase, block_size: int, train_on_prompt: bool = False,
                      prefix_ids: list[int] | None = None, char_budget: int | None = None) -> dict[str, list]:
    """Tokenize a batch (dict of column lists) for datasets.map(batched=True).

    The whole text is tokenized once per example, so an example that fits decodes back to exactly
    head + body + tail + response. Where the parts start and end inside those ids is found by tokenizing
    head, head + tail, and head + tail + response or head + body + tail (whichever leaves out more text).
    Text columns are first cut to `char_budget` characters (default: text_budget), which changes no kept token.
    Returns input_ids, labels and per-example statistics columns (names starting with "stat_")."""
    if prefix_ids is None:
        prefix_ids = leading_special_ids(tokenizer)
    if char_budget is None:
        char_budget = text_budget(tokenizer, block_size)
    eos_id = tokenizer.eos_token_id
    size = len(next(iter(batch.values())))
    parts = [build_prompt({name: clip_text(values[index], char_budget) for name, values in batch.items()})
             for index in range(size)]

    fast = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None

    def encode(texts):
        if fast is not None:  # straight to the Rust tokenizer: no offsets, no per-text dicts
            return [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    full_ids = encode([full_text(p) for p in parts])
    head_lengths = [len(ids) for ids in encode([p["head"] for p in parts])]
    head_tail_lengths = [len(ids) for ids in encode([p["head"] + p["tail"] for p in parts])]
    # One more, shorter tokenization locates the body/response split: head + tail + response when the body is
    # the long part (articles), head + body + tail when the response is (support answers).
    body_is_longer = sum(len(p["body"]) for p in parts) >= sum(len(p["response"]) for p in parts)
    if body_is_longer:
        probe_ids = encode([p["head"] + p["tail"] + p["response"] for p in parts])
    else:
        probe_ids = encode([p["head"] + p["body"] + p["tail"] for p in parts])

    out = {"input_ids": [], "labels": [], "stat_prompt_cut": [], "stat_response_cut": [], "stat_misaligned": []}
    for ids, n_head, n_head_tail, probe in zip(full_ids, head_lengths, head_tail_lengths, probe_ids, strict=True):
        n_tail = n_head_tail - n_head
        # The part found both ways must have the same ids; if not, a part boundary falls inside a token
        # (see the module docstring) and the label mask may be off by a token.
        if body_is_longer:
            n_response = len(probe) - n_head_tail
            misaligned = n_response > 0 and ids[len(ids) - n_response:] != probe[n_head_tail:]
        else:
            n_response = len(ids) - len(probe)
            misaligned = ids[:len(probe)] != probe
        n_body = max(len(ids) - n_head - n_tail - n_response, 0)
        out["stat_misaligned"].append(misaligned)

        head = ids[:n_head]
        body = ids[n_head:n_head + n_body]
        tail = ids[n_head + n_body:n_head + n_body + n_tail]
        response = ids[n_head + n_body + n_tail:]
        room = block_size - len(prefix_ids) - n_head - n_tail - 1  # 1 for EOS
        prompt_cut = response_cut = False
        if n_body + len(response) > room:
            if len(response) <= room:
                body = body[:room - len(response)]  # keep the start of the article / question
                prompt_cut = True
            else:
                # The response alone does not fit: drop the body, keep the start of the response. No EOS,
                # since the answer does not end there.
                if room < 0:
                    raise FinetuneError(
                        f"--block-size {block_size} is too small to hold the prompt wrapper plus one response token "
                        f"(needs at least {block_size - room})")
                body, response = [], response[:room + 1]
                prompt_cut, response_cut = n_body > 0, True
        prompt = prefix_ids + head + body + tail
        target = response if response_cut else response + [eos_id]
        out["input_ids"].append(prompt + target)
        out["labels"].append(prompt + target if train_on_prompt else [IGNORE_INDEX] * len(prompt) + target)
        out["stat_prompt_cut"].append(prompt_cut)
        out["stat_response_cut"].append(response_cut)
    return out


def split_train_validation(raw: DatasetDict, seed: int = 0, validation_fraction: float = 0.05) -> DatasetDict:
    """Keep the source's train/validation splits; otherwise carve a seeded validation split out of train."""
    from datasets import DatasetDict

    if "train" not in raw:
        raise FinetuneError(f"the data set has no 'train' split (splits: {', '.join(raw) or 'none'})")
    if "validation" in raw:
        return DatasetDict(train=raw["train"], validation=raw["validation"])
    train = raw["train"]
    if validation_fraction <= 0 or len(train) < 2:
        return DatasetDict(train=train)
    num_validation = min(max(1, round(len(train) * validation_fraction)), len(train) - 1)
    split = train.train_test_split(test_size=num_validation, seed=seed, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


def check_columns(raw: DatasetDict, recipe_name: str, columns: list[str]) -> None:
    for split_name, split in raw.items():
        if len(split) == 0:
            raise FinetuneError(f"split '{split_name}' of the data set is empty")
        missing = [name for name in columns if name not in split.column_names]
        if missing:
            raise FinetuneError(f"the {recipe_name} recipe needs column(s) {', '.join(missing)}; "
                               f"the data set has {', '.join(split.column_names) or 'no columns'}")
        for name in columns:
            dtype = getattr(split.features[name], "dtype", None)
            if dtype not in ("string", "large_string"):
                raise FinetuneError(f"column '{name}' must hold text, but it holds {dtype or split.features[name]}")


def percentile(sorted_values: list[int], fraction: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))]


def prepare(recipe_name: str, recipe: dict, tokenizer: PreTrainedTokenizerBase, raw_dataset_dict: DatasetDict,
            block_size: int = 1024, train_on_prompt: bool = False, seed: int = 0,
            validation_fraction: float = 0.05, max_examples: int | None = None) -> tuple[DatasetDict, dict]:
    """Tokenize raw_dataset_dict (a DatasetDict of text columns) with `recipe` (its build_prompt and columns).

    Returns (DatasetDict with columns input_ids and labels, report dict)."""
    import numpy as np
    import pyarrow.compute as pc

    if block_size < 1:
        raise FinetuneError(f"--block-size must be positive, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise FinetuneError("the tokenizer has no EOS token")
    if max_examples:  # cap the source before splitting, so a quick try keeps the usual train/validation shape
        raw_dataset_dict = raw_dataset_dict.__class__(
            {name: split.select(range(min(max_examples, len(split)))) for name, split in raw_dataset_dict.items()})
    raw = split_train_validation(raw_dataset_dict, seed=seed, validation_fraction=validation_fraction)
    check_columns(raw, recipe_name, recipe["columns"])

    prefix_ids = leading_special_ids(tokenizer)
    columns = recipe["columns"]
    started = time.perf_counter()
    try:
        tokenized = raw.map(
            tokenize_examples,
            batched=True,
            batch_size=1000,
            fn_kwargs=dict(build_prompt=recipe["build_prompt"], tokenizer=tokenizer, block_size=block_size,
                           train_on_prompt=train_on_prompt, prefix_ids=prefix_ids,
                           char_budget=text_budget(tokenizer, block_size)),
            remove_columns=raw["train"].column_names,
            desc=f"tokenizing ({recipe_name})",
        )
    except TypeError as problem:  # e.g. None in a text column
        raise FinetuneError(f"could not build prompts from columns {', '.join(columns)}: {problem}") from None
    seconds = time.perf_counter() - started

    report = {"made_by": MADE_BY, "recipe": recipe_name, "block_size": block_size, "train_on_prompt": train_on_prompt,
              "eos_token_id": tokenizer.eos_token_id, "bos_prefix_ids": prefix_ids, "splits": {}}
    total_tokens = 0
    for name, split in tokenized.items():
        # Column-wise Arrow arithmetic: no Python loop over tokens, even for hundreds of thousands of examples.
        table = split.data.table
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
        targets = int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE_INDEX)).as_py() or 0)
        ordered = np.sort(lengths).tolist()
        report["splits"][name] = {
            "examples": len(split),
            "tokens": int(lengths.sum()),
            "target_tokens": targets,
            "length_p50": percentile(ordered, 0.50),
            "length_p90": percentile(ordered, 0.90),
            "length_p99": percentile(ordered, 0.99),
            "length_max": ordered[-1] if ordered else 0,
            "prompt_truncated": int(pc.sum(table.column("stat_prompt_cut")).as_py() or 0),
            "response_truncated": int(pc.sum(table.column("stat_response_cut")).as_py() or 0),
            "misaligned_boundaries": int(pc.sum(table.column("stat_misaligned")).as_py() or 0),
        }
        total_tokens += int(lengths.sum())
    return finish_report(tokenized, report, total_tokens, seconds)


def finish_report(tokenized: DatasetDict, report: dict, total_tokens: int,
                  seconds: float) -> tuple[DatasetDict, dict]:
    """The tokenising speed into the report, and the per-example `stat_*` bookkeeping columns out of the rows."""
    report["tokenize_seconds"] = round(seconds, 3)
    report["tokens_per_second"] = round(total_tokens / seconds) if seconds > 0 else None
    stat_columns = [name for name in tokenized["train"].column_names if name.startswith("stat_")]
    return tokenized.remove_columns(stat_columns), report


def format_report(report: dict) -> str:
    lines = [f"recipe {report['recipe']}, block size {report['block_size']}, "
             f"loss on {'prompt and response' if report['train_on_prompt'] else 'response + EOS only'}"]
    for name, stats in report["splits"].items():
        lines.append(
            f"  {name:<10} {stats['examples']:>8} examples  {stats['tokens']:>11} tokens  "
            f"{stats['target_tokens']:>10} target tokens  length p50/p90/p99/max "
            f"{stats['length_p50']}/{stats['length_p90']}/{stats['length_p99']}/{stats['length_max']}  "
            f"prompt truncated {stats['prompt_truncated']}  response truncated {stats['response_truncated']}")
        if stats["misaligned_boundaries"]:
            lines.append(f"  warning: {stats['misaligned_boundaries']} {name} examples have a prompt/response boundary "
                         "inside a token; start recipe parts with a space or newline")
    if report.get("tokens_per_second"):
        lines.append(f"  tokenized in {report['tokenize_seconds']:.2f} s ({report['tokens_per_second']} tokens/s)")
    return "\n".join(lines)
