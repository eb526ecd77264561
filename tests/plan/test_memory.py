"""The simulated step memory against real steps, the depth carry-over, and the plan search.

Also a script:
  torchrun --nproc_per_node 2 tests/plan/test_memory.py real OUT.json CONFIG.json PRECISION CKPT PASSES
      one real FSDP2 step (gloo, one unit per decoder layer) under the tracker; rank 0 writes its readings.
  python tests/plan/test_memory.py depth OUT.json CONFIG.json
      simulated readings at full depth and carried from 3 and 4 layers, for several setups.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finetune.plan import memory, memory_cache, memory_step  # noqa: E402

if __name__ != "__main__":
    from conftest import PYTHON, run_script, torchrun

# The demo-scale model of the check against real steps.
DEMO = {
    "llama": dict(model_type="llama", vocab_size=4000, hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
    "baichuan": dict(model_type="baichuan", vocab_size=4000, hidden_size=256, intermediate_size=688,
                     num_hidden_layers=4, num_attention_heads=4, model_max_length=1024,
                     position_embedding="alibi", norm_head=True),
}
BLOCK, MICRO = 512, 2
SIM_VS_REAL = 0.10

LLAMA_13B = dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                 num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)
BAICHUAN_13B = dict(model_type="baichuan", vocab_size=125696, hidden_size=5120, intermediate_size=13696,
                    num_hidden_layers=40, num_attention_heads=40, model_max_length=4096)


@pytest.fixture(autouse=True)
def separate_memory_cache(tmp_path_factory, monkeypatch):
    """One simulation cache for this module's tests, never the user's."""
    monkeypatch.setenv("FINETUNE_MEMORY_CACHE", str(tmp_path_factory.getbasetemp() / "memory_cache"))


def real_single_process_readings(config, setup, passes=1):
    prepared = memory_step.prepare_step(config, setup, fake=False)
    segments, names = memory_step.tracked_step(prepared, MICRO, passes)
    return memory_step.readings_from_segments(segments, names)


@pytest.mark.slow
def test_the_memory_command_ends_a_bad_config_with_one_error_line(tmp_path):
    result = run_script(PYTHON, "-m", "finetune.plan.memory", "--config", str(tmp_path / "missing.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read the model config {str(tmp_path / 'missing.json')!r}: [Errno 2] No such file or "
        f"directory: {str(tmp_path / 'missing.json')!r}"]


def assert_close_peaks(simulated, real):
    assert abs(simulated - real) <= SIM_VS_REAL * real, (simulated, real, simulated / real - 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind,precision,layers,accumulation", [("llama", "fp32", 4, 1), ("llama", "bf16", 6, 2),
                                                                ("baichuan", "fp32", 4, 1)])
def test_simulation_matches_a_real_step_one_process(kind, precision, layers, accumulation):
    config = dict(DEMO[kind], num_hidden_layers=layers)  # 6 layers: carried from 3 and 4 in the simulation
    setup = memory._setup(1, BLOCK, False, False, precision, "none", None, True)
    real = real_single_process_readings(config, setup, memory._passes(accumulation))["on_device"]
    simulated = memory.simulate_step_memory(config, 1, MICRO, BLOCK, precision=precision,
                                            accumulation_steps=accumulation)
    assert_close_peaks(simulated.device_peak, real["device_peak"])


@pytest.mark.distributed
@pytest.mark.parametrize("kind,precision,checkpointing,accumulation", [
    ("llama", "fp32", False, 1), ("baichuan", "fp32", True, 2), ("llama", "bf16", False, 2)])
def test_simulation_matches_real_fsdp2_two_processes(kind, precision, checkpointing, accumulation, tmp_path):
    config = dict(DEMO[kind])
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = torchrun(2, Path(__file__).resolve(), "real", str(tmp_path / "real.json"),
                      str(tmp_path / "config.json"), precision, str(checkpointing),
                      str(memory._passes(accumulation)), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    real = json.loads((tmp_path / "real.json").read_text())["on_device"]
    simulated = memory.simulate_step_memory(config, 2, MICRO, BLOCK, checkpointing=checkpointing,
                                            precision=precision, accumulation_steps=accumulation)
    assert_close_peaks(simulated.device_peak, real["device_peak"])


@pytest.mark.slow
def test_depth_carried_from_three_and_four_layers_equals_full_depth(tmp_path):
    config = dict(DEMO["llama"], num_hidden_layers=7, vocab_size=8000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_script(PYTHON, str(Path(__file__).resolve()), "depth", str(tmp_path / "out.json"),
                        str(tmp_path / "config.json"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in json.loads((tmp_path / "out.json").read_text()):
        assert case["carried"] == case["full"], case["setup"]


def made_up_readings(config, setup, runs, stop, child):
    """Readings where memory grows with the micro-batch and checkpointing and offload cut it."""
    readings = {}
    for micro, _ in sorted(runs):
        activations = micro * (1 if setup["checkpointing"] else 10) * memory.GIB
        readings[micro] = {
            "on_device": {"device_peak": 40 * memory.GIB + activations, "host_peak": 0,
                          "categories": {"Activation": activations}},
            "offloaded": {"device_peak": 5 * memory.GIB + activations, "host_peak": 35 * memory.GIB,
                          "categories": {"Activation": activations}}}
        if memory_step.exceeds(readings[micro], stop):
            break
    return readings


def test_plan_rule_prefers_no_offload_then_no_checkpointing_then_the_largest_micro_batch(monkeypatch):
    monkeypatch.setattr(memory_cache, "readings", made_up_readings)
    config = dict(DEMO["llama"])

    def chosen(device_gb, **kwargs):
        c = memory.plan_candidates(config, 8, 128, BLOCK, device_gb, **kwargs).chosen  # 16 rows per device
        return c and (c.cpu_offload, c.checkpointing, c.micro_batch_size)

    assert chosen(80) == (False, False, 2)
    assert chosen(50) == (False, True, 4)
    assert chosen(40) == (True, False, 2)
    assert chosen(40, host_memory_gb=100) is None  # 8 devices x 35 GiB of offloaded state
    assert chosen(80, checkpointing=True) == (False, True, 16)
    assert chosen(80, cpu_offload=True) == (True, False, 4)


def test_plan_simulates_only_what_the_choice_needs_unless_exhaustive(monkeypatch):
    monkeypatch.setattr(memory_cache, "readings", made_up_readings)
    plan = memory.plan_candidates(dict(DEMO["llama"]), 8, 128, BLOCK, 80)
    by_setting = {(c.cpu_offload, c.checkpointing, c.micro_batch_size): c for c in plan.candidates}
    assert all(c.accumulation_steps * c.micro_batch_size == 16 for c in plan.candidates)
    assert [m for m in (1, 2, 4, 8, 16) if by_setting[(False, False, m)].memory] == [1, 2, 4]
    assert by_setting[(False, False, 8)].note == "a smaller micro-batch already does not fit"
    assert all(c.memory is None and c.note == "a preferred setting fits" for c in plan.candidates if c.checkpointing)
    assert by_setting[(True, False, 4)].fits  # offload readings come with the same run on several devices
    everything = memory.plan_candidates(dict(DEMO["llama"]), 8, 128, BLOCK, 80, exhaustive=True)
    assert all(c.memory is not None for c in everything.candidates)
    assert everything.chosen == plan.chosen


@pytest.mark.slow
def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        memory.plan_candidates(DEMO["llama"], 8, 12, BLOCK, 80)
    with pytest.raises(ValueError, match="does not divide"):
        memory.plan_candidates(DEMO["llama"], 2, 12, BLOCK, 80, micro_batch_size=4)
    with pytest.raises(ValueError, match="model_type"):
        memory.simulate_step_memory({"hidden_size": 8}, 1, 1, BLOCK)
    with pytest.raises(ValueError, match="adapter"):
        memory.simulate_step_memory(DEMO["llama"], 1, 1, BLOCK, adapter="dora")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        memory.simulate_step_memory(DEMO["llama"], 1, 1, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA_13B, BAICHUAN_13B], ids=["llama2-13b", "baichuan2-13b"])
def test_13b_plans_fit_the_target_machines(config):
    """Micro-batch 1 only, to keep the test short; the report has the full candidate tables."""
    full_one = memory.plan_candidates(config, 1, 8, 1024, 80, micro_batch_size=1)
    assert full_one.chosen is not None and full_one.chosen.cpu_offload, full_one.lines()
    assert not any(c.fits for c in full_one.candidates if not c.cpu_offload)  # 13B x 16 B of state > 80 GB
    full_eight = memory.plan_candidates(config, 8, 64, 1024, 80, micro_batch_size=1)
    assert full_eight.chosen is not None and not full_eight.chosen.cpu_offload, full_eight.lines()
    lora = memory.plan_candidates(config, 1, 8, 1024, 80, adapter="lora", cpu_offload=False, micro_batch_size=1)
    assert lora.chosen is not None, lora.lines()
    qlora = memory.plan_candidates(config, 1, 8, 1024, 24, adapter="qlora", cpu_offload=False, micro_batch_size=1)
    assert qlora.chosen is not None, qlora.lines()


@pytest.mark.slow
def test_cached_plan_is_fast_and_equal():
    import time

    first = memory.plan_candidates(DEMO["baichuan"], 2, 8, BLOCK, 1)
    start = time.perf_counter()
    again = memory.plan_candidates(DEMO["baichuan"], 2, 8, BLOCK, 1)
    assert time.perf_counter() - start < 2
    assert again == first


# ----------------------------------------------------------------------------------------------------------
# Script side
# ----------------------------------------------------------------------------------------------------------

def real_fsdp2_step(out_path, config_path, precision, checkpointing, passes):
    """One real FSDP2 step over gloo under the tracker; rank 0 writes the readings."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        config = json.loads(Path(config_path).read_text())
        setup = memory._setup(dist.get_world_size(), BLOCK, checkpointing == "True", False, precision, "none",
                              None, True)
        prepared = memory_step.prepare_step(config, setup, init_device_mesh("cpu", (dist.get_world_size(),)),
                                       fake=False)
        segments, names = memory_step.tracked_step(prepared, MICRO, int(passes))
        if dist.get_rank() == 0:
            Path(out_path).write_text(json.dumps(memory_step.readings_from_segments(segments, names)))
    finally:
        dist.destroy_process_group()


def depth_cases(out_path, config_path):
    """Carried and full-depth readings of a few setups, over a fake process group of 2 ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    config = json.loads(Path(config_path).read_text())
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    mesh = init_device_mesh("cpu", (2,))
    setups = [memory._setup(1, BLOCK, False, False, "fp32", "none", None, True),
              memory._setup(1, BLOCK, True, False, "bf16", "lora", None, True),
              memory._setup(2, BLOCK, False, False, "bf16", "none", None, True),
              memory._setup(2, BLOCK, True, False, "fp32", "none", None, False)]
    cases = []
    for setup in setups:
        engine_mesh = mesh if setup["engine"] == "fsdp2" else None
        cases.append({"setup": setup,
                      "carried": memory_step.simulate_readings(config, setup, [(2, 2)], engine_mesh),
                      "full": memory_step.simulate_readings(config, setup, [(2, 2)], engine_mesh, full_depth=True)})
    Path(out_path).write_text(json.dumps(cases))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] == "real":
        real_fsdp2_step(*sys.argv[2:])
    elif sys.argv[1] == "depth":
        depth_cases(*sys.argv[2:])


@pytest.mark.slow
def test_probe_reserves_this_process_share_of_the_optimizer_state(tmp_path):
    """Under FSDP2 a DTensor's numel() is the whole tensor's; the on-device probe must hold aside only the AdamW
    state of this process's shards (an eighth on 8 processes), or 13B would reserve 8x what it needs."""
    script = tmp_path / "shares.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n" + """
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import LlamaConfig, LlamaForCausalLM
from finetune.distributed import sharding
from finetune.plan import layout

dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
whole = 8 * sum(p.numel() for p in model.parameters())
sharding.shard_model(model, mesh=init_device_mesh("cpu", (8,)))
print(whole, layout.optimizer_state_bytes(model))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    whole, local = map(int, result.stdout.split()[-2:])
    assert local == whole // 8, (whole, local)
