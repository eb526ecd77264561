"""Conversations end to end: inference.py --chat (an example, and an interactive terminal), training on chat rows
with both scripts, and the chat quick start of docs/chat.md."""
import contextlib
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script


def test_inference_chat_prompts_an_example_conversation_up_to_its_last_question(tiny_run, capsys):
    import inference

    example = {"conversations": [{"from": "human", "value": "w5 w6"}, {"from": "gpt", "value": "w7"},
                                 {"from": "human", "value": "w8"}, {"from": "gpt", "value": "w9 w9"}]}
    assert inference.main(["--model-dir", tiny_run["llama"], "--chat", "--example", json.dumps(example),
                           "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    # llama2 layout (the word tokenizer has no chat template): the last reply is left for the model to write.
    assert "--- prompt (" in out and "w5 w6" in out and "w8" in out and "w9" not in out.split("--- greedy")[0]
    assert "--- greedy ---" in out and "--- sampled ---" in out


def read_until(fd, pattern, timeout=120):
    """Terminal output up to and including `pattern` (a regex)."""
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, seen):
        assert time.monotonic() < deadline, f"no {pattern!r} in: {seen!r}"
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096).decode(errors="replace")
    return seen


@pytest.mark.slow
def test_inference_chat_on_a_terminal_keeps_the_history_until_reset(tiny_run):
    process, controller = chat_on_a_terminal(tiny_run["llama"], "--max-new-tokens", "2")
    try:
        read_until(controller, r"you> ")
        prompt_sizes = []
        for line in ["w5 w6 w7", "w8", "/reset", "w5 w6 w7"]:
            os.write(controller, (line + "\n").encode())
            seen = read_until(controller, r"you> ")
            if line == "/reset":
                assert "(conversation cleared)" in seen
            else:
                prompt_sizes.append(int(re.search(r"\((\d+) prompt tokens\)", seen).group(1)))
        os.write(controller, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    first, second, after_reset = prompt_sizes
    assert second > first + 2  # the second turn is prompted with the first exchange too
    assert after_reset == first  # /reset: the same question is prompted as at the start


def chat_on_a_terminal(model_dir, *flags):
    """inference.py --chat on a pseudo-terminal: (process, the controller's fd)."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([PYTHON, "inference.py", "--model-dir", str(model_dir), "--chat", *flags],
                               cwd=REPO_ROOT, env=env, stdin=terminal, stdout=terminal, stderr=terminal,
                               close_fds=True)
    os.close(terminal)
    return process, controller


def cpu_seconds(pid):
    """The CPU time a process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_cpu(pid, seconds, timeout=120):
    """Wait until the process has used `seconds` of CPU time: reading a line costs next to none, so it is then
    computing (a loaded machine may take a while to get there; a fixed sleep could send a signal too early)."""
    deadline = time.monotonic() + timeout
    while cpu_seconds(pid) < seconds:
        assert time.monotonic() < deadline, "the process did not start computing"
        time.sleep(0.05)


def wait_until_reading(pid, timeout=120):
    """Wait until the process sleeps without using CPU time (waiting for a line), as a user's Ctrl-C finds it."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        used = cpu_seconds(pid)
        if state == "S" and used == last:
            return
        assert time.monotonic() < deadline, "the process did not wait for input"
        last = used
        time.sleep(0.3)


def rest_of_output(fd):
    """What the terminal still shows after the process ended."""
    seen = ""
    with contextlib.suppress(OSError):  # EIO once the other end is closed
        while select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
    return seen


@pytest.mark.slow
def test_ctrl_c_at_the_chat_prompt_ends_the_chat_cleanly(tiny_run):
    process, controller = chat_on_a_terminal(tiny_run["llama"], "--max-new-tokens", "2")
    try:
        seen = read_until(controller, r"you> ")
        wait_until_reading(process.pid)  # the prompt is printed just before input() starts waiting
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=60) == 0
        seen += rest_of_output(controller)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert "(chat ended)" in seen and "Traceback" not in seen and "KeyboardInterrupt" not in seen, seen


@pytest.mark.slow
def test_the_chat_prompt_survives_ctrl_c_in_a_reply_bad_bytes_and_unknown_commands(tiny_run, tmp_path):
    """Ctrl-C during a reply drops that exchange and prompts again; a line that is not UTF-8 and an unknown
    /command are not sent to the model. The model never ends its turn (its end-of-turn token is suppressed) and
    holds 8192 positions, so a reply of up to 8000 tokens is still being written when Ctrl-C comes (2000 tokens took
    under 3 s on a quiet machine)."""
    model_dir = Path(shutil.copytree(tiny_run["llama"], tmp_path / "endless"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=8192)))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps(dict(generation, suppress_tokens=[2])))
    process, controller = chat_on_a_terminal(model_dir, "--max-new-tokens", "8000")
    transcript = ""
    try:
        transcript += read_until(controller, r"you> ")
        os.write(controller, b"w5 \xff\xfe w6\n")
        seen = read_until(controller, r"you> ")
        assert "(that line is not UTF-8 text; nothing was sent)" in seen and "model>" not in seen, seen
        os.write(controller, b"/summarise w5\n")
        seen = read_until(controller, r"you> ")
        assert "(unknown command /summarise; nothing was sent." in seen and "model>" not in seen, seen
        transcript += seen
        busy = cpu_seconds(process.pid)
        os.write(controller, b"w5 w6\n")
        wait_for_cpu(process.pid, busy + 0.5)  # the reply is being generated, however busy the machine is
        process.send_signal(signal.SIGINT)
        seen = read_until(controller, r"you> ")
        assert "(reply stopped; that message and its reply are left out of the conversation)" in seen, seen
        assert "model>" not in seen, seen
        transcript += seen
        os.write(controller, b"/reset\n")
        transcript += read_until(controller, r"\(conversation cleared\)")
        os.write(controller, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert "Traceback" not in transcript and "error:" not in transcript, transcript


def piped_chat(model_dir, text, *flags):
    """`... | inference.py --chat`: standard input is a pipe, not a terminal."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([PYTHON, "inference.py", "--model-dir", str(model_dir), "--chat", *flags], cwd=REPO_ROOT,
                          env=env, input=text, capture_output=True, timeout=120)


@pytest.mark.slow
def test_piped_text_is_the_message_not_the_bundled_sample(tiny_run):
    from transformers import AutoTokenizer

    from finetune.data.chat import chat_format

    fmt = chat_format(AutoTokenizer.from_pretrained(tiny_run["llama"]), "auto")
    result = piped_chat(tiny_run["llama"], b"w5 w6 w7\n", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    replies = [line for line in result.stdout.decode().splitlines() if line.startswith("model> ")]
    expected = len(fmt.prompt([{"role": "user", "content": "w5 w6 w7"}]))
    assert len(replies) == 1 and replies[0].endswith(f"({expected} prompt tokens)"), result.stdout
    nothing = piped_chat(tiny_run["llama"], b"")
    assert assert_one_line_error(subprocess.CompletedProcess(nothing.args, nothing.returncode, nothing.stdout.decode(),
                                                             nothing.stderr.decode())).startswith(
        "error: --chat read no message from standard input")


@pytest.mark.slow
def test_a_conversation_past_the_models_positions_or_a_huge_line_keeps_the_session(tiny_run, tmp_path):
    """The oldest exchanges are dropped (with a note) when the conversation passes the model's positions; a 1 MB
    line, and a message that cannot fit alone, are refused, and the conversation before them is kept."""
    from transformers import AutoTokenizer

    from finetune.data.chat import chat_format

    short = Path(shutil.copytree(tiny_run["llama"], tmp_path / "short"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=40)))
    fmt = chat_format(AutoTokenizer.from_pretrained(str(short)), "auto")
    lines = [b"w5 " * 350_000, b"w5 w6 w7 w8", b"w9 w10", b"w11 w12", b"w13 " * 45, b"w14"]
    started = time.monotonic()
    result = piped_chat(short, b"\n".join(lines) + b"\n", "--max-new-tokens", "4")
    assert time.monotonic() - started < 60
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    out = [line for line in result.stdout.decode().splitlines() if line.startswith(("model>", "("))]
    dropped = "(dropped the 2 oldest turns: the conversation passed the model's 40 positions)"
    assert [line if line.startswith("(") else "model>" for line in out[:6]] == [
        "(that message has 1049999 characters, more than the model's 40 positions can hold; nothing was sent)",
        "model>", "model>", dropped, "model>",
        "(that message alone takes more than the model's 40 positions; nothing was sent)"], out
    # The last message is prompted with the exchanges kept from before the refused message, less the oldest ones
    # while the prompt and the 4 new tokens pass the 40 positions.
    replies = [line.removeprefix("model> ").rsplit("   (", 1)[0] for line in out if line.startswith("model>")]
    history = [{"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": replies[1]},
               {"role": "user", "content": "w11 w12"}, {"role": "assistant", "content": replies[2]},
               {"role": "user", "content": "w14"}]
    expected_tail = []
    while len(fmt.prompt(history)) + 4 > 40:
        history = history[2:]
        expected_tail = [dropped]
    assert [line if line.startswith("(") else "model>" for line in out[6:]] == expected_tail + ["model>"], out
    assert out[-1].endswith(f"({len(fmt.prompt(history))} prompt tokens)"), out
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.slow
def test_both_training_scripts_learn_from_chat_rows(tmp_path):
    """Chat rows train like any prepared rows: packed (never split), LoRA, checkpoints and resume."""
    from datasets import load_from_disk

    from finetune.data.batches import TokenTable, collate_rows, pack_examples

    for recipe_family, script in (("llama2", "train_llama2.py"), ("baichuan2", "train_baichuan2_13b.py")):
        data = tmp_path / f"{recipe_family}_chat"
        tokenizer_model = ["--model-name-or-path", str(_demo_tokenizer(recipe_family))]
        result = run_script(PYTHON, "prepare_dataset.py", "chat", "--demo", *tokenizer_model, "--max-examples", "60",
                            "--save-path", str(data))
        assert result.returncode == 0, result.stderr
        table = TokenTable(load_from_disk(str(data))["train"])
        rows = pack_examples(table.lengths, 256, range(len(table)))
        batch = collate_rows(table, rows[:2], pad_id=0)
        for row, spans in zip(rows[:2], batch["example_spans"]):
            for index, (start, end) in zip(row, spans):  # each packed span is one whole conversation
                ids, labels = table.example(index)
                assert end - start == len(ids) and batch["labels"][rows.index(row)][start + 1:end].tolist() == \
                    labels[1:].tolist()
        out = tmp_path / f"{recipe_family}_out"
        common = [PYTHON, script, "--demo", "--dataset-name-or-path", str(data), "--save-model-dir", str(out),
                  "--block-size", "256", "--batch-size", "2", "--log-interval", "1", "--lora", "--max-steps", "3",
                  "--save-every", "1"]
        first = run_script(*common)
        assert first.returncode == 0, first.stderr
        if recipe_family == "llama2":  # as if killed after step 2: its checkpoint is the newest one left
            shutil.rmtree(out / "checkpoints" / "step-00000003")
            resumed = run_script(*common, "--resume")
            assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stdout + resumed.stderr
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in steps][-1] == 3 and all(row["loss"] == row["loss"] for row in steps)
        assert (out / "adapter").is_dir()


def _demo_tokenizer(family):
    from finetune import demo

    return demo.ensure_demo_tokenizer(family)


def docs_chat_commands():
    text = (REPO_ROOT / "docs" / "chat.md").read_text()
    section = text[text.index("# Conversations\n"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_docs_chat_quick_start_runs_as_written(tmp_path):
    """The chat lines of docs/chat.md, run in a copy of the repository; training stops after 3 steps (--max-steps 3 is
    added to its line: the full demo run takes minutes, see benchmarks/demo_chat_recall.py for what it learns)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("prepare_dataset.py", "train_llama2.py", "inference.py", "modeling_baichuan.py"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for folder in ("finetune", "data", "benchmarks"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    commands = docs_chat_commands()
    assert [shlex.split(command)[1] for command in commands] == ["prepare_dataset.py", "train_llama2.py", "inference.py"]
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        if argv[1] == "train_llama2.py":
            argv[argv.index("--max-steps") + 1] = "3"
        result = run_script(PYTHON, *argv[1:], cwd=repo, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    assert "chat format llama2" in outputs[0]
    assert "--- greedy ---" in outputs[-1] and "Which town do I live in?" in outputs[-1]


def test_chat_recall_benchmark_scores_held_out_questions(tiny_run):
    """The benchmark scores the held-out conversations' last questions; the figures are its business, not ours."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_chat_recall", REPO_ROOT / "benchmarks" / "demo_chat_recall.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    conversations = bench.held_out_conversations(limit=3)
    assert len(conversations) == 3
    for messages, fact in conversations:
        assert messages[-1]["role"] == "user" and fact in " ".join(m["content"] for m in messages[:3])
        assert fact not in " ".join(m["content"] for m in bench.without_introduction(messages))
    figures = bench.main(["--limit", "3", "--max-new-tokens", "2"])
    assert figures["conversations"] == 3 and 0 <= figures["before"] <= 1
