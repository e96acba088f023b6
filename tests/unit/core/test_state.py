"""The workflow state store on real SQLite files: transitions, tokens, sessions, crashes.

Time is a fake clock the tests move by hand. Concurrency runs real threads (on one
store, and on several stores sharing a file), and durability SIGKILLs a real child
process right after the store returned in it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock._errors import (
    AirlockError,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from airlock.api.status import status_code_of
from airlock.audit import AuditLog
from airlock.core import state as state_module
from airlock.core.state import (
    STATE_FILE,
    ApplyDone,
    ApprovalScope,
    AuthContext,
    NewValidation,
    StateError,
    StateStore,
    ValidationRecord,
    ValidationState,
    new_token,
)
from airlock.types import Verdict
from tests.helpers.fsyncs import fsyncs_per_phase

T0 = 1_700_000_000.0
TTL = 900.0
SESSION_TTL = 3600.0
OWNER = 1000
OTHER = 1001
ROOT = 0
DIFF = hashlib.sha256(b"the dry run's diff").hexdigest()
S = ValidationState


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / STATE_FILE


@pytest.fixture
def open_store(db: Path, clock: Clock) -> Iterator[Callable[..., StateStore]]:
    """Opens stores on ``db`` with the fake clock; closes them all at the end."""
    opened: list[StateStore] = []

    def open_(**kw: object) -> StateStore:
        kw.setdefault("ttl_s", TTL)
        kw.setdefault("session_ttl_s", SESSION_TTL)
        kw.setdefault("clock", clock)
        store = StateStore(db, **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., StateStore]) -> StateStore:
    return open_store()


def new(vid: str = "v1", verdict: Verdict = Verdict.ASK, **kw: object) -> NewValidation:
    fields: dict[str, object] = {
        "validation_id": vid,
        "command": "rm -rf build",
        "cwd": "/home/u/src",
        "uid": OWNER,
        "gid": OWNER,
        "verdict": verdict,
        "env_sha256": hashlib.sha256(b"env").hexdigest(),
        "caller_pid": 4242,
        "session_id": "sess-1",
        "policy_version": "p1",
        "diff_hash": DIFF,
        "summary": "1 directory deleted",
        "changeset_dir": f"/var/lib/airlock/changes/{vid}",
        "changeset_bytes": 100,
    }
    fields.update(kw)
    return NewValidation(**fields)


def bound(**kw: Any) -> dict[str, Any]:
    """The authorize() arguments that match ``new()``'s command."""
    args: dict[str, Any] = {
        "command": "rm -rf build",
        "cwd": "/home/u/src",
        "policy_version": "p1",
        "session_id": "sess-1",
        "uid": OWNER,
    }
    args.update(kw)
    return args


def refused(
    fn: Callable[[], object], reason: str, cls: type[AirlockError] = FailedPrecondition
) -> AirlockError:
    with pytest.raises(AirlockError) as err:
        fn()
    assert type(err.value) is cls, err.value
    assert err.value.reason == reason, err.value
    return err.value


def applied(store: StateStore, vid: str, uid: int = OWNER) -> ValidationRecord:
    rec = store.begin_apply(vid, uid=uid)
    assert isinstance(rec, ValidationRecord)
    return rec


# --- Opening ----------------------------------------------------------------------------------


def test_in_state_dir_makes_a_private_wal_database(tmp_path: Path, clock: Clock) -> None:
    with StateStore.in_state_dir(str(tmp_path), clock=clock) as store:
        store.record_validation(new())
        # FULL: every commit fsyncs the WAL (a change survives a machine crash too).
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT state FROM validations").fetchall() == [("PENDING_APPROVAL",)]
    finally:
        conn.close()


def test_a_file_that_is_not_a_state_store(db: Path) -> None:
    db.write_bytes(b"\x00garbage" * 2048)
    with pytest.raises(StateError) as err:
        StateStore(db)
    assert err.value.reason == "STATE_STORE_CORRUPT"
    assert str(db) in err.value.message


def test_another_airlock_database_is_refused(db: Path) -> None:
    AuditLog(db).close()
    with pytest.raises(StateError) as err:
        StateStore(db)
    assert err.value.reason == "STATE_STORE_CORRUPT"
    assert "not an Airlock state store" in err.value.message


def test_a_closed_store_refuses_calls(store: StateStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StateError) as err:
        store.get("v1")
    assert err.value.reason == "STATE_STORE_CLOSED"


@pytest.mark.parametrize("kw", [{"ttl_s": 0}, {"session_ttl_s": -1}, {"quota_bytes": -1}])
def test_bad_settings_are_refused(db: Path, kw: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest):
        StateStore(db, **kw)


def test_new_errors_map_to_their_grpc_codes() -> None:
    assert status_code_of(NotFound("x")) is grpc.StatusCode.NOT_FOUND
    assert status_code_of(FailedPrecondition("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert NotFound("x").reason == "VALIDATION_NOT_FOUND"


# --- Recording --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "ctx", "state", "stored_ctx"),
    [
        (Verdict.ASK, None, S.PENDING_APPROVAL, None),
        (Verdict.ALLOW, None, S.ALLOWED, AuthContext.POLICY_ALLOWED),
        (Verdict.ALLOW, AuthContext.AUTO_APPROVED, S.ALLOWED, AuthContext.AUTO_APPROVED),
        (Verdict.DENY, None, S.DENIED, None),
    ],
)
def test_the_verdict_sets_the_first_state(
    store: StateStore,
    verdict: Verdict,
    ctx: AuthContext | None,
    state: ValidationState,
    stored_ctx: AuthContext | None,
) -> None:
    rec = store.record_validation(new(verdict=verdict, auth_context=ctx))
    assert rec.state is state
    assert rec.auth_context is stored_ctx
    assert (rec.created_at, rec.expires_at) == (T0, T0 + TTL)
    assert store.get("v1") == rec
    assert rec.command == "rm -rf build" and rec.diff_hash == DIFF and rec.caller_pid == 4242
    assert rec.apply_result_json is None and rec.applied_at is None


@pytest.mark.parametrize(
    "kw",
    [
        {"validation_id": ""},
        {"validation_id": "x" * 257},
        {"uid": -1},
        {"changeset_bytes": -5},
        {"changeset_dir": "", "changeset_bytes": 10},
        {"diff_hash": "ABC"},
        {"diff_hash": DIFF.upper()},
        {"verdict": 2},
        {"verdict": Verdict.ASK, "auth_context": AuthContext.USER_VERIFIED},
        {"verdict": Verdict.DENY, "auth_context": AuthContext.POLICY_ALLOWED},
        {"verdict": Verdict.ALLOW, "auth_context": AuthContext.SESSION_GRANTED},
        {"verdict": Verdict.ALLOW, "auth_context": AuthContext.USER_VERIFIED},
    ],
)
def test_a_malformed_validation_is_refused_and_not_stored(
    store: StateStore, kw: dict[str, object]
) -> None:
    with pytest.raises(InvalidRequest) as err:
        store.record_validation(new(**kw))
    assert err.value.reason == "INVALID_VALIDATION"
    assert store.changeset_usage() == 0
    refused(lambda: store.get(str(kw.get("validation_id", "v1"))), "VALIDATION_NOT_FOUND", NotFound)


def test_a_validation_id_is_recorded_once(store: StateStore) -> None:
    first = store.record_validation(new())
    refused(
        lambda: store.record_validation(new(command="other")),
        "DUPLICATE_VALIDATION_ID",
        InvalidRequest,
    )
    assert store.get("v1") == first


def test_unknown_validations_are_not_found(store: StateStore) -> None:
    for call in (
        lambda: store.get("nope"),
        lambda: store.approve("nope", ApprovalScope.ONCE, approver_uid=ROOT),
        lambda: store.begin_apply("nope", uid=ROOT),
        lambda: store.finish_apply("nope", "{}"),
        lambda: store.abort_apply("nope", "x"),
        lambda: store.discard("nope", uid=ROOT),
    ):
        err = refused(call, "VALIDATION_NOT_FOUND", NotFound)
        assert "nope" in err.message
    assert store.approvals("nope") == []


# --- Every transition -------------------------------------------------------------------------


def drive(store: StateStore, clock: Clock, state: ValidationState) -> None:
    """Bring validation v1 (owned by OWNER) to ``state`` the legal way."""
    verdict = {S.ALLOWED: Verdict.ALLOW, S.DENIED: Verdict.DENY}.get(state, Verdict.ASK)
    store.record_validation(new(verdict=verdict))
    if state in (S.APPROVED, S.APPLYING, S.APPLIED, S.APPLY_INTERRUPTED):
        store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    if state in (S.APPLYING, S.APPLIED, S.APPLY_INTERRUPTED):
        applied(store, "v1")
    if state is S.APPLIED:
        store.finish_apply("v1", '{"ok": true}')
    if state is S.APPLY_INTERRUPTED:
        assert [r.validation_id for r in store.recover()] == ["v1"]
    if state is S.DISCARDED:
        store.discard("v1", uid=OWNER)
    if state is S.EXPIRED:
        clock.now += TTL
        assert [r.validation_id for r in store.expire()] == ["v1"]
    assert store.get("v1").state is state


ACTIONS: dict[str, Callable[[StateStore], object]] = {
    "approve_once": lambda s: s.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER),
    "approve_session": lambda s: s.approve("v1", ApprovalScope.SESSION, approver_uid=OWNER),
    "begin_apply": lambda s: s.begin_apply("v1", uid=OWNER),
    "finish_apply": lambda s: s.finish_apply("v1", '{"ok": 1}'),
    "abort_apply": lambda s: s.abort_apply("v1", "conflict"),
    "discard": lambda s: s.discard("v1", uid=OWNER),
}
_APPROVE = {
    S.PENDING_APPROVAL: S.APPROVED,
    S.APPROVED: S.APPROVED,
    S.ALLOWED: "APPROVAL_NOT_NEEDED",
    S.DENIED: "VALIDATION_DENIED",
    S.APPLYING: "APPLY_IN_PROGRESS",
    S.APPLIED: "VALIDATION_APPLIED",
    S.APPLY_INTERRUPTED: "APPLY_INTERRUPTED",
    S.DISCARDED: "VALIDATION_DISCARDED",
    S.EXPIRED: "VALIDATION_EXPIRED",
}
_NOT_APPLYING = {s: "NOT_APPLYING" for s in S if s is not S.APPLYING}
# What each action does in each state: the new state, or the reason it is refused.
EXPECTED: dict[str, dict[ValidationState, ValidationState | str]] = {
    "approve_once": _APPROVE,
    "approve_session": _APPROVE,
    "begin_apply": {
        S.PENDING_APPROVAL: "APPROVAL_REQUIRED",
        S.APPROVED: S.APPLYING,
        S.ALLOWED: S.APPLYING,
        S.DENIED: "VALIDATION_DENIED",
        S.APPLYING: "APPLY_IN_PROGRESS",
        S.APPLIED: S.APPLIED,  # returns the first result (ApplyDone)
        S.APPLY_INTERRUPTED: "APPLY_INTERRUPTED",
        S.DISCARDED: "VALIDATION_DISCARDED",
        S.EXPIRED: "VALIDATION_EXPIRED",
    },
    "finish_apply": {**_NOT_APPLYING, S.APPLYING: S.APPLIED},
    "abort_apply": {**_NOT_APPLYING, S.APPLYING: S.APPROVED},
    "discard": {
        S.PENDING_APPROVAL: S.DISCARDED,
        S.APPROVED: S.DISCARDED,
        S.ALLOWED: S.DISCARDED,
        S.DENIED: S.DISCARDED,
        S.APPLYING: "APPLY_IN_PROGRESS",
        S.APPLIED: "VALIDATION_APPLIED",
        S.APPLY_INTERRUPTED: S.DISCARDED,
        S.DISCARDED: S.DISCARDED,  # idempotent
        S.EXPIRED: S.EXPIRED,  # already dropped: returned as it is
    },
}


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_action_in_every_state(
    store: StateStore, clock: Clock, action: str, state: ValidationState
) -> None:
    drive(store, clock, state)
    before, approvals_before = store.get("v1"), store.approvals("v1")
    expected = EXPECTED[action][state]
    if isinstance(expected, ValidationState):
        out = ACTIONS[action](store)
        assert store.get("v1").state is expected
        if action == "begin_apply" and state is S.APPLIED:
            assert isinstance(out, ApplyDone) and out.result_json == '{"ok": true}'
        elif isinstance(out, ValidationRecord):
            assert out == store.get("v1")
    else:
        cls = PermissionDenied if expected == "VALIDATION_DENIED" else FailedPrecondition
        refused(lambda: ACTIONS[action](store), expected, cls)
        assert store.get("v1") == before  # a refused call changes nothing
        assert store.approvals("v1") == approvals_before


@pytest.mark.parametrize("state", list(S))
def test_expire_moves_only_open_validations(
    store: StateStore, clock: Clock, state: ValidationState
) -> None:
    drive(store, clock, state)
    clock.now += TTL
    moved = store.expire()
    droppable = {S.PENDING_APPROVAL, S.APPROVED, S.ALLOWED, S.DENIED, S.APPLY_INTERRUPTED}
    if state in droppable:
        assert [r.state for r in moved] == [S.EXPIRED]
        assert moved[0].changeset_dir == "/var/lib/airlock/changes/v1"
        assert store.get("v1") == moved[0]
    else:
        assert moved == []
        assert store.get("v1").state is state


def test_abort_of_an_allowed_apply_goes_back_to_allowed(store: StateStore) -> None:
    store.record_validation(new(verdict=Verdict.ALLOW, auth_context=AuthContext.AUTO_APPROVED))
    rec = applied(store, "v1")
    assert rec.state is S.APPLYING and rec.auth_context is AuthContext.AUTO_APPROVED
    back = store.abort_apply("v1", "conflict: file changed since the dry run")
    assert back.state is S.ALLOWED
    assert back.apply_error == "conflict: file changed since the dry run"
    assert applied(store, "v1").state is S.APPLYING  # may be applied again
    done = store.finish_apply("v1", '{"written": 3}')
    assert done.state is S.APPLIED and done.applied_at == T0
    assert done.changeset_dir == "/var/lib/airlock/changes/v1"


def test_apply_is_idempotent(store: StateStore, clock: Clock) -> None:
    store.record_validation(new(verdict=Verdict.ALLOW))
    applied(store, "v1")
    store.finish_apply("v1", '{"written": 1}')
    clock.now += 10 * TTL  # long after the time to live: the result is still returned
    for _ in range(3):
        again = store.begin_apply("v1", uid=OWNER)
        assert isinstance(again, ApplyDone)
        assert again.result_json == '{"written": 1}'
        assert again.record.state is S.APPLIED
    refused(lambda: store.finish_apply("v1", '{"written": 2}'), "NOT_APPLYING")
    assert store.get("v1").apply_result_json == '{"written": 1}'


def test_finish_apply_needs_json(store: StateStore) -> None:
    store.record_validation(new(verdict=Verdict.ALLOW))
    applied(store, "v1")
    refused(lambda: store.finish_apply("v1", "not json"), "INVALID_APPLY_RESULT", InvalidRequest)
    assert store.get("v1").state is S.APPLYING


# --- Who may act ------------------------------------------------------------------------------


def test_only_the_caller_or_root_may_act(store: StateStore) -> None:
    store.record_validation(new())
    refused(
        lambda: store.approve("v1", ApprovalScope.ONCE, approver_uid=OTHER),
        "NOT_YOUR_VALIDATION",
        PermissionDenied,
    )
    assert store.approvals("v1") == [] and store.get("v1").state is S.PENDING_APPROVAL
    _, approval = store.approve(
        "v1", ApprovalScope.ONCE, approver_uid=ROOT, approver_subject="CN=a"
    )
    assert (approval.approver_uid, approval.approver_subject) == (ROOT, "CN=a")
    assert approval.uid == OWNER  # the approval is for the caller, whoever approved it
    for call in (
        lambda: store.begin_apply("v1", uid=OTHER),
        lambda: store.discard("v1", uid=OTHER),
    ):
        err = refused(call, "NOT_YOUR_VALIDATION", PermissionDenied)
        assert "1001" in err.message and "1000" in err.message
        assert store.get("v1").state is S.APPROVED
    assert applied(store, "v1", uid=ROOT).state is S.APPLYING
    store.finish_apply("v1", "{}")
    refused(lambda: store.begin_apply("v1", uid=OTHER), "NOT_YOUR_VALIDATION", PermissionDenied)

    store.record_validation(new("v2"))
    assert store.discard("v2", uid=OWNER).state is S.DISCARDED
    store.record_validation(new("v3"))
    assert store.discard("v3", uid=ROOT).state is S.DISCARDED


# --- ONCE tokens ------------------------------------------------------------------------------


def test_approve_records_who_when_and_the_binding(store: StateStore, clock: Clock) -> None:
    store.record_validation(new())
    clock.now += 5
    token, approval = store.approve(
        "v1", ApprovalScope.ONCE, approver_uid=OWNER, approver_subject="CN=alice"
    )
    assert len(token) >= 43  # 256 random bits, URL-safe base64
    assert token.replace("-", "").replace("_", "").isalnum()
    assert approval.created_at == T0 + 5 and approval.expires_at == T0 + TTL
    assert (approval.command, approval.cwd, approval.policy_version, approval.diff_hash) == (
        "rm -rf build",
        "/home/u/src",
        "p1",
        DIFF,
    )
    assert approval.used_at is None and approval.scope is ApprovalScope.ONCE
    assert store.approvals("v1") == [approval]
    rec = store.get("v1")
    assert rec.state is S.APPROVED and rec.auth_context is AuthContext.USER_VERIFIED
    token2, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    assert token2 != token


def test_a_once_token_works_once(store: StateStore, clock: Clock) -> None:
    store.record_validation(new())
    token, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    clock.now += 1
    assert store.authorize(token, **bound(diff_hash=DIFF)) is AuthContext.USER_VERIFIED
    assert store.approvals("v1")[0].used_at == T0 + 1
    refused(lambda: store.authorize(token, **bound()), "APPROVAL_USED")
    # The one run went to Execute: Apply needs a new approval.
    refused(lambda: store.begin_apply("v1", uid=OWNER), "APPROVAL_REQUIRED")
    store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    rec = applied(store, "v1")
    assert rec.auth_context is AuthContext.USER_VERIFIED


def test_an_apply_uses_the_once_token_and_an_abort_gives_it_back(store: StateStore) -> None:
    store.record_validation(new())
    token, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    applied(store, "v1")
    refused(lambda: store.authorize(token, **bound()), "APPROVAL_USED")
    store.abort_apply("v1", "conflict")
    assert store.approvals("v1")[0].used_at is None
    assert store.authorize(token, **bound()) is AuthContext.USER_VERIFIED


def test_a_once_token_dies_with_its_validation(store: StateStore, clock: Clock) -> None:
    store.record_validation(new("v1"))
    store.record_validation(new("v2", command="make clean"))
    t1, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    t2, _ = store.approve("v2", ApprovalScope.ONCE, approver_uid=OWNER)
    store.discard("v1", uid=OWNER)
    refused(lambda: store.authorize(t1, **bound()), "VALIDATION_DISCARDED")
    clock.now += TTL
    refused(
        lambda: store.authorize(t2, **bound(command="make clean")),
        "APPROVAL_EXPIRED",
    )


@pytest.mark.parametrize(
    "wrong",
    [
        {"command": "rm -rf /"},
        {"cwd": "/home/u"},
        {"policy_version": "p2"},
        {"diff_hash": hashlib.sha256(b"other").hexdigest()},
        {"uid": OTHER},
        {"uid": ROOT},
    ],
)
def test_a_once_token_binds_exactly_what_was_approved(
    store: StateStore, wrong: dict[str, object]
) -> None:
    store.record_validation(new())
    token, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    err = refused(
        lambda: store.authorize(token, **bound(**{"diff_hash": DIFF, **wrong})),
        "APPROVAL_MISMATCH",
        PermissionDenied,
    )
    assert "another" in err.message
    assert store.approvals("v1")[0].used_at is None  # a mismatch uses nothing up
    # A ONCE token is not tied to the session it came from; the rest must match.
    args = bound(session_id="another-session")
    assert store.authorize(token, **args) is AuthContext.USER_VERIFIED


def test_an_unknown_token_is_refused(store: StateStore) -> None:
    store.record_validation(new())
    store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    refused(
        lambda: store.authorize("forged", **bound()),
        "APPROVAL_INVALID",
        PermissionDenied,
    )
    assert store.authorize(None, **bound()) is None
    assert store.authorize("", **bound()) is None


def race(calls: list[Callable[[], object]]) -> list[object]:
    """The calls run at once, one thread each: what each returned, or its error's reason."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def worker(k: int) -> None:
        start.wait()
        try:
            results[k] = calls[k]()
        except AirlockError as err:
            results[k] = err.reason

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("separate_stores", [False, True])
def test_a_once_token_works_once_among_8_racing_threads(
    open_store: Callable[..., StateStore], separate_stores: bool
) -> None:
    first = open_store()
    first.record_validation(new())
    token, _ = first.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    stores = [open_store() if separate_stores else first for _ in range(8)]
    results = race([functools.partial(s.authorize, token, **bound()) for s in stores])
    assert results.count(AuthContext.USER_VERIFIED) == 1
    assert results.count("APPROVAL_USED") == 7
    assert store_used(first) == 1


def store_used(store: StateStore) -> int:
    return sum(a.used_at is not None for a in store.approvals("v1"))


@pytest.mark.parametrize("separate_stores", [False, True])
def test_one_apply_among_8_racing_threads(
    open_store: Callable[..., StateStore], separate_stores: bool
) -> None:
    first = open_store()
    first.record_validation(new(verdict=Verdict.ALLOW))
    stores = [open_store() if separate_stores else first for _ in range(8)]
    results = race([functools.partial(s.begin_apply, "v1", uid=OWNER) for s in stores])
    claimed = [r for r in results if isinstance(r, ValidationRecord)]
    assert len(claimed) == 1 and claimed[0].state is S.APPLYING
    assert results.count("APPLY_IN_PROGRESS") == 7
    first.finish_apply("v1", '{"n": 1}')
    for s in stores:
        done = s.begin_apply("v1", uid=OWNER)
        assert isinstance(done, ApplyDone) and done.result_json == '{"n": 1}'


# --- SESSION approvals ------------------------------------------------------------------------


def test_a_session_approval_covers_the_same_command_in_the_same_session(
    store: StateStore, clock: Clock
) -> None:
    store.record_validation(new())
    token, approval = store.approve("v1", ApprovalScope.SESSION, approver_uid=OWNER)
    assert approval.session_id == "sess-1"
    assert approval.expires_at == T0 + SESSION_TTL
    for _ in range(3):  # any number of runs
        assert store.authorize(None, **bound()) is AuthContext.SESSION_GRANTED
        assert store.authorize(token, **bound()) is AuthContext.SESSION_GRANTED
    for other in (
        {"session_id": "sess-2"},
        {"session_id": ""},
        {"command": "rm -rf /"},
        {"cwd": "/"},
        {"policy_version": "p2"},
        {"uid": OTHER},
    ):
        assert store.authorize(None, **bound(**other)) is None
    refused(
        lambda: store.authorize(token, **bound(session_id="sess-2")),
        "APPROVAL_MISMATCH",
        PermissionDenied,
    )
    # It outlives the validation it came from, but not its own expiry.
    clock.now += TTL + 1
    store.expire()
    assert store.authorize(None, **bound()) is AuthContext.SESSION_GRANTED
    clock.now = T0 + SESSION_TTL
    assert store.authorize(None, **bound()) is None
    refused(lambda: store.authorize(token, **bound()), "APPROVAL_EXPIRED")


def test_a_session_grant_approves_new_validations_of_the_session(store: StateStore) -> None:
    store.record_validation(new("v1"))
    store.approve("v1", ApprovalScope.SESSION, approver_uid=OWNER)
    v2 = store.record_validation(new("v2"))
    assert v2.state is S.APPROVED and v2.auth_context is AuthContext.SESSION_GRANTED
    assert applied(store, "v2").auth_context is AuthContext.SESSION_GRANTED
    assert applied(store, "v1").auth_context is AuthContext.USER_VERIFIED  # its own approval
    other_session = store.record_validation(new("v3", session_id="sess-2"))
    assert other_session.state is S.PENDING_APPROVAL
    other_command = store.record_validation(new("v4", command="rm -rf dist"))
    assert other_command.state is S.PENDING_APPROVAL
    denied = store.record_validation(new("v5", verdict=Verdict.DENY))
    assert denied.state is S.DENIED


def test_end_session_stops_session_grants(store: StateStore) -> None:
    store.record_validation(new("v1"))
    store.record_validation(new("other", session_id="sess-2"))
    token, _ = store.approve("v1", ApprovalScope.SESSION, approver_uid=OWNER)
    store.approve("other", ApprovalScope.SESSION, approver_uid=OWNER)
    v2 = store.record_validation(new("v2"))
    assert v2.state is S.APPROVED
    assert store.end_session("sess-1") == 1
    assert store.end_session("sess-1") == 0
    assert store.end_session("") == 0
    assert store.authorize(None, **bound()) is None
    refused(lambda: store.authorize(token, **bound()), "SESSION_ENDED")
    assert store.record_validation(new("v3")).state is S.PENDING_APPROVAL
    # v2 rested on the grant alone: applying it now needs a new approval.
    refused(lambda: store.begin_apply("v2", uid=OWNER), "APPROVAL_REQUIRED")
    # Another session's grant is untouched.
    other = bound(session_id="sess-2")
    assert store.authorize(None, **other) is AuthContext.SESSION_GRANTED


def test_a_session_approval_needs_a_session(store: StateStore) -> None:
    store.record_validation(new(session_id=""))
    refused(
        lambda: store.approve("v1", ApprovalScope.SESSION, approver_uid=OWNER),
        "NO_SESSION",
        InvalidRequest,
    )
    refused(
        lambda: store.approve("v1", 7, approver_uid=OWNER),
        "INVALID_SCOPE",
        InvalidRequest,
    )
    assert store.get("v1").state is S.PENDING_APPROVAL and store.approvals("v1") == []


# --- Expiry and quota -------------------------------------------------------------------------


def test_expiry(store: StateStore, clock: Clock) -> None:
    store.record_validation(new("old"))
    clock.now += 100
    store.record_validation(new("young", verdict=Verdict.ALLOW))
    clock.now = T0 + TTL - 1
    assert store.expire() == []
    clock.now = T0 + TTL
    # Past its time to live but not yet swept: already refused.
    refused(
        lambda: store.approve("old", ApprovalScope.ONCE, approver_uid=OWNER), "VALIDATION_EXPIRED"
    )
    expired = store.expire()
    assert [(r.validation_id, r.state) for r in expired] == [("old", S.EXPIRED)]
    assert store.expire() == []
    assert store.get("young").state is S.ALLOWED
    clock.now = T0 + 100 + TTL
    refused(lambda: store.begin_apply("young", uid=OWNER), "VALIDATION_EXPIRED")
    assert [r.validation_id for r in store.expire(now=T0 + 100 + TTL)] == ["young"]


def test_quota_accounting(open_store: Callable[..., StateStore], clock: Clock) -> None:
    store = open_store(quota_bytes=1000)
    store.record_validation(new("a", changeset_bytes=600))
    err = refused(
        lambda: store.record_validation(new("b", changeset_bytes=500)),
        "CHANGESET_QUOTA_EXCEEDED",
        ResourceExhausted,
    )
    assert "600 of 1000" in err.message
    refused(lambda: store.get("b"), "VALIDATION_NOT_FOUND", NotFound)
    store.record_validation(new("c", changeset_bytes=400, verdict=Verdict.ALLOW))
    assert store.changeset_usage() == 1000
    store.record_validation(new("no-changes", changeset_dir="", changeset_bytes=0, diff_hash=""))
    applied(store, "c")
    assert store.changeset_usage() == 1000  # APPLYING still holds its changes
    store.finish_apply("c", "{}")
    assert store.changeset_usage() == 600  # APPLIED: consumed
    store.discard("a", uid=OWNER)
    assert store.changeset_usage() == 0
    store.record_validation(new("d", changeset_bytes=1000))
    clock.now += TTL
    assert store.changeset_usage() == 1000  # still on disk until expire() hands it back
    store.expire()
    assert store.changeset_usage() == 0
    # Interrupted applies keep their changes (for inspection) until dropped.
    store.record_validation(new("e", changeset_bytes=300, verdict=Verdict.ALLOW))
    applied(store, "e")
    store.recover()
    assert store.changeset_usage() == 300


# --- Restarts and crashes ---------------------------------------------------------------------


def test_a_restart_keeps_states_and_approvals(open_store: Callable[..., StateStore]) -> None:
    before = open_store()
    before.record_validation(new("v1"))
    before.record_validation(new("v2", command="make clean"))
    before.record_validation(new("v3", verdict=Verdict.ALLOW))
    once, _ = before.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    before.approve("v2", ApprovalScope.SESSION, approver_uid=OWNER)
    applied(before, "v3")
    before.finish_apply("v3", '{"r": 1}')
    records = {v: before.get(v) for v in ("v1", "v2", "v3")}
    approvals = before.approvals("v1") + before.approvals("v2")
    before.close()

    after = open_store()
    assert {v: after.get(v) for v in records} == records
    assert after.approvals("v1") + after.approvals("v2") == approvals
    assert after.authorize(once, **bound()) is AuthContext.USER_VERIFIED
    session = bound(command="make clean")
    assert after.authorize(None, **session) is AuthContext.SESSION_GRANTED
    done = after.begin_apply("v3", uid=OWNER)
    assert isinstance(done, ApplyDone) and done.result_json == '{"r": 1}'


def test_a_crash_mid_apply_never_allows_a_second_apply(
    open_store: Callable[..., StateStore], db: Path, clock: Clock
) -> None:
    crashed = StateStore(db, clock=clock)
    crashed.record_validation(new())
    crashed.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    applied(crashed, "v1")
    del crashed  # no finish_apply, no close

    store = open_store()
    refused(lambda: store.begin_apply("v1", uid=OWNER), "APPLY_IN_PROGRESS")
    interrupted = store.recover()
    assert [r.validation_id for r in interrupted] == ["v1"]
    assert interrupted[0].state is S.APPLY_INTERRUPTED
    assert "stopped during the apply" in interrupted[0].apply_error
    assert store.recover() == []
    err = refused(lambda: store.begin_apply("v1", uid=OWNER), "APPLY_INTERRUPTED")
    assert "check the host" in err.message
    refused(
        lambda: store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER), "APPLY_INTERRUPTED"
    )
    refused(lambda: store.finish_apply("v1", "{}"), "NOT_APPLYING")
    refused(lambda: store.abort_apply("v1", "x"), "NOT_APPLYING")
    assert store.discard("v1", uid=OWNER).state is S.DISCARDED
    refused(lambda: store.begin_apply("v1", uid=OWNER), "VALIDATION_DISCARDED")


_FSYNC_PHASES = """
import os, sys
sys.path.insert(0, sys.argv[2])
from tests.unit.core.test_state import new
from airlock._errors import AirlockError
from airlock.core.state import ApprovalScope, StateStore
store = StateStore(sys.argv[1])
store.record_audit_head(None)  # the WAL exists, its first sync done
os.getppid()  # phase 1: a validation recorded
store.record_validation(new("v1"))
os.getppid()  # phase 2: a refused one (a duplicate id)
try:
    store.record_validation(new("v1"))
except AirlockError:
    pass
os.getppid()  # phase 3: an approval
store.approve("v1", ApprovalScope.ONCE, approver_uid=1000)
os.getppid()  # phase 4: the apply's first step
store.begin_apply("v1", uid=1000)
os.getppid()
"""


def test_only_a_new_validation_is_committed_without_an_fsync(tmp_path: Path) -> None:
    """A new validation costs no fsync (decisions section 15: the audit log holds the decision;
    a machine crash may lose the row, never a later one); approvals and applies still fsync,
    also right after a validation was refused inside its transaction. The real system calls,
    counted by strace between markers."""
    phases = fsyncs_per_phase(_FSYNC_PHASES, tmp_path / "trace", str(tmp_path / "state.db"))
    assert phases[:4] == [0, 0, phases[2], phases[3]] and len(phases) == 5, phases
    assert phases[2] >= 1 and phases[3] >= 1, phases


def test_no_token_begins_with_a_dash(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """One URL-safe token in 64 would begin with "-", which `airlock run --token TOKEN` reads
    as another option (a README tour in CI hit it): such a draw is drawn again."""
    draws = iter(["-" + "a" * 42, "--" + "b" * 41, "c" * 43])
    monkeypatch.setattr(state_module.secrets, "token_urlsafe", lambda n: next(draws))
    store.record_validation(new())
    token, _ = store.approve("v1", ApprovalScope.ONCE, approver_uid=OWNER)
    assert token == "c" * 43
    monkeypatch.undo()
    tokens = [new_token() for _ in range(2000)]
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == 2000 and all(len(t) == 43 for t in tokens)


def test_tokens_are_not_stored_in_clear(store: StateStore, db: Path) -> None:
    store.record_validation(new())
    tokens = [store.approve("v1", scope, approver_uid=OWNER)[0] for scope in ApprovalScope]

    def stored_bytes() -> bytes:
        return b"".join(
            Path(f"{db}{suffix}").read_bytes()
            for suffix in ("", "-wal", "-shm")
            if Path(f"{db}{suffix}").exists()
        )

    while_open = stored_bytes()  # the commits are in the WAL
    store.close()
    after_close = stored_bytes()  # checkpointed into the database file
    assert not Path(f"{db}-wal").exists()
    for data in (while_open, after_close):
        for token in tokens:
            assert token.encode() not in data
            assert hashlib.sha256(token.encode()).hexdigest().encode() in data


CHILD = textwrap.dedent(
    """
    import sys
    from airlock.core.state import ApprovalScope, NewValidation, StateStore
    from airlock.types import Verdict

    store = StateStore(sys.argv[1])
    k = sys.argv[2]
    def new(vid, verdict):
        return NewValidation(
            validation_id=vid, command="make", cwd="/src", uid=1000, gid=1000,
            verdict=verdict, session_id="s", policy_version="p", changeset_dir="/c/" + vid,
            changeset_bytes=10,
        )
    store.record_validation(new("ask" + k, Verdict.ASK))
    token, _ = store.approve("ask" + k, ApprovalScope.ONCE, approver_uid=1000)
    store.record_validation(new("allow" + k, Verdict.ALLOW))
    store.begin_apply("allow" + k, uid=1000)
    sys.stdout.write(token + "\\n")
    sys.stdout.flush()
    sys.stdin.readline()  # blocks: the parent kills us here
    """
)


def test_state_survives_sigkill_right_after_the_calls_return(db: Path) -> None:
    tokens = []
    for k in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            tokens.append(child.stdout.readline().strip())
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        assert tokens[-1]
    with StateStore(db) as store:
        args = {"command": "make", "cwd": "/src", "policy_version": "p", "uid": 1000}
        for k, token in enumerate(tokens):
            assert store.get(f"ask{k}").state is S.APPROVED
            assert store.get(f"allow{k}").state is S.APPLYING
            assert store.authorize(token, session_id="s", **args) is AuthContext.USER_VERIFIED
        assert sorted(r.validation_id for r in store.recover()) == ["allow0", "allow1", "allow2"]
        for vid in ("allow0", "allow1", "allow2"):
            refused(partial(store.begin_apply, vid, uid=1000), "APPLY_INTERRUPTED")


def test_records_are_json_friendly(store: StateStore) -> None:
    """The apply result round-trips byte for byte (the daemon returns it to retries)."""
    store.record_validation(new(verdict=Verdict.ALLOW))
    applied(store, "v1")
    result = json.dumps({"paths": ["a", "é"], "n": 2}, ensure_ascii=False)
    store.finish_apply("v1", result)
    done = store.begin_apply("v1", uid=OWNER)
    assert isinstance(done, ApplyDone) and done.result_json == result


@pytest.mark.parametrize(
    ("why", "advice"),
    [
        (
            "2502 changes are more than the 2000 a dry run keeps for Apply; run the command "
            "with Execute instead",
            "validating again would not keep them: run the command with Execute (`airlock run`) "
            "or in smaller steps",
        ),
        (
            "the changes are larger than the space allowed for keeping them [CHANGESET_QUOTA]",
            "validating again would not keep them: run the command with Execute (`airlock run`) "
            "or in smaller steps",
        ),
        (
            "over the quota [CHANGESET_QUOTA_EXCEEDED]",
            "apply or discard pending validations (`airlock pending`) or wait for them to "
            "expire, then validate again",
        ),
    ],
)
def test_apply_of_changes_not_kept_advises_by_cause(
    store: StateStore, why: str, advice: str
) -> None:
    store.record_validation(
        new(
            "v9",
            Verdict.ALLOW,
            diff_hash="",
            changeset_dir="",
            changeset_bytes=0,
            changes_not_kept=why,
        )
    )
    with pytest.raises(FailedPrecondition) as refused:
        store.begin_apply("v9", uid=OWNER)
    assert refused.value.reason == "CHANGES_NOT_KEPT"
    assert refused.value.message == (
        f"validation v9 has nothing to apply: its dry run's changes were not kept ({why}); "
        + advice
    )
