"""Errors as data across the spawner boundary (airlock/_errors.py: ErrorData, error_to_data,
error_from_data), and the typed ``partial`` of an Apply that stopped part way.

The apply supervisor sends its error back to the daemon as an :class:`ErrorData` inside an
``ApplyReply`` (a pickle that the restricted unpickler of ``airlock.sandbox._wire`` reads); the
engine raises ``error_from_data`` of it. Every error class must come back as itself with its
reason, message and paths, and so with the same gRPC status. Runs as any user.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import airlock
from airlock import _errors
from airlock._errors import (
    AirlockError,
    ApplyIncomplete,
    Conflict,
    ErrorData,
    Reason,
    error_from_data,
    error_to_data,
)
from airlock.api import status
from airlock.api.status import from_rpc_error, status_code_of, to_rpc_status
from airlock.core.engine import Engine
from airlock.sandbox import _wire, contain
from airlock.sandbox.apply import ApplyResult
from airlock.sandbox.plan import ApplyPlan, ApplyReply

PATHS = (b"/srv/a", b"/srv/b\xff")  # paths are bytes, not necessarily UTF-8

# The classes of airlock._errors, by name.
TREE = {
    name: cls
    for name, cls in vars(_errors).items()
    if isinstance(cls, type) and issubclass(cls, AirlockError)
}


def _all_subclasses(cls: type[AirlockError]) -> Iterator[type[AirlockError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _every_error_class() -> list[type[AirlockError]]:
    """Every AirlockError class of the package (each module imported), the tree's first."""
    for info in pkgutil.walk_packages(airlock.__path__, "airlock."):
        if not info.name.startswith("airlock.v1"):
            importlib.import_module(info.name)
    found = {AirlockError, *_all_subclasses(AirlockError)}
    own = [c for c in found if c.__module__.startswith("airlock.")]
    return sorted(own, key=lambda c: (c not in TREE.values(), c.__module__, c.__name__))


def _make(cls: type[AirlockError], reason: str | None = "SOME_REASON") -> AirlockError:
    """An instance of ``cls`` with this message and reason (and paths where it has them)."""
    if cls is Conflict:
        return Conflict("the message", paths=PATHS, reason=reason)
    if cls is ApplyIncomplete:
        return ApplyIncomplete("the message", partial=PATHS, reason=reason)
    if cls in TREE.values():
        return cls("the message", reason=reason)
    # A subclass elsewhere (AuditError, StateError, PolicyError, ...) may take other arguments:
    # give it what every AirlockError has.
    error = cls.__new__(cls)
    AirlockError.__init__(error, "the message", reason=reason)
    return error


def _paths(error: AirlockError) -> tuple[bytes, ...]:
    if isinstance(error, Conflict):
        return error.paths
    if isinstance(error, ApplyIncomplete):
        return error.partial
    return ()


def _sent(message: object) -> Any:
    """``message`` sent and received over a socket as the supervisor sends its reply."""
    a, b = socket.socketpair()
    with a, b:
        _wire.send(a, message)
        return _wire.recv(b)


def _across(data: ErrorData) -> ErrorData:
    """``data`` sent inside an ApplyReply."""
    reply = _sent(ApplyReply(error=data))
    assert isinstance(reply, ApplyReply) and reply.error is not None
    return reply.error


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_error_class_round_trips(cls: type[AirlockError]) -> None:
    error = _make(cls)
    data = error_to_data(error)
    # Plain data: a str reason (never an enum member), bytes paths.
    assert type(data.kind) is str and type(data.reason) is str and type(data.message) is str
    back = error_from_data(_across(data))

    assert (back.message, back.reason) == ("the message", "SOME_REASON")
    assert _paths(back) == _paths(error)
    assert status_code_of(back) == status_code_of(error)
    if cls in TREE.values():
        assert type(back) is cls
    else:  # crosses as its nearest class of the tree
        assert type(back) is next(c for c in cls.__mro__ if c in TREE.values())


@pytest.mark.parametrize("cls", list(TREE.values()), ids=lambda c: c.__name__)
def test_a_default_reason_round_trips(cls: type[AirlockError]) -> None:
    back = error_from_data(_across(error_to_data(_make(cls, reason=None))))
    assert type(back) is cls and back.reason == cls.default_reason


def test_every_class_of_the_tree_has_a_kind_and_a_code() -> None:
    # The explicit table names every class (a class missing from it would cross as its base).
    assert {error_to_data(_make(cls)).kind for cls in TREE.values()} == set(TREE)
    assert set(status._CODE_OF_CLASS) == set(TREE.values())


def test_an_error_of_another_type_becomes_an_airlock_error() -> None:
    data = error_to_data(ValueError("boom"))
    assert data == ErrorData("AirlockError", "UNKNOWN", "ValueError: boom")
    back = error_from_data(_across(data))
    assert type(back) is AirlockError and back.message == "ValueError: boom"


def test_an_unknown_kind_or_reason_is_kept_not_refused() -> None:
    back = error_from_data(ErrorData("FromANewerSupervisor", "A_NEW_REASON", "m", PATHS))
    assert type(back) is AirlockError and back.reason == "A_NEW_REASON"


def test_the_restricted_unpickler_still_refuses_code() -> None:
    # ErrorData is data; an exception class in the message is refused as before.
    with pytest.raises(pickle.UnpicklingError):
        _sent(ValueError("x"))


def test_the_supervisor_reports_an_apply_error_as_data(tmp_path: Path) -> None:
    # The sandbox side of the boundary, for real: a changeset that cannot be opened.
    reply = contain._apply(ApplyPlan(str(tmp_path / "missing"), 0, 0, (0,)))
    assert reply.result is None and reply.error is not None
    assert (reply.error.kind, reply.error.reason) == ("InvalidRequest", "CHANGESET_INVALID")


# --- The engine's side: Engine.apply_changeset ---------------------------------------------------


class _Run:
    def __init__(self, reply: ApplyReply) -> None:
        self._reply = reply

    def result(self) -> ApplyReply:
        return self._reply


class _Spawner:
    def __init__(self, reply: ApplyReply) -> None:
        self.reply = reply
        self.plans: list[Any] = []

    def submit(self, plan: Any, pooled: Any = True) -> _Run:
        self.plans.append(plan)
        return _Run(self.reply)


def _engine(reply: ApplyReply) -> Engine:
    engine = Engine.__new__(Engine)  # only the spawner is needed to apply
    engine._spawner = _Spawner(reply)  # type: ignore[assignment]
    return engine


def test_the_engine_raises_the_supervisors_error(tmp_path: Path) -> None:
    engine = _engine(ApplyReply(error=_across(error_to_data(_make(Conflict)))))
    with pytest.raises(Conflict) as caught:
        engine.apply_changeset(str(tmp_path), 0, 0)  # its apply journal is written there
    assert caught.value.paths == PATHS and caught.value.reason == "SOME_REASON"


def test_an_apply_that_stopped_part_way_raises_apply_incomplete(tmp_path: Path) -> None:
    result = ApplyResult(applied=(b"/srv/a",), failed=(b"/srv/b",), error="disk gone")
    engine = _engine(_sent(ApplyReply(result=result)))
    with pytest.raises(ApplyIncomplete) as caught:
        engine.apply_changeset(str(tmp_path), 0, 0)
    error = caught.value
    assert error.partial == (b"/srv/a",) and error.reason == Reason.APPLY_INCOMPLETE
    assert getattr(error, "partial", ()) == (b"/srv/a",)  # how the service reads it
    assert status_code_of(error) is grpc.StatusCode.UNKNOWN  # as before: an AirlockError's


def test_a_client_sees_apply_incomplete_as_before() -> None:
    # The status carries the code and the reason only: the client raises an AirlockError.
    sent = to_rpc_status(ApplyIncomplete("stopped", partial=PATHS))

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return sent.code

        def details(self) -> str:
            return sent.details

        def trailing_metadata(self) -> Any:
            return sent.trailing_metadata

    received = from_rpc_error(Failed())
    assert type(received) is AirlockError
    assert (received.reason, received.message) == ("APPLY_INCOMPLETE", "stopped")
