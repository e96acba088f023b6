"""The audit log when its file is stalled or cut short (issue 15, items 5 and 10).

Real SQLite files: another connection holds the write lock as an operator's shell would; the
file is emptied or its last events deleted. Time bounds only guard against a hang.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.audit import Anchor, AuditError, AuditLog, ProblemKind
from airlock.audit import log as audit_log
from airlock.core._audit import HeadKeeper
from airlock.core.state import StateStore
from tests.helpers import event

HANG_GUARD_S = 10.0


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """The log's write lock held by another connection (``BEGIN EXCLUSIVE``)."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("INSERT INTO meta VALUES ('operator', 'was here')")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def commands(log: AuditLog) -> list[str]:
    page, _ = log.list(page_size=100)
    return [s.event.command for s in page]


def test_an_append_fails_fast_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path, append_timeout_s=0.5) as log:
        log.append(event(1))
        with write_locked(path):
            start = time.monotonic()
            with pytest.raises(AuditError) as info:
                log.append(event(2))
            took = time.monotonic() - start
            assert "did not take the event within 0.5 s" in info.value.message
            assert 0.5 <= took < HANG_GUARD_S
            assert log.verify().ok  # reads go on beside the lock
        # The withdrawn event was never written, and the log takes the next one.
        stored = log.append(event(3))
        assert stored.seq == 2
        assert commands(log) == [event(1).command, event(3).command]
        assert log.verify().ok


def test_many_stalled_appends_all_fail_and_leave_nothing_queued(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path, append_timeout_s=0.5) as log:
        log.append(event(0))
        errors: list[str] = []

        def append(i: int) -> None:
            try:
                log.append(event(i))
            except AuditError as exc:
                errors.append(exc.message)

        with write_locked(path):
            threads = [threading.Thread(target=append, args=(i,)) for i in range(1, 21)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(HANG_GUARD_S)
            assert time.monotonic() - start < HANG_GUARD_S
        assert len(errors) == 20
        assert log._queued == 0 and not log._queue
        assert log.append(event(99)).seq == 2


def test_a_full_queue_refuses_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "MAX_QUEUED", 1)
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path, append_timeout_s=2) as log:
        log.append(event(0))
        with write_locked(path):
            failed: list[str] = []

            def wait_and_fail() -> None:
                try:
                    log.append(event(1))
                except AuditError as exc:
                    failed.append(exc.message)

            waiting = threading.Thread(target=wait_and_fail)
            waiting.start()
            deadline = time.monotonic() + HANG_GUARD_S
            while log._queued == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(AuditError) as info:
                log.append(event(2))
            assert "events waiting for a commit" in info.value.message
            waiting.join(HANG_GUARD_S)
        assert len(failed) == 1 and "did not take the event" in failed[0]


def test_close_fails_a_waiting_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path, append_timeout_s=HANG_GUARD_S)
    log.append(event(0))
    reasons: list[str] = []

    def append() -> None:
        try:
            log.append(event(1))
        except AuditError as exc:
            reasons.append(exc.reason)

    with write_locked(path):
        t = threading.Thread(target=append)
        t.start()
        time.sleep(0.3)
        log.close()
        t.join(HANG_GUARD_S)
    assert reasons == ["AUDIT_LOG_CLOSED"]


def test_verify_reports_an_emptied_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        for i in range(5):
            log.append(event(i))
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path.write_bytes(b"")
        start = time.monotonic()
        result = log.verify()
        assert time.monotonic() - start < HANG_GUARD_S
        assert not result.ok and result.problem is not None
        assert result.problem.kind is ProblemKind.TRUNCATED
        assert "is empty" in result.problem.detail


def test_verify_knows_the_events_this_log_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        for i in range(5):
            log.append(event(i))
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("DELETE FROM events WHERE seq > 3")
            conn.execute("DELETE FROM event_rules WHERE seq > 3")
        result = log.verify()  # no anchor given: the log's own last append is one
        assert not result.ok and result.problem is not None
        assert (result.problem.kind, result.problem.seq) == (ProblemKind.TRUNCATED, 4)
        assert "the daemon's last append names event 5" in result.problem.detail


def test_check_continues(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        heads = [log.append(event(i)) for i in range(4)]
        third = Anchor(heads[2].seq, heads[2].hash)
        assert log.check_continues(third, "the record") is None
        ahead = log.check_continues(Anchor(9, heads[0].hash), "the record")
        assert ahead is not None and ahead.kind is ProblemKind.TRUNCATED
        assert "the record names event 9, but the log ends at 4" in ahead.detail
        other = log.check_continues(Anchor(2, heads[0].hash), "the record")
        assert other is not None and other.kind is ProblemKind.REWRITTEN


def test_the_state_store_keeps_the_head(tmp_path: Path) -> None:
    with (
        AuditLog(tmp_path / "audit.sqlite3") as log,
        StateStore(tmp_path / "state.db") as state,
    ):
        assert state.audit_head() is None
        keeper = HeadKeeper(log, state, interval_s=0.05)
        keeper.start(None)
        last = [log.append(event(i)) for i in range(3)][-1]
        deadline = time.monotonic() + HANG_GUARD_S
        while state.audit_head() != Anchor(last.seq, last.hash):
            assert time.monotonic() < deadline, "the head was not recorded"
            time.sleep(0.02)
        final = log.append(event(9))
        assert keeper.stop() == Anchor(final.seq, final.hash)
        assert state.audit_head() == Anchor(final.seq, final.hash)
        state.record_audit_head(None)
        assert state.audit_head() is None
    with StateStore(tmp_path / "state.db") as again:  # an existing store keeps its table
        again.record_audit_head(Anchor(1, "ab" * 32))
        assert again.audit_head() == Anchor(1, "ab" * 32)
