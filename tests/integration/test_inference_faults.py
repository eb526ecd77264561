"""inference.py under bad input: nonsense flags, bad examples and unloadable folders are one error line each;
generation is capped at the model's length with one note."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import error_of


# ---- inference.py -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_inference_rejects_nonsense_flags_before_loading(tiny_run):
    import inference

    for flag, value in [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "0"),
                        ("--temperature", "-1"), ("--temperature", "1e-300"), ("--top-p", "2"), ("--top-p", "0"),
                        ("--top-p", "nan"), ("--index", "-1"), ("--max-new-tokens", "0"), ("--max-new-tokens", "-5"),
                        ("--top-k", "-1"), ("--seed", "-1"), ("--seed", str(2**64))]:
        message = error_of(inference.main, ["--model-dir", tiny_run["llama"], "--max-new-tokens", "2", flag, value])
        assert message.startswith(f"error: {flag} must be"), message


@pytest.mark.slow
def test_inference_rejects_bad_examples_with_one_line_each(tiny_run, tmp_path):
    import inference

    lines = tmp_path / "two.jsonl"
    lines.write_text('{"article": "w5 w6"}\n{"article": \n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    cases = {
        '{"article": 5}': "must hold text", '{"article": null}': "must hold text", "null": "JSON object",
        "[1, 2]": "JSON object", '"text"': "JSON object", "": "not valid JSON", "{}": "lacks column",
    }
    for example, expected in cases.items():
        assert expected in error_of(inference.main, ["--model-dir", tiny_run["llama"], "--example", example])
    for argv, expected in [(["--example-file", str(lines), "--index", "1"], "not valid JSON"),
                           (["--example-file", str(lines), "--index", "2"], "past the end"),
                           (["--example-file", str(tmp_path / "empty.jsonl")], "past the end"),
                           (["--example-file", str(tmp_path / "binary.jsonl")], "cannot read"),
                           (["--example-file", str(tmp_path)], "cannot read"),
                           (["--example-file", str(tmp_path / "nope.jsonl")], "cannot read"),
                           (["--example-file", str(lines), "--example", "{}"], "not both")]:
        assert expected in error_of(inference.main, ["--model-dir", tiny_run["llama"]] + argv)


def test_inference_rejects_unloadable_model_folders(tiny_run, tmp_path, capsys):
    import inference

    truncated = Path(shutil.copytree(tiny_run["llama"], tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbled = Path(shutil.copytree(tiny_run["llama"], tmp_path / "garbled"))
    (garbled / "config.json").write_text('{"model_type": "llama", "hidden')
    example = ["--example", '{"article": "w5"}', "--max-new-tokens", "2"]
    for model_dir, expected in [(truncated, "cannot load a model"), (garbled, "cannot load a model"),
                                (tmp_path / "nope", "no such model folder"), (weights, "is not a folder")]:
        assert expected in error_of(inference.main, ["--model-dir", str(model_dir)] + example)
    # The tiny models' tokenizer has 128 ids: the baichuan2 chat format's user/assistant ids (195, 196) are not its.
    for model_dir in (tiny_run["baichuan"], tiny_run["llama"]):
        line = error_of(inference.main, ["--model-dir", model_dir, "--recipe", "baichuan2", "--chat", "--chat-format",
                                         "baichuan2", "--example", '{"instruction": "w5"}'])
        assert "--chat-format baichuan2 marks turns with token ids 195 and 196, which mean other words" in line


def test_inference_names_the_bad_key_of_a_baichuan_config(tiny_run, tmp_path):
    import inference

    values = json.loads(Path(tiny_run["baichuan"], "config.json").read_text())
    # (key the error line must name, config.json content)
    cases = [("norm_head", {**values, "norm_head": "false"}), ("norm_head", {**values, "norm_head": [0]}),
             ("num_attention_heads", {**values, "num_attention_heads": 0}),
             ("vocab_size", {**values, "vocab_size": "4000"}), ("model_type", [])]
    for n, (key, content) in enumerate(cases):
        folder = Path(shutil.copytree(tiny_run["baichuan"], tmp_path / f"bad{n}"))
        (folder / "config.json").write_text(json.dumps(content))
        message = error_of(inference.main, ["--model-dir", str(folder), "--recipe", "baichuan2"])
        assert message.startswith("error: cannot load a model") and key in message, message

def test_inference_caps_generation_at_the_models_length_with_one_note(tiny_run, tmp_path, capsys):
    import inference

    short = Path(shutil.copytree(tiny_run["llama"], tmp_path / "short"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=24)))
    inference.main(["--model-dir", str(short), "--example", '{"article": "w5"}', "--max-new-tokens", "200"])
    printed = capsys.readouterr().out
    prompt_tokens = int(printed.split("--- prompt (")[1].split(" tokens")[0])
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"at most {24 - prompt_tokens} tokens, not 200" in notes[0], printed
    for name in ("greedy", "sampled"):
        generated = printed.split(f"--- {name} ---\n")[1].split("\n---")[0].split()
        assert 0 < len(generated) <= 24 - prompt_tokens, printed
    long_article = json.dumps({"article": " ".join(["w7"] * 40)})
    assert "shorten the example" in error_of(inference.main, ["--model-dir", str(short), "--example", long_article])
