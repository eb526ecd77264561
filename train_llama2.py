"""Fine-tune Llama 2 (13B by default) on a dataset made by `prepare_dataset.py llama2`.

The loop below is ordinary PyTorch: forward, loss.backward(), optimiser step, zero_grad. One call before the
model is loaded, `enable_advanced_parallelization()`, decides how the job runs, so the same command works on:

  CPU or one GPU:   python train_llama2.py --batch-size 32
  one node, 8 GPUs: torchrun --standalone --nnodes=1 --nproc_per_node=8 train_llama2.py --batch-size 256
  two nodes:        torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=100 --rdzv_backend=c10d \
                        --rdzv_endpoint=$MASTER_ADDR:29400 train_llama2.py --batch-size 256
  MoAI Platform:    python train_llama2.py --batch-size 256   (the hook turns on Advanced Parallelization)
  offline demo:     python train_llama2.py --demo             (tiny model and bundled data, a few minutes on CPU)
"""
import json
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import backend as parallel
import checkpointing
import finetune_utils as fu
import packed_attention  # noqa: F401  (registers the "packed_sdpa" attention)
import throughput
from training_args import parse_training_args

RECIPE = "llama2"
DEFAULTS = dict(model="meta-llama/Llama-2-13b-hf", dataset="./llama2_dataset", save_dir="./llama2_13b_finetuned",
                epochs=1, batch_size=256, lr=1e-5, log_interval=10)
DEMO_DEFAULTS = dict(save_dir="./llama2_demo_output", epochs=1, batch_size=8, lr=2e-3, log_interval=2, eval_every=10)


def main(argv=None):
    args = parse_training_args(__doc__, DEFAULTS, DEMO_DEFAULTS, argv)

    # ---- backend: the one hook, before the model is loaded ----------------------------------------------
    backend = parallel.enable_advanced_parallelization(args.mixed_precision)
    device = backend.device
    if args.demo:
        import demo_assets
        args.model_name_or_path = args.model_name_or_path or demo_assets.ensure_demo_model(RECIPE)
        args.dataset_name_or_path = (args.dataset_name_or_path
                                     or demo_assets.ensure_demo_dataset(RECIPE, args.block_size))
    args.model_name_or_path = args.model_name_or_path or DEFAULTS["model"]
    args.dataset_name_or_path = args.dataset_name_or_path or DEFAULTS["dataset"]

    shape = parallel.model_shape(args.model_name_or_path) if args.plan_only or device.type == "cuda" else None
    if args.plan_only:
        world = args.num_devices or backend.world_size
        micro, accumulation, ckpt = parallel.plan_for_budget(shape, world, args.batch_size, args.block_size,
                                                             args.device_memory_gb, "bf16", args.micro_batch_size)
        _, lines = parallel.describe_plan(shape, "fsdp2" if world > 1 else "single", world, args.batch_size, micro,
                                          accumulation, args.block_size, ckpt, "bf16",
                                          f"{world} x {args.device_memory_gb:g} GB", args.device_memory_gb)
        if backend.is_main:
            print("\n".join(lines))
        return 0

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    resume_from = checkpointing.check_save_dir(args.save_model_dir, args.resume, args.overwrite,
                                                 args.resume_if_possible)

    # ---- data -------------------------------------------------------------------------------------------
    fu.require_local_or_reachable(args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load the tokenizer of {args.model_name_or_path!r}: {str(exc).splitlines()[0]}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = fu.load_prepared_dataset(args.dataset_name_or_path)
    train_table = fu.TokenTable(dataset["train"])
    eval_table = fu.TokenTable(dataset["validation"]) if len(dataset.get("validation", [])) else None
    too_long = sum(int((table.lengths > args.block_size).sum()) for table in (train_table, eval_table) if table)
    if too_long:
        raise SystemExit(f"error: {too_long} examples are longer than --block-size {args.block_size}; run "
                         f"prepare_dataset.py with --block-size {args.block_size}")
    micro_batch_size, accumulation = parallel.split_global_batch(args.batch_size, backend.world_size,
                                                                 args.micro_batch_size, device.type, args.block_size)
    pad_to = args.block_size if args.batching in ("packed", "block") else None

    # Every epoch's plan, so the schedule knows the total and a resumed run can find its place.
    plans, total_steps = fu.plan_run(train_table.lengths, args.batch_size, args.block_size, args.batching, args.seed,
                                     args.epochs, args.max_steps)

    # ---- model ------------------------------------------------------------------------------------------
    checkpointing_on = args.activation_checkpointing == "on"
    if args.activation_checkpointing == "auto" and device.type == "cuda":
        memory_gb = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        micro_batch_size, accumulation, checkpointing_on = parallel.plan_for_budget(
            shape, backend.world_size, args.batch_size, args.block_size, memory_gb, backend.mixed_precision,
            args.micro_batch_size)
    try:
        model = parallel.load_model(backend, AutoModelForCausalLM, args.model_name_or_path,
                                    gradient_checkpointing=checkpointing_on, compile_layers=args.compile,
                                    trust_remote_code=args.trust_remote_code, attn_implementation="packed_sdpa")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load the model {args.model_name_or_path!r}: {str(exc).splitlines()[0]}")
    if model.config.max_position_embeddings < args.block_size:
        raise SystemExit(f"error: --block-size {args.block_size} exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    if device.type == "cuda" and args.micro_batch_size is None:
        micro_batch_size = parallel.probe_micro_batch(model, backend, micro_batch_size,
                                                      args.batch_size // backend.world_size, args.block_size)
        accumulation = args.batch_size // backend.world_size // micro_batch_size
    plan_info, plan_lines = parallel.describe_plan(
        model.config.to_dict(), backend.engine, backend.world_size, args.batch_size, micro_batch_size, accumulation,
        args.block_size, checkpointing_on, backend.mixed_precision, str(device))
    if backend.is_main:
        print("\n".join(plan_lines), flush=True)

    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                              fused=device.type == "cuda")
    schedule = fu.lr_lambda(total_steps, args.warmup_ratio, args.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, schedule)

    def trainer_state(epoch):
        return {"epoch": epoch, "seed": args.seed, "batch_size": args.batch_size, "batching": args.batching,
                "block_size": args.block_size}

    step = 0
    if resume_from:
        state = checkpointing.load_checkpoint(resume_from, model, optim, scheduler, backend, trainer_state(0))
        step = state["step"]
        if backend.is_main:
            checkpointing.truncate_metrics(args.save_model_dir, step)
            print(f"resumed from {resume_from} at step {step}", flush=True)
    backend.barrier()
    if backend.is_main and not resume_from:
        checkpointing.start_run_dir(args.save_model_dir, os.path.basename(__file__))
    backend.barrier()

    peak_flops, peak_source = throughput.device_peak_flops(device, args.peak_tflops)
    stop = checkpointing.StopRequest()
    metrics_file = open(os.path.join(args.save_model_dir, "metrics.jsonl"), "a") if backend.is_main else None

    # Validation rows are packed once; every evaluation reuses them.
    eval_rows = [row for step_rows in fu.plan_epoch(eval_table.lengths, 1, args.block_size, args.batching, args.seed, 0)
                 for row in step_rows] if eval_table is not None else []

    def evaluate():
        """Token-weighted validation loss over the whole split, every rank taking its share of rows."""
        model.eval()
        chunk = backend.world_size * micro_batch_size
        loss_sum = torch.zeros((), device=device)
        targets = torch.zeros((), device=device)
        with torch.no_grad():
            for start in range(0, len(eval_rows), chunk):
                share = eval_rows[start:start + chunk]
                mine = share[backend.rank * micro_batch_size:(backend.rank + 1) * micro_batch_size]
                weight = 1.0 if mine else 0.0  # a rank with no rows left still joins the sharded forward
                batch = fu.move_to(fu.collate_rows(eval_table, mine or eval_rows[:1], pad_id, pad_to), device)
                with backend.autocast():
                    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                segment_spans=batch["segment_spans"],
                                labels=batch["labels"], num_items_in_batch=1, use_cache=False)
                loss_sum += weight * out.loss.float()
                targets += weight * batch["num_targets"]
        model.train()
        totals = backend.all_reduce_sum(torch.stack([loss_sum, targets]))
        return (totals[0] / totals[1].clamp(min=1)).item()

    # ---- training loop ----------------------------------------------------------------------------------
    model.train()
    # The bar closes before any error line, so the error stays the last line printed.
    with tqdm(total=total_steps, initial=step, disable=not backend.is_main, desc="train",
              dynamic_ncols=True) as progress:
        nonfinite_skipped = 0
        interval_tokens, interval_flops, interval_steps, interval_start = 0, 0.0, 0, time.perf_counter()
        epoch_starts = np.cumsum([0] + [len(p) for p in plans])
        for epoch in range(int(np.searchsorted(epoch_starts, step, side="right")) - 1, len(plans)):
            epoch_start_step = int(epoch_starts[epoch])
            loader = fu.make_step_loader(train_table, plans[epoch], backend.rank, backend.world_size, micro_batch_size,
                                         pad_id, pad_to, start_step=step - epoch_start_step, workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
            for micro_batches, info in loader:
                step_loss = torch.zeros((), device=device)
                attended_pairs = 0
                for micro in micro_batches:
                    micro = fu.move_to(micro, device)
                    with backend.autocast():
                        # No attention_mask: each example attends causally within its own span
                        # (packed_attention.py), and its rotary positions restart at 0, as if it were alone.
                        outputs = model(
                            input_ids=micro["input_ids"],
                            position_ids=micro["position_ids"],
                            segment_spans=micro["segment_spans"],
                            labels=micro["labels"],
                            # Summed token loss over the targets of the whole global step (all micro-batches, all
                            # ranks): the update is the same however the batch is split.
                            num_items_in_batch=info["step_targets"],
                            use_cache=False,
                        )
                    loss = outputs.loss
                    loss.backward()
                    step_loss += loss.detach()
                    attended_pairs += micro["attended_pairs"]

                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                # The one host sync of a step: a non-finite update must never reach the weights.
                finite = bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
                if backend.any_rank(not finite):
                    nonfinite_skipped += 1
                    if nonfinite_skipped > args.skip_nonfinite:
                        last = checkpointing.list_checkpoints(args.save_model_dir)
                        kept = f"; the last good checkpoint is {last[-1]}" if last else ""
                        raise SystemExit(f"error: non-finite loss or gradient norm at step {step + 1}{kept}")
                    if backend.is_main:
                        tqdm.write(f"warning: skipped the update of step {step + 1}: non-finite loss or gradient norm")
                else:
                    optim.step()
                # A skipped step still counts, so the step number keeps matching the data consumed.
                scheduler.step()
                model.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)

                interval_tokens += info["step_tokens"]
                interval_steps += 1
                # Attention pairs are counted per rank; scale by world size for the global figure.
                interval_flops += throughput.step_flops(model.config, info["step_tokens"],
                                                        attended_pairs * backend.world_size)
                is_eval_step = args.eval_every and step % args.eval_every == 0 and eval_table is not None
                epoch_done = step == epoch_start_step + len(plans[epoch]) or step == total_steps
                if step % args.log_interval == 0 or step == total_steps or is_eval_step or epoch_done:
                    mean_loss = (backend.all_reduce_sum(step_loss.clone())).item()
                    elapsed = time.perf_counter() - interval_start
                    row = {
                        "step": step, "epoch": epoch, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "tokens": info["step_tokens"], "step_time": elapsed / interval_steps,
                        "tokens_per_sec": interval_tokens / elapsed, "grad_norm": float(grad_norm),
                        "mfu": interval_flops / elapsed / (peak_flops * backend.world_size) if peak_flops else None,
                        "peak_memory_gib": throughput.peak_memory_gib(device),
                    }
                    if is_eval_step or (epoch_done and eval_table is not None):
                        row["val_loss"] = evaluate()
                    if backend.is_main:
                        tqdm.write(f"[Step {step}/{total_steps}] | Loss: {mean_loss:.4f} | Duration: {elapsed:.2f} | "
                                   f"Throughput: {row['tokens_per_sec']:.2f} tokens/sec"
                                   + (f" | Val loss: {row['val_loss']:.4f}" if "val_loss" in row else ""))
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    interval_tokens, interval_flops, interval_steps, interval_start = 0, 0.0, 0, time.perf_counter()

                stopping = backend.any_rank(stop.requested())
                if (args.save_every and step % args.save_every == 0) or stopping:
                    path = checkpointing.save_checkpoint(args.save_model_dir, step, model, optim, scheduler,
                                                         trainer_state(epoch), backend, args.keep_last)
                    if stopping:
                        if backend.is_main:
                            tqdm.write(f"stopped by {stop.signal_name or 'a signal'} after step {step}; checkpoint "
                                       f"{path} written. Continue with the same command plus --resume.")
                        backend.shutdown()
                        return 0
                if step >= total_steps:
                    break
            if step >= total_steps:
                break

    # ---- save -------------------------------------------------------------------------------------------
    state_dict = parallel.full_state_dict_on_rank0(model, backend)
    if backend.is_main:
        try:
            model.save_pretrained(args.save_model_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(args.save_model_dir)
            with open(os.path.join(args.save_model_dir, "parallel_plan.json"), "w") as f:
                json.dump(plan_info, f, indent=2)
        except OSError as exc:
            raise SystemExit(f"error: could not save the model to {args.save_model_dir!r} ({exc.strerror or exc})")
        print(f"saved model and tokenizer to {args.save_model_dir} (MFU peak from {peak_source})", flush=True)
        metrics_file.close()
    backend.barrier()
    backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
