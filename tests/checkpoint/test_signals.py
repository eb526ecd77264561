"""finetune/checkpoint/signals.py: StopRequest set once by SIGTERM/SIGINT; a later second SIGINT stops at once."""
import signal

import pytest

from finetune.checkpoint.signals import StopRequest


@pytest.fixture(autouse=True)
def restore_handlers():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_sigterm_asks_for_a_stop_after_the_step():
    stop = StopRequest()
    assert not stop.requested()
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested() and stop.signal_name == "SIGTERM"


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
def test_a_repeat_within_moments_changes_nothing(first, second):
    stop = StopRequest()
    signal.raise_signal(first)
    signal.raise_signal(second)  # torchrun passing on the same stop: one checkpoint, no error
    assert stop.requested() and stop.signal_name == signal.Signals(first).name


def test_a_later_second_sigint_stops_at_once_naming_the_newest_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "checkpoints" / "step-00000006").mkdir(parents=True)
    monkeypatch.setattr(StopRequest, "REPEAT_SECONDS", -1.0)  # every repeat counts as "later"
    StopRequest(str(tmp_path))
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(SystemExit) as raised:
        signal.raise_signal(signal.SIGINT)
    assert raised.value.code == (
        "error: stopped at once by a second SIGINT, without writing a checkpoint; the newest complete checkpoint "
        f"is {tmp_path / 'checkpoints' / 'step-00000006'}; continue from it with --resume")


def test_a_later_second_sigint_without_a_save_folder_or_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(StopRequest, "REPEAT_SECONDS", -1.0)
    for save_dir, note in ((None, ""), (str(tmp_path), "no checkpoint has been written yet")):
        StopRequest(save_dir)
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(SystemExit) as raised:
            signal.raise_signal(signal.SIGINT)
        assert raised.value.code.endswith(f"without writing a checkpoint; {note}")


def test_a_later_sigterm_never_stops_at_once(monkeypatch):
    """Only a person presses Ctrl-C twice; a scheduler's repeated SIGTERM still gets its checkpoint."""
    monkeypatch.setattr(StopRequest, "REPEAT_SECONDS", -1.0)
    stop = StopRequest()
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested() and stop.signal_name == "SIGINT"
