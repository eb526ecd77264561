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
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)
from finetune.demo import DEMO_SAMPLE_FILES
from finetune.preparation import leading_special_ids
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
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed for the sampled continuation (default 0)")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0 or args.temperature <= 0:
        raise SystemExit("error: --max-new-tokens and --temperature must be positive")
    return args


def load_example(args):
    """The example to prompt with, as a dict of the recipe's columns."""
    if args.example:
        try:
            example = json.loads(args.example)
        except ValueError as exc:
            raise SystemExit(f"error: --example is not valid JSON ({exc})")
    else:
        path = args.example_file or DEMO_SAMPLE_FILES.get(args.recipe)
        if path is None:
            raise SystemExit(f"error: no bundled examples for recipe {args.recipe!r}; pass --example or --example-file")
        try:
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            example = json.loads(lines[args.index])
        except (OSError, ValueError, IndexError) as exc:
            raise SystemExit(f"error: cannot read example {args.index} of {path!r} ({exc.__class__.__name__})")
    if not isinstance(example, dict):
        raise SystemExit("error: the example must be a JSON object")
    return example


def prompt_ids(tokenizer, recipe, example, chat):
    """Token ids of the prompt, exactly as the training data laid them out before the response."""
    columns = RECIPES[recipe]["columns"]
    prompt_columns, response_column = columns[:-1], columns[-1]
    missing = [c for c in (prompt_columns[:1] if chat else prompt_columns) if c not in example]
    if missing:
        raise SystemExit(f"error: the example lacks column(s) {missing} needed by the {recipe} recipe")
    if chat:
        question = example[prompt_columns[0]]
        return modeling_baichuan.build_chat_input(tokenizer, [{"role": "user", "content": question}])
    parts = RECIPES[recipe]["build_prompt"](dict(example, **{response_column: ""}))
    text = parts["head"] + parts["body"] + parts["tail"]
    return leading_special_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def main(argv=None):
    args = parse_args(argv)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load a model from {args.model_dir!r}: {str(exc).splitlines()[0]}")
    if args.adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: an adapter made for another model
            raise SystemExit(f"error: cannot apply the adapter {args.adapter!r}: {str(exc).splitlines()[0]}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    ids = prompt_ids(tokenizer, args.recipe, load_example(args), args.chat)
    input_ids = torch.tensor([ids], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
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
