"""benchmarks/gpu_check.py launches, times and fails as it should (on a CPU)."""

from conftest import PYTHON, REPO_ROOT, run_script

# ---- gpu_check measures what it says ----------------------------------------------------------------------

def test_gpu_check_launches_times_and_fails_as_it_should(tiny_run):
    sys_path = str(REPO_ROOT / "benchmarks")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import gpu_check
    finally:
        sys.path.remove(sys_path)
    assert gpu_check.launch_command("train_llama2.py", 1, ["--qlora"])[1].endswith("train_llama2.py")
    assert "torch.distributed.run" in gpu_check.launch_command("train_llama2.py", 1, ["--cpu-offload", "on"])
    assert "torch.distributed.run" in gpu_check.launch_command("train_llama2.py", 2, [])
    rows = [{"step": 1}, {"step": 2}, {"step": 3, "val_loss": 1.0}, {"step": 4}]
    assert [r["step"] for r in gpu_check.timed_rows(rows)] == [2, 4]  # no warm-up, no validation pass
    footer = "error: --batch-size 3 is not divisible by the 2 processes\n[rank0]: ...\ntorchrun: ChildFailedError"
    assert gpu_check.failure_line(footer) == "error: --batch-size 3 is not divisible by the 2 processes"
    result = run_script(PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--steps", "2", "--timeout", "0.5",
                        "--", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", tiny_run["data"])
    assert result.returncode != 0 and "did not finish in 0.5 s" in result.stderr
