"""Issue 15, item 11, the parts that need no daemon: the id check, the state store's failures
as a client sees them, and the log budget of malformed requests."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from airlock import _sqlite
from airlock._errors import InvalidRequest, NotFound, Unavailable
from airlock.api.status import from_rpc_error, status_code_of, to_rpc_status
from airlock.core.ids import MAX_ID_BYTES, checked_id, shown
from airlock.core.state import NewValidation, StateError, StateStore, ValidationState
from airlock.core.workflow import Workflow
from airlock.daemon.service import _LogBudget
from airlock.types import ApprovalScope, Verdict


@pytest.mark.parametrize(
    "value",
    [
        "a" * (MAX_ID_BYTES + 1),
        "é" * (MAX_ID_BYTES // 2 + 1),
        "id\0",
        "id\nforged",
        "\x1b[2J",
        "\x85",
    ],
    ids=["too-long", "too-many-bytes", "nul", "newline", "escape", "c1-control"],
)
def test_a_bad_id_is_refused_with_a_short_quote(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        checked_id("validation_id", value)
    err = caught.value
    assert err.reason == "INVALID_ID" and err.message.startswith("validation_id: ")
    assert len(err.message) < 120 and "\n" not in err.message and "\x1b" not in err.message


@pytest.mark.parametrize("value", ["", "0" * 32, "b" * MAX_ID_BYTES, "s-1 (ünïcode)", "tok_-.~"])
def test_a_good_id_passes_as_it_is(value: str) -> None:
    assert checked_id("session_id", value) is value


def test_shown_quotes_a_prefix_and_the_length() -> None:
    assert shown("abc") == "'abc'"
    assert shown("x" * 10_000) == repr("x" * 16) + "... (10000 characters)"


def test_a_failing_state_store_reaches_the_client_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A locked store (an operator's sqlite3, a backup) fails the call with UNAVAILABLE and
    STATE_STORE_FAILED: it may work later. It used to reach clients as UNKNOWN."""
    monkeypatch.setattr(_sqlite, "BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StateError) as caught:
                store.discard("0" * 32, uid=0)
        finally:
            holder.close()
    err = caught.value
    assert err.reason == "STATE_STORE_FAILED" and "locked" in err.message
    assert status_code_of(err) is grpc.StatusCode.UNAVAILABLE
    sent = to_rpc_status(err)
    assert sent.code is grpc.StatusCode.UNAVAILABLE

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return sent.code

        def details(self) -> str:
            return sent.details

        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return tuple(sent.trailing_metadata)

    back = from_rpc_error(Failed())
    assert type(back) is Unavailable and back.reason == "STATE_STORE_FAILED"


def test_a_closed_store_is_unavailable_too(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.close()
    with pytest.raises(StateError) as caught:
        store.get("0" * 32)
    assert caught.value.reason == "STATE_STORE_CLOSED"
    assert status_code_of(caught.value) is grpc.StatusCode.UNAVAILABLE


def test_a_corrupt_store_keeps_its_code() -> None:
    # Only the two reasons above are mapped: a damaged file needs an operator, not a retry.
    err = StateError("damaged", reason="STATE_STORE_CORRUPT")
    assert status_code_of(err) is grpc.StatusCode.UNKNOWN


def test_the_log_budget_keeps_a_rate_and_counts_what_it_left_out() -> None:
    now = [0.0]
    budget = _LogBudget(rate=5, clock=lambda: now[0])
    taken = [budget.take() for _ in range(50)]
    assert taken[:5] == [0] * 5 and taken[5:] == [None] * 45  # a burst of 5, then nothing
    now[0] += 1.0  # a second later: 5 more, the first says 45 were left out
    assert [budget.take() for _ in range(6)] == [45, 0, 0, 0, 0, None]
    now[0] += 0.25
    assert budget.take() == 1 and budget.take() is None


# --- Pruning: expired changes and old rows go without waiting for a request ----------------------


def _new(vid: str, changeset_dir: str, **kw: object) -> NewValidation:
    fields: dict[str, object] = {
        "validation_id": vid,
        "command": "rm -rf build",
        "cwd": "/home/u/src",
        "uid": 1000,
        "gid": 1000,
        "verdict": Verdict.ASK,
        "policy_version": "p1",
        "diff_hash": "d" * 64,
        "changeset_dir": changeset_dir,
        "changeset_bytes": 100 if changeset_dir else 0,
    }
    fields.update(kw)
    return NewValidation(**fields)  # type: ignore[arg-type]


def _wait(condition: Callable[[], bool], guard_s: float = 30) -> None:
    """Until ``condition`` holds; the guard only stops a hang."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "the pruning thread never did its work"
        time.sleep(0.02)


def test_the_pruning_thread_removes_expired_changes_without_a_request(tmp_path: Path) -> None:
    now = [time.time()]
    changes = tmp_path / "changes"
    with StateStore(tmp_path / "state.db", ttl_s=60, clock=lambda: now[0]) as store:
        workflow = Workflow(store, str(changes))
        kept = []
        for i in range(3):
            d = changes / f"v{i}"
            (d / "upper").mkdir(parents=True)
            (d / "upper" / "big").write_bytes(b"x" * 4096)
            store.record_validation(_new(f"v{i}", str(d)))
            kept.append(d)
        workflow.start_pruning(every_s=0.01)
        try:
            time.sleep(0.1)  # not yet expired: nothing goes
            assert all(d.exists() for d in kept)
            now[0] += 61  # past the time to live; no Validate comes
            _wait(lambda: not any(d.exists() for d in kept))
            assert {store.get(f"v{i}").state for i in range(3)} == {ValidationState.EXPIRED}
        finally:
            workflow.stop_pruning()


def test_prune_is_bounded_and_deletes_final_rows_after_their_keep_time(tmp_path: Path) -> None:
    now = [time.time()]
    with StateStore(tmp_path / "state.db", ttl_s=60, clock=lambda: now[0]) as store:
        workflow = Workflow(store, str(tmp_path / "changes"))
        for i in range(7):
            store.record_validation(_new(f"v{i}", ""))
        store.record_validation(_new("denied", "", verdict=Verdict.DENY))
        now[0] += 61
        # Bounded: 3 a round, the oldest first; the row of a final validation stays a while.
        assert workflow.prune(batch=3, keep_final_s=3600) == 3
        assert workflow.prune(batch=3, keep_final_s=3600) == 3
        assert workflow.prune(batch=3, keep_final_s=3600) == 2
        assert workflow.prune(batch=3, keep_final_s=3600) == 0
        assert store.get("v0").state is ValidationState.EXPIRED
        # Once kept long enough, the rows go too (3 a round), and with them the answer.
        assert workflow.prune(batch=3, keep_final_s=-1e9) == 3
        while workflow.prune(batch=3, keep_final_s=-1e9):
            pass
        for vid in ("v0", "v6", "denied"):
            with pytest.raises(NotFound):
                store.get(vid)


def test_prune_keeps_validations_an_approval_still_names(tmp_path: Path) -> None:
    now = [time.time()]
    with StateStore(tmp_path / "state.db", ttl_s=60, clock=lambda: now[0]) as store:
        store.record_validation(_new("v1", "", session_id="s-1"))
        store.approve("v1", ApprovalScope.SESSION, approver_uid=0)
        store.discard("v1", uid=0)
        # Final, but its session approval has not expired: both stay.
        assert store.prune(before=now[0] + 1, limit=10) == 0
        assert store.get("v1").state is ValidationState.DISCARDED
        # Once the approval is past its time too, both go (approval first, then validation).
        assert store.prune(before=now[0] + 10 * 3600, limit=10) == 2
        with pytest.raises(NotFound):
            store.get("v1")
