"""finetune/data/conversations.py: rows of conversations checked and put in one form for every chat format."""
import pytest

from finetune.data.conversations import BadConversation, cap_lengths, check_turn_order, conversation_of, uses_tools


def test_a_leading_think_block_becomes_reasoning_and_explicit_reasoning_is_kept():
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "<think>\nfirst this\n</think>\n\nThe answer."},
                        {"role": "user", "content": "and?"},
                        {"role": "assistant", "content": "More.", "reasoning_content": "then that"}]}
    messages = conversation_of(row)["messages"]
    assert messages[1] == {"role": "assistant", "content": "The answer.", "reasoning_content": "first this"}
    assert messages[3]["reasoning_content"] == "then that" and messages[3]["content"] == "More."


def test_tool_calls_are_normalised_and_tool_results_follow_them():
    row = {"tools": '[{"type": "function", "function": {"name": "get_weather"}}]', "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "mild", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Mild."}]}
    conversation = conversation_of(row)
    assert conversation["tools"] == [{"type": "function", "function": {"name": "get_weather"}}]
    assert conversation["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"a": 1}}, "id": "c1"}]}
    assert uses_tools(conversation)
    for bad, reason in [('{"a": ', "bad_tool_calls"), ("[1]", "bad_tool_calls")]:
        broken = {"messages": [row["messages"][0], {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": bad}}]}]}
        with pytest.raises(BadConversation) as raised:
            conversation_of(broken)
        assert raised.value.reason == reason


def test_turn_order_allows_tool_results_only_after_a_call():
    check_turn_order([{"role": "system"}, {"role": "user"}, {"role": "assistant", "tool_calls": [{}]},
                      {"role": "tool"}, {"role": "tool"}, {"role": "assistant"}])
    with pytest.raises(BadConversation, match="message 2: a tool turn cannot follow assistant"):
        check_turn_order([{"role": "user"}, {"role": "assistant"}, {"role": "tool"}])
    with pytest.raises(BadConversation, match="message 1: a system turn cannot follow user"):
        check_turn_order([{"role": "user"}, {"role": "system"}])


def test_texts_past_the_cap_are_cut_and_counted():
    conversation = {"messages": [{"role": "user", "content": "x" * 100},
                                 {"role": "assistant", "content": "y" * 10, "reasoning_content": "z" * 50}],
                    "tools": None}
    capped, cut = cap_lengths(conversation, 40)
    assert cut == 2 and [len(m["content"]) for m in capped["messages"]] == [40, 10]
    assert len(capped["messages"][1]["reasoning_content"]) == 40
    assert len(conversation["messages"][0]["content"]) == 100  # the input is left as it was
