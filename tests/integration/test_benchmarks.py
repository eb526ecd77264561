"""The throughput benchmark runs end to end in --quick mode and ends with its JSON line (no timing checks), and hands
every run the same step settings."""
import json
import sys

import pytest
from conftest import REPO_ROOT, make_random_dataset, run_script

RUN_KEYS = {"tokens_per_sec", "cpu_ms_per_ktoken", "cores", "pad_fraction", "packed_vs_this", "busy_factor",
            "step_seconds_median", "loss_last", "loss_step", "load_before", "load_after", "busy_machine"}


def run_quick(tmp_path, *flags, timeout=900):
    out = tmp_path / "bench.json"
    result = run_script(sys.executable, str(REPO_ROOT / "benchmarks" / "bench_throughput.py"), "--quick",
                        "--json-out", str(out), *flags, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == last
    return last, result.stdout


@pytest.mark.slow
def test_benchmark_quick_prints_both_models_and_a_json_line(tmp_path):
    last, _ = run_quick(tmp_path, "--only", "tutorial,packed,hf_trainer,prepare")
    assert set(last["models"]) == {"llama2", "baichuan2"}
    for family, recipe in (("llama2", "llama2"), ("baichuan2", "baichuan2")):
        figures = last["models"][family]
        assert figures["recipe_data"] == recipe  # each model on its own recipe's data by default
        assert set(figures["runs"]) == {"tutorial", "packed", "hf_trainer"}
        for name, run in figures["runs"].items():
            assert RUN_KEYS <= set(run)
            assert run["tokens_per_sec"] > 0 and run["cpu_ms_per_ktoken"] > 0 and run["cores"] > 0, (name, run)
        assert figures["runs"]["packed"]["packed_vs_this"] == 1.0
        assert figures["runs"]["packed"]["loss_step"] == 2  # one warmup step and one timed step
        assert set(figures["runs"]["packed"]["phases"]) == {"data", "forward", "backward", "optimizer"}
        assert last["packed_vs"][family]["tutorial"] > 0
        assert figures["prepare"]["prepare"]["tokens_per_sec"] > 0
    assert last["busy_factor"] is None


@pytest.mark.slow
def test_benchmark_trl_rows_and_busy_factor(tmp_path):
    pytest.importorskip("trl")
    last, stdout = run_quick(tmp_path, "--models", "baichuan2", "--only", "packed,trl_packed,trl_unpacked", "--busy")
    runs = last["models"]["baichuan2"]["runs"]
    assert set(runs) == {"packed", "trl_packed", "trl_unpacked"}
    for name, run in runs.items():
        assert run["tokens_per_sec"] > 0 and run["busy_factor"] > 0, (name, run)
    assert set(last["busy_factor"]["baichuan2"]) == set(runs)
    assert set(last["models"]["baichuan2"]["busy_runs"]) == set(runs)
    assert "TRL SFTTrainer, packing=True" in stdout


@pytest.mark.slow
def test_benchmark_trl_defaults_rows_and_the_profile(tmp_path):
    pytest.importorskip("trl")
    last, stdout = run_quick(tmp_path, "--models", "llama2", "--peer-defaults", "--profile", "--only",
                             "packed,trl_packed,trl_unpacked,trl_packed_defaults,trl_unpacked_defaults")
    figures = last["models"]["llama2"]
    assert set(figures["runs"]) == {"packed", "trl_packed", "trl_unpacked", "trl_packed_defaults",
                                    "trl_unpacked_defaults"}
    assert last["config"]["matched"]["activation_checkpointing"] is False
    assert last["config"]["peer_defaults"]["activation_checkpointing"] is True
    assert "TRL's defaults: one micro-batch, checkpointing on" in stdout
    assert set(figures["profile"]) == {"packed", "trl_packed", "trl_unpacked"}
    for summary in figures["profile"].values():
        assert abs(sum(summary["groups"].values()) - 1) < 1e-6 and summary["top"]


@pytest.mark.slow
def test_benchmark_refuses_unknown_runs_and_models(tmp_path):
    for flags in (("--only", "packed,nonsense"), ("--models", "gpt2")):
        result = run_script(sys.executable, str(REPO_ROOT / "benchmarks" / "bench_throughput.py"), "--quick",
                            *flags, timeout=120)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr[-500:]


@pytest.mark.slow
def test_gpu_check_runs_the_real_script_and_prints_one_json_line():
    """On this CPU: real steps of the demo through torchrun, measured peak memory, no simulated figure."""
    result = run_script(sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--steps", "2", "--",
                        "--demo", "--batch-size", "4", "--block-size", "512", "--num-workers", "0", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["steps"] == 2 and line["simulated_peak_gib"] is None
    assert line["measured_peak_gib"] > 0 and line["tokens_per_sec"] > 0 and 0 < line["mfu"] < 1


def test_every_run_trains_with_the_same_step_settings_read_back_from_each_trainer(tiny_run, tmp_path):
    """The settings each trainer was handed, read from its own arguments, optimiser, scheduler and model (our loop:
    from its loader, model, optimiser and scheduler): the same split of the step, checkpointing, precision,
    optimiser, schedule and clipping for every run; TRL's own split and checkpointing in its *_defaults runs."""
    pytest.importorskip("trl")
    import dataclasses

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from finetune.data.batches import TokenTable

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import bench_throughput as bench
    from our_loop import build_our_loop, load_fresh_model
    from peer_trainers import PEERS, PEERS_AT_DEFAULTS, make_trainer, peer_tokenizer
    from step_settings import settings_of_our_loop, settings_of_trainer

    split = load_from_disk(make_random_dataset(tmp_path / "data", num_train=2000))["train"]
    table, model_path = TokenTable(split), tiny_run["llama"]
    tokenizer = peer_tokenizer(AutoTokenizer.from_pretrained(model_path))

    def ours(args, name):
        batching = "block" if name == "tutorial" else "packed"
        return settings_of_our_loop(build_our_loop(model_path, table, 0, batching, bench.settings_for(name, args.matched),
                                                   args.block_size))

    def peer(args, name):
        _, model = load_fresh_model(model_path, attention="sdpa")
        return settings_of_trainer(make_trainer(name, model, split, tokenizer, str(tmp_path / name),
                                                bench.settings_for(name, args.matched), args.block_size))

    args = bench.parse_args([])  # the benchmark's defaults: 8 rows of 1,024 tokens a step
    expected = ours(args, "packed")
    assert (expected.micro_batch_size, expected.accumulation_steps, expected.activation_checkpointing,
            expected.weights_dtype, expected.compute_dtype, expected.optimizer, expected.learning_rate,
            expected.max_grad_norm, expected.total_steps) == (2, 4, False, "float32", "float32", "AdamW", 2e-3, 1.0, 10)
    assert ours(args, "tutorial") == expected
    for name in PEERS:
        assert peer(args, name) == expected, name
    trl_defaults = dataclasses.replace(expected, micro_batch_size=8, accumulation_steps=1, activation_checkpointing=True)
    for name in PEERS_AT_DEFAULTS:
        assert peer(args, name) == trl_defaults, name

    checkpointed = bench.parse_args(["--activation-checkpointing", "on", "--micro-batch-size", "4"])
    expected = ours(checkpointed, "packed")
    assert (expected.micro_batch_size, expected.accumulation_steps, expected.activation_checkpointing) == (4, 2, True)
    for name in ("hf_trainer", "trl_packed"):
        assert peer(checkpointed, name) == expected, name
