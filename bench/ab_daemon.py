"""A/B of two source trees through their own daemons, side by side: latency after idle, or
throughput of concurrent clients.

``.venv/bin/python bench/ab_daemon.py {latency|b2b|throughput} --before TREE --after TREE ...``
(as root). Each tree (a copy of this work tree with its built init program,
``airlock/sandbox/airlock-sandbox-init``, and generated ``airlock/v1``) gets its own
``airlockd`` (shipped policy, default settings), run from that tree (``PYTHONPATH`` and working
directory: the daemon and its spawner import that tree's ``airlock``); the clients are this
process's.

- ``latency``: ``--runs`` calls per tree, alternating trees call by call (the order swapped
  every other pair), each after ``--idle`` seconds of quiet: a forced ``true`` (``Validate``;
  ``--line`` another line), or with ``--execute`` an ``Execute`` of ``true`` (or of
  ``--line``). Wall p50/p90 per tree. The client is this process's (this tree's library).
- ``b2b``: ``--rounds`` rounds per tree, alternating trees round by round (1 s of quiet
  before each), each ``--runs`` forced ``true`` (or ``--line``) back to back from one client:
  the p50 of each round and their median (``latency`` alternates call by call, so no daemon
  there sees calls back to back).
- ``throughput``: ``--rounds`` rounds per tree, alternating, each ``--clients`` threads (one
  client each) calling back to back for ``--seconds``: validations per second and the whole
  machine's CPU per validation (``/proc/stat``, everything running on the host), medians of
  the rounds.

Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from airlock.client import Client

_ENV = {"PATH": "/usr/bin:/bin"}
_FORCED_TRUE = "true; :"  # not read-only under the shipped policy: the dry run decides
_line = _FORCED_TRUE  # what Validate is asked (--line)


@dataclass
class Daemon:
    tree: str
    base: str
    socket: str
    proc: subprocess.Popen[bytes]

    @property
    def workspace(self) -> str:
        return os.path.join(self.base, "ws")


def start(tree: str) -> Daemon:
    base = tempfile.mkdtemp(prefix="airlock-ab-")
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "ws"))
    os.chmod(os.path.join(base, "ws"), 0o777)
    sock = os.path.join(base, "airlock.sock")
    with open(os.path.join(base, "daemon.log"), "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from airlock.daemon.main import main; sys.exit(main())",
                "--socket",
                sock,
                "--state-dir",
                os.path.join(base, "state"),
            ],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    d = Daemon(tree, base, sock, proc)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"airlockd of {tree} exited with {proc.returncode}")
        if os.path.exists(sock):
            with contextlib.suppress(Exception), Client(sock, timeout=5) as c:
                if c.health():
                    return d
        if time.monotonic() > deadline:
            stop(d)
            raise RuntimeError(f"airlockd of {tree} did not come up")
        time.sleep(0.05)


def stop(d: Daemon) -> None:
    d.proc.terminate()
    try:
        d.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()
    shutil.rmtree(d.base, ignore_errors=True)


@contextlib.contextmanager
def daemons(trees: list[str]) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        for tree in trees:
            started.append(start(tree))
        yield started
    finally:
        for d in started:
            stop(d)


def _exec_line() -> str:
    return "true" if _line == _FORCED_TRUE else _line


def _call(c: Client, d: Daemon, execute: bool) -> None:
    if execute:
        for _ in c.execute(_exec_line(), cwd=d.workspace, env=_ENV):
            pass
    else:
        c.validate(_line, cwd=d.workspace, env=_ENV)


def latency(ds: list[Daemon], runs: int, idle: float, execute: bool) -> None:
    clients = [Client(d.socket, timeout=60) for d in ds]
    try:
        for _ in range(15):  # the pools, the caches, the connections
            for c, d in zip(clients, ds, strict=True):
                _call(c, d, execute)
        walls: list[list[float]] = [[] for _ in ds]
        for k in range(runs):
            for i in (0, 1) if k % 2 else (1, 0):
                time.sleep(idle)
                t0 = time.perf_counter()
                _call(clients[i], ds[i], execute)
                walls[i].append((time.perf_counter() - t0) * 1000)
    finally:
        for c in clients:
            c.close()
    what = f"Execute {_exec_line()!r}" if execute else repr(_line)
    for d, w in zip(ds, walls, strict=True):
        w.sort()
        print(
            f"{d.tree}: {what} after {idle:g} s idle, p50 {statistics.median(w):.2f} ms, "
            f"p90 {w[int(len(w) * 0.9)]:.2f} ms ({len(w)} calls)"
        )


def back_to_back(ds: list[Daemon], rounds: int, runs: int) -> None:
    clients = [Client(d.socket, timeout=60) for d in ds]
    p50s: list[list[float]] = [[] for _ in ds]
    try:
        for c, d in zip(clients, ds, strict=True):
            for _ in range(30):  # the pools, the caches, the connections
                _call(c, d, False)
        for r in range(rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                time.sleep(1.0)
                walls = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    _call(clients[i], ds[i], False)
                    walls.append((time.perf_counter() - t0) * 1000)
                p50s[i].append(statistics.median(walls))
    finally:
        for c in clients:
            c.close()
    for d, p in zip(ds, p50s, strict=True):
        print(
            f"{d.tree}: {_line!r} back to back, p50 {statistics.median(p):.2f} ms "
            f"(per round of {runs}: {[round(x, 2) for x in p]})"
        )


def _host_busy_s() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _round(d: Daemon, clients: int, seconds: float) -> tuple[float, float]:
    """(validations per second, whole-machine CPU ms per validation) of one round."""
    stop_at = time.monotonic() + seconds
    done = [0] * clients

    def worker(k: int) -> None:
        with Client(d.socket, timeout=60) as c:
            while time.monotonic() < stop_at:
                c.validate(_line, cwd=d.workspace, env=_ENV)
                done[k] += 1

    h0, t0 = _host_busy_s(), time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, busy = time.monotonic() - t0, _host_busy_s() - h0
    return sum(done) / elapsed, busy * 1000 / max(1, sum(done))


def throughput(ds: list[Daemon], rounds: int, clients: int, seconds: float) -> None:
    for d in ds:
        _round(d, clients, 2.0)  # warm: the pool grows to the concurrency
    results: list[list[tuple[float, float]]] = [[] for _ in ds]
    for r in range(rounds):
        for i in (0, 1) if r % 2 else (1, 0):
            time.sleep(1.0)
            results[i].append(_round(ds[i], clients, seconds))
    for d, res in zip(ds, results, strict=True):
        print(
            f"{d.tree}: {clients} clients, {statistics.median(x[0] for x in res):.1f} "
            f"validations/s, {statistics.median(x[1] for x in res):.2f} ms CPU per validation "
            f"(rounds: {[round(x[0]) for x in res]})"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("latency", "b2b", "throughput"))
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--runs", type=int, default=100, help="latency: calls per tree; b2b: per round")
    p.add_argument("--idle", type=float, default=0.2, help="latency: quiet before each call")
    p.add_argument("--execute", action="store_true", help="latency: Execute true instead")
    p.add_argument(
        "--line", default=_FORCED_TRUE, help="the line Validate judges (a dry run unless read-only)"
    )
    p.add_argument("--rounds", type=int, default=4, help="b2b, throughput: rounds per tree")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0)
    a = p.parse_args()
    global _line
    _line = a.line
    with daemons([a.before, a.after]) as ds:
        if a.mode == "latency":
            latency(ds, a.runs, a.idle, a.execute)
        elif a.mode == "b2b":
            back_to_back(ds, a.rounds, a.runs)
        else:
            throughput(ds, a.rounds, a.clients, a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
