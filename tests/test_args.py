"""finetune/args.py: absurd sizes are refused at parse time with one line naming the flag and its range, and a
huge global batch plans only micro-batches of bounded size."""
import contextlib

import pytest
from conftest import RecordingChild

import train_llama2
from finetune.args import parse_training_args
from finetune.errors import FinetuneError
from finetune.plan import memory, memory_process


def parse_error(*argv):
    """The one-line FinetuneError parse_training_args stops with for the training flags `argv`."""
    with pytest.raises(FinetuneError) as raised:
        parse_training_args("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS, list(argv))
    message = str(raised.value)
    assert message and "\n" not in message, message
    return message


# ---- absurd sizes are refused at parse time; planning cost stays bounded ----------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--lora", "--lora-rank", str(10 ** 12)], "--lora-rank must be positive and at most 8192"),
    (["--plan-only", "--num-devices", "1000000", "--batch-size", "1000000"], "--num-devices must be from 1 to 8192"),
    (["--plan-only", "--batch-size", str(10 ** 9)], "--batch-size must be from 1 to 1048576"),
    (["--micro-batch-size", str(10 ** 9)], "--micro-batch-size must be from 1 to 1048576"),
])
def test_absurd_sizes_give_one_line_naming_the_flag_and_its_range(argv, expected):
    assert expected in parse_error(*argv)


def test_a_huge_global_batch_plans_only_micro_batches_of_bounded_size(tmp_path, monkeypatch):
    """A million rows on one device used to simulate micro-batches of up to a million rows (hours)."""
    monkeypatch.setenv("FINETUNE_MEMORY_CACHE", str(tmp_path / "cache"))
    child = RecordingChild()
    monkeypatch.setattr(memory_process, "SimulationChild", lambda: contextlib.nullcontext(child))
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    plan = memory.plan_candidates(config, 1, 2 ** 20, 128, device_memory_gb=80)
    assert child.asked and max(child.asked) * 128 <= memory.MAX_MICRO_BATCH_TOKENS
    assert plan.chosen.micro_batch_size == memory.MAX_MICRO_BATCH_TOKENS // 128
    with pytest.raises(ValueError, match="--micro-batch-size"):
        memory.plan_candidates(config, 1, 2 ** 20, 128, device_memory_gb=80, micro_batch_size=2 ** 20)
