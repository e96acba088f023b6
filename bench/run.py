"""``make bench``: how fast Airlock is, measured on this machine.

Starts its own daemon on a temporary socket and state directory, measures, prints
a table and writes ``bench/results/latest.json``. Nothing is asserted: the figures
are compared with the targets in ``docs/performance.md`` and reported as met or not.

Sections (see ``docs/performance.md`` for what each one means):

1. End-to-end ``Validate`` latency from the Python client, and the daemon's own
   timing breakdown, for ``true``, ``echo hi > f`` and a command creating 1,000 files,
   against a daemon with default settings (warm pool of 2); ``true`` also after 0.2 s
   of quiet, and against a second daemon with ``--warm-pool 0`` (every sandbox cold).
2. References, timed as subprocesses the same way: ``bash -c true``,
   ``unshare -mpinu --fork true`` and ``bwrap --unshare-all ... true``.
3. The diff of 10,000 created files, and what moving that result costs.
4. Throughput with 8 concurrent clients.
5. Idle memory of the daemon, its spawner helper and the warm sandboxes.
6. The spawner choice: daemon vs ``Engine.validate`` vs ``Spawner.submit`` (warm and
   cold) vs a cold sandbox forked from a single-threaded process (``bench/_direct.py``);
   and the cost of a fresh process's first write to ``cgroup.procs``.
7. The static pass over the corpus and the read-only fast path.
8. Effect capture: ``true`` and 1,000 x ``/bin/true`` against a daemon with full capture
   (processes, network, sensitive reads: the default) and one with ``--no-capture``;
   bwrap and bare bash running the same loop.
9. Execute and Apply (``bench/execute.py``): Execute("true") against bash and bwrap,
   stdout streaming rate, Apply of 1,000 created files.
10. The caller's credentials: Validate of ``echo hi > f``, 100 new files and 100 rewritten
   files as root and as a real non-root caller (uid 65534, ``bench/_as_user.py``) in a
   workspace that caller owns, interleaved in rounds against one daemon (the difference is
   what reading the diff and the kept changes as the caller, and resolving the cwd as the
   caller, cost); and, against the same daemon, Execute("true") and Execute("ls -la /")
   (host directories shown through read-only overlays).
11. ``airlock hook`` start-up (``bench/hook.py``): ``airlock hook claude`` for ``ls`` end to end,
   a fresh process each time as an agent runs it, interleaved with a bare ``python -c pass``
   and the imports it cannot do without (grpc, the generated stub).

Usage: ``.venv/bin/python bench/run.py [--quick] [--runs N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pickle
import platform
import shutil
import statistics
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
from _as_user import validate_series
from _bwrap import BWRAP
from _stats import format_table, ms, summarize
from execute import execute_series

import airlock
from airlock.api import convert
from airlock.client import Client
from airlock.core.config import DaemonConfig
from airlock.sandbox import cgroup
from airlock.types import DryRunSkip, Validation
from airlock.v1 import sandbox_pb2 as pb

HERE = Path(__file__).resolve().parent
AIRLOCKD = str(Path(sys.executable).with_name("airlockd"))
DIRECT = str(HERE / "_direct.py")
AS_USER = str(HERE / "_as_user.py")

COMMANDS = {
    "true": "true",
    "echo": "echo hi > f",
    "files_1k": "for i in {1..1000}; do echo $i > f$i; done",
}
FILES_10K = "for i in {1..10000}; do echo $i > f$i; done"
# Section 8: the cost of effect capture on the command that suffers most from it.
FORK_HEAVY = "for i in $(seq 1000); do /bin/true; done"
REFERENCES = {
    "bash": ["bash", "-c", "true"],
    "unshare": ["unshare", "-mpinu", "--fork", "true"],
    "bwrap": [*BWRAP, "true"],
}
# Section 10: the same dry runs as root and as a real non-root caller, in a workspace it owns;
# each series runs in its own directory (rewrite_100 holds f1..f100 before the dry run).
NOBODY = 65534
CALLER_SERIES = {
    "echo": ("echo hi > f", 1),
    "new_100": ("for i in $(seq 100); do echo $i > n$i; done", 100),
    "rewrite_100": ("for i in $(seq 100); do echo new$i > f$i; done", 100),
}
EXECUTE_SERIES = {"true": "true", "ls_root": "ls -la /"}
QS = ("p50", "p90", "p99", "max")
TIMING_FIELDS = ("static_analysis", "sandbox_setup", "command", "diff", "sandbox", "total")
CLIENTS = 8
ISOLATED_GAP_S = 0.2
# Quiet time before a fresh process's first cgroup.procs write: back to back, about the
# gap between two Validate("true") calls, and long enough for the kernel to go idle.
CG_GAPS_MS = (0, 10, 30, 100)
TARGETS = {
    "validate_true_p50_ms": 10.0,
    "diff_10k_p50_ms": 150.0,
    "throughput_per_s": 100.0,
    "idle_rss_mb": 80.0,
    "full_capture_true_p50_ms": 20.0,
    "fork_heavy_capture_ratio": 2.0,
}


@dataclass(frozen=True)
class Budget:
    runs: int  # per latency series
    warmup: int
    diff_runs: int
    throughput_s: float
    cg_runs: int
    rounds: int  # the spawner comparison is interleaved in this many rounds
    isolated_runs: int  # Validate("true") after ISOLATED_GAP_S of quiet


def budget(quick: bool, runs: int | None) -> Budget:
    if quick:
        return Budget(runs or 50, 5, 5, 3.0, 15, 2, 10)
    return Budget(runs or 200, 20, 25, 10.0, 40, 4, 30)


# --- Daemon -----------------------------------------------------------------------------------


@dataclass
class Daemon:
    base: Path
    socket: str
    state_dir: str
    workspace: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pids: set[int] = field(default_factory=set)

    def spawner_pid(self) -> int | None:
        return _daemon.spawner_pid(self.proc.pid)

    def stop(self) -> int:
        return _daemon.stop(self.proc)


# The sandbox series run with a policy that has no opinion, so every command is dry-run (under
# the default policy, `true` is read-only and would take the fast path instead).
NEUTRAL_POLICY = str(Path(__file__).resolve().parent.parent / "tests" / "data" / "neutral-policy")


def start_daemon(base: Path, *args: str) -> Daemon:
    base.mkdir(mode=0o755, exist_ok=True)
    sock, state, ws = base / "airlock.sock", base / "state", base / "ws"
    ws.mkdir()
    log_path = base / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [AIRLOCKD, "--socket", str(sock), "--state-dir", str(state), *args],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    daemon = Daemon(base, str(sock), str(state), str(ws), proc, log_path)
    _daemon.wait_serving(proc, sock, log_path)
    daemon.pids = {proc.pid, daemon.spawner_pid() or proc.pid}
    return daemon


# --- Measurements -----------------------------------------------------------------------------


def is_warm(v: Validation) -> bool:
    """Whether a sandbox prepared before the request served it."""
    return bool(getattr(v.timings, "warm", v.timings.sandbox_setup_s == 0))


def timings_of(v: Validation) -> dict[str, float]:
    t = v.timings
    return {
        "static_analysis": t.static_analysis_s,
        "sandbox_setup": t.sandbox_setup_s,
        "command": t.command_s,
        "diff": t.diff_s,
        "sandbox": t.sandbox_s,
        "total": t.total_s,
    }


def measure_validate(
    client: Client,
    command: str,
    cwd: str,
    runs: int,
    warmup: int,
    expect_changes: int | None = None,
    gap_s: float = 0.0,
    keep: list[Validation] | None = None,
) -> dict[str, Any]:
    """Time ``runs`` Validate calls (``gap_s`` apart); keep the daemon's own timings of each.

    The last result is appended to ``keep`` when given.
    """
    for _ in range(warmup):
        client.validate(command, cwd=cwd, timeout=60)
    e2e: list[float] = []
    daemon: dict[str, list[float]] = {k: [] for k in TIMING_FIELDS}
    client_overhead: list[float] = []
    unaccounted: list[float] = []
    failures = warm = 0
    changes = truncated = 0
    v: Validation | None = None
    for _ in range(runs):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        v = client.validate(command, cwd=cwd, timeout=60)
        elapsed = time.perf_counter() - t0
        e2e.append(elapsed)
        t = timings_of(v)
        for k in TIMING_FIELDS:
            daemon[k].append(t[k])
        client_overhead.append(elapsed - t["total"])
        unaccounted.append(t["sandbox"] - t["sandbox_setup"] - t["command"] - t["diff"])
        if v.exit_code != 0 or (expect_changes is not None and len(v.changes) != expect_changes):
            failures += 1
        changes, truncated = len(v.changes), int(v.changes_truncated)
        warm += is_warm(v)
    if keep is not None and v is not None:
        keep.append(v)
    return {
        "command": command,
        "client_ms": summarize(e2e),
        "daemon_ms": {k: summarize(daemon[k]) for k in TIMING_FIELDS},
        # Client -> relay -> gRPC -> engine and back, minus the engine's own total.
        "grpc_and_client_ms": summarize(client_overhead),
        # The engine's sandbox_s minus what the supervisor measured: plan pickling,
        # the helper's fork, cgroup removal, result pickling and the socket hops.
        "helper_hop_ms": summarize(unaccounted),
        "changes": changes,
        "changes_truncated": bool(truncated),
        "warm_runs": warm,
        "failures": failures,
    }


def conversion_costs(v: Validation, reps: int = 5) -> dict[str, Any]:
    """What moving one large result costs outside the sandbox: protobuf and pickle, both ways.

    The daemon converts the engine's Validation to protobuf and serializes it; the client
    parses and converts back; the supervisor pickles its result for the daemon, which
    unpickles it. Each step is timed here, in this process, on a result the daemon returned.
    """

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 2)

    msg = convert.validation_to_proto(v)
    wire = msg.SerializeToString()
    pickled = pickle.dumps(v.changes, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "changes": len(v.changes),
        "response_bytes": len(wire),
        "pickle_bytes": len(pickled),
        "ms": {
            "validation_to_proto": best(lambda: convert.validation_to_proto(v)),
            "SerializeToString": best(msg.SerializeToString),
            "FromString": best(lambda: pb.ValidateResponse.FromString(wire)),
            "validation_from_proto": best(lambda: convert.validation_from_proto(msg)),
            "pickle.dumps(changes)": best(
                lambda: pickle.dumps(v.changes, protocol=pickle.HIGHEST_PROTOCOL)
            ),
            "pickle.loads(changes)": best(lambda: pickle.loads(pickled)),
        },
    }


def measure_subprocess(
    argv: Sequence[str], runs: int, warmup: int, gap_s: float = 0.0
) -> dict[str, Any]:
    """Time ``argv`` as a subprocess from Python (``gap_s`` apart), as Validate is timed."""
    exe = shutil.which(argv[0])
    if exe is None:
        return {"skipped": f"{argv[0]} is not installed (make install adds bubblewrap)"}
    probe = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if probe.returncode != 0:
        return {"skipped": f"{' '.join(argv)} failed: {probe.stderr.decode(errors='replace')}"}
    for _ in range(warmup):
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return {"argv": list(argv), "ms": summarize(times)}


def measure_throughput(socket_path: str, cwd: str, seconds: float) -> dict[str, Any]:
    """CLIENTS threads, each with its own Client, run ``true`` back to back."""
    barrier = threading.Barrier(CLIENTS + 1)
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    warm = [0] * CLIENTS
    errors: list[str] = []
    stop_at = [0.0]

    def worker(i: int) -> None:
        with Client(socket_path, timeout=60) as c:
            c.validate("true", cwd=cwd)  # connect and warm up
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    v = c.validate("true", cwd=cwd)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies[i].append(time.perf_counter() - t0)
                warm[i] += is_warm(v)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600  # set for real once every client is connected
    barrier.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done = sum(len(x) for x in latencies)
    return {
        "clients": CLIENTS,
        "seconds": round(elapsed, 3),
        "validations": done,
        "per_s": round(done / elapsed, 1),
        "warm_runs": sum(warm),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "latency_ms": summarize([x for xs in latencies for x in xs]),
    }


def _memory(p: psutil.Process) -> dict[str, Any]:
    full = p.memory_full_info()
    return {
        "pid": p.pid,
        "rss_mb": round(full.rss / 2**20, 1),
        "pss_mb": round(full.pss / 2**20, 1),
        "uss_mb": round(full.uss / 2**20, 1),
        "threads": p.num_threads(),
    }


def measure_rss(daemon: Daemon) -> dict[str, Any]:
    """RSS/PSS/USS of the daemon, its spawner helper, and the warm sandboxes' processes."""
    time.sleep(1.5)  # let the last dry runs' supervisors exit and the warm pool refill
    out: dict[str, Any] = {"daemon": None, "spawner": None}
    with contextlib.suppress(psutil.Error):
        out["daemon"] = _memory(psutil.Process(daemon.proc.pid))
    spawner = daemon.spawner_pid()
    pool: list[dict[str, Any]] = []
    if spawner is not None:
        with contextlib.suppress(psutil.Error):
            helper = psutil.Process(spawner)
            out["spawner"] = _memory(helper)
            for child in helper.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    pool.append(_memory(child))
    parts = [v for v in (out["daemon"], out["spawner"]) if v]
    out["total_rss_mb"] = round(sum(v["rss_mb"] for v in parts), 1)
    out["total_pss_mb"] = round(sum(v["pss_mb"] for v in parts), 1)
    # Warm sandboxes: each a supervisor, its init and its waiting command process.
    out["pool"] = {
        "processes": len(pool),
        "rss_mb": round(sum(v["rss_mb"] for v in pool), 1),
        "pss_mb": round(sum(v["pss_mb"] for v in pool), 1),
        "uss_mb": round(sum(v["uss_mb"] for v in pool), 1),
    }
    return out


class DirectWorker:
    """The single-threaded worker process of ``bench/_direct.py``."""

    def __init__(self, state_dir: str, cwd: str, log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, DIRECT, "--state-dir", state_dir, "--cwd", cwd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.hello = self._read()
        self.final: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct worker died (exit {self.proc.wait()}); see its log")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def ask(self, mode: str, runs: int = 0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {runs}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.final = self.ask("quit")
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def measure_cgroup_writes(worker: DirectWorker, b: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {"hierarchies": 0, "gaps": {}}
    for gap in CG_GAPS_MS:
        reply = worker.ask(f"cg-{gap}", b.cg_runs)
        out["hierarchies"] = reply["hierarchies"]
        out["gaps"][str(gap)] = {
            k.replace("_s", "_ms"): summarize(reply[k])
            for k in ("first_s", "total_s", "create_s", "remove_s")
        }
    return out


def measure_spawner_choice(
    client: Client, daemon: Daemon, worker: DirectWorker, b: Budget
) -> dict[str, Any]:
    """The daemon and the worker's paths to a dry run of ``true``, interleaved in rounds."""
    per_round = max(1, b.runs // b.rounds)
    modes = ("engine", "spawner-warm", "spawner-cold", "fork")
    series: dict[str, list[float]] = {k: [] for k in ("daemon", *modes)}
    warm_runs = dict.fromkeys(series, 0)
    plan_s: list[float] = []
    threads_seen = set()
    for mode in modes:
        worker.ask(mode, b.warmup)
    for _ in range(b.rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            v = client.validate("true", cwd=daemon.workspace, timeout=60)
            series["daemon"].append(time.perf_counter() - t0)
            warm_runs["daemon"] += is_warm(v)
        for mode in modes:
            reply = worker.ask(mode, per_round)
            series[mode] += reply["run_s"]
            plan_s += reply.get("plan_s", [])
            warm_runs[mode] += reply.get("warm_runs", 0)
            threads_seen.add(reply["threads"])
    return {
        "ms": {k: summarize(v) for k, v in series.items()},
        "warm_runs": warm_runs,
        "plan_ms": summarize(plan_s),
        "worker_threads": sorted(threads_seen),
        "worker_rss_mb": round(worker.hello["rss_bytes"] / 2**20, 1),
        "worker_grpc_imported": worker.hello["grpc_imported"],
    }


class UserWorker:
    """``bench/_as_user.py``: a Validate client that dropped to a real non-root ``uid``."""

    def __init__(self, socket_path: str, uid: int, log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, AS_USER, "--socket", socket_path, "--uid", str(uid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd="/",
        )
        self.hello = self._read()
        if self.hello.get("uid") != uid:
            raise RuntimeError(f"the caller runs as {self.hello}, not uid {uid}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the uid worker died (exit {self.proc.wait()}); see its log")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def caller_workspace(ws: Path, uid: int) -> dict[str, str]:
    """One directory per CALLER_SERIES entry under ``ws``, all owned by ``uid``.

    Writable by everyone (directories 0777, files 0666): in a 0755 directory of ``uid``, root's
    dry run gets "Permission denied", and both callers must run the same commands in the same
    directories.
    """
    os.chown(ws, uid, uid)
    dirs = {}
    for name in CALLER_SERIES:
        d = ws / name
        d.mkdir()
        os.chown(d, uid, uid)
        os.chmod(d, 0o777)
        if name == "rewrite_100":
            for i in range(1, 101):
                f = d / f"f{i}"
                f.write_text(f"old{i}\n")
                os.chown(f, uid, uid)
                os.chmod(f, 0o666)
        dirs[name] = str(d)
    return dirs


def measure_callers(base: Path, b: Budget) -> dict[str, Any]:
    """Section 10, against one daemon (default settings, neutral policy, socket mode 0666).

    Validate: each series as root (in-process) and as uid NOBODY (``UserWorker``), both through
    ``_as_user.validate_series``, interleaved in ``b.rounds`` rounds after a warm-up each.
    Execute (root): ``true`` and ``ls -la /``, warm, in the same workspace.
    """
    out: dict[str, Any] = {"validate": {}, "execute": {}, "_failures": []}
    d = start_daemon(base / "callers", "--policy-dir", NEUTRAL_POLICY, "--socket-mode", "0666")
    out["_pids"] = sorted(d.pids)
    worker: UserWorker | None = None
    try:
        dirs = caller_workspace(Path(d.workspace), NOBODY)
        worker = UserWorker(d.socket, NOBODY, base / "callers" / "worker.log")
        out["_pids"].append(worker.proc.pid)
        per_round = max(1, b.runs // b.rounds)
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        with Client(d.socket, timeout=120) as c:
            for rnd in range(b.rounds):
                for name, (command, expect) in CALLER_SERIES.items():
                    req = {
                        "command": command,
                        "cwd": dirs[name],
                        "runs": per_round,
                        "warmup": b.warmup if rnd == 0 else 0,
                        "expect_changes": expect,
                    }
                    series = raw.setdefault(name, {"root": [], "nobody": []})
                    series["root"].append(validate_series(c, req))
                    series["nobody"].append(worker.ask(req))
            for name, command in EXECUTE_SERIES.items():
                out["execute"][name] = execute_series(c, command, d.workspace, b.runs, b.warmup)
                out["execute"][name]["command"] = command
        for name, series in raw.items():
            out["validate"][name] = {"command": CALLER_SERIES[name][0]}
            for who, parts in series.items():
                daemon = {
                    k: summarize([x for p in parts for x in p["daemon_s"][k]])
                    for k in TIMING_FIELDS
                }
                failures = sum(p["failures"] for p in parts)
                out["validate"][name][who] = {
                    "client_ms": summarize([x for p in parts for x in p["e2e_s"]]),
                    "daemon_ms": daemon,
                    "warm_runs": sum(p["warm_runs"] for p in parts),
                    "kept_runs": sum(p["kept_runs"] for p in parts),
                    "changes": parts[-1]["changes"],
                    "failures": failures,
                }
                if failures:
                    first = next(p["first_failure"] for p in parts if p["failures"])
                    out["_failures"].append(f"{who} {name}: {failures} runs failed ({first})")
    finally:
        if worker is not None:
            worker.close()
        if d.stop() != 0:
            out["_failures"].append("airlockd (section 10) exited with an error")
    return out


def print_callers(c: dict[str, Any]) -> None:
    rows = []
    for name, e in c["validate"].items():
        root, nobody = e["root"], e["nobody"]
        delta = nobody["client_ms"]["p50"] - root["client_ms"]["p50"]
        rows.append(
            [
                name,
                ms(root["client_ms"]),
                ms(root["client_ms"], "p90"),
                ms(nobody["client_ms"]),
                ms(nobody["client_ms"], "p90"),
                f"{delta:+.2f}",
                f"{ms(root['daemon_ms']['diff'])} / {ms(nobody['daemon_ms']['diff'])}",
                f"{ms(root['daemon_ms']['total'])} / {ms(nobody['daemon_ms']['total'])}",
                f"{root['warm_runs']}/{nobody['warm_runs']}",
                f"{root['kept_runs']}/{nobody['kept_runs']}",
            ]
        )
    print(
        format_table(
            f"10. Validate as root and as uid {NOBODY} (same daemon, interleaved; ms; daemon"
            " columns are medians, root / nobody)",
            [
                "series",
                "root p50",
                "p90",
                "nobody p50",
                "p90",
                "nobody-root",
                "d.diff",
                "d.total",
                "warm",
                "kept",
            ],
            rows,
        )
    )
    print("   " + "; ".join(f"{k} = `{v['command']}`" for k, v in c["validate"].items()))
    print(
        format_table(
            "   Execute as root, same daemon, warm (host directories through read-only overlays)",
            ["command", "p50", "p90", "p99", "warm"],
            [
                [
                    e["command"],
                    ms(e["ms"]),
                    ms(e["ms"], "p90"),
                    ms(e["ms"], "p99"),
                    f"{e['warm_runs']}/{e['ms']['n']}",
                ]
                for e in c["execute"].values()
            ],
        )
    )


# --- Clean-up checks --------------------------------------------------------------------------


def airlock_cgroups() -> set[str]:
    out = subprocess.run(
        ["find", "/sys/fs/cgroup", "-maxdepth", "3", "-iname", "*airlock*"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {line for line in out.splitlines() if line}


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.strip() for line in f if path in line]


def processes_mentioning(path: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(path in arg for arg in p.info["cmdline"] or ()):
                found.append(p.info["pid"])
    return found


def alive(pids: Iterator[int] | Sequence[int] | set[int]) -> list[int]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def other_daemons(ours: str) -> int:
    """How many other airlockd processes run now (other people's tests share this machine)."""
    n = 0
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            args = p.info["cmdline"] or []
            if any(a.endswith("/airlockd") or a == "airlockd" for a in args[:2]) and not any(
                ours in a for a in args
            ):
                n += 1
    return n


# --- Report -----------------------------------------------------------------------------------


def meta(quick: bool, b: Budget) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    host = cgroup.detect()
    git = subprocess.run(
        ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "airlock": str(Path(airlock.__file__).parent),
        "commit": git.stdout.strip() or "unknown",
        "cgroup": host.version.name.lower(),
        "quick": quick,
        "runs": b.runs,
        "command": "make bench" if not quick else "make bench (python bench/run.py --quick)",
    }


def print_spawner(r: dict[str, Any]) -> None:
    s = r["spawner"]
    labels = {
        "daemon": "(a) Validate via the daemon (client, relay, gRPC, engine, helper)",
        "engine": "(d) Engine.validate in-process, warm pool (no gRPC)",
        "spawner-warm": "(c) Spawner(pool=2).submit(plan).result() (no gRPC)",
        "spawner-cold": "(c) Spawner(pool=0).submit(plan).result() (no gRPC)",
        "fork": "(b) cold sandbox forked from a single-threaded process",
    }
    print(
        format_table(
            "6. The spawner choice: Validate('true') by path (ms)",
            ["path", "p50", "p90", "p99", "warm"],
            [
                [labels[k], ms(v), ms(v, "p90"), ms(v, "p99"), str(s["warm_runs"][k])]
                for k, v in s["ms"].items()
            ]
            + [
                [
                    "Engine.plan alone (not in (b)/(c))",
                    ms(s["plan_ms"]),
                    ms(s["plan_ms"], "p90"),
                    ms(s["plan_ms"], "p99"),
                    "",
                ]
            ],
        )
    )
    print(
        f"   direct worker: threads {s['worker_threads']}, grpc imported:"
        f" {s['worker_grpc_imported']}, RSS {s['worker_rss_mb']} MiB"
    )


def print_cgroup(r: dict[str, Any]) -> None:
    cg = r["cgroup_migration"]
    rows = []
    for gap, x in cg["gaps"].items():
        for k, label in (("first_ms", "first write"), ("total_ms", "all writes")):
            rows.append([f"after {gap} ms: {label}", *(ms(x[k], q) for q in QS)])
    x = cg["gaps"][str(CG_GAPS_MS[0])]
    rows.append(["Cgroup.create", *(ms(x["create_ms"], q) for q in QS)])
    rows.append(["Cgroup.remove", *(ms(x["remove_ms"], q) for q in QS)])
    title = (
        f"   A fresh process's write of '0' to cgroup.procs ({cg['hierarchies']} hierarchies; ms)"
    )
    print(format_table(title, ["case", *QS], rows))


def print_report(r: dict[str, Any]) -> None:
    m = r["meta"]
    print(
        f"Airlock benchmark {m['date']}  kernel {m['kernel']}  {m['cores']} cores ({m['cpu']})"
        f"  cgroup {m['cgroup']}  runs {m['runs']}  load {r['load']['before']} -> "
        f"{r['load']['after']}  other airlockd daemons (max seen): {r['load']['other_daemons_max']}"
    )
    print(f"airlock from {m['airlock']} (commit {m['commit']}), Python {m['python']}")

    rows = []
    for name, e in r["e2e"].items():
        d = e["daemon_ms"]
        rows.append(
            [
                name,
                ms(e["client_ms"]),
                ms(e["client_ms"], "p90"),
                ms(e["client_ms"], "p99"),
                ms(d["total"]),
                ms(d["sandbox_setup"]),
                ms(d["command"]),
                ms(d["diff"]),
                ms(e["helper_hop_ms"]),
                ms(e["grpc_and_client_ms"]),
                f"{e['warm_runs']}/{e['client_ms']['n']}",
            ]
        )
    for name, ref in r["reference"].items():
        if "skipped" in ref:
            rows.append([f"ref {name} (skipped)", *["-"] * 10])
        else:
            rows.append(
                [
                    f"ref {name}",
                    ms(ref["ms"]),
                    ms(ref["ms"], "p90"),
                    ms(ref["ms"], "p99"),
                    *["-"] * 7,
                ]
            )
    print(
        format_table(
            "1-2. Validate end to end from the Python client, and references (ms; daemon columns"
            " are medians)",
            [
                "series",
                "p50",
                "p90",
                "p99",
                "d.total",
                "setup",
                "command",
                "diff",
                "hop",
                "grpc",
                "warm",
            ],
            rows,
        )
    )
    print(
        "   hop = sandbox_s - (setup + command + diff): pickling, helper hop, cgroup;"
        " grpc = client time - daemon total;\n   warm = runs served by a sandbox prepared before"
        " the request (timings.warm)\n"
        f"   *_isolated: each run after {ISOLATED_GAP_S:g} s idle (an interactive caller);"
        " the others run back to back\n"
        "   *_cold: a daemon with --warm-pool 0, i.e. every sandbox is built on request (what"
        " a request meets when no warm sandbox is ready)"
    )
    tail = []
    for name, e in r["e2e"].items():
        for k in ("sandbox_setup", "command", "diff", "total"):
            s = e["daemon_ms"][k]
            tail.append([f"{name}: {k}", ms(s), ms(s, "p90"), ms(s, "p99"), ms(s, "max")])
    print(
        format_table("   Daemon timing breakdown (ms)", ["field", "p50", "p90", "p99", "max"], tail)
    )
    for name, ref in r["reference"].items():
        if "skipped" in ref:
            print(f"   ref {name} skipped: {ref['skipped']}")

    d = r["diff_10k"]
    dm = d["daemon_ms"]
    print(
        format_table(
            "3. Diff of 10,000 created files (ms)",
            ["field", "p50", "p90", "p99"],
            [
                [k, ms(dm[k]), ms(dm[k], "p90"), ms(dm[k], "p99")]
                for k in ("diff", "command", "sandbox", "total")
            ]
            + [
                [
                    "client end to end",
                    ms(d["client_ms"]),
                    ms(d["client_ms"], "p90"),
                    ms(d["client_ms"], "p99"),
                ],
                [
                    "grpc + client",
                    ms(d["grpc_and_client_ms"]),
                    ms(d["grpc_and_client_ms"], "p90"),
                    ms(d["grpc_and_client_ms"], "p99"),
                ],
                [
                    "hop (incl. result pickling)",
                    ms(d["helper_hop_ms"]),
                    ms(d["helper_hop_ms"], "p90"),
                    ms(d["helper_hop_ms"], "p99"),
                ],
            ],
        )
    )
    print(
        f"   changes reported: {d['changes']} (truncated: {d['changes_truncated']}),"
        f" runs: {dm['diff']['n']}"
    )
    conv = d["conversion"]
    print(
        format_table(
            f"   Moving that result ({conv['changes']} changes, {conv['response_bytes']} bytes"
            f" of protobuf, {conv['pickle_bytes']} pickled), timed in the bench process",
            ["step", "ms"],
            [[k, f"{v:.1f}"] for k, v in conv["ms"].items()],
        )
    )

    t = r["throughput"]
    print(
        format_table(
            f"4. Throughput: {t['clients']} clients running `true` for {t['seconds']} s",
            ["validations/s", "validations", "warm", "errors", "lat p50", "lat p90", "lat p99"],
            [
                [
                    f"{t['per_s']}",
                    str(t["validations"]),
                    str(t["warm_runs"]),
                    str(t["errors"]),
                    ms(t["latency_ms"]),
                    ms(t["latency_ms"], "p90"),
                    ms(t["latency_ms"], "p99"),
                ]
            ],
        )
    )

    rows = []
    for when in ("after_warmup", "after_bench"):
        x = r["rss"][when]
        for part in ("daemon", "spawner"):
            v = x[part]
            if v:
                rows.append(
                    [
                        f"{when}: {part}",
                        str(v["rss_mb"]),
                        str(v["pss_mb"]),
                        str(v["uss_mb"]),
                        str(v["threads"]),
                    ]
                )
        rows.append(
            [f"{when}: daemon + spawner", str(x["total_rss_mb"]), str(x["total_pss_mb"]), "", ""]
        )
        pool = x["pool"]
        rows.append(
            [
                f"{when}: warm pool ({pool['processes']} processes)",
                str(pool["rss_mb"]),
                str(pool["pss_mb"]),
                str(pool["uss_mb"]),
                "",
            ]
        )
    print(format_table("5. Idle memory (MiB)", ["process", "RSS", "PSS", "USS", "threads"], rows))

    if "spawner" in r:
        print_spawner(r)
    if "cgroup_migration" in r:
        print_cgroup(r)
    if "capture" in r:
        print_capture(r["capture"])
    if "callers" in r:
        print_callers(r["callers"])

    print(
        format_table(
            "Targets",
            ["target", "goal", "measured", "met"],
            [
                [x["name"], x["goal"], x["measured"], "yes" if x["met"] else "NO"]
                for x in r["targets"]
            ],
        )
    )
    c = r["cleanup"]
    print(
        f"\nClean-up: leftover processes {c['leftover_processes']}, leftover mounts"
        f" {len(c['leftover_mounts'])}, our cgroups left {c['our_cgroups_left']},"
        f" new cgroups of others {c['other_new_cgroups']}, failures: {len(c['failures'])}"
    )
    for failure in c["failures"]:
        print(f"   FAILURE: {failure}")


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    p50 = r["e2e"]["true"]["client_ms"]["p50"]
    iso = r["e2e"]["true_isolated"]["client_ms"]["p50"]
    diff = r["diff_10k"]["daemon_ms"]["diff"]["p50"]
    tput = r["throughput"]["per_s"]
    rss = r["rss"]["after_warmup"]["total_rss_mb"]
    cold = [
        {
            "name": f"Validate('true') p50, {name.replace('_', ' ')}",
            "goal": "<= 10 ms",
            "measured": f"{r['e2e'][name]['client_ms']['p50']:.2f} ms",
            "met": r["e2e"][name]["client_ms"]["p50"] <= TARGETS["validate_true_p50_ms"],
        }
        for name in ("true_cold", "true_cold_isolated")
        if name in r["e2e"]
    ]
    capture: list[dict[str, Any]] = []
    if "capture" in r:
        full = r["capture"]["true_with"]["client_ms"]["p50"]
        ratio = r["capture"]["fork_heavy_command_ratio"]
        capture = [
            {
                "name": "Validate('true') p50 with full capture (own daemon)",
                "goal": "<= 20 ms",
                "measured": f"{full:.2f} ms",
                "met": full <= TARGETS["full_capture_true_p50_ms"],
            },
            {
                "name": "1,000 x /bin/true: command time with / without capture",
                "goal": "<= 2x",
                "measured": f"{ratio}x",
                "met": ratio is not None and ratio <= TARGETS["fork_heavy_capture_ratio"],
            },
        ]
    return [
        *capture,
        {
            "name": "Validate('true') p50, end to end, back to back",
            "goal": "<= 10 ms",
            "measured": f"{p50:.2f} ms",
            "met": p50 <= TARGETS["validate_true_p50_ms"],
        },
        {
            "name": f"Validate('true') p50, after {ISOLATED_GAP_S:g} s idle",
            "goal": "<= 10 ms",
            "measured": f"{iso:.2f} ms",
            "met": iso <= TARGETS["validate_true_p50_ms"],
        },
        *cold,
        {
            "name": "diff of 10,000 created files, p50",
            "goal": "<= 150 ms",
            "measured": f"{diff:.1f} ms",
            "met": diff <= TARGETS["diff_10k_p50_ms"],
        },
        {
            "name": f"throughput, {CLIENTS} clients",
            "goal": ">= 100/s",
            "measured": f"{tput:.1f}/s",
            "met": tput >= TARGETS["throughput_per_s"],
        },
        {
            "name": "idle RSS, daemon + spawner (after warm-up)",
            "goal": "<= 80 MB",
            "measured": f"{rss:.1f} MiB ({rss * 2**20 / 1e6:.1f} MB)",
            "met": rss * 2**20 <= TARGETS["idle_rss_mb"] * 1e6,
        },
    ]


# --- Main -------------------------------------------------------------------------------------


def step(name: str) -> Callable[[], None]:
    t0 = time.perf_counter()
    print(f"... {name}", file=sys.stderr, flush=True)
    return lambda: print(f"    {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def warm_pool_flag() -> bool:
    """Whether this airlockd has --warm-pool (sandboxes prepared ahead of requests)."""
    out = subprocess.run([AIRLOCKD, "--help"], capture_output=True, text=True, check=False)
    return "--warm-pool" in out.stdout


def run(b: Budget, quick: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"meta": meta(quick, b), "e2e": {}}
    base = Path(tempfile.mkdtemp(prefix="airlock-bench-"))
    os.chmod(base, 0o755)
    cgroups_before = airlock_cgroups()
    load_before = [round(x, 2) for x in os.getloadavg()]
    failures: list[str] = []
    daemons: list[Daemon] = []
    worker: DirectWorker | None = None
    pids: set[int] = set()
    others = 0
    groups = {
        DaemonConfig(state_dir=str(base / d / "state")).cgroup_group
        for d in ("warm", "cold", "direct", "callers")
    }
    try:
        done = step("references: bash, unshare, bwrap (and isolated bash, bwrap)")
        r["reference"] = {k: measure_subprocess(v, b.runs, b.warmup) for k, v in REFERENCES.items()}
        for k in ("bash", "bwrap"):
            r["reference"][f"{k}_isolated"] = measure_subprocess(
                REFERENCES[k], b.isolated_runs, 0, gap_s=ISOLATED_GAP_S
            )
        done()

        done = step("starting the daemon (default settings) and warming up")
        daemon = start_daemon(base / "warm", "--policy-dir", NEUTRAL_POLICY)
        daemons.append(daemon)
        pids |= daemon.pids
        others = other_daemons(str(base))
        client = Client(daemon.socket, timeout=120)
        for _ in range(b.warmup):
            client.validate("true", cwd=daemon.workspace)
        r["rss"] = {"after_warmup": measure_rss(daemon)}
        done()

        for name, command in COMMANDS.items():
            done = step(f"Validate {command!r} x {b.runs}")
            expect = 1000 if name == "files_1k" else (1 if name == "echo" else 0)
            r["e2e"][name] = measure_validate(
                client, command, daemon.workspace, b.runs, b.warmup, expect
            )
            done()
        done = step(f"Validate 'true' x {b.isolated_runs}, each after {ISOLATED_GAP_S:g} s idle")
        r["e2e"]["true_isolated"] = measure_validate(
            client, "true", daemon.workspace, b.isolated_runs, 0, 0, gap_s=ISOLATED_GAP_S
        )
        done()

        done = step("spawner choice: daemon / Engine.validate / Spawner.submit / fork")
        try:
            direct = base / "direct"
            direct.mkdir(mode=0o755)
            worker = DirectWorker(str(direct / "state"), daemon.workspace, direct / "worker.log")
            pids |= {worker.proc.pid, *worker.hello["spawner_pids"]}
            r["spawner"] = measure_spawner_choice(client, daemon, worker, b)
            done()
            done = step("cgroup.procs write cost")
            r["cgroup_migration"] = measure_cgroup_writes(worker, b)
            worker.close()
            failures += worker.final.get("failures", [])
            if not worker.final.get("group_removed", False):
                failures.append("the direct worker could not remove its cgroup group")
        except (RuntimeError, OSError, KeyError, ValueError) as exc:
            # A broken worker must not cost the other sections: report it and go on.
            log = (base / "direct" / "worker.log").read_text(errors="replace")[-2000:]
            failures.append(f"direct worker: {exc}\n{log}")
        done()

        done = step(f"diff of 10,000 files x {b.diff_runs}")
        kept: list[Validation] = []
        r["diff_10k"] = measure_validate(
            client, FILES_10K, daemon.workspace, b.diff_runs, min(2, b.warmup), 10_000, keep=kept
        )
        r["diff_10k"]["conversion"] = conversion_costs(kept[0])
        done()

        done = step(f"throughput: {CLIENTS} clients for {b.throughput_s:g} s")
        r["throughput"] = measure_throughput(daemon.socket, daemon.workspace, b.throughput_s)
        done()

        r["rss"]["after_bench"] = measure_rss(daemon)
        others = max(others, other_daemons(str(base)))
        client.close()
        if daemon.stop() != 0:
            failures.append(f"airlockd exited with {daemon.proc.returncode}")

        done = step("capture cost: 'true' and 1,000 x /bin/true, with and without capture, bwrap")
        r["capture"] = measure_capture(base, client_runs=b.runs, heavy_runs=b.diff_runs, b=b)
        for key in ("with", "without"):
            pids |= set(r["capture"].pop(f"_{key}_pids"))
        failures += r["capture"].pop("_failures")
        done()

        if warm_pool_flag():
            done = step(
                "a daemon without a warm pool (--warm-pool 0): 'true', back to back and idle"
            )
            cold = start_daemon(base / "cold", "--warm-pool", "0", "--policy-dir", NEUTRAL_POLICY)
            daemons.append(cold)
            pids |= cold.pids
            with Client(cold.socket, timeout=120) as c:
                r["e2e"]["true_cold"] = measure_validate(
                    c, "true", cold.workspace, b.runs, b.warmup, 0
                )
                r["e2e"]["true_cold_isolated"] = measure_validate(
                    c, "true", cold.workspace, b.isolated_runs, 0, 0, gap_s=ISOLATED_GAP_S
                )
            warm = r["e2e"]["true_cold"]["warm_runs"] + r["e2e"]["true_cold_isolated"]["warm_runs"]
            if warm:
                failures.append(
                    f"airlockd --warm-pool 0 served {warm} requests from warm sandboxes"
                    ": the flag is not honoured, so the *_cold rows are not cold"
                )
            if cold.stop() != 0:
                failures.append(f"airlockd --warm-pool 0 exited with {cold.proc.returncode}")
            done()

        done = step(f"root vs uid {NOBODY}: Validate of 3 series; Execute 'true' and 'ls -la /'")
        r["callers"] = measure_callers(base, b)
        pids |= set(r["callers"].pop("_pids"))
        failures += r["callers"].pop("_failures")
        done()
    finally:
        if worker is not None:
            worker.close()
        for d in daemons:
            if d.proc.poll() is None and d.stop() != 0:
                failures.append(f"airlockd exited with {d.proc.returncode}")
        time.sleep(0.5)
        leftover = alive(pids) + [p for p in processes_mentioning(str(base)) if p not in pids]
        mounts = mounts_under(str(base))
        shutil.rmtree(base, ignore_errors=True)
    new_cgroups = airlock_cgroups() - cgroups_before
    r["load"] = {
        "before": load_before,
        "after": [round(x, 2) for x in os.getloadavg()],
        "other_daemons_max": others,
    }
    for e in [*r["e2e"].values(), r["diff_10k"]]:
        if e["failures"]:
            failures.append(f"{e['command']!r}: {e['failures']} runs failed")
    if r["throughput"]["errors"]:
        failures.append(f"throughput: {r['throughput']['first_error']}")
    r["cleanup"] = {
        "leftover_processes": leftover,
        "leftover_mounts": mounts,
        "our_cgroups_left": sorted(
            p for p in new_cgroups | airlock_cgroups() if any(g in p for g in groups)
        ),
        "other_new_cgroups": sorted(
            p for p in new_cgroups if "airlock-test-" not in p and not any(g in p for g in groups)
        ),
        "failures": failures,
    }
    r["targets"] = targets(r)
    return r


def measure_capture(base: Path, *, client_runs: int, heavy_runs: int, b: Budget) -> dict[str, Any]:
    """Section 8: Validate with full capture (processes, network, sensitive reads: the default)
    against a daemon started with --no-capture, in the same run, for `true` and a fork-heavy
    loop; bwrap running the same loop as the reference. Each daemon runs alone."""
    out: dict[str, Any] = {"_failures": []}
    for key, flags in (("with", ()), ("without", ("--no-capture",))):
        d = start_daemon(base / f"capture-{key}", "--policy-dir", NEUTRAL_POLICY, *flags)
        out[f"_{key}_pids"] = sorted(d.pids)
        try:
            with Client(d.socket, timeout=120) as c:
                out[f"true_{key}"] = measure_validate(c, "true", d.workspace, client_runs, b.warmup)
                out[f"fork_heavy_{key}"] = measure_validate(
                    c, FORK_HEAVY, d.workspace, heavy_runs, min(2, b.warmup)
                )
                v = c.validate(FORK_HEAVY, cwd=d.workspace, timeout=60)
                out[f"fork_heavy_{key}"]["processes_reported"] = len(v.processes)
        finally:
            if d.stop() != 0:
                out["_failures"].append(f"airlockd {' '.join(flags)} exited with an error")
    bwrap = REFERENCES["bwrap"]
    out["bwrap_fork_heavy"] = measure_subprocess(
        [*bwrap[:-1], "bash", "-c", FORK_HEAVY], heavy_runs, min(2, b.warmup)
    )
    out["bash_fork_heavy"] = measure_subprocess(
        ["bash", "-c", FORK_HEAVY], heavy_runs, min(2, b.warmup)
    )
    with_ = out["fork_heavy_with"]["daemon_ms"]["command"]["p50"]
    without = out["fork_heavy_without"]["daemon_ms"]["command"]["p50"]
    out["fork_heavy_command_ratio"] = round(with_ / without, 3) if without else None
    for name in ("true_with", "true_without", "fork_heavy_with", "fork_heavy_without"):
        if out[name]["failures"]:
            out["_failures"].append(f"capture {name}: {out[name]['failures']} runs failed")
    return out


def print_capture(c: dict[str, Any]) -> None:
    rows = []
    for name in ("true_with", "true_without", "fork_heavy_with", "fork_heavy_without"):
        e = c[name]
        rows.append(
            [
                name.replace("_", " "),
                ms(e["client_ms"]),
                ms(e["client_ms"], "p90"),
                ms(e["daemon_ms"]["command"]),
                ms(e["daemon_ms"]["sandbox_setup"]),
                str(e.get("processes_reported", "-")),
            ]
        )
    for name in ("bwrap_fork_heavy", "bash_fork_heavy"):
        ref = c[name]
        if "skipped" in ref:
            rows.append([f"ref {name} (skipped)", "-", "-", "-", "-", "-"])
        else:
            rows.append([f"ref {name}", ms(ref["ms"]), ms(ref["ms"], "p90"), "-", "-", "-"])
    print(
        format_table(
            "8. Effect capture: full capture (default) vs --no-capture, same run; fork heavy ="
            f" `{FORK_HEAVY}`",
            ["series", "p50", "p90", "d.command", "d.setup", "processes"],
            rows,
        )
    )
    print(f"   fork heavy, command time with / without capture: {c['fork_heavy_command_ratio']}x")


def run_static(b: Budget) -> dict[str, Any]:
    """The static pass over the corpus (bench/static.py) and the read-only fast path end to end."""
    sys.path.insert(0, str(HERE))
    import static  # bench/static.py

    out: dict[str, Any] = {"corpus": static.run(runs=2 if b.runs < 100 else 5, rules=500)}
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        daemon = start_daemon(base / "default-policy")  # the shipped default policy
        try:
            with Client(daemon.socket) as c:
                for command in ("ls -la", "git status --short"):
                    times, skipped = [], 0
                    for i in range(b.warmup + b.runs):
                        t0 = time.perf_counter()
                        v = c.validate(command, cwd=daemon.workspace)
                        if i >= b.warmup:
                            times.append(time.perf_counter() - t0)
                            skipped += v.dry_run_skip is DryRunSkip.READ_ONLY
                    out[f"fast_path {command}"] = {
                        "client_ms": summarize(times),
                        "fast_path_runs": f"{skipped}/{b.runs}",
                    }
        finally:
            daemon.stop()
    return out


def print_static(s: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    import static

    print("\n7. The static pass (bench/static.py over tests/corpus) and the read-only fast path\n")
    print(static.table(s["corpus"]))
    print()
    for name, row in s.items():
        if name.startswith("fast_path"):
            ms = row["client_ms"]
            print(
                f"  Validate({name.removeprefix('fast_path ')!r}) end to end, read-only fast path:"
                f" p50 {ms['p50']:.2f} ms, p90 {ms['p90']:.2f}, p99 {ms['p99']:.2f}"
                f" ({row['fast_path_runs']} skipped the sandbox; target p50 <= 2 ms)"
            )


def main() -> int:
    p = argparse.ArgumentParser(description="Airlock's benchmark (make bench).")
    p.add_argument("--quick", action="store_true", help="fewer runs: a smoke test, ~30 s")
    p.add_argument("--runs", type=int, default=None, help="runs per latency series")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root (namespaces, overlayfs, cgroups)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    b = budget(a.quick, a.runs)
    r = run(b, a.quick)
    r["static"] = run_static(b)
    sys.path.insert(0, str(HERE))
    import execute  # bench/execute.py

    done = step("Execute and Apply (bench/execute.py)")
    r["execute"] = execute.measure(30, 3, 1) if a.quick else execute.measure(b.runs, 10, 3)
    done()
    import hook as hook_bench  # bench/hook.py

    done = step("airlock hook start-up (bench/hook.py)")
    r["hook"] = hook_bench.measure(10 if a.quick else 30)
    done()
    r["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print_report(r)
    print_static(r["static"])
    print()
    execute.print_report(r["execute"])
    print(
        format_table(
            "   Targets (Execute, streaming, Apply)",
            ["target", "goal", "measured", "met"],
            [
                [x["name"], x["goal"], x["measured"], "yes" if x["met"] else "NO"]
                for x in r["execute"]["targets"]
            ],
        )
    )
    hook_bench.print_report(r["hook"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\nWrote {out} in {r['meta']['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
