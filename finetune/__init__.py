"""Helpers behind the training scripts, in folders by concern. Each folder's `__init__` lists its modules.

    args, config     the training scripts' flags and the frozen RunConfig they become
    errors           FinetuneError and `entry_point`: one `error:` line and exit 1 for every script
    training         schedule, clipping, the non-finite guard, validation
    demo             the embedded offline default: tiny tokenizers, models and sample data
    data/            recipes, preparation (prepare_dataset.py), chat formats, mixing; packing and loaders
    distributed/     the backend hook `enable_advanced_parallelization()`, Backend, FSDP2 sharding and gathering
    model/           loading for training, LoRA/QLoRA, sizes, adapter folders, weight files, hub, remote-code guard
    ops/             attention for packed rows (span loop, varlen, flex) and the chunked loss
    plan/            the layout (micro-batch, accumulation, checkpointing, offload): memory simulation, probe
    checkpoint/      resumable checkpoints, the run folder, stop signals, the final export
    observe/         metrics.jsonl and the log line, trackers, training_curves.png, provenance
"""
from finetune.distributed.backend import enable_advanced_parallelization

__all__ = ["enable_advanced_parallelization"]
