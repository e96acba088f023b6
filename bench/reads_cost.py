"""What sensitive-read capture (airlock.sandbox.reads) costs an open-heavy command.

Run as root: ``.venv/bin/python bench/reads_cost.py [RUNS]``. A forked child
unshares its mount namespace and mounts a tmpfs and an overlay of the host's
``/`` (the production options); each run forks a command process that, like the
sandbox's init, unshares a copy of the mount namespace and pivots into the
overlay, then runs ``bash -c COMMAND``. Runs rotate through three modes:
``without`` a recorder; ``polled``: a :class:`ReadRecorder` (FAN_MARK_FILESYSTEM
on the overlay) that the harness polls while the command runs, as the
supervisor's loop would; ``deferred``: the recorder is only drained after the
command exits (the command's own share of the cost: the kernel queueing events,
with no reader competing for a CPU). Reported per
mode: the command's wall time (fork to exit), the harness's CPU time (handling
events), events seen, and whether the kernel's queue overflowed. Nothing
outlives the child.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import select
import sys
import tempfile
import time

from airlock.sandbox import _syscalls as sc
from airlock.sandbox.reads import DEFAULT_SENSITIVE_GLOBS, ReadRecorder

COMMAND = "find /usr -type f -print0 | head -z -n 5000 | xargs -0 cat > /dev/null"
OPTIONS = "redirect_dir=off,index=off,metacopy=off,xino=off"


def _command(merged: str) -> None:
    try:
        sc.unshare(sc.CLONE_NEWNS)
        os.chdir(merged)
        os.makedirs("old-root", exist_ok=True)
        sc.pivot_root(".", "old-root")
        os.chdir("/")
        sc.umount2("/old-root", sc.MNT_DETACH)
        env = {"PATH": "/usr/bin:/bin"}
        os.execve("/bin/bash", ["bash", "-c", COMMAND], env)
    finally:
        os._exit(127)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _one(merged: str, mode: str) -> dict[str, float]:
    recorder = (
        ReadRecorder([(merged, "/")], DEFAULT_SENSITIVE_GLOBS, "/root")
        if mode != "without"
        else None
    )
    cpu0, t0 = _cpu(), time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _command(merged)
    status = None
    if mode == "polled":
        assert recorder is not None
        poller = select.poll()
        poller.register(recorder.fileno(), select.POLLIN)
        while status is None:
            for _fd, _ev in poller.poll(5):
                recorder.handle()
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
    else:
        _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    events, overflowed = 0.0, 0.0
    if recorder is not None:
        while recorder.handle():
            pass
        events, overflowed = float(recorder.events), float(recorder.overflowed)
        recorder.close()
    total = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "wall_with_drain_s": total,
        "harness_cpu_s": _cpu() - cpu0,
        "events": events,
        "overflowed": overflowed,
        "exit": float(os.waitstatus_to_exitcode(status)),
    }


MODES = ("without", "polled", "deferred")


def _child(runs: int, scratch: str) -> list[tuple[str, dict[str, float]]]:
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=700,size=64m")
    for name in ("upper", "work", "merged"):
        os.mkdir(f"{scratch}/{name}")
    merged = f"{scratch}/merged"
    data = f"lowerdir=/,upperdir={scratch}/upper,workdir={scratch}/work,{OPTIONS}"
    sc.mount("overlay", merged, "overlay", 0, data)
    sc.mount("/dev", f"{merged}/dev", None, sc.MS_BIND | sc.MS_REC)  # /dev/null; not overlaid
    for mode in MODES:  # warm the page cache and dentry cache
        _one(merged, mode)
    results = []
    for _ in range(runs):
        for mode in MODES:
            results.append((mode, _one(merged, mode)))
    return results


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            with os.fdopen(w, "wb") as f:
                pickle.dump(_child(runs, tmp), f)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            results: list[tuple[str, dict[str, float]]] = pickle.loads(f.read())
        os.waitpid(pid, 0)
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rows = [m for c, m in results if c == mode]
        walls = sorted(m["wall_s"] for m in rows)
        summary[mode] = {
            "runs": len(rows),
            "wall_ms_median": round(walls[len(walls) // 2] * 1000, 1),
            "wall_ms_min": round(walls[0] * 1000, 1),
            "wall_ms_max": round(walls[-1] * 1000, 1),
            "drain_ms_max": round(
                max(m["wall_with_drain_s"] - m["wall_s"] for m in rows) * 1000, 2
            ),
            "harness_cpu_ms_median": round(
                sorted(m["harness_cpu_s"] for m in rows)[len(rows) // 2] * 1000, 1
            ),
            "events_median": sorted(m["events"] for m in rows)[len(rows) // 2],
            "overflowed_runs": sum(m["overflowed"] for m in rows),
            "nonzero_exits": sum(1 for m in rows if m["exit"] != 0),
        }
    print(json.dumps({"command": COMMAND, **summary}, indent=2))


if __name__ == "__main__":
    main()
