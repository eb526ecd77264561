"""finetune/data/chat_preparation.py: conversations checked, tokenised, and truncation counted."""
import pytest
from datasets import Dataset, DatasetDict
from test_chat import rounds, word_tokenizer, write_jsonl

from finetune.data.chat import chat_format
from finetune.data.chat_preparation import (
    format_chat_report,
    normalize_conversations,
    prepare_chat,
    tokenize_conversations,
)
from finetune.errors import FinetuneError


def test_prepare_chat_counts_what_truncation_did(tmp_path):
    from datasets import load_dataset

    rows = [{"messages": rounds(3)}, {"messages": rounds(1)}, {"messages": rounds(2, reply_words=30)},
            {"messages": rounds(1, user_words=30)}]
    raw = load_dataset("json", data_files={"train": write_jsonl(tmp_path / "c.jsonl", rows)})
    dataset, report = prepare_chat(word_tokenizer(), raw, block_size=20, chat_format_name="baichuan2",
                                   validation_fraction=0)
    stats = report["splits"]["train"]
    assert (stats["conversations"], stats["examples"], stats["conversations_dropped"]) == (4, 3, 1)
    assert (stats["rounds_dropped"], stats["conversations_with_rounds_dropped"], stats["replies_cut"]) == (2, 2, 1)
    assert max(len(ids) for ids in dataset["train"]["input_ids"]) == 20
    assert all(any(label != -100 for label in labels[1:]) for labels in dataset["train"]["labels"])


def test_sharegpt_and_messages_rows_become_the_same_messages_column():
    sharegpt = Dataset.from_dict({"conversations": [[{"from": "system", "value": "w1"},
                                                     {"from": "human", "value": "w3"},
                                                     {"from": "gpt", "value": "w5 w6"}]],
                                  "id": ["row-0"]})
    checked = normalize_conversations(sharegpt)
    assert checked.column_names == ["messages"]
    assert checked[0]["messages"] == [{"role": "system", "content": "w1"}, {"role": "user", "content": "w3"},
                                      {"role": "assistant", "content": "w5 w6"}]


def test_splits_without_conversations_are_refused_naming_the_split():
    with pytest.raises(FinetuneError, match="needs a 'messages' or 'conversations' column; split 'test' has text"):
        normalize_conversations(Dataset.from_dict({"text": ["w1"]}), "test")
    with pytest.raises(FinetuneError, match="split 'train' of the data set is empty"):
        normalize_conversations(Dataset.from_dict({"messages": []}))
    bad = Dataset.from_dict({"messages": [rounds(1), [{"role": "user", "content": "w1"}]]})
    with pytest.raises(FinetuneError, match="row 1 of split 'validation' has no assistant turn"):
        normalize_conversations(bad, "validation")


def test_each_kept_conversation_is_one_row_with_its_statistics():
    fmt = chat_format(word_tokenizer(), "baichuan2")
    out = tokenize_conversations({"messages": [rounds(1), rounds(2, reply_words=30)]}, fmt, block_size=12,
                                 last_only=False)
    # rounds(1): 2 system + [195] 3 words [196] 3 words + EOS = 11 tokens, all kept; rounds(2, 30-word replies):
    # the oldest round dropped, the last reply cut to fill the block.
    assert [len(ids) for ids in out["input_ids"]] == [11, 12]
    assert out["stat_rounds_dropped"] == [0, 1] and out["stat_reply_cut"] == [0, 1]
    assert out["stat_prompt_tokens"] == [sum(label == -100 for label in labels) for labels in out["labels"]]
    assert fmt.encode(rounds(1))[:2] == (out["input_ids"][0], out["labels"][0])


def test_a_block_size_below_2_is_one_line():
    rows = Dataset.from_dict({"messages": [rounds(1)]})
    with pytest.raises(FinetuneError, match="--block-size must be at least 2 for conversations, got 1"):
        prepare_chat(word_tokenizer(), {"train": rows}, block_size=1, chat_format_name="baichuan2")


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "bug: when truncation drops every conversation of a split, tokenize_conversations' map leaves a split with no "
    "columns and split_stats() reads split['input_ids'] before prepare_chat's own check, so prepare_dataset.py "
    "chat ends with a traceback (ValueError: Column 'input_ids' doesn't exist) instead of the one error line"))
def test_no_reply_left_to_learn_is_one_line():
    rows = Dataset.from_dict({"messages": [rounds(1, user_words=30)] * 3})  # no prompt fits in 10 tokens
    with pytest.raises(FinetuneError, match="no conversation keeps a reply to learn within --block-size 10"):
        prepare_chat(word_tokenizer(), DatasetDict(train=rows), block_size=10, chat_format_name="baichuan2",
                     validation_fraction=0)


def test_the_report_lines_say_what_truncation_did():
    report = {"chat_format": "baichuan2", "train_on_turns": "all", "end_of_turn_ids": [2],
              "splits": {"train": {"conversations": 4, "rounds_dropped": 2, "conversations_with_rounds_dropped": 2,
                                   "replies_cut": 1, "conversations_dropped": 1}}}
    assert format_chat_report(report).splitlines() == [
        "  chat format baichuan2, targets: all assistant replies + end-of-turn ids [2]",
        "  train      4 conversations: 2 oldest rounds dropped in 2, 1 replies cut at their end, 1 dropped with no "
        "reply left to learn"]
