"""Turn a text data set into tokenized fine-tuning examples: one row per example, columns input_ids and labels.

    python prepare_dataset.py llama2      # summarisation (the Llama 2 tutorial; cnn_dailymail 3.0.0)
    python prepare_dataset.py baichuan2   # customer-support chat (the Baichuan2 tutorial; bitext)
    python prepare_dataset.py llama2 --demo --save-path /tmp/llama2_demo   # offline: tiny tokenizer, bundled data
    python prepare_dataset.py chat --dataset-name-or-path chats.jsonl     # conversations (messages / conversations)
    python prepare_dataset.py llama2 --dataset-name-or-path a.jsonl b.jsonl --dataset-weights 3 1   # a mixture

A recipe is one small function in finetune/data/recipes.py that splits an example into a prompt (head, body,
tail) and a response; to change the prompt, copy a recipe function there and edit its strings.

Loss is taken on the response and EOS only (prompt labels are -100) unless --train-on-prompt is given.
The `chat` recipe takes conversations instead (finetune/data/chat.py): each row becomes one example in the model's
own chat format, with the loss on every assistant reply and its end-of-turn token(s).
The output is a datasets.DatasetDict written with save_to_disk (splits train and validation) plus a
prepare_report.json with the numbers printed at the end.
"""

import argparse

import datasets

from finetune import demo
from finetune.data.chat import CHAT_FORMATS, REASONING_CHOICES
from finetune.data.chat_preparation import format_chat_report, normalize_conversations, prepare_chat
from finetune.data.mixing import check_weights, format_mixing_report, mix_sources
from finetune.data.output import claim_save_path, write_output
from finetune.data.preparation import check_columns, format_report, prepare, require
from finetune.data.raw_data import load_raw_dataset, load_tokenizer
from finetune.data.recipes import RECIPES, demo_sample_file
from finetune.errors import FinetuneError, entry_point


def build_parser():
    parser = argparse.ArgumentParser(
        description="Tokenize a data set for fine-tuning: one row per example, columns input_ids and labels "
                    "(-100 where no loss is taken), saved with DatasetDict.save_to_disk.")
    parser.add_argument("recipe", choices=sorted(RECIPES),
                        help="llama2: summarisation ([SUMMARIZE] article [/SUMMARIZE] summary); "
                             "baichuan2: customer-support chat ([INST] question ... [/INST] answer); "
                             "chat: conversations (messages or conversations), in the model's own chat format")
    parser.add_argument("--model-name-or-path", default=None,
                        help="tokenizer: hub id or local folder (default: meta-llama/Llama-2-13b-hf for llama2, "
                             "baichuan-inc/Baichuan2-13B-Base for baichuan2; the demo tokenizer with --demo)")
    parser.add_argument("--dataset-name-or-path", default=None, nargs="+",
                        help="hub id, or a local file (json, jsonl, csv, parquet, arrow) or folder (save_to_disk output "
                             "or data files); needs columns article, highlights (llama2) or instruction, category, "
                             "intent, response (baichuan2) or messages / conversations (chat). Several sources are "
                             "mixed (see --dataset-weights). Default: cnn_dailymail 3.0.0 / bitext customer support; "
                             "the bundled sample with --demo")
    parser.add_argument("--dataset-weights", type=float, nargs="+", default=None,
                        help="one weight per source of --dataset-name-or-path: their proportions in the training "
                             "mixture, over- or under-sampled with --seed (default: 1 each)")
    parser.add_argument("--chat-format", choices=CHAT_FORMATS, default="auto",
                        help="chat recipe: baichuan2 (its fine-tune.py layout, tokens 195/196), llama2 (Meta's "
                             "[INST] <<SYS>> layout), template (the tokenizer's chat_template), or auto: baichuan2 "
                             "for Baichuan tokenizers, else template if the tokenizer has one, else llama2")
    parser.add_argument("--train-on-turns", choices=("all", "last"), default="all",
                        help="chat recipe: loss on all assistant replies or only the last (default: all)")
    parser.add_argument("--reasoning", choices=REASONING_CHOICES, default="auto",
                        help="chat recipe: where assistant reasoning (reasoning_content, or a <think> block in the "
                             "data) goes: auto (default): where the chat template shows it, else inline; inline: "
                             "inside the reply text as <think>...</think>; drop: left out. Counted in the report")
    parser.add_argument("--strict", action="store_true",
                        help="chat recipe: a conversation that cannot be used is an error (default: it is dropped "
                             "and counted by reason in prepare_report.json, with its row numbers)")
    parser.add_argument("--dataset-config-name", default=None,
                        help="configuration of a hub data set (default: 3.0.0 for cnn_dailymail)")
    parser.add_argument("--block-size", type=int, default=1024,
                        help="most tokens one example may keep; longer prompts are cut first (default: 1024)")
    parser.add_argument("--save-path", default=None,
                        help="output folder (default: ./llama2_dataset or ./baichuan2_dataset); an existing folder "
                             "is replaced only if it is a previous output of this script")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: embedded tiny tokenizer and bundled sample data "
                             "(explicit --model-name-or-path / --dataset-name-or-path still win)")
    parser.add_argument("--train-on-prompt", action="store_true",
                        help="take the loss on the prompt too (default: only on the response and EOS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    parser.add_argument("--validation-fraction", type=float, default=0.05,
                        help="share of train held out for validation when the source has no validation split "
                             "(default: 0.05; 0 for none)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="use only the first N examples of each source split, for quick tries (default: all)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow tokenizer code shipped in the model folder (its auto_map) to run")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    require(args.block_size >= 1, f"--block-size must be a positive integer, got {args.block_size}")
    require(args.seed >= 0, f"--seed must be a non-negative integer, got {args.seed}")
    require(0 <= args.validation_fraction < 1,
            f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    require(args.max_examples is None or args.max_examples >= 1,
            f"--max-examples must be a positive integer, got {args.max_examples}")
    require(args.dataset_weights is None or args.dataset_name_or_path is not None or args.demo,
            "--dataset-weights needs the sources in --dataset-name-or-path")
    return args


def recipe_columns(recipe_name, split, split_name):
    """Only the columns the recipe reads, in one layout per recipe, so that several sources can be mixed."""
    if recipe_name == "chat":
        return normalize_conversations(split, split_name)
    from datasets import DatasetDict, Features, Value

    columns = RECIPES[recipe_name]["columns"]
    check_columns(DatasetDict({split_name: split}), recipe_name, columns)
    kept = split.select_columns(list(columns))
    return kept.cast(Features({name: Value("string") for name in columns}))


def load_sources(args, recipe, dataset_names, config_name):
    """The raw data: one source as it is, several mixed by --dataset-weights. Returns (DatasetDict, mixing report)."""
    weights = check_weights(dataset_names, args.dataset_weights)
    if len(dataset_names) == 1:
        return load_raw_dataset(dataset_names[0], config_name), None
    sources = {}
    for name in dataset_names:
        raw = load_raw_dataset(name, config_name)
        if args.max_examples:
            raw = raw.__class__({split: rows.select(range(min(args.max_examples, len(rows))))
                                 for split, rows in raw.items()})
        sources[name] = raw.__class__({split: recipe_columns(args.recipe, rows, split) for split, rows in raw.items()})
    return mix_sources(sources, weights, seed=args.seed, validation_fraction=args.validation_fraction)


def run(args):
    recipe = RECIPES[args.recipe]
    save_path = args.save_path or recipe["save_path"]
    if args.demo:  # the tiny demo tokenizer of the recipe's model family serves any recipe
        model = args.model_name_or_path or demo.ensure_demo_tokenizer(demo.family_of(recipe["model"]))
        dataset_names = args.dataset_name_or_path or [demo_sample_file(args.recipe)]
    else:
        model = args.model_name_or_path or recipe["model"]
        dataset_names = args.dataset_name_or_path or [recipe["dataset"]]
    if dataset_names == [None]:
        raise FinetuneError(f"the {args.recipe} recipe has no default data set; pass --dataset-name-or-path")
    config_name = args.dataset_config_name
    if config_name is None and dataset_names == [recipe["dataset"]]:
        config_name = recipe["dataset_config"]

    # Claimed before tokenization: a foreign folder or a concurrent run into the same path fails at once.
    with claim_save_path(save_path) as target:
        tokenizer = load_tokenizer(model, args.trust_remote_code)
        raw, mixing = load_sources(args, recipe, dataset_names, config_name)
        datasets.enable_progress_bars()  # loading stays quiet; tokenising shows its progress
        max_examples = args.max_examples if mixing is None else None  # a mixture was capped per source
        if args.recipe == "chat":
            dataset, report = prepare_chat(tokenizer, raw, block_size=args.block_size,
                                           chat_format_name=args.chat_format, train_on_turns=args.train_on_turns,
                                           seed=args.seed, validation_fraction=args.validation_fraction,
                                           max_examples=max_examples, reasoning=args.reasoning, strict=args.strict)
        else:
            dataset, report = prepare(args.recipe, recipe, tokenizer, raw, block_size=args.block_size,
                                      train_on_prompt=args.train_on_prompt, seed=args.seed,
                                      validation_fraction=args.validation_fraction, max_examples=max_examples)
        report["tokenizer"] = str(model)
        report["dataset"] = " ".join(map(str, dataset_names))
        if mixing is not None:
            report["sources"] = mixing
        written = write_output(dataset, report, target)
    print(format_report(report))
    if args.recipe == "chat":
        print(format_chat_report(report))
    if mixing is not None:
        print(format_mixing_report(mixing))
    print(f"saved to {written}")
    return written


@entry_point  # a bad input: one `error:` line, exit status 1
def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # the output folder is already back as it was (see write_output)
        raise FinetuneError("interrupted; --save-path is unchanged") from None


if __name__ == "__main__":
    main()
