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


def test_inference_rejects_deeply_nested_or_surrogate_examples_with_one_line(tiny_run, tmp_path):
    import inference

    nested = "[" * 100_000 + "]" * 100_000
    surrogate = '{"article": "w5 \\ud800 w6"}'
    chat_surrogate = json.dumps({"messages": [{"role": "user", "content": "w5 \ud800"}]})
    (tmp_path / "nested.jsonl").write_text(nested + "\n")
    (tmp_path / "surrogate.jsonl").write_text(surrogate + "\n")
    for argv, expected in [(["--example", nested], "error: --example is not valid JSON (nested too deep)"),
                           (["--example", surrogate], "error: --example holds a lone surrogate ('\\ud800'), which "
                                                      "is not text"),
                           (["--chat", "--example", chat_surrogate], "error: --example holds a lone surrogate"),
                           (["--example-file", str(tmp_path / "nested.jsonl")],
                            f"error: example 0 of {str(tmp_path / 'nested.jsonl')!r} is not valid JSON (nested too "
                            f"deep)"),
                           (["--example-file", str(tmp_path / "surrogate.jsonl")],
                            f"error: example 0 of {str(tmp_path / 'surrogate.jsonl')!r} holds a lone surrogate")]:
        assert error_of(inference.main, ["--model-dir", tiny_run["llama"]] + argv).startswith(expected)


def test_a_folder_saved_without_weights_is_named_for_it(tiny_run, tmp_path):
    """--save-dtype none writes the tokenizer and parallel_plan.json only (finetune/checkpoint/export.py)."""
    import inference

    timing = Path(shutil.copytree(tiny_run["llama"], tmp_path / "timing_run"))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (timing / name).unlink()
    (timing / "parallel_plan.json").write_text(json.dumps({"saved_dtype": "none", "world_size": 1}))
    assert error_of(inference.main, ["--model-dir", str(timing), "--example", '{"article": "w5"}']) == (
        f"error: {timing} holds no model weights: its run was saved with --save-dtype none (timing runs); train "
        f"with --save-dtype compute or fp32 to load it here")
    (timing / "parallel_plan.json").unlink()
    assert error_of(inference.main, ["--model-dir", str(timing), "--example", '{"article": "w5"}']) == (
        f"error: {timing} holds no model weights (no *.safetensors or *.bin file)")


def test_ctrl_c_during_a_reply_drops_that_exchange_and_the_chat_goes_on(tiny_run, monkeypatch, capsys):
    """The message whose reply was interrupted is not part of the conversation the next message is prompted
    with. (The same on a terminal: tests/integration/test_chat_run.py.)"""
    import argparse

    import inference
    from finetune.data.chat import chat_format

    tokenizer, model = inference.load_saved_model(tiny_run["llama"])
    typed = iter(["w5", "w6", "w7"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    prompts = []

    def fake_generate(model, tokenizer, ids, *rest):
        prompts.append(ids)
        if len(prompts) == 2:
            raise KeyboardInterrupt
        return "w9"

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(inference, "generate", fake_generate)
    args = argparse.Namespace(chat_format="auto", max_new_tokens=2, seed=0, chat=True)
    assert inference.interactive_chat(model, tokenizer, args, terminal=True) == 0
    fmt = chat_format(tokenizer, "auto")
    assert prompts[2] == fmt.prompt([{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w9"},
                                     {"role": "user", "content": "w7"}])
    assert "(reply stopped; that message and its reply are left out of the conversation)" in capsys.readouterr().out
