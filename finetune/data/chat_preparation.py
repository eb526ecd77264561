"""The chat recipe of prepare_dataset.py: conversations to training rows (finetune/data/chat.py lays them out).

Every source split is first checked and turned into one `messages` column (role/content), so that sources with
`messages` and with `conversations` can be mixed; then each conversation becomes one row, or none when nothing
is left to learn after truncation. The report counts what truncation did.
"""
import time
from typing import TYPE_CHECKING

from finetune.data.chat import IGNORE_INDEX, ChatFormat, chat_format, conversation_of, fit_conversation
from finetune.data.output import MADE_BY
from finetune.data.preparation import finish_report, percentile, split_train_validation
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features
    from transformers import PreTrainedTokenizerBase


def messages_features() -> "Features":
    from datasets import Features, Value

    return Features({"messages": [{"role": Value("string"), "content": Value("string")}]})


def _checked_batch(batch, indices, split_name):
    rows = [{name: values[position] for name, values in batch.items()} for position in range(len(indices))]
    return {"messages": [conversation_of(row, f"row {index} of split '{split_name}'")
                         for row, index in zip(rows, indices, strict=True)]}


def normalize_conversations(split: "Dataset", split_name: str = "train") -> "Dataset":
    """`split` with one column, `messages`, of checked conversations; FinetuneError names the first bad row."""
    if not {"messages", "conversations"} & set(split.column_names):
        raise FinetuneError(f"the chat recipe needs a 'messages' or 'conversations' column; split '{split_name}' "
                            f"has {', '.join(split.column_names) or 'no columns'}")
    if len(split) == 0:
        raise FinetuneError(f"split '{split_name}' of the data set is empty")
    return split.map(_checked_batch, batched=True, with_indices=True, fn_kwargs=dict(split_name=split_name),
                     remove_columns=split.column_names, features=messages_features(), desc="checking conversations")


def tokenize_conversations(batch: dict, fmt: ChatFormat, block_size: int, last_only: bool) -> dict:
    """datasets.map(batched=True): one row per conversation that keeps a target, with statistics columns."""
    out = {"input_ids": [], "labels": [], "stat_rounds_dropped": [], "stat_reply_cut": [], "stat_prompt_tokens": []}
    for messages in batch["messages"]:
        fitted = fit_conversation(fmt, messages, block_size, last_only)
        if fitted is None:
            continue
        ids, labels, dropped, reply_cut = fitted
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["stat_rounds_dropped"].append(dropped)
        out["stat_reply_cut"].append(int(reply_cut))
        out["stat_prompt_tokens"].append(sum(label == IGNORE_INDEX for label in labels))
    return out


def split_stats(split: "Dataset", conversations: int) -> dict:
    lengths = sorted(len(ids) for ids in split["input_ids"])
    dropped_rounds = split["stat_rounds_dropped"]
    return {
        "conversations": conversations,
        "examples": len(split),
        "tokens": sum(lengths),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in split["labels"]),
        "length_p50": percentile(lengths, 0.50), "length_p90": percentile(lengths, 0.90),
        "length_p99": percentile(lengths, 0.99), "length_max": lengths[-1] if lengths else 0,
        "conversations_with_rounds_dropped": sum(1 for count in dropped_rounds if count),
        "rounds_dropped": sum(dropped_rounds),
        "replies_cut": sum(split["stat_reply_cut"]),
        "conversations_dropped": conversations - len(split),
        # the keys every recipe's report has (format_report prints them)
        "prompt_truncated": sum(1 for count in dropped_rounds if count),
        "response_truncated": sum(split["stat_reply_cut"]),
        "misaligned_boundaries": 0,
    }


def prepare_chat(tokenizer: "PreTrainedTokenizerBase", raw_dataset_dict: "DatasetDict", block_size: int = 1024,
                 chat_format_name: str = "auto", train_on_turns: str = "all", seed: int = 0,
                 validation_fraction: float = 0.05, max_examples: int | None = None) -> tuple["DatasetDict", dict]:
    """(DatasetDict with input_ids and labels, report) of the conversations in raw_dataset_dict."""
    from datasets import DatasetDict

    if block_size < 2:
        raise FinetuneError(f"--block-size must be at least 2 for conversations, got {block_size}")
    fmt = chat_format(tokenizer, chat_format_name)
    if max_examples:
        raw_dataset_dict = DatasetDict({name: split.select(range(min(max_examples, len(split))))
                                        for name, split in raw_dataset_dict.items()})
    checked = DatasetDict({name: normalize_conversations(split, name) for name, split in raw_dataset_dict.items()})
    raw = split_train_validation(checked, seed=seed, validation_fraction=validation_fraction)
    started = time.perf_counter()
    tokenized = raw.map(tokenize_conversations, batched=True, batch_size=256, remove_columns=["messages"],
                        fn_kwargs=dict(fmt=fmt, block_size=block_size, last_only=train_on_turns == "last"),
                        desc=f"tokenizing conversations ({fmt.name})")
    seconds = time.perf_counter() - started
    report = {"made_by": MADE_BY, "recipe": "chat", "chat_format": fmt.name, "train_on_turns": train_on_turns,
              "block_size": block_size, "train_on_prompt": False, "eos_token_id": tokenizer.eos_token_id,
              "end_of_turn_ids": fmt.end_of_turn_ids(), "splits": {}}
    for name, split in tokenized.items():
        report["splits"][name] = split_stats(split, len(raw[name]))
    if not len(tokenized["train"]):
        raise FinetuneError(f"no conversation keeps a reply to learn within --block-size {block_size}")
    return finish_report(tokenized, report, sum(stats["tokens"] for stats in report["splits"].values()), seconds)


def format_chat_report(report: dict) -> str:
    """The chat-specific lines printed under the common report."""
    lines = [f"  chat format {report['chat_format']}, targets: {report['train_on_turns']} assistant replies + "
             f"end-of-turn ids {report['end_of_turn_ids']}"]
    for name, stats in report["splits"].items():
        lines.append(f"  {name:<10} {stats['conversations']} conversations: {stats['rounds_dropped']} oldest rounds "
                     f"dropped in {stats['conversations_with_rounds_dropped']}, {stats['replies_cut']} replies cut "
                     f"at their end, {stats['conversations_dropped']} dropped with no reply left to learn")
    return "\n".join(lines)
