"""The plan: how a step is laid out on the machine (micro-batch, accumulation, activation checkpointing, CPU offload),
printed by --plan-only and recorded in parallel_plan.json.

    layout           the chosen Layout, --plan-only, the batch split, the plan's printed lines
    memory           peak memory of a step from a simulation, the candidates and the choice rule
                     (`python -m finetune.plan.memory`)
    memory_step      one simulated training step under PyTorch's memory tracker
    memory_cache     the simulation's disk cache, keyed by every file the simulation runs
    memory_process   the child process the simulations run in
    probe            on GPUs, real training steps at 1 and 2 rows: the largest micro-batch that fits
    step_time        estimated step time of each candidate (compute plus host-device traffic)
    torch_internals  the one place that reads PyTorch's private memory-tracker members
"""
