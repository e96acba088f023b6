"""The restricted unpickler between a sandbox's supervisor and the daemon (sandbox/_wire.py)."""

from __future__ import annotations

import pickle

import pytest

from airlock.sandbox import _wire
from airlock.types import ChangeKind, FileChange


class _ByName:
    """Pickles as ``getattr(obj, name)``: how Python 3.11.0-3.11.3 pickle an enum member."""

    def __init__(self, obj: object, name: object) -> None:
        self.obj, self.name = obj, name

    def __reduce__(self) -> tuple[object, ...]:
        return (getattr, (self.obj, self.name))


def _load(obj: object) -> object:
    return _wire.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def test_an_enum_member_pickled_by_name_loads() -> None:
    assert _load(_ByName(ChangeKind, "CREATED")) is ChangeKind.CREATED
    assert _load((_ByName(ChangeKind, "DELETED"), 1)) == (ChangeKind.DELETED, 1)


@pytest.mark.parametrize(
    ("obj", "name"),
    [
        (ChangeKind, "__class__"),  # not a member
        (ChangeKind, "_missing_"),
        (ChangeKind, "NOT_A_MEMBER"),
        (FileChange, "__init__"),  # not an enum
        (ChangeKind, 1),
    ],
)
def test_getattr_means_an_enum_member_and_nothing_else(obj: object, name: object) -> None:
    with pytest.raises(pickle.UnpicklingError):
        _load(_ByName(obj, name))


def test_other_globals_are_refused() -> None:
    import os

    for obj in (os.system, eval, pickle.loads):
        with pytest.raises(pickle.UnpicklingError):
            _load(obj)
