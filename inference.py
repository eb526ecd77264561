"""Check a fine-tuned model: load a saved folder and continue a recipe-formatted prompt, greedy and sampled.

  python inference.py --model-dir ./llama2_13b_finetuned --recipe llama2 \
      --example '{"article": "The city council voted on Tuesday to ..."}'
  python inference.py --model-dir ./baichuan2_demo_output --recipe baichuan2 --example-file data/baichuan2_sample.jsonl --index 3
  python inference.py --model-dir ./chat_demo_output --chat --example-file data/chat_sample.jsonl --index 3
  python inference.py --model-dir ./chat_demo_output --chat      # on a terminal: a multi-turn chat

The prompt is built by the same recipe function as the training data (prepare_dataset.py), with the response
left empty, so the model sees exactly what it was trained to continue. `--chat` builds it with the chat code of
`prepare_dataset.py chat` instead (finetune/data/chat.py, --chat-format): the example is a conversation (`messages` or
`conversations`; a recipe row's first prompt column is taken as one user turn), prompted up to its last user turn,
and generation stops at the format's end-of-turn token. With no example on a terminal, --chat is an interactive
chat that keeps the history (/reset starts over, /quit or Ctrl-D ends).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)
from finetune.data.chat import CHAT_FORMATS, chat_format
from finetune.data.conversations import conversation_of
from finetune.data.preparation import leading_special_ids, require
from finetune.demo import DEMO_CHAT_FILE, DEMO_SAMPLE_FILES
from finetune.errors import FinetuneError, entry_point
from finetune.model.adapter import check_targets_fit, read_adapter
from finetune.model.hub import looks_like_path, require_local_or_reachable, root_cause_message
from finetune.model.remote_code import asks_for_remote_code, remote_code_error
from finetune.model.weight_files import damaged_weight_file
from prepare_dataset import RECIPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder written by a training script (or any HF model folder); "
                                                      "with --adapter, the base model")
    p.add_argument("--adapter", help="a LoRA adapter folder (a training script's <save dir>/adapter) to apply to "
                                     "--model-dir")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="llama2", help="prompt format (default llama2)")
    p.add_argument("--example", help="the example as JSON, with the recipe's prompt columns")
    p.add_argument("--example-file", help="a .jsonl file of examples (default: the bundled sample data)")
    p.add_argument("--index", type=int, default=0, help="which line of --example-file (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation in the model's chat format (see --chat-format) instead of the recipe prompt; "
                        "interactive on a terminal when no example is given")
    p.add_argument("--chat-format", choices=CHAT_FORMATS, default="auto",
                   help="--chat layout, as in prepare_dataset.py chat (default auto: baichuan2 for Baichuan "
                        "tokenizers, else the tokenizer's chat template if it has one, else llama2)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens (default 50; 0 for no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed for the sampled continuation (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model and tokenizer code shipped in --model-dir (its auto_map) to run")
    args = p.parse_args(argv)
    require(args.index >= 0, f"--index must be a non-negative integer, got {args.index}")
    require(args.max_new_tokens >= 1, f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    # Below ~1e-4 logits / temperature overflows float32 and sampling fails; that close to 0 it is greedy anyway.
    require(1e-4 <= args.temperature < math.inf, f"--temperature must be a number >= 1e-4, got {args.temperature}")
    require(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    require(args.top_k >= 0, f"--top-k must be a non-negative integer, got {args.top_k}")
    require(0 <= args.seed < 2**64, f"--seed must be an integer in [0, 2**64), got {args.seed}")
    return args


def load_example(args):
    """The example to prompt with, as a dict of the recipe's columns."""
    require(args.example is None or args.example_file is None, "pass --example or --example-file, not both")
    if args.example is not None:
        try:
            example = json.loads(args.example)
        except ValueError as exc:
            raise FinetuneError(f"--example is not valid JSON ({exc})") from None
    else:
        path = args.example_file or (DEMO_CHAT_FILE if args.chat else DEMO_SAMPLE_FILES.get(args.recipe))
        if path is None:
            raise FinetuneError(f"no bundled examples for recipe {args.recipe!r}; pass --example or --example-file")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise FinetuneError(f"cannot read --example-file {path!r} ({reason})") from None
        require(args.index < len(lines), f"--index {args.index} is past the end of {path!r} ({len(lines)} examples)")
        try:
            example = json.loads(lines[args.index])
        except ValueError as exc:
            raise FinetuneError(f"example {args.index} of {path!r} is not valid JSON ({exc})") from None
    require(isinstance(example, dict), "the example must be a JSON object")
    return example


def chat_messages(example, recipe):
    """The conversation to prompt with ({"messages", "tools"}): the example's messages without the assistant reply
    it may end with (a recipe row: its first prompt column as the one user turn)."""
    if "messages" not in example and "conversations" not in example:
        check_example(example, recipe, chat=True)
        example = {"messages": [{"role": "user", "content": example[RECIPES[recipe]["columns"][0]]}]}
    conversation = conversation_of(example, "the example", need_reply=False)
    messages = conversation["messages"]
    while messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {**conversation, "messages": messages}


def check_example(example, recipe, chat):
    """The columns the prompt needs must be there and hold text (checked before the slow model load)."""
    if chat and ("messages" in example or "conversations" in example):
        chat_messages(example, recipe)
        return
    prompt_columns = RECIPES[recipe]["columns"][:-1]
    needed = prompt_columns[:1] if chat else prompt_columns
    missing = [c for c in needed if c not in example]
    require(not missing, f"the example lacks column(s) {missing} needed by the {recipe} recipe")
    not_text = [c for c in needed if not isinstance(example[c], str)]
    require(not not_text, f"the example's column(s) {not_text} must hold text")


def prompt_ids(tokenizer, recipe, example, chat=None):
    """Token ids of the prompt, exactly as the training data laid them out before the response. `chat`: the name
    of a chat format (or True for auto), for a conversation."""
    chat = "auto" if chat is True else chat
    check_example(example, recipe, chat)
    if chat:
        conversation = chat_messages(example, recipe)
        return chat_format(tokenizer, chat).prompt(conversation["messages"], conversation["tools"])
    response_column = RECIPES[recipe]["columns"][-1]
    parts = RECIPES[recipe]["build_prompt"](dict(example, **{response_column: ""}))
    text = parts["head"] + parts["body"] + parts["tail"]
    return leading_special_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def inference_dtype() -> torch.dtype:
    """bf16 on a GPU that has it: a 13B model in fp32 (52 GB) does not fit the 24/48 GB cards; fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_model(model_dir, trust_remote_code=False):
    """Tokenizer and model of a saved folder; anything unreadable in it is one error line, and so is code the
    folder ships unless `trust_remote_code`."""
    path = Path(model_dir).expanduser()
    require(path.exists() or not looks_like_path(model_dir), f"no such model folder: {model_dir}")
    require(path.is_dir() or not path.exists(), f"--model-dir {model_dir} is not a folder")
    require_local_or_reachable(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=inference_dtype(),
                                                     trust_remote_code=trust_remote_code)
    except Exception as exc:  # a truncated or garbled file raises whatever its reader raises
        if asks_for_remote_code(exc):
            raise remote_code_error(model_dir) from None
        reason = damaged_weight_file(model_dir) or root_cause_message(exc)
        raise FinetuneError(f"cannot load a model from {model_dir!r}: {reason}") from None
    return tokenizer, model


def generation_budget(model, prompt_length, max_new_tokens):
    """--max-new-tokens, capped so that prompt and continuation fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return max_new_tokens
    room = limit - prompt_length
    require(room > 0, f"the prompt has {prompt_length} tokens and the model holds {limit} positions; "
                      "shorten the example")
    if max_new_tokens > room:
        print(f"note: generating at most {room} tokens, not {max_new_tokens}: the model holds {limit} positions "
              f"and the prompt takes {prompt_length}")
    return min(max_new_tokens, room)


def check_prompt(model, ids, args):
    """The prompt's ids must be in the model's vocabulary. Returns how many tokens may follow it."""
    vocab = model.get_input_embeddings().num_embeddings
    require(max(ids) < vocab, f"the prompt has token id {max(ids)} but the model only {vocab} embeddings: the "
                              f"tokenizer{' (or the --chat format)' if args.chat else ''} does not match the model")
    return generation_budget(model, len(ids), args.max_new_tokens)


def generate(model, tokenizer, ids, args, eos_ids, sample, max_new_tokens):
    """The continuation of `ids` as text: greedy, or sampled with --temperature/--top-p/--top-k."""
    input_ids = torch.tensor([ids], device=model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if sample \
        else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
                                attention_mask=torch.ones_like(input_ids), **settings)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


def interactive_chat(model, tokenizer, args):
    """A multi-turn chat on the terminal: every turn is prompted with the whole conversation so far."""
    fmt = chat_format(tokenizer, args.chat_format)
    print(f"chat format {fmt.name}; /reset starts over, /quit or Ctrl-D ends", flush=True)
    history = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/quit":
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = fmt.prompt(history)
        torch.manual_seed(args.seed + len(history))
        reply = generate(model, tokenizer, ids, args, fmt.end_of_turn_ids(), True, check_prompt(model, ids, args))
        reply = reply.strip()
        print(f"model> {reply}   ({len(ids)} prompt tokens)", flush=True)
        history.append({"role": "assistant", "content": reply or "..."})


@entry_point
def main(argv=None):
    args = parse_args(argv)
    interactive = args.chat and args.example is None and args.example_file is None and sys.stdin.isatty()
    example = None if interactive else load_example(args)
    if example is not None:
        check_example(example, args.recipe, args.chat)
    adapter = read_adapter(args.adapter, args.model_dir) if args.adapter else None
    tokenizer, model = load_model(args.model_dir, args.trust_remote_code)
    if args.adapter:
        from peft import PeftModel
        check_targets_fit(*adapter, model, args.adapter, args.model_dir)
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: an adapter made for another model
            raise FinetuneError(f"cannot apply the adapter {args.adapter!r}: {str(exc).splitlines()[0]}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if interactive:
        return interactive_chat(model, tokenizer, args)

    ids = prompt_ids(tokenizer, args.recipe, example, args.chat and args.chat_format)
    eos_ids = chat_format(tokenizer, args.chat_format).end_of_turn_ids() if args.chat else tokenizer.eos_token_id
    max_new_tokens = check_prompt(model, ids, args)
    print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids, skip_special_tokens=True)}")
    greedy = generate(model, tokenizer, ids, args, eos_ids, False, max_new_tokens)
    torch.manual_seed(args.seed)
    sampled = generate(model, tokenizer, ids, args, eos_ids, True, max_new_tokens)
    for name, text in (("greedy", greedy), ("sampled", sampled)):
        print(f"--- {name} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
