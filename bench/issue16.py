"""Issue 16's table, measured in one run: Airlock against bubblewrap, interleaved.

Not a test; run as root (the second line of ``make bench``)::

    .venv/bin/python bench/issue16.py [--runs N] [--quick] [--rss-calls N] [--out PATH]

Nothing is asserted: each row is compared with the issue's target and printed as met or not,
next to the figures the issue was filed with. The JSON goes to ``bench/results/issue16.json``.

The daemon is this run's own: ``airlockd`` from the venv, a temporary socket and state
directory, the shipped default policy, default settings (warm pool of 2, every effect capture
on). It runs in a CPU-accounting cgroup made here (``cpuacct`` on v1, a directory of the
unified hierarchy on v2), so that its CPU time, its spawner's and every supervisor's is counted;
each command's own CPU time (in its sandbox's cgroup) is added from the validation's
``resource_usage``. Everything is removed at the end: daemon, directories, cgroup.

How a row is measured:

* Airlock: ``Client.validate(line, force_dry_run=True)`` from this process, timed end to end
  with ``time.perf_counter()``. Under the default policy ``true`` and ``git status`` are
  read-only and would be answered without a dry run, so those lines end in ``; :`` (the ``:``
  builtin matches no allow rule: the line is not read-only, the dry run decides). A run that
  was not dry-run, failed, or reported the wrong number of changes counts as a failure.
* bwrap: ``bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc`` running the same line
  with ``bash -c`` (as the dry run does) as a subprocess of this process, timed the same way;
  rows that write get a tmpfs over their directory (``--tmpfs DIR --chdir DIR``).
* Both get the same small environment (``PATH``, ``HOME``).
* Interleaved call by call (A B A B ...), after a warm-up of each, so that load from elsewhere
  on the machine falls on both alike. The idle rows sleep 1 s before every call.
* 8 clients: 8 threads, each with its own ``Client``, running the forced ``true`` back to back
  for 5 s (2 s with ``--quick``); then 8 threads each running the bwrap loop for as long; twice,
  alternating.
* Execute overhead: ``Execute("true")`` end to end, ``bwrap ... bash -c true`` and
  ``bash -c true``, interleaved; overhead = p50 minus ``bash -c true``'s p50.
* CPU per validation: alternating blocks of forced ``true``. Airlock: the daemon's cgroup
  (daemon, spawner, supervisors, inits; read after 0.3 s of quiet at both ends of the block, so
  the warm pool's refill is in), plus the commands' own CPU, plus this process's (the client,
  gRPC's threads). bwrap: ``getrusage(RUSAGE_CHILDREN)`` (bwrap and everything it started) plus
  this process's (the launch from Python), over the same kind of block. Also printed: the
  kernel's share of each (cpuacct ``usage_sys``, ``ru_stime``) and the whole machine's busy
  time (``/proc/stat``) less the busy rate measured between blocks (useless when others work).
* Diff of 10,000 created files: the daemon's ``diff_s`` (no bwrap counterpart).
* Idle RSS of the daemon and its spawner helper, 1.5 s after the last call: after the first row,
  after the other sections, then at intervals while the run tops the count of calls up to
  ``--rss-calls`` (10,000 by default) with back-to-back forced ``true`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _daemon
import psutil
from _bwrap import BWRAP
from _stats import Summary, format_table, ms, summarize

from airlock.client import Client
from airlock.types import DryRunSkip, ExecFinished, Validation

HERE = Path(__file__).resolve().parent
AIRLOCKD = str(Path(sys.executable).with_name("airlockd"))
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root"}
FORCE = "; :"  # makes a read-only line not read-only under the default policy
CLIENTS = 8
IDLE_GAP_S = 1.0
SETTLE_S = 0.3
FILES_1K = "for i in {1..1000}; do echo $i > f$i; done"
FILES_10K = "for i in {1..10000}; do echo $i > f$i; done"

# The issue's figures (filed 2026-12-06/07, measured from outside, medians of 100-200 runs).
ISSUE = {
    "true_idle": ("22.4 ms", "8.2 ms", "2.7x"),
    "true_b2b": ("27.7 ms", "6.8 ms", "4.1x"),
    "echo": ("23.5 ms", "7.7 ms", "3.1x"),
    "files_1k": ("164-179 ms", "27 ms", "6.2x"),
    "python": ("51 ms", "22.5 ms", "2.3x"),
    "git_status": ("28 ms", "11 ms", "2.5x"),
    "throughput": ("50/s", "212/s", "4.2x fewer"),
    "execute": ("16.7 ms", "5.3 ms", "3.2x"),
    "cpu": ("35.4 ms", "7.5 ms", "4.7x"),
    "rss": ("-", "-", "-"),
    "diff_10k": ("-", "-", "-"),
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    line: str  # what Airlock dry-runs and bwrap runs with bash -c
    workdir: str  # under the workspace
    expect_changes: int
    gap_s: float = 0.0
    writes: bool = False  # bwrap gets a tmpfs over the directory
    p50_target: float | None = None  # Airlock p50 <= this x bwrap's
    p99_target: float | None = None


ROWS = (
    Row("true_idle", "`true` (1 s idle between calls)", "true" + FORCE, "true", 0,
        gap_s=IDLE_GAP_S, p50_target=1.5, p99_target=2.0),
    Row("true_b2b", "`true` (back to back)", "true" + FORCE, "true", 0,
        p50_target=1.5, p99_target=2.0),
    Row("echo_idle", "`echo hi > f` (1 s idle between calls)", "echo hi > f", "echo", 1,
        gap_s=IDLE_GAP_S, writes=True, p50_target=1.5, p99_target=2.0),
    Row("echo", "`echo hi > f` (back to back)", "echo hi > f", "echo", 1, writes=True,
        p50_target=1.5, p99_target=2.0),
    Row("files_1k", "1,000 files created", FILES_1K, "files", 1000, writes=True,
        p50_target=2.5),
    Row("python", "`python3 -c pass`", "python3 -c pass", "true", 0),
    Row("git_status", "`git status` (forced)", "git status" + FORCE, "repo", 0),
)  # fmt: skip


@dataclass(frozen=True)
class Budget:
    runs: int
    idle_runs: int
    warmup: int
    seconds: float  # per throughput round
    rounds: int
    cpu_blocks: int
    cpu_block_runs: int
    diff_runs: int
    rss_calls: int


def budget(quick: bool, runs: int | None, rss_calls: int | None) -> Budget:
    if quick:
        r = runs or 30
        return Budget(r, max(5, r // 3), 3, 2.0, 2, 3, 10, 3, rss_calls or 1000)
    r = runs or 100
    return Budget(r, max(10, r // 2), 10, 5.0, 2, 6, 20, 10, rss_calls or 10_000)


# --- The daemon, in its own CPU cgroup ----------------------------------------------------------

_V1 = "/sys/fs/cgroup/cpuacct"
_V2 = "/sys/fs/cgroup"


class CpuGroup:
    """A cgroup that counts CPU time (v1 ``cpuacct`` or v2 ``cpu.stat``), removed by ``close``."""

    def __init__(self, name: str) -> None:
        if os.path.exists(os.path.join(_V1, "cpuacct.usage")):
            self.dir, self.file = Path(_V1) / name, "cpuacct.usage"
        elif os.path.exists(os.path.join(_V2, "cgroup.controllers")):
            self.dir, self.file = Path(_V2) / name, "cpu.stat"
        else:
            raise RuntimeError("no cgroup hierarchy that counts CPU time")
        self.dir.mkdir()

    def enter(self) -> None:  # in the daemon's child, before exec
        (self.dir / "cgroup.procs").write_text("0")

    def cpu_s(self) -> float:
        text = (self.dir / self.file).read_text()
        if self.file == "cpuacct.usage":
            return int(text) / 1e9
        for line in text.splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
        return 0.0

    def sys_s(self) -> float:
        """The part of :meth:`cpu_s` spent in the kernel (tick-sampled on v1)."""
        if self.file == "cpuacct.usage":
            return int((self.dir / "cpuacct.usage_sys").read_text()) / 1e9
        for line in (self.dir / self.file).read_text().splitlines():
            if line.startswith("system_usec"):
                return int(line.split()[1]) / 1e6
        return 0.0

    def close(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # busy: processes still exiting
                time.sleep(0.1)
        print(f"warning: could not remove {self.dir}", file=sys.stderr)


@dataclass
class Daemon:
    base: Path
    socket: str
    proc: subprocess.Popen[bytes]
    cg: CpuGroup
    log: Path
    spawner: int | None = None

    def find_spawner(self) -> int | None:
        return _daemon.spawner_pid(self.proc.pid)

    def rss(self) -> dict[str, float]:
        """RSS of the daemon and its spawner helper, MiB."""
        out = {"daemon_mib": 0.0, "spawner_mib": 0.0}
        with contextlib.suppress(psutil.Error):
            out["daemon_mib"] = psutil.Process(self.proc.pid).memory_info().rss / 2**20
        pid = self.spawner or self.find_spawner()
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                out["spawner_mib"] = psutil.Process(pid).memory_info().rss / 2**20
        out["total_mib"] = out["daemon_mib"] + out["spawner_mib"]
        out["total_mb"] = out["total_mib"] * 2**20 / 1e6
        return {k: round(v, 1) for k, v in out.items()}

    def stop(self) -> int:
        return _daemon.stop(self.proc)


def start_daemon(base: Path) -> Daemon:
    sock, state, log = base / "airlock.sock", base / "state", base / "daemon.log"
    cg = CpuGroup(f"airlock-issue16-{os.getpid()}")
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [AIRLOCKD, "--socket", str(sock), "--state-dir", str(state)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=cg.enter,  # no threads in this process yet
            )
    except BaseException:
        cg.close()
        raise
    d = Daemon(base, str(sock), proc, cg, log)
    try:
        _daemon.wait_serving(proc, sock, log)
    except BaseException:
        d.stop()
        cg.close()
        raise
    d.spawner = d.find_spawner()
    return d


# --- One call of each kind ----------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self, k: int = 1) -> None:
        with self._lock:
            self.n += k


CALLS = Counter()


@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""
    warm: int = 0
    cpu_commands_s: float = 0.0

    def fail(self, why: str) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or why


def airlock_once(c: Client, line: str, cwd: str, expect: int, s: Series) -> None:
    t0 = time.perf_counter()
    try:
        v = c.validate(line, cwd=cwd, env=ENV, timeout=60, force_dry_run=True)
    except Exception as e:  # counted, not fatal: the row says how many failed
        s.times.append(time.perf_counter() - t0)
        s.fail(f"{type(e).__name__}: {e}")
        return
    s.times.append(time.perf_counter() - t0)
    CALLS.add()
    check(v, expect, s)


def check(v: Validation, expect: int, s: Series) -> None:
    s.warm += bool(v.timings.warm)
    s.cpu_commands_s += v.resource_usage.cpu_time_s
    if not v.sandboxed or v.dry_run_skip is not DryRunSkip.NONE:
        s.fail(f"not dry-run ({v.dry_run_skip.name}): {v.summary}")
    elif v.exit_code != 0:
        s.fail(f"exit {v.exit_code}: {v.stderr[-200:]!r}")
    elif len(v.changes) != expect:
        s.fail(f"{len(v.changes)} changes, expected {expect}")


def bwrap_argv(row_line: str, cwd: str, writes: bool) -> list[str]:
    fs = ["--tmpfs", cwd] if writes else []
    return [*BWRAP, *fs, "--chdir", cwd, "bash", "-c", row_line]


def subprocess_once(argv: Sequence[str], s: Series) -> None:
    t0 = time.perf_counter()
    rc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        check=False,
    ).returncode
    s.times.append(time.perf_counter() - t0)
    if rc != 0:
        s.fail(f"{argv[0]} exit {rc}")


def execute_once(c: Client, cwd: str, s: Series) -> None:
    t0 = time.perf_counter()
    try:
        done = [e for e in c.execute("true", cwd=cwd, env=ENV) if isinstance(e, ExecFinished)]
    except Exception as e:
        s.times.append(time.perf_counter() - t0)
        s.fail(f"{type(e).__name__}: {e}")
        return
    s.times.append(time.perf_counter() - t0)
    CALLS.add()
    if not done or done[-1].exit_code != 0:
        s.fail(f"Execute('true'): {done}")
    else:
        s.warm += done[-1].warm


# --- Sections -----------------------------------------------------------------------------------


def series_out(s: Series) -> dict[str, Any]:
    out: dict[str, Any] = {"ms": summarize(s.times), "failures": s.failures}
    if s.first_failure:
        out["first_failure"] = s.first_failure
    return out


def measure_row(c: Client, ws: Path, row: Row, b: Budget) -> dict[str, Any]:
    cwd = str(ws / row.workdir)
    argv = bwrap_argv(row.line, cwd, row.writes)
    runs = b.idle_runs if row.gap_s else b.runs
    a, w = Series(), Series()
    for _ in range(b.warmup):
        airlock_once(c, row.line, cwd, row.expect_changes, Series())
        subprocess_once(argv, Series())
    for _ in range(runs):
        if row.gap_s:
            time.sleep(row.gap_s)
        airlock_once(c, row.line, cwd, row.expect_changes, a)
        if row.gap_s:
            time.sleep(row.gap_s)
        subprocess_once(argv, w)
    return {
        "line": row.line,
        "bwrap_argv": argv,
        "airlock": {**series_out(a), "warm_runs": a.warm},
        "bwrap": series_out(w),
    }


def throughput_airlock(socket: str, cwd: str, seconds: float) -> dict[str, Any]:
    barrier = threading.Barrier(CLIENTS + 1)
    stop_at = [time.perf_counter() + 3600.0]
    series = [Series() for _ in range(CLIENTS)]

    def worker(i: int) -> None:
        with Client(socket, timeout=60) as c:
            airlock_once(c, "true" + FORCE, cwd, 0, Series())  # connect
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                airlock_once(c, "true" + FORCE, cwd, 0, series[i])

    return _run_threads(worker, barrier, stop_at, series, seconds)


def throughput_bwrap(cwd: str, seconds: float) -> dict[str, Any]:
    barrier = threading.Barrier(CLIENTS + 1)
    stop_at = [time.perf_counter() + 3600.0]
    series = [Series() for _ in range(CLIENTS)]
    argv = bwrap_argv("true" + FORCE, cwd, False)

    def worker(i: int) -> None:
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            subprocess_once(argv, series[i])

    return _run_threads(worker, barrier, stop_at, series, seconds)


def _run_threads(
    worker: Callable[[int], None],
    barrier: threading.Barrier,
    stop_at: list[float],
    series: list[Series],
    seconds: float,
) -> dict[str, Any]:
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done = sum(len(s.times) - s.failures for s in series)
    return {
        "seconds": round(elapsed, 2),
        "done": done,
        "failures": sum(s.failures for s in series),
        "first_failure": next((s.first_failure for s in series if s.first_failure), ""),
        "latency_ms": summarize([x for s in series for x in s.times]),
    }


def measure_throughput(d: Daemon, ws: Path, b: Budget) -> dict[str, Any]:
    cwd = str(ws / "true")
    rounds: dict[str, list[dict[str, Any]]] = {"airlock": [], "bwrap": []}
    for _ in range(b.rounds):
        rounds["airlock"].append(throughput_airlock(d.socket, cwd, b.seconds))
        rounds["bwrap"].append(throughput_bwrap(cwd, b.seconds))
    out: dict[str, Any] = {"clients": CLIENTS, "rounds": rounds}
    for k, rs in rounds.items():
        out[f"{k}_per_s"] = round(sum(r["done"] for r in rs) / sum(r["seconds"] for r in rs), 1)
    return out


def measure_execute(c: Client, ws: Path, b: Budget) -> dict[str, Any]:
    cwd = str(ws / "exec")
    bw = bwrap_argv("true", cwd, False)
    bash = ["bash", "-c", "true"]
    e, w, h = Series(), Series(), Series()
    for _ in range(b.warmup):
        execute_once(c, cwd, Series())
        subprocess_once(bw, Series())
        subprocess_once(bash, Series())
    for _ in range(b.runs):
        execute_once(c, cwd, e)
        subprocess_once(bw, w)
        subprocess_once(bash, h)
    out: dict[str, Any] = {
        "execute": {**series_out(e), "warm_runs": e.warm},
        "bwrap": series_out(w),
        "bash": series_out(h),
    }
    base = out["bash"]["ms"]["p50"]
    out["airlock_overhead_ms"] = round(out["execute"]["ms"]["p50"] - base, 2)
    out["bwrap_overhead_ms"] = round(out["bwrap"]["ms"]["p50"] - base, 2)
    return out


def _rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _rusage_sys_s(who: int) -> float:
    return resource.getrusage(who).ru_stime


_TICK = os.sysconf("SC_CLK_TCK")


def _host_busy_s() -> float:
    """CPU time the whole machine spent not idle (``/proc/stat``: every process, kernel threads,
    interrupts; others' work too), seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TICK


def measure_cpu(d: Daemon, c: Client, ws: Path, b: Budget) -> dict[str, Any]:
    """Alternating blocks of forced ``true``; CPU ms per call, per block."""
    cwd = str(ws / "true")
    argv = bwrap_argv("true" + FORCE, cwd, False)
    k = b.cpu_block_runs
    # The daemon's CPU when nothing is asked of it (gRPC's and the pool's timers), ms/s.
    time.sleep(SETTLE_S)
    c0, t0 = d.cg.cpu_s(), time.perf_counter()
    time.sleep(1.0)
    idle_ms_per_s = (d.cg.cpu_s() - c0) * 1000 / (time.perf_counter() - t0)
    blocks: dict[str, list[dict[str, float]]] = {"airlock": [], "bwrap": []}
    for _ in range(b.cpu_blocks):
        # The machine's busy rate with neither running (others' work), to take off below.
        h0, t0 = _host_busy_s(), time.perf_counter()
        time.sleep(2 * SETTLE_S)
        background = (_host_busy_s() - h0) / (time.perf_counter() - t0)
        s = Series()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        h0, cg0, self0 = _host_busy_s(), d.cg.cpu_s(), _rusage_s(resource.RUSAGE_SELF)
        sys0 = d.cg.sys_s()
        for _ in range(k):
            airlock_once(c, "true" + FORCE, cwd, 0, s)
        self1 = _rusage_s(resource.RUSAGE_SELF)
        time.sleep(SETTLE_S)
        cg1, h1, sys1 = d.cg.cpu_s(), _host_busy_s(), d.cg.sys_s()
        host = (h1 - h0 - background * (time.perf_counter() - t0)) * 1000 / k
        server = (cg1 - cg0 + s.cpu_commands_s) * 1000 / k
        client = (self1 - self0) * 1000 / k
        blocks["airlock"].append(
            {
                "server_ms": round(server, 2),
                "server_sys_ms": round((sys1 - sys0) * 1000 / k, 2),  # the commands' not in
                "client_ms": round(client, 2),
                "all_ms": round(server + client, 2),
                "host_ms": round(host, 2),
                "background_ms_per_s": round(background * 1000, 1),
                "commands_ms": round(s.cpu_commands_s * 1000 / k, 3),
                "failures": s.failures,
            }
        )
        s = Series()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        h0 = _host_busy_s()
        ch0, self0 = _rusage_s(resource.RUSAGE_CHILDREN), _rusage_s(resource.RUSAGE_SELF)
        sys0 = _rusage_sys_s(resource.RUSAGE_CHILDREN)
        for _ in range(k):
            subprocess_once(argv, s)
        ch1, self1 = _rusage_s(resource.RUSAGE_CHILDREN), _rusage_s(resource.RUSAGE_SELF)
        sys1 = _rusage_sys_s(resource.RUSAGE_CHILDREN)
        time.sleep(SETTLE_S)
        h1 = _host_busy_s()
        host_w = (h1 - h0 - background * (time.perf_counter() - t0)) * 1000 / k
        server = (ch1 - ch0) * 1000 / k
        client = (self1 - self0) * 1000 / k
        blocks["bwrap"].append(
            {
                "server_ms": round(server, 2),
                "server_sys_ms": round((sys1 - sys0) * 1000 / k, 2),
                "client_ms": round(client, 2),
                "all_ms": round(server + client, 2),
                "host_ms": round(host_w, 2),
                "failures": s.failures,
            }
        )
    out: dict[str, Any] = {"block_runs": k, "daemon_idle_ms_per_s": round(idle_ms_per_s, 2)}
    for who, bl in blocks.items():
        keys = ("server_ms", "server_sys_ms", "client_ms", "all_ms", "host_ms")
        out[who] = {key: _median([x[key] for x in bl]) for key in keys}
        out[who]["blocks"] = bl
    return out


def _median(xs: Sequence[float]) -> float:
    data = sorted(xs)
    n = len(data)
    mid = data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2
    return round(mid, 2)


def measure_diff_10k(c: Client, ws: Path, b: Budget) -> dict[str, Any]:
    cwd = str(ws / "files")
    diff: list[float] = []
    e2e = Series()
    for _ in range(b.diff_runs):
        t0 = time.perf_counter()
        v = c.validate(FILES_10K, cwd=cwd, env=ENV, timeout=120, force_dry_run=True)
        e2e.times.append(time.perf_counter() - t0)
        CALLS.add()
        check(v, 10_000, e2e)
        diff.append(v.timings.diff_s)
    return {"diff_ms": summarize(diff), "client": series_out(e2e)}


def rss_sample(d: Daemon, after: str) -> dict[str, Any]:
    time.sleep(1.5)  # the last supervisors exit, the warm pool refills
    return {"after": after, "calls": CALLS.n, **d.rss()}


def measure_rss_growth(
    d: Daemon, c: Client, ws: Path, b: Budget, samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """Top the call count up to ``b.rss_calls`` with forced ``true``, sampling the RSS."""
    cwd = str(ws / "true")
    s = Series()
    step = max(500, b.rss_calls // 5)
    while CALLS.n < b.rss_calls:
        for _ in range(min(step, b.rss_calls - CALLS.n)):
            airlock_once(c, "true" + FORCE, cwd, 0, s)
        samples.append(rss_sample(d, "true"))
    return {"samples": samples, "failures": s.failures, "first_failure": s.first_failure}


# --- Setup --------------------------------------------------------------------------------------


def make_workspace(ws: Path) -> None:
    for name in ("true", "echo", "files", "exec"):
        (ws / name).mkdir(parents=True)
    repo = ws / "repo"
    repo.mkdir()
    for i in range(50):
        (repo / f"file{i}.txt").write_text(f"line {i}\n" * 20)
    (repo / "src").mkdir()
    for i in range(20):
        (repo / "src" / f"m{i}.py").write_text(f"X = {i}\n")
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], check=True, stdout=subprocess.DEVNULL, env=ENV)


@contextlib.contextmanager
def environment() -> Iterator[tuple[Daemon, Path]]:
    base = Path(tempfile.mkdtemp(prefix="airlock-issue16-"))
    os.chmod(base, 0o755)
    d: Daemon | None = None
    try:
        ws = base / "ws"
        make_workspace(ws)
        d = start_daemon(base)
        yield d, ws
    finally:
        if d is not None:
            rc = d.stop()
            if rc != 0:
                print(f"warning: airlockd exited with {rc}; log: {d.log}", file=sys.stderr)
            d.cg.close()
            left = leftover_groups(base / "state")
            if left:
                print(f"warning: the daemon left cgroups behind: {left}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


def leftover_groups(state_dir: Path) -> list[str]:
    """The daemon's cgroup parent (named after its state directory), in any hierarchy, if it
    is still there once the daemon has stopped; removed here when empty."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()
    name = f"airlock-{digest[:12]}"
    left = []
    for d in Path("/sys/fs/cgroup").glob(f"*/{name}"):
        with contextlib.suppress(OSError):
            d.rmdir()
        if d.exists():
            left.append(str(d))
    if Path("/sys/fs/cgroup", name).exists():
        left.append(f"/sys/fs/cgroup/{name}")
    return left


# --- Report -------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


def yes_no(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def table_rows(r: dict[str, Any]) -> list[dict[str, str]]:
    """One dict per line of the issue's table (plus the targets the issue lists under it)."""
    out: list[dict[str, str]] = []
    issue_key = {"echo_idle": "echo", "echo": "echo"}
    for row in ROWS:
        m = r["rows"][row.key]
        a: Summary = m["airlock"]["ms"]
        w: Summary = m["bwrap"]["ms"]
        r50, r99 = ratio(a["p50"], w["p50"]), ratio(a["p99"], w["p99"])
        met: bool | None = None
        goal = "-"
        if row.p50_target is not None:
            met = r50 <= row.p50_target and (row.p99_target is None or r99 <= row.p99_target)
            goal = f"p50 <= {row.p50_target}x" + (
                f", p99 <= {row.p99_target}x" if row.p99_target else ""
            )
        fails = m["airlock"]["failures"] + m["bwrap"]["failures"]
        issue = ISSUE.get(issue_key.get(row.key, row.key), ("-", "-", "-"))
        if row.key == "echo_idle":
            issue = ("-", "-", "-")
        out.append(
            {
                "row": row.label,
                "airlock": f"{ms(a)} / {ms(a, 'p90')} / {ms(a, 'p99')}",
                "bwrap": f"{ms(w)} / {ms(w, 'p90')} / {ms(w, 'p99')}",
                "ratio": f"{r50:.2f}x / {r99:.2f}x",
                "issue": f"{issue[0]} / {issue[1]} ({issue[2]})",
                "goal": goal,
                "met": yes_no(met),
                "fail": str(fails),
            }
        )
    t = r["throughput"]
    ap, bp = t["airlock_per_s"], t["bwrap_per_s"]
    out.append(
        {
            "row": f"{CLIENTS} concurrent clients (per s)",
            "airlock": f"{ap:.1f}",
            "bwrap": f"{bp:.1f}",
            "ratio": f"{ratio(bp, ap):.2f}x fewer",
            "issue": "50/s / 212/s (4.2x fewer)",
            "goal": ">= 200/s or >= bwrap/1.5",
            "met": yes_no(ap >= 200 or ap >= bp / 1.5),
            "fail": str(sum(x["failures"] for rs in t["rounds"].values() for x in rs)),
        }
    )
    e = r["execute"]
    ao, bo = e["airlock_overhead_ms"], e["bwrap_overhead_ms"]
    out.append(
        {
            "row": "Execute overhead over `bash -c true` (p50)",
            "airlock": f"{ao:.1f}",
            "bwrap": f"{bo:.1f}",
            "ratio": f"{ratio(ao, bo):.2f}x",
            "issue": "16.7 ms / 5.3 ms (3.2x)",
            "goal": "<= 1.5x",
            "met": yes_no(ratio(ao, bo) <= 1.5),
            "fail": str(sum(e[k]["failures"] for k in ("execute", "bwrap", "bash"))),
        }
    )
    cpu = r["cpu"]
    ac, bc = cpu["airlock"]["all_ms"], cpu["bwrap"]["all_ms"]
    out.append(
        {
            "row": "CPU per validation, all processes (`true`)",
            "airlock": f"{ac:.1f}",
            "bwrap": f"{bc:.1f}",
            "ratio": f"{ratio(ac, bc):.2f}x",
            "issue": "35.4 ms / 7.5 ms (4.7x)",
            "goal": "<= 2x",
            "met": yes_no(ratio(ac, bc) <= 2.0),
            "fail": str(
                sum(x["failures"] for bl in ("airlock", "bwrap") for x in cpu[bl]["blocks"])
            ),
        }
    )
    dk = r["diff_10k"]
    dm = dk["diff_ms"]
    out.append(
        {
            "row": "Diff of 10,000 files (daemon diff_s p50)",
            "airlock": f"{ms(dm)} / {ms(dm, 'p90')} / {ms(dm, 'p99')}",
            "bwrap": "-",
            "ratio": "-",
            "issue": "-",
            "goal": "<= 100 ms",
            "met": yes_no(dk["diff_ms"]["p50"] <= 100.0),
            "fail": str(dk["client"]["failures"]),
        }
    )  # fmt: skip
    rss = r["rss"]["samples"]
    first, last = rss[0], rss[-1]
    peak = max(x["total_mb"] for x in rss)
    out.append(
        {
            "row": f"Idle RSS daemon + spawner, MB ({first['calls']} -> {last['calls']} calls)",
            "airlock": f"{first['total_mb']:.1f} -> {last['total_mb']:.1f} (max {peak:.1f})",
            "bwrap": "-",
            "ratio": "-",
            "issue": "-",
            "goal": "<= 80 MB, flat",
            "met": yes_no(peak <= 80.0),
            "fail": str(r["rss"]["failures"]),
        }
    )
    return out


COLUMNS = (
    ("row", "row"),
    ("airlock", "Airlock p50/p90/p99 ms"),
    ("bwrap", "bwrap p50/p90/p99 ms"),
    ("ratio", "ratio p50 / p99"),
    ("issue", "issue: Airlock / bwrap"),
    ("goal", "target"),
    ("met", "met"),
    ("fail", "failed runs"),
)


def print_report(r: dict[str, Any]) -> None:
    m = r["meta"]
    print(
        f"\nIssue 16, {m['date']}: {m['host']}, {m['cpus']} CPUs, load average"
        f" {m['load_start']} at the start, {m['load_end']} at the end; {m['elapsed_s']:.0f} s"
    )
    if m["uncommitted_in_airlock"]:
        print(f"commit {m['commit']}, uncommitted: {' '.join(m['uncommitted_in_airlock'])}")
    else:
        print(f"commit {m['commit'] or 'unknown (not a git work tree)'}")
    rows = table_rows(r)
    print(
        format_table(
            f"Airlock (default policy, full capture, forced dry run) against bwrap,"
            f" interleaved; {r['budget']['runs']} runs a row"
            f" ({r['budget']['idle_runs']} for the idle rows)",
            [h for _, h in COLUMNS],
            [[x[k] for k, _ in COLUMNS] for x in rows],
        )
    )
    cpu = r["cpu"]
    print(
        f"\nCPU per call, medians over {len(cpu['airlock']['blocks'])} blocks of"
        f" {cpu['block_runs']}: Airlock daemon tree {cpu['airlock']['server_ms']} ms (kernel"
        f" {cpu['airlock']['server_sys_ms']} ms, the commands' cgroups not in) + client"
        f" {cpu['airlock']['client_ms']} ms; bwrap {cpu['bwrap']['server_ms']} ms (kernel"
        f" {cpu['bwrap']['server_sys_ms']} ms) + launch"
        f" {cpu['bwrap']['client_ms']} ms; idle daemon {cpu['daemon_idle_ms_per_s']} ms/s"
    )
    busy = _median([x["background_ms_per_s"] for x in cpu["airlock"]["blocks"]])
    if busy > 250 * (os.cpu_count() or 1):
        print(f"Whole machine: not usable, {busy / 1000:.2f} CPUs busy between blocks (others)")
    else:
        print(
            f"Whole machine (/proc/stat less the busy rate between blocks, {busy:.0f} ms/s):"
            f" Airlock {cpu['airlock']['host_ms']} ms, bwrap {cpu['bwrap']['host_ms']} ms"
        )
    e = r["execute"]
    print(
        f"Execute('true') p50 {ms(e['execute']['ms'])} ms, bwrap bash -c true"
        f" {ms(e['bwrap']['ms'])} ms, bash -c true {ms(e['bash']['ms'])} ms"
        f" (warm {e['execute']['warm_runs']}/{e['execute']['ms']['n']})"
    )
    t = r["throughput"]
    for k in ("airlock", "bwrap"):
        lat = [x["latency_ms"]["p50"] for x in t["rounds"][k]]
        print(f"{CLIENTS} clients, {k}: per round {[x['done'] for x in t['rounds'][k]]} in"
              f" {[x['seconds'] for x in t['rounds'][k]]} s, latency p50 {lat} ms")  # fmt: skip
    print(
        "RSS samples (after what, calls: daemon + spawner MiB): "
        + ", ".join(
            f"{x['after']} {x['calls']}: {x['daemon_mib']} + {x['spawner_mib']}"
            for x in r["rss"]["samples"]
        )
    )
    for key, m2 in r["rows"].items():
        for who in ("airlock", "bwrap"):
            if m2[who]["failures"]:
                print(f"failures in {key}/{who}: {m2[who]['first_failure']}")
    warm = {
        k: f"{v['airlock']['warm_runs']}/{v['airlock']['ms']['n']}" for k, v in r["rows"].items()
    }
    print(f"warm sandboxes served: {warm}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=None, help="runs a row (default 100; quick 30)")
    p.add_argument("--quick", action="store_true", help="fewer runs, shorter rounds")
    p.add_argument(
        "--rss-calls", type=int, default=None, help="calls before the last RSS sample (10,000)"
    )
    p.add_argument("--out", default=str(HERE / "results" / "issue16.json"))
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench/issue16.py needs root (namespaces, overlayfs, cgroups)", file=sys.stderr)
        return 2
    if shutil.which("bwrap") is None:
        print("bwrap is not installed (make install adds bubblewrap)", file=sys.stderr)
        return 2
    b = budget(a.quick, a.runs, a.rss_calls)
    started = time.perf_counter()
    load0 = os.getloadavg()
    r: dict[str, Any] = {"budget": b.__dict__, "rows": {}}
    with environment() as (d, ws), Client(d.socket, timeout=120) as c:
        rss: list[dict[str, Any]] = []
        for row in ROWS:
            print(f"... {row.key}", file=sys.stderr, flush=True)
            r["rows"][row.key] = measure_row(c, ws, row, b)
            if not rss:
                rss.append(rss_sample(d, row.key))
        rss.append(rss_sample(d, "rows"))
        print("... throughput", file=sys.stderr, flush=True)
        r["throughput"] = measure_throughput(d, ws, b)
        print("... execute", file=sys.stderr, flush=True)
        r["execute"] = measure_execute(c, ws, b)
        print("... cpu", file=sys.stderr, flush=True)
        r["cpu"] = measure_cpu(d, c, ws, b)
        rss.append(rss_sample(d, "throughput, execute, cpu"))
        print("... diff of 10,000 files", file=sys.stderr, flush=True)
        r["diff_10k"] = measure_diff_10k(c, ws, b)
        rss.append(rss_sample(d, "diff_10k"))
        print(f"... RSS, topping up to {b.rss_calls} calls", file=sys.stderr, flush=True)
        r["rss"] = measure_rss_growth(d, c, ws, b, rss)
    load1 = os.getloadavg()
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--short", "airlock"], capture_output=True, text=True)
    r["meta"] = {
        "commit": head.stdout.strip(),
        "uncommitted_in_airlock": dirty.stdout.split("\n")[:-1],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_start": " ".join(f"{x:.2f}" for x in load0),
        "load_end": " ".join(f"{x:.2f}" for x in load1),
        "elapsed_s": time.perf_counter() - started,
        "calls": CALLS.n,
    }
    r["table"] = table_rows(r)
    print_report(r)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
