"""The daemon's audit trail: one event builder per call kind, and ``record``.

Every call that decides or acts (Validate, Approve, Apply, Discard, Execute) appends
exactly one event to the :class:`~airlock.audit.AuditLog` *before* it answers, so a
client never holds a verdict, an approval or a result that the log lacks. A call that
is refused before it decides anything (a malformed or invalid request, an unknown
caller, the concurrency limit) is not a decision and is not recorded.

The builders take the inside types (``airlock.types``) and plain values, never
protobuf, and never an environment's values: only its hash (``env_sha256``). Read the
caller with :func:`caller_of` when the call arrives, before the work: the caller's pid
may be gone (or reused) by the time the answer is ready.

Usage (``airlock.core.service`` is the one user)::

    caller = caller_of(peer)                    # first, while the caller surely runs
    result = engine.validate(req, validation_id)
    record(audit_log, validate_event(caller, req, result))   # raises Unavailable
    return result
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from airlock._errors import Unavailable
from airlock.audit import (
    Approval,
    AuditError,
    AuditEvent,
    AuditLog,
    Caller,
    Outcome,
    RpcKind,
    StoredEvent,
    caller_of,
    path_text,
    rule_decisions,
)
from airlock.core.request import CheckedRequest
from airlock.core.state import ValidationRecord
from airlock.types import DryRunSkip, Finding, Termination, Validation, Verdict

__all__ = [
    "apply_event",
    "approve_event",
    "caller_of",
    "discard_event",
    "effects_text",
    "execute_event",
    "record",
    "validate_event",
]

_log = logging.getLogger("airlock.daemon")


def record(log: AuditLog, event: AuditEvent) -> StoredEvent:
    """Append ``event``; it is on disk (fsynced) when this returns.

    Fails closed: if the log cannot take the event, the call must not answer with
    its result. Raises :class:`Unavailable` (reason ``AUDIT_UNAVAILABLE``); the
    log's own reason is in the message and in the daemon's log.
    """
    try:
        return log.append(event)
    except AuditError as err:
        _log.error(
            "audit log append failed",
            extra={
                "kind": event.kind.name.lower(),
                "validation_id": event.validation_id,
                "reason": err.reason,
                "error": err.message,
            },
        )
        raise Unavailable(
            f"the daemon cannot record this {event.kind.name.capitalize()} in its audit log, "
            f"so it does not answer it ({err.reason}); an administrator must look at the "
            "daemon's log",
            reason="AUDIT_UNAVAILABLE",
        ) from None


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def effects_text(v: Validation) -> str:
    """The effects of a validation as the log keeps them: its summary, then counts.

    Deterministic, one summary line and one line of facts, for example::

        Exited with code 0. In the workspace: created 1 file (notes.txt).
        dry run: exit 0; 1 change (0 outside the workspace); 2 processes; 0 network
        attempts; 0 sensitive reads; policy e99c3812ae58...
    """
    facts: list[str] = []
    if not v.sandboxed:
        why = {DryRunSkip.STATIC_DENY: "static deny", DryRunSkip.READ_ONLY: "read-only"}
        facts.append(f"no dry run ({why.get(v.dry_run_skip, 'skipped')})")
    else:
        how = {
            Termination.EXITED: f"exit {v.exit_code}",
            Termination.SIGNALED: f"signal {v.signal}",
            Termination.TIMED_OUT: "timed out",
            Termination.OUT_OF_MEMORY: "out of memory",
            Termination.CANCELLED: "cancelled",
        }
        facts.append(f"dry run: {how.get(v.termination, v.termination.name.lower())}")
        outside = sum(1 for c in v.changes if not c.in_workspace)
        more = "+" if v.changes_truncated else ""
        facts.append(f"{_plural(len(v.changes), 'change')}{more} ({outside} outside the workspace)")
        facts.append(_plural(len(v.processes), "process", "processes"))
        lost = v.network_attempts_lost
        facts.append(_plural(len(v.network_attempts) + lost, "network attempt"))
        facts.append(_plural(len(v.sensitive_reads), "sensitive read"))
    facts.append(f"policy {v.policy_version or '?'}")
    return f"{v.summary}\n{'; '.join(facts)}"


def validate_event(caller: Caller, req: CheckedRequest, v: Validation) -> AuditEvent:
    """The event of a Validate that reached verdict ``v.verdict``.

    Nothing ran on the host, so the outcome is empty (the dry run's exit code is in
    ``effects``).
    """
    return AuditEvent(
        kind=RpcKind.VALIDATE,
        caller=caller,
        command=req.command,
        cwd=req.cwd,
        env_sha256=req.env_sha256,
        findings=rule_decisions(v.findings),
        effects=effects_text(v),
        verdict=v.verdict,
        validation_id=v.validation_id,
        session_id=req.session_id,
    )


def _of_record(kind: RpcKind, caller: Caller, record: ValidationRecord, **more: Any) -> AuditEvent:
    """An event about the kept validation ``record``: its command, cwd, verdict and ids."""
    return AuditEvent(
        kind=kind,
        caller=caller,
        command=record.command,
        cwd=record.cwd,
        verdict=record.verdict,
        validation_id=record.validation_id,
        session_id=record.session_id,
        **more,
    )


def approve_event(caller: Caller, record: ValidationRecord, approval: Approval) -> AuditEvent:
    """The event of an Approve of ``record``: ``approval`` says why (its ``detail``: who)."""
    return _of_record(
        RpcKind.APPROVE, caller, record, env_sha256=record.env_sha256, approval=approval
    )


def apply_event(
    caller: Caller,
    record: ValidationRecord,
    *,
    applied_paths: Iterable[bytes],
    approval: Approval | None = None,
    effects: str = "",
    error: str = "",
) -> AuditEvent:
    """The event of an Apply of ``record``: the host paths written (in order).

    ``approval`` is the one the apply used. On failure, ``error`` is the reason and
    ``applied_paths`` what was written before it (if any).
    """
    return _of_record(
        RpcKind.APPLY,
        caller,
        record,
        env_sha256=record.env_sha256,
        effects=effects,
        approval=approval,
        outcome=Outcome(applied_paths=tuple(path_text(p) for p in applied_paths), error=error),
    )


def discard_event(caller: Caller, record: ValidationRecord) -> AuditEvent:
    """The event of a Discard of ``record``."""
    return _of_record(RpcKind.DISCARD, caller, record)


def execute_event(
    caller: Caller,
    req: CheckedRequest,
    *,
    verdict: Verdict | None,
    findings: Iterable[Finding] = (),
    approval: Approval | None = None,
    exit_code: int | None = None,
    effects: str = "",
    execution_id: str = "",
    error: str = "",
) -> AuditEvent:
    """The event of an Execute of ``req``: the command run on the host and how it ended.

    ``exit_code`` is None if the command never started (``error`` then says why).
    ``execution_id`` goes in the event's ``validation_id`` field (the id the call
    reported).
    """
    return AuditEvent(
        kind=RpcKind.EXECUTE,
        caller=caller,
        command=req.command,
        cwd=req.cwd,
        env_sha256=req.env_sha256,
        findings=rule_decisions(findings),
        effects=effects,
        verdict=verdict,
        approval=approval,
        outcome=Outcome(exit_code=exit_code, error=error),
        validation_id=execution_id,
        session_id=req.session_id,
    )
