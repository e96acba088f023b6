"""Faults of the audit log and the state directory (issue 15, items 5, 9 and 10).

A real daemon, real SQLite, real mounts:

* the audit log locked by another process, as an operator's ``sqlite3`` shell holding
  ``BEGIN EXCLUSIVE`` does: health, GetCapabilities and VerifyAuditLog still answer at once,
  Validate fails fast with AUDIT_UNAVAILABLE, and all of it recovers when the lock goes;
* the log cut short (emptied, truncated, its last events deleted, moved aside): VerifyAuditLog
  says so at once, and a restart refuses the log in one line until the operator starts a new
  one on purpose (``--new-audit-log``);
* a read-only state directory (a bind mount remounted read-only, made and removed here): the
  daemon refuses to start, and stops, with one line per failure and no traceback.

Latencies are measured and printed (``-s`` shows them); their bounds only guard against a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock import AirlockError
from airlock.audit import LOG_FILE, Anchor, ProblemKind
from airlock.client import Client
from tests.helpers import AIRLOCKD, TEST_LIMITS, Daemon, running_daemon, start_daemon

pytestmark = pytest.mark.soak  # each test here takes more than a few seconds

HANG_GUARD_S = 20.0  # far above every latency measured here: it only catches a hang


# --- Helpers ------------------------------------------------------------------------------------


def entries(text: str) -> list[dict[str, object]]:
    """The daemon's log lines; every one must be JSON (a traceback is not)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def db_path(d: Daemon) -> str:
    return os.path.join(d.state_dir, LOG_FILE)


def is_locked(db: str) -> bool:
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        return "locked" in str(err)
    else:
        conn.execute("ROLLBACK")
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def locked_by_operator(db: str) -> Iterator[None]:
    """The log locked as an operator's ``sqlite3`` shell locks it, until the block ends."""
    shell = subprocess.Popen(
        ["sqlite3", db], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert shell.stdin is not None
    try:
        shell.stdin.write("BEGIN EXCLUSIVE;\nINSERT INTO meta VALUES ('operator', 'was here');\n")
        shell.stdin.flush()
        deadline = time.monotonic() + HANG_GUARD_S
        while not is_locked(db):
            assert time.monotonic() < deadline, "the sqlite3 shell did not take the lock"
            time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(OSError):
            shell.stdin.write("ROLLBACK;\n.quit\n")
            shell.stdin.close()
        try:
            shell.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            shell.kill()
            shell.wait()


def timed(call: object) -> tuple[object, float]:
    start = time.monotonic()
    result = call()  # type: ignore[operator]
    return result, time.monotonic() - start


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only: a bind mount of itself, remounted read-only; removed at the end."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def airlockd(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """airlockd on ``base/state`` that is expected to refuse to start (so it returns)."""
    return subprocess.run(
        [AIRLOCKD, "--config", os.devnull, "--socket", str(base / "s.sock"),
         "--state-dir", str(base / "state"), *TEST_LIMITS, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def validations(d: Daemon, n: int) -> Anchor:
    """Make ``n`` validations; the log's head after them."""
    with d.client() as c:
        for i in range(n):
            c.validate(f"echo {i}", cwd="/tmp")
        head = c.verify_audit_log().head
    assert head is not None
    return head


# --- Item 5: a stalled audit log -----------------------------------------------------------------


def test_a_locked_audit_log_wedges_nothing(public_tmp: Path) -> None:
    # --max-concurrent 2: the daemon admits 10 calls at once, fewer than the 24 sent below.
    args = (*TEST_LIMITS, "--max-concurrent", "2")
    with running_daemon(public_tmp, *args) as d, Client(d.socket, timeout=60) as c:
        c.validate("echo before", cwd="/tmp")
        with locked_by_operator(db_path(d)):
            outcomes: list[tuple[str, float]] = []

            def validate(i: int) -> None:
                start = time.monotonic()
                try:
                    with Client(d.socket, timeout=60) as own:
                        own.validate(f"echo stalled {i}", cwd="/tmp")
                    outcomes.append(("answered", time.monotonic() - start))
                except AirlockError as exc:
                    outcomes.append((exc.reason, time.monotonic() - start))

            callers = [threading.Thread(target=validate, args=(i,)) for i in range(24)]
            for t in callers:
                t.start()
            time.sleep(0.5)  # they are in: every call slot waits on the log
            health: list[float] = []
            other: list[float] = []
            while any(t.is_alive() for t in callers):
                ok, took = timed(c.health)
                assert ok
                health.append(took)
                _, took = timed(c.capabilities)
                other.append(took)
                time.sleep(0.1)
            for t in callers:
                t.join()
            # Reads do not queue behind the writer's lock.
            result, verify_s = timed(c.verify_audit_log)
            assert result.ok  # type: ignore[attr-defined]
            # One more Validate alone: it fails fast, it is not answered unrecorded.
            start = time.monotonic()
            with pytest.raises(AirlockError) as info:
                c.validate("echo alone", cwd="/tmp")
            alone_s = time.monotonic() - start
        print(
            f"\naudit log locked: health {len(health)} calls, median "
            f"{statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms; "
            f"GetCapabilities max {max(other) * 1000:.1f} ms; VerifyAuditLog "
            f"{verify_s * 1000:.1f} ms; a lone Validate failed after {alone_s:.2f} s; "
            f"24 concurrent Validates: {dict(Counter(r for r, _ in outcomes))}, slowest "
            f"{max(s for _, s in outcomes):.2f} s"
        )
        assert info.value.reason == "AUDIT_UNAVAILABLE", info.value
        assert "did not take the event" in info.value.message or "AUDIT" in info.value.message
        reasons = Counter(r for r, _ in outcomes)
        assert reasons["AUDIT_UNAVAILABLE"] >= 1, reasons
        assert set(reasons) <= {"AUDIT_UNAVAILABLE", "TOO_MANY_VALIDATIONS"}, reasons
        assert max(health) < HANG_GUARD_S and max(other) < HANG_GUARD_S
        assert max(s for _, s in outcomes) < HANG_GUARD_S and alone_s < HANG_GUARD_S
        # The lock is gone: the daemon records and answers again, and the log holds exactly
        # the calls that were answered.
        c.validate("echo after", cwd="/tmp")
        assert c.verify_audit_log().ok
        commands = [s.event.command for s in c.audit_events()]
        assert commands == ["echo before", "echo after"]
    failures = [e for e in entries(d.log()) if e["msg"] == "audit log append failed"]
    assert failures and all("did not take the event" in str(e["error"]) for e in failures)


# --- Item 10: a log cut short ---------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["emptied", "halved"])
def test_verify_reports_a_log_cut_short_at_once(public_tmp: Path, cut: str) -> None:
    d = start_daemon(public_tmp, *TEST_LIMITS)
    try:
        validations(d, 40)
        db = db_path(d)
        # As an operator's tool would leave it: the WAL folded into the file, then the file cut.
        subprocess.run(
            ["sqlite3", db, "PRAGMA wal_checkpoint(TRUNCATE);"], check=True, capture_output=True
        )
        size = os.path.getsize(db)
        os.truncate(db, 0 if cut == "emptied" else size // 2)
        start = time.monotonic()
        with Client(d.socket, timeout=60) as c:
            if cut == "emptied":  # a problem found in the chain: the daemon knows its head
                result = c.verify_audit_log()
                assert not result.ok and result.problem is not None
                assert result.problem.kind is ProblemKind.TRUNCATED, result.problem
                assert "is empty: the log was cut short" in result.problem.detail
            else:  # pages are missing: SQLite finds the file damaged
                with pytest.raises(AirlockError) as info:
                    c.verify_audit_log()
                assert info.value.reason == "AUDIT_LOG_CORRUPT", info.value
                assert "is corrupt" in info.value.message
        took = time.monotonic() - start
        print(f"\nVerifyAuditLog of a log {cut} ({size} bytes before): {took * 1000:.1f} ms")
        assert took < HANG_GUARD_S
    finally:
        d.stop()  # its status is not the point: the file it stops on was cut


def remove_last_events(d: Daemon, keep: int) -> None:
    with contextlib.closing(sqlite3.connect(db_path(d))) as conn, conn:
        conn.execute("DELETE FROM events WHERE seq > ?", (keep,))
        conn.execute("DELETE FROM event_rules WHERE seq > ?", (keep,))


CUTS = {
    "emptied": lambda d: os.truncate(db_path(d), 0),
    "last-events-deleted": lambda d: remove_last_events(d, 3),
    "moved-aside": lambda d: os.rename(db_path(d), db_path(d) + ".old"),
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_a_restart_refuses_a_log_cut_short(public_tmp: Path, cut: str) -> None:
    with running_daemon(public_tmp, *TEST_LIMITS) as d:
        head = validations(d, 6)
    for suffix in ("-wal", "-shm"):
        assert not os.path.exists(db_path(d) + suffix)  # a clean stop folds the WAL in
    CUTS[cut](d)

    refused = airlockd(public_tmp)
    assert refused.returncode == 1, refused.stderr
    lines = entries(refused.stderr)  # JSON lines only: no traceback
    errors = [e for e in lines if e["level"] == "error"]
    assert len(errors) == 1, refused.stderr
    error = errors[0]
    assert (
        error["msg"] == "the audit log does not reach the head this daemon recorded; not starting"
    )
    assert error["recorded_head"] == str(head)
    assert error["problem"] == "TRUNCATED"
    assert "--new-audit-log" in str(error["error"])
    assert not any(e["msg"] == "serving" for e in lines)
    # Refused again: nothing was recorded over the head.
    assert airlockd(public_tmp).returncode == 1

    # The operator starts a new log on purpose; later starts take it as it is.
    with running_daemon(public_tmp, *TEST_LIMITS, "--new-audit-log") as again:
        warned = [e for e in entries(again.log()) if e["msg"].startswith("starting a new audit")]
        assert warned and warned[0]["recorded_head"] == str(head)
        with again.client() as c:
            c.validate("echo new log", cwd="/tmp")
            assert c.verify_audit_log().ok
    with running_daemon(public_tmp, *TEST_LIMITS) as third, third.client() as c:
        assert c.verify_audit_log().ok


def test_verify_reports_events_removed_from_the_end_while_running(public_tmp: Path) -> None:
    with running_daemon(public_tmp, *TEST_LIMITS) as d:
        validations(d, 5)
        remove_last_events(d, 3)  # the chain that is left verifies by itself
        with d.client() as c:
            result = c.verify_audit_log()
        assert not result.ok and result.problem is not None
        assert (result.problem.kind, result.problem.seq) == (ProblemKind.TRUNCATED, 4)
        assert "the daemon's last append names event 5" in result.problem.detail


# --- Item 9: a read-only state directory ----------------------------------------------------------


@pytest.mark.parametrize("state", ["new", "used"])
def test_no_start_on_a_read_only_state_directory(public_tmp: Path, state: str) -> None:
    state_dir = public_tmp / "state"
    if state == "used":
        with running_daemon(public_tmp, *TEST_LIMITS) as d:
            validations(d, 1)
    else:
        state_dir.mkdir(mode=0o700)
    with read_only(state_dir):
        proc = airlockd(public_tmp)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [e for e in entries(proc.stderr) if e["level"] == "error"]
    assert len(errors) == 1, proc.stderr
    assert errors[0]["msg"] == "the state directory cannot be used; not starting"
    assert "Read-only file system" in str(errors[0]["error"])


def test_a_stop_on_a_read_only_state_directory_is_orderly(public_tmp: Path) -> None:
    d = start_daemon(public_tmp, *TEST_LIMITS)
    try:
        head = validations(d, 3)
        with read_only(Path(d.state_dir)):
            code = d.stop()
    finally:
        d.stop(signal.SIGKILL)
    log = d.log()
    assert "Traceback" not in log
    lines = entries(log)
    assert code == 1, log
    errors = [e for e in lines if e["level"] == "error"]
    assert errors and all("Read-only file system" in str(e["error"]) for e in errors), errors
    assert all(str(e["msg"]).startswith("could not ") for e in errors), errors
    closed = [e for e in lines if e["msg"] == "audit log closed"]
    assert closed and closed[0]["head"] == str(head)
    assert lines[-1]["msg"] == "stopped" and lines[-1]["clean"] is False
    # Writable again: the next start finds the log reaching the head it recorded.
    with running_daemon(public_tmp, *TEST_LIMITS) as again, again.client() as c:
        c.validate("echo after", cwd="/tmp")
        result = c.verify_audit_log()
        assert result.ok and result.head is not None and result.head.seq == head.seq + 1
