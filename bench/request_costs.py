"""Per-request costs in a dry run's supervisor, the old way and the new way, interleaved.

Not a test; run as root: ``.venv/bin/python bench/request_costs.py [--rounds N]``.

The parent imports what the spawner imports and builds one real plan (``Engine.plan``, the
default policy, a ``true`` request as root in /tmp). Each round forks one child per variant,
round-robin, so that load from other processes hits every variant alike; each child measures
one first-time cost, as a supervisor forked by the spawner pays it, and reports its wall time
(``perf_counter``) and CPU time (``process_time``):

- ``globs-compile``: ``reads.compile_globs(globs, home)`` (what ReadRecorder did per request).
- ``globs-matcher``: ``reads.GlobMatcher(globs, home)`` after the parent ran
  ``reads.precompile(globs)`` (what the spawner does on its ``G`` message before forking).
- ``plan-full``: unpickling a whole ``SandboxPlan`` (what every supervisor did).
- ``plan-warm``: unpickling a ``PlanOnWire`` (the template stays bytes: a warm sandbox).
- ``plan-cold``: the same, then the template too (a cold supervisor).
- ``nft-process``: netcap's rules loaded by an ``nft -f -`` child process (what every
  sandbox's preparation did), in a fresh network namespace; CPU includes the child's.
- ``nft-library``: the same rules through libnftables (``_syscalls.nft_run``), the library
  loaded before the fork as the spawner does.
- ``nft-batch``: the same rules as netcap loads them now (``netcap._program_nftables``: the
  netlink batch built at import, sent as is; decisions section 36).

In the parent: pickling the plan for the wire, whole against ``PlanOnWire`` with the template's
pickle made once; and the matcher's cost per opened file (``fullmatch``), old against new.
Prints medians in ms (per-match figures in µs); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from airlock.core.config import DaemonConfig
from airlock.core.engine import Engine
from airlock.core.request import check
from airlock.policy.store import PolicyStore, default_policy_dir
from airlock.sandbox import _syscalls as sc
from airlock.sandbox import _wire, cgroup, contain, net, netcap, reads  # noqa: F401 (as the spawner)
from airlock.sandbox.plan import PlanOnWire, SandboxPlan
from airlock.sandbox.spawner import Spawner
from airlock.types import PeerCred, ValidateRequest

HOME = "/home/bench-user"


def _plan(state_dir: str) -> SandboxPlan:
    os.makedirs(os.path.join(state_dir, "scratch"), exist_ok=True)
    config = DaemonConfig(socket_path=os.path.join(state_dir, "s.sock"), state_dir=state_dir)
    engine = Engine(config, Spawner(pool=0), cgroup.detect(), PolicyStore(default_policy_dir()))
    request = ValidateRequest(command="true", cwd="/tmp", env=(), timeout_s=30.0)
    checked = check(request, PeerCred(pid=os.getpid(), uid=0, gid=0), config.limits)
    return engine.plan(checked, "bench")


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rules() -> bytes:
    """netcap's ruleset as it programs it (extra fields are ignored by format)."""
    group = getattr(netcap, "_NFLOG_GROUP", 0)
    return netcap._RULESET.format(dns=netcap._DNS_PORT, port=netcap.SINK_PORT, group=group).encode()


def _nft_process() -> None:
    rules = _rules()
    nft = shutil.which("nft") or "/usr/sbin/nft"
    subprocess.run([nft, "-f", "-"], input=rules, capture_output=True, check=True)


def _nft_library() -> None:
    sc.nft_run(_rules())


def _in_child(fn: Callable[[], object], netns: bool = False) -> tuple[float, float]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if netns:
                sc.unshare(sc.CLONE_NEWNET)
                net.loopback_up()
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            os.write(w, json.dumps([wall, cpu]).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    wall, cpu = json.loads(data)
    return wall, cpu


def _median_us(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return round(statistics.median(times) * 1e6, 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(tmp)
    globs, home = plan.run.sensitive_globs, HOME
    full = _wire.dumps(plan)
    template_body = _wire.dumps(plan.template)
    wire = _wire.dumps(PlanOnWire(plan.template_key, plan.run, template_body))
    n = _wire.HEADER_BYTES
    reads.precompile(globs)  # as the spawner does on "G", before it forks
    variants: dict[str, Callable[[], object]] = {
        "globs-compile": lambda: reads.compile_globs(globs, home),
        "globs-matcher": lambda: reads.GlobMatcher(globs, home),
        "plan-full": lambda: _wire.loads(full[n:]),
        "plan-warm": lambda: _wire.loads(wire[n:]),
        "plan-cold": lambda: _wire.loads(_wire.loads(wire[n:]).template[n:]),
        "nft-process": _nft_process,
        "nft-library": _nft_library,
        "nft-batch": netcap._program_nftables,
    }
    sc.load_libnftables()  # as the spawner did for nft-library
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(_in_child(fn, netns=name.startswith("nft")))
    out: dict[str, object] = {
        "globs": len(globs),
        "bytes": {"plan_full": len(full), "plan_on_wire_run_part": len(wire) - len(template_body)},
    }
    for name, rows in samples.items():
        out[name] = {
            "wall_ms_p50": round(statistics.median(w for w, _ in rows) * 1000, 3),
            "cpu_ms_p50": round(statistics.median(c for _, c in rows) * 1000, 3),
            "wall_ms_p90": round(sorted(w for w, _ in rows)[int(len(rows) * 0.9)] * 1000, 3),
        }
    out["daemon_pickle_us"] = {
        "whole_plan": _median_us(lambda: _wire.dumps(plan), 200),
        "plan_on_wire": _median_us(
            lambda: _wire.dumps(PlanOnWire(plan.template_key, plan.run, template_body)), 200
        ),
    }
    old, new = reads.compile_globs(globs, home), reads.GlobMatcher(globs, home)
    paths = [b"/usr/lib/x86_64-linux-gnu/libc.so.6", HOME.encode() + b"/.ssh/id_ed25519",
             HOME.encode() + b"/proj/src/main.py", b"/etc/shadow"]  # fmt: skip
    out["match_us_per_path"] = {
        "compile_globs": _median_us(lambda: [old.fullmatch(p) for p in paths], 2000) / 4,
        "matcher": _median_us(lambda: [new.fullmatch(p) for p in paths], 2000) / 4,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
