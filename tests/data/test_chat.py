"""Conversations: each chat format against its published layout, targets, truncation, mixing, prompt parity."""
import json
from pathlib import Path

import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script

BAICHUAN_REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "baichuan2" / "tokenizer.model"
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>"]
WORDS = ["\n", "system", "user", "assistant", "model", "[INST]", "[/INST]"] + [f"w{i}" for i in range(300)]


def word_tokenizer(chat_template=None, baichuan_ids=False):
    """Words split at spaces, each newline its own token, the chat pieces special: any text splits into tokens
    at the same places on its own as inside a longer text, so expected ids can be written down piece by piece.
    `baichuan_ids`: ids 195 and 196 are Baichuan2's turn tokens, as in its release (for --chat-format baichuan2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>"] + SPECIALS + WORDS
    if baichuan_ids:
        tokens[195:197] = ["<reserved_106>", "<reserved_107>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                     pre_tokenizers.Split("\n", "isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=SPECIALS[2:])
    tokenizer.chat_template = chat_template
    return tokenizer


def ids_of(tokenizer, *pieces):
    """Ids of a layout written as pieces: special tokens by name, text split at spaces."""
    ids = []
    for piece in pieces:
        ids += [tokenizer.convert_tokens_to_ids(piece)] if piece in SPECIALS else \
            tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def one_row(fmt, messages, tools=None):
    """The one (ids, labels) example of a conversation that fits and whose replies follow on in one row."""
    examples, _ = fmt.examples({"messages": messages, "tools": tools})
    assert len(examples) == 1, len(examples)
    return examples[0]


def messages_of(row):
    from finetune.data.conversations import conversation_of

    return conversation_of(row)["messages"]


CONVERSATION = [{"role": "system", "content": "w1 w2"},
                {"role": "user", "content": "w3 w4"}, {"role": "assistant", "content": "w5 w6 w7"},
                {"role": "user", "content": "w8"}, {"role": "assistant", "content": "w9 w10"}]


# ----------------------------------------------------------------------------------------------
# baichuan2: Baichuan2's fine-tune.py layout, with the real tokenizer
# ----------------------------------------------------------------------------------------------
def baichuan_reference(sp, conversations, eos=2):
    """Rows as the SPEC describes Baichuan2's fine-tune.py building them (ShareGPT `conversations`)."""
    input_ids, labels = [], []
    for message in conversations:
        value_ids = sp.encode(message["value"])
        if message["from"] == "human":
            input_ids += [195] + value_ids
            labels += [eos] + [-100] * len(value_ids)
        else:
            input_ids += [196] + value_ids
            labels += [-100] + value_ids
    return input_ids + [eos], labels + [eos]


@pytest.mark.skipif(not BAICHUAN_REFERENCE.exists(), reason="the Baichuan2 reference tokenizer is not here")
def test_baichuan2_format_is_its_fine_tune_layout_with_the_real_tokenizer():
    import sentencepiece

    from finetune.data.chat import chat_format
    from modeling_baichuan import BaichuanTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(BAICHUAN_REFERENCE))
    assert (sp.id_to_piece(195), sp.id_to_piece(196)) == ("<reserved_106>", "<reserved_107>")
    tokenizer = BaichuanTokenizer(vocab_file=str(BAICHUAN_REFERENCE))
    fmt = chat_format(tokenizer, "auto")
    assert fmt.name == "baichuan2"
    row = {"conversations": [{"from": "human", "value": "你好，我叫小明。"}, {"from": "gpt", "value": "你好小明！"},
                             {"from": "human", "value": "What is my name?"},
                             {"from": "gpt", "value": "Your name is 小明.\nNice day."}]}
    ids, labels = one_row(fmt, messages_of(row))
    expected_ids, expected_labels = baichuan_reference(sp, row["conversations"])
    assert ids == expected_ids
    # The reference's first label (EOS on the first user token) is never predicted (labels shift by one); ours is -100.
    assert labels[1:] == expected_labels[1:] and labels[0] == -100
    # A system prompt is its text first, with no role token, as Baichuan2-Chat places it.
    with_system = [{"role": "system", "content": "You are helpful."}] + messages_of(row)
    system_ids = sp.encode("You are helpful.")
    ids, labels = one_row(fmt, with_system)
    assert ids == system_ids + expected_ids and labels[len(system_ids)] == -100
    assert labels[len(system_ids) + 1:] == expected_labels[1:]


def test_demo_baichuan_tokenizer_has_the_chat_tokens_at_the_release_ids():
    from finetune import demo
    from finetune.data.chat import chat_format

    tokenizer = demo.load_demo_tokenizer("baichuan2")
    assert tokenizer.convert_ids_to_tokens([195, 196]) == ["<reserved_106>", "<reserved_107>"]
    fmt = chat_format(tokenizer, "auto")
    assert fmt.name == "baichuan2"
    ids, labels = one_row(fmt, CONVERSATION)
    assert ids.count(195) == 2 and ids.count(196) == 2 and ids[-1] == tokenizer.eos_token_id
    # EOS is learned after each reply: as the label of the next user token, and at the very end.
    first_user, second_user = [index for index, token in enumerate(ids) if token == 195]
    assert labels[first_user] == -100 and labels[second_user] == tokenizer.eos_token_id
    assert labels[-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------
# llama2: Meta's layout, encoded exchange by exchange with SentencePiece as its reference code does
# ----------------------------------------------------------------------------------------------
def test_llama2_format_is_metas_layout():
    import sentencepiece

    from finetune import demo
    from finetune.data.chat import chat_format

    folder = demo.ensure_demo_tokenizer("llama2")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    tokenizer = demo.load_demo_tokenizer("llama2")
    fmt = chat_format(tokenizer, "auto")
    assert fmt.name == "llama2"
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Hi, I am Maria from Millbrook. "},
                    {"role": "assistant", "content": " Hello Maria."},
                    {"role": "user", "content": "Which town do I live in?"},
                    {"role": "assistant", "content": "You live in Millbrook."}]
    exchanges = [("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nHi, I am Maria from Millbrook. [/INST]", " Hello Maria. "),
                 ("[INST] Which town do I live in? [/INST]", " You live in Millbrook. ")]
    expected_ids, expected_labels, prompts = [], [], []
    for prompt, answer in exchanges:
        prompt_ids = [sp.bos_id()] + sp.encode(prompt)
        prompts.append(expected_ids + prompt_ids)
        whole = [sp.bos_id()] + sp.encode(prompt + answer) + [sp.eos_id()]
        assert whole[:len(prompt_ids)] == prompt_ids
        expected_ids += whole
        expected_labels += [-100] * len(prompt_ids) + whole[len(prompt_ids):]
    ids, labels = one_row(fmt, conversation)
    assert ids == expected_ids and labels == expected_labels
    # The generation prompt of the second turn is the first exchange plus the second's prompt.
    assert fmt.prompt(conversation[:1] + conversation[1:2]) == prompts[0]
    assert fmt.prompt(conversation[:4]) == prompts[1]


# ----------------------------------------------------------------------------------------------
# template: the tokenizer's chat_template, replies found without generation markers
# ----------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
          "{{ m.content | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set first = messages[0].content + '\n\n' %}"
         "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
         "{% for m in turns %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
         "{{ (first if loop.first else '') + m.content | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
           "{% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Like templates that hide the reasoning of earlier replies: a past reply renders differently once the next follows.
REWRITES_HISTORY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                    "{{ 'w0' if m.role == 'assistant' and not loop.last else m.content }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

T = "target"  # marks the pieces of a layout that are targets
TEMPLATE_LAYOUTS = {
    "chatml": (CHATML, CONVERSATION, [
        "<|im_start|>", "system\nw1 w2", "<|im_end|>", "\n", "<|im_start|>", "user\nw3 w4", "<|im_end|>", "\n",
        "<|im_start|>", "assistant\n", (T, "w5 w6 w7"), (T, "<|im_end|>"), "\n",
        "<|im_start|>", "user\nw8", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", (T, "w9 w10"), (T, "<|im_end|>"),
        "\n"]),
    "llama3": (LLAMA3, CONVERSATION, [
        "<s>", "<|start_header_id|>", "system", "<|end_header_id|>", "\n\nw1 w2", "<|eot_id|>",
        "<|start_header_id|>", "user", "<|end_header_id|>", "\n\nw3 w4", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", (T, "w5 w6 w7"), (T, "<|eot_id|>"),
        "<|start_header_id|>", "user", "<|end_header_id|>", "\n\nw8", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", (T, "w9 w10"), (T, "<|eot_id|>")]),
    "gemma": (GEMMA, CONVERSATION, [
        "<s>", "<start_of_turn>", "user\nw1 w2\n\nw3 w4", "<end_of_turn>", "\n",
        "<start_of_turn>", "model\n", (T, "w5 w6 w7"), (T, "<end_of_turn>"), "\n",
        "<start_of_turn>", "user\nw8", "<end_of_turn>", "\n", "<start_of_turn>", "model\n", (T, "w9 w10"),
        (T, "<end_of_turn>"), "\n"]),
    "mistral": (MISTRAL, CONVERSATION[1:], [
        "<s>", "[INST] w3 w4 [/INST]", (T, "w5 w6 w7"), (T, "</s>"), "[INST] w8 [/INST]", (T, "w9 w10"), (T, "</s>")]),
}


@pytest.mark.parametrize("style", sorted(TEMPLATE_LAYOUTS))
def test_template_format_finds_every_reply(style):
    from finetune.data.chat import chat_format

    template, conversation, layout = TEMPLATE_LAYOUTS[style]
    tokenizer = word_tokenizer(template)
    expected_ids, expected_labels = [], []
    for piece in layout:
        is_target = isinstance(piece, tuple)
        ids = ids_of(tokenizer, piece[1] if is_target else piece)
        expected_ids += ids
        expected_labels += ids if is_target else [-100] * len(ids)
    fmt = chat_format(tokenizer, "auto")
    assert fmt.name == "template"
    ids, labels = one_row(fmt, conversation)
    assert ids == expected_ids and labels == expected_labels
    # The generation prompt is what apply_chat_template gives, and generation stops at the end-of-turn token.
    assert fmt.prompt(conversation[:-1]) == tokenizer.apply_chat_template(
        conversation[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    end_of_turn = [piece[1] for piece in layout if isinstance(piece, tuple) and piece[1] in SPECIALS][-1]
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in fmt.end_of_turn_ids()


def test_a_template_that_rewrites_past_turns_gets_one_example_per_reply():
    """Each reply in the context inference gives it: the second reply's context shows the first reply as the
    template renders it once a later turn follows (w0), so it is an example of its own."""
    from finetune.data.chat import chat_format

    fmt = chat_format(word_tokenizer(REWRITES_HISTORY), "template")
    examples, stats = fmt.examples({"messages": CONVERSATION, "tools": None})
    assert len(examples) == 2 and stats["replies_learned"] == 2
    for (ids, labels), end in zip(examples, (3, 5), strict=True):
        context = fmt.tokenizer.apply_chat_template(CONVERSATION[:end - 1], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
        assert ids[:len(context)] == context and set(labels[:len(context)]) == {-100}
        reply = CONVERSATION[end - 1]["content"]
        assert [t for t in labels if t != -100] == ids_of(fmt.tokenizer, reply, "<|im_end|>")


def test_a_template_that_refuses_a_conversation_drops_it_with_its_reason():
    from finetune.data.chat import chat_format
    from finetune.data.conversations import BadConversation
    from finetune.errors import FinetuneError

    with pytest.raises(BadConversation, match="refused the conversation: Only user and assistant") as refused:
        chat_format(word_tokenizer(MISTRAL), "template").examples({"messages": CONVERSATION, "tools": None})
    assert refused.value.reason == "template_error"
    with pytest.raises(FinetuneError, match="no chat_template"):
        chat_format(word_tokenizer(None), "template")


# ----------------------------------------------------------------------------------------------
# Rows, targets, truncation
# ----------------------------------------------------------------------------------------------
def test_rows_with_bad_conversations_are_one_clear_error():
    from finetune.data.conversations import BadConversation, conversation_of

    good = {"conversations": [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]}
    assert conversation_of(good)["messages"] == [{"role": "user", "content": "w1"},
                                                 {"role": "assistant", "content": "w2"}]
    bad = {
        "unknown role 'bot'": {"messages": [{"role": "user", "content": "w1"}, {"role": "bot", "content": "w2"}]},
        "'content' is empty": {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "w"}]},
        "content must be text or a list of text parts, got int": {"conversations": [{"from": "human", "value": 3}]},
        "no assistant turn": {"messages": [{"role": "user", "content": "w1"}]},
        "a user turn cannot follow user": {"messages": [{"role": "user", "content": "w1"},
                                                        {"role": "user", "content": "w2"}]},
        "neither a 'messages' nor": {"text": "w1"},
    }
    for message, row in bad.items():
        with pytest.raises(BadConversation, match=message):
            conversation_of(row, "row 7")


def rounds(count, user_words=3, reply_words=3, system=True):
    messages = [{"role": "system", "content": "w1 w2"}] if system else []
    for number in range(count):
        messages += [{"role": "user", "content": " ".join([f"w{10 + number}"] * user_words)},
                     {"role": "assistant", "content": " ".join([f"w{50 + number}"] * reply_words)}]
    return messages


def test_truncation_drops_the_oldest_rounds_then_cuts_the_last_reply():
    from finetune.data.chat import chat_format

    fmt = chat_format(word_tokenizer(baichuan_ids=True), "baichuan2")  # [195] user [196] reply, EOS after each
    sys_ids = ids_of(fmt.tokenizer, "w1 w2")

    def examples(conversation, block_size, last_only=False):
        return fmt.examples({"messages": conversation, "tools": None}, block_size, last_only)

    conversation = rounds(3)  # 2 + 3 * (4 + 4) + 1 = 27 tokens
    (ids, labels), = examples(conversation, 27)[0]
    assert len(ids) == 27 and ids == one_row(fmt, conversation)[0]
    # A smaller block: each reply keeps the system prompt and the latest rounds that fit with it; replies whose
    # contexts continue the row stay in it, and every reply is learned once.
    for block_size in (26, 19, 18, 11):
        found, stats = examples(conversation, block_size)
        assert stats["replies_learned"] == 3 and all(len(ids) <= block_size for ids, _ in found)
        assert all(ids[:2] == sys_ids for ids, _ in found)  # the system prompt stays
        learned = [[t for t in labels if t != -100] for _, labels in found]
        replies = [ids_of(fmt.tokenizer, " ".join([f"w{50 + n}"] * 3)) + [fmt.eos_id] for n in range(3)]
        assert sum(learned, []) == sum(replies, [])
    # The last round alone is too long: its reply is cut at its end (and gets no EOS: it did not end).
    found, stats = examples(rounds(2, reply_words=20), 12)
    (ids, labels) = found[-1]
    assert len(ids) == 12 and stats["replies_cut"] == 2 and stats["replies_with_rounds_dropped"] == 1
    assert ids[:7] == sys_ids + [195] + ids_of(fmt.tokenizer, "w11 w11 w11") + [196]
    assert labels[7:] == ids[7:] and fmt.eos_id not in ids
    # Not even the context of a reply fits: nothing to learn from it.
    found, stats = examples(rounds(2), 7)
    assert found == [] and stats["replies_dropped_context_too_long"] == 2
    # --train-on-turns last: only the last reply and its EOS are targets.
    (ids, labels), = examples(rounds(2), 100, last_only=True)[0]
    assert [token for token in labels if token != -100] == ids_of(fmt.tokenizer, "w51 w51 w51") + [fmt.eos_id]
    (ids, labels), = examples(rounds(2), 100)[0]
    assert [token for token in labels if token != -100] == \
        ids_of(fmt.tokenizer, "w50 w50 w50") + [fmt.eos_id] + ids_of(fmt.tokenizer, "w51 w51 w51") + [fmt.eos_id]
    # User turns after the last reply have nothing to learn and are left out.
    (ids, _), = examples(rounds(1) + [{"role": "user", "content": "w99"}], 100)[0]
    assert ids == one_row(fmt, rounds(1))[0]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Mixing sources
# ----------------------------------------------------------------------------------------------
def test_prepare_dataset_mixes_chat_sources_and_reports_them(tmp_path):
    import prepare_dataset

    messages = write_jsonl(tmp_path / "a.jsonl", [{"messages": rounds(1, system=False)}] * 4)
    sharegpt = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [
        {"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi"}]}] * 8)
    out = tmp_path / "out"
    prepare_dataset.main(["chat", "--demo", "--dataset-name-or-path", messages, sharegpt, "--dataset-weights", "1", "2",
                          "--validation-fraction", "0", "--save-path", str(out)])
    report = json.loads((out / "prepare_report.json").read_text())
    assert [(row["rows"], row["rows_used"]) for row in report["sources"]] == [(4, 4), (8, 8)]
    assert report["chat_format"] == "llama2" and report["splits"]["train"]["examples"] == 12


def test_prepare_dataset_mixes_recipe_sources(tmp_path):
    import prepare_dataset

    rows = [{"article": f"Story {i} about Millbrook.", "highlights": "Millbrook news."} for i in range(6)]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", [dict(row, extra=1) for row in rows[:2]])
    out = tmp_path / "out"
    prepare_dataset.main(["llama2", "--demo", "--dataset-name-or-path", first, second, "--dataset-weights", "1", "3",
                          "--validation-fraction", "0", "--save-path", str(out)])
    report = json.loads((out / "prepare_report.json").read_text())
    assert [row["rows_used"] for row in report["sources"]] == [2, 6]
    assert report["splits"]["train"]["examples"] == 8


@pytest.mark.slow
def test_bad_chat_rows_are_dropped_and_counted_or_under_strict_one_error_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": rounds(1)}, {"messages": [
        {"role": "user", "content": "w1"}, {"role": "robot", "content": "w2"}]}] + [{"messages": rounds(1)}] * 3)
    result = run_script(PYTHON, "prepare_dataset.py", "chat", "--demo", "--dataset-name-or-path", data,
                        "--validation-fraction", "0", "--save-path", str(tmp_path / "kept"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "kept" / "prepare_report.json").read_text())["splits"]["train"]
    assert (report["examples"], report["dropped_by_reason"], report["dropped_rows"]) == (
        4, {"unknown_role": 1}, {"unknown_role": [1]})
    assert "dropped 1 conversations: unknown_role (rows 1)" in result.stdout
    result = run_script(PYTHON, "prepare_dataset.py", "chat", "--demo", "--dataset-name-or-path", data, "--strict",
                        "--save-path", str(tmp_path / "out"))
    assert "row 1 of split 'train', message 1: unknown role 'robot'" in assert_one_line_error(result)
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", [{"messages": [{"role": "user", "content": "w1"}]}] * 3)
    result = run_script(PYTHON, "prepare_dataset.py", "chat", "--demo", "--dataset-name-or-path", only_bad,
                        "--save-path", str(tmp_path / "out"))
    assert "no conversation of split 'train' could be laid out for training (3 no_assistant_turn)" in \
        assert_one_line_error(result)
    result = run_script(PYTHON, "prepare_dataset.py", "chat", "--demo", "--dataset-name-or-path", data, data,
                        "--dataset-weights", "1", "--save-path", str(tmp_path / "out"))
    assert "--dataset-weights has 1 values for 2 sources" in assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Inference builds the prompt with the same code: its ids are the training row's prefix
# ----------------------------------------------------------------------------------------------
def parity_tokenizers():
    from finetune import demo

    return {"baichuan2": demo.load_demo_tokenizer("baichuan2"), "llama2": demo.load_demo_tokenizer("llama2"),
            "template": word_tokenizer(CHATML)}


def test_inference_prompt_is_the_prefix_of_the_training_row():
    import inference
    from finetune.data.chat import chat_format

    row = json.loads((REPO_ROOT / "data" / "chat_sample.jsonl").read_text().splitlines()[1])
    messages = messages_of(row)
    for name, tokenizer in parity_tokenizers().items():
        fmt = chat_format(tokenizer, "auto")
        assert fmt.name == name
        ids, labels = one_row(fmt, messages)
        replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        for reply in replies:
            example = {"messages": messages[:reply + 1]}  # inference prompts up to the last user turn
            prompt = inference.prompt_ids(tokenizer, "llama2", example, chat="auto")
            assert ids[:len(prompt)] == prompt, name
            assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100, name
