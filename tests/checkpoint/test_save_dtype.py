"""finetune/checkpoint/save_dtype.py: the final model is saved in the compute dtype unless --save-dtype says
otherwise, and inference.py loads it in bf16 on a GPU, fp32 on a CPU."""
import json

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_script, torchrun
from safetensors.torch import load_file

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}
COMMON = ["--block-size", "128", "--batch-size", "8", "--max-steps", "2", "--lr", "1e-2", "--log-interval", "1",
          "--seed", "0", "--num-workers", "0"]


# ---- the final model in the compute dtype; inference in bf16 on GPUs --------------------------------------

def test_saved_dtype_follows_the_compute_dtype():
    from finetune.checkpoint.save_dtype import saved_dtype

    assert saved_dtype("compute", "bf16") == torch.bfloat16
    assert saved_dtype("compute", "no") == torch.float32
    assert saved_dtype("fp32", "bf16") == torch.float32
    assert saved_dtype("none", "bf16") is None
    with pytest.raises(ValueError):
        saved_dtype("fp16", "bf16")


def _weights(folder):
    return load_file(f"{folder}/model.safetensors"), json.loads((folder / "config.json").read_text())


@pytest.mark.distributed
def test_bf16_training_saves_bf16_unless_fp32_is_asked(tiny_run, tmp_path):
    """Two processes with CPU offload (shards gathered from the host) save bf16; one process with
    --save-dtype fp32 saves the fp32 master weights of the same run."""
    common = ["--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", tiny_run["data"], *COMMON,
              "--mixed-precision", "bf16"]
    compute = torchrun(2, TRAIN["llama"], *common, "--save-model-dir", str(tmp_path / "bf16"), "--cpu-offload", "on",
                       timeout=400)
    assert compute.returncode == 0, compute.stderr[-3000:]
    fp32 = run_script(PYTHON, str(TRAIN["llama"]), *common, "--save-model-dir", str(tmp_path / "fp32"),
                      "--save-dtype", "fp32")
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    (half, half_config), (full, full_config) = _weights(tmp_path / "bf16"), _weights(tmp_path / "fp32")
    assert {t.dtype for t in half.values()} == {torch.bfloat16} and half_config["dtype"] == "bfloat16"
    assert {t.dtype for t in full.values()} == {torch.float32} and full_config["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16" / "parallel_plan.json").read_text())["saved_dtype"] == "bfloat16"
    for name in full:  # the same training (bf16 compute either way), saved at two precisions
        torch.testing.assert_close(half[name].float(), full[name], atol=2e-2, rtol=2e-2)


def test_inference_loads_bf16_on_a_gpu_and_fp32_on_a_cpu(tiny_run, monkeypatch):
    import inference

    _, model = inference.load_saved_model(tiny_run["llama"])
    assert model.dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    _, model = inference.load_saved_model(tiny_run["llama"])
    assert model.dtype == torch.bfloat16
