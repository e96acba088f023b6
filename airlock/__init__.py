"""Airlock: judge shell commands by a static pass and a measured dry run.

The public surface is small: :class:`airlock.client.Client` talks to the daemon,
the exceptions below are raised on both sides (``Reason`` lists their reasons), and
``airlock.types`` holds the frozen dataclasses results come back as. Everything in a
module whose name starts with an underscore is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airlock._version import __version__

if TYPE_CHECKING:
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
    # Loaded when first asked for (PEP 562), not by ``import airlock``: the client pulls in
    # grpc, which the sandbox helper process must never import; and importing any submodule
    # runs this file first, so ``airlock hook`` (run before every shell command) would pay
    # for the error tree on its allow path (docs/performance.md section 11).
    if name == "Client":
        from airlock.client import Client

        return Client
    if name in __all__ and name != "__version__":
        from airlock import _errors

        value = getattr(_errors, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'airlock' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
