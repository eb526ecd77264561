"""Reaching the Hugging Face Hub: fail at once with one line when it cannot answer, instead of long retries."""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from finetune.errors import FinetuneError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


class HubUnreachable(Exception):
    """The hub is needed for a name that is not a local path, and it cannot be reached."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def require_hub(what: str, name: str) -> None:
    """Raise HubUnreachable at once when the hub cannot be asked for `name` (no network, wrong endpoint)."""
    if hub_offline():
        return  # the libraries then look only in the local cache and fail fast if it is not there
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        raise HubUnreachable(f"cannot reach {endpoint.hostname} to download {what} '{name}'; "
                             "pass a local path or use --demo") from None


def looks_like_path(name: str) -> bool:
    """Hub ids look like "name" or "org/name"; anything else that does not exist is a missing local path."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_SUFFIXES or name.count("/") > 1


def root_cause_message(problem: BaseException) -> str:
    """First line of the innermost exception's message ("JSON parse error ..." rather than "An error occurred")."""
    while (problem.__cause__ or problem.__context__) is not None:
        problem = problem.__cause__ or problem.__context__
    text = str(problem).strip()
    return text.splitlines()[0] if text else type(problem).__name__


def require_local_or_reachable(model_name_or_path: str) -> None:
    """A model that is neither a local folder nor reachable on the hub: one error line, at once."""
    if os.path.isdir(model_name_or_path):
        return
    try:
        require_hub("model", model_name_or_path)
    except HubUnreachable as exc:
        raise FinetuneError(str(exc)) from None
