"""The client: one gRPC channel to the daemon's Unix socket, typed results."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock import types
from airlock._environ import caller_environment
from airlock._errors import Unavailable
from airlock.api.convert import (
    apply_response_from_proto,
    approve_response_from_proto,
    audit_event_from_proto,
    audit_list_request_to_proto,
    capabilities_from_proto,
    exec_events_from_proto,
    execute_request_to_proto,
    pending_from_proto,
    validate_request_to_proto,
    validation_from_proto,
    verify_result_from_proto,
)
from airlock.api.status import from_rpc_error
from airlock.audit import Anchor, AuditFilter, StoredEvent, VerifyResult, parse_anchor
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "SERVICE_NAME",
    "Client",
    "ExecStream",
    "PendingStream",
    "default_socket_path",
]

DEFAULT_SOCKET_PATH = "/run/airlock/airlock.sock"
SERVICE_NAME = "airlock.v1.SandboxService"

# A response may hold two full output buffers, the diffs and thousands of changes:
# more than gRPC's default 4 MiB receive limit.
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

_T = TypeVar("_T")


def default_socket_path() -> str:
    """``$AIRLOCK_SOCKET`` if set and non-empty, else ``/run/airlock/airlock.sock``."""
    return os.environ.get("AIRLOCK_SOCKET") or DEFAULT_SOCKET_PATH


def _caller_env() -> dict[str, str]:
    """The default ``env``: this process's environment, less what a request cannot carry, each
    variable left out with a RuntimeWarning that points at the code that called the client."""

    def skipped(why: str) -> None:
        # Up from here: caller_environment, _caller_env, the Client method, its caller.
        warnings.warn(f"airlock: {why}", RuntimeWarning, stacklevel=5)

    return caller_environment(skipped)


class ExecStream:
    """The events of one Execute call; iterate it once. ``cancel()`` kills the command."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target

    def __iter__(self) -> Iterator[types.ExecEvent]:
        try:
            for message in self._call:
                yield from exec_events_from_proto(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e, target=self._target) from None

    def cancel(self) -> None:
        self._call.cancel()


class PendingStream:
    """The items of one WatchPendingValidations call; iterate it once. ``cancel()`` ends it."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target

    def __iter__(self) -> Iterator[types.PendingValidation | None]:
        try:
            for message in self._call:
                yield (
                    pending_from_proto(message.validation)
                    if message.HasField("validation")
                    else None
                )
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(e, target=self._target) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """A connection to the Airlock daemon.

    ``socket_path`` is the daemon's Unix socket (default: :func:`default_socket_path`).
    ``timeout`` is the deadline in seconds of each call; ``None`` waits as long as the
    daemon takes (a validation lasts at most the command's timeout plus set-up).
    Every method raises an :class:`airlock.AirlockError` subclass on failure.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        self.socket_path = os.path.abspath(socket_path or default_socket_path())
        self.timeout = timeout
        self._target = "unix:" + self.socket_path
        self._channel: Any = grpc.insecure_channel(
            self._target, options=[("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES)]
        )
        self._stub: Any = pb_grpc.SandboxServiceStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r}, timeout={self.timeout!r})"

    def close(self) -> None:
        """Close the channel; calls made afterwards raise. Closing twice is harmless."""
        self._closed = True
        self._channel.close()

    def _call(self, method: Callable[..., _T], request: object) -> _T:
        if self._closed:
            raise Unavailable("the client is closed", reason="CLIENT_CLOSED")
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, target=self.socket_path) from None

    def validate_raw(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        uid: int | None = None,
        gid: int | None = None,
        force_dry_run: bool = False,
        session_id: str = "",
        agent: types.AgentContext | None = None,
    ) -> pb.ValidateResponse:
        """Like :meth:`validate`, but return the response message as it came."""
        req = types.ValidateRequest(
            command=command,
            cwd=os.path.abspath("." if cwd is None else cwd),
            env=tuple(sorted((_caller_env() if env is None else env).items())),
            timeout_s=timeout,
            uid=uid,
            gid=gid,
            force_dry_run=force_dry_run,
            session_id=session_id,
            agent=agent,
        )
        response: pb.ValidateResponse = self._call(
            self._stub.Validate, validate_request_to_proto(req)
        )
        return response

    def validate(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        uid: int | None = None,
        gid: int | None = None,
        force_dry_run: bool = False,
        session_id: str = "",
        agent: types.AgentContext | None = None,
    ) -> types.Validation:
        """Judge ``bash -c command``: the static pass, then a dry run in a throwaway sandbox.

        ``cwd`` (default: this process's working directory; a relative path is taken
        from it) is the workspace. ``env`` is the command's exact environment; the default,
        None, is this process's environment, as the CLI, hook and MCP server send theirs,
        less any variable a request cannot carry (a name or value that is not valid UTF-8,
        an empty name), each left out with a :class:`RuntimeWarning`; ``{}`` sends none.
        The daemon adds a standard PATH when there is none. ``timeout`` is the command's
        limit in seconds (default: the daemon's). ``uid``/``gid`` are for root callers only.
        ``force_dry_run`` runs the dry run even when the static pass already denies.
        ``agent`` says what made an agent ask (its session, tool call, ...): the audit
        log keeps it.
        """
        return validation_from_proto(
            self.validate_raw(
                command,
                cwd=cwd,
                env=_caller_env() if env is None else env,
                timeout=timeout,
                uid=uid,
                gid=gid,
                force_dry_run=force_dry_run,
                session_id=session_id,
                agent=agent,
            )
        )

    def execute(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        uid: int | None = None,
        gid: int | None = None,
        approval_token: str = "",
        session_id: str = "",
        agent: types.AgentContext | None = None,
    ) -> ExecStream:
        """Run ``bash -c command`` for real; iterate the result for its events, in order.

        The first event is :class:`~airlock.types.ExecStarted`, the last
        :class:`~airlock.types.ExecFinished`; in between come
        :class:`~airlock.types.ExecOutput` chunks, then the processes it started.
        Only ``cwd`` is writable. A command the policy asks about needs
        ``approval_token`` (from :meth:`approve`) or a session grant; otherwise the
        iteration raises :class:`airlock.FailedPrecondition` before anything runs.
        ``cancel()`` on the stream kills the command's whole process tree. ``cwd`` and
        ``env`` default as for :meth:`validate` (``env``: this process's environment).
        """
        req = types.ExecuteRequest(
            command=command,
            cwd=os.path.abspath("." if cwd is None else cwd),
            env=tuple(sorted((_caller_env() if env is None else env).items())),
            timeout_s=timeout,
            uid=uid,
            gid=gid,
            approval_token=approval_token,
            session_id=session_id,
            agent=agent,
        )
        if self._closed:
            raise Unavailable("the client is closed", reason="CLIENT_CLOSED")
        call = self._stub.Execute(execute_request_to_proto(req), timeout=self.timeout)
        return ExecStream(call, self.socket_path)

    def approve(
        self,
        validation_id: str,
        *,
        session: bool = False,
        special_paths: Iterable[bytes | str] = (),
    ) -> types.ApprovalGrant:
        """Approve a validation the policy asked about (once, or for the session).

        ``special_paths`` names the validation's special files (made setuid or setgid,
        given file capabilities, device nodes) that Apply may then write: it writes no
        other (FIFOs and sockets need no approval). A ``str`` is encoded as the file system
        encodes names.
        """
        scope = pb.APPROVAL_SCOPE_SESSION if session else pb.APPROVAL_SCOPE_ONCE
        request = pb.ApproveRequest(
            validation_id=validation_id,
            scope=scope,
            special_paths=[os.fsencode(p) for p in special_paths],
        )
        response: pb.ApproveResponse = self._call(self._stub.Approve, request)
        return approve_response_from_proto(response)

    def list_pending(self) -> list[types.PendingValidation]:
        """The validations waiting for an approval, oldest first: every user's when the
        caller is one of the daemon's approvers, its own otherwise."""
        found: list[types.PendingValidation] = []
        token = ""
        while True:
            response: pb.ListPendingValidationsResponse = self._call(
                self._stub.ListPendingValidations,
                pb.ListPendingValidationsRequest(page_token=token),
            )
            found += [pending_from_proto(p) for p in response.validations]
            token = response.next_page_token
            if not token:
                return found

    def watch_pending(self) -> PendingStream:
        """The validations waiting for an approval now, then each new ask as it comes
        (None: a heartbeat, every 15 s without one). The daemon ends the stream after 10
        minutes (open another); ``cancel()`` ends it sooner. Not bound by ``timeout``."""
        if self._closed:
            raise Unavailable("the client is closed", reason="CLIENT_CLOSED")
        call = self._stub.WatchPendingValidations(pb.WatchPendingValidationsRequest())
        return PendingStream(call, self.socket_path)

    def apply(self, validation_id: str) -> types.ApplyOutcome:
        """Write exactly the dry run's changes of ``validation_id`` to the host."""
        response: pb.ApplyResponse = self._call(
            self._stub.Apply, pb.ApplyRequest(validation_id=validation_id)
        )
        return apply_response_from_proto(response)

    def discard(self, validation_id: str) -> None:
        """Drop the changes ``validation_id`` kept for Apply."""
        self._call(self._stub.Discard, pb.DiscardRequest(validation_id=validation_id))

    def capabilities_raw(self) -> pb.GetCapabilitiesResponse:
        """Like :meth:`capabilities`, but return the response message as it came."""
        response: pb.GetCapabilitiesResponse = self._call(
            self._stub.GetCapabilities, pb.GetCapabilitiesRequest()
        )
        return response

    def capabilities(self) -> types.Capabilities:
        """What the host's kernel supports, the daemon's version and its limits."""
        return capabilities_from_proto(self.capabilities_raw())

    def health(self) -> bool:
        """Whether the daemon reports the sandbox service as serving.

        Returns ``False`` when the daemon answers but is not serving (for example while
        it shuts down); raises :class:`airlock.Unavailable` when it cannot be reached.
        """
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        response = self._call(self._health.Check, request)
        serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
        return serving

    # --- The audit log (root only) ------------------------------------------------------------

    def list_audit_events_raw(
        self,
        filter: AuditFilter | None = None,
        *,
        page_size: int = 0,
        page_token: str | None = None,
    ) -> pb.ListAuditEventsResponse:
        """Like :meth:`list_audit_events`, but return the response message as it came."""
        request = audit_list_request_to_proto(
            filter or AuditFilter(), page_size=page_size, page_token=page_token
        )
        response: pb.ListAuditEventsResponse = self._call(self._stub.ListAuditEvents, request)
        return response

    def list_audit_events(
        self,
        filter: AuditFilter | None = None,
        *,
        page_size: int = 0,
        page_token: str | None = None,
    ) -> tuple[list[StoredEvent], str | None]:
        """One page of the audit log's events that match ``filter``, oldest first.

        Returns the page and the token of the next one (None after the last page); pass
        it back with the same filter. ``page_size`` 0 means the daemon's default (100);
        at most 1000 come at once. Only root may list: others get
        :class:`airlock.PermissionDenied` (reason ``AUDIT_NOT_ALLOWED``).
        """
        response = self.list_audit_events_raw(filter, page_size=page_size, page_token=page_token)
        page = [audit_event_from_proto(e) for e in response.events]
        return page, response.next_page_token or None

    def audit_events(
        self, filter: AuditFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[StoredEvent]:
        """Every event that matches ``filter``, oldest first, fetched a page at a time."""
        token: str | None = None
        while True:
            page, token = self.list_audit_events(filter, page_size=page_size, page_token=token)
            yield from page
            if token is None:
                return

    def verify_audit_log_raw(self, anchor: Anchor | str | None = None) -> pb.VerifyAuditLogResponse:
        """Like :meth:`verify_audit_log`, but return the response message as it came."""
        if isinstance(anchor, str):
            anchor = parse_anchor(anchor)  # refused here, before the call, if malformed
        text = "" if anchor is None else str(anchor)
        response: pb.VerifyAuditLogResponse = self._call(
            self._stub.VerifyAuditLog, pb.VerifyAuditLogRequest(anchor=text)
        )
        return response

    def verify_audit_log(self, anchor: Anchor | str | None = None) -> VerifyResult:
        """Have the daemon walk its audit log's hash chain; the first problem, if any.

        ``anchor`` (``SEQ:HASH``, an earlier head kept elsewhere) also catches events
        removed from the end and a chain rewritten up to it. Only root may verify.
        """
        return verify_result_from_proto(self.verify_audit_log_raw(anchor))
