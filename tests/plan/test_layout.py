"""finetune/plan/layout.py: QLoRA is never offered CPU offload; offload gives the host optimiser the process's share
of the node's cores."""

import pytest
from conftest import PYTHON, REPO_ROOT, run_script

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}


# ---- QLoRA is never offered offload; offload gives the host optimiser the node's cores -------------

@pytest.mark.slow
def test_qlora_plan_never_offers_cpu_offload(tiny_run):
    plan = ["--model-name-or-path", tiny_run["llama"], "--plan-only", "--num-devices", "1",
            "--device-memory-gb", "0.0005", "--block-size", "128", "--batch-size", "8"]
    lora = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--lora")
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert "offload on" in lora.stdout  # the same plan without 4-bit weights does consider offload
    qlora = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--qlora")
    assert qlora.returncode == 0, qlora.stderr[-2000:]
    assert "offload on" not in qlora.stdout and "cpu_offload: false" in qlora.stdout
    refused = run_script(PYTHON, str(TRAIN["llama"]), *plan, "--qlora", "--cpu-offload", "on")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --qlora runs on one device without FSDP2")


def test_offload_threads_are_the_process_share_of_the_node(monkeypatch):
    import os

    from finetune.distributed.backend import offload_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert offload_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert offload_threads() == 1
