"""The throughput benchmark runs end to end in --quick mode and ends with its JSON line (no timing checks)."""
import json
import sys

import pytest
from conftest import REPO_ROOT, run_script

RUN_KEYS = {"tokens_per_sec", "cpu_ms_per_ktoken", "cores", "pad_fraction", "packed_vs_this", "busy_factor"}


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
