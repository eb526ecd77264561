"""The project's one exception type, and the entry-point wrapper that turns it into one `error:` line."""
import functools
import sys
from collections.abc import Callable


class FinetuneError(Exception):
    """A problem with the user's input, files or machine. The message is one line, without "error: "; the
    script's entry point prints it as `error: <message>` and exits with status 1."""


def error_line(message: str) -> str:
    return f"error: {str(message).removeprefix('error: ')}"


def exit_on_error(main: Callable) -> Callable:
    """Decorate a single-process script's main(): a FinetuneError becomes one `error:` line on stderr, exit 1."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FinetuneError as exc:
            print(error_line(exc), file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    return run
