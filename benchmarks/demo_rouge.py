"""Does the Llama demo learn to summarise? ROUGE-1 of greedy summaries on the held-out demo articles.

    HF_HUB_OFFLINE=1 python train_llama2.py --demo
    HF_HUB_OFFLINE=1 python benchmarks/demo_rouge.py --model-dir ./llama2_demo_output

"before" is the untrained demo model (demo.ensure_demo_model("llama2"), the weights --demo starts from);
"after" is the folder given with --model-dir. Both write a greedy summary for every article of the validation
split that training held out (prepare_dataset's split: seed 0, 5 percent of data/llama2_sample.jsonl), from the
same prompt as inference.py (its own prompt_ids): the llama2 recipe with an empty response.

ROUGE-1 F1 here is plain unigram overlap: lowercase, split on anything that is not a letter or a digit, count
the words the summary shares with the reference highlights (each word at most as often as the reference has it),
F1 of that count's precision and recall; the figure is the mean over articles. Fixed wording alone scores
well on ROUGE-1, so the share of the reference's names and numbers (capitalised words after a line's first
word, and numbers) that the summary repeats is printed too. It is a benchmark, not a test: it prints figures,
it does not judge them. The last line printed is one JSON object with the figures.
"""
import argparse
import json
import os
import re
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
from finetune.data.preparation import split_train_validation  # noqa: E402
from finetune.data.raw_data import load_raw_dataset  # noqa: E402

RECIPE = "llama2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="trained model folder to score as \"after\" (default: score \"before\" only)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="summary length limit in tokens (default 96)")
    p.add_argument("--limit", type=int, help="score only the first N held-out articles (default: all)")
    p.add_argument("--show", type=int, default=1, help="held-out articles to print next to their summaries (default 1)")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0 or (args.limit is not None and args.limit <= 0) or args.show < 0:
        raise SystemExit("error: --max-new-tokens and --limit must be positive, --show not negative")
    return args


# ----------------------------------------------------------------------------------------------
# ROUGE-1
# ----------------------------------------------------------------------------------------------
def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_f1(summary, reference):
    """Unigram-overlap F1 between two texts (0.0 when either has no words)."""
    summary_words, reference_words = Counter(words(summary)), Counter(words(reference))
    overlap = sum((summary_words & reference_words).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(summary_words.values())
    recall = overlap / sum(reference_words.values())
    return 2 * precision * recall / (precision + recall)


def names_and_numbers(text):
    """Numbers, and capitalised words that do not start a line: the facts a summary has to copy."""
    found = []
    for line in text.splitlines():
        for position, word in enumerate(re.findall(r"[A-Za-z0-9]+", line)):
            if word.isdigit() or (position > 0 and word[0].isupper()):
                found.append(word.lower())
    return found


def fact_recall(summary, reference):
    """Share of the reference's names and numbers that the summary repeats (None if it has none)."""
    facts = Counter(names_and_numbers(reference))
    if not facts:
        return None
    return sum((Counter(words(summary)) & facts).values()) / sum(facts.values())


# ----------------------------------------------------------------------------------------------
# Held-out articles and greedy summaries
# ----------------------------------------------------------------------------------------------
def held_out_examples(limit=None):
    """The validation rows of the demo data, split exactly as prepare_dataset.prepare splits them by default."""
    raw = load_raw_dataset(demo.DEMO_SAMPLE_FILES[RECIPE])
    validation = split_train_validation(raw)["validation"]
    rows = [dict(row) for row in validation]
    return rows[:limit] if limit else rows


@torch.no_grad()
def greedy_summaries(folder, examples, max_new_tokens):
    tokenizer, model = inference.load_saved_model(folder)
    model.eval()
    summaries = []
    for example in examples:
        ids = torch.tensor([inference.prompt_ids(tokenizer, RECIPE, example, chat=False)])
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)
        summaries.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return summaries


def mean_score(score, summaries, examples):
    """Mean of score(summary, reference) over the articles where it is defined."""
    scores = [score(summary, example["highlights"]) for summary, example in zip(summaries, examples)]
    scores = [value for value in scores if value is not None]
    return sum(scores) / len(scores) if scores else 0.0


def show_example(example, summaries_by_name):
    lead = example["article"].split("\n")[0]
    print(f"--- article (first paragraph) ---\n{lead}\n--- reference highlights ---\n{example['highlights']}")
    for name, summary in summaries_by_name.items():
        print(f"--- greedy summary, {name} (ROUGE-1 F1 {rouge1_f1(summary, example['highlights']):.3f}) ---\n{summary}")
    print()


def main(argv=None):
    args = parse_args(argv)
    if args.model_dir and not Path(args.model_dir).is_dir():
        raise SystemExit(f"error: --model-dir {args.model_dir!r} is not a folder")
    torch.manual_seed(0)
    examples = held_out_examples(args.limit)
    folders = {"before": demo.ensure_demo_model(RECIPE)}
    if args.model_dir:
        folders["after"] = args.model_dir
    summaries = {name: greedy_summaries(folder, examples, args.max_new_tokens) for name, folder in folders.items()}
    for index in range(min(args.show, len(examples))):
        show_example(examples[index], {name: texts[index] for name, texts in summaries.items()})
    result = {"held_out_articles": len(examples), "max_new_tokens": args.max_new_tokens}
    for name, texts in summaries.items():
        result[f"rouge1_f1_{name}"] = round(mean_score(rouge1_f1, texts, examples), 4)
        result[f"fact_recall_{name}"] = round(mean_score(fact_recall, texts, examples), 4)
        print(f"{name}: ROUGE-1 F1 {result[f'rouge1_f1_{name}']:.4f}, names and numbers repeated "
              f"{result[f'fact_recall_{name}']:.4f} (means over {len(examples)} held-out articles)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
