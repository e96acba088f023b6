"""Inline tests and fixture files: does each rule fire where its author says it does?

:func:`run_inline_tests` runs the ``tests:`` of every rule (static rules with the real parser,
effect rules on synthetic effects); loading a bundle runs them all and fails on the first
wrong one (:func:`_inline_test_problems`). :func:`read_fixtures` and :func:`run_fixture` are
``airlock policy test``'s annotated command files (``# ruleid:`` / ``# ok:``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date

from airlock.policy.effects import EffectRule, EffectTest, check_effect_test
from airlock.policy.loader._compile import PolicyBundle
from airlock.policy.loader._files import FIXTURE_SUFFIXES, StrPath, collect_files
from airlock.policy.loader._problems import PolicyProblem
from airlock.policy.model import Analysis
from airlock.policy.rules import Rule, RuleSet, RuleTest

Analyzer = Callable[[str], Analysis]


@dataclass(frozen=True)
class TestResult:
    """One inline test or fixture case: where it is written, and what happened."""

    file: str
    line: int
    column: int
    rule_id: str
    command: str
    expect_fire: bool
    ok: bool
    detail: str = ""  # what happened instead, when not ok

    __test__ = False  # not a pytest test class

    def __str__(self) -> str:
        want = "fire" if self.expect_fire else "not fire"
        status = "ok" if self.ok else "FAIL"
        return (
            f"{self.file}:{self.line}:{self.column}: {status}: {self.rule_id} should {want} on "
            f"{self.command!r}" + (f": {self.detail}" if self.detail else "")
        )


def _default_analyzer() -> Analyzer:
    from airlock.policy.shell import analyze  # the real parser, imported late (tree-sitter)

    return analyze


def _commands_summary(analysis: Analysis) -> str:
    if not analysis.commands:
        return "the parser found no command"
    shown = "; ".join(
        f"{c.name!r} (flags {list(c.flags)}, positionals {list(c.positionals)}"
        + (f", wrappers {list(c.wrappers)}" if c.wrappers else "")
        + ")"
        for c in analysis.commands[:4]
    )
    more = len(analysis.commands) - 4
    return f"commands seen: {shown}" + (f" and {more} more" if more > 0 else "")


def _check(rule: Rule, command: str, expect_fire: bool, analyze: Analyzer, today: date) -> str:
    """'' when the rule behaves as expected on ``command``; else what happened instead."""
    try:
        analysis = analyze(command)
    except Exception as e:  # the parser should never raise; report it as a test failure
        return f"the parser failed: {type(e).__name__}: {e}"
    ruleset = RuleSet((rule,))
    fired = ruleset.evaluate(analysis, today=today, parser_findings=False).findings
    if bool(fired) == expect_fire:
        return ""
    hits = ruleset.explain(analysis, today=today)
    if expect_fire:
        stopped = [h for h in hits if not h.fired]
        if stopped:
            return f"it matched but the exception {stopped[0].excepted_by!r} stopped it"
        parser = "".join(f"; parser finding {f.rule_id}" for f in analysis.findings)
        return f"it did not fire: {_commands_summary(analysis)}{parser}"
    reasons = "; ".join(next(h.reasons for h in hits if h.fired))
    return f"it fired ({reasons})"


def _effect_results(rule: EffectRule) -> list[TestResult]:
    return [
        _test_result(rule, test, test.text, check_effect_test(rule, test)) for test in rule.tests
    ]


def _test_result(
    rule: Rule | EffectRule, test: RuleTest | EffectTest, command: str, detail: str
) -> TestResult:
    """One inline test's result (``detail``: what happened instead, '' when it passed), at
    the place of the test, or of its rule where the test has none."""
    return TestResult(
        test.file or rule.file,
        test.line or rule.line,
        test.column or 1,
        rule.id,
        command,
        test.expect_fire,
        not detail,
        detail,
    )


def run_inline_tests(
    rules: Iterable[Rule | EffectRule], *, analyze: Analyzer | None = None
) -> list[TestResult]:
    """Run every rule's inline tests: static rules' with the real parser unless
    ``analyze`` is given, effect rules' on the synthetic effects of their entries
    (the entry, as YAML flow text, is the result's ``command``).

    Every exception counts as in force, whatever its expiry date, so that whether a
    bundle loads never depends on the date (``airlock policy lint`` warns about
    expired exceptions instead)."""
    results: list[TestResult] = []
    analyzer: Analyzer | None = analyze
    for rule in rules:
        if isinstance(rule, EffectRule):
            results.extend(_effect_results(rule))
            continue
        for test in rule.tests:
            if analyzer is None:
                analyzer = _default_analyzer()
            detail = _check(rule, test.command, test.expect_fire, analyzer, date.min)
            results.append(_test_result(rule, test, test.command, detail))
    return results


def _inline_test_problems(
    rules: Sequence[Rule] | Sequence[EffectRule], analyze: Analyzer | None
) -> list[PolicyProblem]:
    if not any(r.tests for r in rules):
        return []
    if analyze is None and not any(isinstance(r, EffectRule) for r in rules):
        try:
            analyze = _default_analyzer()
        except ImportError as e:
            return [
                PolicyProblem(
                    rules[0].file, 0, 0, f"cannot run the inline tests: no parser ({e})", ""
                )
            ]
    out = []
    for result in run_inline_tests(rules, analyze=analyze):
        if not result.ok:
            want = "fire" if result.expect_fire else "not fire"
            out.append(
                PolicyProblem(
                    result.file,
                    result.line,
                    result.column,
                    f"inline test failed: rule {result.rule_id!r} should {want} on "
                    f"{result.command!r}, but {result.detail}",
                    "fix the rule's match (or effect), or the test",
                )
            )
    return out


# --------------------------------------------------------------------------- fixtures

_ANNOTATION = re.compile(r"^#\s*(ruleid|ok)\s*:\s*(.+?)\s*$")


@dataclass(frozen=True)
class FixtureCase:
    """One annotated command of a fixture file."""

    file: str
    line: int  # of the command
    command: str
    rule_id: str
    expect_fire: bool  # "# ruleid:" (True) or "# ok:" (False)


def read_fixtures(path: str, text: str) -> tuple[list[FixtureCase], list[PolicyProblem]]:
    """Parse a fixture file: ``# ruleid: ID`` / ``# ok: ID`` (IDs may be comma-separated)
    on the lines before a command line apply to it; a command line ending with a
    backslash continues on the next line; blank lines and other comments are ignored."""
    cases: list[FixtureCase] = []
    problems: list[PolicyProblem] = []
    pending: list[tuple[str, bool, int]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        i += 1
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = _ANNOTATION.match(stripped)
            if m:
                for rid in m.group(2).split(","):
                    if rid.strip():
                        pending.append((rid.strip(), m.group(1) == "ruleid", i))
            continue
        start = i
        command = raw
        while command.endswith("\\") and i < len(lines):
            command = command + "\n" + lines[i]
            i += 1
        for rid, fire, _ in pending:
            cases.append(FixtureCase(path, start, command, rid, fire))
        pending = []
    for rid, _fire, line in pending:
        problems.append(
            PolicyProblem(path, line, 1, f"annotation for {rid!r} is not followed by a command")
        )
    return cases, problems


def run_fixture(
    bundle: PolicyBundle, case: FixtureCase, *, analyze: Analyzer | None = None
) -> TestResult:
    """Evaluate the whole bundle on the case's command; did its rule fire as annotated?"""
    analyzer = analyze or bundle.analyze

    def result(ok: bool, detail: str) -> TestResult:
        return TestResult(
            case.file, case.line, 1, case.rule_id, case.command, case.expect_fire, ok, detail
        )

    if bundle.rule(case.rule_id) is None:
        if bundle.effect_rule(case.rule_id) is not None:
            return result(
                False,
                f"{case.rule_id!r} is an effect rule: it judges a dry run, not a command line; "
                "test it with inline tests",
            )
        return result(False, f"the bundle has no rule {case.rule_id!r}")
    try:
        analysis = analyzer(case.command)
    except Exception as e:
        return result(False, f"the parser failed: {type(e).__name__}: {e}")
    verdict = bundle.evaluate(analysis)
    fired = [f for f in verdict.findings if f.rule_id == case.rule_id]
    if bool(fired) == case.expect_fire:
        return result(True, "")
    if case.expect_fire:
        stopped = [h for h in bundle.explain(analysis) if h.rule_id == case.rule_id]
        if stopped:
            return result(False, f"an exception stopped it ({stopped[0].excepted_by})")
        return result(False, f"it did not fire: {_commands_summary(analysis)}")
    return result(False, f"it fired on {fired[0].subcommand!r}")


def iter_fixture_files(paths: Iterable[StrPath]) -> Iterator[str]:
    """The fixture files (``*.sh``, ``*.txt``) under ``paths``."""
    found, _missing = collect_files(paths, FIXTURE_SUFFIXES)
    for file, _rel in found:
        yield file
