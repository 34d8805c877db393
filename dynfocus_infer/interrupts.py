"""SIGINT / SIGTERM as an exception the batch command can end cleanly on, never in the middle of a write.

Python runs signal handlers in the main thread between bytecodes, so a handler that raised at once could cut a result
line in half. Inside `critical()` the signal is only noted, and raised when the block ends.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator, Optional

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + signal number, as shells report them


class Interrupted(BaseException):
    """The run was stopped by a signal. A BaseException, like KeyboardInterrupt, so per-request error handling
    (`except Exception`) never swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_CODES.get(self.signum, 128 + self.signum)


class InterruptGuard:
    """While installed (a context manager), SIGINT and SIGTERM raise Interrupted, deferred out of critical blocks."""

    def __init__(self):
        self._depth = 0
        self._pending: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self._pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block a signal may not cut short (writing one result line)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """SIGINT and SIGTERM ignored (the clean-up after an interrupt: a second Ctrl-C must not cut it short)."""
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in SIGNAL_EXIT_CODES}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> "InterruptGuard":
        for signum in SIGNAL_EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
