"""finetune/model/remote_code.py: a folder's own code (auto_map) is refused with one line unless trusted."""
import json

import pytest
from transformers import AutoConfig, LlamaConfig

from finetune.errors import FinetuneError
from finetune.model.remote_code import asks_for_remote_code, refusing_remote_code, remote_code_error

CUSTOM_CODE = """open({marker!r}, "a").close()
from transformers import LlamaConfig
class Config(LlamaConfig):
    model_type = "custom_llama"
"""


@pytest.fixture
def folder_with_code(tmp_path):
    """A model folder whose config.json asks for its own config class; the code creates `marker` if it runs."""
    folder, marker = tmp_path / "model", tmp_path / "code_ran"
    folder.mkdir()
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4).to_dict()
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "custom.Config"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return folder, marker


def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(folder_with_code):
    folder, marker = folder_with_code
    with pytest.raises(FinetuneError) as raised:
        with refusing_remote_code(str(folder)):
            AutoConfig.from_pretrained(folder, trust_remote_code=False)
    assert str(raised.value) == (f"{folder} ships its own code (an auto_map in its config.json or "
                                 f"tokenizer_config.json), which was not run; pass --trust-remote-code if you trust it")
    assert raised.value.__suppress_context__
    assert not marker.exists()


def test_the_refusal_is_recognised_through_the_exception_chain():
    refusal = ValueError("The repository contains custom code ... Please pass the argument "
                         "`trust_remote_code=True` to allow custom code to be run.")
    assert asks_for_remote_code(refusal)
    try:
        try:
            raise refusal
        except ValueError as exc:
            raise OSError("could not load the config") from exc
    except OSError as wrapped:
        assert asks_for_remote_code(wrapped)
    assert not asks_for_remote_code(ValueError("some other problem"))
    assert not asks_for_remote_code(RuntimeError("trust_remote_code=True"))  # only transformers' ValueError
    assert not asks_for_remote_code(None)


def test_other_errors_pass_through_unchanged(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no model_type: transformers' own ValueError, not a refusal
    with pytest.raises(ValueError, match="Unrecognized model") as raised:
        with refusing_remote_code(str(tmp_path)):
            AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    assert not isinstance(raised.value, FinetuneError)
    with pytest.raises(KeyError):
        with refusing_remote_code("x"):
            raise KeyError("x")


def test_trusted_code_is_what_the_refusal_stood_between(folder_with_code, monkeypatch, tmp_path):
    """With trust_remote_code=True the same folder loads by running its code: the refusal was real."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # never the user's cache
    folder, marker = folder_with_code
    with refusing_remote_code(str(folder)):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "Config" and marker.exists()


def test_the_error_names_the_folder_and_the_flag():
    message = str(remote_code_error("org/model"))
    assert message.startswith("org/model ships its own code")
    assert message.endswith("pass --trust-remote-code if you trust it")
    assert "\n" not in message
