"""Where a forced ``true``'s time goes, layer by layer, from the client down to the engine.

Not a test; run as root: ``.venv/bin/python bench/layers.py [--calls N]``.

Runs the daemon in this process (``airlock.daemon.server.serve``, the shipped policy, a
temporary socket and state directory) with each layer of ``Validate`` timed (wall, nanoseconds,
every call): the servicer (``SandboxService.Validate``: protobuf in and out around the core),
the core (``Service.validate``), and within it the engine (static pass and dry run), the audit
commit, the request check, the caller's executable and the workflow record. A Python client in
another process (so that its work is not in this process) makes 30 calls to warm up, then
``--calls`` forced ``true`` back to back, then as many Health calls (a trivial call through the
same socket and relay). Prints p50 per layer beside the client's wall p50. The difference
between the client and the servicer is gRPC (both sides), the identity relay and the client's
own work; between the servicer and the core, the protobuf conversions.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

_CLIENT = """
import json, statistics, sys, time
from airlock.client import Client
sock, ws, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = {"PATH": "/usr/bin:/bin"}
out = {}
with Client(sock, timeout=120) as c:
    for _ in range(30):
        c.validate("true; :", cwd=ws, env=env, force_dry_run=True)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        c.validate("true; :", cwd=ws, env=env, force_dry_run=True)
        ts.append(time.perf_counter() - t)
    out["validate"] = statistics.median(ts) * 1e3
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        c.health()
        ts.append(time.perf_counter() - t)
    out["health"] = statistics.median(ts) * 1e3
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: namespaces, overlayfs and cgroups need it")

    from airlock.core import _audit, engine, workflow
    from airlock.core import service as core_service
    from airlock.daemon import server
    from airlock.daemon import service as daemon_service
    from airlock.daemon.main import _load

    times: dict[str, list[int]] = collections.defaultdict(list)

    def timed(owner: Any, name: str, label: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return f(*args, **kw)
            finally:
                times[label].append(time.perf_counter_ns() - t0)

        setattr(owner, name, wrapper)

    layers = (
        (daemon_service.SandboxService, "Validate", "servicer (protobuf in and out, core)"),
        (core_service.Service, "validate", "core (below, and the rest)"),
        (engine.Engine, "validate", "  engine (static pass, dry run)"),
        (_audit, "record", "  audit commit"),
        (core_service, "check", "  request check"),
        (_audit, "caller_of", "  caller's executable"),
        (workflow.Workflow, "record", "  workflow record"),
    )
    for owner, name, label in layers:
        timed(owner, name, label)

    base = tempfile.mkdtemp(prefix="airlock-layers-")
    os.chmod(base, 0o755)
    ws = os.path.join(base, "ws")
    os.mkdir(ws)
    sock = os.path.join(base, "airlock.sock")
    config, _level, _path = _load(["--socket", sock, "--state-dir", os.path.join(base, "state")])
    ready = threading.Event()
    client: dict[str, float] = {}

    def drive() -> None:
        try:
            ready.wait()
            out = subprocess.run(
                [sys.executable, "-c", _CLIENT, sock, ws, str(a.calls)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            client.update(json.loads(out))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the daemon drains and stops

    threading.Thread(target=drive, daemon=True).start()
    try:
        server.serve(config, ready=ready)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if not client:
        print("the client failed", file=sys.stderr)
        return 1
    print(f"forced `true`, {a.calls} calls back to back; wall p50, ms")
    print(f"{'client (Validate through the public socket)':<46} {client['validate']:7.3f}")
    for _owner, _name, label in layers:
        xs = times[label][30 : 30 + a.calls]  # the client's calls after its warm-up
        print(f"{label:<46} {statistics.median(xs) / 1e6:7.3f}")
    print(f"{'client (Health, a trivial call, same path)':<46} {client['health']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
