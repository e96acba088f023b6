"""The one exception tree of Airlock.

Every error that crosses a module boundary is one of these. The daemon maps
each class to one gRPC status code in one place (``airlock.daemon._status``);
the client maps the status back to the same class, so both sides raise the
same exceptions::

    AirlockError                      (any error; gRPC UNKNOWN)
    ├── InvalidRequest                (INVALID_ARGUMENT: a field is wrong)
    ├── PermissionDenied              (PERMISSION_DENIED: the caller may not ask this)
    ├── ResourceExhausted             (RESOURCE_EXHAUSTED: too many validations at once)
    ├── Unavailable                   (UNAVAILABLE: daemon not reachable or shutting down)
    ├── Cancelled                     (CANCELLED: the caller went away)
    └── SandboxError                  (INTERNAL: the sandbox could not be set up or run)

Each error has a stable ``reason`` (UPPER_SNAKE_CASE) that clients may branch
on, and a human ``message`` that may change between versions.
"""

from __future__ import annotations

__all__ = [
    "AirlockError",
    "Cancelled",
    "InvalidRequest",
    "PermissionDenied",
    "ResourceExhausted",
    "SandboxError",
    "Unavailable",
]


class AirlockError(Exception):
    """Base class of every Airlock error."""

    default_reason = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"


class InvalidRequest(AirlockError):
    """A request field is malformed; the message names the field and why."""

    default_reason = "INVALID_ARGUMENT"


class PermissionDenied(AirlockError):
    """The caller may not ask for this (for example another uid as non-root)."""

    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(AirlockError):
    """The daemon is at its concurrency limit; retry later."""

    default_reason = "TOO_MANY_VALIDATIONS"


class Unavailable(AirlockError):
    """The daemon cannot be reached or is shutting down."""

    default_reason = "UNAVAILABLE"


class Cancelled(AirlockError):
    """The caller cancelled the request; the sandbox was torn down."""

    default_reason = "CANCELLED"


class SandboxError(AirlockError):
    """The sandbox could not be set up or run (fail closed: nothing ran)."""

    default_reason = "SANDBOX_FAILED"
