"""The daemon's audit trail: one event builder per call kind, and ``record``.

Every call that decides or acts (Validate, Approve, Apply, Discard, Execute) appends
exactly one event to the :class:`~airlock.audit.AuditLog` *before* it answers, so a
client never holds a verdict, an approval or a result that the log lacks. A call that
is refused before it decides anything (a malformed or invalid request, an unknown
caller, the concurrency limit) is not a decision and is not recorded. One event is not a
call: the operator's acceptance of a policy reload that drops rules or files
(:func:`policy_event`).

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
import threading
from collections.abc import Iterable
from typing import Any

from airlock._errors import AirlockError, Unavailable
from airlock.audit import (
    Anchor,
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
from airlock.core.state import StateStore, ValidationRecord
from airlock.policy.store import Acceptance
from airlock.types import DryRunSkip, Finding, Termination, Validation, Verdict

__all__ = [
    "HeadKeeper",
    "apply_event",
    "approve_event",
    "caller_of",
    "discard_event",
    "effects_text",
    "execute_event",
    "policy_event",
    "record",
    "validate_event",
]

_log = logging.getLogger("airlock.daemon")


def record(log: AuditLog, event: AuditEvent, *, durable: bool = True) -> StoredEvent:
    """Append ``event``; it is on disk (fsynced) when this returns.

    ``durable=False``: written, not fsynced (see :meth:`AuditLog.append`): only for an
    outcome whose decision was recorded durably before it.

    Fails closed: if the log cannot take the event, the call must not answer with
    its result. Raises :class:`Unavailable` (reason ``AUDIT_UNAVAILABLE``); the
    log's own reason is in the message and in the daemon's log.
    """
    try:
        return log.append(event, durable=durable)
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


class HeadKeeper:
    """Keeps the audit log's head in the state store, where a restart checks the log against it.

    The log's writer offers each new head (:meth:`offer`, never blocking it); a thread of
    its own records the latest one, at most once every ``interval_s``, so a stalled state
    store never holds the log, and the record lags the log by about that much at most (a
    kill -9 may leave it one interval behind). :meth:`stop` records the final head.
    A failure to record is logged once (one line) until recording works again.
    """

    def __init__(self, log: AuditLog, state: StateStore, *, interval_s: float = 1.0) -> None:
        self._log = log
        self._state = state
        self._interval_s = interval_s
        self._cond = threading.Condition()
        self._latest: Anchor | None = None  # the newest head offered
        self._recorded: Anchor | None = None  # the newest head in the state store
        self._stopping = False
        self._failing = False
        self._thread: threading.Thread | None = None

    def start(self, recorded: Anchor | None) -> None:
        """Start recording; ``recorded``: the head the state store holds now."""
        self._recorded = self._latest = recorded
        self._log.on_commit(self.offer)
        self._thread = threading.Thread(target=self._run, name="audit-head", daemon=True)
        self._thread.start()

    def offer(self, head: Anchor) -> None:
        with self._cond:
            self._latest = head
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest == self._recorded and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                head = self._latest
            if head is not None:
                self._record(head)
            with self._cond:  # coalesce: at most one write per interval
                self._cond.wait_for(lambda: self._stopping, timeout=self._interval_s)

    def _record(self, head: Anchor) -> None:
        try:
            self._state.record_audit_head(head)
        except AirlockError as exc:
            if not self._failing:
                _log.error(
                    "cannot record the audit log's head in the state store",
                    extra={"head": str(head), "reason": exc.reason, "error": exc.message},
                )
            self._failing = True
            return
        if self._failing:
            _log.info("recording the audit log's head again", extra={"head": str(head)})
            self._failing = False
        with self._cond:
            self._recorded = head

    def stop(self) -> Anchor | None:
        """Stop the thread; record the final head (raises the state store's error if it
        cannot). Returns the final head."""
        self._log.on_commit(None)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        head = self._latest
        if head is not None and head != self._recorded:
            self._state.record_audit_head(head)
            self._recorded = head
        return head


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
        agent=req.agent,
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


def approve_event(
    caller: Caller, record: ValidationRecord, approval: Approval, *, error: str = ""
) -> AuditEvent:
    """The event of an Approve of ``record``: ``approval`` says why and who (its
    ``approver``); a refused one has ``approved`` False and ``error`` its reason."""
    return _of_record(
        RpcKind.APPROVE,
        caller,
        record,
        env_sha256=record.env_sha256,
        approval=approval,
        outcome=Outcome(error=error),
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
        agent=req.agent,
    )


def policy_event(accepted: Acceptance) -> AuditEvent:
    """The event of the operator's acceptance of a policy reload that drops rules or files
    (not a call: the caller is the acceptance file's owner, pid 0)."""
    text = (
        f"policy {accepted.old_version} -> {accepted.new_version} accepted by the operator\n"
        f"{accepted.change.text()}"
    )
    if accepted.note:
        text += f"\nnote: {accepted.note}"
    return AuditEvent(
        kind=RpcKind.POLICY,
        caller=Caller(uid=accepted.uid, pid=0),
        cwd=accepted.directory,
        effects=text,
    )
