"""The project's one exception type, and the entry-point wrapper that turns it into one `error:` line."""
import functools
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class FinetuneError(Exception):
    """A problem with the user's input, files or machine. The message is one line, without "error: "; the
    script's entry point prints it as `error: <message>` and exits with status 1."""


def error_line(message: str) -> str:
    return f"error: {str(message).removeprefix('error: ')}"


def entry_point(main: Callable[P, T]) -> Callable[P, T]:
    """Decorate every script's main(): a FinetuneError becomes one `error: ...` line on stderr and exit status 1.
    Under torchrun every rank meets the same bad input, so only rank 0 prints the line and the other ranks just
    exit non-zero (torchrun adds its own failure report after it).
    An error that only another rank met (its own disk, say) is printed by that rank, naming it."""
    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            try:
                return main(*args, **kwargs)
            except FinetuneError as exc:
                raise SystemExit(error_line(exc)) from None
        except SystemExit as exc:
            rank = int(os.environ.get("RANK", "0"))
            if isinstance(exc.code, str) and rank != 0:
                # torchrun stops every worker once one has failed: leave rank 0 the time to say why. Its stop
                # signal must end this process silently, so the training loop's stop handler is removed first.
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                time.sleep(10)
                # Still running: rank 0 did not fail, so this error is this rank's alone. It starts a line of its
                # own, whatever rank 0's progress bar has written.
                print(f"\nerror: [rank {rank}] {exc.code.removeprefix('error: ')}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            raise
        finally:
            # Sharded parameters and their hooks form reference cycles that keep process-group state alive. Free
            # them while the interpreter is whole: torn down at exit, gloo's threads can abort a finished run.
            gc.collect()
    return run
