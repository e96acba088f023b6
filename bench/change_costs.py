"""What each step costs a dry run's changes outside the command, in one process, per step.

Not a test; run as root, with the tree to measure first on ``PYTHONPATH`` (run it once per
tree, alternating, to compare two)::

    PYTHONPATH=TREE .venv/bin/python bench/change_costs.py [N] [--reps 7]

Makes an upper layer of N new files ``f1``..``fN`` holding ``"$i\\n"`` (what
``for i in $(seq N); do echo $i > f$i; done`` leaves) on ``/dev/shm`` (a tmpfs, as the
sandbox's scratch) over an empty lower, then times, median of ``--reps``: the diff walk
(``compute_changes``), the changeset kept for Apply and its digest (``changeset.save``,
written to ``/tmp``; only up to 2,000 changes, as the daemon keeps by default), the result's
pickle both ways (``_wire``: supervisor to daemon), the verdict's built-in judge, and the
protobuf conversion both ways with serializing and parsing. Prints one JSON object (ms, and
the pickle's and the response's size in bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from airlock.api import convert
from airlock.policy import builtin
from airlock.sandbox import _wire, changeset, contain
from airlock.sandbox.diff import Caller, DiffOptions, Layer, compute_changes
from airlock.types import Termination, Validation, Verdict
from airlock.v1 import sandbox_pb2 as pb


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("files", type=int, nargs="?", default=1000)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    out: dict[str, Any] = {"files": a.files}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        times, result = [], None
        for _ in range(a.reps):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1000, 2)
        return result

    base = tempfile.mkdtemp(prefix="airlock-change-costs-", dir="/dev/shm")
    kept = tempfile.mkdtemp(prefix="airlock-change-costs-")
    try:
        upper, lower = os.path.join(base, "upper"), os.path.join(base, "lower")
        os.mkdir(upper)
        os.mkdir(lower)
        for i in range(1, a.files + 1):
            with open(os.path.join(upper, f"f{i}"), "w") as f:
                f.write(f"{i}\n")
        layers = [Layer(b"/ws", os.fsencode(upper), os.fsencode(lower))]
        root = Caller(0, 0, ())
        diff = timed(
            "compute_changes", lambda: compute_changes(layers, DiffOptions(workspace=b"/ws"), root)
        )
        if a.files <= 2000:
            saves = iter(range(a.reps))

            def save() -> str:
                dest = os.path.join(kept, str(next(saves)))
                return changeset.save(layers, diff, dest, quota_bytes=1 << 30, caller=root).digest

            timed("changeset.save+digest", save)
        result = contain.SandboxResult(diff=diff)
        data = timed("wire.dumps(result)", lambda: _wire.dumps(result))
        out["pickle_bytes"] = len(data)
        timed("wire.loads(result)", lambda: _wire.loads(data[_wire.HEADER_BYTES :]))
        timed("builtin.judge", lambda: builtin.judge(diff.changes, Termination.EXITED, False))
        v = Validation(validation_id="x", verdict=Verdict.ALLOW, summary="", changes=diff.changes)
        msg = timed("validation_to_proto", lambda: convert.validation_to_proto(v))
        wire = timed("SerializeToString", msg.SerializeToString)
        out["response_bytes"] = len(wire)
        parsed = timed("FromString", lambda: pb.ValidateResponse.FromString(wire))
        back = timed("validation_from_proto", lambda: convert.validation_from_proto(parsed))
        if back.changes != diff.changes:
            out["failure"] = "the changes did not round-trip"
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
