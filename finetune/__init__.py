"""Helpers behind the training scripts, one module per concern.

    parallel          the backend hook `enable_advanced_parallelization()`, model loading and FSDP2 sharding
    plan              micro-batch, accumulation, checkpointing, CPU offload: the printed parallel plan
    memory            the plan's memory figures and choice rule; memory_step, memory_cache, memory_process:
                      the simulated step under PyTorch's memory tracker, its disk cache, its child process
    torch_internals   the only use of PyTorch's private members (the memory trackers)
    sharding          the one FSDP2 sharding, for training and for the simulation
    chunked_loss      the causal-LM loss a chunk of tokens at a time
    data              prepared datasets, packing, masks and labels, data loaders
    training          schedule, clipping, the non-finite guard, validation
    checkpoints       resumable checkpoints (save, load, verify, RNG) and the Checkpointer the scripts use
    checksums         the SHA-256 list of a checkpoint's files
    run_folder        the run folder: marker, lock, fresh start, metrics.jsonl, one-line write errors
    stop_signals      SIGTERM/SIGINT: checkpoint after the current step, then stop
    final_model       the final export, with the LoRA merge
    lora              --lora / --qlora: adapters (peft) on a frozen or 4-bit base, the merged save
    metrics           FLOPs, MFU, peak memory, the log line and metrics.jsonl
    args              the training scripts' command-line flags
    preparation       the engine behind prepare_dataset.py; raw_data its inputs, dataset_output its output folder
    demo              the embedded offline default: tiny tokenizers, models and sample data
    packed_attention  attention inside each packed example's span (Llama)
    hub               failing fast when the Hugging Face Hub cannot be reached
"""
from finetune.parallel import enable_advanced_parallelization

__all__ = ["enable_advanced_parallelization"]
