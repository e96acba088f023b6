"""What process capture costs an exec-heavy Execute, and where: the run, then the stream.

Not a test; run as root: ``.venv/bin/python bench/execute_stream.py [--execs N] [--rounds 4]
[--runs 5]``.

Starts two daemons of this tree (default settings, and ``--no-process-capture``) on temporary
sockets and state directories, and makes Execute of ``for i in $(seq N); do /bin/true; done``
through the Python client, alternating between them in rounds. Prints, per daemon, the wall p50
of the whole call and, from the client's view of the stream, when the first ProcessInfo event
came and how long the ProcessInfo events took from the first to ExecFinished (one gRPC message
per process, sent after the command ended). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from _daemon import started

from airlock.client import Client

_ENV = {"PATH": "/usr/bin:/bin"}


def _once(c: Client, ws: str, line: str) -> tuple[float, float | None, float | None]:
    """(whole call, first ProcessInfo, ProcessInfo span to the end), ms."""
    t0 = time.perf_counter()
    first: float | None = None
    for event in c.execute(line, cwd=ws, env=_ENV):
        if type(event).__name__ == "ProcessInfo" and first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    if first is None:
        return total * 1e3, None, None
    return total * 1e3, first * 1e3, (total - first) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--execs", type=int, default=300)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: namespaces, overlayfs and cgroups need it")
    line = f"for i in $(seq {a.execs}); do /bin/true; done"
    setups = {"capture on (default)": [], "--no-process-capture": ["--no-process-capture"]}
    with contextlib.ExitStack() as stack:
        daemons = {}
        for name, extra in setups.items():
            _proc, client, ws = stack.enter_context(
                started(extra, prefix="airlock-exec-stream-", timeout=300)
            )
            daemons[name] = (client, ws)
        results: dict[str, list[tuple[float, float | None, float | None]]] = {
            name: [] for name in daemons
        }
        for c, ws in daemons.values():
            _once(c, ws, line)  # warm up
        for _ in range(a.rounds):
            for name, (c, ws) in daemons.items():
                results[name].extend(_once(c, ws, line) for _ in range(a.runs))
    print(f"Execute of {line!r}: p50 ms over {a.rounds * a.runs} calls each")
    for name, rows in results.items():
        total = statistics.median(r[0] for r in rows)
        firsts = [r[1] for r in rows if r[1] is not None]
        spans = [r[2] for r in rows if r[2] is not None]
        extra = (
            f", first ProcessInfo at {statistics.median(firsts):.1f}, ProcessInfo events to the "
            f"end {statistics.median(spans):.1f}"
            if firsts and spans
            else ""
        )
        print(f"  {name:<22} whole call {total:.1f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
