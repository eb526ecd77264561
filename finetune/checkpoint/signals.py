"""Stop signals: SIGTERM or SIGINT asks the run to write a checkpoint after the current step and stop."""
import signal
import threading
import time

from finetune.checkpoint.run_folder import newest_checkpoint_note


class StopRequest:
    """Set by SIGTERM/SIGINT (what schedulers send before a kill); the loop checks it after each step.

    The same stop often arrives twice within moments (torchrun passes on a signal its workers may already have
    had from the terminal or the scheduler): a repeat changes nothing, one checkpoint is written. A second
    Ctrl-C later than that stops at once, without a checkpoint, with one error line.
    """
    REPEAT_SECONDS = 5.0

    def __init__(self, save_dir: str | None = None) -> None:
        self.event = threading.Event()
        self.signal_name, self.first_at, self.save_dir = None, None, save_dir
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.event.is_set():
            self.signal_name, self.first_at = signal.Signals(signum).name, time.monotonic()
            self.event.set()
        elif signum == signal.SIGINT and time.monotonic() - self.first_at > self.REPEAT_SECONDS:
            note = newest_checkpoint_note(self.save_dir) if self.save_dir else ""
            # Raised from a signal handler, so it lands in whatever code runs: SystemExit, unlike FinetuneError,
            # passes through the `except Exception` of that code (a data loader's, a library's) untouched.
            raise SystemExit(f"error: stopped at once by a second SIGINT, without writing a checkpoint; {note}")

    def requested(self) -> bool:
        return self.event.is_set()
