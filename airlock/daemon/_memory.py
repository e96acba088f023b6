"""Memory the daemon gives back to the system once it goes quiet (issue 16).

A large answer (a dry run of 10,000 created files: its unpickled result, the protobuf built from
it, its 2 MB serialization) is freed once sent, but glibc's malloc keeps the pages: it returns
memory only from the top of an arena, and a free block below a live one stays resident. Each
gRPC thread mallocs from an arena of its own, so ten such answers left the daemon 15-30 MiB
larger, for good or for hundreds of calls (bench/issue16.py: 65 → 80-91 MiB), most of it free
inside malloc. ``malloc_trim(0)`` gives every free page of every arena back (``MADV_DONTNEED``),
wherever it lies: 0.1 ms when there is nothing to give back, ~3 ms for 60 MiB.

:class:`Trimmer` does that ``idle_s`` after the last call ended (every admitted call that ends
:meth:`~Trimmer.poke`\\ s it), if the RSS is ``threshold`` above the lowest it was after a trim.
Under steady load it never trims (pages given back would be faulted in again by the next call);
after a burst it trims once; after small calls, not at all. What it cannot give back: Python's
own small-object arenas (1 MiB each), freed only when every object in them is; a few MiB of them
stay after large answers.

What trimming cannot give back either is a page that still holds one live block. glibc gives
each thread that mallocs an arena of its own (up to 8 per CPU: the daemon's 20-odd threads had
10), and each arena kept 1-3 MiB of pages with a few live blocks in them after large answers.
:func:`limit_arenas` caps them at :data:`ARENAS` (``mallopt(M_ARENA_MAX)``) when the daemon
starts, before its threads: the threads share the arenas, which fill up instead. Python holds
the GIL while it allocates, so threads seldom wait on an arena's lock; gRPC's C threads do
without the GIL, and two arenas leave them one each on a 2-CPU host. An operator's
``MALLOC_ARENA_MAX`` (or ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``) is left in force.

Where the C library has none of these (not glibc), nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Any

__all__ = [
    "ARENAS",
    "IDLE_S",
    "THRESHOLD_BYTES",
    "Trimmer",
    "limit_arenas",
    "malloc_trim",
    "rss_bytes",
]

_log = logging.getLogger("airlock.daemon")

IDLE_S = 1.0
THRESHOLD_BYTES = 2 << 20
ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc_function(name: str, *argtypes: type[ctypes._SimpleCData[Any]]) -> Any:
    """A function of the C library the interpreter runs on, or None (not glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_TRIM = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas at ``arenas`` (before the process starts threads); whether it did.

    Not when the operator set the cap (``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES``)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _MALLOPT is None or "MALLOC_ARENA_MAX" in os.environ or "arena_max" in tunables:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, arenas))


def malloc_trim() -> bool:
    """Give every free page of malloc's arenas back to the system; whether any was."""
    return bool(_TRIM(0)) if _TRIM is not None else False


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class Trimmer:
    """Trims malloc's arenas ``idle_s`` after the last call ended, if the RSS is ``threshold``
    bytes above the lowest it was after a trim. Thread-safe; :meth:`poke` is cheap."""

    def __init__(self, idle_s: float = IDLE_S, threshold: int = THRESHOLD_BYTES) -> None:
        self.idle_s = idle_s
        self.threshold = threshold
        self.checks = 0  # quiet spells after work, each a look at the RSS (tests)
        self.trims = 0  # trims done
        self._work = threading.Event()
        self._last_end = 0.0  # time.monotonic() when the last call ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._floor = 0  # the lowest RSS seen after a trim

    def poke(self) -> None:
        """A call ended: look again once the daemon has been quiet for ``idle_s``."""
        self._last_end = time.monotonic()
        self._work.set()

    def start(self) -> None:
        """Trim what start-up left free, then watch in a thread (none without malloc_trim)."""
        if _TRIM is None or self._thread is not None:
            return
        self._trim()
        self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._work.wait()
            while self._work.is_set():  # until idle_s after the last call that ended
                self._work.clear()
                if self._stop.wait(self._last_end + self.idle_s - time.monotonic()):
                    return
            if rss_bytes() >= self._floor + self.threshold:
                self._trim()
            self.checks += 1

    def _trim(self) -> None:
        before = rss_bytes()
        malloc_trim()
        after = rss_bytes()
        # The lowest, not the last: a trim while a long call held memory must not keep the
        # next one from giving that memory back once the call ended.
        self._floor = min(self._floor, after) if self.trims else after
        self.trims += 1
        _log.debug(
            "memory given back",
            extra={"rss_before_mib": before >> 20, "rss_after_mib": after >> 20},
        )
