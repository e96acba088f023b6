"""``airlock policy test --coverage``: the rules and exceptions no test exercises.

A static rule is exercised when one of its own ``tests.match`` commands, or any command of
the fixture files, makes it fire. An exception is exercised when it stopped its rule on one of
the rule's own inline test commands (``match`` or ``not_match``) or on a fixture command. An
effect rule is exercised when one of its ``match`` inline tests makes it fire (effect rules
judge a dry run, so fixture lines cannot exercise them). Every exception counts as in force,
whatever its expiry date, as in the inline tests: coverage never depends on the date
(``airlock policy lint`` warns about expired exceptions). Pure: no daemon, nothing run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, TextIO

from airlock.policy.loader import PolicyBundle
from airlock.policy.model import Analysis
from airlock.policy.rules import Rule

__all__ = ["Coverage", "Gap", "coverage", "json_doc", "write_text"]

_ALL_IN_FORCE = date.min  # every exception is in force (see the module docstring)


@dataclass(frozen=True)
class Gap:
    """A rule or exception that nothing exercises."""

    kind: str  # "rule", "exception" or "effect rule"
    rule_id: str
    file: str
    line: int
    detail: str  # what is missing, in a sentence

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.kind} {self.rule_id}: {self.detail}"


@dataclass(frozen=True)
class Coverage:
    """What the inline tests and fixtures exercise, and what they do not."""

    rules: int  # static rules in the bundle
    exceptions: int
    effect_rules: int
    fixture_commands: int  # distinct commands read from the fixture files
    gaps: tuple[Gap, ...]

    @property
    def total(self) -> int:
        return self.rules + self.exceptions + self.effect_rules

    @property
    def percent(self) -> float:
        """The share of rules, exceptions and effect rules exercised (100 for an empty bundle)."""
        if not self.total:
            return 100.0
        return 100.0 * (self.total - len(self.gaps)) / self.total


def _stopping_exception(rule: Rule, analysis: Analysis, command: int) -> int:
    """The index of the exception that stopped ``rule`` on the hit's command(s): the first
    active one covering them all, as ``Rule`` decides it."""
    cmds = analysis.commands if command < 0 else (analysis.commands[command],)
    for i, exc in enumerate(rule.exceptions):
        if exc.active(_ALL_IN_FORCE) and cmds and all(exc.covers(c) for c in cmds):
            return i
    return -1


def _record(
    bundle: PolicyBundle,
    analysis: Analysis,
    fired: set[str],
    stopped: set[tuple[str, int]],
    only: str | None = None,
) -> None:
    for hit in bundle.explain(analysis, today=_ALL_IN_FORCE):
        if only is not None and hit.rule_id != only:
            continue
        if hit.fired:
            fired.add(hit.rule_id)
            continue
        rule = bundle.rule(hit.rule_id)
        if rule is not None:
            stopped.add((hit.rule_id, _stopping_exception(rule, analysis, hit.command)))


def coverage(bundle: PolicyBundle, fixture_commands: Sequence[str]) -> Coverage:
    """What of ``bundle`` its inline tests and ``fixture_commands`` exercise."""
    fired: set[str] = set()
    stopped: set[tuple[str, int]] = set()
    cache: dict[str, Analysis] = {}

    def analysis(command: str) -> Analysis:
        if command not in cache:
            cache[command] = bundle.analyze(command)
        return cache[command]

    for rule in bundle.rules:
        for test in rule.tests:
            own = analysis(test.command)
            if test.expect_fire:
                _record(bundle, own, fired, stopped, only=rule.id)
            elif rule.exceptions:  # a not_match test can only exercise an exception
                _record(bundle, own, set(), stopped, only=rule.id)
    distinct = list(dict.fromkeys(fixture_commands))
    for command in distinct:
        _record(bundle, analysis(command), fired, stopped)

    gaps: list[Gap] = []
    exceptions = 0
    for rule in bundle.rules:
        if rule.id not in fired:
            gaps.append(
                Gap(
                    "rule",
                    rule.id,
                    rule.file,
                    rule.line,
                    "no tests.match command and no fixture command makes it fire",
                )
            )
        for i, exc in enumerate(rule.exceptions):
            exceptions += 1
            if (rule.id, i) not in stopped:
                values = ", ".join(exc.values)
                gaps.append(
                    Gap(
                        "exception",
                        rule.id,
                        rule.file,
                        rule.line,
                        f"exception {i + 1} (values: {values}) never stopped the rule on an "
                        "inline test or fixture command",
                    )
                )
    for effect_rule in bundle.effect_rules:
        if not any(
            t.expect_fire and effect_rule.finding(t.effects) is not None for t in effect_rule.tests
        ):
            gaps.append(
                Gap(
                    "effect rule",
                    effect_rule.id,
                    effect_rule.file,
                    effect_rule.line,
                    "no tests.match entry makes it fire",
                )
            )
    return Coverage(
        len(bundle.rules), exceptions, len(bundle.effect_rules), len(distinct), tuple(gaps)
    )


def _summary(c: Coverage) -> dict[str, Any]:
    kinds = ("rule", "exception", "effect rule")
    missing = {k: sum(1 for g in c.gaps if g.kind == k) for k in kinds}
    return {
        "rules": {"total": c.rules, "exercised": c.rules - missing["rule"]},
        "exceptions": {"total": c.exceptions, "exercised": c.exceptions - missing["exception"]},
        "effect_rules": {
            "total": c.effect_rules,
            "exercised": c.effect_rules - missing["effect rule"],
        },
        "fixture_commands": c.fixture_commands,
        "percent": round(c.percent, 1),
    }


def write_text(out: TextIO, c: Coverage) -> None:
    for gap in c.gaps:
        out.write(f"{gap}\n")
    s = _summary(c)
    out.write(
        f"coverage: {s['percent']:.1f}%: rules {s['rules']['exercised']}/{s['rules']['total']}, "
        f"exceptions {s['exceptions']['exercised']}/{s['exceptions']['total']}, "
        f"effect rules {s['effect_rules']['exercised']}/{s['effect_rules']['total']} "
        f"exercised ({c.fixture_commands} fixture command(s))\n"
    )


def json_doc(c: Coverage) -> dict[str, Any]:
    return {
        **_summary(c),
        "unexercised": [
            {
                "kind": g.kind,
                "rule_id": g.rule_id,
                "file": g.file,
                "line": g.line,
                "detail": g.detail,
            }
            for g in c.gaps
        ],
    }
