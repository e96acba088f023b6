"""Airlock errors <-> gRPC status, in one place, shared by the daemon and the client.

Each class of :mod:`airlock._errors` maps to one gRPC status code. The status carries
a ``google.rpc.Status`` (trailer ``grpc-status-details-bin``) whose details hold one
``google.rpc.ErrorInfo`` with ``domain="airlock.dev"`` and the error's stable
``reason``. The daemon aborts with :func:`to_rpc_status`::

    context.abort_with_status(to_rpc_status(err))

and the client turns what it receives back into the same class with
:func:`from_rpc_error`. A status that gRPC itself produced (no ErrorInfo: the daemon
is unreachable, a deadline passed, a message was too large) still maps to the class of
its code, with the code's name as the reason.
"""

from __future__ import annotations

import grp
import os
import stat
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from airlock._errors import (
    AirlockError,
    ApplyIncomplete,
    Cancelled,
    Conflict,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    SandboxError,
    Unavailable,
)

__all__ = ["DOMAIN", "from_rpc_error", "status_code_of", "to_rpc_status"]

DOMAIN = "airlock.dev"

_CODE_OF_CLASS: dict[type[AirlockError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Cancelled: grpc.StatusCode.CANCELLED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    SandboxError: grpc.StatusCode.INTERNAL,
    Conflict: grpc.StatusCode.ABORTED,
    ApplyIncomplete: grpc.StatusCode.UNKNOWN,
    AirlockError: grpc.StatusCode.UNKNOWN,
}
# Reasons with a code of their own, for errors of a class that lives outside airlock._errors
# (the state store's StateError, which a client must not import): the store could not be read
# or written, or is closed because the daemon is stopping. Either way the call may succeed
# later, which is what UNAVAILABLE tells a client; UNKNOWN told it nothing.
_CODE_OF_REASON: dict[str, grpc.StatusCode] = {
    Reason.STATE_STORE_FAILED: grpc.StatusCode.UNAVAILABLE,
    Reason.STATE_STORE_CLOSED: grpc.StatusCode.UNAVAILABLE,
}
# The class a client raises for a code: the most general one mapped to it (not a subclass that
# shares its base's code, such as ApplyIncomplete, whose data the status does not carry).
_CLASS_OF_CODE: dict[grpc.StatusCode, type[AirlockError]] = {
    code: cls for cls, code in _CODE_OF_CLASS.items() if _CODE_OF_CLASS.get(cls.__mro__[1]) != code
}


def status_code_of(err: AirlockError) -> grpc.StatusCode:
    """The gRPC status code of an error: that of its nearest mapped class, unless the class
    maps to UNKNOWN and its reason has a code of its own (``_CODE_OF_REASON``)."""
    for cls in type(err).__mro__:
        code = _CODE_OF_CLASS.get(cls)
        if code is grpc.StatusCode.UNKNOWN:
            return _CODE_OF_REASON.get(err.reason, code)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN  # pragma: no cover - AirlockError is always in the MRO


def to_rpc_status(err: AirlockError) -> grpc.Status:
    """The status to abort an RPC with: code, message and an ErrorInfo detail."""
    code = status_code_of(err)
    status = status_pb2.Status(code=code.value[0], message=err.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN))
    return rpc_status.to_status(status)


def _reason_from_details(e: Any) -> str | None:
    try:
        status = rpc_status.from_call(e)
    except (ValueError, AttributeError, TypeError):
        # Inconsistent or unreadable details: treat them as absent.
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN and info.reason:
                reason: str = info.reason
                return reason
    return None


def _unreachable_message(details: str, target: str | None) -> str:
    # gRPC's text ends in the socket error, e.g. "... error: No such file or directory".
    marker = "error: "
    cause = details.rsplit(marker, 1)[1].strip() if marker in details else details
    where = target if target else "its socket"
    if "permission denied" in cause.lower() and target:
        return f"cannot reach the Airlock daemon at {where} ({cause}): {_access_hint(target)}"
    return f"cannot reach the Airlock daemon at {where} ({cause}); is airlockd running?"


def _access_hint(path: str) -> str:
    """Who may connect to the socket ``path``, and how this user can: the daemon is running,
    its socket's permissions keep this user out."""
    try:
        st = os.stat(path)
    except OSError:
        return "this user may not use the socket or a directory above it"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    return (
        f"the socket is mode {mode:04o}, group {group!r}: join that group "
        f"(sudo usermod -aG {group} $USER, then log in again), or ask the operator to set "
        "airlockd --socket-group to a group of yours"
    )


def from_rpc_error(e: grpc.RpcError, *, target: str | None = None) -> AirlockError:
    """The Airlock error a failed call stands for; its message is the server's.

    ``target`` names the daemon's socket in the message when it cannot be reached.
    """
    code_fn = getattr(e, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(e, "details", None)
    details = details_fn() if callable(details_fn) else None
    message = str(details) if details else code.name.replace("_", " ").lower()

    reason = _reason_from_details(e)
    cls = _CLASS_OF_CODE.get(code, AirlockError)
    if reason is not None:
        return cls(message, reason=reason)
    # No ErrorInfo: the status came from gRPC itself, not from the daemon.
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(_unreachable_message(message, target))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return AirlockError(
            f"the Airlock daemon did not answer in time: {message}", reason=code.name
        )
    return cls(message, reason=code.name)
