"""Check a fine-tuned model: load a saved folder and continue a recipe-formatted prompt, greedy and sampled.

  python inference.py --model-dir ./llama2_13b_finetuned --recipe llama2 \
      --example '{"article": "The city council voted on Tuesday to ..."}'
  python inference.py --model-dir ./baichuan2_demo_output --recipe baichuan2 --example-file data/baichuan2_sample.jsonl --index 3
  python inference.py --model-dir ./baichuan2_13b_finetuned --recipe baichuan2 --chat --example '{"instruction": "..."}'

The prompt is built by the same recipe function as the training data (prepare_dataset.py), with the response
left empty, so the model sees exactly what it was trained to continue. `--chat` uses Baichuan2's own chat
format (user/assistant tokens) instead.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)
from finetune.demo import DEMO_SAMPLE_FILES
from finetune.errors import exit_on_error
from finetune.hub import looks_like_path, require_local_or_reachable, root_cause_message
from finetune.preparation import leading_special_ids, require
from finetune.remote_code import asks_for_remote_code, remote_code_error
from finetune.saved_adapter import check_targets_fit, read_adapter
from finetune.weight_files import damaged_weight_file
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
    p.add_argument("--chat", action="store_true", help="Baichuan2 chat format instead of the recipe prompt")
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
            raise SystemExit(f"error: --example is not valid JSON ({exc})") from None
    else:
        path = args.example_file or DEMO_SAMPLE_FILES.get(args.recipe)
        if path is None:
            raise SystemExit(f"error: no bundled examples for recipe {args.recipe!r}; pass --example or --example-file")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SystemExit(f"error: cannot read --example-file {path!r} ({reason})") from None
        require(args.index < len(lines), f"--index {args.index} is past the end of {path!r} ({len(lines)} examples)")
        try:
            example = json.loads(lines[args.index])
        except ValueError as exc:
            raise SystemExit(f"error: example {args.index} of {path!r} is not valid JSON ({exc})") from None
    require(isinstance(example, dict), "the example must be a JSON object")
    return example


def check_example(example, recipe, chat):
    """The columns the prompt needs must be there and hold text (checked before the slow model load)."""
    prompt_columns = RECIPES[recipe]["columns"][:-1]
    needed = prompt_columns[:1] if chat else prompt_columns
    missing = [c for c in needed if c not in example]
    require(not missing, f"the example lacks column(s) {missing} needed by the {recipe} recipe")
    not_text = [c for c in needed if not isinstance(example[c], str)]
    require(not not_text, f"the example's column(s) {not_text} must hold text")


def prompt_ids(tokenizer, recipe, example, chat):
    """Token ids of the prompt, exactly as the training data laid them out before the response."""
    check_example(example, recipe, chat)
    columns = RECIPES[recipe]["columns"]
    prompt_columns, response_column = columns[:-1], columns[-1]
    if chat:
        question = example[prompt_columns[0]]
        return modeling_baichuan.build_chat_input(tokenizer, [{"role": "user", "content": question}])
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
        raise SystemExit(f"error: cannot load a model from {model_dir!r}: {reason}") from None
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


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    example = load_example(args)
    check_example(example, args.recipe, args.chat)
    adapter = read_adapter(args.adapter, args.model_dir) if args.adapter else None
    tokenizer, model = load_model(args.model_dir, args.trust_remote_code)
    require(not args.chat or model.config.model_type == "baichuan",
            f"--chat is Baichuan2's chat format; {args.model_dir!r} holds a {model.config.model_type} model")
    if args.adapter:
        from peft import PeftModel
        check_targets_fit(*adapter, model, args.adapter, args.model_dir)
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: an adapter made for another model
            raise SystemExit(f"error: cannot apply the adapter {args.adapter!r}: {str(exc).splitlines()[0]}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    ids = prompt_ids(tokenizer, args.recipe, example, args.chat)
    vocab = model.get_input_embeddings().num_embeddings
    require(max(ids) < vocab, f"the prompt has token id {max(ids)} but the model only {vocab} embeddings: the "
                              f"tokenizer{' (or the --chat format)' if args.chat else ''} does not match the model")
    max_new_tokens = generation_budget(model, len(ids), args.max_new_tokens)
    input_ids = torch.tensor([ids], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                  attention_mask=torch.ones_like(input_ids))
    print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids, skip_special_tokens=True)}")
    with torch.no_grad():
        greedy = model.generate(input_ids, do_sample=False, **common)
        torch.manual_seed(args.seed)
        sampled = model.generate(input_ids, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, **common)
    for name, output in (("greedy", greedy), ("sampled", sampled)):
        text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        print(f"--- {name} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
