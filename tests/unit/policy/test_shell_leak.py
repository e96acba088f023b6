"""The static parser keeps nothing per call: memory does not grow with the number of analyses.

py-tree-sitter keeps a reference to every object a parser's read callback returns; the
parser used to return a fresh memoryview of the line per call, so each call kept its line
alive (the daemon grew by 128 KiB per 128 KiB line). Both tests analyse distinct 128 KiB
read-only lines in this process and fit a least-squares slope to the memory measured at
checkpoints: traced Python allocations (tracemalloc) in the quick test, resident set size
(/proc/self/statm) over 2,000 lines in the soak test.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable, Sequence

import pytest

from airlock.policy.shell import analyze
from tests.unit.policy.shell_shapes import COMMAND_LIMIT

# Thresholds: a leak of the line itself is 128 KiB per call (131 MiB per 1,000 calls).
TRACED_SLOPE_MAX = 4 << 10  # bytes per call, tracemalloc
RSS_SLOPE_MAX = 1 << 20  # bytes per 1,000 calls, resident set size


def read_only_line(i: int, size: int = COMMAND_LIMIT) -> str:
    """A distinct read-only line of exactly ``size`` bytes (ASCII): a here-document to cat."""
    head = f"cat <<'EOF'\n{i:08d} "
    tail = "\nEOF\n"
    filler = (f"line {i} of a here-document\n" * (size // 16))[: size - len(head) - len(tail)]
    return head + filler + tail


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def growth(
    calls: int, every: int, warmup: int, measure: Callable[[], int]
) -> tuple[float, list[int]]:
    """Analyse ``calls`` distinct lines; the slope (bytes per call) of ``measure`` taken
    every ``every`` calls after ``warmup``, and the measurements."""
    xs: list[float] = []
    ys: list[int] = []
    for i in range(calls):
        a = analyze(read_only_line(i))
        assert a.read_only and not a.findings, a.findings  # the whole line was analysed
        del a
        done = i + 1
        if done >= warmup and done % every == 0:
            gc.collect()
            xs.append(done)
            ys.append(measure())
    return slope(xs, ys), ys


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_read_only_lines_leave_nothing_behind() -> None:
    analyze(read_only_line(-1))
    tracemalloc.start()
    try:
        per_call, ys = growth(200, 20, 20, lambda: tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert per_call < TRACED_SLOPE_MAX, (per_call, ys)


@pytest.mark.soak
def test_soak_rss_does_not_grow_with_calls() -> None:
    """2,000 distinct 128 KiB read-only lines: the RSS slope per 1,000 calls (printed)."""
    per_call, ys = growth(2_000, 100, 200, rss)
    per_1000 = per_call * 1000
    print(
        f"\nparser RSS over 2,000 calls of 128 KiB: {ys[0] / 2**20:.1f} -> {ys[-1] / 2**20:.1f}"
        f" MiB, slope {per_1000 / 2**20:.3f} MiB per 1,000 calls"
    )
    assert per_1000 < RSS_SLOPE_MAX, (per_1000, ys)
