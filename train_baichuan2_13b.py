"""Fine-tune Baichuan2 (13B by default) on a dataset made by `prepare_dataset.py baichuan2`.

The model is our own `modeling_baichuan.py` (importing it registers Baichuan with the Auto classes), so the
released checkpoints load without `trust_remote_code`. The loop below is ordinary PyTorch: forward,
loss.backward(), optimiser step, zero_grad. One call before the model is loaded,
`enable_advanced_parallelization()`, decides how the job runs, so the same command works on:

  CPU or one GPU:
      python train_baichuan2_13b.py --batch-size 32
  one node, 8 GPUs:
      torchrun --standalone --nnodes=1 --nproc_per_node=8 train_baichuan2_13b.py --batch-size 256
  two nodes (run on each node):
      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=100 --rdzv_backend=c10d \\
          --rdzv_endpoint=$MASTER_ADDR:29400 train_baichuan2_13b.py --batch-size 256
  MoAI Platform (the hook turns on Advanced Parallelization):
      python train_baichuan2_13b.py --batch-size 256
  offline demo (tiny model and bundled data, a few minutes on a CPU):
      python train_baichuan2_13b.py --demo
"""
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import modeling_baichuan  # noqa: F401  (registers Baichuan with the Auto classes)
from finetune import demo, enable_advanced_parallelization
from finetune.args import parse_run_config
from finetune.checkpoint.checkpointer import Checkpointer
from finetune.checkpoint.export import save_final_model
from finetune.data import batches, recipes
from finetune.errors import entry_point
from finetune.model.loading import load_model
from finetune.observe.metrics import MetricsLog
from finetune.plan.layout import choose_layout, confirm_on_device, describe_parallel_plan, plan_only
from finetune.training import NonFiniteGuard, Validation, clip_grad_norm, set_seed, warmup_cosine_schedule

RECIPE = "baichuan2"
DEFAULTS = dict(model="baichuan-inc/Baichuan2-13B-Base", dataset="./baichuan2_dataset",
                save_dir="./baichuan2_13b_finetuned", epochs=1, batch_size=256, lr=1e-5, log_interval=10)
DEMO_DEFAULTS = dict(save_dir="./baichuan2_demo_output", epochs=3, batch_size=4, lr=2e-3, log_interval=2,
                     eval_every=10)


def token_loss(logits, targets, batch, positions):
    """The training loss of each token of one chunk: `logits` (tokens x vocab, fp32), `targets` (tokens,), -100
    where no loss is taken (such tokens are left out of the sum whatever this returns); `positions` picks the
    chunk's tokens out of the flattened micro-batch (batch["input_ids"].flatten()[positions]). The model calls it
    a chunk of tokens at a time (--chunked-loss), so whole logits never exist. Edit the loss here.
    """
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    # loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none", label_smoothing=0.1)  # smoothing
    # loss = loss + 1e-4 * torch.logsumexp(logits, dim=-1).square()  # z-loss: keeps the logits from drifting
    return loss


def forward(model, batch, num_items_in_batch, token_loss=token_loss):
    """The loss of one micro-batch: `token_loss` summed over its target tokens, divided by `num_items_in_batch`.
    Validation passes a token_loss of its own (plain cross-entropy and `validation_metrics`).

    Packed rows: each example attends only to itself (one causal attention call per example span, the fastest
    path on a CPU) and its positions restart at 0, as if it were alone in the row.
    """
    outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    example_spans=batch["example_spans"], labels=batch["labels"],
                    num_items_in_batch=num_items_in_batch, token_loss=partial(token_loss, batch=batch),
                    use_cache=False)
    return outputs.loss


def validation_metrics(logits, targets, batch, positions):
    """Figures validation adds to val_loss and val_accuracy, from the same chunks token_loss sees: {name: (sum,
    count)}; each is reported as val_<name>, the split's sum over its count (metrics.jsonl, the log line, the
    trackers, training_curves.png)."""
    figures = {}
    # counted = targets != -100; top5 = (logits.topk(5, dim=-1).indices == targets[:, None]).any(dim=-1)
    # figures["top5_accuracy"] = (top5 & counted).sum(), counted.sum()
    return figures


def demo_assets(block_size):
    """--demo: the embedded tiny model and the prepared sample data, built once and cached."""
    return demo.ensure_demo_model(RECIPE), recipes.demo_dataset(RECIPE, block_size)


@entry_point  # a bad input: one `error:` line (under torchrun, rank 0's), exit status 1
def main(argv=None):
    config = parse_run_config(__doc__, DEFAULTS, DEMO_DEFAULTS, demo_assets, argv)  # frozen, one section each

    # ---- the backend hook, before the model is loaded: MoAI, torchrun + FSDP2, one GPU, or the CPU --------
    backend = enable_advanced_parallelization(config.parallel.mixed_precision)
    if config.plan_only.enabled:
        return plan_only(config, backend)
    device = backend.device
    set_seed(config.training.seed)
    checkpoints = Checkpointer(config, backend, os.path.basename(__file__))  # refuses an unsafe folder early

    # ---- data ---------------------------------------------------------------------------------------------
    tokenizer, pad_id = batches.tokenizer_and_pad_id(config.model)
    train_table, eval_table = batches.load_token_tables(config.data)
    # Every epoch's order of rows, fixed by the seed and built when the epoch is reached: the schedule knows the
    # total, a resumed run its place.
    steps = batches.step_rows(train_table.lengths, config.data, config.training)
    total_steps = steps.total_steps
    layout = choose_layout(config, backend)  # micro-batch, accumulation, checkpointing, CPU offload

    # ---- model and optimiser ------------------------------------------------------------------------------
    model = load_model(backend, AutoModelForCausalLM, config.model, layout,
                       adapters=config.lora)  # --lora / --qlora: frozen base plus adapters
    # Freezing: requires_grad_(False) here, before the plan and the optimiser (docs/customising.md), e.g.
    # for layer in model.get_decoder().layers[:model.config.num_hidden_layers // 2]: layer.requires_grad_(False)
    batches.check_block_size(model.config, config.data.block_size)
    batches.check_token_ids(model.config, train_table, eval_table)  # data prepared with another tokenizer
    layout = confirm_on_device(model, backend, config, layout, forward)  # final: the probe may lower it
    parallel_plan = describe_parallel_plan(model, backend, config, layout)
    batch_format = batches.BatchFormat(layout.micro_batch_size, pad_id, config.data.pad_to)

    opt = config.optimizer
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],  # with LoRA: the adapters
                              lr=opt.lr, weight_decay=opt.weight_decay, fused=device.type == "cuda")
    scheduler = warmup_cosine_schedule(optim, total_steps, opt.warmup_ratio, opt.min_lr_ratio)
    # Registers model, optimiser, scheduler and loss once; 0, or the step of the checkpoint resumed from (which
    # must have run with the same optimiser, groups, schedule, trainable parameters and loss: --resume-changed).
    step = checkpoints.start(model, optim, scheduler, steps, parallel_plan, token_loss)

    save_dir = config.checkpoint.save_model_dir
    guard = NonFiniteGuard(config.training.skip_nonfinite, save_dir, backend)
    metrics = MetricsLog(save_dir, backend, model, config.logging, total_steps, step)  # + --report-to trackers
    validation = Validation(eval_table, batches.validation_rows(eval_table, config.data, config.training.seed),
                            forward, backend, batch_format, config.logging.eval_every, validation_metrics)

    # ---- training loop ------------------------------------------------------------------------------------
    model.train()
    # The progress bar closes before any error line, so the error stays the last line printed.
    with tqdm(total=total_steps, initial=step, disable=not backend.is_main, desc="train", dynamic_ncols=True) as bar:
        for epoch, loader in batches.epoch_loaders(train_table, steps, step, backend, batch_format,
                                                config.data.num_workers):
            for micro_batches, info in loader:  # one global batch: this process's micro-batches
                step_loss = torch.zeros((), device=device)
                attended_pairs = 0
                for batch in micro_batches:  # gradient accumulation
                    batch = batches.move_to(batch, device)
                    with backend.autocast():
                        # Normalised by the target tokens of the whole global batch (all micro-batches, all
                        # processes), so the update does not depend on how the batch is split.
                        loss = forward(model, batch, num_items_in_batch=info["step_targets"])
                    loss.backward()
                    step_loss += loss.detach()
                    attended_pairs += batch["attended_pairs"]

                grad_norm = clip_grad_norm(model, opt.max_grad_norm)
                if guard.update_is_finite(step_loss, grad_norm, step + 1):
                    optim.step()
                scheduler.step()  # a skipped update still counts, so the step keeps matching the data consumed
                optim.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)

                metrics.add_step(info["step_tokens"], attended_pairs)
                epoch_end = info["last_in_epoch"] or step == total_steps
                if metrics.due(step, epoch_end) or validation.due(step, epoch_end):
                    with metrics.paused():  # validation is no training step: its time stays out of tokens/s
                        figures = validation.run(model) if validation.due(step, epoch_end) else None  # val_loss, ...
                    metrics.log(step, epoch, step_loss, grad_norm, scheduler.get_last_lr(), figures, progress=bar)
                if checkpoints.after_step(step, epoch):
                    metrics.close()
                    backend.shutdown()  # stopped by a signal: the checkpoint is written, resume with --resume
                    return 0

    # ---- save ---------------------------------------------------------------------------------------------
    with checkpoints.final_save():  # if the save fails, a checkpoint of the last step is left for --resume
        save_final_model(model, tokenizer, backend, save_dir, parallel_plan)
    metrics.close()
    backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
