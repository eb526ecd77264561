"""Saving: resumable checkpoints, the run folder they live in, stop signals, and the final model.

    checkpointer  resumable checkpoints (model, optimiser, scheduler, data position, RNG) and `--resume`
    run_record    what a run is beyond its flags (optimiser, groups, schedule, trainables, loss), compared on resume
    checksums     the SHA-256 list of a checkpoint's files
    rng_state     every RNG state of a rank as JSON, saved and restored with each checkpoint
    safe_reader   reading a distributed checkpoint without unpickling anything from the folder
    run_folder    --save-model-dir: its marker, its lock, a fresh start, metrics.jsonl, one-line write errors
    signals       SIGTERM / SIGINT: checkpoint after the current step, then stop
    export        the final save_pretrained folder (with LoRA: adapter and merged model)
    save_dtype    the saved weights' dtype (--save-dtype), gathered one tensor at a time
"""
