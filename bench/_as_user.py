"""A Validate client running as a real non-root user, for ``bench/run.py`` section 10.

``python bench/_as_user.py --socket PATH --uid UID``, started as root: it imports everything it
needs while still root (the checkout and its venv may sit under a directory only root can enter,
such as ``/root/.pyenv``; the import list is that of ``tests/helpers/users.py``), then drops to
``UID`` with no supplementary groups and connects, so the daemon's SO_PEERCRED sees a real
non-root caller. It then answers one JSON line per request line on stdin::

    {"command": ..., "cwd": ..., "runs": N, "warmup": W}   ->   {"e2e_s": [...], "daemon_s": ...}

``validate_series`` is also what ``bench/run.py`` calls in-process for root, so that both callers
are asked exactly alike.

and ``quit`` ends it. Nothing else is printed to stdout.
"""

from __future__ import annotations

import argparse
import encodings.idna  # noqa: F401 - grpc imports it on first use, too late once unprivileged
import json
import os
import sys
import time

import google.rpc.error_details_pb2  # noqa: F401 - imported lazily by grpc_status
import grpc  # grpc imports these three on first use, too late once unprivileged
import grpc._channel
import grpc._interceptor
import grpc._utilities  # noqa: F401
import grpc_status.rpc_status  # noqa: F401

from airlock.client import Client

TIMING_FIELDS = ("static_analysis", "sandbox_setup", "command", "diff", "sandbox", "total")


def validate_series(c: Client, req: dict[str, object]) -> dict[str, object]:
    command, cwd = str(req["command"]), str(req["cwd"])
    runs, warmup = int(str(req["runs"])), int(str(req.get("warmup", 0)))
    expect = req.get("expect_changes")
    for _ in range(warmup):
        c.validate(command, cwd=cwd, timeout=60)
    e2e: list[float] = []
    daemon: dict[str, list[float]] = {k: [] for k in TIMING_FIELDS}
    failures = warm = changes = kept = 0
    first_failure = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        v = c.validate(command, cwd=cwd, timeout=60)
        e2e.append(time.perf_counter() - t0)
        t = v.timings
        for k in TIMING_FIELDS:
            daemon[k].append(getattr(t, f"{k}_s"))
        warm += bool(getattr(t, "warm", t.sandbox_setup_s == 0))
        changes = len(v.changes)
        kept += bool(v.changes_digest)
        if v.exit_code != 0 or (expect is not None and changes != expect):
            failures += 1
            first_failure = first_failure or f"exit {v.exit_code}, {changes} changes: {v.stderr!r}"
    return {
        "e2e_s": e2e,
        "daemon_s": daemon,
        "warm_runs": warm,
        "changes": changes,
        "kept_runs": kept,
        "failures": failures,
        "first_failure": first_failure,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--uid", type=int, required=True)
    a = p.parse_args()
    os.setgroups([])
    os.setresgid(a.uid, a.uid, a.uid)
    os.setresuid(a.uid, a.uid, a.uid)
    with Client(a.socket, timeout=120) as c:
        print(json.dumps({"uid": os.getuid(), "gid": os.getgid()}), flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            try:
                reply = validate_series(c, json.loads(line))
            except Exception as exc:  # reported to the parent, which records it as a failure
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
