"""How the job runs: one process, torchrun + FSDP2 over GPUs and nodes, or the MoAI Platform.

    backend   the backend hook `enable_advanced_parallelization()`, Backend (rank, device, collectives)
    sharding  FSDP2 `fully_shard` per decoder layer, and gathering full state dicts on rank 0
"""
