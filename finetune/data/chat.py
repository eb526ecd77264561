"""Conversations in a model's own chat format, with the loss on every assistant reply and its end-of-turn token(s).

A conversation is a list of {"role", "content"} messages: an optional system prompt first, then user and
assistant turns taking turns, starting with a user turn. Rows hold it as `messages` (role/content) or as
ShareGPT-style `conversations` (from system/human/gpt, value).

Formats (--chat-format):
  baichuan2  Baichuan2's own fine-tuning layout: [195] user [196] reply per turn, no BOS, one EOS at the end;
             the EOS is learned after every reply (it is the label of the next user token). A system prompt is
             its text first, with no role token, as Baichuan2-Chat places it.
  llama2     Meta's Llama 2 chat layout, each exchange encoded on its own with BOS and EOS:
             BOS "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} " EOS (prompt and reply stripped;
             the system block only in the first exchange).
  template   the tokenizer's own chat_template (what apply_chat_template renders). A reply is what the rendering
             of the conversation up to that reply adds to the rendering of what came before it with the generation
             prompt; both must be token prefixes of the whole conversation, or the template is refused.
  auto       baichuan2 for Baichuan tokenizers, template where the tokenizer has a chat template, else llama2.

encode() returns the ids, the labels (-100 where no loss is taken) and, per position, the number of the reply
it is a target of (-1 for none): `--train-on-turns last` keeps the last reply's targets only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
CHAT_FORMATS = ("auto", "baichuan2", "llama2", "template")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID = 195, 196  # <reserved_106>, <reserved_107> of the release
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def conversation_of(row: dict, where: str = "a row", need_reply: bool = True) -> list[dict]:
    """The checked messages of a row with `messages` or `conversations`; FinetuneError names what is wrong.
    A training row needs an assistant turn; a prompt (`need_reply=False`) need not have one."""
    if row.get("messages") is not None:
        raw, role_key, text_key, roles = row["messages"], "role", "content", {r: r for r in ("system", "user", "assistant")}
    elif row.get("conversations") is not None:
        raw, role_key, text_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise FinetuneError(f"{where} has neither a 'messages' nor a 'conversations' list")
    if not isinstance(raw, list):
        raise FinetuneError(f"{where}: its messages must be a list, got {type(raw).__name__}")
    messages = []
    for number, message in enumerate(raw):
        if not isinstance(message, dict):
            raise FinetuneError(f"{where}, message {number}: must be an object with '{role_key}' and '{text_key}'")
        role, content = message.get(role_key), message.get(text_key)
        if role not in roles:
            raise FinetuneError(f"{where}, message {number}: unknown role {role!r}; expected one of "
                                f"{', '.join(roles)} (in '{role_key}')")
        if not isinstance(content, str):
            raise FinetuneError(f"{where}, message {number}: '{text_key}' must be text, got {type(content).__name__}")
        if not content.strip():
            raise FinetuneError(f"{where}, message {number}: '{text_key}' is empty")
        messages.append({"role": roles[role], "content": content})
    if not [message for message in messages if message["role"] != "system"]:
        raise FinetuneError(f"{where} has no user turn")
    check_turn_order(messages, where)
    if need_reply and not any(message["role"] == "assistant" for message in messages):
        raise FinetuneError(f"{where} has no assistant turn, so nothing to learn")
    return messages


def check_turn_order(messages: list[dict], where: str = "the conversation") -> None:
    """An optional system prompt first, then user and assistant turns taking turns, starting with a user turn."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for number, message in enumerate(turns):
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            at = number + len(messages) - len(turns)
            raise FinetuneError(f"{where}, message {at}: expected a {expected} turn, got {message['role']} (a system "
                                "prompt may come first only; then user and assistant take turns, user first)")


def split_rounds(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system messages, rounds): each round a user turn and the assistant reply to it (if any)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    return system, [turns[i:i + 2] for i in range(0, len(turns), 2)]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
class ChatFormat:
    """One chat layout over a tokenizer: training rows (encode) and generation prompts (prompt)."""

    name = ""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token_id is None:
            raise FinetuneError("the tokenizer has no EOS token; chat rows end every reply with one")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        """ids, labels and reply numbers of a conversation that ends with an assistant reply."""
        raise NotImplementedError

    def prompt(self, messages: list[dict]) -> list[int]:
        """ids of a conversation that ends with a user turn, up to where the reply starts."""
        raise NotImplementedError

    def end_of_turn_ids(self) -> list[int]:
        return [self.eos_id]


class Baichuan2Format(ChatFormat):
    name = "baichuan2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        vocab = len(tokenizer)
        if vocab <= BAICHUAN_ASSISTANT_ID:
            raise FinetuneError(f"the baichuan2 chat format uses token ids {BAICHUAN_USER_ID} and "
                                f"{BAICHUAN_ASSISTANT_ID}, but the tokenizer has only {vocab} ids")

    def _layout(self, messages):
        ids, labels, replies = [], [], []
        system, turns = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
        for message in system:
            text = self.text_ids(message["content"])
            ids, labels, replies = ids + text, labels + [IGNORE_INDEX] * len(text), replies + [-1] * len(text)
        reply = -1
        for message in turns:
            text = self.text_ids(message["content"])
            if message["role"] == "user":  # its role token's label is the EOS that ends the previous reply
                ends_reply = reply >= 0
                ids += [BAICHUAN_USER_ID] + text
                labels += [self.eos_id if ends_reply else IGNORE_INDEX] + [IGNORE_INDEX] * len(text)
                replies += [reply if ends_reply else -1] + [-1] * len(text)
            else:
                reply += 1
                ids += [BAICHUAN_ASSISTANT_ID] + text
                labels += [IGNORE_INDEX] + text
                replies += [-1] + [reply] * len(text)
        return ids, labels, replies, reply

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        ids, labels, replies, last = self._layout(messages)
        return ids + [self.eos_id], labels + [self.eos_id], replies + [last]

    def prompt(self, messages: list[dict]) -> list[int]:
        return self._layout(messages)[0] + [BAICHUAN_ASSISTANT_ID]


class Llama2Format(ChatFormat):
    name = "llama2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        if tokenizer.bos_token_id is None:
            raise FinetuneError("the llama2 chat format starts every exchange with BOS, but the tokenizer has none")
        self.bos_id = tokenizer.bos_token_id

    def _user_texts(self, messages):
        system, rounds = split_rounds(messages)
        users = [round_[0]["content"] for round_ in rounds]
        if system:  # Meta's layout folds the system prompt into the first user turn
            users[0] = B_SYS + system[0]["content"] + E_SYS + users[0]
        return users, [round_[1]["content"] if len(round_) > 1 else None for round_ in rounds]

    def _prompt_ids(self, user):
        return [self.bos_id] + self.text_ids(f"{B_INST} {user.strip()} {E_INST}")

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        ids, labels, replies = [], [], []
        for number, (user, answer) in enumerate(zip(*self._user_texts(messages), strict=False)):
            prompt = self._prompt_ids(user)
            exchange = [self.bos_id] + self.text_ids(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ") + [self.eos_id]
            if exchange[:len(prompt)] != prompt:
                raise FinetuneError("the tokenizer merges the end of '[/INST]' with the reply's first token, so the "
                                    "llama2 layout has no token boundary before the reply; use --chat-format template")
            reply = len(exchange) - len(prompt)
            ids += exchange
            labels += [IGNORE_INDEX] * len(prompt) + exchange[len(prompt):]
            replies += [-1] * len(prompt) + [number] * reply
        return ids, labels, replies

    def prompt(self, messages: list[dict]) -> list[int]:
        users, answers = self._user_texts(messages)
        history = self.encode(messages[:-1])[0] if len(users) > 1 else []
        return history + self._prompt_ids(users[-1])


class TemplateFormat(ChatFormat):
    name = "template"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise FinetuneError("--chat-format template: the tokenizer has no chat_template; use llama2 or baichuan2")
        self.special_ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as problem:  # templates raise their own errors (e.g. "System role not supported")
            message = str(problem).splitlines()[0] if str(problem) else problem.__class__.__name__
            raise FinetuneError(f"the tokenizer's chat_template refused the conversation: {message}") from None

    def _reply_span(self, full_text, full, messages, index):
        """(start, end) in `full` of the reply messages[index] and its end-of-turn token(s)."""
        before = self.render(messages[:index], True)
        through = self.render(messages[:index + 1], False)
        for text in (before, through):
            if not full_text.startswith(text):
                raise FinetuneError("the chat_template renders earlier turns differently once later turns follow "
                                    "(it rewrites past turns), so its assistant replies cannot be located; use "
                                    "--chat-format llama2 or a template that only appends")
        start, end = len(self.text_ids(before)), len(self.text_ids(through))
        if full[:end] != self.text_ids(through) or full[:start] != self.text_ids(before):
            raise FinetuneError("the chat_template's text before a reply ends inside a token of the whole "
                                "conversation, so the reply's first token cannot be located; use --chat-format llama2")
        while end > start + 1 and full[end - 1] not in self.special_ids and \
                not self.tokenizer.decode([full[end - 1]]).strip():
            end -= 1  # a newline after the end-of-turn token belongs to the layout, not the reply
        return start, end

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        full_text = self.render(messages, False)
        ids = self.text_ids(full_text)
        labels, replies = [IGNORE_INDEX] * len(ids), [-1] * len(ids)
        assistants = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        for number, index in enumerate(assistants):
            start, end = self._reply_span(full_text, ids, messages, index)
            labels[start:end] = ids[start:end]
            replies[start:end] = [number] * (end - start)
        return ids, labels, replies

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.text_ids(self.render(messages, True))

    def end_of_turn_ids(self) -> list[int]:
        """The special tokens the template puts after a reply (<|im_end|>, <|eot_id|>, ...), and EOS."""
        probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
        ids, labels, _ = self.encode(probe)
        ending = [token for token in labels if token != IGNORE_INDEX and token in self.special_ids]
        return list(dict.fromkeys(ending + [self.eos_id]))


FORMATS = {"baichuan2": Baichuan2Format, "llama2": Llama2Format, "template": TemplateFormat}


def is_baichuan_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    return "baichuan" in type(tokenizer).__name__.lower()


def chat_format(tokenizer: PreTrainedTokenizerBase, name: str = "auto") -> ChatFormat:
    """The ChatFormat called `name` over `tokenizer`; `auto` picks baichuan2, template or llama2 (see above)."""
    if name == "auto":
        if is_baichuan_tokenizer(tokenizer):
            name = "baichuan2"
        else:
            name = "template" if getattr(tokenizer, "chat_template", None) else "llama2"
    if name not in FORMATS:
        raise FinetuneError(f"unknown chat format {name!r}; expected one of {', '.join(CHAT_FORMATS)}")
    return FORMATS[name](tokenizer)


# ----------------------------------------------------------------------------------------------
# Training rows: targets and truncation
# ----------------------------------------------------------------------------------------------
def training_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to its last reply: user turns after it have nothing to learn."""
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last + 1]


def fit_conversation(fmt: ChatFormat, messages: list[dict], block_size: int,
                     last_only: bool = False) -> tuple[list[int], list[int], int, bool] | None:
    """(ids, labels, rounds dropped, reply cut) of a conversation in at most `block_size` tokens, or None when
    nothing is left to learn. Too long: the oldest complete rounds go first (the system prompt and the last reply
    stay); when the last round alone is too long, its reply is cut at its end."""
    system, rounds = split_rounds(training_messages(messages))

    def encoded(first_round):
        return fmt.encode(system + [message for round_ in rounds[first_round:] for message in round_])

    dropped, (ids, labels, replies) = 0, encoded(0)
    if len(ids) > block_size and len(rounds) > 1:
        low, high = 1, len(rounds) - 1  # the fewest dropped rounds that fit, or all but the last
        while low < high:
            middle = (low + high) // 2
            if len(encoded(middle)[0]) <= block_size:
                high = middle
            else:
                low = middle + 1
        dropped, (ids, labels, replies) = low, encoded(low)
    reply_cut = len(ids) > block_size
    ids, labels, replies = ids[:block_size], labels[:block_size], replies[:block_size]
    if last_only:
        last = max(replies)
        labels = [label if reply == last else IGNORE_INDEX for label, reply in zip(labels, replies, strict=True)]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None
    return ids, labels, dropped, reply_cut
