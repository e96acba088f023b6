"""Airlock: judge shell commands by a static pass and a measured dry run.

The public surface is small: :class:`airlock.client.Client` talks to the daemon,
the exceptions below are raised on both sides (``Reason`` lists their reasons), and
``airlock.types`` holds the frozen dataclasses results come back as. Everything in a
module whose name starts with an underscore is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airlock._errors import (
    AirlockError,
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
from airlock._version import __version__

if TYPE_CHECKING:
    from airlock.client import Client

__all__ = [
    "AirlockError",
    "Cancelled",
    "Client",
    "Conflict",
    "FailedPrecondition",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "SandboxError",
    "Unavailable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The client pulls in grpc; the sandbox helper process must stay small and
    # never import it, so the client is loaded only when asked for.
    if name == "Client":
        from airlock.client import Client

        return Client
    raise AttributeError(f"module 'airlock' has no attribute {name!r}")
