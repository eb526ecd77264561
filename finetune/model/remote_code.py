"""A model folder never runs its own code unless the user said so with --trust-remote-code.

A folder whose config.json or tokenizer_config.json has an `auto_map` naming its own .py files asks transformers
to import them. Left undecided (`trust_remote_code=None`), transformers asks `[y/N]` on stdin and runs the code
on "y", from a pipe too; every load here passes True or False, and a refusal is one error line. Folders whose
classes are registered locally (Baichuan2's releases, by modeling_baichuan.py) still load without the flag:
transformers prefers a registered class to the folder's own code.
"""
import contextlib
from collections.abc import Iterator

from finetune.errors import FinetuneError

REFUSAL = "trust_remote_code=True"  # what transformers' refusal asks the caller to pass


def asks_for_remote_code(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it came from, is transformers refusing a folder's own code."""
    while exc is not None:
        if isinstance(exc, ValueError) and REFUSAL in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def remote_code_error(name: str) -> FinetuneError:
    return FinetuneError(f"{name} ships its own code (an auto_map in its config.json or tokenizer_config.json), "
                         f"which was not run; pass --trust-remote-code if you trust it")


@contextlib.contextmanager
def refusing_remote_code(name: str) -> Iterator[None]:
    """Around a from_pretrained with trust_remote_code: transformers' refusal becomes one error line."""
    try:
        yield
    except Exception as exc:
        if asks_for_remote_code(exc):
            raise remote_code_error(name) from None
        raise
