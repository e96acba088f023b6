"""A/B of whole dry runs between two source trees, interleaved, wall and CPU time.

Not a test; run as root::

    .venv/bin/python bench/ab.py --before /tmp/before --after . [--blocks 10] [--runs 20]
        [--command CMD] [--expect-changes N] [--daemon]

Each tree must hold ``airlock/`` (a copy of this work tree with a change undone is the usual
``--before``); the workers are this directory's. One ``bench/_direct.py`` worker per tree, each
run from its tree (so it and its spawner import that tree's ``airlock``) and each in its own
``cpuacct`` cgroup (v1) or cgroup (v2), made here and removed after: the CPU time of the
worker, its spawner, the supervisors and their inits (the command itself moves to the
sandbox's cgroup; its cgroup's CPU time, read by the supervisor, is added in
``cpu_ms_with_sandbox_p50``). Blocks of ``--runs`` ``Engine.validate("true")`` calls (no
gRPC, warm pool of 2, the neutral policy so the line is dry-run) alternate between the
trees, so that load from other processes hits both alike. Prints per tree the median and
p90 wall time per validation and the median CPU time per validation over blocks; nothing is
asserted.

``--command`` dry-runs another command than ``true`` (``--expect-changes``: count a run
that does not report that many changes as a failure). ``--daemon`` goes through the whole
path instead: each tree's worker is ``bench/_client_worker.py``, which starts that tree's
``airlockd`` (default settings, the neutral policy) and calls ``Validate`` with that tree's
Python client (gRPC, protobuf both ways, the conversion to ``airlock.types``); its cgroup
holds the client, the daemon, its spawner and the supervisors. Then the medians of the
daemon's ``diff_s`` (the supervisor's diff, changeset and lost-work check), ``command_s``,
``sandbox_s`` and ``total_s`` and of the client's conversion are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_V1 = "/sys/fs/cgroup/cpuacct"
_V2 = "/sys/fs/cgroup"


def _cgroup(name: str) -> tuple[Path, str]:
    """(directory, file that counts CPU) of a new cgroup for one worker."""
    if os.path.exists(os.path.join(_V1, "cpuacct.usage")):
        d = Path(_V1) / name
        d.mkdir()
        return d, "cpuacct.usage"  # ns
    d = Path(_V2) / name
    d.mkdir()
    return d, "cpu.stat"  # usage_usec


def _cpu_s(d: Path, f: str) -> float:
    text = (d / f).read_text()
    if f == "cpuacct.usage":
        return int(text) / 1e9
    for line in text.splitlines():
        if line.startswith("usage_usec"):
            return int(line.split()[1]) / 1e6
    return 0.0


_HERE = os.path.dirname(os.path.abspath(__file__))


class _Worker:
    def __init__(self, tree: str, label: str, cwd: str, a: argparse.Namespace) -> None:
        self.label = label
        self.state = tempfile.mkdtemp(prefix=f"airlock-ab-{label}-")
        self.cg, self.cg_file = _cgroup(f"airlock-ab-{os.getpid()}-{label}")
        cg = self.cg

        def enter() -> None:  # in the child, before exec: the whole tree is counted
            (cg / "cgroup.procs").write_text("0")

        script = "_client_worker.py" if a.daemon else "_direct.py"
        argv = [sys.executable, os.path.join(_HERE, script), "--state-dir", self.state]
        argv += ["--cwd", cwd, "--command", a.command]
        if a.daemon and a.expect_changes is not None:
            argv += ["--expect-changes", str(a.expect_changes)]
        self.proc = subprocess.Popen(
            argv,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=enter,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker died")
        return dict(json.loads(line))

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        try:
            out = self.ask("quit")
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for _ in range(50):  # retired warm supervisors leave on their own
                with contextlib.suppress(OSError):
                    self.cg.rmdir()
                    break
                time.sleep(0.1)
            subprocess.run(["rm", "-rf", self.state], check=False)
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--command", default="true", help="the command dry-run (default: true)")
    p.add_argument("--expect-changes", type=int, default=None)
    p.add_argument("--daemon", action="store_true", help="through airlockd and the client")
    a = p.parse_args()
    cwd = tempfile.mkdtemp(prefix="airlock-ab-cwd-")
    workers = [_Worker(a.before, "before", cwd, a), _Worker(a.after, "after", cwd, a)]
    walls: dict[str, list[float]] = {w.label: [] for w in workers}
    extra: dict[str, dict[str, list[float]]] = {w.label: {} for w in workers}
    cpus: dict[str, list[float]] = {w.label: [] for w in workers}
    # The same plus the sandboxes' own cgroups (the command process after it joined them).
    totals: dict[str, list[float]] = {w.label: [] for w in workers}
    warm: dict[str, int] = {w.label: 0 for w in workers}
    quit_: dict[str, Any] = {}
    try:
        for w in workers:
            w.ask("engine 5")  # the pool fills, the template and globs are announced
        time.sleep(0.5)
        for block in range(a.blocks):
            for w in workers if block % 2 == 0 else reversed(workers):
                c0 = _cpu_s(w.cg, w.cg_file)
                r = w.ask(f"engine {a.runs}")
                time.sleep(0.3)  # the last sandbox's tear-down and the refill count too
                cpus[w.label].append((_cpu_s(w.cg, w.cg_file) - c0) / a.runs)
                sandboxes = sum(r.get("sandbox_cpu_s", ())) / a.runs
                totals[w.label].append(cpus[w.label][-1] + sandboxes)
                walls[w.label] += r["run_s"]
                warm[w.label] += r["warm_runs"]
                for key in (
                    "diff_s",
                    "command_s",
                    "sandbox_s",
                    "total_s",
                    "convert_s",
                    "sandbox_cpu_s",
                ):
                    if key in r:
                        extra[w.label].setdefault(key, []).extend(r[key])
    finally:
        for w in workers:
            try:
                quit_[w.label] = w.close()
            except Exception as exc:  # the other worker is still closed
                quit_[w.label] = {"failures": [f"close: {exc}"]}
        os.rmdir(cwd)
    out = {}
    for label in walls:
        ws = sorted(walls[label])
        out[label] = {
            "validations": len(ws),
            "warm": warm[label],
            "wall_ms_p50": round(statistics.median(ws) * 1000, 2),
            "wall_ms_p90": round(ws[int(len(ws) * 0.9)] * 1000, 2),
            "cpu_ms_per_validation_p50": round(statistics.median(cpus[label]) * 1000, 2),
            "cpu_ms_with_sandbox_p50": round(statistics.median(totals[label]) * 1000, 2),
            **{
                f"{key[:-2]}_ms_p50": round(statistics.median(values) * 1000, 2)
                for key, values in extra[label].items()
            },
            "failures": quit_.get(label, {}).get("failures"),
        }
    out["command"] = a.command
    out["daemon"] = a.daemon
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
