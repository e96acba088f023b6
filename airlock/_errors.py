"""The one exception tree of Airlock.

Every error that crosses a module boundary is one of these. The daemon maps
each class to one gRPC status code in one place (``airlock.api.status``);
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
    ├── Conflict                      (ABORTED: the host changed since the dry run)
    └── ApplyIncomplete               (UNKNOWN: Apply stopped part way; the daemon's own)

Each error has a stable ``reason`` (UPPER_SNAKE_CASE, one of :class:`Reason`, listed
with their meaning in docs/errors.md) that clients may branch on, and a human
``message`` that may change between versions. ``reason`` is a ``str``: a reason the
catalog does not list (from a newer daemon) is kept as it is, never refused.

An error crosses a process boundary (the apply supervisor's reply) as :class:`ErrorData`,
converted by :func:`error_to_data` and :func:`error_from_data` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from airlock._reasons import Reason

__all__ = [
    "AirlockError",
    "ApplyIncomplete",
    "Cancelled",
    "Conflict",
    "ErrorData",
    "FailedPrecondition",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "SandboxError",
    "Unavailable",
    "error_from_data",
    "error_to_data",
]


class AirlockError(Exception):
    """Base class of every Airlock error."""

    default_reason: ClassVar[str] = Reason.UNKNOWN

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # A plain str (a Reason member's value), as a reason from the wire is.
        self.reason: str = str(reason or self.default_reason)

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"


class InvalidRequest(AirlockError):
    """A request field is malformed; the message names the field and why."""

    default_reason: ClassVar[str] = Reason.INVALID_ARGUMENT


class PermissionDenied(AirlockError):
    """The caller may not ask for this (for example another uid as non-root)."""

    default_reason: ClassVar[str] = Reason.PERMISSION_DENIED


class ResourceExhausted(AirlockError):
    """The daemon is at its concurrency limit; retry later."""

    default_reason: ClassVar[str] = Reason.TOO_MANY_VALIDATIONS


class Unavailable(AirlockError):
    """The daemon cannot be reached or is shutting down."""

    default_reason: ClassVar[str] = Reason.UNAVAILABLE


class Cancelled(AirlockError):
    """The caller cancelled the request; the sandbox was torn down."""

    default_reason: ClassVar[str] = Reason.CANCELLED


class NotFound(AirlockError):
    """The request names something the daemon does not know (for example a validation id)."""

    default_reason: ClassVar[str] = Reason.VALIDATION_NOT_FOUND


class FailedPrecondition(AirlockError):
    """The request is valid but its target is not in a state that allows it (reason says why)."""

    default_reason: ClassVar[str] = Reason.FAILED_PRECONDITION


class SandboxError(AirlockError):
    """The sandbox could not be set up or run (fail closed: nothing ran)."""

    default_reason: ClassVar[str] = Reason.SANDBOX_FAILED


class Conflict(AirlockError):
    """The host changed since the dry run, so Apply wrote nothing; ``paths`` names every change hit.

    Pickles with its ``paths`` and ``reason`` (BaseException pickles the instance dict).
    """

    default_reason: ClassVar[str] = Reason.APPLY_CONFLICT

    def __init__(
        self, message: str, *, paths: tuple[bytes, ...] = (), reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.paths = tuple(paths)


class ApplyIncomplete(AirlockError):
    """Apply stopped part way: ``partial`` names the paths written before it stopped.

    Final: the validation is never applied again. The daemon records ``partial`` in its
    state and audit log; a client sees an :class:`AirlockError` (UNKNOWN) with this reason.
    """

    default_reason: ClassVar[str] = Reason.APPLY_INCOMPLETE

    def __init__(
        self, message: str, *, partial: tuple[bytes, ...] = (), reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.partial = tuple(partial)


# --- Errors as data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorData:
    """An error as plain data, to cross a process boundary (a pickle names no exception class).

    ``kind`` is a key of the table below; ``paths`` are a Conflict's ``paths`` or an
    ApplyIncomplete's ``partial`` (empty for the other kinds).
    """

    kind: str
    reason: str
    message: str
    paths: tuple[bytes, ...] = ()


# Every class an error may cross a boundary as, by a name of its own (renaming a class must
# not change what a peer reads). A subclass not listed here crosses as its nearest listed base,
# with its reason and message.
_CLASS_OF_KIND: dict[str, type[AirlockError]] = {
    "AirlockError": AirlockError,
    "InvalidRequest": InvalidRequest,
    "PermissionDenied": PermissionDenied,
    "ResourceExhausted": ResourceExhausted,
    "Unavailable": Unavailable,
    "Cancelled": Cancelled,
    "NotFound": NotFound,
    "FailedPrecondition": FailedPrecondition,
    "SandboxError": SandboxError,
    "Conflict": Conflict,
    "ApplyIncomplete": ApplyIncomplete,
}
_KIND_OF_CLASS: dict[type[AirlockError], str] = {cls: kind for kind, cls in _CLASS_OF_KIND.items()}


def error_to_data(exc: BaseException) -> ErrorData:
    """``exc`` as data; anything but an AirlockError becomes an AirlockError naming its type."""
    if not isinstance(exc, AirlockError):
        return ErrorData("AirlockError", str(Reason.UNKNOWN), f"{type(exc).__name__}: {exc}")
    kind = next(_KIND_OF_CLASS[c] for c in type(exc).__mro__ if c in _KIND_OF_CLASS)
    paths: tuple[bytes, ...] = ()
    if isinstance(exc, Conflict):
        paths = exc.paths
    elif isinstance(exc, ApplyIncomplete):
        paths = exc.partial
    return ErrorData(kind, str(exc.reason), exc.message, tuple(paths))


def error_from_data(data: ErrorData) -> AirlockError:
    """The error ``data`` stands for (an unknown kind: an AirlockError with its reason)."""
    cls = _CLASS_OF_KIND.get(data.kind, AirlockError)
    reason = data.reason or None
    if cls is Conflict:
        return Conflict(data.message, paths=data.paths, reason=reason)
    if cls is ApplyIncomplete:
        return ApplyIncomplete(data.message, partial=data.paths, reason=reason)
    return cls(data.message, reason=reason)
