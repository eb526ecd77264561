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
chat that keeps the history (/reset starts over, /quit, Ctrl-D or Ctrl-C at the prompt ends, Ctrl-C during a reply
drops that exchange); with no example and standard input not a terminal, each line read from it is a message
(`echo "Hi" | python inference.py --model-dir DIR --chat`). A conversation past the model's positions drops its
oldest exchanges, with a note; a message that cannot fit alone is refused and the chat goes on.
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
from finetune.model.gguf import refuse_gguf
from finetune.model.hub import looks_like_path, require_local_or_reachable, root_cause_message
from finetune.model.remote_code import asks_for_remote_code, remote_code_error
from finetune.model.weight_files import WEIGHT_SUFFIXES, damaged_weight_file
from finetune.data.recipes import RECIPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder written by a training script (or any HF model folder); "
                                                      "with --adapter, the base model")
    p.add_argument("--adapter", help="a LoRA adapter folder (a training script's <save dir>/adapter) to apply to "
                                     "--model-dir")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="llama2", help="prompt format (default llama2)")
    p.add_argument("--example", help="the example as JSON, with the recipe's prompt columns")
    p.add_argument("--example-file", help="a .jsonl file of examples (default: the bundled sample data)")
    p.add_argument("--index", type=int, help="which line of --example-file (default 0; with --chat and no "
                                              "--example-file, asks for the bundled sample's line)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation in the model's chat format (see --chat-format) instead of the recipe prompt; "
                        "with no example: interactive on a terminal, else one message per line of standard input")
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
    require(args.index is None or args.index >= 0, f"--index must be a non-negative integer, got {args.index}")
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
    index = args.index or 0
    if args.example is not None:
        example = parse_json(args.example, "--example")
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
        require(index < len(lines), f"--index {index} is past the end of {path!r} ({len(lines)} examples)")
        example = parse_json(lines[index], f"example {index} of {path!r}")
    require(isinstance(example, dict), "the example must be a JSON object")
    return example


def parse_json(text, what):
    """The JSON value of `text`; one error line for text that is not JSON, is nested past the parser's depth, or
    holds a lone surrogate (a \\ud800 escape, or bytes that were not UTF-8: no tokenizer takes it as text)."""
    try:
        value = json.loads(text)
        surrogate = lone_surrogate(json.dumps(value, ensure_ascii=False))
    except ValueError as exc:
        raise FinetuneError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise FinetuneError(f"{what} is not valid JSON (nested too deep)") from None
    require(surrogate is None, f"{what} holds a lone surrogate ({surrogate!r}), which is not text")
    return value


def lone_surrogate(text):
    """The first character of `text` that cannot be encoded (a lone surrogate such as '\\ud800'), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


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


def load_saved_model(model_dir, trust_remote_code=False):
    """Tokenizer and model of a saved folder; anything unreadable in it is one error line, and so is code the
    folder ships unless `trust_remote_code`."""
    refuse_gguf(model_dir, "--model-dir")
    path = Path(model_dir).expanduser()
    require(path.exists() or not looks_like_path(model_dir), f"no such model folder: {model_dir}")
    require(path.is_dir() or not path.exists(), f"--model-dir {model_dir} is not a folder")
    if path.is_dir():
        check_has_weights(path)
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


def check_has_weights(folder):
    """A local model folder must hold weights; a run saved with --save-dtype none wrote only its tokenizer and
    plan, and is named as such rather than blamed for the config.json it also lacks."""
    if any(found.is_file() for suffix in WEIGHT_SUFFIXES for found in folder.glob(f"*{suffix}")):
        return
    try:
        saved = json.loads((folder / "parallel_plan.json").read_text()).get("saved_dtype")
    except (OSError, ValueError, AttributeError):  # absent, unreadable, or not an object: not one of our runs
        saved = None
    if saved == "none":
        raise FinetuneError(f"{folder} holds no model weights: its run was saved with --save-dtype none (timing "
                            f"runs); train with --save-dtype compute or fp32 to load it here")
    raise FinetuneError(f"{folder} holds no model weights (no *.safetensors or *.bin file)")


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


CHAT_COMMANDS = "/reset starts over, /quit or Ctrl-D ends (a message that starts with / : type //)"
# A token is rarely more than a few characters, never a hundred: a line longer than this many characters per
# position cannot fit the model, and is refused before it is tokenised (a 1 MB paste takes no time).
MAX_CHARS_PER_POSITION = 100


def read_line(terminal):
    """The next line typed or piped, stripped; None at the end of input. A line that is not UTF-8 is ''
    (after saying so): nothing is sent for it."""
    try:
        line = input("you> " if terminal else "")
        readable = lone_surrogate(line) is None  # undecodable bytes, where stdin escapes them (a C locale)
    except EOFError:
        if terminal:
            print()
        return None
    except UnicodeDecodeError:  # where stdin decodes strictly
        readable = False
    if not readable:
        print("(that line is not UTF-8 text; nothing was sent)", flush=True)
        return ""
    return line.strip()


def fit_history(fmt, history, positions, max_new_tokens):
    """The prompt ids of `history` (ending with the new user message), dropping the oldest exchanges while the
    prompt and --max-new-tokens do not fit the model's `positions`; None when the message cannot fit alone.
    `history` is cut in place, and a note says what was dropped."""
    if positions is not None and len(fmt.prompt(history[-1:])) >= positions:
        return None  # the earlier turns are kept: only this message is refused
    ids = fmt.prompt(history)
    dropped = 0
    while positions is not None and len(ids) + max_new_tokens > positions and len(history) > 1:
        del history[:2]  # the oldest user message and its reply
        dropped += 2
        ids = fmt.prompt(history)
    if dropped:
        print(f"(dropped the {dropped} oldest turns: the conversation passed the model's {positions} positions)",
              flush=True)
    return ids


def interactive_chat(model, tokenizer, args, terminal=True):
    """A multi-turn chat on the terminal (or one message per line of piped input): every turn is prompted with
    the whole conversation so far, or as much of it as the model's positions hold. Ctrl-C at the prompt ends
    the chat; during a reply it drops that exchange and the chat goes on. Returns the exit status."""
    fmt = chat_format(tokenizer, args.chat_format)
    positions = getattr(model.config, "max_position_embeddings", None)
    if terminal:
        print(f"chat format {fmt.name}; {CHAT_COMMANDS}; Ctrl-C stops a reply", flush=True)
    history, messages = [], 0
    while True:
        try:
            line = read_line(terminal)
        except KeyboardInterrupt:
            print("\n(chat ended)", flush=True)
            return 0
        if line is None or line == "/quit":
            break
        if line == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if line.startswith("/") and not line.startswith("//"):
            print(f"(unknown command {line.split()[0]}; nothing was sent. {CHAT_COMMANDS})", flush=True)
            continue
        line = line[1:] if line.startswith("//") else line
        if not line:
            continue
        messages += 1
        if positions is not None and len(line) > MAX_CHARS_PER_POSITION * positions:
            print(f"(that message has {len(line)} characters, more than the model's {positions} positions can "
                  f"hold; nothing was sent)", flush=True)
            continue
        try:
            history.append({"role": "user", "content": line})
            ids = fit_history(fmt, history, positions, args.max_new_tokens)
            if ids is None:
                history.pop()
                print(f"(that message alone takes more than the model's {positions} positions; nothing was sent)",
                      flush=True)
                continue
            torch.manual_seed(args.seed + len(history))
            reply = generate(model, tokenizer, ids, args, fmt.end_of_turn_ids(), True,
                             check_prompt(model, ids, args)).strip()
        except KeyboardInterrupt:
            if history and history[-1]["role"] == "user":
                history.pop()
            print("\n(reply stopped; that message and its reply are left out of the conversation)", flush=True)
            continue
        print(f"model> {reply}   ({len(ids)} prompt tokens)", flush=True)
        history.append({"role": "assistant", "content": reply or "..."})
    require(terminal or messages, "--chat read no message from standard input; pipe the messages in (one a line), "
                                  "run it on a terminal, or pass --example or --example-file")
    return 0


@entry_point
def main(argv=None):
    args = parse_args(argv)
    # --chat with no example: a chat on the terminal, or the messages piped in (--index asks for the bundled sample).
    chatting = args.chat and args.example is None and args.example_file is None and (
        sys.stdin.isatty() or args.index is None)
    example = None if chatting else load_example(args)
    if example is not None:
        check_example(example, args.recipe, args.chat)
    adapter = read_adapter(args.adapter, args.model_dir) if args.adapter else None
    tokenizer, model = load_saved_model(args.model_dir, args.trust_remote_code)
    if args.adapter:
        from peft import PeftModel
        check_targets_fit(*adapter, model, args.adapter, args.model_dir)
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: an adapter made for another model
            raise FinetuneError(f"cannot apply the adapter {args.adapter!r}: {str(exc).splitlines()[0]}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if chatting:
        return interactive_chat(model, tokenizer, args, terminal=sys.stdin.isatty())

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
