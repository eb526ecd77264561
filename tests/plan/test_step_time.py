"""finetune/plan/step_time.py: offloaded layouts are ranked by estimated step time (compute plus host traffic)."""



# ---- offloaded layouts are ranked by estimated step time ---------------------------------------------------

def test_offload_step_estimate_counts_host_traffic_per_micro_batch():
    from finetune.plan.step_time import step_seconds

    small = sum(step_seconds(13_015_864_320, 1, 4, 64, 1024, checkpointing=False, cpu_offload=True))
    large = sum(step_seconds(13_015_864_320, 1, 32, 8, 1024, checkpointing=True, cpu_offload=True))
    assert 400 < small < 500 and large < small / 3  # the 1 x 80 GB figures: ~450 s against ~120 s
    compute, traffic = step_seconds(13_015_864_320, 8, 4, 8, 1024, checkpointing=False, cpu_offload=False)
    assert traffic == 0 and compute > 0


def test_plan_with_offload_takes_the_fastest_fitting_layout(monkeypatch):
    from finetune.args import parse_training_args
    from finetune.config import from_flags
    from finetune.plan import layout, memory

    def candidate(micro, checkpointing, offload, fits):
        return memory.Candidate(micro, 256 // micro, checkpointing, offload, None, fits)
    calls = []

    def fake_plan_candidates(*args, checkpointing=None, cpu_offload=None, **kwargs):
        calls.append((checkpointing, cpu_offload))
        if checkpointing:  # offload with checkpointing: large micro-batches fit
            found = [candidate(m, True, True, m <= 32) for m in (64, 32, 4)]
            return memory.Choice(next(c for c in found if c.fits), found)
        found = [candidate(4, False, False, False), candidate(4, False, True, True)]
        return memory.Choice(found[1], found)
    monkeypatch.setattr(memory, "plan_candidates", fake_plan_candidates)
    defaults = dict(model="m", dataset="d", save_dir="s", epochs=1, batch_size=256, lr=1e-5, log_interval=1)
    config = from_flags(parse_training_args("", defaults, {}, []))
    result = layout.simulated_plan(config, layout.KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"], 1, 80, 512)
    assert calls == [(None, None), (True, True)]
    assert (result.chosen.micro_batch_size, result.chosen.checkpointing) == (32, True)
    # Checkpointing fixed by the user: the first choice stands, nothing more is simulated.
    calls.clear()
    fixed = from_flags(parse_training_args("", defaults, {}, ["--activation-checkpointing", "off"]))
    monkeypatch.setattr(memory, "plan_candidates", lambda *a, **k: fake_plan_candidates(checkpointing=False))
    assert layout.simulated_plan(fixed, layout.KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"], 1, 80, 512).chosen.micro_batch_size == 4
