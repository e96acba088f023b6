"""The daemon's signals: handlers that only count, and a wake-up pipe the main thread reads.

A Python signal handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock: a handler that takes one (``threading.Event.set`` does)
deadlocks the daemon as soon as a signal lands while the main thread is inside the same
Event. So the handlers here only add to a counter (no lock, no allocation that can
block), and ``signal.set_wakeup_fd`` makes the C-level handler write the signal's
number to a non-blocking pipe, which the main thread waits on with ``select``. A storm
of signals coalesces into one wake-up and one count; a full pipe drops wake-up bytes,
never a count. The main thread alone turns the counts into actions (setting Events
is safe there).

Usage::

    signals = Signals.install()
    while not signals.stopping:
        signals.wait(0.5)
        if signals.take_reload():
            ...
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType

__all__ = ["Signals"]


class Signals:
    """SIGTERM and SIGINT ask the daemon to stop; SIGHUP asks for a policy reload."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stops = 0
        self._hups = 0
        self._hups_seen = 0

    @classmethod
    def install(cls) -> Signals:
        """Install the handlers and the wake-up pipe (from the main thread only)."""
        self = cls()
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        return self

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stops += 1  # nothing else: see the module's docstring

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hups += 1

    @property
    def stopping(self) -> bool:
        return self._stops > 0

    def wait(self, timeout: float) -> None:
        """Block until a signal arrives or ``timeout`` passes; drain the pipe."""
        if self.stopping or self._hups != self._hups_seen:
            return
        ready, _, _ = select.select([self._read], [], [], timeout)
        if ready:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass

    def take_reload(self) -> bool:
        """Whether a SIGHUP came since the last call (any number of them count as one)."""
        hups = self._hups  # the handler writes it, this thread only reads it
        if hups == self._hups_seen:
            return False
        self._hups_seen = hups
        return True
