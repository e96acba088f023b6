"""``airlock policy diff OLD NEW``: every static verdict a policy change changes.

The command lines replayed: every command of the fixture files under ``--corpus DIR`` (the
corpus format of tests/corpus: one command a line, ``\\`` continuations, ``#|`` blocks for
multi-line commands); the command of each Validate and Execute event of each ``--audit-log
FILE`` (an Airlock audit log, opened read-only: the newest ``MAX_AUDIT_EVENTS`` such events
over all the files); with neither, the fixture files under OLD and NEW and the inline tests of
both bundles' rules. Each command is replayed once. Each line is analysed with each bundle's
own command catalog and judged by it; a line whose verdict differs is listed with the rules
that decided it on each side. Pure: no daemon, nothing run. Static verdicts only: a line the
dry run would decide shows as ``none`` (the replay cannot re-run the dry runs a log records).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from airlock.policy.loader import PolicyBundle, iter_fixture_files
from airlock.policy.rules import StaticVerdict

__all__ = [
    "MAX_AUDIT_EVENTS",
    "AuditLines",
    "Change",
    "Line",
    "audit_lines",
    "corpus_lines",
    "diff",
    "inline_lines",
    "write_json",
    "write_text",
]

# The most Validate and Execute events read from the --audit-log files, together (the newest):
# bounds the time and memory of a replay whatever the size of the log.
MAX_AUDIT_EVENTS = 100_000


@dataclass(frozen=True)
class Line:
    """One command line to replay, and where it was read."""

    where: str  # file:line, or "inline test of RULE"
    command: str


@dataclass(frozen=True)
class Change:
    """A line whose static verdict differs between the two bundles."""

    line: Line
    old: str  # "allow", "ask", "deny" or "none" (no opinion: the dry run decides)
    new: str
    old_rules: tuple[str, ...]  # the rules that decided it (those with the verdict given)
    new_rules: tuple[str, ...]

    @property
    def stricter(self) -> bool:
        return _RANK[self.new] > _RANK[self.old]


_RANK = {"none": 0, "allow": 1, "ask": 2, "deny": 3}


def _commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of a fixture or corpus file."""
    lines = text.split("\n")
    i = 0
    block: list[str] = []
    block_start = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        i += 1
        if stripped.startswith("#|"):
            if not block:
                block_start = i
            body = stripped[2:]
            block.append(body[1:] if body.startswith(" ") else body)
            continue
        if block:
            yield block_start, "\n".join(block)
            block = []
        if not stripped or stripped.startswith("#"):
            continue
        start = i
        command = raw
        while command.endswith("\\") and i < len(lines):
            command = command + "\n" + lines[i]
            i += 1
        yield start, command
    if block:
        yield block_start, "\n".join(block)


def corpus_lines(paths: Iterable[str | Path]) -> list[Line]:
    """Every command of the fixture files (*.sh, *.txt) under ``paths``."""
    out: list[Line] = []
    for file in iter_fixture_files(paths):
        text = Path(file).read_text("utf-8", errors="replace")
        out.extend(Line(f"{file}:{n}", command) for n, command in _commands(text))
    return out


@dataclass(frozen=True)
class AuditLines:
    """The distinct command lines of audit logs, and how many events they came from."""

    lines: tuple[Line, ...]
    events: int  # Validate and Execute events read
    capped: bool  # MAX_AUDIT_EVENTS (or the limit given) was reached: older events were left


def audit_lines(paths: Iterable[str | Path], limit: int = MAX_AUDIT_EVENTS) -> AuditLines:
    """The command of each Validate and Execute event of the audit logs ``paths``: the newest
    ``limit`` events over all the files, each distinct command once (at its newest event).

    Raises ``AuditError`` for a file that is missing or not an Airlock audit log."""
    from airlock.audit import RpcKind, read_events

    out: list[Line] = []
    seen: set[str] = set()
    events = 0
    capped = False
    for path in paths:
        budget = limit - events
        if budget <= 0:
            capped = True
            break
        # One more than the budget: whether events were left, without a count of the log.
        stored = read_events(
            path, kinds=(RpcKind.VALIDATE, RpcKind.EXECUTE), limit=budget + 1, newest_first=True
        )
        if len(stored) > budget:
            capped = True
            stored = stored[:budget]
        events += len(stored)
        for s in stored:
            command = s.event.command
            if not command or command in seen:
                continue
            seen.add(command)
            out.append(Line(f"{path}:event {s.seq} ({s.event.kind.name.lower()})", command))
    return AuditLines(tuple(out), events, capped)


def inline_lines(*bundles: PolicyBundle) -> list[Line]:
    """The commands of every inline test of the bundles' static rules."""
    out: list[Line] = []
    for bundle in bundles:
        for rule in bundle.rules:
            for test in rule.tests:
                where = f"{test.file or rule.file}:{test.line or rule.line}"
                out.append(Line(where, test.command))
    return out


def _decision(verdict: StaticVerdict) -> tuple[str, tuple[str, ...]]:
    if verdict.verdict is None:
        return "none", ()
    rules = tuple(
        dict.fromkeys(f.rule_id for f in verdict.findings if f.verdict == verdict.verdict)
    )
    return verdict.verdict.name.lower(), rules


def diff(old: PolicyBundle, new: PolicyBundle, lines: Sequence[Line]) -> list[Change]:
    """The lines (each command once, first place kept) whose verdict differs."""
    changes: list[Change] = []
    seen: set[str] = set()
    for line in lines:
        if line.command in seen:
            continue
        seen.add(line.command)
        before, old_rules = _decision(old.evaluate(old.analyze(line.command)))
        after, new_rules = _decision(new.evaluate(new.analyze(line.command)))
        if before != after:
            changes.append(Change(line, before, after, old_rules, new_rules))
    return changes


def _summary(
    replayed: int, changes: Sequence[Change], audit: AuditLines | None = None
) -> dict[str, Any]:
    stricter = sum(1 for c in changes if c.stricter)
    doc: dict[str, Any] = {
        "replayed": replayed,
        "changed": len(changes),
        "stricter": stricter,
        "looser": len(changes) - stricter,
    }
    if audit is not None:
        doc["audit_log"] = {
            "replayed": len(audit.lines),
            "events": audit.events,
            "capped": audit.capped,
            "limit": MAX_AUDIT_EVENTS,
            "static_only": True,  # the dry runs the log records are not re-run
        }
    return doc


def _audit_text(audit: AuditLines, limit: int = MAX_AUDIT_EVENTS) -> str:
    capped = f"; capped at the newest {limit} events, older ones not read" if audit.capped else ""
    return (
        f"{len(audit.lines)} distinct command(s) replayed from the audit log(s) "
        f"({audit.events} Validate/Execute event(s) read{capped}); static verdicts only: "
        "the dry runs are not re-run (a line the dry run would decide shows as none)\n"
    )


def write_text(
    out: TextIO, replayed: int, changes: Sequence[Change], audit: AuditLines | None = None
) -> None:
    for c in changes:
        out.write(f"{c.line.where}: {c.old} -> {c.new}: {c.line.command!r}\n")
        out.write(f"    old: {', '.join(c.old_rules) or '(no rule)'}\n")
        out.write(f"    new: {', '.join(c.new_rules) or '(no rule)'}\n")
    s = _summary(replayed, changes)
    if audit is not None:
        out.write(_audit_text(audit))
    out.write(
        f"{s['replayed']} command(s) replayed, {s['changed']} verdict(s) changed "
        f"({s['stricter']} stricter, {s['looser']} looser)\n"
    )


def write_json(
    out: TextIO, replayed: int, changes: Sequence[Change], audit: AuditLines | None = None
) -> None:
    doc: dict[str, Any] = {
        "summary": _summary(replayed, changes, audit),
        "changes": [
            {
                "where": c.line.where,
                "command": c.line.command,
                "old": {"verdict": c.old, "rules": list(c.old_rules)},
                "new": {"verdict": c.new, "rules": list(c.new_rules)},
            }
            for c in changes
        ],
    }
    out.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
