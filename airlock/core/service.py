"""The application: one method per RPC, and the invariants that hold around each.

The daemon's servicer (``airlock/daemon/service.py``) reads the protobuf request
(``airlock.api.convert``), identifies the caller, calls ONE method of :class:`Service`,
and converts its result, or its error (``airlock.api.status``). Everything between the
wire and the parts (the engine, the workflow, the audit log) is here:

* **One request, one spelling.** A Validate or Execute request is checked once
  (:func:`airlock.core.request.check`); that one :class:`CheckedRequest` is what the
  engine runs, the workflow records, the audit log keeps and an approval is matched on.
* **A sandbox slot** is taken before an engine run and always released (``_slot``).
  Execute takes it before it looks at an approval, so a ONCE token is never used up
  by a call that then finds no sandbox free.
* **Recorded before answered.** Every decision (Validate's verdict, Execute's refusal,
  start and end, Approve, Apply, a refused Apply of a real validation, Discard) is in
  the audit log before the method returns or yields it. If the log cannot take it, the
  method raises :class:`~airlock.Unavailable` (``AUDIT_UNAVAILABLE``) instead of
  answering (fail closed). A Validate is in the workflow's state before that.
* **Only root reads the audit log**: it holds every user's commands.

A request refused before anything is decided (malformed, an unknown caller, no free
slot) is not a decision and is not recorded. Pinned by ``tests/unit/core/test_service.py``
(fakes, no gRPC, no root).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Generator, Iterator

from airlock._errors import (
    AirlockError,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
)
from airlock.audit import (
    MAX_PAGE_SIZE,
    Approval,
    AuditEvent,
    AuditFilter,
    AuditLog,
    Authorization,
    Caller,
    StoredEvent,
    VerifyResult,
    parse_anchor,
)
from airlock.core import _audit
from airlock.core.engine import Engine
from airlock.core.request import CheckedRequest, check
from airlock.core.workflow import Workflow
from airlock.policy.store import PolicyStore
from airlock.policy.summary import policy_sentence
from airlock.types import (
    ApplyOutcome,
    ApprovalGrant,
    ApprovalScope,
    Capabilities,
    ExecEvent,
    ExecFinished,
    ExecStarted,
    ExecuteRequest,
    PeerCred,
    PolicyInfo,
    ValidateRequest,
    Validation,
    Verdict,
)

__all__ = ["OnCancel", "Service"]

_log = logging.getLogger("airlock.daemon")
_AUDIT_PAGE_SIZE = 100  # ListAuditEvents' page size when the request sets none

# Registers a run's tear-down callback with the call (run it at once if the call has ended).
OnCancel = Callable[[Callable[[], None]], object]


class Service:
    """The daemon's application, one method per RPC. Thread-safe; one per daemon."""

    def __init__(
        self,
        engine: Engine,
        workflow: Workflow,
        audit: AuditLog,
        policy: PolicyStore,
        capabilities: Capabilities,
    ) -> None:
        self._engine = engine
        self._workflow = workflow
        self._audit = audit
        self._policy = policy
        self._capabilities = capabilities
        self._limits = capabilities.limits
        self._slots = threading.BoundedSemaphore(self._limits.concurrent_validations)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of the sandboxes the daemon runs at once (dry runs and Executes share them)."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the daemon is running its maximum of {self._limits.concurrent_validations} "
                "sandboxes; retry later"
            )
        try:
            yield
        finally:
            self._slots.release()

    # --- Validate -----------------------------------------------------------------------------

    def validate(
        self,
        request: ValidateRequest,
        peer: PeerCred,
        *,
        validation_id: str = "",
        on_cancel: OnCancel | None = None,
    ) -> Validation:
        """Judge ``request`` for ``peer``: recorded, then audited, then returned."""
        validation_id = validation_id or uuid.uuid4().hex
        # The caller's executable, read now: by the end of the dry run it may be gone.
        caller = _audit.caller_of(peer)
        with self._slot():
            req = check(request, peer, self._limits)
            result = self._engine.validate(req, validation_id, on_cancel)
        # So that it can be approved, applied, discarded; its changes may not be kept (quota).
        result = self._workflow.record(result, req)
        # The verdict reaches the client only once the log holds it (fail closed).
        stored = _audit.record(self._audit, _audit.validate_event(caller, req, result))
        _log.info(
            "validated",
            extra={
                "validation_id": validation_id,
                "uid": peer.uid,
                "pid": peer.pid,
                "audit_seq": stored.seq,
                "verdict": result.verdict.name.lower(),
                "termination": result.termination.name.lower(),
                "exit_code": result.exit_code,
                "changes": len(result.changes),
                "total_ms": round(result.timings.total_s * 1000, 2),
                "warm": result.timings.warm,
            },
        )
        return result

    # --- Execute ------------------------------------------------------------------------------

    def execute(
        self,
        request: ExecuteRequest,
        peer: PeerCred,
        *,
        execution_id: str = "",
        on_cancel: OnCancel | None = None,
    ) -> Generator[ExecEvent, None, None]:
        """Run ``request`` for real: ExecStarted, its output, its processes, ExecFinished.

        A refusal (the policy denies, or asks and no approval covers it) raises before
        the first event, once it is audited. Two events are audited for a run: the
        decision before the command starts (so a command never runs unrecorded, even if
        the daemon dies), and the outcome before ExecFinished is yielded.
        """
        execution_id = execution_id or uuid.uuid4().hex
        caller = _audit.caller_of(peer)
        finished: ExecFinished | None = None
        with self._slot():  # before a ONCE token is used up
            # Its cwd is bound read-write: one holding the daemon's socket or state is refused.
            req = check(request, peer, self._limits, protected=self._engine.protected_paths)
            started = self._authorize(caller, req, execution_id)
            plan = self._engine.execute_plan(req, execution_id)
            approval = Approval(approved=True, authorization=Authorization[started.authorization])

            def event(exit_code: int | None, effects: str) -> AuditEvent:
                return _audit.execute_event(
                    caller,
                    req,
                    verdict=started.verdict,
                    findings=started.findings,
                    approval=approval,
                    exit_code=exit_code,
                    effects=effects,
                    execution_id=execution_id,
                )

            _audit.record(self._audit, event(None, "starting"))
            yield started
            for item in self._engine.execute(plan, on_cancel):
                if isinstance(item, ExecFinished):
                    finished = item
                    code = item.exit_code if item.exit_code >= 0 else 128 + item.signal
                    _audit.record(
                        self._audit,
                        event(
                            code,
                            f"finished: {item.termination.name.lower()}, exit {code}, "
                            f"{item.stdout_bytes} B stdout, {item.stderr_bytes} B stderr, "
                            f"{item.wall_s:.3f} s",
                        ),
                    )
                yield item
        _log.info(
            "executed",
            extra={
                "execution_id": execution_id,
                "uid": peer.uid,
                "pid": peer.pid,
                "authorization": started.authorization,
                "exit_code": finished.exit_code if finished else None,
                "termination": finished.termination.name if finished else None,
            },
        )

    def _authorize(self, caller: Caller, req: CheckedRequest, execution_id: str) -> ExecStarted:
        """The Started event of ``req``, or its refusal (audited) raised.

        DENY is refused (POLICY_DENIED, findings in the message). ASK needs an approval
        bound to exactly ``req`` (its token, or a session grant); without one, the
        refusal (APPROVAL_REQUIRED) carries the summary the user must see.
        """
        decision = self._engine.static_decision(req)
        if decision.verdict is Verdict.DENY:
            raise self._refused(
                caller,
                req,
                execution_id,
                Verdict.DENY,
                PermissionDenied(
                    "the policy denies this command: "
                    + "; ".join(f"{f.rule_id}: {f.message}" for f in decision.findings[:5]),
                    reason="POLICY_DENIED",
                ),
            )
        if decision.verdict is Verdict.ASK:
            authorization = self._workflow.authorize(req, decision.policy_version)
            if authorization is None:
                raise self._refused(
                    caller,
                    req,
                    execution_id,
                    Verdict.ASK,
                    FailedPrecondition(
                        "the policy asks before this command runs: "
                        + policy_sentence(Verdict.ASK, decision.findings).strip()
                        + " Validate it, have it approved (Approve), and pass the token.",
                        reason="APPROVAL_REQUIRED",
                    ),
                )
        elif decision.read_only:
            authorization = Authorization.AUTO_APPROVED
        else:
            authorization = Authorization.POLICY_ALLOWED
        return ExecStarted(
            execution_id=execution_id,
            verdict=decision.verdict,
            authorization=authorization.name,
            findings=decision.findings,
            uid=req.uid,
            gid=req.gid,
            policy_version=decision.policy_version,
        )

    def _refused(
        self,
        caller: Caller,
        req: CheckedRequest,
        execution_id: str,
        verdict: Verdict,
        error: AirlockError,
    ) -> AirlockError:
        """``error``, once the refusal of ``req`` is in the audit log (it is a decision)."""
        _audit.record(
            self._audit,
            _audit.execute_event(
                caller, req, verdict=verdict, execution_id=execution_id, error=error.reason
            ),
        )
        return error

    # --- The workflow: Approve, Apply, Discard -----------------------------------------------

    def approve(
        self,
        validation_id: str,
        scope: ApprovalScope,
        peer: PeerCred,
        special_paths: tuple[bytes, ...] = (),
    ) -> ApprovalGrant:
        """Approve validation ``validation_id`` (ONCE or for its SESSION) as ``peer``.

        ``special_paths`` names the validation's special files (setuid, setgid, file
        capabilities, FIFOs, sockets) Apply may then write; it writes no other.
        """
        caller = _audit.caller_of(peer)
        grant, record = self._workflow.approve(validation_id, scope, peer, special_paths)
        named = ""
        if special_paths:
            shown = ", ".join(p.decode("utf-8", "backslashreplace") for p in special_paths)
            named = f", naming special files {shown}"
        approval = Approval(
            approved=True,
            authorization=Authorization.USER_VERIFIED
            if scope is ApprovalScope.ONCE
            else Authorization.SESSION_GRANTED,
            detail=f"{scope.name.lower()} approval {grant.approval_id} by uid {peer.uid}{named}",
        )
        _audit.record(self._audit, _audit.approve_event(caller, record, approval))
        _log.info("approved", extra={"validation_id": validation_id, "uid": peer.uid})
        return grant

    def apply(self, validation_id: str, peer: PeerCred) -> ApplyOutcome:
        """Write the kept changes of ``validation_id`` to the host, exactly once.

        A refused or failed Apply of a real validation is audited with its reason (and
        what was written before a failure); a replayed one acts on nothing and adds nothing.
        """
        caller = _audit.caller_of(peer)
        try:
            outcome, record = self._workflow.apply(
                validation_id, peer, self._engine.apply_changeset
            )
        except AirlockError as exc:
            refused = self._workflow.find(validation_id)
            if refused is not None:
                partial = getattr(exc, "partial", ())  # written before a failure
                _audit.record(
                    self._audit,
                    _audit.apply_event(caller, refused, applied_paths=partial, error=exc.reason),
                )
            raise
        if not outcome.replayed:
            _audit.record(
                self._audit,
                _audit.apply_event(
                    caller,
                    record,
                    applied_paths=outcome.applied_paths,
                    approval=Approval(
                        approved=True,
                        authorization=record.auth_context or Authorization.USER_VERIFIED,
                    ),
                    effects=f"applied {len(outcome.applied_paths)} path(s), "
                    f"{outcome.bytes_written} B; changes digest {record.diff_hash}",
                ),
            )
        _log.info(
            "applied",
            extra={
                "validation_id": validation_id,
                "uid": peer.uid,
                "paths": len(outcome.applied_paths),
                "replayed": outcome.replayed,
            },
        )
        return outcome

    def discard(self, validation_id: str, peer: PeerCred) -> None:
        """Drop the changes ``validation_id`` kept for Apply."""
        caller = _audit.caller_of(peer)
        record = self._workflow.discard(validation_id, peer)
        _audit.record(self._audit, _audit.discard_event(caller, record))

    # --- What the daemon is -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def policy(self) -> PolicyInfo:
        return self._policy.info()

    # --- The audit log ------------------------------------------------------------------------

    def list_audit_events(
        self, peer: PeerCred, audit_filter: AuditFilter, page_size: int, page_token: str | None
    ) -> tuple[list[StoredEvent], str | None]:
        """One page of the events ``audit_filter`` selects (page_size 0: the default)."""
        _check_audit_reader(peer)
        if page_size < 0:
            raise InvalidRequest(
                f"page_size must not be negative, not {page_size}", reason="INVALID_PAGE_SIZE"
            )
        # AIP-158: unset means the default, above the maximum means the maximum.
        page_size = min(page_size or _AUDIT_PAGE_SIZE, MAX_PAGE_SIZE)
        return self._audit.list(audit_filter, page_size, page_token)

    def verify_audit_log(self, peer: PeerCred, anchor_text: str = "") -> VerifyResult:
        """Walk the audit log's chain (up to the anchor ``SEQ:HASH``, if one is given)."""
        _check_audit_reader(peer)
        anchor = parse_anchor(anchor_text) if anchor_text else None
        result = self._audit.verify(anchor)
        problem = result.problem
        (_log.info if problem is None else _log.warning)(
            "audit log verified",
            extra={
                "uid": peer.uid,
                "pid": peer.pid,
                "ok": result.ok,
                "events": result.events,
                "head": str(result.head) if result.head else "",
                "anchor": str(anchor) if anchor else "",
                "problem": problem.kind.name if problem else "",
                "problem_seq": problem.seq if problem else 0,
            },
        )
        return result


def _check_audit_reader(peer: PeerCred) -> None:
    """Only root reads the audit log: it holds every user's commands and callers."""
    if peer.uid != 0:
        raise PermissionDenied(
            "only root may read the audit log: it holds every user's commands",
            reason="AUDIT_NOT_ALLOWED",
        )
