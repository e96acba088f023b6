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
import dataclasses
import logging
import os
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
    Approver,
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
from airlock.core.ids import checked_id
from airlock.core.pending import PendingBoard
from airlock.core.request import CheckedRequest, check
from airlock.core.state import ValidationRecord, ValidationState
from airlock.core.workflow import Workflow
from airlock.policy.store import Acceptance, PolicyStore
from airlock.policy.summary import execute_network_summary, policy_sentence
from airlock.sandbox.apply import Recovery
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
    PendingValidation,
    PolicyInfo,
    ValidateRequest,
    Validation,
    Verdict,
)

__all__ = ["OnCancel", "Service"]

_log = logging.getLogger("airlock.daemon")
_AUDIT_PAGE_SIZE = 100  # ListAuditEvents' page size when the request sets none
_PENDING_PAGE_SIZE = 100  # ListPendingValidations' default and largest page

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
        pending: PendingBoard | None = None,
    ) -> None:
        self._pending = pending or PendingBoard()
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
        self._pending.post(result, req.agent)  # for approvers to review, and watches
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
        the daemon or the machine dies), and the outcome before ExecFinished is yielded
        (written; durable with the next fsynced commit).
        """
        execution_id = execution_id or uuid.uuid4().hex
        caller = _audit.caller_of(peer)
        finished: ExecFinished | None = None
        with self._slot():  # before a ONCE token is used up
            # Its cwd is bound read-write: one holding the daemon's socket or state is refused.
            req = check(
                request,
                peer,
                self._limits,
                protected=self._engine.protected_paths,
                max_cwd_bytes=self._engine.execute_cwd_bytes,
            )
            started = self._authorize(caller, req, execution_id)
            plan = self._engine.execute_plan(req, execution_id)
            approval = Approval(
                approved=True,
                authorization=Authorization[started.authorization],
                # Who approved an ask this runs on (the approval's own event has the rest).
                detail=self._workflow.approver_of(req, started.policy_version)
                if started.verdict is Verdict.ASK
                else "",
            )

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
                    network = execute_network_summary(
                        item.network_attempts, item.network_attempts_lost
                    )
                    # The outcome is written before ExecFinished goes out, without waiting
                    # for the fsync: the decision ("starting") was fsynced before the command
                    # ran, and the next fsynced commit makes this one durable too (§47).
                    _audit.record(
                        self._audit,
                        event(
                            code,
                            f"finished: {item.termination.name.lower()}, exit {code}, "
                            f"{item.stdout_bytes} B stdout, {item.stderr_bytes} B stderr, "
                            f"{item.wall_s:.3f} s" + (f". {network}" if network else ""),
                        ),
                        durable=False,
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
        capabilities, device nodes) Apply may then write; it writes no other (FIFOs and
        sockets may be named, but Apply writes them unnamed too).
        """
        checked_id("validation_id", validation_id)
        caller = _audit.caller_of(peer)
        try:
            grant, record, basis = self._workflow.approve(validation_id, scope, peer, special_paths)
        except PermissionDenied as exc:
            refused = self._workflow.find(validation_id)
            if refused is not None and exc.reason in (
                "SELF_APPROVAL_NOT_ALLOWED",
                "NOT_AN_APPROVER",
            ):
                # Someone who may not approve tried (an agent approving its own ask?): evidence.
                _audit.record(
                    self._audit,
                    _audit.approve_event(
                        caller,
                        refused,
                        Approval(
                            approved=False,
                            authorization=Authorization.USER_VERIFIED,
                            detail=f"refused: uid {peer.uid} may not approve uid "
                            f"{refused.uid}'s validation ({exc.reason})",
                            approver=Approver(
                                uid=peer.uid,
                                gid=peer.gid,
                                asked_by_uid=refused.uid,
                                asked_by_gid=refused.gid,
                                basis=f"refused: {exc.reason}",
                            ),
                        ),
                        error=exc.reason,
                    ),
                )
            raise
        named = ""
        if special_paths:
            shown = ", ".join(p.decode("utf-8", "backslashreplace") for p in special_paths)
            named = f", naming special files {shown}"
        approval = Approval(
            approved=True,
            authorization=Authorization.USER_VERIFIED
            if scope is ApprovalScope.ONCE
            else Authorization.SESSION_GRANTED,
            detail=f"{scope.name.lower()} approval {grant.approval_id} by uid {peer.uid} "
            f"({basis}) of uid {record.uid}'s validation{named}",
            approver=Approver(
                uid=peer.uid,
                gid=peer.gid,
                asked_by_uid=record.uid,
                asked_by_gid=record.gid,
                basis=basis,
            ),
        )
        _audit.record(self._audit, _audit.approve_event(caller, record, approval))
        _log.info("approved", extra={"validation_id": validation_id, "uid": peer.uid})
        return grant

    def apply(self, validation_id: str, peer: PeerCred) -> ApplyOutcome:
        """Write the kept changes of ``validation_id`` to the host, exactly once.

        A refused or failed Apply of a real validation is audited with its reason (and
        what was written before a failure); a replayed one acts on nothing and adds nothing.
        """
        checked_id("validation_id", validation_id)
        caller = _audit.caller_of(peer)

        def begun(record: ValidationRecord) -> None:  # before anything is written
            _audit.record(
                self._audit,
                _audit.apply_event(
                    caller,
                    record,
                    applied_paths=(),
                    effects=f"starting: changes digest {record.diff_hash}",
                ),
            )

        def written(record: ValidationRecord, outcome: ApplyOutcome) -> None:
            # Before the apply is marked done: a crash in between leaves it to recovery.
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

        try:
            outcome, _record = self._workflow.apply(
                validation_id, peer, self._engine.apply_changeset, begun, written
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

    def recover(self) -> None:
        """At start-up, before serving: settle every apply a crash interrupted (rolled forward
        or back on the host, path by path: ``Workflow.recover``) and audit what was found."""
        caller = _audit.caller_of(PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid()))

        def roll(record: ValidationRecord) -> Recovery | None:
            return self._engine.recover_changeset(record.changeset_dir, record.uid, record.gid)

        for record, found, error in self._workflow.recover(roll):
            effects = "recovered at start-up after the daemon stopped during this apply: "
            if found is None and not error:
                effects += "it had written nothing; the validation may be applied again"
            elif found is not None:
                effects += _recovery_text(found)
            outcome_error = error or (
                "" if found is None or found.consistent else "APPLY_INTERRUPTED"
            )
            _audit.record(
                self._audit,
                _audit.apply_event(
                    caller,
                    record,
                    applied_paths=found.after if found is not None else (),
                    effects=effects + (f"; recovery failed: {error}" if error else ""),
                    error=outcome_error,
                ),
            )
            _log.warning(
                "interrupted apply recovered",
                extra={
                    "validation_id": record.validation_id,
                    "state": record.state.value,
                    "direction": found.direction if found is not None else "none",
                    "error": error,
                },
            )

    def discard(self, validation_id: str, peer: PeerCred) -> None:
        """Drop the changes ``validation_id`` kept for Apply."""
        checked_id("validation_id", validation_id)
        caller = _audit.caller_of(peer)
        record = self._workflow.discard(validation_id, peer)
        _audit.record(self._audit, _audit.discard_event(caller, record))

    # --- Pending validations: ListPendingValidations, WatchPendingValidations ---------------

    def _pending_of(self, record: ValidationRecord) -> PendingValidation:
        validation, agent = self._pending.details(record.validation_id)
        return PendingValidation(
            validation_id=record.validation_id,
            command=record.command,
            cwd=record.cwd,
            uid=record.uid,
            gid=record.gid,
            session_id=record.session_id,
            summary=record.summary,
            created_at=record.created_at,
            expires_at=record.expires_at,
            agent=agent,
            validation=validation,
        )

    def list_pending(
        self, peer: PeerCred, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[PendingValidation], str]:
        """One page of the validations waiting for an approval, oldest first: everyone's
        for an approver, the caller's own otherwise; and the next page's token ("": last)."""
        if page_size < 0:
            raise InvalidRequest(
                f"page_size must not be negative, not {page_size}", reason="INVALID_PAGE_SIZE"
            )
        size = min(page_size or _PENDING_PAGE_SIZE, _PENDING_PAGE_SIZE)
        after = None
        if page_token:
            created, sep, last = page_token.partition(":")
            try:
                after = (float(created), last)
            except ValueError:
                sep = ""
            if not sep or not last.isalnum():
                raise InvalidRequest(
                    "page_token is not one that ListPendingValidations returned",
                    reason="INVALID_PAGE_TOKEN",
                )
        uid = None if self._workflow.approvers.is_approver(peer) else peer.uid
        records = self._workflow.state.pending(uid=uid, after=after, limit=size + 1)
        token = ""
        if len(records) > size:
            records = records[:size]
            token = f"{records[-1].created_at!r}:{records[-1].validation_id}"
        return [self._pending_of(r) for r in records], token

    def watch_pending(
        self, peer: PeerCred, on_cancel: OnCancel | None = None
    ) -> Generator[PendingValidation | None, None, None]:
        """The validations that wait for an approval now (up to a page), then each new ask
        as it comes, that ``peer`` may see (as ``list_pending``); None is a heartbeat. Ends
        after the board's ``max_watch_s`` (open another), when the daemon drains, or when
        the call is cancelled. At most a few at once (TOO_MANY_WATCHES, raised before the
        first item)."""
        watch = self._pending.watch(peer)
        try:
            cancelled = threading.Event()
            if on_cancel is not None:
                wake = self._pending.wake()

                def cancel() -> None:
                    cancelled.set()
                    wake()

                on_cancel(cancel)
            approver = self._workflow.approvers.is_approver(peer)
            shown: set[str] = set()
            for item in self.list_pending(peer)[0]:
                shown.add(item.validation_id)
                yield item
            while (ids := watch.next(cancelled)) is not None:
                if not ids:
                    yield None
                for vid in ids:
                    record = self._workflow.find(vid)
                    if (
                        vid in shown
                        or record is None
                        or record.state is not ValidationState.PENDING_APPROVAL
                        or not (approver or record.uid == peer.uid)
                    ):
                        continue
                    yield self._pending_of(record)
                shown.clear()  # only the first batch can repeat the list
        finally:
            watch.close()

    def close(self) -> None:
        """The daemon is draining: end every watch, so that none holds a thread."""
        self._pending.close()

    # --- What the daemon is -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        # Whether a caller may approve its own ask: the approvers in force, for the CLI to
        # offer that approval only when the daemon would accept it.
        self_approval = self._workflow.approvers.allow_self_approval
        if self._capabilities.allow_self_approval == self_approval:
            return self._capabilities
        return dataclasses.replace(self._capabilities, allow_self_approval=self_approval)

    def policy(self) -> PolicyInfo:
        return self._policy.info()

    def policy_accepted(self, accepted: Acceptance) -> None:
        """Record the operator's acceptance of a policy reload that drops rules or files
        (the policy store's ``on_accept``). Raises :class:`Unavailable` if the log cannot
        take it: the store then keeps the bundle in force."""
        _audit.record(self._audit, _audit.policy_event(accepted))

    # --- The audit log ------------------------------------------------------------------------

    def list_audit_events(
        self, peer: PeerCred, audit_filter: AuditFilter, page_size: int, page_token: str | None
    ) -> tuple[list[StoredEvent], str | None]:
        """One page of the events ``audit_filter`` selects (page_size 0: the default)."""
        _check_audit_reader(peer)
        checked_id("rule_id", audit_filter.rule_id or "")
        checked_id("session_id", audit_filter.session_id or "")
        checked_id("page_token", page_token or "")
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
        anchor = parse_anchor(checked_id("anchor", anchor_text)) if anchor_text else None
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


def _recovery_text(found: Recovery) -> str:
    """What recovery did, path by path (the first few of each kind named, all counted)."""

    def some(paths: tuple[bytes, ...]) -> str:
        shown = ", ".join(p.decode("utf-8", "backslashreplace") for p in paths[:5])
        return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

    parts = [f"rolled {found.direction}" if found.direction != "stuck" else "could not settle it"]
    if found.after:
        parts.append(f"{len(found.after)} path(s) as applied ({some(found.after)})")
    if found.before:
        parts.append(f"{len(found.before)} path(s) as before ({some(found.before)})")
    if found.written:
        parts.append(f"{len(found.written)} written by recovery")
    if found.neither:
        shown = "; ".join(
            f"{p.decode('utf-8', 'backslashreplace')}: {why}" for p, why in found.neither[:5]
        )
        parts.append(f"{len(found.neither)} in neither state ({shown})")
    parts.append(f"{len(found.removed)} temporary or set-aside entries removed")
    if found.error:
        parts.append(found.error)
    return "; ".join(parts)
