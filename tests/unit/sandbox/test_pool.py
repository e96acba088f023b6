"""The spawner's pool bookkeeping: how many supervisors that come back are kept warm."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from airlock.sandbox import spawner
from airlock.sandbox.spawner import _Pool, _Warm


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(time, "monotonic", c)  # the spawner reads time.monotonic
    return c


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def _warm(socks: list[socket.socket], key: bytes) -> _Warm:
    ours, theirs = socket.socketpair()
    socks += [ours, theirs]
    return _Warm(0, ours, 0.0, key)


def _burst(pool: _Pool, socks: list[socket.socket], n: int) -> list[_Warm]:
    """``n`` supervisors busy at once, then all come back."""
    busy = [_warm(socks, pool.key) for _ in range(n)]
    for w in busy:
        pool.go_busy(w)
    for w in busy:
        pool.came_back(w)
    return busy


def test_as_many_as_were_busy_at_once_stay_warm(clock: _Clock, socks: list[socket.socket]) -> None:
    pool = _Pool(2, idle_s=30)
    pool.key = b"k"
    _burst(pool, socks, 7)
    assert len(pool.ready) == 7 and not pool.busy
    assert pool.cap() == 9  # and the pool's size on top
    assert all(w.sock.fileno() >= 0 for w in pool.ready)


def test_without_a_burst_twice_the_size(clock: _Clock, socks: list[socket.socket]) -> None:
    pool = _Pool(2, idle_s=30)
    pool.key = b"k"
    pool.ready = [_warm(socks, b"k") for _ in range(4)]
    extra = _burst(pool, socks, 1)
    assert len(pool.ready) == 4 and extra[0].sock.fileno() == -1  # retired: closed


def test_the_peak_is_forgotten_after_idle(clock: _Clock, socks: list[socket.socket]) -> None:
    pool = _Pool(2, idle_s=30)
    pool.key = b"k"
    _burst(pool, socks, 6)
    assert pool.cap() == 8
    clock.now += 31
    assert pool.cap() == 4


def test_never_more_than_the_bound(clock: _Clock, socks: list[socket.socket]) -> None:
    pool = _Pool(2, idle_s=30)
    pool.key = b"k"
    _burst(pool, socks, spawner._MAX_REUSED + 5)
    assert len(pool.ready) == spawner._MAX_REUSED


def test_no_pool_keeps_none(clock: _Clock, socks: list[socket.socket]) -> None:
    """--warm-pool 0: a supervisor that comes back is retired, however many were busy."""
    pool = _Pool(0, idle_s=30)
    pool.key = b"k"
    _burst(pool, socks, 3)
    assert pool.ready == [] and pool.cap() == 0


def test_back_to_back_requests_fork_nothing_once_warm(
    clock: _Clock, socks: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client, back to back: a supervisor comes back only after the next few requests were
    taken (its teardown and next sandbox take longer than the gap between requests), some
    sooner, some later. The pool refills (a fork) when fewer than its size are ready and
    retires those that come back over its cap; with a cap of the busy peak alone it did both,
    over and over (a real daemon forked a supervisor every ~7 requests)."""
    forks: list[_Warm] = []

    def fork_warm(control: socket.socket, template: object, key: bytes) -> _Warm:
        forks.append(_warm(socks, key))
        return forks[-1]

    pool = _Pool(2, idle_s=30)
    monkeypatch.setattr(pool, "_fork_warm", fork_warm)
    pool.template, pool.key = object(), b"k"
    control = socket.socket()
    socks.append(control)
    pool.refill(control)
    back_at: dict[int, list[_Warm]] = {}
    jitter = random.Random(16)
    for i in range(600):
        clock.now += 0.012
        if i == 100:
            forks.clear()  # warm by now
        for warm in back_at.pop(i, []):
            pool.came_back(warm)
        warm = pool.take(b"k")
        assert warm is not None, f"request {i} found no warm sandbox"
        pool.go_busy(warm)
        pool.refill(control)
        back_at.setdefault(i + jitter.choice((2, 3, 3, 4, 4, 4, 5, 6)), []).append(warm)
    assert forks == []


def test_close_hangs_up_on_every_supervisor_busy_ones_too(socks: list[socket.socket]) -> None:
    """At shutdown each supervisor must see EOF (ready, of an extra template, or busy: one
    that is busy tears down when its send of "W" fails), and the spawner then waits for them."""
    pool = _Pool(2, idle_s=30)
    pool.key = b"k"
    ready, busy, extra = _warm(socks, b"k"), _warm(socks, b"k"), _warm(socks, b"x")
    pool.ready.append(ready)
    pool.go_busy(busy)
    pool.extras[b"x"] = spawner._Extra(None, 0.0, [extra])
    theirs = [socks[socks.index(w.sock) + 1] for w in (ready, busy, extra)]
    pool.close()
    assert not pool.ready and not pool.busy and not pool.extras
    for s in theirs:
        s.settimeout(2)  # an end left open would block: a TimeoutError fails the test
        assert s.recv(1) == b""  # EOF: the spawner's end is closed
