"""The soak: many mixed dry runs from several clients against one real daemon.

``make soak`` runs it (``SOAK_CALLS`` calls, 5,000 by default; CI runs a bounded count). The
calls are a fixed mix: read-only lines (some of them 127 KiB long: the static pass alone judges
those), writes in a workspace, network attempts, commands the policy denies, commands that
fail, and a script the static pass cannot judge. It checks what issue 15 asks of a long run:

* nothing leaks: no mount, cgroup, process or file descriptor of the daemon's is left over
  (compared once the daemon is idle again, and again after it stopped);
* every answered call is in the audit log (by validation id), and the log verifies;
* the daemon's memory does not grow with the number of calls: its RSS is sampled every
  ``SOAK_SAMPLE_EVERY`` calls after a warm-up, and the least-squares slope, in MB per 1,000
  calls, must stay under ``SOAK_RSS_SLOPE_MAX`` (``RSS_SLOPE_MAX`` below says why that value).

The figures (calls, duration, slope, leaks) are printed (``-s`` shows them) and written to
``soak.json`` in the test's temporary directory; ``SOAK_REPORT=PATH`` writes them there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airlock._errors import AirlockError
from airlock.audit import AuditFilter
from airlock.core.config import DaemonConfig
from airlock.types import Verdict
from tests.helpers import TEST_LIMITS, Daemon, airlock_cgroups, mount_table, running_daemon

CALLS = int(os.environ.get("SOAK_CALLS", "5000"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "4"))
# RSS is read every SAMPLE_EVERY calls; the first WARMUP calls are not part of the fit (the
# daemon's caches, gRPC's buffers and the allocator's arenas fill up first).
SAMPLE_EVERY = int(os.environ.get("SOAK_SAMPLE_EVERY", str(max(10, CALLS // 100))))
WARMUP = int(os.environ.get("SOAK_WARMUP", str(max(2 * SAMPLE_EVERY, CALLS // 10))))
# The largest RSS slope allowed, MB per 1,000 calls: 1.0 for 6,000 calls or more, looser for
# short runs, whose fit is noisier (RSS wanders by a megabyte or two whatever the run does, and
# the span of calls it is fitted over shrinks with the run): 6,000 / SOAK_CALLS. Measured on
# this project's 2-core VM (docs/threat-model.md, "Reliability"), with one call in ten a
# 127 KiB line: with the parser's leak (py-tree-sitter keeping each object its read callback
# returned) 18.7 at 400 calls and 13.8 at 2,000; with SQLite's page caches filling (three
# connections, 2 MB each by default) 0.39 at 2,000, 0.94 and 1.9 at 5,000, 0.75 at 10,000;
# with both fixed -0.16 at 5,000 and -0.21 at 10,000. SOAK_RSS_SLOPE_MAX overrides it.
RSS_SLOPE_MAX = float(os.environ.get("SOAK_RSS_SLOPE_MAX", str(max(1.0, 6000 / CALLS))))
# Warm sandboxes (and the pool's memory of a burst) idle out after this many seconds.
WARM_IDLE_S = 3
# Descriptors the idle daemon may hold more after the run than before (gRPC's pollers).
FD_SLACK = 0
# The long read-only line: just under the 128 KiB command limit (SOAK_LARGE_BYTES to change it).
LARGE_LINE = "echo " + "x" * int(os.environ.get("SOAK_LARGE_BYTES", str(127 * 1024)))


@dataclass(frozen=True)
class Kind:
    name: str
    command: Callable[[int], str]
    # What the verdict must be; None: whatever the policy says (it is not what is soaked).
    verdict: Verdict | None = None


MIX = (
    Kind("read-only", lambda i: "ls /etc && cat /etc/hostname", Verdict.ALLOW),
    Kind("read-only-128k", lambda i: LARGE_LINE, Verdict.ALLOW),
    Kind("write", lambda i: f"echo {i} > out-{i}.txt && cat out-{i}.txt"),
    Kind("network", lambda i: "timeout 5 bash -c 'echo hi > /dev/tcp/192.0.2.1/80'"),
    Kind("denied", lambda i: "sudo reboot", Verdict.DENY),
    Kind("failing", lambda i: f"cat /nonexistent-{i} > err-{i}.txt; exit 3"),
    Kind("script", lambda i: f'python3 -c "print(sum(range({i})))"'),
    Kind("read-only", lambda i: "grep -c root /etc/passwd", Verdict.ALLOW),
    Kind("write", lambda i: f"mkdir -p d-{i} && echo x > d-{i}/f && rm -rf d-{i}"),
    Kind("read-only", lambda i: "wc -l /etc/passwd /etc/group", Verdict.ALLOW),
)


@dataclass
class Run:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    answered: dict[str, str] = field(default_factory=dict)  # validation id -> kind
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    warm: int = 0  # dry runs a warm sandbox served
    rss: list[tuple[int, int]] = field(default_factory=list)  # (calls done, RSS in bytes)


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (the spawner, the sandboxes), with its start time."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            found[p] = _start_time(p)
        todo += children.get(p, ())
    return found


def daemon_cgroups(daemon: Daemon) -> set[str]:
    """The daemon's parent cgroups (one per controller; other daemons have their own)."""
    group = DaemonConfig(state_dir=daemon.state_dir).cgroup_group
    return {c for c in airlock_cgroups() if Path(c).name == group}


def sandbox_cgroups(parents: set[str]) -> set[str]:
    """The cgroups below the daemon's parent groups: one per live sandbox."""
    found = set()
    for parent in parents:
        with contextlib.suppress(OSError):
            found |= {str(p) for p in Path(parent).iterdir() if p.is_dir()}
    return found


def ours(mounts: set[str], base: Path) -> set[str]:
    """The mounts a leak of this daemon's would be: below its directory, or an overlay (the
    host has none of its own here). Other tests on the host come and go with theirs."""
    return {m for m in mounts if str(base) in m or " - overlay " in m}


def wait_gone(processes: dict[int, str], guard_s: float = 15) -> set[int]:
    """Processes still alive as they were: sandboxes torn down as the daemon stopped may
    take a moment; the guard only stops a hang."""
    deadline = time.monotonic() + guard_s
    while True:
        alive = {p for p, start in processes.items() if _alive_as(p, start)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def slope_mb_per_1000(samples: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS over calls, in MB (10^6 bytes) per 1,000 calls."""
    xs = [float(x) for x, _ in samples]
    ys = [float(y) for _, y in samples]
    return statistics.linear_regression(xs, ys).slope * 1000 / 1e6


def test_the_slope_is_least_squares() -> None:
    # The fit the soak's verdict rests on: exact on a line, and blind to a constant offset.
    line = [(x, 5_000_000 + 2_000 * x) for x in range(0, 1000, 10)]
    assert abs(slope_mb_per_1000(line) - 2.0) < 1e-9
    flat = [(x, 80_000_000 + (1_000_000 if x % 20 else -1_000_000)) for x in range(0, 1000, 10)]
    assert abs(slope_mb_per_1000(flat)) < 0.1  # +-1 MB noise: 0.06 from the parity


def wait_idle(
    daemon: Daemon,
    parents: set[str],
    processes: int,
    groups: int | None = None,
    guard_s: float = 90,
) -> tuple[dict[int, str], set[str]]:
    """Wait until the daemon has ``processes`` processes below it again (the warm pool
    refilled, every dry run's supervisor gone) and, if given, ``groups`` sandbox cgroups; both
    the same 1.5 s later (the spawner's tick: nothing on its way; warm sandboxes that idle out
    are replaced, so one sample may catch a replacement half done). The guard only stops a
    hang."""
    deadline = time.monotonic() + guard_s
    while True:
        now, cgs = descendants(daemon.proc.pid), sandbox_cgroups(parents)
        if len(now) == processes and groups in (None, len(cgs)):
            time.sleep(1.5)
            again, cgs_again = descendants(daemon.proc.pid), sandbox_cgroups(parents)
            if len(again) == processes and len(cgs_again) == len(cgs):
                return again, cgs_again
            now, cgs = again, cgs_again
        assert time.monotonic() < deadline, (
            f"the daemon did not settle: {len(now)} processes below it, {processes} when idle; "
            f"{len(cgs)} sandbox cgroups, {groups} when idle"
        )
        time.sleep(0.2)


def settled_count(daemon: Daemon) -> int:
    """How many processes are below the idle daemon (spawner and full warm pool)."""
    counts = []
    for _ in range(6):
        counts.append(len(descendants(daemon.proc.pid)))
        time.sleep(0.5)
    return max(set(counts), key=counts.count)


def client_loop(daemon: Daemon, workspace: Path, run: Run, n: int, worker: int) -> None:
    with daemon.client() as c:
        c.timeout = 120
        for k in range(n):
            i = k * CLIENTS + worker
            kind = MIX[i % len(MIX)]
            try:
                v = c.validate(kind.command(i), cwd=str(workspace))
            except AirlockError as exc:
                with run.lock:
                    run.errors.append(f"{kind.name}: {exc}")
                    run.done += 1
                continue
            with run.lock:
                run.answered[v.validation_id] = kind.name
                run.verdicts[f"{kind.name}:{v.verdict.name}"] += 1
                run.warm += v.timings.warm
                if kind.verdict is not None and v.verdict is not kind.verdict:
                    run.wrong.append(f"{kind.name}: {v.verdict.name} ({v.summary[:200]})")
                run.done += 1
                if run.done % SAMPLE_EVERY == 0:
                    run.rss.append((run.done, rss_of(daemon.proc.pid)))


@contextlib.contextmanager
def soak_daemon(base: Path) -> Iterator[Daemon]:
    # Room for every client at once; the default policy, so some commands are denied. Warm
    # sandboxes idle out after WARM_IDLE_S: how many stay warm depends on how many clients
    # were busy at once lately (spawner._Pool.cap), so the process counts before and after
    # are compared once the pool is back to its idle size.
    with running_daemon(
        base,
        *TEST_LIMITS,
        "--max-concurrent",
        str(2 * CLIENTS),
        "--warm-idle",
        str(WARM_IDLE_S),
    ) as d:
        yield d


# ~30 calls a second on 2 cores; the guard only stops a hang.
@pytest.mark.timeout(300 + CALLS)
def test_soak(tmp_path: Path, public_tmp: Path) -> None:
    assert CALLS >= 10 * SAMPLE_EVERY, "too few calls for a slope: raise SOAK_CALLS"
    mounts_before = set(mount_table())
    workspace = public_tmp / "ws"
    workspace.mkdir()
    os.chmod(workspace, 0o777)
    report: dict[str, object] = {"calls": CALLS, "clients": CLIENTS}
    with soak_daemon(public_tmp / "daemon") as daemon:
        # A few calls of each kind first, so the pool and the caches are as they will stay.
        with daemon.client() as c:
            for i in range(2 * len(MIX)):
                c.validate(MIX[i % len(MIX)].command(i), cwd=str(workspace))
        parents = daemon_cgroups(daemon)
        assert parents, "the daemon made no cgroup of its own"
        time.sleep(WARM_IDLE_S + 1.5)  # the warm-up's extra warm sandboxes idle out
        idle = settled_count(daemon)
        baseline, sandboxes_before = wait_idle(daemon, parents, idle)
        fds_before = fds_of(daemon.proc.pid)
        rss_start = rss_of(daemon.proc.pid)

        run = Run()
        per_client = [CALLS // CLIENTS + (w < CALLS % CLIENTS) for w in range(CLIENTS)]
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=client_loop, args=(daemon, workspace, run, n, w))
            for w, n in enumerate(per_client)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        duration = time.monotonic() - t0
        rss_end = rss_of(daemon.proc.pid)

        after, sandboxes_after = wait_idle(daemon, parents, len(baseline), len(sandboxes_before))
        fds_after = fds_of(daemon.proc.pid)
        # Every answered call is in the audit log, and the log verifies.
        with daemon.client() as c:
            c.timeout = 300
            audited = {
                s.event.validation_id
                for s in c.audit_events(AuditFilter(since_ns=0))
                if s.event.validation_id
            }
            verified = c.verify_audit_log()
    # The daemon stopped (running_daemon checked it exited 0): nothing of it may remain.
    survivors = wait_gone(after)
    left_cgroups = {c for c in parents if os.path.exists(c)}
    new_mounts = ours(set(mount_table()) - mounts_before, public_tmp)

    fit = [(x, y) for x, y in run.rss if x > WARMUP]
    slope = slope_mb_per_1000(fit) if len(fit) >= 3 else float("nan")
    missing = set(run.answered) - audited
    report.update(
        duration_s=round(duration, 1),
        calls_per_s=round(CALLS / duration, 1),
        answered=len(run.answered),
        errors=len(run.errors),
        rss_start_mb=round(rss_start / 1e6, 1),
        rss_end_mb=round(rss_end / 1e6, 1),
        rss_samples=len(fit),
        rss_slope_mb_per_1000_calls=round(slope, 3),
        rss_slope_max=RSS_SLOPE_MAX,
        leaked_fds=fds_after - fds_before,
        leaked_processes=len(after) - len(baseline) + len(survivors),
        leaked_cgroups=len(sandboxes_after) - len(sandboxes_before) + len(left_cgroups),
        leaked_mounts=len(new_mounts),
        warm=run.warm,
        unaudited=len(missing),
        audit_events_checked=verified.events,
        verdicts=dict(sorted(run.verdicts.items())),
        rss_mb_by_calls=[(x, round(y / 1e6, 1)) for x, y in fit],
    )
    text = json.dumps(report, indent=2)
    print(f"\nsoak: {text}")
    (tmp_path / "soak.json").write_text(text)
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(text)

    assert not run.errors, f"{len(run.errors)} calls failed: {run.errors[:5]}"
    assert not run.wrong, f"{len(run.wrong)} unexpected verdicts: {run.wrong[:5]}"
    assert len(run.answered) == CALLS
    assert not missing, f"{len(missing)} answered calls are not in the audit log"
    assert verified.ok and verified.problem is None, verified
    assert fds_after - fds_before <= FD_SLACK, (fds_before, fds_after)
    assert len(after) == len(baseline), (baseline, after)
    assert not survivors, f"processes outlived the daemon: {sorted(survivors)}"
    # The warm pool's sandboxes are new ones, as many as before.
    assert len(sandboxes_after) == len(sandboxes_before), (sandboxes_before, sandboxes_after)
    assert not left_cgroups, f"the daemon's cgroups outlived it: {left_cgroups}"
    assert not new_mounts, f"mounts left on the host: {new_mounts}"
    assert slope < RSS_SLOPE_MAX, (
        f"daemon RSS grows by {slope:.2f} MB per 1,000 calls (limit {RSS_SLOPE_MAX}): {fit}"
    )


def _alive_as(pid: int, start: str) -> bool:
    try:
        return _start_time(pid) == start
    except OSError:
        return False
