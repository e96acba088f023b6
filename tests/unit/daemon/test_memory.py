"""The daemon gives back what malloc keeps after a large answer (airlock/daemon/_memory.py).

Real allocations and the real C library: memory freed between live blocks stays resident until
``malloc_trim`` returns it; the Trimmer trims after a quiet spell only when the RSS is up, also
when the memory was freed after an earlier trim; the daemon's cap on malloc's arenas holds (and
yields to an operator's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from airlock.daemon import _memory
from airlock.daemon._memory import Trimmer, malloc_trim, rss_bytes
from airlock.daemon.server import _Admission

pytestmark = pytest.mark.skipif(_memory._TRIM is None, reason="not glibc: no malloc_trim")

MIB = 1 << 20


def _fragment(mib: int) -> list[bytes]:
    """Allocate ``mib`` MiB of 4 KiB blocks (malloc's, not Python's small-object arenas) in a
    thread of its own (its own malloc arena, as gRPC's threads have), free all but every 64th:
    the free blocks lie between live ones, so malloc cannot give them back by itself."""
    kept: list[bytes] = []

    def work() -> None:
        blocks = [bytes(4096 - 64) for _ in range(mib * 256)]
        kept.extend(blocks[::64])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return kept


def _wait_for(condition: Callable[[], bool], guard_s: float = 30.0) -> None:
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "the trimmer's thread never got there"
        time.sleep(0.01)


def test_malloc_trim_gives_back_blocks_freed_between_live_ones() -> None:
    malloc_trim()
    kept = _fragment(64)
    before = rss_bytes()
    assert malloc_trim()
    after = rss_bytes()
    assert before - after > 32 * MIB, (before >> 20, after >> 20)
    del kept


def test_the_trimmer_trims_after_a_quiet_spell_once_the_rss_grew() -> None:
    trimmer = Trimmer(idle_s=0.05, threshold=16 * MIB)
    trimmer.start()
    try:
        assert trimmer.trims == 1  # what start-up freed
        trimmer.poke()  # a call ended, the RSS did not grow: a look, no trim
        _wait_for(lambda: trimmer.checks == 1)
        assert trimmer.trims == 1
        kept = _fragment(64)
        _assert_trim_gives_back(trimmer, checks=2, trims=2)
        del kept
    finally:
        trimmer.stop()


def _assert_trim_gives_back(trimmer: Trimmer, *, checks: int, trims: int) -> None:
    """A call ends now: after the quiet spell, look number ``checks`` trims (``trims`` in all)
    and gives more than 32 MiB back."""
    before = rss_bytes()
    trimmer.poke()
    _wait_for(lambda: trimmer.checks == checks)
    assert trimmer.trims == trims
    assert before - rss_bytes() > 32 * MIB


def test_memory_a_long_call_held_at_a_trim_is_given_back_once_it_is_freed() -> None:
    trimmer = Trimmer(idle_s=0.05, threshold=16 * MIB)
    trimmer.start()
    try:
        held: list[bytes] = []
        worker = threading.Thread(
            target=lambda: held.extend(bytes(4096 - 64) for _ in range(16384))
        )
        worker.start()
        worker.join()
        trimmer.poke()  # another call ended while this memory (64 MiB) is in use: nothing to give
        _wait_for(lambda: trimmer.checks == 1)
        assert trimmer.trims == 2
        kept = held[::64]  # the long call ends: all but every 64th block free, still resident
        held.clear()
        _assert_trim_gives_back(trimmer, checks=2, trims=3)
        del kept
    finally:
        trimmer.stop()


_ARENAS_OF_8_THREADS = """
import ctypes, sys, threading
from airlock.daemon._memory import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(2)
held = []
together = threading.Barrier(8)
def work():
    held.append([bytes(4096) for _ in range(64)])  # malloc's, from this thread's arena
    together.wait()  # no thread ends (freeing its arena for the next) before all have one
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
out = libc.fdopen(1, b"w")
sys.stdout.flush()
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fflush(ctypes.c_void_p(out))
"""


def _arenas(mode: str, **env: str) -> int:
    """How many malloc arenas a process that ran 8 threads has (malloc_info's XML)."""
    out = subprocess.run(
        [sys.executable, "-c", _ARENAS_OF_8_THREADS, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.count("<heap nr=")


def test_the_daemon_caps_the_arenas_its_threads_malloc_from() -> None:
    assert _arenas("default") > 2
    assert _arenas("limit") <= 2
    # An operator's own cap wins: limit_arenas() leaves it alone.
    assert _arenas("default", MALLOC_ARENA_MAX="3") == 3


def test_an_admitted_call_that_ends_pokes_the_trimmer() -> None:
    ended: list[str] = []

    class Details:
        method = "/airlock.v1.SandboxService/Validate"

    admission = _Admission(2, on_end=lambda: ended.append("end"))

    def unary(request: Any, context: Any) -> str:
        assert ended == []  # not before the call ends
        return "answer"

    def stream(request: Any, context: Any) -> Any:
        yield "event"

    unary_handler = grpc.unary_unary_rpc_method_handler(unary)
    wrapped = admission.intercept_service(lambda _details: unary_handler, Details())
    assert wrapped is not None
    assert wrapped.unary_unary("question", None) == "answer"
    assert ended == ["end"]

    stream_handler = grpc.unary_stream_rpc_method_handler(stream)
    wrapped = admission.intercept_service(lambda _details: stream_handler, Details())
    assert wrapped is not None
    events = wrapped.unary_stream("question", None)
    assert next(events) == "event"
    assert ended == ["end"]  # the stream has not ended yet
    assert list(events) == []
    assert ended == ["end", "end"]
