"""finetune/model/weight_files.py: a damaged weight file is named, by training and by inference."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, inference_error, PYTHON, REPO_ROOT, run_script

# ---- damaged weight files: a model folder in training and inference, an adapter folder --------------------------

def with_bin_weights(source, folder, damage):
    """A copy of the model folder `source` with its weights as a pytorch_model.bin, damaged by `damage`."""
    from safetensors.torch import load_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(Path(source) / "model.safetensors"), weights)
    weights.write_bytes(damage(weights.read_bytes()))
    return weights


BIN_DAMAGE = {"garbage-in-front": lambda data: b"garbage" + data[:100], "truncated": lambda data: data[:len(data) // 2],
              "empty": lambda data: b""}
EXAMPLE = ["--example", '{"article": "w5 w6"}', "--max-new-tokens", "2"]


@pytest.mark.parametrize("damage", list(BIN_DAMAGE))
def test_a_damaged_bin_model_file_is_named_by_inference(tiny_run, tmp_path, capsys, damage):
    weights = with_bin_weights(tiny_run["llama"], tmp_path / "model", BIN_DAMAGE[damage])
    line = inference_error(["--model-dir", str(tmp_path / "model"), *EXAMPLE], capsys)
    assert f"{weights} is damaged or truncated" in line, line


@pytest.mark.slow
def test_a_damaged_bin_model_file_is_named_by_training(tiny_run, tmp_path):
    weights = with_bin_weights(tiny_run["llama"], tmp_path / "model", BIN_DAMAGE["garbage-in-front"])
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", str(tmp_path / "model"),
                        "--dataset-name-or-path", tiny_run["data"], "--block-size", "128", "--batch-size", "4",
                        "--max-steps", "1", "--num-workers", "0", "--save-model-dir", str(tmp_path / "out"),
                        env={"OMP_NUM_THREADS": "1"})
    line = assert_one_line_error(result)
    assert f"{weights} is damaged or truncated" in line, line
