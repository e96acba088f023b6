"""Small helpers for the benchmark: percentiles and a plain-text table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["Summary", "format_table", "ms", "summarize"]

Summary = dict[str, float]


def summarize(seconds: Sequence[float]) -> Summary:
    """p50/p90/p99, mean, min and max of ``seconds``, in milliseconds; ``n`` is the count."""
    if not seconds:
        return {"n": 0}
    data = sorted(s * 1000.0 for s in seconds)
    if len(data) == 1:
        p50 = p90 = p99 = data[0]
    else:
        q = statistics.quantiles(data, n=100, method="inclusive")
        p50, p90, p99 = q[49], q[89], q[98]
    return {
        "n": len(data),
        "p50": round(p50, 3),
        "p90": round(p90, 3),
        "p99": round(p99, 3),
        "mean": round(statistics.fmean(data), 3),
        "min": round(data[0], 3),
        "max": round(data[-1], 3),
    }


def ms(summary: Summary, key: str = "p50") -> str:
    """One figure of a summary, formatted for the table (``-`` when absent)."""
    value = summary.get(key)
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned first column, right-aligned figures, a rule under the header."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([f"\n{title}", line(header), rule, *(line(r) for r in rows)])
