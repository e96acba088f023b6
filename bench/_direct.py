"""The benchmark's single-threaded worker: dry runs without the daemon, and cgroup costs.

``bench/run.py`` starts this as its own process because its own process has gRPC
threads (every ``Client`` creates some), and forking a threaded process is exactly
what the spawner exists to avoid. Here nothing imports grpc, so the process stays
single-threaded and may fork a supervisor directly.

Protocol: one command per line on stdin (``MODE RUNS``), one JSON object per line
on stdout. Modes:

* ``fork``: build a plan with ``Engine.plan``, fork a child that serves it cold with
  ``contain.serve_request`` (prepare, run, send the result on the socket), as the
  spawner's cold path does, but from this process instead of the helper.
* ``spawner-cold`` / ``spawner-warm``: the same plan through
  ``Spawner(pool=0 or 2).submit(plan).result()`` (no gRPC).
* ``engine``: ``Engine.validate`` with a warm pool of 2, as the daemon runs by default
  (plan, spawner, judge, summary; no gRPC), of ``--command`` (default ``true``).
* ``cg-GAP``: a fresh child writes "0" to ``cgroup.procs`` of a new cgroup (every
  hierarchy) after GAP milliseconds of quiet; cgroup creation and removal are timed too.
* ``quit``: stop the helper, remove this worker's cgroup group, report, exit.

Times are seconds, measured with ``time.perf_counter``; plan building is timed
apart from the run in ``fork`` and ``spawner``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any

from airlock.core.config import DaemonConfig
from airlock.core.engine import Engine
from airlock.core.request import check
from airlock.policy.store import PolicyStore
from airlock.sandbox import _wire, cgroup, contain
from airlock.sandbox.cgroup import Cgroup, CgroupSpec
from airlock.sandbox.plan import SandboxPlan
from airlock.sandbox.spawner import Spawner
from airlock.types import PeerCred, ValidateRequest

# The sandbox is measured with a policy that has no opinion, so every command is dry-run.
NEUTRAL_POLICY = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "neutral-policy"
)

_POOL = 2
_COMMAND = "true"


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_forked(plan: SandboxPlan) -> tuple[Any, int]:
    """Serve ``plan`` cold in a child forked from this (single-threaded) process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the supervisor
        try:
            ours.close()
            contain.serve_request(theirs, None)
        finally:
            os._exit(0)
    theirs.close()
    try:
        _wire.send(ours, plan)
        result = _wire.recv(ours)
    finally:
        ours.close()
    return result, pid


class Worker:
    def __init__(self, state_dir: str, cwd: str, command: str = _COMMAND) -> None:
        os.makedirs(os.path.join(state_dir, "scratch"), mode=0o700, exist_ok=True)
        self.config = DaemonConfig(
            socket_path=os.path.join(state_dir, "unused.sock"), state_dir=state_dir
        )
        self.host = cgroup.detect()
        self.cold = Spawner(pool=0)
        self.warm = Spawner(pool=_POOL)
        for spawner in (self.cold, self.warm):
            spawner.start()
        self.engine = Engine(self.config, self.warm, self.host, PolicyStore(NEUTRAL_POLICY))
        self.peer = PeerCred(pid=os.getpid(), uid=0, gid=0)
        request = ValidateRequest(command=command, cwd=cwd, env=(), timeout_s=30.0)
        self.request = check(request, self.peer, self.config.limits)
        self.failures: list[str] = []

    def _plan(self) -> tuple[SandboxPlan, float]:
        t0 = time.perf_counter()
        plan = self.engine.plan(self.request, uuid.uuid4().hex)
        return plan, time.perf_counter() - t0

    def _check(self, result: Any, mode: str) -> None:
        error = getattr(result, "error", "")
        code = result.exit_code
        if error or code != 0:
            self.failures.append(f"{mode}: exit {code} {error}".strip())

    def fork(self, runs: int) -> dict[str, Any]:
        times, plans = [], []
        for _ in range(runs):
            plan, plan_s = self._plan()
            t0 = time.perf_counter()
            result, pid = _run_forked(plan)
            times.append(time.perf_counter() - t0)
            plans.append(plan_s)
            os.waitpid(pid, 0)
            self._check(result, "fork")
        return {"run_s": times, "plan_s": plans, "threads": _threads()}

    def spawner_run(self, runs: int, warm: bool) -> dict[str, Any]:
        spawner = self.warm if warm else self.cold
        times, plans, warm_runs = [], [], 0
        for _ in range(runs):
            plan, plan_s = self._plan()
            t0 = time.perf_counter()
            result = spawner.submit(plan).result()
            times.append(time.perf_counter() - t0)
            plans.append(plan_s)
            warm_runs += bool(getattr(result, "warm", False))
            self._check(result, "spawner")
        return {"run_s": times, "plan_s": plans, "threads": _threads(), "warm_runs": warm_runs}

    def engine_run(self, runs: int) -> dict[str, Any]:
        times, diffs, sandbox_cpu, warm_runs = [], [], [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            validation = self.engine.validate(self.request, uuid.uuid4().hex)
            times.append(time.perf_counter() - t0)
            diffs.append(validation.timings.diff_s)
            # The sandbox's own cgroup: the command process from its join on (it leaves ours).
            sandbox_cpu.append(validation.resource_usage.cpu_time_s)
            warm_runs += bool(getattr(validation.timings, "warm", False))
            self._check(validation, "engine")
        return {
            "run_s": times,
            "diff_s": diffs,
            "sandbox_cpu_s": sandbox_cpu,
            "threads": _threads(),
            "warm_runs": warm_runs,
        }

    def cgroup_write(self, runs: int, gap_s: float) -> dict[str, Any]:
        """Time a fresh process's writes of "0" to cgroup.procs, as the command does.

        Each run sleeps ``gap_s`` first, makes a cgroup (timed), forks a child that
        writes "0" to the ``cgroup.procs`` of each hierarchy (each write timed) and
        exits, then removes the cgroup (timed).
        """
        first, total, create, remove = [], [], [], []
        limits = self.config.limits
        for _ in range(runs):
            if gap_s:
                time.sleep(gap_s)
            spec = CgroupSpec(
                self.host,
                self.config.cgroup_group,
                f"mig-{uuid.uuid4().hex[:16]}",
                limits.memory_bytes,
                limits.pids,
            )
            t0 = time.perf_counter()
            cg = Cgroup.create(spec)
            create.append(time.perf_counter() - t0)
            fds: list[int] = []
            try:
                fds = [
                    os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                    for d in cg.paths
                ]
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        spent = []
                        for fd in fds:
                            t0 = time.perf_counter()
                            os.write(fd, b"0")
                            spent.append(time.perf_counter() - t0)
                        os.write(w, struct.pack(f"{len(spent)}d", *spent))
                    finally:
                        os._exit(0)
                os.close(w)
                data = os.read(r, 8 * len(fds))
                os.close(r)
                os.waitpid(pid, 0)
                spent = list(struct.unpack(f"{len(data) // 8}d", data))
                if spent:
                    first.append(spent[0])
                    total.append(sum(spent))
            finally:
                for fd in fds:
                    os.close(fd)
                t0 = time.perf_counter()
                cg.remove()
                remove.append(time.perf_counter() - t0)
        return {
            "first_s": first,
            "total_s": total,
            "create_s": create,
            "remove_s": remove,
            "hierarchies": len({root for _, root in self.host.roots}),
        }

    def quit(self) -> dict[str, Any]:
        pids = [self.cold.pid, self.warm.pid]
        for spawner in (self.cold, self.warm):
            spawner.stop()
        removed = True
        try:
            time.sleep(0.2)  # retired warm sandboxes remove their own cgroups
            cgroup.remove_group(self.host, self.config.cgroup_group)
        except Exception:
            removed = not any(
                os.path.exists(os.path.join(root, self.config.cgroup_group))
                for _, root in self.host.roots
            )
        return {"failures": self.failures, "spawner_pids": pids, "group_removed": removed}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--command", default=_COMMAND, help="what `engine` dry-runs")
    a = p.parse_args()
    worker = Worker(a.state_dir, a.cwd, a.command)
    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply(
        {
            "ready": True,
            "pid": os.getpid(),
            "threads": _threads(),
            "python_threads": threading.active_count(),
            "grpc_imported": any(m == "grpc" or m.startswith("grpc.") for m in sys.modules),
            "rss_bytes": _rss_bytes(),
            "spawner_pids": [worker.cold.pid, worker.warm.pid],
            "cgroup_group": worker.config.cgroup_group,
        }
    )
    for line in sys.stdin:
        mode, _, arg = line.strip().partition(" ")
        runs = int(arg or "0")
        if mode == "fork":
            reply(worker.fork(runs))
        elif mode in ("spawner-cold", "spawner-warm"):
            reply(worker.spawner_run(runs, warm=mode == "spawner-warm"))
        elif mode == "engine":
            reply(worker.engine_run(runs))
        elif mode.startswith("cg-"):
            reply(worker.cgroup_write(runs, gap_s=float(mode[3:]) / 1000))
        elif mode == "quit":
            reply(worker.quit())
            return 0
        else:
            reply({"error": f"unknown mode {mode!r}"})
    with contextlib.suppress(Exception):
        worker.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
