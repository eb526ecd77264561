"""Watching a run.

    metrics     FLOPs, MFU, peak memory, the log line and metrics.jsonl
    trackers    --report-to: TensorBoard, Weights & Biases, MLflow, trackio
    plot        training_curves.png (`python -m finetune.observe.plot SAVE_DIR`)
    provenance  library versions and the git commit, for run_config.json
"""
