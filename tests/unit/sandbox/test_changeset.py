"""An Apply conflict as an error: its gRPC status and its paths survive a pickle (changesets on
real overlays: tests/sandbox/test_changeset.py)."""

from __future__ import annotations

import pickle

import grpc

from airlock._errors import Conflict
from airlock.api.status import status_code_of


def test_conflict_is_aborted_and_keeps_its_paths() -> None:
    err = Conflict("changed", paths=(b"/w/a", b"/w/\xff"))
    assert status_code_of(err) is grpc.StatusCode.ABORTED
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.paths, copy.reason, copy.message) == (err.paths, "APPLY_CONFLICT", "changed")
