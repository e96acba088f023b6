"""Where a dry run's CPU goes outside the sandbox: figures docs/performance.md quotes.

Not a test; run as root: ``.venv/bin/python bench/costs.py
[engine|daemon|supervisors|audit|state|wakeups|memory|allocator|exec|split|creates]`` (all by
default).
Prints medians; nothing is asserted.

- ``engine``: ``Engine.validate`` of a forced ``true`` in this process (warm pool of 2, the
  neutral policy), 100 calls after 10: the engine's own CPU per validation (``process_time``:
  the spawner's and supervisors' are not in it), and an in-process ``Engine.execute`` of
  ``true`` (wall p50), beside the same ``validate`` (wall p50).
- ``daemon``: a real ``airlockd`` (the shipped policy), 200 forced ``true`` through the Python
  client after 20: the daemon process's CPU per validation (user, system) and the client's.
- ``supervisors``: the same daemon after 1, 50, 300 and 600 forced ``true`` and after one dry
  run of 10,000 created files: each supervisor's RSS and private memory (USS), MiB.
- ``audit``: 200 appends to a new audit log in ``/var/tmp`` (the disk), fsynced and not:
  wall p50/p90 and CPU p50 per append.
- ``state``: 300 new validations (each with a changeset, as ``echo hi > f`` leaves) recorded in
  a state store in ``/var/tmp`` as the daemon records them (no fsync), then 300 committed with
  the fsync (``synchronous=FULL``, as every other transition): wall p50/p90 per record.
- ``wakeups``: a real ``airlockd``, 60 Health calls after each of 0, 10 ms, 100 ms and 300 ms
  of quiet: wall p50/p90 (what waking the daemon's and the client's threads costs here).
- ``memory``: a real ``airlockd`` after 50 forced ``true``: RSS, PSS and USS of the daemon and
  its spawner, and RSS of both in MB (issue 16's row).
- ``allocator``: two real ``airlockd`` side by side, one with CPython's own small-object
  allocator (the default) and one with ``PYTHONMALLOC=malloc`` (glibc's, which the daemon's
  ``malloc_trim`` can give back): the daemon's CPU per call over alternating blocks (forced
  ``true``, 10 blocks of 100; 1,000 created files, 10 blocks of 5), then each daemon's RSS after
  ten dry runs of 10,000 created files and 200 more ``true``.
- ``exec``: the sandbox's init program as ``native/build.py`` builds it (musl when installed)
  and linked with glibc (``AIRLOCK_INIT_LIBC=glibc``), each started 400 times with
  ``posix_spawn`` (a missing argument: it stops at once), three rounds alternating: CPU per start
  and exit (``RUSAGE_CHILDREN``) and wall p50.
- ``split``: the whole machine's CPU per run, split by process and by user space against
  kernel, from ``perf record -a`` (skipped, said so, where ``perf`` is missing): a real
  ``airlockd`` (the shipped policy) running forced ``true`` back to back from one client, then
  ``bwrap`` (issue 16's arguments) running ``bash -c 'true; :'`` back to back, ``--seconds``
  each (8 by default). Processes are told apart by pid (this client, the daemon, its spawner,
  every other Python process: supervisors) and by name (the sandbox's init, ``bash``, bwrap,
  kernel threads); the idle loop is left out. What Python costs against what the kernel does.
- ``creates``: what overlayfs costs a command that creates files: ``bash`` creating 1,000
  files (issue 16's loop) in a tmpfs directory (what bwrap's row writes to) and in an overlay
  mount like a dry run's workspace (the upper layer on a tmpfs, the lower an empty directory on
  the disk), in a mount namespace of their own (``unshare -m``); rounds alternate, bash's own
  clock (``$EPOCHREALTIME``) around the loop, wall p50 per place.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil
from _bwrap import BWRAP
from _daemon import spawner_pid, started

from airlock.client import Client

_HERE = Path(__file__).resolve().parent
_ENV = {"PATH": "/usr/bin:/bin"}
_FORCED_TRUE = "true; :"  # not read-only under the shipped policy: the dry run decides


def engine() -> None:
    import _direct

    from airlock.core.request import check
    from airlock.types import ExecuteRequest

    with tempfile.TemporaryDirectory(prefix="airlock-costs-") as tmp:
        ws = os.path.join(tmp, "ws")
        os.mkdir(ws)
        w = _direct.Worker(os.path.join(tmp, "state"), ws, "true")
        try:
            for _ in range(10):
                w.engine.validate(w.request, uuid.uuid4().hex)
            time.sleep(0.5)
            c0 = time.process_time()
            walls = []
            for _ in range(100):
                t0 = time.perf_counter()
                w.engine.validate(w.request, uuid.uuid4().hex)
                walls.append(time.perf_counter() - t0)
            cpu_ms = (time.process_time() - c0) * 10
            print(f"engine: CPU per validation {cpu_ms:.2f} ms (this process only)")
            req = check(
                ExecuteRequest(command="true", cwd=ws, env=(), timeout_s=30.0),
                w.peer,
                w.config.limits,
            )
            execs = []
            for i in range(60):
                plan = w.engine.execute_plan(req, uuid.uuid4().hex)
                t0 = time.perf_counter()
                list(w.engine.execute(plan))
                if i >= 10:
                    execs.append(time.perf_counter() - t0)
            print(
                f"engine: execute wall p50 {statistics.median(execs) * 1e3:.2f} ms, "
                f"validate wall p50 {statistics.median(walls) * 1e3:.2f} ms"
            )
        finally:
            w.quit()


def _daemon(
    env: dict[str, str] | None = None,
) -> AbstractContextManager[tuple[subprocess.Popen[bytes], Client, str]]:
    return started(env=env, prefix="airlock-costs-")


def daemon() -> None:
    with _daemon() as (proc, c, ws):
        d = psutil.Process(proc.pid)
        for _ in range(20):
            c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True)
        time.sleep(1)
        n = 200
        t0, me0 = d.cpu_times(), time.process_time()
        for _ in range(n):
            c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True)
        t1, me1 = d.cpu_times(), time.process_time()
        print(
            f"daemon: process CPU per validation user {(t1.user - t0.user) / n * 1e3:.2f} ms, "
            f"system {(t1.system - t0.system) / n * 1e3:.2f} ms; "
            f"client {(me1 - me0) / n * 1e3:.2f} ms"
        )


def supervisors() -> None:
    with _daemon() as (proc, c, ws):

        def sample(after: str) -> None:
            time.sleep(1)
            pid = spawner_pid(proc.pid)
            assert pid is not None
            rows = [
                (p.memory_info().rss / 2**20, p.memory_full_info().uss / 2**20)
                for p in psutil.Process(pid).children()
            ]
            shown = ", ".join(f"{rss:.1f}/{uss:.1f}" for rss, uss in rows)
            print(f"supervisors after {after}: {len(rows)} (RSS/USS MiB: {shown})")

        done = 0
        for upto in (1, 50, 300, 600):
            while done < upto:
                c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True)
                done += 1
            sample(f"{done} calls")
        c.validate(
            "for i in $(seq 10000); do echo $i > f$i; done",
            cwd=ws,
            env=_ENV,
            force_dry_run=True,
            timeout=120,
        )
        sample("a dry run of 10,000 files")


def _p50_p90(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"p50 {statistics.median(ms):.2f} ms, p90 {ms[int(len(ms) * 0.9)]:.2f} ms"


def audit() -> None:
    from airlock.audit.log import AuditLog
    from airlock.audit.model import AuditEvent, Caller, RpcKind

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="airlock-costs-") as tmp:
        for fsync in (True, False):
            log = AuditLog(os.path.join(tmp, f"audit-{fsync}.sqlite3"), key=b"k" * 32, fsync=fsync)
            walls, cpus = [], []
            try:
                for i in range(200):
                    event = AuditEvent(kind=RpcKind.EXECUTE, caller=Caller(0, 0), command=f"c{i}")
                    t0, c0 = time.perf_counter(), time.process_time()
                    log.append(event)
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
            finally:
                log.close()
            print(
                f"audit append, fsync={fsync}: wall {_p50_p90([w * 1e3 for w in walls])}; "
                f"CPU p50 {statistics.median(cpus) * 1e3:.3f} ms"
            )


def ms(seconds: list[float]) -> list[float]:
    return [x * 1e3 for x in seconds]


def state() -> None:
    from airlock.core.state import NewValidation, StateStore
    from airlock.types import Verdict

    def new() -> NewValidation:
        vid = uuid.uuid4().hex
        return NewValidation(
            validation_id=vid,
            command="echo hi > f",
            cwd="/tmp",
            uid=0,
            gid=0,
            verdict=Verdict.ALLOW,
            diff_hash="ab" * 32,
            changeset_dir=f"/var/lib/airlock/changesets/{vid}",
            changeset_bytes=3,
        )

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="airlock-costs-") as tmp:
        store = StateStore.in_state_dir(tmp)
        try:
            for fsync in (False, True):
                if fsync:  # as every other transition commits: synchronous=FULL

                    def full(action: str, *, fsync: bool = True) -> Any:
                        return StateStore._write(store, action)

                    store._write = full  # type: ignore[method-assign]
                walls = []
                for _ in range(300):
                    rec = new()
                    t0 = time.perf_counter()
                    store.record_validation(rec)
                    walls.append(time.perf_counter() - t0)
                    time.sleep(0.003)  # not back to back: each commit finds the disk idle
                what = "with the fsync (FULL)" if fsync else "as Validate records it"
                print(f"state store, a new validation {what}: wall {_p50_p90(ms(walls))}")
        finally:
            store.close()


def allocator() -> None:
    files_1k = "for i in {1..1000}; do echo $i > f$i; done"
    files_10k = "for i in {1..10000}; do echo $i > f$i; done"
    envs = {"pymalloc": dict(os.environ), "malloc": {**os.environ, "PYTHONMALLOC": "malloc"}}
    envs["pymalloc"].pop("PYTHONMALLOC", None)
    with _daemon(envs["pymalloc"]) as a, _daemon(envs["malloc"]) as b:
        ds = {"pymalloc": a, "malloc": b}
        for line, blocks, block in ((_FORCED_TRUE, 10, 100), (files_1k, 10, 5)):
            cpu = dict.fromkeys(ds, 0.0)
            for _proc, c, ws in ds.values():
                for _ in range(block):
                    c.validate(line, cwd=ws, env=_ENV, force_dry_run=True)
            for r in range(blocks):
                order = list(ds.items()) if r % 2 == 0 else list(reversed(ds.items()))
                for name, (proc, c, ws) in order:
                    d = psutil.Process(proc.pid)
                    t0 = d.cpu_times()
                    for _ in range(block):
                        c.validate(line, cwd=ws, env=_ENV, force_dry_run=True)
                    t1 = d.cpu_times()
                    cpu[name] += t1.user + t1.system - t0.user - t0.system
            for name in ds:
                print(
                    f"allocator {name}: the daemon's CPU per call, {line[:24]!r}: "
                    f"{cpu[name] / (blocks * block) * 1e3:.2f} ms"
                )
        for name, (proc, c, ws) in ds.items():
            time.sleep(1.5)
            before = psutil.Process(proc.pid).memory_info().rss / 2**20
            for _ in range(10):
                c.validate(files_10k, cwd=ws, env=_ENV, force_dry_run=True, timeout=120)
            for _ in range(200):
                c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True)
            time.sleep(1.5)
            after = psutil.Process(proc.pid).memory_info().rss / 2**20
            print(
                f"allocator {name}: the daemon's RSS {before:.1f} MiB, then {after:.1f} MiB after "
                "ten 10,000-file dry runs and 200 more true"
            )


def wakeups() -> None:
    with _daemon() as (_proc, c, _ws):
        for gap in (0.0, 0.01, 0.1, 0.3):
            walls = []
            for _ in range(60):
                time.sleep(gap)
                t0 = time.perf_counter()
                c.health()
                walls.append((time.perf_counter() - t0) * 1e3)
            print(f"health after {gap * 1e3:g} ms of quiet: {_p50_p90(walls)}")


def memory() -> None:
    with _daemon() as (proc, c, ws):
        for _ in range(50):
            c.validate(_FORCED_TRUE, cwd=ws, env=_ENV)
        time.sleep(3)  # the spawner's tick, the daemon's trim
        pid = spawner_pid(proc.pid)
        rss = 0
        for name, p in (("daemon", proc.pid), ("spawner", pid)):
            if p is None:
                continue
            m = psutil.Process(p).memory_full_info()
            rss += m.rss
            print(
                f"{name}: RSS {m.rss / 2**20:.1f} MiB, PSS {m.pss / 2**20:.1f}, "
                f"USS {m.uss / 2**20:.1f}"
            )
        print(f"daemon + spawner: RSS {rss / 1e6:.1f} MB")


def exec_() -> None:
    import importlib.util
    import resource

    spec = importlib.util.spec_from_file_location("native_build", _HERE.parent / "native/build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with tempfile.TemporaryDirectory(prefix="airlock-costs-") as tmp:
        programs = {}
        for libc in ("", "glibc"):
            os.environ["AIRLOCK_INIT_LIBC"] = libc
            out = os.path.join(tmp, f"init-{libc or 'default'}")
            programs[build.build(out)] = out
        os.environ.pop("AIRLOCK_INIT_LIBC")
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for _ in range(3):
                for libc, path in programs.items():
                    r0, walls = resource.getrusage(resource.RUSAGE_CHILDREN), []
                    for _ in range(400):
                        t0 = time.perf_counter()
                        pid = os.posix_spawn(
                            path,
                            [path, "--proc"],
                            {},
                            file_actions=[(os.POSIX_SPAWN_DUP2, null, 11)],
                        )
                        os.waitpid(pid, 0)
                        walls.append((time.perf_counter() - t0) * 1e3)
                    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                    print(
                        f"init linked with {libc}: CPU {cpu / 400 * 1e6:.0f} µs per start, "
                        f"wall p50 {statistics.median(walls) * 1e3:.0f} µs"
                    )
        finally:
            os.close(null)


_PERF_HZ = 1999
_KTHREADS = ("kworker", "ksoftirqd", "rcu_", "migration", "kcompactd", "kdamond", "kswapd")


def _perf_samples(run: Callable[[], object], seconds: float, data: str) -> tuple[int, list[str]]:
    """Call ``run`` back to back for ``seconds`` under ``perf record -a``: (calls, samples as
    ``comm pid ip (dso)`` lines)."""
    rec = subprocess.Popen(
        ["perf", "record", "-a", "-F", str(_PERF_HZ), "-o", data, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # perf is recording
    calls, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        run()
        calls += 1
    rec.send_signal(signal.SIGINT)
    rec.wait()
    out = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,pid,ip,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return calls, out.splitlines()


def _split_print(
    title: str, calls: int, lines: list[str], classify: Callable[[str, int], str]
) -> None:
    per: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in lines:
        head, sep, dso = line.rpartition(" (")
        if not sep:
            continue
        comm, _, pid = head.strip().rsplit(" ", 1)[0].rstrip().rpartition(" ")
        comm = comm.strip()
        if comm == "swapper":
            continue  # the idle loop
        who = classify(comm, int(pid)) if pid.isdigit() else "other"
        per[(who, "kernel" if "kernel" in dso else "user")] += 1
    ms = 1e3 / _PERF_HZ / calls  # one sample is 1/_PERF_HZ s of one CPU
    print(f"{title}: {calls} runs; CPU per run, ms (user + kernel)")
    total = 0.0
    for who in sorted({w for w, _ in per}, key=lambda w: -(per[(w, "user")] + per[(w, "kernel")])):
        u, k = per[(who, "user")] * ms, per[(who, "kernel")] * ms
        total += u + k
        print(f"  {who:<22} {u:6.2f} + {k:6.2f} = {u + k:6.2f}")
    print(f"  {'all':<22} {total:23.2f}")


def split(seconds: float) -> None:
    if shutil.which("perf") is None or shutil.which("bwrap") is None:
        print("split: skipped (perf or bwrap is not installed)")
        return
    me = os.getpid()

    def kernel_thread(comm: str) -> bool:
        return comm.startswith(_KTHREADS)

    with tempfile.TemporaryDirectory(prefix="airlock-split-") as tmp, _daemon() as (proc, c, ws):
        for _ in range(30):
            c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True)
        time.sleep(1)
        spawner = spawner_pid(proc.pid)

        def airlock_of(comm: str, pid: int) -> str:
            if kernel_thread(comm):
                return "kernel threads"
            if pid == me:
                return "client (Python)"
            if pid == proc.pid:
                return "daemon (Python)"
            if pid == spawner:
                return "spawner (Python)"
            if comm.startswith("python"):
                return "supervisors (Python)"
            if comm.startswith("airlock-sandbox"):
                return "sandbox init (C)"
            if comm == "bash":
                return "command (bash)"
            return "other"

        calls, lines = _perf_samples(
            lambda: c.validate(_FORCED_TRUE, cwd=ws, env=_ENV, force_dry_run=True),
            seconds,
            os.path.join(tmp, "airlock.data"),
        )
        _split_print("airlock, forced `true`", calls, lines, airlock_of)

    def bwrap_of(comm: str, pid: int) -> str:
        if kernel_thread(comm):
            return "kernel threads"
        if pid == me:
            return "launcher (Python)"
        if comm == "bwrap":
            return "bwrap (C)"
        if comm == "bash":
            return "command (bash)"
        return "other"

    argv = [*BWRAP, "bash", "-c", _FORCED_TRUE]
    with tempfile.TemporaryDirectory(prefix="airlock-split-") as tmp:
        for _ in range(30):
            subprocess.run(argv, check=True)
        calls, lines = _perf_samples(
            lambda: subprocess.run(argv, check=True), seconds, os.path.join(tmp, "bwrap.data")
        )
        _split_print("bwrap, `true`", calls, lines, bwrap_of)


_CREATES = """set -e
base=$1
mount -t tmpfs tmpfs "$base/t"
mkdir "$base/t/upper" "$base/t/work" "$base/t/plain"
mount -t overlay overlay -o "lowerdir=$base/lower,upperdir=$base/t/upper,workdir=$base/t/work" \
  "$base/merged"
for dir in "$base/$2" "$base/$3"; do
  cd "$dir"
  s=$EPOCHREALTIME
  for i in $(seq 1000); do echo $i > f$i; done
  e=$EPOCHREALTIME
  echo "${dir##*/} $s $e"
done
"""


def creates(rounds: int = 15) -> None:
    if shutil.which("unshare") is None:
        print("creates: skipped (unshare is not installed)")
        return
    walls: dict[str, list[float]] = {"tmpfs": [], "overlay": []}
    with tempfile.TemporaryDirectory(prefix="airlock-creates-", dir="/var/tmp") as base:
        for d in ("t", "lower", "merged"):
            os.mkdir(os.path.join(base, d))
        for r in range(rounds):
            order = ("t/plain", "merged") if r % 2 else ("merged", "t/plain")
            out = subprocess.run(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "bash",
                    "-c",
                    _CREATES,
                    "-",
                    base,
                    *order,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for line in out.splitlines():
                name, start, end = line.split()
                key = "tmpfs" if name == "plain" else "overlay"
                walls[key].append((float(end) - float(start)) * 1e3)
    for key, ms in walls.items():
        print(f"1,000 files created by bash in {key}: {_p50_p90(ms)}")
    t, o = statistics.median(walls["tmpfs"]), statistics.median(walls["overlay"])
    print(f"overlay / tmpfs: {o / t:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "what",
        nargs="*",
        choices=[
            "engine",
            "daemon",
            "supervisors",
            "audit",
            "state",
            "wakeups",
            "memory",
            "allocator",
            "exec",
            "split",
            "creates",
            [],
        ],
    )
    p.add_argument("--seconds", type=float, default=8.0, help="split: seconds of calls per side")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: namespaces, overlayfs and cgroups need it")
    os.chdir(_HERE.parent)  # _direct.Worker finds the neutral policy from here
    steps: dict[str, Callable[[], None]] = {
        "engine": engine,
        "daemon": daemon,
        "supervisors": supervisors,
        "audit": audit,
        "state": state,
        "wakeups": wakeups,
        "memory": memory,
        "allocator": allocator,
        "exec": exec_,
        "split": lambda: split(a.seconds),
        "creates": creates,
    }
    for name in a.what or list(steps):
        steps[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
