"""The trainers a user would pick instead of our loop, timed the way bench_throughput.py times ours.

  hf_trainer     transformers.Trainer with DataCollatorForSeq2Seq: pads each batch to its longest example, no packing
  trl_packed     TRL's SFTTrainer with packing=True (its default best-fit "bfd" strategy, padding-free batches)
  trl_unpacked   TRL's SFTTrainer without packing (pads each batch to its longest example)

TRL is a benchmark dependency only, never one of the scripts: `pip install -r benchmarks/requirements.txt`
(trl==1.16.0). Every trainer gets the same model weights, fp32, `--batch-size` rows per optimiser step,
torch AdamW with the same learning rate, gradient clipping at 1.0, no logging, evaluation or saving, and no
loader workers. The prepared dataset goes in as it is (input_ids and labels, -100 where no loss is taken), so
every trainer learns the same targets. TRL keeps its own defaults otherwise, among them gradient checkpointing
(on in TRL; `gradient_checkpointing=False` via --trl-gradient-checkpointing off) and its per-step token accuracy
and entropy metrics.
"""
import contextlib
import copy
import io
import tempfile
import time

import torch

IGNORE_INDEX = -100
PEERS = ("hf_trainer", "trl_packed", "trl_unpacked")


def counting_collator(collate, batches):
    """`collate`, recording each batch's real tokens and positions (padding-free batches have no padding)."""
    def collate_and_count(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        batches.append((int(mask.sum()) if mask is not None else batch["input_ids"].numel(),
                        batch["input_ids"].numel()))
        return batch
    return collate_and_count


def common_arguments(output_dir, args, learning_rate):
    """TrainingArguments fields every peer shares: the same step, optimiser and precision as our loop."""
    return dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                max_steps=args.warmup_steps + args.steps, learning_rate=learning_rate, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", dataloader_num_workers=0, dataloader_drop_last=True,
                use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", eval_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0)


def make_trainer(name, model, train_split, tokenizer, output_dir, args, learning_rate, callbacks):
    """The peer `name` set up as a user would for this data."""
    if name == "hf_trainer":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        return Trainer(model=model, args=TrainingArguments(**common_arguments(output_dir, args, learning_rate)),
                       train_dataset=train_split, data_collator=collate, callbacks=callbacks)
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**common_arguments(output_dir, args, learning_rate), packing=name == "trl_packed",
                       max_length=args.block_size, gradient_checkpointing=args.trl_gradient_checkpointing == "on")
    return SFTTrainer(model=model, args=config, train_dataset=train_split, processing_class=tokenizer,
                      callbacks=callbacks)


def run_peer(name, model, train_split, tokenizer, args, learning_rate):
    """Seconds, CPU seconds and tokens of the timed steps of peer `name` (after `--warmup-steps` steps)."""
    from transformers import TrainerCallback

    tokenizer = copy.copy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # same pad id as our loop; masks hide it
    step_ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append((time.perf_counter(), time.process_time()))

    batches = []
    total = args.warmup_steps + args.steps
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as output_dir:
        trainer = make_trainer(name, model, train_split, tokenizer, output_dir, args, learning_rate, [StepClock()])
        trainer.data_collator = counting_collator(trainer.data_collator, batches)
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line
            trainer.train()
    if len(step_ends) != total or len(batches) < total:
        raise SystemExit(f"error: {name} ran {len(step_ends)} steps on {len(batches)} batches, expected {total}")
    timed = slice(args.warmup_steps, total)  # batch k is collated for step k, the warmup steps' come first
    (wall_start, cpu_start), (wall_end, cpu_end) = step_ends[args.warmup_steps - 1], step_ends[-1]
    return {"seconds": wall_end - wall_start, "cpu_seconds": cpu_end - cpu_start, "steps": args.steps,
            "tokens": sum(tokens for tokens, _ in batches[timed]),
            "positions": sum(positions for _, positions in batches[timed]), "flops": None}
