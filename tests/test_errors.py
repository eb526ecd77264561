"""finetune/errors.py: entry_point turns a FinetuneError into one `error:` line and exit status 1."""
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from finetune import errors
from finetune.errors import FinetuneError, entry_point, error_line


def test_error_line_has_one_error_prefix():
    assert error_line("disk full") == "error: disk full"
    assert error_line("error: disk full") == "error: disk full"  # never "error: error: ..."
    assert error_line(FinetuneError("bad flag")) == "error: bad flag"


def test_a_finetune_error_becomes_the_exit_message_and_nothing_else_is_printed(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    @entry_point
    def main(argv):
        raise FinetuneError(f"cannot read {argv[0]!r}")

    with pytest.raises(SystemExit) as raised:
        main(["data.jsonl"])
    # A string exit code is what the interpreter prints to stderr, with exit status 1.
    assert raised.value.code == "error: cannot read 'data.jsonl'"
    assert raised.value.__suppress_context__  # `from None`: no chained traceback behind the line
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_results_and_other_exceptions_pass_through(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    @entry_point
    def main(value, *, fail=False):
        """The wrapped main's docstring."""
        if fail:
            raise ValueError("a bug, not a user error")
        return value * 2

    assert main(21) == 42
    assert main.__name__ == "main" and main.__doc__ == "The wrapped main's docstring."
    with pytest.raises(ValueError, match="a bug, not a user error"):
        main(1, fail=True)


def test_a_plain_system_exit_keeps_its_code(monkeypatch):
    monkeypatch.setenv("RANK", "3")  # an int code is no error line, whatever the rank

    @entry_point
    def main():
        raise SystemExit(0)

    with pytest.raises(SystemExit) as raised:
        main()
    assert raised.value.code == 0


@pytest.fixture
def saved_stop_handlers():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_another_rank_waits_for_rank_0_then_prints_its_own_error_naming_itself(capsys, monkeypatch,
                                                                               saved_stop_handlers):
    monkeypatch.setenv("RANK", "2")
    waited = []
    monkeypatch.setattr(errors.time, "sleep", waited.append)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the training loop's stop handler

    @entry_point
    def main():
        raise FinetuneError("error: cannot write '/local/disk/rng_rank2.json' (no space left on device)")

    with pytest.raises(SystemExit) as raised:
        main()
    assert raised.value.code == 1
    assert waited == [10]  # rank 0 is given the time to say why first
    # torchrun's stop signal must now end this process silently: the stop handlers are gone.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    err = capsys.readouterr().err
    assert err == "\nerror: [rank 2] cannot write '/local/disk/rng_rank2.json' (no space left on device)\n"


def test_the_process_ends_with_one_error_line_and_status_1():
    code = ("from finetune.errors import FinetuneError, entry_point\n"
            "@entry_point\ndef main():\n    raise FinetuneError('no such folder')\nmain()\n")
    env = {key: value for key, value in os.environ.items() if key != "RANK"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1
    assert result.stderr == "error: no such folder\n" and result.stdout == ""
