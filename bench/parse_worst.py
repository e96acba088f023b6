"""The static pass on the worst command lines: peak memory and time of each shape.

Each shape of ``tests/unit/policy/shell_shapes.py`` (nested ``$(``, ``${``, ``<(``, deep
subshells, long pipelines, many here-documents, ...) is built as large as the daemon accepts
(131,072 bytes) and judged as the daemon judges it: ``analyze`` then the default policy's
``evaluate``. Each runs in a fresh child process, which reports its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) before and after, so that one shape's garbage never
counts against the next. The child's address space is capped (``--cap-mib``) so that a
regression fails here instead of taking the host down.

Prints a table and then one JSON object (the last line). Nothing is asserted here: the memory
bound is asserted by ``tests/unit/policy/test_shell_limits.py`` (with tracemalloc).

Usage: ``.venv/bin/python bench/parse_worst.py [--size BYTES] [--shape NAME ...]
[--cap-mib MIB] [--timeout S] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _stats import format_table  # noqa: E402

from tests.unit.policy.shell_shapes import COMMAND_LIMIT, SHAPES  # noqa: E402


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(name: str, size: int, cap_mib: int) -> dict[str, Any]:
    """In the child: judge one shape, report memory and time."""
    if cap_mib > 0:
        cap = cap_mib << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from airlock.policy.loader import load_bundle
    from airlock.policy.shell import analyze

    bundle = load_bundle(ROOT / "airlock" / "policy" / "default", run_tests=False)
    bundle.evaluate(analyze("ls -l | grep x > /dev/null"))  # warm: parser, caches
    command = SHAPES[name](size)
    before = _maxrss_kib()
    t0 = time.perf_counter()
    analysis = analyze(command)
    t1 = time.perf_counter()
    result = bundle.evaluate(analysis)
    t2 = time.perf_counter()
    after = _maxrss_kib()
    return {
        "shape": name,
        "bytes": len(command.encode()),
        "baseline_mib": round(before / 1024, 1),
        "peak_mib": round(after / 1024, 1),
        "growth_mib": round((after - before) / 1024, 1),
        "analyze_s": round(t1 - t0, 3),
        "evaluate_s": round(t2 - t1, 3),
        "commands": len(analysis.commands),
        "verdict": result.verdict.name if result.verdict is not None else "none",
        "parser_findings": sorted({f.rule_id for f in analysis.findings}),
    }


def measure(name: str, size: int, cap_mib: int, timeout: float) -> dict[str, Any]:
    """Run one shape in a fresh interpreter; its JSON, or why it failed."""
    cmd = [sys.executable, __file__, "--child", name, "--size", str(size)]
    cmd += ["--cap-mib", str(cap_mib)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"shape": name, "error": f"timeout after {timeout:g} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "shape": name,
            "error": f"exit {proc.returncode}: {last[:80]}",
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["shape"], "-", "-", "-", "-", "-", r["error"]])
            continue
        rows.append(
            [
                r["shape"],
                f"{r['peak_mib']:.0f}",
                f"{r['growth_mib']:.0f}",
                f"{r['analyze_s']:.3f}",
                f"{r['evaluate_s']:.3f}",
                str(r["commands"]),
                f"{r['verdict']} {','.join(r['parser_findings'])}",
            ]
        )
    return format_table(
        "Static pass on the worst 128 KiB lines (fresh process each)",
        ["shape", "peak MiB", "growth MiB", "analyze s", "evaluate s", "cmds", "verdict"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=COMMAND_LIMIT, help="bytes per line")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="only these")
    parser.add_argument("--cap-mib", type=int, default=8192, help="child address-space cap")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per shape")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.cap_mib)))
        return 0
    results = []
    for name in args.shape or list(SHAPES):
        results.append(measure(name, args.size, args.cap_mib, args.timeout))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results))
    worst = max((r for r in results if "error" not in r), key=lambda r: r["peak_mib"], default={})
    summary = {"size": args.size, "shapes": results, "worst": worst}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
