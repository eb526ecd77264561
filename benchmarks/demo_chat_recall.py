"""Does the chat demo use the conversation's history? Recall of a fact from the first user turn, held-out chats.

    HF_HUB_OFFLINE=1 python prepare_dataset.py chat --demo
    HF_HUB_OFFLINE=1 python train_llama2.py --demo --dataset-name-or-path ./chat_dataset --save-model-dir ./chat_demo_output --block-size 512 --batch-size 4 --max-steps 1000 --lr 3e-3 --eval-every 100
    HF_HUB_OFFLINE=1 python benchmarks/demo_chat_recall.py --model-dir ./chat_demo_output

Every conversation of data/chat_sample.jsonl starts with the user giving their name and town (one of 32 names and
26 towns) and, after some small talk, ends with a question about one of them ("Which town do I live in?") that
only the first turn answers. The conversations scored are the validation split that preparation held out
(seed 0, 5 percent). For each, the model writes a greedy reply to the last question, prompted with the same code
as `inference.py --chat` (the chat format `auto` picks for the tokenizer), and the reply counts as right when it
holds the asked fact. Scored: the untrained demo model ("before", the weights `--demo` starts from), the trained
one ("after"), and the trained one with the first round (the introduction) removed from the prompt: without the
history the fact can only be guessed, and the best guess (the commonest answer among the held-out questions) is
printed as the no-history baseline. Also scored, before and after: the reply to the introduction itself
("greeting"), right when it repeats the name the user gave in that turn.
It prints figures; it judges nothing.
The last line printed is one JSON object with the figures.
"""
import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import inference  # noqa: E402
from finetune import demo  # noqa: E402
from finetune.data.chat import chat_format  # noqa: E402
from finetune.data.conversations import conversation_of  # noqa: E402
from finetune.data.preparation import split_train_validation  # noqa: E402
from finetune.data.raw_data import load_raw_dataset  # noqa: E402

ANSWER_PREFIXES = ("You live in ", "Your name is ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="trained model folder to score as \"after\" (default: score \"before\" only)")
    p.add_argument("--limit", type=int, help="score only the first N held-out conversations (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit in tokens (default 16)")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0 or (args.limit is not None and args.limit <= 0):
        raise SystemExit("error: --max-new-tokens and --limit must be positive")
    return args


def greetings(conversations):
    """(messages up to the introduction, the user's name) of each conversation: the greeting repeats the name."""
    found = []
    for messages, _ in conversations:
        start = 1 if messages[0]["role"] == "system" else 0
        greeting = messages[start + 1]["content"].replace("Nice to meet you, ", "Hello ")  # "Hello Maria, ..."
        found.append((messages[:start + 1], greeting.split(",")[0].split(".")[0].split()[-1]))
    return found


def held_out_conversations(limit=None):
    """(messages up to the last question, the fact asked) of each held-out conversation."""
    raw = split_train_validation(load_raw_dataset(demo.DEMO_CHAT_FILE), seed=0, validation_fraction=0.05)
    found = []
    for row in raw["validation"].select(range(min(limit or len(raw["validation"]), len(raw["validation"])))):
        messages = conversation_of(row)["messages"]
        answer = messages[-1]["content"]
        prefix = next(prefix for prefix in ANSWER_PREFIXES if answer.startswith(prefix))
        found.append((messages[:-1], answer[len(prefix):].rstrip(".")))
    return found


def without_introduction(messages):
    """The conversation with its first round (the user's introduction and the greeting) left out."""
    start = 1 if messages[0]["role"] == "system" else 0
    return messages[:start] + messages[start + 2:]


def recall(model_dir, conversations, max_new_tokens, drop_history=False):
    """Share of conversations whose greedy reply holds the fact asked, and one example reply."""
    tokenizer, model = inference.load_saved_model(model_dir)
    model.eval()
    fmt = chat_format(tokenizer, "auto")
    stop = fmt.end_of_turn_ids()
    right, example = 0, None
    for messages, fact in conversations:
        ids = fmt.prompt(without_introduction(messages) if drop_history else messages)
        with torch.no_grad():
            output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=stop, pad_token_id=stop[0])
        reply = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
        right += fact in reply
        example = example or (messages[-1]["content"], fact, reply)
    return right / len(conversations), example


def main(argv=None):
    args = parse_args(argv)
    conversations = held_out_conversations(args.limit)
    facts = Counter(fact for _, fact in conversations)
    figures = {"conversations": len(conversations),
               "no_history_baseline": round(facts.most_common(1)[0][1] / len(conversations), 3)}
    runs = [("before", demo.ensure_demo_model("llama2"), conversations, False),
            ("greeting_before", demo.ensure_demo_model("llama2"), greetings(conversations), False)]
    if args.model_dir:
        runs += [("after", args.model_dir, conversations, False),
                 ("after_without_introduction", args.model_dir, conversations, True),
                 ("greeting_after", args.model_dir, greetings(conversations), False)]
    for name, model_dir, questions, drop_history in runs:
        accuracy, (question, fact, reply) = recall(model_dir, questions, args.max_new_tokens, drop_history)
        figures[name] = round(accuracy, 3)
        print(f"{name}: {accuracy:.3f} of {len(conversations)} replies hold the fact "
              f"(e.g. {question!r} -> {reply!r}; the fact: {fact!r})")
    print(f"no-history baseline (the commonest fact every time): {figures['no_history_baseline']:.3f}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
