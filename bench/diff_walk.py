"""CPU time per changed file of each in-process step a dry run's changes go through.

Not a test; run as root, with the tree to measure first on ``PYTHONPATH``::

    PYTHONPATH=TREE .venv/bin/python bench/diff_walk.py [N] [--reps 7] [--uid UID]
    .venv/bin/python bench/diff_walk.py [N] --ab BEFORE AFTER [--rounds 5]

Makes an upper layer of N new files ``f1``..``fN`` holding ``"$i\\n"`` (what
``for i in {1..N}; do echo $i > f$i; done`` leaves) on ``/dev/shm`` (a tmpfs, as the
sandbox's scratch) over an empty lower, then times each step with ``time.process_time``
(CPU, not wall), median of ``--reps``:

``walk``
    :func:`compute_changes` (supervisor);
``save``
    ``changeset.save`` with its digest (supervisor; the daemon keeps changes up to 2,000 by
    default, measured here at any N);
``pickle``
    ``_wire.dumps`` of the result (supervisor) and ``_wire.loads`` (daemon);
``verdict``
    the daemon's per-change work besides: the built-in judge, the summary, the special files;
``to_proto``
    ``validation_to_proto`` and ``SerializeToString`` (daemon);
``from_proto``
    ``FromString`` and ``validation_from_proto`` (the Python client).

``--uid`` reads content as that caller (default 0, root; the daemon reads as the dry run's
user). Prints one line per step: median ms and µs per file, then the total. ``--ab`` runs
this script ``--rounds`` times per tree, alternating, and prints each step's median over
rounds side by side (so load from other processes hits both trees alike).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

STEPS = ("walk", "save", "pickle", "verdict", "to_proto", "from_proto")


def _measure(files: int, reps: int, uid: int) -> dict[str, float]:
    from airlock._special import change_specials
    from airlock.api import convert
    from airlock.policy import builtin
    from airlock.policy.summary import summarize
    from airlock.sandbox import _wire, changeset, contain
    from airlock.sandbox.diff import Caller, DiffOptions, Layer, compute_changes
    from airlock.types import Termination, Validation, Verdict
    from airlock.v1 import sandbox_pb2 as pb

    out: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any], before: Callable[[], None] | None = None) -> Any:
        times, result = [], None
        for _ in range(reps):
            if before is not None:
                before()
            t0 = time.process_time()
            result = fn()
            times.append(time.process_time() - t0)
        out[name] = statistics.median(times)
        return result

    base = tempfile.mkdtemp(prefix="airlock-diff-walk-", dir="/dev/shm")
    kept = tempfile.mkdtemp(prefix="airlock-diff-walk-")
    os.chmod(base, 0o755)
    try:
        upper, lower = os.path.join(base, "upper"), os.path.join(base, "lower")
        os.mkdir(upper)
        os.mkdir(lower)
        os.chmod(upper, 0o755)
        os.chmod(lower, 0o755)
        for i in range(1, files + 1):
            path = os.path.join(upper, f"f{i}")
            with open(path, "w") as f:
                f.write(f"{i}\n")
            if uid:
                os.chown(path, uid, uid)
        if uid:
            os.chown(upper, uid, uid)
            os.chown(lower, uid, uid)
        # The layer appears at its lower's path: a path the caller can reach (a uid's reads
        # resolve the layer's host path as that uid).
        host = os.fsencode(lower)
        layers = [Layer(host, os.fsencode(upper), host)]
        caller = Caller(uid, uid, ())
        options = DiffOptions(workspace=host, max_changes=max(10_000, files))
        diff = timed("walk", lambda: compute_changes(layers, options, caller))
        assert len(diff.changes) == files, len(diff.changes)
        dests = iter(range(reps))

        def save() -> str:
            dest = os.path.join(kept, str(next(dests)))
            return changeset.save(layers, diff, dest, quota_bytes=1 << 30, caller=caller).digest

        timed("save", save)
        result = contain.SandboxResult(diff=diff)

        def pickle_both() -> Any:
            data = _wire.dumps(result)
            return _wire.loads(data[_wire.HEADER_BYTES :])

        back = timed("pickle", pickle_both)
        assert back.diff == diff
        changes = back.diff.changes

        def verdict() -> None:
            builtin.judge(changes, Termination.EXITED, False)
            summarize(
                changes=changes,
                changes_truncated=False,
                termination=Termination.EXITED,
                exit_code=0,
                signal=0,
                timeout_s=60.0,
                workspace=lower,
            )
            for c in changes:
                change_specials(c)

        timed("verdict", verdict)
        v = Validation(validation_id="x", verdict=Verdict.ALLOW, summary="", changes=changes)
        wire = timed("to_proto", lambda: convert.validation_to_proto(v).SerializeToString())
        got = timed(
            "from_proto",
            lambda: convert.validation_from_proto(pb.ValidateResponse.FromString(wire)),
        )
        assert got.changes == diff.changes, "the changes did not round-trip"
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
    return out


def _print(files: int, columns: dict[str, dict[str, float]]) -> None:
    labels = list(columns)
    head = "".join(f"{label:>24}" for label in labels)
    print(f"{files} files; CPU ms (µs per file), medians{'':4}{head}")
    for step in (*STEPS, "total"):
        cells = []
        for label in labels:
            col = columns[label]
            ms = sum(col.values()) * 1000 if step == "total" else col[step] * 1000
            cells.append(f"{ms:>12.2f} ({ms * 1000 / files:>6.1f} µs)")
        print(f"{step:<44}" + "".join(f"{c:>24}" for c in cells))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("files", type=int, nargs="?", default=10_000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--uid", type=int, default=0)
    p.add_argument("--ab", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ab is None:
        out = _measure(a.files, a.reps, a.uid)
        if a.json:
            print(json.dumps(out))
        else:
            _print(a.files, {"this tree": out})
        return 0
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in a.ab}
    for _ in range(a.rounds):
        for tree in a.ab:
            cmd = [sys.executable, __file__, str(a.files), "--reps", str(a.reps)]
            cmd += ["--uid", str(a.uid), "--json"]
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = {
        tree: {s: statistics.median(r[s] for r in runs[tree]) for s in STEPS} for tree in a.ab
    }
    _print(a.files, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
