"""Execute and Apply through a real daemon: overhead, streaming rate, applying 1,000 files.

Run alone (``.venv/bin/python bench/execute.py [--quick]``, as root) or from ``bench/run.py``
(section 9). Starts its own daemon (neutral policy) in a temporary directory and removes it.

1. ``Execute("true")`` end to end from the Python client, against ``bash -c true`` and
   ``bwrap ... true`` run as subprocesses in the same run: the overhead is the difference
   of the medians.
2. Streaming: ``head -c 512M /dev/zero`` through Execute; MB/s as the client receives it.
3. Apply of a dry run that created 1,000 small files: the Apply RPC, end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bwrap import BWRAP
from _stats import format_table, ms, summarize

from airlock.client import Client
from airlock.types import ExecFinished, ExecOutput

HERE = Path(__file__).resolve().parent
AIRLOCKD = str(Path(sys.executable).with_name("airlockd"))
NEUTRAL_POLICY = str(HERE.parent / "tests" / "data" / "neutral-policy")
STREAM_BYTES = 512 * 1024**2
TARGETS = {"execute_overhead_ms": 10.0, "stream_mb_s": 100.0, "apply_1k_ms": 200.0}


def _time(fn: Any, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _subprocess(argv: list[str]) -> None:
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)


def execute_series(c: Client, command: str, cwd: str, runs: int, warmup: int) -> dict[str, Any]:
    """Time ``runs`` Execute calls of ``command`` (after ``warmup``), output read to the end."""
    warm = 0

    def once() -> None:
        nonlocal warm
        done = [e for e in c.execute(command, cwd=cwd) if isinstance(e, ExecFinished)]
        if not done or done[-1].exit_code != 0:
            raise RuntimeError(f"Execute({command!r}) failed: {done}")
        warm += done[-1].warm

    for _ in range(warmup):
        once()
    warm = 0
    return {"ms": summarize(_time(once, runs)), "warm_runs": warm}


def measure(runs: int = 100, apply_runs: int = 10, stream_runs: int = 3) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="airlock-bench-exec-"))
    os.chmod(base, 0o755)
    ws = base / "ws"
    ws.mkdir()
    sock = str(base / "airlock.sock")
    log = open(base / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [AIRLOCKD, "--socket", sock, "--state-dir", str(base / "state"),
         "--policy-dir", NEUTRAL_POLICY],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    r: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((base / "daemon.log").read_text())
            time.sleep(0.05)
        with Client(sock, timeout=120) as c:

            def execute_true() -> None:
                for e in c.execute("true", cwd=str(ws)):
                    if isinstance(e, ExecFinished) and e.exit_code != 0:
                        raise RuntimeError("true failed")

            for _ in range(5):
                execute_true()
            r["execute_true_ms"] = summarize(_time(execute_true, runs))
            r["bash_true_ms"] = summarize(_time(lambda: _subprocess(["bash", "-c", "true"]), runs))
            if shutil.which("bwrap"):
                r["bwrap_true_ms"] = summarize(_time(lambda: _subprocess([*BWRAP, "true"]), runs))
            r["execute_overhead_ms"] = round(
                r["execute_true_ms"]["p50"] - r["bash_true_ms"]["p50"], 3
            )

            rates = []
            for _ in range(stream_runs):
                got = 0
                t0 = time.perf_counter()
                for e in c.execute(f"head -c {STREAM_BYTES} /dev/zero", cwd=str(ws)):
                    if isinstance(e, ExecOutput):
                        got += len(e.data)
                elapsed = time.perf_counter() - t0
                if got != STREAM_BYTES:
                    raise RuntimeError(f"streamed {got} bytes, expected {STREAM_BYTES}")
                rates.append(got / elapsed / 1e6)
            r["stream_mb_s"] = {"runs": [round(x, 1) for x in rates], "median": round(
                sorted(rates)[len(rates) // 2], 1)}  # fmt: skip

            times = []
            for i in range(apply_runs):
                target = ws / f"apply{i}"
                target.mkdir()
                v = c.validate("for i in $(seq 1000); do echo $i > f$i; done", cwd=str(target))
                if len(v.changes) != 1000 or not v.changes_digest:
                    raise RuntimeError(f"the dry run kept {len(v.changes)} changes")
                t0 = time.perf_counter()
                out = c.apply(v.validation_id)
                times.append(time.perf_counter() - t0)
                if len(out.applied_paths) != 1000:
                    raise RuntimeError(f"applied {len(out.applied_paths)} paths")
            r["apply_1k_ms"] = summarize(times)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
    r["targets"] = targets(r)
    return r


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    over, rate = r["execute_overhead_ms"], r["stream_mb_s"]["median"]
    apply = r["apply_1k_ms"]["p50"]
    return [
        {"name": "Execute overhead over bash -c true, p50", "goal": "<= 10 ms",
         "measured": f"{over:.2f} ms", "met": over <= TARGETS["execute_overhead_ms"]},
        {"name": "stdout streaming through gRPC", "goal": ">= 100 MB/s",
         "measured": f"{rate:.0f} MB/s", "met": rate >= TARGETS["stream_mb_s"]},
        {"name": "Apply of 1,000 files, p50 (RPC end to end)", "goal": "<= 200 ms",
         "measured": f"{apply:.1f} ms", "met": apply <= TARGETS["apply_1k_ms"]},
    ]  # fmt: skip


def print_report(r: dict[str, Any]) -> None:
    rows = [
        [name, ms(r[key]), ms(r[key], "p90"), ms(r[key], "p99")]
        for name, key in (
            ("Execute('true'), client end to end", "execute_true_ms"),
            ("ref bash -c true", "bash_true_ms"),
            ("ref bwrap ... true", "bwrap_true_ms"),
            ("Apply of 1,000 created files", "apply_1k_ms"),
        )
        if key in r
    ]
    print(format_table("9. Execute and Apply (ms)", ["series", "p50", "p90", "p99"], rows))
    print(
        f"   Execute overhead (p50 - bash p50): {r['execute_overhead_ms']:.2f} ms;"
        f" streaming {STREAM_BYTES >> 20} MiB of stdout: {r['stream_mb_s']['median']} MB/s"
        f" (runs {r['stream_mb_s']['runs']})"
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    r = measure(30, 3, 1) if a.quick else measure()
    print_report(r)
    print(format_table("Targets", ["target", "goal", "measured", "met"],
                       [[t["name"], t["goal"], t["measured"], "yes" if t["met"] else "NO"]
                        for t in r["targets"]]))  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
