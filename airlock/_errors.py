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
    ├── NotFound                      (NOT_FOUND: no such validation)
    ├── FailedPrecondition            (FAILED_PRECONDITION: not in a state that allows it)
    ├── SandboxError                  (INTERNAL: the sandbox could not be set up or run)
    └── Conflict                      (ABORTED: the host changed since the dry run)

Each error has a stable ``reason`` (UPPER_SNAKE_CASE) that clients may branch
on, and a human ``message`` that may change between versions.
"""

from __future__ import annotations

__all__ = [
    "AirlockError",
    "Cancelled",
    "Conflict",
    "FailedPrecondition",
    "InvalidRequest",
    "NotFound",
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


class NotFound(AirlockError):
    """The request names something the daemon does not know (for example a validation id)."""

    default_reason = "VALIDATION_NOT_FOUND"


class FailedPrecondition(AirlockError):
    """The request is valid but its target is not in a state that allows it (reason says why)."""

    default_reason = "FAILED_PRECONDITION"


class SandboxError(AirlockError):
    """The sandbox could not be set up or run (fail closed: nothing ran)."""

    default_reason = "SANDBOX_FAILED"


class Conflict(AirlockError):
    """The host changed since the dry run, so Apply wrote nothing; ``paths`` names every change hit.

    Pickles with its ``paths`` and ``reason`` (BaseException pickles the instance dict).
    """

    default_reason = "APPLY_CONFLICT"

    def __init__(
        self, message: str, *, paths: tuple[bytes, ...] = (), reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.paths = tuple(paths)
