"""The chat recipe of prepare_dataset.py: conversations to training examples, by the rule of finetune/data/chat.py.

Every source split is first checked and put in one form (`conversation`, JSON text: messages and tools), so that
sources with `messages` and with `conversations` can be mixed. A conversation that cannot be used is dropped and
counted by reason (its row numbers in the report); --strict makes the first one an error instead.

Each conversation becomes one or more examples (ChatFormat.examples in finetune/data/chat.py); what happened to
its replies is counted in the report.
"""
import json
import time
from collections import Counter
from typing import TYPE_CHECKING

from finetune.data.chat import IGNORE_INDEX, ChatFormat, chat_format
from finetune.data.conversations import BadConversation, cap_lengths, conversation_of
from finetune.data.output import MADE_BY
from finetune.data.preparation import finish_report, percentile, split_train_validation
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

CHARACTERS_PER_TOKEN_CAP = 64  # texts longer than 64 characters per --block-size token are cut before tokenizing
SHOWN_ROWS = 5  # row numbers kept in the report per reason a conversation was dropped


def _checked_batch(batch, indices, split_name):
    out = {"conversation": [], "problem": [], "row": list(indices)}
    for position, index in enumerate(indices):
        row = {name: values[position] for name, values in batch.items()}
        try:
            out["conversation"].append(json.dumps(conversation_of(row, f"row {index} of split '{split_name}'")))
            out["problem"].append("")
        except BadConversation as bad:
            out["conversation"].append("")
            out["problem"].append(json.dumps([bad.reason, str(bad)]))
    return out


def normalize_conversations(split: "Dataset", split_name: str = "train") -> "Dataset":
    """`split` as the columns `conversation` (checked, JSON text; empty for a bad row), `problem` (JSON [reason,
    message] of a bad row) and `row` (its number in the source split)."""
    if "conversation" in split.column_names and "problem" in split.column_names:
        return split  # already checked (a source of a mixture)
    if not {"messages", "conversations"} & set(split.column_names):
        raise FinetuneError(f"the chat recipe needs a 'messages' or 'conversations' column; split '{split_name}' "
                            f"has {', '.join(split.column_names) or 'no columns'}")
    if len(split) == 0:
        raise FinetuneError(f"split '{split_name}' of the data set is empty")
    return split.map(_checked_batch, batched=True, with_indices=True, fn_kwargs=dict(split_name=split_name),
                     remove_columns=split.column_names, desc="checking conversations")


def _drop_bad_rows(split: "Dataset", split_name: str, strict: bool) -> tuple["Dataset", dict]:
    """(the usable rows, {reason: [count, row numbers]}) of a checked split; under --strict the first bad row is
    the error."""
    problems = [(json.loads(problem), row) for problem, row in zip(split["problem"], split["row"], strict=True)
                if problem]
    if problems and strict:
        raise FinetuneError(problems[0][0][1])
    drops = {}
    for (reason, _), row in problems:
        count, rows = drops.setdefault(reason, [0, []])
        drops[reason][0] = count + 1
        if len(rows) < SHOWN_ROWS:
            rows.append(row)
    return (split.filter(lambda problem: not problem, input_columns="problem") if problems else split), drops


def _add_drops(summary: dict, drops: dict) -> None:
    for reason, (count, rows) in drops.items():
        summary["conversations"] += count
        summary["conversations_dropped"] += count
        summary["dropped_by_reason"][reason] = summary["dropped_by_reason"].get(reason, 0) + count
        summary["dropped_rows"][reason] = sorted(summary["dropped_rows"].get(reason, []) + rows)[:SHOWN_ROWS]


def tokenize_split(fmt: ChatFormat, split: "Dataset", split_name: str, block_size: int, last_only: bool,
                   strict: bool) -> tuple[dict, dict]:
    """({input_ids, labels} columns, statistics) of one checked split."""
    from tqdm import tqdm

    columns, stats, dropped, rows = {"input_ids": [], "labels": []}, Counter(), Counter(), {}

    def drop(reason, message, number):
        if strict:
            raise FinetuneError(message)
        dropped[reason] += 1
        rows.setdefault(reason, [])
        if len(rows[reason]) < SHOWN_ROWS:
            rows[reason].append(number)

    for text, problem, number in tqdm(zip(split["conversation"], split["problem"], split["row"], strict=True),
                                      total=len(split), desc=f"tokenizing conversations ({split_name}, {fmt.name})",
                                      disable=len(split) < 1000):
        if problem:
            drop(*json.loads(problem), number)
            continue
        conversation, cut = cap_lengths(json.loads(text), CHARACTERS_PER_TOKEN_CAP * block_size)
        stats["texts_cut_before_tokenizing"] += cut
        try:
            examples, counted = fmt.examples(conversation, block_size, last_only)
        except BadConversation as bad:
            drop(bad.reason, f"row {number} of split '{split_name}': {bad}", number)
            continue
        stats.update(counted)
        stats["conversations_in_several_examples"] += len(examples) > 1
        if not examples:
            drop("no_reply_fits", f"row {number} of split '{split_name}': no reply fits in --block-size {block_size}",
                 number)
        for ids, labels in examples:
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
    lengths = sorted(len(ids) for ids in columns["input_ids"])
    summary = {
        "conversations": len(split), "conversations_dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped), "dropped_rows": rows,
        "examples": len(lengths), "tokens": sum(lengths),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in columns["labels"]),
        "length_p50": percentile(lengths, 0.50), "length_p90": percentile(lengths, 0.90),
        "length_p99": percentile(lengths, 0.99), "length_max": lengths[-1] if lengths else 0,
        **{key: stats[key] for key in ("replies", "replies_learned", "replies_cut", "replies_dropped_context_too_long",
                                       "replies_with_rounds_dropped", "conversations_in_several_examples",
                                       "replies_with_reasoning", "tool_call_replies", "texts_cut_before_tokenizing")},
        # the keys every recipe's report has (format_report prints them)
        "prompt_truncated": stats["replies_with_rounds_dropped"], "response_truncated": stats["replies_cut"],
        "misaligned_boundaries": 0,
    }
    return columns, summary


def prepare_chat(tokenizer: "PreTrainedTokenizerBase", raw_dataset_dict: "DatasetDict", block_size: int = 1024,
                 chat_format_name: str = "auto", train_on_turns: str = "all", seed: int = 0,
                 validation_fraction: float = 0.05, max_examples: int | None = None, reasoning: str = "auto",
                 strict: bool = False) -> tuple["DatasetDict", dict]:
    """(DatasetDict with input_ids and labels, report) of the conversations in raw_dataset_dict."""
    from datasets import Dataset, DatasetDict

    if block_size < 2:
        raise FinetuneError(f"--block-size must be at least 2 for conversations, got {block_size}")
    fmt = chat_format(tokenizer, chat_format_name, reasoning)
    if max_examples:
        raw_dataset_dict = DatasetDict({name: split.select(range(min(max_examples, len(split))))
                                        for name, split in raw_dataset_dict.items()})
    checked = DatasetDict({name: normalize_conversations(split, name) for name, split in raw_dataset_dict.items()})
    # Rows that are not conversations go before the validation split is carved out of the usable ones.
    early = {name: _drop_bad_rows(split, name, strict) for name, split in checked.items()}
    raw = split_train_validation(DatasetDict({name: kept for name, (kept, _) in early.items()}), seed=seed,
                                 validation_fraction=validation_fraction)
    started, tokenized = time.perf_counter(), {}
    report = {"made_by": MADE_BY, "recipe": "chat", "chat_format": fmt.name, "train_on_turns": train_on_turns,
              "reasoning": fmt.reasoning, "block_size": block_size, "train_on_prompt": False,
              "eos_token_id": tokenizer.eos_token_id, "end_of_turn_ids": fmt.end_of_turn_ids(), "splits": {}}
    for name, split in raw.items():
        columns, report["splits"][name] = tokenize_split(fmt, split, name, block_size, train_on_turns == "last",
                                                         strict)
        if name in early:
            _add_drops(report["splits"][name], early[name][1])
        tokenized[name] = Dataset.from_dict(columns)
    seconds = time.perf_counter() - started
    train = report["splits"]["train"]
    if not train["examples"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(train["dropped_by_reason"]).most_common())
        raise FinetuneError(f"no conversation of split 'train' could be laid out for training ({reasons or 'none'}); "
                            f"see --strict for the first one's own error")
    return finish_report(DatasetDict(tokenized), report,
                         sum(stats["tokens"] for stats in report["splits"].values()), seconds)


def format_chat_report(report: dict) -> str:
    """The chat-specific lines printed under the common report."""
    lines = [f"  chat format {report['chat_format']}, targets: {report['train_on_turns']} assistant replies + "
             f"end-of-turn ids {report['end_of_turn_ids']}; reasoning {report['reasoning']}"]
    for name, stats in report["splits"].items():
        lines.append(f"  {name:<10} {stats['conversations']} conversations, {stats['replies_learned']} of "
                     f"{stats['replies']} replies learned in {stats['examples']} examples: "
                     f"{stats['replies_with_rounds_dropped']} with the oldest rounds dropped, {stats['replies_cut']} "
                     f"cut at their end, {stats['replies_dropped_context_too_long']} with no room after their "
                     f"context; {stats['conversations_in_several_examples']} conversations in several examples; "
                     f"{stats['replies_with_reasoning']} replies with reasoning, {stats['tool_call_replies']} "
                     f"calling tools")
        for reason, count in stats["dropped_by_reason"].items():
            shown = ", ".join(map(str, stats["dropped_rows"].get(reason, [])))
            lines.append(f"  {name:<10} dropped {count} conversations: {reason} (rows {shown}"
                         f"{', ...' if count > len(stats['dropped_rows'].get(reason, [])) else ''})")
    return "\n".join(lines)
