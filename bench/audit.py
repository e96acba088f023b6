"""The audit log's costs: append latency, verifying and listing a 1,000,000-event log.

Run alone (``.venv/bin/python bench/audit.py [--events N] [--out PATH]``) or from
``bench/run.py`` (``import audit; audit.print_report(audit.measure())``). Needs no root;
works in a temporary directory that it removes. Nothing is asserted: ``targets()``
compares the figures with the goals.

1. ``append`` latency (one event, one fsync) into a fresh keyed log, and again into
   the big log once it holds N events; 8 threads appending at once (throughput).
2. Generating N events with ``append_many`` in batches of 10,000 (one transaction each).
3. ``verify()`` of the N-event log (HMAC-keyed, the daemon's default).
4. ``list`` with filters on the N-event log: the first page of 100, and walking every
   page of one filter.
5. ``export_jsonl`` of the whole log, and the file's size.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _stats import format_table, ms, summarize

from airlock.audit import (
    Approval,
    AuditEvent,
    AuditFilter,
    AuditLog,
    Authorization,
    Caller,
    Outcome,
    RpcKind,
    RuleDecision,
    env_sha256,
)
from airlock.types import Verdict

TARGETS = {"append_p50_ms": 1.0, "verify_1m_s": 10.0}
BATCH = 10_000
THREADS = 8
RULES = [f"rule.{i:02d}" for i in range(50)]
RARE_RULE = "rule.rare"
T0 = 1_795_000_000_000_000_000


def synthetic_events(n: int, seed: int = 1, start: int = 0) -> Iterator[AuditEvent]:
    """Plausible events: 80% ALLOW, 15% ASK, 5% DENY; 0-2 findings; 1,000 sessions."""
    rnd = random.Random(seed)
    envs = [env_sha256([("PATH", "/usr/bin"), ("HOME", f"/home/u{i}")]) for i in range(10)]
    for i in range(start, start + n):
        r = rnd.random()
        verdict = Verdict.ALLOW if r < 0.8 else Verdict.ASK if r < 0.95 else Verdict.DENY
        findings = tuple(
            RuleDecision(rnd.choice(RULES), verdict) for _ in range(rnd.choice((0, 1, 1, 2)))
        )
        if i % 100_000 == 99_999:
            findings += (RuleDecision(RARE_RULE, Verdict.DENY),)
        kind = RpcKind(1 + i % 5)
        uid = 1000 + i % 10
        yield AuditEvent(
            kind=kind,
            caller=Caller(uid=uid, pid=10_000 + i % 30_000, gid=uid, exe="/usr/bin/python3.11"),
            command=f"git commit -am 'change {i}' && make -j4 test TARGET=t{i % 97}",
            cwd=f"/home/u{uid}/src/project{i % 7}",
            env_sha256=envs[i % 10],
            findings=findings,
            effects=f"{i % 13} files changed under the workspace, 0 outside",
            verdict=verdict,
            approval=(
                Approval(True, Authorization.SESSION_GRANTED, "grant 7")
                if kind == RpcKind.APPROVE
                else None
            ),
            outcome=Outcome(
                exit_code=0 if kind == RpcKind.EXECUTE else None,
                applied_paths=(f"/home/u{uid}/src/f{i}.py",) if kind == RpcKind.APPLY else (),
            ),
            validation_id=f"v-{i:012d}",
            session_id=f"s-{i % 1000:04d}",
            time_ns=T0 + i * 1_000_000,
        )


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def append_latency(log: AuditLog, n: int, seed: int) -> list[float]:
    events = list(synthetic_events(n, seed=seed))
    out = []
    for e in events:
        t = time.perf_counter()
        log.append(e)
        out.append(time.perf_counter() - t)
    return out


def fdatasync_latency(directory: Path, n: int) -> list[float]:
    """The device's floor: write 600 bytes and fdatasync, as the WAL does per commit."""
    path = directory / "fdatasync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        out = []
        for _ in range(n):
            os.write(fd, b"x" * 600)
            t = time.perf_counter()
            os.fdatasync(fd)
            out.append(time.perf_counter() - t)
        return out
    finally:
        os.close(fd)
        path.unlink()


def concurrent_appends(log: AuditLog, per_thread: int) -> dict[str, Any]:
    events = list(synthetic_events(THREADS * per_thread, seed=3))
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        mine = []
        for e in events[k::THREADS]:
            t = time.perf_counter()
            log.append(e)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    return {
        "threads": THREADS,
        "events": len(events),
        "per_s": round(len(events) / elapsed, 1),
        "latency": summarize(latencies),
    }


def list_filters(big_seq: int) -> dict[str, AuditFilter]:
    mid = T0 + (big_seq // 2) * 1_000_000
    return {
        "none": AuditFilter(),
        "verdict=DENY": AuditFilter(verdict=Verdict.DENY),
        "rule (common)": AuditFilter(rule_id=RULES[7]),
        "rule (rare, 10 events)": AuditFilter(rule_id=RARE_RULE),
        "session": AuditFilter(session_id="s-0421"),
        "uid": AuditFilter(uid=1003),
        "time (10% in the middle)": AuditFilter(
            since_ns=mid, until_ns=mid + (big_seq // 10) * 1_000_000
        ),
        "uid + verdict=DENY": AuditFilter(uid=1003, verdict=Verdict.DENY),
        "session + time": AuditFilter(session_id="s-0421", since_ns=mid),
    }


def measure_list(log: AuditLog, n: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in list_filters(n).items():
        first = [timed(functools.partial(log.list, f, 100)) for _ in range(reps)]
        token: str | None = None
        pages = matches = 0
        t = time.perf_counter()
        while True:
            page, token = log.list(f, page_size=1000, page_token=token)
            pages += 1
            matches += len(page)
            if token is None or pages >= 50:
                break
        walk = time.perf_counter() - t
        out[name] = {
            "first_page": summarize(first),
            "pages_walked": pages,
            "events_walked": matches,
            "walk_s": round(walk, 3),
            "complete": token is None,
        }
    return out


def measure(
    events: int = 1_000_000, appends: int = 2000, workdir: str | None = None
) -> dict[str, Any]:
    """Every figure of this benchmark, as a JSON-able dict."""
    base = Path(tempfile.mkdtemp(prefix="airlock-audit-bench-", dir=workdir))
    try:
        r: dict[str, Any] = {"events": events}
        small = base / "small"
        small.mkdir(mode=0o700)
        r["fdatasync"] = summarize(fdatasync_latency(small, min(appends, 500)))
        with AuditLog.in_state_dir(str(small)) as log:
            append_latency(log, 50, seed=9)  # warm-up
            r["append_fresh"] = summarize(append_latency(log, appends, seed=2))
            r["append_concurrent"] = concurrent_appends(log, max(1, appends // THREADS))
        nosync = base / "nosync"
        nosync.mkdir(mode=0o700)
        with AuditLog(nosync / "audit.sqlite3", fsync=False) as log:
            append_latency(log, 50, seed=9)
            r["append_nofsync"] = summarize(append_latency(log, appends, seed=2))
            r["append_concurrent_nofsync"] = concurrent_appends(log, max(1, appends // THREADS))

        big = base / "big"
        big.mkdir(mode=0o700)
        with AuditLog.in_state_dir(str(big)) as log:
            gen = synthetic_events(events, seed=1)
            t = time.perf_counter()
            done = 0
            while done < events:
                batch = [next(gen) for _ in range(min(BATCH, events - done))]
                log.append_many(batch)
                done += len(batch)
            r["generate_s"] = round(time.perf_counter() - t, 2)
            r["generate_per_s"] = round(events / r["generate_s"])
            r["db_bytes"] = sum(
                p.stat().st_size for p in big.iterdir() if p.name.startswith("audit.sqlite3")
            )

            t = time.perf_counter()
            result = log.verify()
            r["verify_s"] = round(time.perf_counter() - t, 2)
            r["verify_ok"] = result.ok and result.events == events

            r["list"] = measure_list(log, events, reps=5)
            r["append_big"] = summarize(append_latency(log, min(appends, 500), seed=4))

            sink = io.BytesIO()
            t = time.perf_counter()
            log.export_jsonl(sink)
            r["export_s"] = round(time.perf_counter() - t, 2)
            r["export_bytes"] = sink.getbuffer().nbytes
        return r
    finally:
        shutil.rmtree(base, ignore_errors=True)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    p50 = r["append_fresh"]["p50"]
    rows = [
        {"target": "append p50 (ms)", "goal": TARGETS["append_p50_ms"], "measured": p50},
        {"target": "verify 1M (s)", "goal": TARGETS["verify_1m_s"], "measured": r["verify_s"]},
    ]
    if r["events"] != 1_000_000:
        rows[1]["target"] = f"verify {r['events']:,} (s)"
    for row in rows:
        row["met"] = row["measured"] <= row["goal"]
    return rows


def print_report(r: dict[str, Any]) -> None:
    n = r["events"]
    qs = ("p50", "p90", "p99", "max")
    rows = [
        ["fdatasync of 600 bytes (the device)", *(ms(r["fdatasync"], q) for q in qs)],
        ["append, fresh log", *(ms(r["append_fresh"], q) for q in qs)],
        [
            f"append, {n:,}-event log",
            *(ms(r["append_big"], q) for q in ("p50", "p90", "p99", "max")),
        ],
        [
            f"append, {THREADS} threads",
            *(ms(r["append_concurrent"]["latency"], q) for q in qs),
        ],
        ["append, fsync=False", *(ms(r["append_nofsync"], q) for q in qs)],
        [
            f"append, fsync=False, {THREADS} threads",
            *(ms(r["append_concurrent_nofsync"]["latency"], q) for q in qs),
        ],
    ]
    print(format_table("Audit log: append (ms)", ["", "p50", "p90", "p99", "max"], rows))
    print(
        f"  {THREADS} threads: {r['append_concurrent']['per_s']:.0f} appends/s "
        f"({r['append_concurrent_nofsync']['per_s']:.0f}/s with fsync=False)"
    )
    mb = r["db_bytes"] / 1e6
    print(
        f"\nAudit log: {n:,} events generated in {r['generate_s']:.1f} s "
        f"({r['generate_per_s']:,}/s, batches of {BATCH:,}); file {mb:.0f} MB"
    )
    print(f"  verify: {r['verify_s']:.2f} s (intact: {r['verify_ok']})")
    print(f"  export_jsonl: {r['export_s']:.2f} s, {r['export_bytes'] / 1e6:.0f} MB")
    rows = [
        [
            name,
            ms(v["first_page"]),
            ms(v["first_page"], "max"),
            f"{v['events_walked']:,}{'' if v['complete'] else '+'}",
            f"{v['walk_s'] * 1000:.0f}",
        ]
        for name, v in r["list"].items()
    ]
    print(
        format_table(
            f"Audit log: list on {n:,} events (first page of 100: ms; walk: pages of 1,000,"
            " at most 50)",
            ["filter", "p50", "max", "walked", "walk ms"],
            rows,
        )
    )
    print()
    for t in targets(r):
        print(
            f"  {t['target']}: {t['measured']} (goal <= {t['goal']}): {'yes' if t['met'] else 'NO'}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--appends", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="where to make the temporary logs")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    r = measure(a.events, a.appends, a.dir)
    print_report(r)
    if a.out:
        Path(a.out).write_text(json.dumps({"audit": r, "targets": targets(r)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
