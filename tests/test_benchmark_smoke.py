"""The throughput benchmark runs end to end in --quick mode and ends with its JSON line (no timing checks)."""
import json
import sys

from conftest import REPO_ROOT, run_script

EXPECTED_KEYS = {"packed_vs_tutorial", "packed_vs_hf_trainer", "mfu_packed", "prepare_vs_tutorial",
                 "tokens_per_sec", "mfu", "peak_flops", "prepare_tokens_per_sec", "config", "load_average"}


def test_benchmark_quick_prints_json_line(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(sys.executable, str(REPO_ROOT / "benchmarks" / "bench_throughput.py"), "--quick",
                        "--json-out", str(out), timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert EXPECTED_KEYS <= set(last)
    for key in ("packed_vs_tutorial", "packed_vs_hf_trainer", "mfu_packed", "prepare_vs_tutorial"):
        assert isinstance(last[key], float) and last[key] > 0, (key, last[key])
    assert set(last["tokens_per_sec"]) == {"tutorial", "packed", "hf_trainer"}
    assert json.loads(out.read_text()) == last


def test_gpu_check_runs_the_real_script_and_prints_one_json_line():
    """On this CPU: real steps of the demo through torchrun, measured peak memory, no simulated figure."""
    result = run_script(sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--steps", "2", "--",
                        "--demo", "--batch-size", "4", "--block-size", "512", "--num-workers", "0", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["steps"] == 2 and line["simulated_peak_gib"] is None
    assert line["measured_peak_gib"] > 0 and line["tokens_per_sec"] > 0 and 0 < line["mfu"] < 1
