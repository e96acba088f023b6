"""The client: one gRPC channel to the daemon's Unix socket, typed results."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock import types
from airlock._convert import (
    capabilities_from_proto,
    validate_request_to_proto,
    validation_from_proto,
)
from airlock._errors import Unavailable
from airlock._status import from_rpc_error
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_SOCKET_PATH", "SERVICE_NAME", "Client", "default_socket_path"]

DEFAULT_SOCKET_PATH = "/run/airlock/airlock.sock"
SERVICE_NAME = "airlock.v1.SandboxService"

# A response may hold two full output buffers, the diffs and thousands of changes:
# more than gRPC's default 4 MiB receive limit.
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

_T = TypeVar("_T")


def default_socket_path() -> str:
    """``$AIRLOCK_SOCKET`` if set and non-empty, else ``/run/airlock/airlock.sock``."""
    return os.environ.get("AIRLOCK_SOCKET") or DEFAULT_SOCKET_PATH


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
    ) -> pb.ValidateResponse:
        """Like :meth:`validate`, but return the response message as it came."""
        req = types.ValidateRequest(
            command=command,
            cwd=os.path.abspath("." if cwd is None else cwd),
            env=tuple(sorted((env or {}).items())),
            timeout_s=timeout,
            uid=uid,
            gid=gid,
            force_dry_run=force_dry_run,
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
    ) -> types.Validation:
        """Judge ``bash -c command``: the static pass, then a dry run in a throwaway sandbox.

        ``cwd`` (default: this process's working directory; a relative path is taken
        from it) is the workspace. ``env`` is the command's exact environment (default:
        empty; the daemon adds a standard PATH). ``timeout`` is the command's limit in
        seconds (default: the daemon's). ``uid``/``gid`` are for root callers only.
        ``force_dry_run`` runs the dry run even when the static pass already denies.
        """
        return validation_from_proto(
            self.validate_raw(
                command,
                cwd=cwd,
                env=env,
                timeout=timeout,
                uid=uid,
                gid=gid,
                force_dry_run=force_dry_run,
            )
        )

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
