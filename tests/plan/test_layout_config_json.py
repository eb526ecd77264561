"""finetune/plan/layout.py: --plan-only reads config.json itself and names what is broken in it."""

import pytest
import torch
from conftest import PYTHON, run_script

import train_llama2
from finetune.args import parse_training_args

# ---- --plan-only reads config.json itself --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"), ("", "is empty"), ("  \n", "is empty"), ("[1, 2]", "JSON object, not a list"),
    ('{"model_type": "llama", "vocab_size": 128}', "lacks hidden_size"),
    ('{"hidden_size": 32}', "names no model_type"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_plan_only_names_a_broken_config_json(tmp_path, text, expected):
    from finetune.config import from_flags
    from finetune.distributed.backend import Backend
    from finetune.errors import FinetuneError
    from finetune.plan import layout

    config = tmp_path / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = parse_training_args("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS,
                               ["--plan-only", "--model-name-or-path", str(tmp_path)])
    with pytest.raises(FinetuneError) as raised:
        layout.plan_only(from_flags(args), Backend(engine="single", device=torch.device("cpu")))
    assert str(config) in str(raised.value) and expected in str(raised.value), raised.value


@pytest.mark.slow
def test_plan_only_with_a_broken_config_json_exits_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    result = run_script(PYTHON, "train_llama2.py", "--plan-only", "--model-name-or-path", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'config.json'} must hold a JSON object, " \
                                                     f"not a list"
