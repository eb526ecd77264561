"""Faults in prepare_dataset.py and inference.py: nonsense flags, bad files, kills mid-write, two runs at once.

Every bad input must end in one `error: ...` line (printed, or a SystemExit's message; the scripts' own processes
print it) and leave what was on disk as it was.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO_ROOT

import prepare_dataset as pd
from finetune.data import output


def error_of(main, argv):
    """The one `error: ...` line a script's main() stops with: its SystemExit's message, or the line it printed
    before exiting with status 1."""
    printed = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(printed):
        main(argv)
    code = stopped.value.code
    message = code if isinstance(code, str) else (printed.getvalue().strip().splitlines() or [""])[-1]
    assert code and message.startswith("error: ") and "\n" not in message, message
    return message


# ---- prepare_dataset.py: flags and paths ------------------------------------------------------------------------

@pytest.fixture
def tiny_source(tiny_run, tmp_path):
    """prepare_dataset.py arguments for a fast run: the tiny word-level tokenizer and a five-example jsonl file."""
    data = tmp_path / "articles.jsonl"
    data.write_text("".join(json.dumps({"article": f"w{5 + i} w9 w10", "highlights": f"w{20 + i} w21"}) + "\n"
                            for i in range(5)))
    return ["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data)]


def test_prepare_rejects_nonsense_numbers_before_any_work(tmp_path):
    save_path = tmp_path / "out"
    for flag, value in [("--seed", "-1"), ("--validation-fraction", "nan"), ("--validation-fraction", "inf"),
                        ("--validation-fraction", "1"), ("--validation-fraction", "-0.1"), ("--block-size", "0"),
                        ("--block-size", "-8"), ("--max-examples", "-3"), ("--max-examples", "0")]:
        message = error_of(pd.main, ["llama2", "--demo", "--save-path", str(save_path), flag, value])
        assert message.startswith(f"error: {flag} must be"), message
    assert not save_path.exists()


def test_prepare_save_path_under_a_file_or_naming_no_folder_is_one_error_line(tiny_source, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert "cannot create its parent folder" in error_of(pd.main, tiny_source + ["--save-path", str(a_file / "out")])
    assert "names no folder" in error_of(pd.main, tiny_source + ["--save-path", "/"])
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["articles.jsonl",
                                                                                              "notes.txt"]


def test_prepare_names_an_empty_data_folder_and_a_tokenizer_file(tiny_run, tiny_source, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = tiny_source[:-1] + [str(tmp_path / "empty"), "--save-path", str(tmp_path / "out")]
    assert "holds no files" in error_of(pd.main, argv)
    argv = ["llama2", "--model-name-or-path", str(Path(tiny_run["llama"]) / "tokenizer.json")] + tiny_source[3:]
    assert "is a file" in error_of(pd.main, argv + ["--save-path", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_folders_it_created(tiny_source, tmp_path):
    save_path = tmp_path / "new" / "deeper" / "out"
    error_of(pd.main, tiny_source[:-1] + [str(tmp_path / "missing.jsonl"), "--save-path", str(save_path)])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_ctrl_c_or_a_full_disk_while_writing_keeps_the_previous_output(tiny_source, tmp_path, monkeypatch, fault):
    save_path = tmp_path / "out"
    pd.main(tiny_source + ["--save-path", str(save_path)])
    before = snapshot(tmp_path)
    real_save = output.save_dataset_and_report

    def failing(dataset, report, folder):
        real_save(dataset, report, folder)
        raise fault

    monkeypatch.setattr(output, "save_dataset_and_report", failing)
    try:
        message = error_of(pd.main, tiny_source + ["--save-path", str(save_path), "--max-examples", "2"])
    except (KeyboardInterrupt, OSError) as escaped:
        pytest.fail(f"{escaped!r} ended prepare_dataset.py with a traceback")
    assert ("interrupted" if fault is KeyboardInterrupt else "No space left") in message
    assert snapshot(tmp_path) == before


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---- prepare_dataset.py: kills mid-write and two runs at once ----------------------------------------------------

# A child process claims a save path and writes a stand-in data set through finetune.data.output, counting
# every file-system step (file writes, renames, the atomic swap, deletions). At step STOP it dies on the spot (os._exit:
# no cleanup, like SIGKILL) or waits for a "go" file. It imports only finetune.data.output, not the package's
# torch-heavy __init__, so that each of the ~30 children starts in a fraction of a second.
CHILD = r'''
import os, shutil, sys, time, types
from pathlib import Path
package = types.ModuleType("finetune"); package.__path__ = [os.path.join(os.getcwd(), "finetune")]
sys.modules["finetune"] = package
from finetune.data import output

target, stop, how, swap, signals = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
steps = 0

def step(function):
    def counted(*args, **kwargs):
        global steps
        steps += 1
        if steps == stop:
            if how == "kill":
                os._exit(9)
            (signals / "paused").touch()
            while not (signals / "go").exists():
                time.sleep(0.02)
        return function(*args, **kwargs)
    return counted

for owner, name in ((os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"), (Path, "write_text")):
    setattr(owner, name, step(getattr(owner, name)))
output._exchange = step(output._exchange if swap == "exchange" else lambda first, second: False)

class StandIn:
    def save_to_disk(self, folder):
        os.makedirs(folder)
        for name in ("dataset_dict.json", "data.arrow"):
            Path(folder, name).write_text("new")

with output.claim_save_path(target) as folder:
    output.write_output(StandIn(), {"made_by": output.MADE_BY, "run": "new"}, folder)
'''


def write_stand_in(folder, run):
    folder.mkdir()
    for name in ("dataset_dict.json", "data.arrow"):
        (folder / name).write_text(run)
    (folder / output.REPORT_FILE).write_text(json.dumps({"made_by": output.MADE_BY, "run": run}))


def state(folder):
    """'old' or 'new' for a complete stand-in output, 'missing', or 'broken' for anything in between."""
    if not folder.exists():
        return "missing"
    if sorted(os.listdir(folder)) != ["data.arrow", "dataset_dict.json", output.REPORT_FILE]:
        return "broken"
    run = json.loads((folder / output.REPORT_FILE).read_text())["run"]
    data = {(folder / name).read_text() for name in ("data.arrow", "dataset_dict.json")}
    return run if data == {run} else "broken"


def start_child(target, stop, how="kill", swap="exchange", signals=None):
    return subprocess.Popen([PYTHON, "-c", CHILD, str(target), str(stop), how, swap, str(signals or target.parent)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("swap, previous", [("exchange", True), ("two renames", True), ("exchange", False)])
def test_a_kill_at_any_step_keeps_an_output_and_the_next_run_recovers(tmp_path, swap, previous):
    """Kill the writer at step 1, 2, ... until it finishes. With an atomic swap the folder always holds the old
    or the new output; without one it may be missing for one step, with the old output beside it. The next run
    (claiming the path) puts the old output back or keeps the new one, and leaves nothing else."""
    if swap == "exchange":
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        if not output._exchange(tmp_path / "a", tmp_path / "b"):
            pytest.skip("this file system cannot swap two folders in one step")
    seen = []
    for stop in range(1, 40):
        root = tmp_path / f"stop{stop}"
        root.mkdir()
        out = root / "out"
        if previous:
            write_stand_in(out, "old")
        child = start_child(out, stop, swap=swap)
        _, stderr = child.communicate(timeout=60)
        if child.returncode == 0:
            assert state(out) == "new" and os.listdir(root) == ["out"]
            break
        assert child.returncode == 9, stderr
        now = state(out)
        seen.append(now)
        if now == "missing" and previous:  # only between the two renames: the old output waits beside it
            assert swap == "two renames" and state(root / ".out.old") == "old"
        else:
            assert now in ("old", "new") if previous else now in ("missing", "new")
        with output.claim_save_path(out):  # what the next run does first
            pass
        after = state(out)
        assert after == ("old" if now == "missing" and previous else now)
        assert os.listdir(root) == ([] if after == "missing" else ["out"]), os.listdir(root)
    else:
        pytest.fail("the writer never finished")
    assert len(seen) >= 4  # the sweep really stopped the writer at several steps
    assert set(seen) == ({"old", "new", "missing"} if swap == "two renames" else
                         {"old", "new"} if previous else {"missing", "new"})


def test_leftovers_of_the_unlocked_writer_are_recovered(tmp_path):
    """Earlier versions named their folders .NAME.old-PID and .NAME.tmp-XXXX and took no lock."""
    out = tmp_path / "out"
    write_stand_in(tmp_path / ".out.old-4242", "old")
    (tmp_path / ".out.tmp-k2x9a0zq").mkdir()
    (tmp_path / ".out.tmp-k2x9a0zq" / "data.arrow").write_text("half")
    write_stand_in(tmp_path / ".out.tmp.old", "other")  # left by an output named "out.tmp": not ours to touch
    with output.claim_save_path(out):
        pass
    assert state(out) == "old" and sorted(os.listdir(tmp_path)) == [".out.tmp.old", "out"]


def test_a_second_run_into_the_same_path_leaves_the_first_alone(tiny_source, tmp_path):
    out = tmp_path / "out"
    write_stand_in(out, "old")
    signals = tmp_path / "signals"
    signals.mkdir()
    first = start_child(out, 3, how="pause", signals=signals)  # paused while writing its new folder
    try:
        deadline = time.monotonic() + 60
        while not (signals / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        during = snapshot(tmp_path)
        message = error_of(pd.main, tiny_source + ["--save-path", str(out)])
        assert "another prepare_dataset.py run is writing" in message
        assert snapshot(tmp_path) == during  # the first run's folders and lock untouched
    finally:
        (signals / "go").touch()
        first.communicate(timeout=60)
    assert first.returncode == 0 and state(out) == "new"
    assert sorted(os.listdir(tmp_path)) == ["articles.jsonl", "out", "signals"]


def test_the_real_script_killed_between_its_renames_loses_nothing(tiny_source, tmp_path):
    """prepare_dataset.py itself, on a system without an atomic swap, killed right after moving the previous
    output aside. The next run restores it even though that run fails; the one after replaces it."""
    out = tmp_path / "out"
    pd.main(tiny_source + ["--save-path", str(out), "--max-examples", "2"])
    previous = snapshot(out)
    killed = subprocess.run([PYTHON, "-c", r'''
import os, runpy, sys
real_replace = os.replace
def replace(source, destination):
    if os.path.basename(destination) == "out":  # the new output is about to be renamed into place
        os._exit(9)
    return real_replace(source, destination)
os.replace = replace
import finetune.data.output
finetune.data.output._exchange = lambda first, second: False
sys.argv = sys.argv[1:]
runpy.run_path("prepare_dataset.py", run_name="__main__")
''', "prepare_dataset.py", *tiny_source, "--save-path", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not out.exists() and any(snapshot(p) == previous for p in tmp_path.iterdir() if p.name.startswith("."))

    failing = tiny_source[:-1] + [str(tmp_path / "missing.jsonl"), "--save-path", str(out)]
    error_of(pd.main, failing)
    assert snapshot(out) == previous and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    pd.main(tiny_source + ["--save-path", str(out)])
    report = json.loads((out / output.REPORT_FILE).read_text())
    assert report["splits"]["train"]["examples"] + report["splits"]["validation"]["examples"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- inference.py -------------------------------------------------------------------------------------------------

def test_inference_rejects_nonsense_flags_before_loading(tiny_run):
    import inference

    for flag, value in [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "0"),
                        ("--temperature", "-1"), ("--temperature", "1e-300"), ("--top-p", "2"), ("--top-p", "0"),
                        ("--top-p", "nan"), ("--index", "-1"), ("--max-new-tokens", "0"), ("--max-new-tokens", "-5"),
                        ("--top-k", "-1"), ("--seed", "-1"), ("--seed", str(2**64))]:
        message = error_of(inference.main, ["--model-dir", tiny_run["llama"], "--max-new-tokens", "2", flag, value])
        assert message.startswith(f"error: {flag} must be"), message


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
    # The tiny models' tokenizer has 128 ids, fewer than the baichuan2 chat format's user/assistant ids (195, 196).
    for model_dir in (tiny_run["baichuan"], tiny_run["llama"]):
        with pytest.raises(SystemExit):
            inference.main(["--model-dir", model_dir, "--recipe", "baichuan2", "--chat", "--chat-format", "baichuan2",
                            "--example", '{"instruction": "w5"}'])
        assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: the baichuan2 chat format uses token ids "
                                                                    "195 and 196, but the tokenizer has only 128 ids")



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
