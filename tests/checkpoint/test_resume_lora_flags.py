"""Resuming a LoRA run (finetune/checkpoint/checkpointer.py): a changed adapter flag is refused naming it; the same
targets in another order are accepted; older checkpoints compare what they recorded."""

import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script

# ---- adapter flags on resume ------------------------------------------------------------------------------------

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_run, tmp_path_factory):
    """Command-line flags of a finished two-step --lora run of the tiny Llama, with a checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("lora_resume") / "run"
    argv = [str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
            tiny_run["data"], "--block-size", "128", "--batch-size", "4", "--max-steps", "2", "--save-every", "2",
            "--num-workers", "0", "--save-model-dir", str(folder), "--lora", "--lora-target-modules", LORA_TARGETS]
    result = run_script(PYTHON, *argv, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return argv


@pytest.mark.slow
def test_resume_with_another_lora_dropout_is_refused_naming_the_flag(lora_checkpoint):
    result = run_script(PYTHON, *lora_checkpoint, "--resume", "--lora-dropout", "0.1", env={"OMP_NUM_THREADS": "1"})
    line = assert_one_line_error(result)
    assert line.startswith("error: --lora-dropout differs from the run being resumed") and "dropout 0 " in line, line


@pytest.mark.slow
def test_resume_with_the_same_targets_in_another_order_is_accepted(lora_checkpoint):
    reordered = ",".join(reversed(LORA_TARGETS.split(",")))
    result = run_script(PYTHON, *lora_checkpoint[:-1], reordered, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_adapter_records_are_compared_flag_by_flag():
    from finetune.model import lora

    now = lora.LoraSettings(16, 32.0, 0.1, ("v_proj", "q_proj"), False, "base").record()
    assert lora.resume_mismatch(now, dict(now)) is None
    assert lora.resume_mismatch(now, dict(now, rank=8))[0] == "--lora-rank"
    assert lora.resume_mismatch(now, dict(now, dropout=0.0))[0] == "--lora-dropout"
    assert lora.resume_mismatch(now, None)[0] == "--lora/--qlora"
