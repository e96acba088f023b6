"""The built-in verdict rule, in force until the YAML policy engine lands.

ALLOW when every change is inside the workspace; ASK when anything outside it
changed, when the command opened a sensitive file (keys, credentials, .env), or
when the dry run did not finish (timeout, cancellation) or reported only part of
its changes, because then the changes seen are not all there is.
DENY is never reached by this rule. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from airlock.types import (
    FileChange,
    Finding,
    FindingSource,
    SensitiveReadInfo,
    Severity,
    Termination,
    Verdict,
)

__all__ = ["INCOMPLETE_RULE", "OUTSIDE_WORKSPACE_RULE", "SENSITIVE_READ_RULE", "judge"]

OUTSIDE_WORKSPACE_RULE = "builtin.change-outside-workspace"
SENSITIVE_READ_RULE = "builtin.sensitive-read"
INCOMPLETE_RULE = "builtin.incomplete-dry-run"
_LISTED = 3


def _paths(changes: Sequence[FileChange]) -> str:
    shown = ", ".join(c.path.decode(errors="backslashreplace") for c in changes[:_LISTED])
    more = len(changes) - _LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def judge(
    changes: Sequence[FileChange],
    termination: Termination,
    changes_truncated: bool,
    sensitive_reads: Sequence[SensitiveReadInfo] = (),
) -> tuple[Verdict, tuple[Finding, ...]]:
    """The verdict and its findings, strictest first."""
    findings: list[Finding] = []
    if sensitive_reads:
        paths = sorted({r.path for r in sensitive_reads})
        shown = ", ".join(p.decode(errors="backslashreplace") for p in paths[:_LISTED])
        more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
        findings.append(
            Finding(
                rule_id=SENSITIVE_READ_RULE,
                verdict=Verdict.ASK,
                severity=Severity.HIGH,
                message=f"Read sensitive file(s) in the dry run: {shown}{more}.",
                source=FindingSource.DYNAMIC,
            )
        )
    outside = [c for c in changes if not c.in_workspace]
    if outside:
        findings.append(
            Finding(
                rule_id=OUTSIDE_WORKSPACE_RULE,
                verdict=Verdict.ASK,
                severity=Severity.MEDIUM,
                message=f"Changes {len(outside)} path(s) outside the workspace: {_paths(outside)}.",
                source=FindingSource.BUILTIN,
            )
        )
    if termination in (Termination.TIMED_OUT, Termination.CANCELLED) or changes_truncated:
        why = (
            "more changes were made than are reported"
            if changes_truncated
            else "the dry run did not finish, so its changes may be incomplete"
        )
        findings.append(
            Finding(
                rule_id=INCOMPLETE_RULE,
                verdict=Verdict.ASK,
                severity=Severity.LOW,
                message=f"The verdict is not certain: {why}.",
                source=FindingSource.BUILTIN,
            )
        )
    verdict = max((f.verdict for f in findings), default=Verdict.ALLOW)
    return verdict, tuple(sorted(findings, key=lambda f: (-f.verdict, -f.severity, f.rule_id)))
