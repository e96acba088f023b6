"""The gRPC servicer: read the request, identify the caller, call the application, answer.

Each RPC converts its protobuf request (``airlock.api.convert``), asks the relay who
the caller is, calls ONE method of :class:`airlock.core.service.Service` (where the
invariants live: slots, the workflow record, the audit log before the answer), converts
the result back, and turns any error into a status in ``_abort`` (``airlock.api.status``).
Nothing else lives here.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from airlock._errors import AirlockError, InvalidRequest, PermissionDenied, ResourceExhausted
from airlock.api import convert
from airlock.api.status import status_code_of, to_rpc_status
from airlock.core.service import Service
from airlock.daemon._peer import PeerProxy
from airlock.types import PeerCred
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["SandboxService", "handler"]

_log = logging.getLogger("airlock.daemon")


class SandboxService(pb_grpc.SandboxServiceServicer):
    def __init__(self, app: Service, proxy: PeerProxy) -> None:
        self._app = app
        self._proxy = proxy

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
        try:
            peer = self._peer(context)
            log.update(uid=peer.uid, pid=peer.pid)
            result = self._app.validate(
                convert.validate_request_from_proto(request),
                peer,
                validation_id=validation_id,
                on_cancel=lambda callback: _on_cancel(context, callback),
            )
            return convert.validation_to_proto(result)
        except Exception as exc:
            _abort(context, exc, log, f"validation_id {validation_id}")

    def Execute(  # noqa: N802
        self, request: pb.ExecuteRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteResponse]:
        """Stream the events of one Execute; an error aborts the call where it happens."""
        execution_id = uuid.uuid4().hex
        log: dict[str, Any] = {"execution_id": execution_id}
        try:
            peer = self._peer(context)
            log.update(uid=peer.uid, pid=peer.pid)
            events = self._app.execute(
                convert.execute_request_from_proto(request),
                peer,
                execution_id=execution_id,
                on_cancel=lambda callback: _on_cancel(context, callback),
            )
            with closing(events):  # a client gone mid-stream ends the run and frees its slot
                yield from convert.exec_events_to_proto(
                    events, process_batches=request.process_batches
                )
        except Exception as exc:
            _abort(context, exc, log, f"execution_id {execution_id}")

    def Approve(self, request: pb.ApproveRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            validation_id, scope = convert.approve_request_from_proto(request)
            special = convert.approve_special_paths_from_proto(request)
            grant = self._app.approve(validation_id, scope, peer, special)
            return convert.approve_response_to_proto(grant)

        return self._answer("Approve", context, call)

    def ListPendingValidations(  # noqa: N802
        self, request: pb.ListPendingValidationsRequest, context: grpc.ServicerContext
    ) -> Any:
        def call(peer: PeerCred) -> Any:
            page, token = self._app.list_pending(peer, request.page_size, request.page_token)
            return pb.ListPendingValidationsResponse(
                validations=[convert.pending_to_proto(p) for p in page], next_page_token=token
            )

        return self._answer("ListPendingValidations", context, call)

    def WatchPendingValidations(  # noqa: N802
        self, request: pb.WatchPendingValidationsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPendingValidationsResponse]:
        """Stream pending validations; a heartbeat is a response without one."""
        try:
            peer = self._peer(context)
            items = self._app.watch_pending(
                peer, on_cancel=lambda callback: _on_cancel(context, callback)
            )
            with closing(items):
                for item in items:
                    if item is None:
                        yield pb.WatchPendingValidationsResponse()
                    else:
                        yield pb.WatchPendingValidationsResponse(
                            validation=convert.pending_to_proto(item)
                        )
        except Exception as exc:
            _abort(context, exc, {"rpc": "WatchPendingValidations"}, "WatchPendingValidations")

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            return convert.apply_response_to_proto(self._app.apply(request.validation_id, peer))

        return self._answer("Apply", context, call)

    def Discard(self, request: pb.DiscardRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call(peer: PeerCred) -> Any:
            self._app.discard(request.validation_id, peer)
            return pb.DiscardResponse(validation_id=request.validation_id)

        return self._answer("Discard", context, call)

    def GetCapabilities(  # noqa: N802
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        return convert.capabilities_to_proto(self._app.capabilities())

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return convert.policy_to_proto(self._app.policy())

    def ListAuditEvents(  # noqa: N802
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        def call(peer: PeerCred) -> Any:
            audit_filter, page_size, page_token = convert.audit_list_request_from_proto(request)
            page, token = self._app.list_audit_events(peer, audit_filter, page_size, page_token)
            return convert.audit_page_to_proto(page, token)

        return self._answer("ListAuditEvents", context, call)

    def VerifyAuditLog(  # noqa: N802
        self, request: pb.VerifyAuditLogRequest, context: grpc.ServicerContext
    ) -> Any:
        def call(peer: PeerCred) -> Any:
            return convert.verify_result_to_proto(self._app.verify_audit_log(peer, request.anchor))

        return self._answer("VerifyAuditLog", context, call)

    def _answer(
        self, rpc: str, context: grpc.ServicerContext, call: Callable[[PeerCred], Any]
    ) -> Any:
        """The response of ``call`` for the caller, or the call aborted with its error's status."""
        try:
            return call(self._peer(context))
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


class _LogBudget:
    """At most ``rate`` lines a second (``rate`` at once after a quiet spell): a flood of
    malformed requests must not flood the log. Lines left out are counted, and the next
    line that is written says how many (``suppressed``)."""

    def __init__(self, rate: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """How many lines were left out since the last one written, or None: leave this out."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                self._suppressed += 1
                return None
            self._tokens -= 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


_MALFORMED_LOG = _LogBudget()
_MAX_LOGGED_ERROR = 200  # characters of the parser's complaint in the log line


def _parsed(
    method: Callable[[Any, grpc.ServicerContext], Any],
    message: Any,
    rpc: str = "",
    peer_of: Callable[[grpc.ServicerContext], PeerCred | None] | None = None,
) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """Parse the request ourselves, so malformed bytes get INVALID_ARGUMENT, not INTERNAL.

    Each malformed request leaves one bounded "rejected" line in the log (rate-limited by
    ``_MALFORMED_LOG``): the method, the caller if known, the size and the parser's error.
    """

    def call(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = message.FromString(raw)
        except DecodeError as exc:
            error = InvalidRequest(
                f"request: not a valid {message.DESCRIPTOR.full_name} ({exc})",
                reason="MALFORMED_REQUEST",
            )
            _log_malformed(rpc, context, peer_of, len(raw), str(exc))
            context.abort_with_status(to_rpc_status(error))
        return method(request, context)

    return call


def _log_malformed(
    rpc: str,
    context: grpc.ServicerContext,
    peer_of: Callable[[grpc.ServicerContext], PeerCred | None] | None,
    size: int,
    why: str,
) -> None:
    suppressed = _MALFORMED_LOG.take()
    if suppressed is None:
        return
    peer = peer_of(context) if peer_of is not None else None
    _log.info(
        "rejected",
        extra={
            "rpc": rpc,
            "uid": peer.uid if peer else None,
            "pid": peer.pid if peer else None,
            "code": "INVALID_ARGUMENT",
            "reason": "MALFORMED_REQUEST",
            "bytes": size,
            "error": why[:_MAX_LOGGED_ERROR],
            "suppressed": suppressed,
        },
    )


def handler(service: SandboxService) -> grpc.GenericRpcHandler:
    """The service's method handlers (equivalent to the generated ``add_..._to_server``)."""

    def peer_of(context: grpc.ServicerContext) -> PeerCred | None:
        return service._proxy.peer_of(context.peer())

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
        "ListPendingValidations": (
            service.ListPendingValidations,
            pb.ListPendingValidationsRequest,
            pb.ListPendingValidationsResponse,
        ),
    }
    streams: dict[str, tuple[Callable[[Any, grpc.ServicerContext], Any], Any, Any]] = {
        "Execute": (service.Execute, pb.ExecuteRequest, pb.ExecuteResponse),
        "WatchPendingValidations": (
            service.WatchPendingValidations,
            pb.WatchPendingValidationsRequest,
            pb.WatchPendingValidationsResponse,
        ),
    }
    return grpc.method_handlers_generic_handler(
        "airlock.v1.SandboxService",
        {
            name: grpc.unary_unary_rpc_method_handler(
                _parsed(method, request, name, peer_of),
                request_deserializer=None,
                response_serializer=response.SerializeToString,
            )
            for name, (method, request, response) in methods.items()
        }
        | {
            name: grpc.unary_stream_rpc_method_handler(
                _parsed(method, request, name, peer_of),
                request_deserializer=None,
                response_serializer=response.SerializeToString,
            )
            for name, (method, request, response) in streams.items()
        },
    )


class _Refusals:
    """Every method of every service, refused with why the connection is over its limit
    (a generic handler: gRPC asks its ``service`` for each call's method handler)."""

    def __init__(self, proxy: PeerProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            why = self._proxy.refusal_of(context.peer()) or "over the daemon's connection limits"
            error = ResourceExhausted(f"connection refused: {why}", reason="TOO_MANY_CONNECTIONS")
            context.abort_with_status(to_rpc_status(error))

        return grpc.unary_unary_rpc_method_handler(refuse)


def refusals(proxy: PeerProxy) -> Any:
    """The handler of the server that over-limit connections are relayed to."""
    return _Refusals(proxy)
