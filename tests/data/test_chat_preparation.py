"""finetune/data/chat_preparation.py: conversations checked, tokenised, and truncation counted."""
import json

import pytest
from datasets import Dataset, DatasetDict
from test_chat import rounds, word_tokenizer, write_jsonl

from finetune.data.chat_preparation import format_chat_report, normalize_conversations, prepare_chat
from finetune.errors import FinetuneError


def test_prepare_chat_counts_what_truncation_did(tmp_path):
    from datasets import load_dataset

    rows = [{"messages": rounds(3)}, {"messages": rounds(1)}, {"messages": rounds(2, reply_words=30)},
            {"messages": rounds(1, user_words=30)}]
    raw = load_dataset("json", data_files={"train": write_jsonl(tmp_path / "c.jsonl", rows)})
    dataset, report = prepare_chat(word_tokenizer(baichuan_ids=True), raw, block_size=20,
                                   chat_format_name="baichuan2", validation_fraction=0)
    stats = report["splits"]["train"]
    # rounds(3) (27 tokens whole) and rounds(2, 30-word replies) keep each reply with the latest rounds that fit;
    # rounds(1, 30-word user turn) has no room for its reply after its context and is dropped.
    assert (stats["conversations"], stats["conversations_dropped"], stats["dropped_by_reason"]) == (
        4, 1, {"no_reply_fits": 1})
    assert (stats["replies"], stats["replies_learned"], stats["replies_dropped_context_too_long"]) == (7, 6, 1)
    assert stats["replies_cut"] == 2 and stats["replies_with_rounds_dropped"] >= 2
    assert max(len(ids) for ids in dataset["train"]["input_ids"]) == 20
    assert all(any(label != -100 for label in labels[1:]) for labels in dataset["train"]["labels"])


def test_sharegpt_and_messages_rows_become_the_same_messages_column():
    sharegpt = Dataset.from_dict({"conversations": [[{"from": "system", "value": "w1"},
                                                     {"from": "human", "value": "w3"},
                                                     {"from": "gpt", "value": "w5 w6"}]],
                                  "id": ["row-0"]})
    checked = normalize_conversations(sharegpt)
    assert sorted(checked.column_names) == ["conversation", "problem", "row"]
    assert json.loads(checked[0]["conversation"]) == {"messages": [
        {"role": "system", "content": "w1"}, {"role": "user", "content": "w3"},
        {"role": "assistant", "content": "w5 w6"}], "tools": None}


def test_splits_without_conversations_are_refused_naming_the_split():
    with pytest.raises(FinetuneError, match="needs a 'messages' or 'conversations' column; split 'test' has text"):
        normalize_conversations(Dataset.from_dict({"text": ["w1"]}), "test")
    with pytest.raises(FinetuneError, match="split 'train' of the data set is empty"):
        normalize_conversations(Dataset.from_dict({"messages": []}))
    bad = Dataset.from_dict({"messages": [rounds(1), [{"role": "user", "content": "w1"}]]})
    checked = normalize_conversations(bad, "validation")
    assert checked["problem"][0] == "" and json.loads(checked["problem"][1]) == [
        "no_assistant_turn", "row 1 of split 'validation' has no assistant turn, so nothing to learn"]


def test_a_block_size_below_2_is_one_line():
    rows = Dataset.from_dict({"messages": [rounds(1)]})
    with pytest.raises(FinetuneError, match="--block-size must be at least 2 for conversations, got 1"):
        prepare_chat(word_tokenizer(baichuan_ids=True), {"train": rows}, block_size=1, chat_format_name="baichuan2")


def test_no_reply_left_to_learn_is_one_line():
    rows = Dataset.from_dict({"messages": [rounds(1, user_words=30)] * 3})  # no prompt fits in 10 tokens
    with pytest.raises(FinetuneError, match=r"no conversation of split 'train' could be laid out for training "
                                            r"\(3 no_reply_fits\)"):
        prepare_chat(word_tokenizer(baichuan_ids=True), DatasetDict(train=rows), block_size=10,
                     chat_format_name="baichuan2", validation_fraction=0)


def test_the_report_lines_say_what_happened_to_the_replies_and_the_dropped_rows():
    stats = {"conversations": 9, "replies": 20, "replies_learned": 18, "examples": 11, "replies_with_rounds_dropped": 2,
             "replies_cut": 1, "replies_dropped_context_too_long": 2, "conversations_in_several_examples": 2,
             "replies_with_reasoning": 5, "tool_call_replies": 3,
             "dropped_by_reason": {"unknown_role": 7}, "dropped_rows": {"unknown_role": [1, 4, 8, 9, 12]}}
    report = {"chat_format": "template", "train_on_turns": "all", "end_of_turn_ids": [2], "reasoning": "template",
              "splits": {"train": stats}}
    assert format_chat_report(report).splitlines() == [
        "  chat format template, targets: all assistant replies + end-of-turn ids [2]; reasoning template",
        "  train      9 conversations, 18 of 20 replies learned in 11 examples: 2 with the oldest rounds dropped, 1 "
        "cut at their end, 2 with no room after their context; 2 conversations in several examples; 5 replies with "
        "reasoning, 3 calling tools",
        "  train      dropped 7 conversations: unknown_role (rows 1, 4, 8, 9, 12, ...)"]