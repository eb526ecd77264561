"""Conversations in a model's own chat format: what inference feeds the model before each reply, and the reply.

One rule for every format: every assistant reply is learned exactly once, in the context inference gives it
(the ids `prompt()` returns for the conversation up to that reply, which `inference.py --chat` feeds the model),
and nothing else is learned. A format gives, for reply i of a conversation:
    prompt(messages[:i])   the context ids
    reply(messages, i)     the reply's ids as the model writes them after that context, and how many of them are
                           targets (the rest, a newline after an end-of-turn token, is layout nobody generates)
The training rows are built from these by finetune/data/chat_preparation.py.

Formats (--chat-format):
  baichuan2  Baichuan2's fine-tuning layout: [195] user [196] reply per turn, no BOS; the EOS that ends a reply is
             learned as the label of the next [195] (and as a final token), as its fine-tune.py does. A system
             prompt is its text first, with no role token.
  llama2     Meta's Llama 2 chat layout, each exchange BOS "[INST] {user} [/INST] {reply} " EOS, the system
             prompt in <<SYS>> inside the first exchange; encoded with the tokenizer's SentencePiece model where
             it has one, so the ids are Meta's own.
  template   the tokenizer's chat_template. The context is the rendering up to the reply with the generation
             prompt, tokenized whole; the reply is what rendering the reply adds to it, tokenized on its own (a
             BPE would otherwise merge the template's newline with a reply that opens with a space).
  auto       baichuan2 for Baichuan tokenizers, template where the tokenizer has a chat template, else llama2.

Reasoning (`reasoning_content`, or a <think> block in the data) goes where the template shows it; a format with no
place for it keeps it inside the reply text as <think>...</think> (`inline`) or drops it, as --reasoning says.
Tool calls need a template that lays them out; baichuan2 and llama2 have no place for them.
Message text is text: in baichuan2 and llama2 the text of a special token typed in a message stays text; a
template conversation whose text holds a special token's text is refused (it could forge turns).
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from finetune.data.conversations import THINK_CLOSE, THINK_OPEN, BadConversation, uses_tools
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
CHAT_FORMATS = ("auto", "baichuan2", "llama2", "template")
REASONING_CHOICES = ("auto", "inline", "drop")
BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID = 195, 196  # <reserved_106>, <reserved_107> of the release
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
MARKER = "zqxreasoningmarker"


class ChatFormat:
    """One chat layout over a tokenizer. Subclasses define `_prompt`, `_reply` and `shows_reasoning`."""

    name = ""
    shows_reasoning = False  # whether the layout has a place for reasoning_content
    after_reply_label: int | None = None  # the label of the token that follows a reply in a row (baichuan2: EOS)
    close_ids: tuple[int, ...] = ()  # appended, learned, when a row ends right after a reply (baichuan2: EOS)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reasoning: str = "auto") -> None:
        if tokenizer.eos_token_id is None:
            raise FinetuneError("the tokenizer has no EOS token; chat rows end every reply with one")
        if reasoning not in REASONING_CHOICES:
            raise FinetuneError(f"--reasoning must be one of {', '.join(REASONING_CHOICES)}, not {reasoning!r}")
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_token_id
        self.reasoning = reasoning if reasoning != "auto" else ("template" if self.shows_reasoning else "inline")

    def text_ids(self, text: str) -> list[int]:
        """Message text as tokens: the text of a special token in it stays text."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def placed(self, messages: list[dict]) -> list[dict]:
        """The messages with reasoning where --reasoning puts it: left for the template, inside the reply text
        as a <think> block, or dropped."""
        if self.reasoning == "template":
            return messages
        out = []
        for message in messages:
            reasoning = message.get("reasoning_content")
            if reasoning:
                message = {k: v for k, v in message.items() if k != "reasoning_content"}
                if self.reasoning == "inline":
                    message["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{message['content']}"
            out.append(message)
        return out

    def check(self, conversation: dict) -> None:
        """Refuse (one line, for the whole preparation) what the format has no place for: tool calls."""
        if uses_tools(conversation):
            raise FinetuneError(f"--chat-format {self.name} has no place for tools, tool calls or tool results; "
                                "use --chat-format template with a chat template that lays them out")

    def prompt(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """ids of a conversation that ends before an assistant reply, up to where the reply starts."""
        return self._prompt(self.placed(messages), tools)

    def reply(self, messages: list[dict], index: int, tools: list | None = None) -> tuple[list[int], int]:
        """(ids, targets) of the assistant reply messages[index] as written after prompt(messages[:index]): its
        first `targets` ids are learned (its text and end-of-turn), the rest is layout."""
        return self._reply(self.placed(messages[:index + 1]), index, tools)

    def end_of_turn_ids(self) -> list[int]:
        return [self.eos_id]

    def examples(self, conversation: dict, block_size: int = 2 ** 62, last_only: bool = False
                 ) -> tuple[list[tuple[list[int], list[int]]], Counter]:
        """The (ids, labels) examples of one conversation (messages and tools), and what happened to its replies.

        Each assistant reply is learned once, after its context: prompt() of the conversation up to the reply,
        keeping the system prompt and as many of the latest rounds as fit in `block_size` (the oldest go first, as a
        chat that outgrows the model drops them). Replies follow each other in one example as long as the next
        reply's context continues the example token for token; where it does not (a template that renders past turns
        differently once later turns follow, tokens that merge across a turn boundary, rounds dropped to fit), the
        reply starts an example of its own with its own context. A reply longer than the room left is cut at its end.
        """
        self.check(conversation)
        messages, tools = conversation["messages"], conversation["tools"]
        system = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(system):]
        starts = [index for index, message in enumerate(body) if message["role"] == "user"]
        replies = [index for index, message in enumerate(body) if message["role"] == "assistant"]
        stats, examples = Counter(), []
        row, labels, open_row, first = None, None, False, 0

        def close():
            if row is not None:
                if open_row:  # it ends right after a whole reply
                    row.extend(self.close_ids)
                    labels.extend(self.close_ids)
                examples.append((row, labels))

        for index in replies[-1:] if last_only else replies:
            stats["replies"] += 1
            stats["replies_with_reasoning"] += bool(body[index].get("reasoning_content"))
            stats["tool_call_replies"] += bool(body[index].get("tool_calls"))
            latest = max(number for number, start in enumerate(starts) if start < index)
            while True:  # the earliest round whose window holds the context and the whole reply
                window = system + body[starts[first]:index + 1]
                context = self.prompt(window[:-1], tools)
                reply, targets = self.reply(window, len(window) - 1, tools)
                if len(context) + targets + len(self.close_ids) <= block_size or first == latest:
                    break
                first += 1
            stats["replies_with_rounds_dropped"] += first > 0
            whole = len(context) + targets + len(self.close_ids) <= block_size
            if not whole:
                targets = block_size - len(context)
                if targets < 1:
                    stats["replies_dropped_context_too_long"] += 1
                    continue
                reply, cut = reply[:targets], True
                stats["replies_cut"] += 1
            else:
                reply, cut = reply[:max(targets, block_size - len(context) - len(self.close_ids))], False
            if open_row and context[:len(row)] == row and len(context) + len(reply) + len(self.close_ids) <= block_size:
                extension = context[len(row):]
                row.extend(extension)
                labels.extend([IGNORE_INDEX] * len(extension))
                if extension and self.after_reply_label is not None:
                    labels[len(labels) - len(extension)] = self.after_reply_label  # the end of the previous reply
            else:
                close()
                row, labels = list(context), [IGNORE_INDEX] * len(context)
            row.extend(reply)
            labels.extend(reply[:targets] + [IGNORE_INDEX] * (len(reply) - targets))
            stats["replies_learned"] += 1
            open_row = not cut
        close()
        return examples, stats

    def _prompt(self, messages, tools):
        raise NotImplementedError

    def _reply(self, messages, index, tools):
        raise NotImplementedError


class Baichuan2Format(ChatFormat):
    name = "baichuan2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reasoning: str = "auto") -> None:
        super().__init__(tokenizer, reasoning)
        tokens = tokenizer.convert_ids_to_tokens([BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID]) \
            if len(tokenizer) > BAICHUAN_ASSISTANT_ID else []
        if not is_baichuan_tokenizer(tokenizer) and tokens != ["<reserved_106>", "<reserved_107>"]:
            raise FinetuneError(f"--chat-format baichuan2 marks turns with token ids {BAICHUAN_USER_ID} and "
                                f"{BAICHUAN_ASSISTANT_ID}, which mean other words in this tokenizer "
                                f"({type(tokenizer).__name__}); use template or llama2")
        self.after_reply_label, self.close_ids = self.eos_id, (self.eos_id,)

    def _prompt(self, messages, tools):
        ids = []
        for message in messages:
            text = self.text_ids(message["content"])
            role = {"system": [], "user": [BAICHUAN_USER_ID], "assistant": [BAICHUAN_ASSISTANT_ID]}[message["role"]]
            ids += role + text
        return ids + [BAICHUAN_ASSISTANT_ID]

    def _reply(self, messages, index, tools):
        text = self.text_ids(messages[index]["content"])
        return text, len(text)


class Llama2Format(ChatFormat):
    name = "llama2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reasoning: str = "auto") -> None:
        super().__init__(tokenizer, reasoning)
        if tokenizer.bos_token_id is None:
            raise FinetuneError("the llama2 chat format starts every exchange with BOS, but the tokenizer has none")
        self.bos_id = tokenizer.bos_token_id
        self.sentencepiece = _sentencepiece_of(tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """Meta's code encodes with SentencePiece: where the tokenizer has its model, so do we (the fast tokenizer
        splits a run of spaces after a newline differently)."""
        if self.sentencepiece is not None:
            return self.sentencepiece.encode(text)
        return super().text_ids(text)

    def _exchanges(self, messages):
        """[(user text, reply or None)], the system prompt folded into the first user text as Meta's code does."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        exchanges = [[turn["content"], None] for turn in turns if turn["role"] == "user"]
        for number, turn in enumerate(t for t in turns if t["role"] == "assistant"):
            exchanges[number][1] = turn["content"]
        if system is not None:
            exchanges[0][0] = B_SYS + system + E_SYS + exchanges[0][0]
        return exchanges

    def _head(self, user):
        return [self.bos_id] + self.text_ids(f"{B_INST} {user.strip()} {E_INST}")

    def _exchange(self, user, answer):
        head = self._head(user)
        whole = [self.bos_id] + self.text_ids(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ")
        # Meta's ids where the tokenizer keeps the head a prefix of the whole exchange (SentencePiece always
        # does); otherwise the reply is tokenized on its own after the head, as the model writes it.
        tail = whole[len(head):] if whole[:len(head)] == head else self.text_ids(f" {answer.strip()} ")
        return head, tail + [self.eos_id]

    def _prompt(self, messages, tools):
        ids = []
        for user, answer in self._exchanges(messages):
            head, tail = self._exchange(user, answer) if answer is not None else (self._head(user), [])
            ids += head + tail
        return ids

    def _reply(self, messages, index, tools):
        user, answer = self._exchanges(messages)[-1]
        tail = self._exchange(user, answer)[1]
        return tail, len(tail)


class TemplateFormat(ChatFormat):
    name = "template"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reasoning: str = "auto") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise FinetuneError("--chat-format template: the tokenizer has no chat_template; use llama2 or baichuan2")
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | {
            index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        self.special_texts = [tokenizer.convert_ids_to_tokens(index) for index in self.special_ids]
        probe = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": "a", "reasoning_content": MARKER}]
        self.shows_reasoning = MARKER in self._render(probe, False, None, where="a probe conversation")
        super().__init__(tokenizer, reasoning)

    def _render(self, messages, generation_prompt, tools, where="the conversation"):
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as problem:  # templates raise their own errors (e.g. "System role not supported")
            message = str(problem).splitlines()[0] if str(problem) else problem.__class__.__name__
            raise BadConversation("template_error", f"the chat_template refused {where}: {message}") from None

    def check(self, conversation: dict) -> None:
        texts = [m.get(key) or "" for m in conversation["messages"] for key in ("content", "reasoning_content")]
        forged = next((s for s in self.special_texts for text in texts if s and s in text), None)
        if forged:
            raise BadConversation("special_token_text", f"a message holds the text of the special token {forged!r}, "
                                                        "which the template would read as a turn boundary")
        if uses_tools(conversation) and not self._lays_out_tools():
            raise FinetuneError("the chat_template has no place for tool calls (it drops them); use a template "
                                "that renders tool_calls and tool results")

    def _lays_out_tools(self):
        call = {"type": "function", "function": {"name": MARKER, "arguments": {}}}
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        try:
            return MARKER in self._render(probe, False, None)
        except BadConversation:
            return False

    def _prompt(self, messages, tools):
        return self.tokenizer(self._render(messages, True, tools), add_special_tokens=False)["input_ids"]

    def _reply(self, messages, index, tools):
        before, through = self._render(messages[:index], True, tools), self._render(messages[:index + 1], False, tools)
        if not through.startswith(before):
            raise BadConversation("reply_not_located", "the chat_template lays out a reply differently from its "
                                                       "generation prompt, so the reply cannot be located")
        text, message = through[len(before):], messages[index]
        shown = message["content"].strip()[:40] or next(
            (call["function"]["name"] for call in message.get("tool_calls") or []), "")
        if not shown or shown not in text:
            raise BadConversation("reply_not_rendered", "the chat_template does not show the reply's text")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        specials = [position for position, token in enumerate(ids) if token in self.special_ids]
        if specials and specials[-1] > 0:
            return ids, specials[-1] + 1  # through the end-of-turn token; a newline after it is layout
        targets = len(ids)
        while targets > 1 and not self.tokenizer.decode(ids[targets - 1:targets]).strip():
            targets -= 1  # no end-of-turn token: trailing whitespace is layout
        return ids, targets

    def end_of_turn_ids(self) -> list[int]:
        """The special tokens the template puts at the end of a reply (<|im_end|>, <|eot_id|>, ...), and EOS."""
        probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
        ids, targets = self.reply(probe, 1)
        ending = [token for token in ids[:targets] if token in self.special_ids]
        return list(dict.fromkeys(ending[-1:] + [self.eos_id]))


FORMATS = {"baichuan2": Baichuan2Format, "llama2": Llama2Format, "template": TemplateFormat}


def _sentencepiece_of(tokenizer):
    """A SentencePiece processor over the tokenizer's own tokenizer.model, or None."""
    path = getattr(tokenizer, "vocab_file", None)
    if not (isinstance(path, str) and path.endswith(".model")):
        return None
    try:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=path)
    except (ImportError, OSError, RuntimeError):
        return None


def is_baichuan_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    return "baichuan" in type(tokenizer).__name__.lower()


def chat_format(tokenizer: PreTrainedTokenizerBase, name: str = "auto", reasoning: str = "auto") -> ChatFormat:
    """The ChatFormat called `name` over `tokenizer`; `auto` picks baichuan2, template or llama2 (see above)."""
    if name == "auto":
        if is_baichuan_tokenizer(tokenizer):
            name = "baichuan2"
        else:
            name = "template" if getattr(tokenizer, "chat_template", None) else "llama2"
    if name not in FORMATS:
        raise FinetuneError(f"unknown chat format {name!r}; expected one of {', '.join(CHAT_FORMATS)}")
    return FORMATS[name](tokenizer, reasoning)
