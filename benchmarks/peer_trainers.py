"""The trainers a user would pick instead of our loop, timed the way bench_throughput.py times ours.

  hf_trainer             transformers.Trainer with DataCollatorForSeq2Seq: pads each batch to its longest example
  trl_packed             TRL's SFTTrainer with packing=True (its default best-fit "bfd" strategy: the rows of a
                         micro-batch laid end to end as one padding-free sequence)
  trl_unpacked           TRL's SFTTrainer without packing (pads each batch to its longest example)
  trl_packed_defaults    the same two with TRL's own split and checkpointing (step_settings.peer_defaults: the
  trl_unpacked_defaults  whole step in one micro-batch, gradient checkpointing on)

TRL is a benchmark dependency only, never one of the scripts: `pip install -r benchmarks/requirements.txt`
(trl==1.16.0). Every trainer gets the same model weights and the StepSettings of its run (step_settings.py): the
micro-batch and accumulation steps, activation checkpointing, fp32, the same AdamW and learning-rate schedule
objects as our loop builds (handed over with `optimizers=`), clipping; no logging, evaluation or saving, and no
loader workers. The prepared dataset goes in as it is (input_ids and labels, -100 where no loss is taken), so
every trainer learns the same targets. TRL keeps its own defaults otherwise, among them its per-step token
accuracy and entropy metrics.
"""
import contextlib
import copy
import io
import tempfile
import time

import torch
from step_settings import StepSettings, make_optimizer

IGNORE_INDEX = -100
PEERS = ("hf_trainer", "trl_packed", "trl_unpacked")
DEFAULTS_SUFFIX = "_defaults"
PEERS_AT_DEFAULTS = tuple(name + DEFAULTS_SUFFIX for name in PEERS if name.startswith("trl_"))


def counting_collator(collate, batches):
    """`collate`, recording each batch's real tokens and positions (padding-free batches have no padding)."""
    def collate_and_count(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        batches.append((int(mask.sum()) if mask is not None else batch["input_ids"].numel(),
                        batch["input_ids"].numel()))
        return batch
    return collate_and_count


def trainer_arguments(output_dir: str, settings: StepSettings, use_cpu: bool) -> dict:
    """TrainingArguments fields of a run with `settings` (the optimiser and schedule go in as objects)."""
    return dict(output_dir=output_dir, per_device_train_batch_size=settings.micro_batch_size,
                gradient_accumulation_steps=settings.accumulation_steps,
                activation_checkpointing=settings.activation_checkpointing, max_steps=settings.total_steps,
                learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
                max_grad_norm=settings.max_grad_norm, dataloader_num_workers=0, dataloader_drop_last=True,
                use_cpu=use_cpu, bf16=False, fp16=False, report_to="none", save_strategy="no", eval_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0)


def make_trainer(name, model, train_split, tokenizer, output_dir, settings, block_size, callbacks=()):
    """The peer `name` set up as a user would for this data, with the run's StepSettings."""
    use_cpu = next(model.parameters()).device.type == "cpu"
    arguments = trainer_arguments(output_dir, settings, use_cpu)
    optimizers = make_optimizer(model, settings)
    if name == "hf_trainer":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        return Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=train_split,
                       data_collator=collate, callbacks=list(callbacks), optimizers=optimizers)
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**arguments, packing=name.startswith("trl_packed"), max_length=block_size)
    return SFTTrainer(model=model, args=config, train_dataset=train_split, processing_class=tokenizer,
                      callbacks=list(callbacks), optimizers=optimizers)


def peer_tokenizer(tokenizer):
    tokenizer = copy.copy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # same pad id as our loop; masks hide it
    return tokenizer


def run_peer(name, model, train_split, tokenizer, settings, block_size, warmup_steps, profiler=None):
    """Seconds, CPU seconds, tokens, positions and per-step losses and seconds of the timed steps of peer `name`
    (the steps after the first `warmup_steps`; `profiler`, a torch.profiler.profile, records those steps)."""
    from transformers import TrainerCallback

    step_ends, micro_losses, losses = [], [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append((time.perf_counter(), time.process_time()))
            losses.append(float(sum(micro_losses)))  # each micro-batch's loss is already over the step's targets
            micro_losses.clear()
            if profiler is not None and len(step_ends) == warmup_steps:
                profiler.start()

    batches = []
    total = settings.total_steps
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as output_dir:
        trainer = make_trainer(name, model, train_split, peer_tokenizer(tokenizer), output_dir, settings, block_size,
                               [StepClock()])
        trainer.data_collator = counting_collator(trainer.data_collator, batches)
        training_step = trainer.training_step

        def recording_step(*step_args, **step_kwargs):
            loss = training_step(*step_args, **step_kwargs)
            micro_losses.append(loss.detach())
            return loss

        trainer.training_step = recording_step
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line
            trainer.train()
        if profiler is not None:
            profiler.stop()
    steps_seen = len(batches) // settings.accumulation_steps
    if len(step_ends) != total or steps_seen < total:
        raise SystemExit(f"error: {name} ran {len(step_ends)} steps on {len(batches)} batches, expected {total}")
    # batch k is collated for micro-step k: the warmup steps' come first
    timed = slice(warmup_steps * settings.accumulation_steps, total * settings.accumulation_steps)
    (wall_start, cpu_start), (wall_end, cpu_end) = step_ends[warmup_steps - 1], step_ends[-1]
    return {"seconds": wall_end - wall_start, "cpu_seconds": cpu_end - cpu_start, "steps": total - warmup_steps,
            "tokens": sum(tokens for tokens, _ in batches[timed]),
            "positions": sum(positions for _, positions in batches[timed]), "flops": None,
            "step_seconds_each": [b[0] - a[0] for a, b in zip(step_ends[warmup_steps - 1:], step_ends[warmup_steps:])],
            "losses": losses}
