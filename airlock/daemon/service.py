"""The gRPC servicer: convert, call the engine, map errors. Nothing else lives here."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from airlock import _convert
from airlock._errors import AirlockError, InvalidRequest, PermissionDenied, ResourceExhausted
from airlock._status import status_code_of, to_rpc_status
from airlock.daemon._peer import PeerProxy
from airlock.engine import Engine
from airlock.policy.store import PolicyStore
from airlock.types import Capabilities, PeerCred
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["SandboxService", "handler"]

_log = logging.getLogger("airlock.daemon")


class SandboxService(pb_grpc.SandboxServiceServicer):
    def __init__(
        self, engine: Engine, proxy: PeerProxy, capabilities: Capabilities, policy: PolicyStore
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._proxy = proxy
        self._capabilities = capabilities
        self._slots = threading.BoundedSemaphore(capabilities.limits.concurrent_validations)

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

        error: AirlockError
        try:
            peer = self._peer(context)
            log.update(uid=peer.uid, pid=peer.pid)
            if not self._slots.acquire(blocking=False):
                raise ResourceExhausted(
                    f"the daemon is running its maximum of "
                    f"{self._capabilities.limits.concurrent_validations} validations; retry later"
                )
            try:
                req = _convert.validate_request_from_proto(request)
                result = self._engine.validate(req, peer, on_cancel, validation_id)
            finally:
                self._slots.release()
            _log.info(
                "validated",
                extra={
                    **log,
                    "verdict": result.verdict.name.lower(),
                    "termination": result.termination.name.lower(),
                    "exit_code": result.exit_code,
                    "changes": len(result.changes),
                    "total_ms": round(result.timings.total_s * 1000, 2),
                    "warm": result.timings.warm,
                },
            )
            return _convert.validation_to_proto(result)
        except AirlockError as exc:
            error = exc
        except Exception:
            _log.exception("internal error", extra=log)
            error = AirlockError(
                f"internal error in the daemon (validation_id {validation_id}); see its log",
                reason="INTERNAL",
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

    def GetCapabilities(  # noqa: N802
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        return _convert.capabilities_to_proto(self._capabilities)

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _convert.policy_to_proto(self._policy.info())


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
        },
    )
