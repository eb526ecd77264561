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
