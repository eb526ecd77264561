"""finetune/model/hub.py: an unreachable hub is one FinetuneError line at once; paths told from hub ids."""
import socket
import time

import pytest

from finetune.errors import FinetuneError
from finetune.model import hub


def closed_port():
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), (" YES ", True), ("on", True),
                                            ("0", False), ("", False), ("false", False)])
def test_hub_offline_reads_the_usual_spellings(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_offline() is offline


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with pytest.raises(FinetuneError) as raised:
        hub.require_local_or_reachable("some-org/some-model")
    assert time.monotonic() - started < 3  # no retries
    assert str(raised.value) == ("cannot reach 127.0.0.1 to download model 'some-org/some-model'; pass a local "
                                 "path or use --demo")
    with pytest.raises(hub.HubUnreachable, match="to download dataset 'someone/data'"):
        hub.require_hub("dataset", "someone/data")


def test_offline_mode_never_connects(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("connected while offline"))
    hub.require_hub("model", "some-org/some-model")  # the libraries then fail fast on their own cache
    hub.require_local_or_reachable("some-org/some-model")


def test_a_local_folder_needs_no_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("asked the hub"))
    hub.require_local_or_reachable(str(tmp_path))


@pytest.mark.parametrize("name, path", [("./model", True), ("/abs/model", True), ("~/model", True),
                                        ("train.jsonl", True), ("data.CSV", True), ("a/b/c", True),
                                        ("gpt2", False), ("meta-llama/Llama-2-13b-hf", False)])
def test_paths_are_told_from_hub_ids(name, path):
    assert hub.looks_like_path(name) is path


def test_the_root_cause_is_the_innermost_exception_first_line():
    try:
        try:
            try:
                raise ValueError("JSON parse error at line 3\nmore detail")
            except ValueError as inner:
                raise RuntimeError("An error occurred") from inner
        except RuntimeError:
            raise OSError("while loading")  # noqa: B904  (implicitly chained, as libraries do)
    except OSError as outer:
        assert hub.root_cause_message(outer) == "JSON parse error at line 3"
    assert hub.root_cause_message(KeyError()) == "KeyError"
