"""Where a run's timed steps go, by torch.profiler, for bench_throughput.py --profile.

Each op's self CPU time is put in one group: `output head` (matmuls with the vocabulary as a dimension: the head's
logits and their gradients), `loss` (log-softmax, logsumexp, NLL, cross-entropy and their backward), `attention` (the
scaled-dot-product kernels and their backward), `layer matmuls` (every other matmul: the decoder layers'
projections and MLPs), `optimizer` (the ops AdamW runs: sqrt, lerp, addcdiv and their foreach forms) and `other`
(elementwise ops, copies, fills, norms, activations). The groups say what the remaining time goes to where one
run is slower than another; the top ops say which op.
"""
import torch

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear")
LOSS_WORDS = ("softmax", "logsumexp", "nll_loss", "cross_entropy")
OPTIMIZER_WORDS = ("sqrt", "lerp", "addcdiv", "addcmul", "_foreach")
GROUPS = ("output head", "loss", "attention", "layer matmuls", "optimizer", "other")


def group_of(key: str, shapes: list, vocab_size: int) -> str:
    """The group of one op (see the module docstring) from its name and input shapes."""
    if key in MATMULS:
        return "output head" if any(vocab_size in shape for shape in shapes if shape) else "layer matmuls"
    if any(word in key for word in LOSS_WORDS):
        return "loss"
    if "scaled_dot_product" in key or "attention" in key:
        return "attention"
    if any(word in key for word in OPTIMIZER_WORDS):
        return "optimizer"
    return "other"


def new_profiler() -> torch.profiler.profile:
    """A CPU profiler that records input shapes (started and stopped by the run, around its timed steps)."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)


def summarise_profile(profiler: torch.profiler.profile, vocab_size: int, top: int = 12) -> dict:
    """{"groups": {group: share of self CPU time}, "top": the `top` ops with the most self CPU time}."""
    events = profiler.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events) or 1
    groups = dict.fromkeys(GROUPS, 0.0)
    by_op: dict[str, list] = {}
    for event in events:
        groups[group_of(event.key, event.input_shapes, vocab_size)] += event.self_cpu_time_total / total
        entry = by_op.setdefault(event.key, [0.0, 0])
        entry[0] += event.self_cpu_time_total
        entry[1] += event.count
    ranked = sorted(by_op.items(), key=lambda item: -item[1][0])[:top]
    return {"self_cpu_ms": total / 1e3, "groups": groups,
            "top": [{"op": key, "self_cpu_ms": us / 1e3, "calls": calls, "share": us / total}
                    for key, (us, calls) in ranked]}


def print_profile(name: str, summary: dict) -> None:
    print(f"\nprofile of {name}, timed steps ({summary['self_cpu_ms']:.0f} ms self CPU time; profiling slows the "
          f"run, so no figures come from it): " + ", ".join(f"{group} {100 * share:.0f}%"
                                                             for group, share in summary["groups"].items()))
    for row in summary["top"]:
        print(f"  {100 * row['share']:5.1f}%  {row['self_cpu_ms']:9.1f} ms  {row['calls']:7d} calls  {row['op']}")
