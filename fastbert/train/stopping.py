"""Stopping a run cleanly on a signal: the first SIGTERM/SIGINT becomes a flag the driver reads at its next step
boundary (it saves, then stops); a second one raises ``KeyboardInterrupt`` at once, without saving."""

from __future__ import annotations

import signal
import sys
import threading

INTERRUPTED_EXIT = 130  # the exit status of a run stopped by a signal (after saving)


class StopRequest:
    """Handlers are only set in the main thread (Python allows no other) and put back by ``restore``. With
    ``announce`` (rank 0), the first signal prints ``"fastbert {command}: {SIGNAL}: saving {what} when this step
    ends, then stopping ..."``."""

    def __init__(self, command: str, what: str, announce: bool) -> None:
        self.requested = False
        self.signal: str | None = None
        self.command, self.what, self.announce = command, what, announce
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second one: give up now
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without saving")
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.announce:
            print(
                f"\nfastbert {self.command}: {self.signal}: saving {self.what} when this step ends, then stopping "
                "(send it again to stop at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
