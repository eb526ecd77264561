"""benchmarks/gpu_smoke.py --dry-run lists every check; the attention choice per device and model; one-kernel
attention refused on a CPU with one line."""
import json
import sys

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_script

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}
COMMON = ["--block-size", "128", "--batch-size", "8", "--max-steps", "2", "--lr", "1e-2", "--log-interval", "1",
          "--seed", "0", "--num-workers", "0"]


# ---- the first GPU run: one command; its dry run here -----------------------------------------------------------

@pytest.mark.slow
def test_gpu_smoke_dry_run_lists_every_check_and_runs_the_process_group_one(tmp_path):
    result = run_script(PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_smoke.py"), "--dry-run", "--work-dir",
                        str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True
    assert summary["checks"] == ["attention", "process_group", "train", "flex", "checkpointing", "baichuan", "resume",
                                 "offload", "lora", "qlora"]
    assert summary["process_group"]["ok"] and summary["process_group"]["grad_norm"] > 0
    listed = [line.split(":")[0] for line in result.stdout.splitlines()[:-1] if ": " in line]
    assert set(summary["checks"]) - {"process_group"} <= set(listed)
    for flags in ("--cpu-offload on", "--lora", "--qlora", "--resume", "--attn-implementation flex",
                  "--activation-checkpointing on", "--script train_baichuan2_13b.py", "mha, gqa, window"):
        assert flags in result.stdout, flags


def test_gpu_smoke_compares_relative_to_the_reference_and_always_prints_its_json_line(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import gpu_smoke

    reference = torch.full((4,), 1e-3)
    assert gpu_smoke.relative_difference(reference * 1.01, reference) == pytest.approx(0.01, rel=1e-4)  # abs: 1e-5
    assert gpu_smoke.relative_difference(reference * 1.5, reference) > gpu_smoke.RELATIVE_TOLERANCE

    def crashes():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gpu_smoke.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_smoke.torch.cuda, "get_device_name", lambda index: "stand-in")
    monkeypatch.setattr(gpu_smoke, "build_assets", lambda work, width: {})
    monkeypatch.setattr(gpu_smoke, "commands", lambda assets, work: {"train": [["false"]]})
    monkeypatch.setattr(gpu_smoke, "attention_check", crashes)
    assert gpu_smoke.main(["--work-dir", str(tmp_path)]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is False and summary["aborted"].startswith("RuntimeError: CUDA error")


def test_attention_choice_resolves_for_device_and_model(monkeypatch):
    from finetune.errors import FinetuneError
    from finetune.ops.varlen_attention import attention_name

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert attention_name("packed_spans", "auto", gpu, "bf16") == "varlen_spans"  # one kernel per layer
    assert attention_name("packed_spans", "auto", gpu, "no") == "packed_spans"  # FlashAttention needs bf16/fp16
    assert attention_name("packed_spans", "auto", cpu, "no") == "packed_spans"  # the span loop is fastest here
    assert attention_name(None, "auto", gpu, "bf16") is None  # Baichuan's own attention takes the spans
    assert attention_name(None, "flex", gpu, "bf16") == "flex_attention"  # Baichuan's own flex path, ALiBi inside
    assert attention_name("packed_spans", "flex", gpu, "bf16") == "flex_spans"
    assert attention_name("packed_spans", "spans", gpu, "bf16") == "packed_spans"
    capability[0] = (7, 5)  # a T4: no FlashAttention
    assert attention_name("packed_spans", "auto", gpu, "bf16") == "packed_spans"
    for model, choice, device, precision in [("packed_spans", "varlen", gpu, "bf16"),
                                             ("packed_spans", "flex", cpu, "bf16"),
                                             (None, "varlen", gpu, "bf16"), (None, "flex", cpu, "no")]:
        with pytest.raises(FinetuneError):
            attention_name(model, choice, device, precision)
    capability[0] = (9, 0)
    with pytest.raises(FinetuneError, match="computes in bf16"):  # FlashAttention has no fp32
        attention_name("packed_spans", "varlen", gpu, "no")


@pytest.mark.slow
def test_one_kernel_attention_is_refused_on_a_cpu_with_one_line(tiny_run, tmp_path):
    run = run_script(PYTHON, str(TRAIN["llama"]), "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
                     tiny_run["data"], "--save-model-dir", str(tmp_path / "out"), *COMMON, "--attn-implementation",
                     "flex")
    assert run.returncode != 0 and "error: --attn-implementation flex needs a GPU" in run.stderr.splitlines()[-1]
