"""The cyclic garbage collector paused while many acyclic objects are made, safely across threads.

A diff walk, a changeset save or the unpickling of a large result makes thousands of small
objects and no reference cycles; the collector would run many times over them for nothing.
:func:`paused` turns it off for the duration. ``gc.disable()`` is process-wide, and the daemon
unpickles results on several threads at once, so the pauses are counted under a lock: the first
one in disables the collector (if it was on), the last one out turns it back on. (A per-call
"was it enabled?" would race: a call that saw it off, because another call had paused it,
could disable it again after that call restored it, and leave it off for good.)

``_thread`` rather than ``threading``: the spawner and every process it forks must not import
``threading`` (its after-fork hook costs every fork; sandbox/spawner.py).
"""

from __future__ import annotations

import _thread
import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused"]

_lock = _thread.allocate_lock()
_depth = 0  # pauses in progress
_restore = False  # whether the last one out turns the collector back on


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (and none forced at its end)."""
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()
