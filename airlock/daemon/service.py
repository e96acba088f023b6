"""The gRPC servicer: convert, call the engine, map errors. Nothing else lives here."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import threading
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from airlock._errors import (
    AirlockError,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
)
from airlock.api import convert
from airlock.api.status import status_code_of, to_rpc_status
from airlock.audit import (
    MAX_PAGE_SIZE,
    Approval,
    AuditEvent,
    AuditLog,
    Authorization,
    env_sha256,
    parse_anchor,
)
from airlock.core import _audit
from airlock.core.engine import Engine
from airlock.core.state import ApprovalScope
from airlock.core.workflow import Workflow
from airlock.daemon._peer import PeerProxy
from airlock.policy.store import PolicyStore
from airlock.types import Capabilities, ExecFinished, PeerCred, Verdict
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["SandboxService", "handler"]

_log = logging.getLogger("airlock.daemon")
_AUDIT_PAGE_SIZE = 100  # ListAuditEvents' page size when the request sets none


class SandboxService(pb_grpc.SandboxServiceServicer):
    def __init__(
        self,
        engine: Engine,
        proxy: PeerProxy,
        capabilities: Capabilities,
        policy: PolicyStore,
        workflow: Workflow | None = None,
        *,
        audit: AuditLog,
    ) -> None:
        self._audit = audit
        self._workflow = workflow
        self._engine = engine
        self._policy = policy
        self._proxy = proxy
        self._capabilities = capabilities
        self._slots = threading.BoundedSemaphore(capabilities.limits.concurrent_validations)

    def _take_slot(self) -> None:
        """One of the sandboxes the daemon runs at once (dry runs and Executes share them)."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the daemon is running its maximum of "
                f"{self._capabilities.limits.concurrent_validations} sandboxes; retry later"
            )

    def _peer(self, context: grpc.ServicerContext) -> PeerCred:
        peer = self._proxy.peer_of(context.peer())
        if peer is None:
            raise PermissionDenied(
                "the caller's identity is unknown: connect through the daemon's public socket",
                reason="UNKNOWN_CALLER",
            )
        return peer

    def Validate(self, request: pb.ValidateRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        validation_id = uuid.uuid4().hex
        log: dict[str, Any] = {"validation_id": validation_id}

        def on_cancel(callback: Callable[[], None]) -> None:
            if not context.add_callback(callback):
                callback()  # the call has already ended

        try:
            peer = self._peer(context)
            log.update(uid=peer.uid, pid=peer.pid)
            # The caller's executable, read now: by the end of the dry run it may be gone.
            caller = _audit.caller_of(peer)
            self._take_slot()
            try:
                req = convert.validate_request_from_proto(request)
                result = self._engine.validate(req, peer, on_cancel, validation_id)
            finally:
                self._slots.release()
            if self._workflow is not None:  # so that it can be approved, applied, discarded
                self._workflow.record(
                    result,
                    req,
                    peer,
                    cwd=posixpath.normpath(req.cwd),
                    env_sha256=env_sha256(req.env),
                    diff_hash=result.changes_digest,
                    changeset_dir=result.changeset_dir,
                    changeset_bytes=result.changeset_bytes,
                )
            # The verdict reaches the client only once the log holds it (fail closed).
            stored = _audit.record(self._audit, _audit.validate_event(caller, req, result))
            _log.info(
                "validated",
                extra={
                    **log,
                    "audit_seq": stored.seq,
                    "verdict": result.verdict.name.lower(),
                    "termination": result.termination.name.lower(),
                    "exit_code": result.exit_code,
                    "changes": len(result.changes),
                    "total_ms": round(result.timings.total_s * 1000, 2),
                    "warm": result.timings.warm,
                },
            )
            return convert.validation_to_proto(result)
        except Exception as exc:
            _abort(context, exc, log, f"validation_id {validation_id}")

    def Execute(self, request: pb.ExecuteRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Stream the events of one Execute; errors before the start abort the call."""
        execution_id = uuid.uuid4().hex
        log: dict[str, Any] = {"execution_id": execution_id}
        try:
            peer = self._peer(context)
            caller = _audit.caller_of(peer)
            log.update(uid=peer.uid, pid=peer.pid)
            req = convert.execute_request_from_proto(request)
            self._take_slot()  # before a ONCE token is used up
            finished: ExecFinished | None = None
            try:
                try:
                    started, cwd, timeout, who = self._engine.authorize_execute(
                        req,
                        peer,
                        self._workflow.authorize if self._workflow else None,
                        execution_id,
                    )
                except (PermissionDenied, FailedPrecondition) as refused:
                    if refused.reason in ("POLICY_DENIED", "APPROVAL_REQUIRED"):  # decisions
                        _audit.record(
                            self._audit,
                            _audit.execute_event(
                                caller,
                                command=req.command,
                                cwd=req.cwd,
                                env=req.env,
                                verdict=Verdict.DENY
                                if refused.reason == "POLICY_DENIED"
                                else Verdict.ASK,
                                execution_id=execution_id,
                                session_id=req.session_id,
                                error=refused.reason,
                            ),
                        )
                    raise
                plan = self._engine.execute_plan(req, cwd, timeout, who, execution_id)
                log.update(authorization=started.authorization)
                approval = Approval(
                    approved=True, authorization=Authorization[started.authorization]
                )

                def event(exit_code: int | None, effects: str) -> AuditEvent:
                    return _audit.execute_event(
                        caller,
                        command=req.command,
                        cwd=cwd,
                        env=req.env,
                        verdict=started.verdict,
                        findings=started.findings,
                        approval=approval,
                        exit_code=exit_code,
                        effects=effects,
                        execution_id=execution_id,
                        session_id=req.session_id,
                    )

                # Two events: the decision before anything runs (so a command never runs
                # unrecorded, even if the daemon dies), the outcome after.
                _audit.record(self._audit, event(None, "starting"))
                yield convert.exec_event_to_proto(started)
                for item in self._engine.execute(plan, lambda cb: _on_cancel(context, cb)):
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
                    yield convert.exec_event_to_proto(item)
            finally:
                self._slots.release()
            _log.info(
                "executed",
                extra={
                    **log,
                    "exit_code": getattr(finished, "exit_code", None),
                    "termination": getattr(getattr(finished, "termination", None), "name", None),
                },
            )
            return
        except Exception as exc:
            _abort(context, exc, log, f"execution_id {execution_id}")

    def _unary(
        self, context: grpc.ServicerContext, what: str, call: Callable[[PeerCred], Any]
    ) -> Any:
        """Run ``call`` for the caller (the workflow RPCs); errors become a status."""

        def run() -> Any:
            if self._workflow is None:
                raise AirlockError("this daemon keeps no workflow state", reason="NO_STATE")
            return call(self._peer(context))

        return self._answer(what, context, run)

    def Approve(self, request: pb.ApproveRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            assert self._workflow is not None
            if request.scope not in (pb.APPROVAL_SCOPE_ONCE, pb.APPROVAL_SCOPE_SESSION):
                raise InvalidRequest(
                    "scope: must be APPROVAL_SCOPE_ONCE or APPROVAL_SCOPE_SESSION",
                    reason="INVALID_SCOPE",
                )
            caller = _audit.caller_of(peer)
            scope = ApprovalScope(int(request.scope))
            grant = self._workflow.approve(request.validation_id, scope, peer)
            record = self._workflow.state.get(request.validation_id)
            _audit.record(
                self._audit,
                _audit.approve_event(
                    caller,
                    validation_id=request.validation_id,
                    approval=Approval(
                        approved=True,
                        authorization=Authorization.USER_VERIFIED
                        if scope is ApprovalScope.ONCE
                        else Authorization.SESSION_GRANTED,
                        detail=f"{scope.name.lower()} approval {grant.approval_id} by uid "
                        f"{peer.uid}",
                    ),
                    command=record.command,
                    cwd=record.cwd,
                    env_sha256=record.env_sha256,
                    verdict=record.verdict,
                    session_id=record.session_id,
                ),
            )
            _log.info(
                "approved",
                extra={"validation_id": request.validation_id, "uid": peer.uid},
            )
            return convert.approve_response_to_proto(grant)

        return self._unary(context, "Approve", call)

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            assert self._workflow is not None
            caller = _audit.caller_of(peer)
            try:
                outcome, record = self._workflow.apply(request.validation_id, peer)
            except AirlockError as exc:
                with_record = None
                with contextlib.suppress(AirlockError):
                    with_record = self._workflow.state.get(request.validation_id)
                if with_record is not None:  # a refused or failed apply of a real validation
                    _audit.record(
                        self._audit,
                        _audit.apply_event(
                            caller,
                            validation_id=request.validation_id,
                            applied_paths=getattr(exc, "partial", ()),
                            command=with_record.command,
                            cwd=with_record.cwd,
                            env_sha256=with_record.env_sha256,
                            verdict=with_record.verdict,
                            session_id=with_record.session_id,
                            error=exc.reason,
                        ),
                    )
                raise
            if not outcome.replayed:
                _audit.record(
                    self._audit,
                    _audit.apply_event(
                        caller,
                        validation_id=request.validation_id,
                        applied_paths=outcome.applied_paths,
                        command=record.command,
                        cwd=record.cwd,
                        env_sha256=record.env_sha256,
                        verdict=record.verdict,
                        approval=Approval(
                            approved=True,
                            authorization=record.auth_context or Authorization.USER_VERIFIED,
                        ),
                        effects=f"applied {len(outcome.applied_paths)} path(s), "
                        f"{outcome.bytes_written} B; changes digest {record.diff_hash}",
                        session_id=record.session_id,
                    ),
                )
            _log.info(
                "applied",
                extra={
                    "validation_id": request.validation_id,
                    "uid": peer.uid,
                    "paths": len(outcome.applied_paths),
                    "replayed": outcome.replayed,
                },
            )
            return convert.apply_response_to_proto(outcome)

        return self._unary(context, "Apply", call)

    def Discard(self, request: pb.DiscardRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            assert self._workflow is not None
            caller = _audit.caller_of(peer)
            record = self._workflow.discard(request.validation_id, peer)
            _audit.record(
                self._audit,
                _audit.discard_event(
                    caller,
                    validation_id=request.validation_id,
                    command=record.command,
                    cwd=record.cwd,
                    verdict=record.verdict,
                    session_id=record.session_id,
                ),
            )
            return pb.DiscardResponse(validation_id=request.validation_id)

        return self._unary(context, "Discard", call)

    def GetCapabilities(  # noqa: N802
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        return convert.capabilities_to_proto(self._capabilities)

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return convert.policy_to_proto(self._policy.info())

    # --- The audit log --------------------------------------------------------------------

    def _audit_reader(self, context: grpc.ServicerContext) -> PeerCred:
        """Only root reads the audit log: it holds every user's commands and callers."""
        peer = self._peer(context)
        if peer.uid != 0:
            raise PermissionDenied(
                "only root may read the audit log: it holds every user's commands",
                reason="AUDIT_NOT_ALLOWED",
            )
        return peer

    def ListAuditEvents(  # noqa: N802
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        def call() -> Any:
            self._audit_reader(context)
            audit_filter, page_size, page_token = convert.audit_list_request_from_proto(request)
            if page_size < 0:
                raise InvalidRequest(
                    f"page_size must not be negative, not {page_size}",
                    reason="INVALID_PAGE_SIZE",
                )
            # AIP-158: unset means the default, above the maximum means the maximum.
            page_size = min(page_size or _AUDIT_PAGE_SIZE, MAX_PAGE_SIZE)
            page, token = self._audit.list(audit_filter, page_size, page_token)
            return convert.audit_page_to_proto(page, token)

        return self._answer("ListAuditEvents", context, call)

    def VerifyAuditLog(  # noqa: N802
        self, request: pb.VerifyAuditLogRequest, context: grpc.ServicerContext
    ) -> Any:
        def call() -> Any:
            peer = self._audit_reader(context)
            anchor = parse_anchor(request.anchor) if request.anchor else None
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
            return convert.verify_result_to_proto(result)

        return self._answer("VerifyAuditLog", context, call)

    def _answer(self, rpc: str, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        """The response of ``call``, or the call aborted with its error's status."""
        try:
            return call()
        except Exception as exc:
            _abort(context, exc, {"rpc": rpc}, rpc)


def _abort(
    context: grpc.ServicerContext, exc: Exception, log: dict[str, Any], where: str
) -> NoReturn:
    """End the call with ``exc``'s status: an AirlockError as it is, anything else as INTERNAL
    (its traceback goes to the daemon's log, never to the client)."""
    if isinstance(exc, AirlockError):
        error = exc
    else:
        _log.error("internal error", exc_info=exc, extra=log)
        error = AirlockError(
            f"internal error in the daemon ({where}); see its log", reason="INTERNAL"
        )
    _log.info(
        "rejected",
        extra={
            **log,
            "code": status_code_of(error).name,
            "reason": error.reason,
            "error": error.message,
        },
    )
    context.abort_with_status(to_rpc_status(error))
    raise AssertionError("unreachable")  # abort_with_status raises


def _on_cancel(context: grpc.ServicerContext, callback: Callable[[], None]) -> None:
    if not context.add_callback(callback):
        callback()  # the call has already ended


def _parsed(
    method: Callable[[Any, grpc.ServicerContext], Any], message: Any
) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """Parse the request ourselves, so malformed bytes get INVALID_ARGUMENT, not INTERNAL."""

    def call(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = message.FromString(raw)
        except DecodeError as exc:
            error = InvalidRequest(
                f"request: not a valid {message.DESCRIPTOR.full_name} ({exc})",
                reason="MALFORMED_REQUEST",
            )
            context.abort_with_status(to_rpc_status(error))
        return method(request, context)

    return call


def handler(service: SandboxService) -> grpc.GenericRpcHandler:
    """The service's method handlers (equivalent to the generated ``add_..._to_server``)."""
    methods: dict[str, tuple[Callable[[Any, grpc.ServicerContext], Any], Any, Any]] = {
        "Validate": (service.Validate, pb.ValidateRequest, pb.ValidateResponse),
        "GetCapabilities": (
            service.GetCapabilities,
            pb.GetCapabilitiesRequest,
            pb.GetCapabilitiesResponse,
        ),
        "GetPolicy": (service.GetPolicy, pb.GetPolicyRequest, pb.GetPolicyResponse),
        "ListAuditEvents": (
            service.ListAuditEvents,
            pb.ListAuditEventsRequest,
            pb.ListAuditEventsResponse,
        ),
        "VerifyAuditLog": (
            service.VerifyAuditLog,
            pb.VerifyAuditLogRequest,
            pb.VerifyAuditLogResponse,
        ),
        "Approve": (service.Approve, pb.ApproveRequest, pb.ApproveResponse),
        "Apply": (service.Apply, pb.ApplyRequest, pb.ApplyResponse),
        "Discard": (service.Discard, pb.DiscardRequest, pb.DiscardResponse),
    }
    streams: dict[str, tuple[Callable[[Any, grpc.ServicerContext], Any], Any, Any]] = {
        "Execute": (service.Execute, pb.ExecuteRequest, pb.ExecuteResponse),
    }
    return grpc.method_handlers_generic_handler(
        "airlock.v1.SandboxService",
        {
            name: grpc.unary_unary_rpc_method_handler(
                _parsed(method, request),
                request_deserializer=None,
                response_serializer=response.SerializeToString,
            )
            for name, (method, request, response) in methods.items()
        }
        | {
            name: grpc.unary_stream_rpc_method_handler(
                _parsed(method, request),
                request_deserializer=None,
                response_serializer=response.SerializeToString,
            )
            for name, (method, request, response) in streams.items()
        },
    )
