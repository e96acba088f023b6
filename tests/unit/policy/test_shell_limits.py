"""The static parser's bounds on hostile input: memory, work, and what it answers past them.

Memory is measured with tracemalloc (what the analysis allocates through Python), never with
a clock; bench/parse_worst.py reports peak RSS and time of the same shapes.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock.policy.loader import PolicyBundle, load_bundle
from airlock.policy.model import Analysis
from airlock.policy.shell import PARSE_INTERNAL_ERROR, PARSE_TOO_LARGE, analyze
from airlock.policy.shell._walker import MAX_PIPELINE, _longest_pipeline
from airlock.types import Verdict
from tests.unit.policy import shell_shapes
from tests.unit.policy.shell_shapes import COMMAND_LIMIT, SHAPES

# The bound: no 128 KiB line may make the analysis allocate more than this at its peak.
# Measured (tracemalloc) after the fix: 11-15 MiB for the nested shapes, 47 MiB for the
# most commands a line can hold (10,000); before it, 4.4 GiB of RSS for nested `$(`.
PEAK_BOUND = 64 << 20
# What may stay allocated once the analysis is dropped (caches of short words only).
RETAINED_BOUND = 1 << 20

# The nesting shapes (nested `$(`, `"$(`, `${ $(` and `<(` used to make quadratic text: each
# level copied the inner ones), fast enough under tracemalloc (< 5 s each) to run on every
# test run. The others (up to 30 s each under tracemalloc) run under `soak`.
QUADRATIC = ["nested $(", 'nested "$(', "nested ${ $(", "nested <(", "deep subshells"]

POLICY = Path(__file__).resolve().parents[3] / "airlock" / "policy" / "default"


def rules(a: Analysis) -> list[str]:
    return [f.rule_id for f in a.findings]


def check_bounded(make: Callable[[int], str]) -> None:
    line = make(COMMAND_LIMIT)
    assert COMMAND_LIMIT - 64 < len(line.encode()) <= COMMAND_LIMIT
    analyze("ls")
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        a = analyze(line)
        _, peak = tracemalloc.get_traced_memory()
        found = rules(a)
        del a
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base <= PEAK_BOUND, f"peak {(peak - base) / 2**20:.1f} MiB"
    assert after - base <= RETAINED_BOUND, f"retained {(after - base) / 2**20:.2f} MiB"
    assert PARSE_INTERNAL_ERROR not in found


@pytest.mark.parametrize("shape", QUADRATIC)
def test_nested_shapes_stay_under_the_memory_bound(shape: str) -> None:
    check_bounded(SHAPES[shape])


@pytest.mark.soak
@pytest.mark.parametrize("shape", sorted(set(SHAPES) - set(QUADRATIC)))
def test_every_worst_shape_stays_under_the_memory_bound(shape: str) -> None:
    check_bounded(SHAPES[shape])


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return load_bundle(POLICY, run_tests=False)


def test_nested_substitutions_fail_closed(bundle: PolicyBundle) -> None:
    """The work budget stops a quadratic line: parse.too-large, which asks."""
    a = analyze(shell_shapes.nested_cmdsub(COMMAND_LIMIT))
    assert PARSE_TOO_LARGE in rules(a)
    (f,) = [f for f in a.findings if f.rule_id == PARSE_TOO_LARGE]
    assert f.verdict == Verdict.ASK
    assert "too large or too deeply nested" in f.message
    assert not a.read_only
    assert 0 < len(a.commands) < 100  # the outer levels were analysed, then it stopped
    assert bundle.evaluate(a).verdict == Verdict.ASK


def test_a_deny_found_before_the_budget_ran_out_still_denies(bundle: PolicyBundle) -> None:
    a = analyze("rm -rf / ; " + shell_shapes.nested_cmdsub(COMMAND_LIMIT - 16))
    assert PARSE_TOO_LARGE in rules(a)
    verdict = bundle.evaluate(a)
    assert verdict.verdict == Verdict.DENY
    assert "fs.rm-root" in [f.rule_id for f in verdict.findings]


def test_the_budget_counts_the_whole_analysis() -> None:
    """Re-parsed strings and the model's text count, not only the parse of the line."""
    line = "bash -c 'ls -l; cat x'; " * 200
    full = analyze(line)
    assert PARSE_TOO_LARGE not in rules(full)
    cut = analyze(line, max_work=20_000)
    assert PARSE_TOO_LARGE in rules(cut)
    assert 0 < len(cut.commands) < len(full.commands)
    assert cut.commands == full.commands[: len(cut.commands)]  # what it kept is right
    assert analyze(line, max_work=20_000) == cut  # and deterministic: no clock involved


LEGIT = {
    "python -c with a 117 KiB program": "python3 -c '" + "print(1)\n" * 13_000 + "'",
    "a 128 KiB script as a here-document to bash": (
        "bash <<'EOF'\n" + "ls -l /tmp | grep x > /dev/null\n" * 4_000 + "EOF\n"
    ),
    "a 128 KiB here-document to a file": "cat > f <<EOF\n" + "text $HOME line\n" * 8_000 + "EOF\n",
    "60,000 arguments": "sudo env A=1 ls " + "a " * 60_000,
    "nested substitutions 50 deep": "echo " + "$(echo " * 50 + "x" + ")" * 50,
    "a 90 KiB bash -c": "bash -c '" + "ls -l /tmp | grep x; " * 4_500 + "'",
}


@pytest.mark.parametrize("line", LEGIT.values(), ids=LEGIT.keys())
def test_large_ordinary_lines_are_within_the_budget(line: str) -> None:
    assert len(line.encode()) <= COMMAND_LIMIT
    a = analyze(line)
    assert PARSE_TOO_LARGE not in rules(a), a.findings
    assert PARSE_INTERNAL_ERROR not in rules(a)


def test_long_pipelines_are_not_parsed() -> None:
    """tree-sitter is quadratic in one pipeline's length, past its last progress check."""
    at_limit = "ls" + " | cat" * MAX_PIPELINE
    a = analyze(at_limit)
    assert rules(a) == [] and len(a.commands) == MAX_PIPELINE + 1
    over = analyze(at_limit + " | cat")
    assert rules(over) == [PARSE_TOO_LARGE] and over.commands == ()
    assert "pipeline of more than" in over.findings[0].message
    # Many short pipelines are fine, and so are pipes in quotes.
    assert PARSE_TOO_LARGE not in rules(analyze("a | b; " * 2_000))
    assert PARSE_TOO_LARGE not in rules(analyze("grep -E '" + "a|" * 5_000 + "b' f"))


@pytest.mark.parametrize(
    ("data", "longest"),
    [
        (b"a", 0),
        (b"a|b|c", 2),
        (b"a | b; c | d | e", 2),
        (b"a || b | c", 1),
        (b"a |& b |& c", 2),
        (b"a && b | c", 1),
        (b"a | b\nc | d | e | f", 3),
        (b"echo 'a|b|c' | x", 1),
        (b'echo "a|\\"|b" | x', 1),
        (b"a\\|b|c", 1),
    ],
)
def test_longest_pipeline(data: bytes, longest: int) -> None:
    assert _longest_pipeline(data) == longest


def test_inherited_redirects_are_not_copied_per_level() -> None:
    depth = 2_000
    line = "( " * depth + "ls" + " )>f" * depth
    # Copied per level, the redirects would cost depth² / 2 = 2 M units of work.
    a = analyze(line, max_work=200_000)
    (ls,) = a.commands
    assert len(ls.redirects) == depth
    assert rules(a) == []
