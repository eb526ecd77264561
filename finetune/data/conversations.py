"""Conversations as data sets carry them, checked and put in one form for every chat format.

A row holds `messages` (OpenAI style: role system/user/assistant/tool, `content` as text or a list of text parts,
assistant `reasoning_content` and `tool_calls`, tool `tool_call_id`/`name`) or ShareGPT `conversations` (from
system/human/gpt, value), and optionally a `tools` list of function schemas. What comes out is
{"messages": [...], "tools": [...] or None} where every message has `role` and `content` (text, maybe empty for an
assistant turn that only calls tools), assistant reasoning in `reasoning_content` (a leading <think>...</think>
block of the content moves there), and tool-call arguments as objects.

A conversation that cannot be used raises BadConversation with a short reason (counted by reason in the
preparation's report, so one bad row never stops a data set) and a message naming the row and the message.
"""
import json

from finetune.errors import FinetuneError

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class BadConversation(FinetuneError):
    """A conversation that cannot be laid out; `reason` is a short key for the report's counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _text(content: object, where: str) -> str:
    """Message content as text: a string, or OpenAI content parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadConversation("non_text_content", f"{where}, content part {number}: a {kind!r} part; "
                                                          "only text parts can be trained on")
            pieces.append(part["text"])
        return "".join(pieces)
    raise BadConversation("bad_content", f"{where}: content must be text or a list of text parts, got "
                                         f"{type(content).__name__}")


def _split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of content that opens with a <think>...</think> block (Qwen3, DeepSeek-R1 data)."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN) or THINK_CLOSE not in stripped:
        return None, content
    reasoning, answer = stripped[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def _tool_calls(calls: object, where: str) -> list[dict]:
    """Tool calls as {"type": "function", "function": {"name", "arguments": object}} (arguments given as a JSON
    string are parsed: templates lay them out themselves)."""
    if not isinstance(calls, list) or not calls:
        raise BadConversation("bad_tool_calls", f"{where}: tool_calls must be a non-empty list")
    normalised = []
    for number, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BadConversation("bad_tool_calls", f"{where}, tool call {number}: no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise BadConversation("bad_tool_calls", f"{where}, tool call {number}: arguments are not valid "
                                                        "JSON") from None
        if not isinstance(arguments, dict):
            raise BadConversation("bad_tool_calls", f"{where}, tool call {number}: arguments must be an object")
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        normalised.append(entry)
    return normalised


def _message(message: object, number: int, where: str, sharegpt: bool) -> dict:
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    at = f"{where}, message {number}"
    if not isinstance(message, dict):
        raise BadConversation("bad_message", f"{at}: must be an object with '{role_key}' and '{text_key}'")
    role = message.get(role_key)
    role = SHAREGPT_ROLES.get(role) if sharegpt else role if role in ROLES else None
    if role is None:
        expected = ", ".join(SHAREGPT_ROLES if sharegpt else ROLES)
        raise BadConversation("unknown_role", f"{at}: unknown role {message.get(role_key)!r}; expected one of "
                                              f"{expected} (in '{role_key}')")
    content = _text(message.get(text_key), at)
    out = {"role": role, "content": content}
    if role == "assistant":
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadConversation("bad_content", f"{at}: reasoning_content must be text")
        if reasoning is None:
            reasoning, content = _split_think(content)
            out["content"] = content
        if reasoning and reasoning.strip():
            out["reasoning_content"] = reasoning
        if message.get("tool_calls"):
            out["tool_calls"] = _tool_calls(message["tool_calls"], at)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    if not out["content"].strip() and not out.get("tool_calls"):
        raise BadConversation("empty_content", f"{at}: '{text_key}' is empty")
    return out


def check_turn_order(messages: list[dict], where: str = "the conversation") -> None:
    """An optional system prompt first, then a user turn; an assistant turn answers a user turn or tool results;
    tool results follow an assistant turn that called tools (or other tool results)."""
    previous = None
    for number, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            ok = number == 0
        elif role == "user":
            ok = previous in (None, "system", "assistant")
        elif role == "assistant":
            ok = previous in ("user", "tool")
        else:  # tool
            ok = previous == "tool" or (previous == "assistant" and bool(messages[number - 1].get("tool_calls")))
        if not ok:
            raise BadConversation("turn_order", f"{where}, message {number}: a {role} turn cannot follow "
                                                f"{previous or 'the start'} (a system prompt may come first only; "
                                                "users and assistants take turns, user first; tool results follow "
                                                "a tool call)")
        previous = role


def conversation_of(row: dict, where: str = "a row", need_reply: bool = True) -> dict:
    """{"messages", "tools"} of a row with `messages` or `conversations`; BadConversation names what is wrong.
    A training row needs an assistant turn; a prompt (`need_reply=False`) need not have one."""
    if row.get("messages") is not None:
        raw, sharegpt = row["messages"], False
    elif row.get("conversations") is not None:
        raw, sharegpt = row["conversations"], True
    else:
        raise BadConversation("no_messages", f"{where} has neither a 'messages' nor a 'conversations' list")
    if not isinstance(raw, list):
        raise BadConversation("bad_message", f"{where}: its messages must be a list, got {type(raw).__name__}")
    messages = [_message(message, number, where, sharegpt) for number, message in enumerate(raw)]
    if not any(message["role"] == "user" for message in messages):
        raise BadConversation("no_user_turn", f"{where} has no user turn")
    check_turn_order(messages, where)
    if need_reply and not any(message["role"] == "assistant" for message in messages):
        raise BadConversation("no_assistant_turn", f"{where} has no assistant turn, so nothing to learn")
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except ValueError:
            raise BadConversation("bad_tools", f"{where}: 'tools' is not valid JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadConversation("bad_tools", f"{where}: 'tools' must be a list of function schemas")
    return {"messages": messages, "tools": tools or None}


def uses_tools(conversation: dict) -> bool:
    return bool(conversation.get("tools")) or any(
        message["role"] == "tool" or message.get("tool_calls") for message in conversation["messages"])


def cap_lengths(conversation: dict, most_characters: int) -> tuple[dict, int]:
    """The conversation with every text cut to `most_characters` (a text that long is past any block anyway: a
    reply is then cut at its end, a longer context cannot fit); and how many texts were cut. Tokenizing a 50 MB
    message whole would take minutes and gigabytes for nothing."""
    cut, messages = 0, []
    for message in conversation["messages"]:
        message = dict(message)
        for key in ("content", "reasoning_content"):
            if isinstance(message.get(key), str) and len(message[key]) > most_characters:
                message[key], cut = message[key][:most_characters], cut + 1
        messages.append(message)
    return {**conversation, "messages": messages}, cut
