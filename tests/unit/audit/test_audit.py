"""The audit log on real SQLite files: the chain, filters, tampering, crashes, corruption.

Tampering is done the way an attacker with write access would: raw SQL on the file
(``sqlite3`` directly), never through the module. Durability is tested by SIGKILLing
a real child process right after ``append`` returned in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import itertools
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock._errors import AirlockError, InvalidRequest
from airlock.audit import (
    GENESIS_HASH,
    KEY_FILE,
    LOG_FILE,
    Anchor,
    Approval,
    AuditError,
    AuditEvent,
    AuditFilter,
    AuditLog,
    Authorization,
    Caller,
    Outcome,
    ProblemKind,
    RpcKind,
    RuleDecision,
    StoredEvent,
    VerifyResult,
    caller_of,
    chain_hash,
    decode_event,
    encode_event,
    env_sha256,
    load_key,
    parse_anchor,
    path_text,
    rule_decisions,
)
from airlock.audit import log as audit_log
from airlock.audit.canonical import record_hasher
from airlock.types import Finding, FindingSource, PeerCred, Severity, Verdict
from tests.helpers.audit import T0, event
from tests.helpers.fsyncs import fsyncs_per_phase


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite3"


def filled(path: Path, n: int, key: bytes | None = None) -> list[StoredEvent]:
    with AuditLog(path, key=key) as log:
        return [log.append(event(i)) for i in range(n)]


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """The attacker's access: plain SQL on the file, in one transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def rechain(conn: sqlite3.Connection, start: int) -> None:
    """Recompute every hash from ``start`` on, with plain SHA-256 (the attacker has no key)."""
    prev = (
        GENESIS_HASH
        if start == 1
        else conn.execute("SELECT hash FROM events WHERE seq = ?", (start - 1,)).fetchone()[0]
    )
    rows = conn.execute("SELECT seq, body FROM events WHERE seq >= ? ORDER BY seq", (start,))
    for seq, body in rows.fetchall():
        digest = chain_hash(seq, prev, body.encode())
        conn.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest


def problem_of(
    path: Path, anchor: Anchor | None = None, key: bytes | None = None
) -> tuple[ProblemKind | None, int | None, str]:
    with AuditLog(path, key=key) as log:
        result = log.verify(anchor)
    if result.problem is None:
        return None, None, ""
    return result.problem.kind, result.problem.seq, result.problem.detail


def all_pages(log: AuditLog, f: AuditFilter, size: int) -> tuple[list[StoredEvent], int]:
    out: list[StoredEvent] = []
    token: str | None = None
    pages = 0
    while True:
        page, token = log.list(f, size, token)
        pages += 1
        out += page
        if token is None:
            return out, pages


# --- The canonical encoding -------------------------------------------------------------------

GOLDEN = AuditEvent(
    kind=RpcKind.APPLY,
    caller=Caller(uid=1000, pid=4242, gid=1000, exe="/usr/bin/python3.11"),
    command='rm -rf build && echo "done" > log',
    cwd="/home/ana/src",
    env_sha256=env_sha256([("PATH", "/usr/bin"), ("HOME", "/home/ana")]),
    findings=(RuleDecision("rm.recursive", Verdict.ASK),),
    effects="1 directory deleted, 1 file created",
    verdict=Verdict.ASK,
    approval=Approval(True, Authorization.USER_VERIFIED, "tty /dev/pts/3"),
    outcome=Outcome(exit_code=0, applied_paths=("/home/ana/src/build", "/home/ana/src/log")),
    validation_id="v-1",
    session_id="s-1",
    time_ns=1_800_000_000_123_456_789,
)
GOLDEN_BODY = (
    '{"approval":{"approved":true,"authorization":"USER_VERIFIED","detail":"tty /dev/pts/3"},'
    '"caller":{"exe":"/usr/bin/python3.11","gid":1000,"pid":4242,"uid":1000},'
    '"command":"rm -rf build && echo \\"done\\" > log","cwd":"/home/ana/src",'
    '"effects":"1 directory deleted, 1 file created",'
    '"env_sha256":"e13519cb0e00677a1f6ee2466851fed046f8fedc6ec1daa21faf60527b1255be",'
    '"findings":[{"rule_id":"rm.recursive","verdict":"ASK"}],"kind":"APPLY",'
    '"outcome":{"applied_paths":["/home/ana/src/build","/home/ana/src/log"],"error":"",'
    '"exit_code":0},"session_id":"s-1","time_ns":1800000000123456789,"validation_id":"v-1",'
    '"verdict":"ASK"}'
)


def test_the_encoding_is_stable() -> None:
    # Pinned: external verifiers depend on these bytes. The hashes were also recomputed
    # with sha256sum and `openssl dgst -sha256 -mac HMAC` (docs/decisions.md).
    body = encode_event(GOLDEN)
    assert body.decode() == GOLDEN_BODY
    assert chain_hash(1, GENESIS_HASH, body) == (
        "360fd6cd8ca516ad211bbcd6b183a2b4c5e46c615ce26850705f4d73e30e1c68"
    )
    assert chain_hash(1, GENESIS_HASH, body, bytes(range(32))) == (
        "76045af1981c7d09a0e73105d78a4b30ce7693e512c7d8c394ab10123433f5ca"
    )
    assert decode_event(body) == GOLDEN


def test_strings_are_escaped_as_rfc8785_and_keys_sorted() -> None:
    e = event(1, command='q" b\\ t\t n\n c\x01 del\x7f é 😀', effects="\u2028")
    body = encode_event(e)
    assert b'q\\" b\\\\ t\\t n\\n c\\u0001 del\x7f \xc3\xa9 \xf0\x9f\x98\x80' in body
    assert "\u2028".encode() in body
    parsed = json.loads(body)
    assert list(parsed) == sorted(parsed)
    assert isinstance(parsed["time_ns"], int)
    assert decode_event(body) == e


text = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    command=text,
    rule=text,
    paths=st.lists(text, max_size=3),
    exit_code=st.none() | st.integers(-(2**31), 2**31),
    time_ns=st.integers(-(2**70), 2**70),
    uid=st.integers(0, 2**32),
    seq=st.integers(1, 2**62),
    key=st.none() | st.binary(min_size=0, max_size=100),
)
def test_any_event_round_trips_canonically(
    command: str,
    rule: str,
    paths: list[str],
    exit_code: int | None,
    time_ns: int,
    uid: int,
    seq: int,
    key: bytes | None,
) -> None:
    e = event(
        3,
        command=command,
        cwd=command,
        findings=(RuleDecision(rule, Verdict.DENY), RuleDecision(command, Verdict.ALLOW)),
        outcome=Outcome(exit_code=exit_code, applied_paths=tuple(paths), error=rule),
        time_ns=time_ns,
        caller=Caller(uid=uid, pid=1, gid=2, exe=command),
        approval=Approval(False, Authorization.POLICY_ALLOWED, command),
    )
    body = encode_event(e)
    assert decode_event(body) == e
    canonical = json.dumps(
        json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert body == canonical
    assert record_hasher(key)(seq, GENESIS_HASH, body) == chain_hash(seq, GENESIS_HASH, body, key)


def test_what_cannot_be_encoded_is_refused(log_path: Path) -> None:
    wrong_uid = Caller("0", 1)  # type: ignore[arg-type]
    for bad in (event(0, command="\udcff"), event(0, time_ns=1.5), event(0, caller=wrong_uid)):
        with pytest.raises(ValueError):
            encode_event(bad)
    with AuditLog(log_path) as log:
        with pytest.raises(AuditError) as err:
            log.append_many([event(1), event(0, cwd="/tmp/\udc80")])
        assert err.value.reason == "AUDIT_EVENT_INVALID"
        assert log.head() is None  # all or nothing


def test_decode_refuses_what_is_not_an_event() -> None:
    good = json.loads(GOLDEN_BODY)
    variants: list[object] = [
        "not json",
        [],
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "cwd"},
        {**good, "verdict": "MAYBE"},
        {**good, "time_ns": "1"},
        {**good, "caller": {**good["caller"], "uid": True}},
        {**good, "findings": [{"rule_id": 1, "verdict": "ASK"}]},
        {**good, "outcome": {**good["outcome"], "applied_paths": "x"}},
    ]
    for bad in variants:
        raw_body = bad if isinstance(bad, str) else json.dumps(bad)
        with pytest.raises(ValueError):
            decode_event(raw_body)


def test_env_sha256_is_env_sorted_by_bytes(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "A": "x=y", "A_B": "1", "Z": "line1\nline2", "U": "é ü"}
    dump = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "env", "-0"],
        capture_output=True,
        check=True,
    ).stdout
    shell = subprocess.run(
        ["sh", "-c", "LC_ALL=C sort -z | sha256sum"], input=dump, capture_output=True, check=True
    )
    expected = shell.stdout.split()[0].decode()
    assert env_sha256(env.items()) == expected
    assert env_sha256(reversed(list(env.items()))) == expected
    assert env_sha256([*env.items(), ("EXTRA", "")]) != expected


def test_helpers_for_the_daemon() -> None:
    assert path_text(b"/tmp/\xff/x") == "/tmp/\\xff/x"
    finding = Finding("sudo", Verdict.DENY, Severity.HIGH, "no", FindingSource.STATIC)
    assert rule_decisions([finding]) == (RuleDecision("sudo", Verdict.DENY),)
    me = caller_of(PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid()))
    assert me == Caller(os.getuid(), os.getpid(), os.getgid(), os.readlink("/proc/self/exe"))
    child = subprocess.Popen(["true"])
    child.wait()
    assert caller_of(PeerCred(pid=child.pid, uid=0, gid=0)).exe == ""
    assert parse_anchor(f"12:{'Ab' * 32}") == Anchor(12, "ab" * 32)
    for bad in ("12", "x:" + "a" * 64, "1:" + "g" * 64, "1:abc"):
        with pytest.raises(InvalidRequest):
            parse_anchor(bad)
    assert str(Anchor(3, "c" * 64)) == "3:" + "c" * 64


# --- Appending and listing --------------------------------------------------------------------


def test_append_chains_events_and_they_persist(log_path: Path) -> None:
    stored = filled(log_path, 6)
    assert [s.seq for s in stored] == [1, 2, 3, 4, 5, 6]
    assert stored[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(stored):
        assert after.prev_hash == before.hash
    for s in stored:
        assert s.hash == chain_hash(s.seq, s.prev_hash, encode_event(s.event))
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    with AuditLog(log_path) as log:
        assert log.list(page_size=100) == (stored, None)
        assert log.head() == Anchor(6, stored[-1].hash)
        assert log.append(event(6)).prev_hash == stored[-1].hash


FILTERS = [
    AuditFilter(),
    AuditFilter(verdict=Verdict.DENY),
    AuditFilter(rule_id="sudo"),
    AuditFilter(rule_id="no-such-rule"),
    AuditFilter(session_id="s-b"),
    AuditFilter(uid=1001),
    AuditFilter(since_ns=T0 + 10 * 10**9),
    AuditFilter(until_ns=T0 + 25 * 10**9),
    AuditFilter(since_ns=T0 + 10 * 10**9, until_ns=T0 + 40 * 10**9),
    AuditFilter(since_ns=T0 + 10**12),
    AuditFilter(rule_id="rm.recursive", verdict=Verdict.ASK, session_id="s-c"),
    AuditFilter(
        rule_id="net.curl-pipe", uid=1000, since_ns=T0 + 5 * 10**9, until_ns=T0 + 55 * 10**9
    ),
    AuditFilter(verdict=Verdict.ALLOW, uid=1002, session_id="s-a", since_ns=T0),
]


def matches(f: AuditFilter, s: StoredEvent) -> bool:
    e = s.event
    return (
        (f.since_ns is None or e.time_ns >= f.since_ns)
        and (f.until_ns is None or e.time_ns < f.until_ns)
        and (f.verdict is None or e.verdict == f.verdict)
        and (f.rule_id is None or any(d.rule_id == f.rule_id for d in e.findings))
        and (f.session_id is None or e.session_id == f.session_id)
        and (f.uid is None or e.caller.uid == f.uid)
    )


def test_filters_and_pagination_agree_with_a_plain_filter(log_path: Path) -> None:
    stored = filled(log_path, 60)
    with AuditLog(log_path) as log:
        for f in FILTERS:
            expected = [s for s in stored if matches(f, s)]
            for size in (1, 7, 1000):
                got, pages = all_pages(log, f, size)
                assert got == expected, f
                assert pages == max(1, -(-len(expected) // size)), (f, size)
    assert any(len([s for s in stored if matches(f, s)]) > 7 for f in FILTERS[1:])


def test_pagination_is_stable_while_events_are_appended(log_path: Path) -> None:
    before = filled(log_path, 30)
    f = AuditFilter(session_id="s-a")
    with AuditLog(log_path) as log:
        seen: list[StoredEvent] = []
        token: str | None = None
        while True:
            page, token = log.list(f, 2, token)
            seen += page
            log.append(event(100 + len(seen)))
            if token is None:
                break
        seqs = [s.seq for s in seen]
        assert seqs == sorted(set(seqs))
        assert [s for s in seen if s.seq <= 30] == [s for s in before if matches(f, s)]
        assert seen == all_pages(log, f, 1000)[0][: len(seen)]


def test_a_time_range_that_ended_is_bounded_when_listing_starts(log_path: Path) -> None:
    filled(log_path, 30)
    past = AuditFilter(since_ns=T0 + 5 * 10**9, until_ns=T0 + 25 * 10**9)
    open_ended = AuditFilter(since_ns=T0 + 5 * 10**9)
    with AuditLog(log_path) as log:
        for f, late_ones_listed in ((past, False), (open_ended, True)):
            page, token = log.list(f, 5)
            assert [s.seq for s in page] == [6, 7, 8, 9, 10]
            # Events appended now with times inside the range (the clock went back).
            late = [log.append(event(10 + i)) for i in range(3)]
            rest: list[StoredEvent] = []
            while token is not None:
                more, token = log.list(f, 5, token)
                rest += more
            listed = [s.seq for s in page + rest]
            assert listed == sorted(set(listed))
            assert all(s in listed for s in range(6, 26))
            assert all((s.seq in listed) == late_ones_listed for s in late)
        # A listing started now includes them.
        assert {s.seq for s in late} <= {s.seq for s in all_pages(log, past, 5)[0]}


def test_page_tokens_and_sizes_are_checked(log_path: Path) -> None:
    filled(log_path, 5)
    with AuditLog(log_path) as log:
        _, token = log.list(AuditFilter(verdict=Verdict.ALLOW), page_size=1)
        assert token is not None
        with pytest.raises(InvalidRequest) as err:
            log.list(AuditFilter(verdict=Verdict.DENY), 1, token)
        assert err.value.reason == "INVALID_PAGE_TOKEN"
        with pytest.raises(InvalidRequest):
            log.list(page_token="garbage")
        for size in (0, 1001):
            with pytest.raises(InvalidRequest) as err:
                log.list(page_size=size)
            assert err.value.reason == "INVALID_PAGE_SIZE"


# --- Verifying --------------------------------------------------------------------------------


def test_an_intact_log_verifies(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        empty = log.verify()
        assert empty.ok and empty.events == 0 and empty.head is None
    stored = filled(log_path, 30)
    with AuditLog(log_path) as log:
        result = log.verify()
        assert result.ok and result.events == 30
        assert result.head == log.head() == Anchor(30, stored[-1].hash)
        assert log.verify(Anchor(10, stored[9].hash)).ok
        assert log.verify(result.head).ok


@pytest.mark.parametrize("column", ["body", "hash", "prev_hash"])
def test_an_edited_field_is_found(log_path: Path, column: str) -> None:
    filled(log_path, 20)
    with raw(log_path) as c:
        before = c.execute("SELECT body FROM events WHERE seq = 8").fetchone()[0]
        assert '"verdict":"DENY"' in before
        if column == "body":
            c.execute(
                """UPDATE events SET body = replace(body, '"verdict":"DENY"', '"verdict":"ALLOW"')
                   WHERE seq = 8"""
            )
        else:
            c.execute(f"UPDATE events SET {column} = ? WHERE seq = 8", ("f" * 64,))
    with AuditLog(log_path) as log:
        result = log.verify()
    assert result.problem is not None
    assert (result.problem.kind, result.problem.seq) == (ProblemKind.EDITED, 8)
    assert result.events == 7 and result.head is not None and result.head.seq == 7


@pytest.mark.parametrize(("first", "last"), [(1, 1), (10, 10), (10, 12)])
def test_a_deleted_event_is_found(log_path: Path, first: int, last: int) -> None:
    filled(log_path, 20)
    with raw(log_path) as c:
        for table in ("events", "event_rules"):
            c.execute(f"DELETE FROM {table} WHERE seq BETWEEN ? AND ?", (first, last))
    kind, seq, detail = problem_of(log_path)
    assert (kind, seq) == (ProblemKind.DELETED, first)
    assert str(last) in detail


def test_swapped_events_are_found(log_path: Path) -> None:
    filled(log_path, 20)
    with raw(log_path) as c:
        for table in ("events", "event_rules"):
            c.execute(f"UPDATE {table} SET seq = -1 WHERE seq = 8")
            c.execute(f"UPDATE {table} SET seq = 8 WHERE seq = 9")
            c.execute(f"UPDATE {table} SET seq = 9 WHERE seq = -1")
    kind, seq, detail = problem_of(log_path)
    assert (kind, seq) == (ProblemKind.REORDERED, 8)
    assert "written as event 9" in detail


def test_renumbering_after_a_deletion_is_found(log_path: Path) -> None:
    filled(log_path, 20)
    with raw(log_path) as c:
        for table in ("events", "event_rules"):
            c.execute(f"DELETE FROM {table} WHERE seq = 8")
            c.execute(f"UPDATE {table} SET seq = -(seq - 1) WHERE seq > 8")
            c.execute(f"UPDATE {table} SET seq = -seq WHERE seq < 0")
    kind, seq, detail = problem_of(log_path)
    assert (kind, seq) == (ProblemKind.REORDERED, 8)
    assert "written as event 9" in detail


def test_tail_truncation_needs_an_anchor(log_path: Path) -> None:
    stored = filled(log_path, 20)
    anchor = Anchor(20, stored[-1].hash)
    with raw(log_path) as c:
        for table in ("events", "event_rules"):
            c.execute(f"DELETE FROM {table} WHERE seq > 17")
    # The chain alone cannot tell: a shorter log is a valid log.
    assert problem_of(log_path) == (None, None, "")
    kind, seq, _ = problem_of(log_path, anchor)
    assert (kind, seq) == (ProblemKind.TRUNCATED, 18)
    # A daemon restarted on the truncated log appends on top of it; the anchor still tells.
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(event(100 + i))
        assert log.verify().ok
    kind, seq, _ = problem_of(log_path, anchor)
    assert (kind, seq) == (ProblemKind.REWRITTEN, 20)


def test_a_wrong_anchor_counts_only_the_events_before_it_as_intact(log_path: Path) -> None:
    stored = filled(log_path, 130)
    with AuditLog(log_path) as log:
        result = log.verify(Anchor(5, "0" * 64))
        tail = log.verify(Anchor(130, "0" * 64))
        first = log.verify(Anchor(1, "0" * 64))
    assert result.problem is not None and result.problem.kind is ProblemKind.REWRITTEN
    assert result.problem.seq == 5
    # Not the 130 events the walk went through: 4 before event 5, the last of them event 4.
    assert (result.events, result.head) == (4, Anchor(4, stored[3].hash))
    assert tail.problem is not None and (tail.events, tail.head) == (
        129,
        Anchor(129, stored[128].hash),
    )
    assert first.problem is not None and (first.events, first.head) == (0, None)
    # A right anchor, and one past the end, are unchanged: every event, or all there are.
    with AuditLog(log_path) as log:
        assert log.verify(Anchor(5, stored[4].hash)) == VerifyResult(
            130, Anchor(130, stored[-1].hash)
        )
        past = log.verify(Anchor(140, "0" * 64))
    assert past.problem is not None and past.problem.kind is ProblemKind.TRUNCATED
    assert (past.problem.seq, past.events) == (131, 130)


def test_tail_truncation_that_leaves_the_rule_index_is_found(log_path: Path) -> None:
    stored = filled(log_path, 20)
    last_with_rules = max(s.seq for s in stored if s.event.findings)
    with raw(log_path) as c:
        c.execute("DELETE FROM events WHERE seq >= ?", (last_with_rules,))
    kind, seq, _ = problem_of(log_path)
    assert (kind, seq) == (ProblemKind.TRUNCATED, last_with_rules)


def test_a_running_log_refuses_to_append_after_its_tail_was_removed(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        for i in range(10):
            log.append(event(i))
        with raw(log_path) as c:
            c.execute("DELETE FROM events WHERE seq >= 9")
        with pytest.raises(AuditError) as err:
            log.append(event(10))
        assert err.value.reason == "AUDIT_LOG_TAMPERED"
        head = log.head()
        assert head is not None and head.seq == 8


def test_rewriting_the_chain_without_the_key(tmp_path: Path) -> None:
    def tamper(path: Path) -> None:
        with raw(path) as c:
            c.execute("UPDATE events SET body = replace(body, 'echo 4 ', 'echo 5 ') WHERE seq = 5")
            rechain(c, 5)

    plain = tmp_path / "plain.sqlite3"
    anchor = filled(plain, 20)[-1]
    tamper(plain)
    # Unkeyed, a rewritten chain is a valid chain: only an anchor kept elsewhere tells.
    assert problem_of(plain) == (None, None, "")
    kind, seq, _ = problem_of(plain, Anchor(anchor.seq, anchor.hash))
    assert (kind, seq) == (ProblemKind.REWRITTEN, 20)

    keyed = tmp_path / "keyed.sqlite3"
    key = load_key(str(tmp_path / KEY_FILE), create=True)
    filled(keyed, 20, key)
    tamper(keyed)
    kind, seq, _ = problem_of(keyed, key=key)
    assert (kind, seq) == (ProblemKind.EDITED, 5)


@pytest.mark.parametrize("how", ["missing", "extra"])
def test_an_edited_rule_index_is_found(log_path: Path, how: str) -> None:
    stored = filled(log_path, 30)
    with_sudo = next(s.seq for s in stored if any(d.rule_id == "sudo" for d in s.event.findings))
    without = next(s.seq for s in stored if not s.event.findings and s.seq > with_sudo)
    with raw(log_path) as c:
        if how == "missing":  # hides the event from list(rule_id="sudo")
            c.execute("DELETE FROM event_rules WHERE seq = ? AND rule_id = 'sudo'", (with_sudo,))
        else:
            c.execute("INSERT INTO event_rules VALUES (?, 'sudo')", (without,))
    with AuditLog(log_path) as log:
        if how == "missing":
            listed = all_pages(log, AuditFilter(rule_id="sudo"), 100)[0]
            assert with_sudo not in [s.seq for s in listed]
        else:
            with pytest.raises(AuditError) as err:
                all_pages(log, AuditFilter(rule_id="sudo"), 100)
            assert err.value.reason == "AUDIT_LOG_CORRUPT"
        result = log.verify()
    assert result.problem is not None
    assert result.problem.kind == ProblemKind.EDITED
    assert result.problem.seq == (with_sudo if how == "missing" else without)
    assert "rule index" in result.problem.detail


# --- Keys -------------------------------------------------------------------------------------


def test_the_key_file_is_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    with pytest.raises(AuditError) as err:
        load_key(str(path))
    assert err.value.reason == "AUDIT_KEY_INVALID"
    key = load_key(str(path), create=True)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(str(path), create=True) == key == load_key(str(path))
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary file left
    path.chmod(0o640)
    with pytest.raises(AuditError, match="0600"):
        load_key(str(path))
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(AuditError):
        load_key(str(link))
    path.write_text("not hex\n")
    with pytest.raises(AuditError, match="hex"):
        load_key(str(path))
    path.write_text("ab" * 16 + "\n")
    with pytest.raises(AuditError, match="16 bytes"):
        load_key(str(path))


def test_a_log_is_bound_to_its_key(tmp_path: Path) -> None:
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    path = tmp_path / "keyed.sqlite3"
    with AuditLog(path, key=k1) as log:
        stored = log.append(GOLDEN)
    assert stored.hash == "76045af1981c7d09a0e73105d78a4b30ce7693e512c7d8c394ab10123433f5ca"
    for wrong in (None, k2):
        with pytest.raises(AuditError) as err:
            AuditLog(path, key=wrong)
        assert err.value.reason == "AUDIT_KEY_MISMATCH"
    plain = tmp_path / "plain.sqlite3"
    AuditLog(plain).close()
    with pytest.raises(AuditError) as err:
        AuditLog(plain, key=k1)
    assert err.value.reason == "AUDIT_KEY_MISMATCH"


def test_the_log_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with AuditLog.in_state_dir(str(state)) as log:
        log.append(event(1))
    for name in (LOG_FILE, KEY_FILE):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    with AuditLog.in_state_dir(str(state)) as log:
        assert log.append(event(2)).seq == 2
        assert log.verify().ok


# --- Concurrency ------------------------------------------------------------------------------


def test_concurrent_appends_from_8_threads_keep_the_chain(log_path: Path) -> None:
    threads, per_thread = 8, 40
    results: dict[int, list[StoredEvent]] = {}
    with AuditLog(log_path) as log:
        start = threading.Barrier(threads)

        def worker(k: int) -> None:
            start.wait()
            results[k] = [log.append(event(k * 1000 + i)) for i in range(per_thread)]

        workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        returned = sorted((s for r in results.values() for s in r), key=lambda s: s.seq)
        assert [s.seq for s in returned] == list(range(1, threads * per_thread + 1))
        for k, mine in results.items():  # each thread's events, in its own order
            assert [s.event for s in mine] == [event(k * 1000 + i) for i in range(per_thread)]
        assert all_pages(log, AuditFilter(), 1000)[0] == returned
        result = log.verify()
        assert result.ok and result.events == threads * per_thread


def test_an_append_alone_is_committed_by_its_own_thread(log_path: Path) -> None:
    """No hand-off to the writer thread and back when no commit is under way."""
    committed_in: list[str] = []
    with AuditLog(log_path) as log:
        log.on_commit(lambda head: committed_in.append(threading.current_thread().name))
        for i in range(3):
            assert log.append(event(i)).seq == i + 1
    assert committed_in == [threading.current_thread().name] * 3


_Note = Callable[[sqlite3.Connection, list[audit_log._Pending]], None]


def hold_first_commit(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch, note: _Note
) -> tuple[threading.Event, threading.Event]:
    """Make ``log``'s first commit wait inside its transaction until ``release`` is set
    (``inside`` is set once it waits); ``note(conn, batch)`` sees every commit's batch."""
    release, inside = threading.Event(), threading.Event()
    insert = log._insert

    def slow_insert(conn: sqlite3.Connection, batch: list[audit_log._Pending]) -> None:
        if not inside.is_set():
            inside.set()
            assert release.wait(10)
        note(conn, batch)
        insert(conn, batch)

    monkeypatch.setattr(log, "_insert", slow_insert)
    return release, inside


def wait_queued(log: AuditLog, events: int) -> None:
    deadline = time.monotonic() + 10
    while log._queued < events:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_appends_during_a_commit_are_committed_together_after_it(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: what queues while a commit is under way goes in the next transaction,
    all of it at once, in the writer thread."""
    commits: list[tuple[str, int]] = []
    with AuditLog(log_path) as log:
        release, inside = hold_first_commit(
            log,
            monkeypatch,
            lambda conn, batch: commits.append((threading.current_thread().name, len(batch))),
        )
        first = threading.Thread(target=log.append, args=(event(0),), name="first")
        first.start()
        assert inside.wait(10)
        others = [threading.Thread(target=log.append, args=(event(i),)) for i in range(1, 6)]
        for t in others:
            t.start()
        wait_queued(log, 5)  # all five wait for the commit under way
        release.set()
        for t in [first, *others]:
            t.join()
        assert commits == [("first", 1), ("audit-writer", 5)]
        result = log.verify()
        assert result.ok and result.events == 6


def test_a_durable_append_queued_during_a_relaxed_commit_waits_for_an_fsynced_one(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit without the fsync (only ``durable=False`` appends were queued when it began)
    takes no append that needs one: a durable append that queues meanwhile goes in the next
    commit, which fsyncs. The synchronous setting in force is read inside each commit."""
    commits: list[tuple[int, int]] = []  # (events, PRAGMA synchronous: 1 NORMAL, 2 FULL)

    def note(conn: sqlite3.Connection, batch: list[audit_log._Pending]) -> None:
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
        commits.append((sum(len(p.events) for p in batch), level))

    with AuditLog(log_path) as log:
        release, inside = hold_first_commit(log, monkeypatch, note)
        first = threading.Thread(target=log.append, args=(event(0),), kwargs={"durable": False})
        first.start()
        assert inside.wait(10)
        durable = threading.Thread(target=log.append, args=(event(1),))
        relaxed = threading.Thread(target=log.append, args=(event(2),), kwargs={"durable": False})
        durable.start()
        relaxed.start()
        wait_queued(log, 2)
        release.set()
        for t in (first, durable, relaxed):
            t.join()
        # The second commit holds the durable append, so it fsyncs (and takes the relaxed
        # one along); the setting is back to FULL after the relaxed commit.
        assert commits == [(1, 1), (2, 2)]
        assert log._writer.execute("PRAGMA synchronous").fetchone()[0] == 2
        result = log.verify()
        assert result.ok and result.events == 3


_FSYNC_PHASES = """
import os, sys
sys.path.insert(0, sys.argv[2])
from airlock.audit import AuditEvent, AuditLog, Caller, RpcKind

def event(i):
    return AuditEvent(kind=RpcKind.EXECUTE, caller=Caller(0, 1), command=f"c{i}", time_ns=i)

log = AuditLog(sys.argv[1])
log.append(event(0))  # the file's creation and first commit: not counted
os.getppid()  # phase 0: a durable append
log.append(event(1))
os.getppid()  # phase 1: durable=False
log.append(event(2), durable=False)
os.getppid()  # phase 2: durable=False again
log.append(event(3), durable=False)
os.getppid()  # phase 3: durable again
log.append(event(4))
os.getppid()
log.close()
"""


def test_only_a_relaxed_append_is_committed_without_an_fsync(tmp_path: Path) -> None:
    """``append(durable=False)`` commits without the fsync; a durable append before and after
    it still fsyncs. The real system calls, counted by strace between markers."""
    phases = fsyncs_per_phase(_FSYNC_PHASES, tmp_path / "trace", str(tmp_path / "audit.sqlite3"))
    assert len(phases) == 5, phases
    assert phases[0] >= 1 and phases[3] >= 1, phases
    assert phases[1] == 0 and phases[2] == 0, phases
    with AuditLog(tmp_path / "audit.sqlite3") as log:
        result = log.verify()
        assert result.ok and result.events == 5


def test_two_logs_on_one_file_keep_one_chain(log_path: Path) -> None:
    with AuditLog(log_path) as a, AuditLog(log_path) as b:
        for i in range(10):
            a.append(event(2 * i))
            b.append(event(2 * i + 1))
        result = a.verify()
        assert result.ok and result.events == 20
        assert b.head() == result.head


# --- Durability -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from airlock.audit import AuditEvent, AuditLog, Caller, RpcKind

    path, fsync, mode = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    log = AuditLog(path, fsync=fsync)
    i = 0
    while True:
        event = AuditEvent(kind=RpcKind.EXECUTE, caller=Caller(0, 1), command=f"c{i}", time_ns=i)
        stored = log.append(event)
        sys.stdout.write(f"{stored.seq} {stored.hash}\\n")
        sys.stdout.flush()
        i += 1
        if mode == "once":
            sys.stdin.readline()  # blocks: the parent kills us here
    """
)


def start_child(path: Path, fsync: bool, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), "1" if fsync else "0", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def reported(line: str) -> tuple[int, str]:
    seq, digest = line.split()
    return int(seq), digest


# fsync=True fsyncs the WAL at each commit; fsync=False only write()s it. Both must survive
# SIGKILL: the data is in the kernel's page cache once write() returned. (What fsync adds,
# surviving a crash of the machine, cannot be tested here.)
@pytest.mark.parametrize("fsync", [True, False])
def test_an_appended_event_survives_sigkill_right_after_append(log_path: Path, fsync: bool) -> None:
    acknowledged: list[tuple[int, str]] = []
    for _ in range(5):
        child = start_child(log_path, fsync, "once")
        try:
            assert child.stdout is not None
            acknowledged.append(reported(child.stdout.readline()))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
    with AuditLog(log_path) as log:
        stored = all_pages(log, AuditFilter(), 100)[0]
        assert [(s.seq, s.hash) for s in stored] == acknowledged
        assert log.verify().ok


@pytest.mark.parametrize("fsync", [True, False])
def test_sigkill_in_the_middle_of_appends_loses_nothing_acknowledged(
    log_path: Path, fsync: bool
) -> None:
    child = start_child(log_path, fsync, "loop")
    acknowledged: list[tuple[int, str]] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 60:
            acknowledged.append(reported(child.stdout.readline()))
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    with AuditLog(log_path) as log:
        result = log.verify()
        assert result.ok
        assert result.events >= len(acknowledged)
        stored = {s.seq: s.hash for s in all_pages(log, AuditFilter(), 1000)[0]}
        assert all(stored[seq] == digest for seq, digest in acknowledged)


# --- Corruption -------------------------------------------------------------------------------


def test_a_file_that_is_not_a_database(log_path: Path) -> None:
    log_path.write_bytes(random.Random(1).randbytes(16384))
    with pytest.raises(AuditError) as err:
        AuditLog(log_path)
    assert isinstance(err.value, AirlockError)
    assert err.value.reason == "AUDIT_LOG_CORRUPT"
    assert str(log_path) in err.value.message


def test_a_database_with_corrupt_pages(log_path: Path) -> None:
    filled(log_path, 300)
    assert not os.path.exists(f"{log_path}-wal")  # checkpointed into the file at close
    size = log_path.stat().st_size
    assert size > 20 * 4096
    with open(log_path, "r+b") as f:  # keep page 1 (the schema), scribble over the rest
        f.seek(4096)
        f.write(random.Random(2).randbytes(size - 4096))
    with pytest.raises(AuditError) as err, AuditLog(log_path) as log:
        log.list()
        log.verify()
    assert err.value.reason == "AUDIT_LOG_CORRUPT"
    assert "corrupt" in err.value.message


def test_another_sqlite_database(log_path: Path) -> None:
    conn = sqlite3.connect(log_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="not an Airlock audit log"):
        AuditLog(log_path)


def test_a_malformed_event_body(log_path: Path) -> None:
    filled(log_path, 10)
    with raw(log_path) as c:
        # (SQLite itself refuses a body that is not JSON: the generated columns parse it.)
        with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
            c.execute("UPDATE events SET body = 'not json' WHERE seq = 4")
        c.execute("""UPDATE events SET body = '{"time_ns":1}' WHERE seq = 4""")
    with AuditLog(log_path) as log:
        with pytest.raises(AuditError) as err:
            log.list()
        assert err.value.reason == "AUDIT_LOG_CORRUPT" and "event 4" in err.value.message
        result = log.verify()
    assert result.problem is not None
    assert (result.problem.kind, result.problem.seq) == (ProblemKind.EDITED, 4)


def test_a_closed_log(log_path: Path) -> None:
    log = AuditLog(log_path)
    log.close()
    log.close()
    for call in (lambda: log.append(event(0)), log.list, log.verify, log.head):
        with pytest.raises(AuditError) as err:
            call()
        assert err.value.reason == "AUDIT_LOG_CLOSED"


# --- Export -----------------------------------------------------------------------------------


def external_verify(lines: list[bytes], key: bytes | None) -> int:
    """An independent verifier written from docs/decisions.md (json, hashlib, hmac only)."""

    def canonical(obj: object) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    prev = "0" * 64
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        assert line == canonical(record) + b"\n"
        assert record["seq"] == n and record["prev_hash"] == prev
        message = b"airlock-audit-v1\n%d\n%s\n%s" % (n, prev.encode(), canonical(record["event"]))
        if key is None:
            digest = hashlib.sha256(message).hexdigest()
        else:
            digest = hmac.new(key, message, hashlib.sha256).hexdigest()
        assert digest == record["hash"], f"event {n}"
        prev = digest
    return len(lines)


@pytest.mark.parametrize("keyed", [False, True])
def test_an_export_verifies_externally(log_path: Path, keyed: bool) -> None:
    key = bytes(range(32)) if keyed else None
    with AuditLog(log_path, key=key) as log:
        for i in range(25):
            log.append(event(i, command=f"printf 'é\\t{i}' | tee \"x y\""))
        out = io.BytesIO()
        assert log.export_jsonl(out) == 25
    lines = out.getvalue().splitlines(keepends=True)
    assert external_verify(lines, key) == 25
    tampered = lines[:]
    tampered[9] = tampered[9].replace(b"tee", b"tea")
    with pytest.raises(AssertionError, match="event 10"):
        external_verify(tampered, key)
