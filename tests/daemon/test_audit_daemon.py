"""The audit log in the daemon: every Validate decision is on disk before it is answered.

A real daemon, real SQLite. ListAuditEvents and VerifyAuditLog are root-only; tampering is
done with ``sqlite3`` directly on the file, as someone with write access would; durability is
tested by SIGKILLing the daemon right after an answer; the CLI's audit list/verify/export.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock import InvalidRequest, PermissionDenied, Unavailable
from airlock.audit import (
    KEY_FILE,
    LOG_FILE,
    Anchor,
    AuditFilter,
    AuditLog,
    Outcome,
    ProblemKind,
    RpcKind,
    StoredEvent,
    chain_hash,
    env_sha256,
    load_key,
)
from airlock.client import Client
from airlock.types import Verdict
from tests.helpers import (
    AIRLOCK,
    AIRLOCKD,
    TEST_LIMITS,
    Daemon,
    public_dir,
    run_client_as,
    running_daemon,
    start_daemon,
)

# A policy of the tests' own, so that the verdicts and rule ids do not move with the shipped one.
POLICY = """\
version: 1
rules:
  - id: test.audit-ask
    title: Asks about airlock-audit-ask
    description: A command name only the audit tests use.
    decision: ask
    severity: medium
    match:
      argv0: [airlock-audit-ask]
    tests:
      match: ["airlock-audit-ask"]
      not_match: ["echo hi"]
  - id: test.audit-deny
    title: Denies airlock-audit-deny
    description: A command name only the audit tests use.
    decision: deny
    severity: high
    match:
      argv0: [airlock-audit-deny]
    tests:
      match: ["airlock-audit-deny"]
      not_match: ["echo hi"]
"""
ASK = "airlock-audit-ask --now > asked.txt"  # asks; the dry run still happens
DENY = "airlock-audit-deny --all | cat"  # denied statically, never run


def daemon_args(base: Path) -> tuple[str, ...]:
    """The tests' limits and their policy (written under ``base``)."""
    policy = base / "policy"
    policy.mkdir(parents=True, exist_ok=True)
    (policy / "audit.yaml").write_text(POLICY)
    return (*TEST_LIMITS, "--policy-dir", str(policy))


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """The module's daemon (this overrides conftest's, for the policy above)."""
    with public_dir() as base, running_daemon(base, *daemon_args(base)) as d:
        yield d


def all_events(client: Client, audit_filter: AuditFilter | None = None) -> list[StoredEvent]:
    return list(client.audit_events(audit_filter))


def by_id(client: Client) -> dict[str, StoredEvent]:
    return {s.event.validation_id: s for s in all_events(client)}


def audit_files(state_dir: str) -> list[Path]:
    return sorted(Path(state_dir).glob(LOG_FILE + "*"))


def open_log(state_dir: str) -> AuditLog:
    """The daemon's log, opened beside it (or after it) with its key."""
    return AuditLog(
        os.path.join(state_dir, LOG_FILE), key=load_key(os.path.join(state_dir, KEY_FILE))
    )


def run_cli(daemon: Daemon, *args: str, cwd: str = "/tmp") -> subprocess.CompletedProcess[str]:
    return daemon.cli(*args, cwd=cwd, columns=200)


# --- What a Validate records --------------------------------------------------------------


def test_each_decision_is_recorded_with_its_fields_and_no_env_values(
    daemon: Daemon, client: Client, workspace: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    env = {"AIRLOCK_AUDIT_SECRET": secret, "LANG": "C.UTF-8"}
    allowed = client.validate("echo hi > notes.txt", cwd=str(workspace), env=env)
    asked = client.validate(ASK, cwd=str(workspace), env=env)
    denied = client.validate(DENY, cwd=str(workspace), env=env)
    assert (allowed.verdict, asked.verdict, denied.verdict) == (
        Verdict.ALLOW,
        Verdict.ASK,
        Verdict.DENY,
    )
    events = by_id(client)
    me = os.readlink("/proc/self/exe")
    for v, command in ((allowed, "echo hi > notes.txt"), (asked, ASK), (denied, DENY)):
        stored = events[v.validation_id]
        e = stored.event
        assert e.kind is RpcKind.VALIDATE and e.verdict is v.verdict
        assert (e.caller.uid, e.caller.gid, e.caller.pid) == (0, os.getgid(), os.getpid())
        assert e.caller.exe == me
        assert (e.command, e.cwd) == (command, str(workspace))
        assert e.env_sha256 == env_sha256(env.items())
        assert [(f.rule_id, f.verdict) for f in e.findings] == [
            (f.rule_id, f.verdict) for f in v.findings
        ]
        assert e.effects.startswith(v.summary + "\n")
        assert e.effects.endswith(f"policy {v.policy_version}")
        assert e.outcome == Outcome()  # nothing ran on the host
        assert e.approval is None
    assert asked.findings and denied.findings  # the rule ids were there to record
    assert "no dry run (static deny)" in events[denied.validation_id].event.effects
    assert "1 change (0 outside the workspace)" in events[allowed.validation_id].event.effects
    # The order of the calls is the order of the chain.
    seqs = [events[v.validation_id].seq for v in (allowed, asked, denied)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # The daemon's log names the event of each answer.
    logged = {
        entry["validation_id"]: entry["audit_seq"]
        for entry in map(json.loads, daemon.log().splitlines())
        if entry.get("msg") == "validated"
    }
    assert [logged[v.validation_id] for v in (allowed, asked, denied)] == seqs
    # The environment's values are nowhere in the database, its WAL or its index.
    files = audit_files(daemon.state_dir)
    assert files and all(secret.encode() not in f.read_bytes() for f in files)
    assert any(allowed.validation_id.encode() in f.read_bytes() for f in files)


def test_a_refused_request_is_not_a_decision(client: Client) -> None:
    before = all_events(client)
    with pytest.raises(InvalidRequest):
        client.validate("true", cwd="/no/such/dir")
    assert all_events(client) == before


# --- ListAuditEvents ----------------------------------------------------------------------


def test_list_filters_and_pages(client: Client, workspace: Path) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    t0 = time.time_ns()
    first = [client.validate(f"echo {i} > f{i}", cwd=str(workspace)) for i in range(3)]
    t_mid = time.time_ns()
    denied = client.validate(DENY, cwd=str(workspace), session_id=session)
    asked = client.validate(ASK, cwd=str(workspace), session_id=session)
    mine = [v.validation_id for v in (*first, denied, asked)]

    def ids(**kw: object) -> list[str]:
        return [s.event.validation_id for s in all_events(client, AuditFilter(**kw))]  # type: ignore[arg-type]

    assert ids(since_ns=t0) == mine
    assert ids(since_ns=t0, until_ns=t_mid) == mine[:3]
    assert ids(since_ns=t_mid) == mine[3:]
    assert ids(since_ns=t0, verdict=Verdict.DENY) == [denied.validation_id]
    assert ids(since_ns=t0, verdict=Verdict.ASK) == [asked.validation_id]
    rule = denied.findings[0].rule_id
    assert ids(since_ns=t0, rule_id=rule) == [denied.validation_id]
    assert ids(session_id=session) == [denied.validation_id, asked.validation_id]
    assert ids(session_id=session, verdict=Verdict.ASK) == [asked.validation_id]
    assert ids(since_ns=t0, uid=0) == mine
    assert ids(since_ns=t0, uid=65534) == []

    # Pages of 2: every event once, in seq order, and the last page says so.
    pages: list[list[StoredEvent]] = []
    token: str | None = None
    while True:
        page, token = client.list_audit_events(
            AuditFilter(since_ns=t0), page_size=2, page_token=token
        )
        pages.append(page)
        if token is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    flat = [s for p in pages for s in p]
    assert [s.event.validation_id for s in flat] == mine
    assert [s.seq for s in flat] == sorted(s.seq for s in flat)
    # Each event links to the one before it.
    for before, after in itertools.pairwise(flat):
        if after.seq == before.seq + 1:
            assert after.prev_hash == before.hash

    # A token belongs to its filter; sizes are checked (AIP-158: above the maximum is the max).
    _, token = client.list_audit_events(AuditFilter(since_ns=t0), page_size=1)
    with pytest.raises(InvalidRequest) as info:
        client.list_audit_events(AuditFilter(since_ns=t_mid), page_token=token)
    assert info.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidRequest) as info:
        client.list_audit_events(page_size=-1)
    assert info.value.reason == "INVALID_PAGE_SIZE"
    page, _ = client.list_audit_events(AuditFilter(since_ns=t0), page_size=50_000)
    assert [s.event.validation_id for s in page] == mine


# --- VerifyAuditLog -----------------------------------------------------------------------


def test_verify_an_intact_log_and_anchors(client: Client) -> None:
    client.validate("echo anchor", cwd="/tmp")
    events = all_events(client)
    result = client.verify_audit_log()
    assert result.ok and result.problem is None
    assert result.events == len(events) == events[-1].seq
    assert result.head == Anchor(events[-1].seq, events[-1].hash)
    assert client.verify_audit_log(str(result.head)).ok
    # An anchor past the end: events were cut from the end of the log.
    ahead = Anchor(result.head.seq + 5, "a" * 64)
    cut = client.verify_audit_log(ahead)
    assert cut.problem is not None and not cut.ok
    assert (cut.problem.kind, cut.problem.seq) == (ProblemKind.TRUNCATED, result.head.seq + 1)
    with pytest.raises(InvalidRequest) as info:
        client.verify_audit_log("not-an-anchor")
    assert info.value.reason == "INVALID_ANCHOR"


@contextlib.contextmanager
def daemon_in(base: Path) -> Iterator[Daemon]:
    d = start_daemon(base, *daemon_args(base))
    try:
        yield d
    finally:
        code = d.stop()
        assert code == 0, d.log()


def swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    for table in ("events", "event_rules"):
        conn.execute(f"UPDATE {table} SET seq = -1 WHERE seq = ?", (a,))
        conn.execute(f"UPDATE {table} SET seq = ? WHERE seq = ?", (a, b))
        conn.execute(f"UPDATE {table} SET seq = ? WHERE seq = -1", (b,))


TAMPERING = {
    "edit": (
        lambda c: c.execute(
            "UPDATE events SET body = replace(body, 'echo 3 ', 'echo 0 ') WHERE seq = 3"
        ),
        ProblemKind.EDITED,
    ),
    "delete": (
        lambda c: [c.execute(f"DELETE FROM {t} WHERE seq = 3") for t in ("events", "event_rules")],
        ProblemKind.DELETED,
    ),
    "swap": (lambda c: swap(c, 3, 4), ProblemKind.REORDERED),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_with_the_database_is_found(how: str) -> None:
    tamper, kind = TAMPERING[how]
    with public_dir() as base:
        with daemon_in(base) as d, d.client() as c:
            made = [c.validate(f"echo {i} > out{i}", cwd="/tmp") for i in range(1, 6)]
            events = all_events(c)
            assert [s.event.validation_id for s in events] == [v.validation_id for v in made]
            assert c.verify_audit_log().ok
        db = os.path.join(d.state_dir, LOG_FILE)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            tamper(conn)
        with daemon_in(base) as again, again.client() as c:
            result = c.verify_audit_log()
            assert not result.ok and result.problem is not None
            assert (result.problem.kind, result.problem.seq) == (kind, 3), result.problem
            assert result.events == 2 and result.head == Anchor(2, events[1].hash)
            cli = run_cli(again, "audit", "verify")
            assert cli.returncode == 1, cli.stderr
            assert f"{kind.name} at event 3" in cli.stdout
            # The daemon still records (and answers) what comes next.
            assert c.validate("echo after", cwd="/tmp").verdict is Verdict.ALLOW
            assert all_events(c)[-1].event.command == "echo after"


# --- Durability and failing closed --------------------------------------------------------


def test_sigkill_right_after_an_answer_loses_no_event(public_tmp: Path) -> None:
    d = start_daemon(public_tmp, *daemon_args(public_tmp))
    try:
        with d.client() as c:
            made = [c.validate(f"echo {i}", cwd="/tmp").validation_id for i in range(3)]
            made.append(c.validate("echo last > f", cwd="/tmp").validation_id)
            d.proc.kill()  # the moment the last answer arrived
        d.proc.wait(timeout=30)
        # The file as the next reader finds it (the WAL is replayed), through sqlite3.
        db = os.path.join(d.state_dir, LOG_FILE)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM events")]
        assert [b["validation_id"] for b in bodies] == made
        with open_log(d.state_dir) as log:
            result = log.verify()
        assert result.ok and result.events == 4
    finally:
        d.stop(signal.SIGKILL)
    with daemon_in(public_tmp) as again, again.client() as c:
        v = c.validate("echo again", cwd="/tmp")
        assert by_id(c)[v.validation_id].seq == 5
        assert c.verify_audit_log().ok


def test_a_decision_that_cannot_be_recorded_is_not_answered(public_tmp: Path) -> None:
    with daemon_in(public_tmp) as d, d.client() as c:
        c.validate("echo one", cwd="/tmp")
        c.validate("echo two", cwd="/tmp")
        # Someone removes the last event behind the daemon's back: it no longer appends.
        db = os.path.join(d.state_dir, LOG_FILE)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("DELETE FROM events WHERE seq = 2")
        with pytest.raises(Unavailable) as info:
            c.validate("echo three", cwd="/tmp")
        assert info.value.reason == "AUDIT_UNAVAILABLE"
        assert "audit log" in info.value.message
        assert [s.event.command for s in all_events(c)] == ["echo one"]
        assert c.health()
    failures = [
        e for e in map(json.loads, d.log().splitlines()) if e["msg"] == "audit log append failed"
    ]
    assert failures and failures[0]["reason"] == "AUDIT_LOG_TAMPERED"


@pytest.mark.parametrize("damage", ["not-a-database", "key-readable-by-others"])
def test_the_daemon_does_not_start_without_its_audit_log(public_tmp: Path, damage: str) -> None:
    state = public_tmp / "state"
    if damage == "not-a-database":
        state.mkdir(mode=0o700)
        (state / LOG_FILE).write_bytes(b"this is not an sqlite database\n" * 200)
        reason = "AUDIT_LOG_CORRUPT"
    else:
        with daemon_in(public_tmp):
            pass
        os.chmod(state / KEY_FILE, 0o644)
        reason = "AUDIT_KEY_INVALID"
    proc = subprocess.run(
        [AIRLOCKD, "--socket", str(public_tmp / "s.sock"), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    entries = [json.loads(line) for line in proc.stderr.splitlines()]
    refusal = [e for e in entries if e["msg"] == "the audit log cannot be opened; not starting"]
    assert refusal and refusal[0]["reason"] == reason, proc.stderr
    assert not any(e["msg"] == "serving" for e in entries)


# --- Who may read the log -----------------------------------------------------------------


def test_only_root_may_list_or_verify(daemon: Daemon, client: Client) -> None:
    proc = run_client_as(
        "out = {'pid': os.getpid()}\n"
        f"with Client({daemon.socket!r}) as c:\n"
        "    out['validation_id'] = c.validate('echo nobody', cwd='/tmp').validation_id\n"
        "    for name, call in (('list', c.list_audit_events), ('verify', c.verify_audit_log)):\n"
        "        try:\n"
        "            call()\n"
        "        except AirlockError as e:\n"
        "            out[name] = [type(e).__name__, e.reason]\n"
        "print(json.dumps(out))\n"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    refused = [PermissionDenied.__name__, "AUDIT_NOT_ALLOWED"]
    assert out["list"] == refused and out["verify"] == refused
    # Its own Validate was recorded, under its own identity.
    stored = all_events(client, AuditFilter(uid=65534))[-1]
    assert stored.event.validation_id == out["validation_id"]
    assert (stored.event.caller.uid, stored.event.caller.gid) == (65534, 65534)
    assert stored.event.caller.pid == out["pid"]


# --- The CLI ------------------------------------------------------------------------------


def test_cli_audit_list(daemon: Daemon, client: Client, workspace: Path) -> None:
    since = time.time_ns()
    v = client.validate(DENY, cwd=str(workspace))
    client.validate("echo cli > cli.txt", cwd=str(workspace))
    as_json = run_cli(daemon, "audit", "list", "--json", "--since", "1h")
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    mine = next(r for r in rows if r["validationId"] == v.validation_id)
    assert mine["verdict"] == "VERDICT_DENY" and mine["kind"] == "AUDIT_EVENT_KIND_VALIDATE"
    assert mine["command"] == DENY and mine["caller"]["uid"] == 0
    assert len(mine["hash"]) == 64 and len(mine["prevHash"]) == 64

    table = run_cli(daemon, "audit", "list", "--verdict", "deny", "--rule", v.findings[0].rule_id)
    assert table.returncode == 0, table.stderr
    assert "validate" in table.stdout and "DENY" in table.stdout
    assert DENY in table.stdout
    assert v.findings[0].rule_id in table.stdout and "echo cli" not in table.stdout

    limited = run_cli(daemon, "audit", "list", "--limit", "1", "--json")
    assert limited.returncode == 0 and len(limited.stdout.splitlines()) == 1
    assert "there are more" in limited.stderr
    recent = AuditFilter(since_ns=since)
    assert len(all_events(client, recent)) == 2
    none = run_cli(daemon, "audit", "list", "--uid", "4242")
    assert none.returncode == 0 and "No events." in none.stdout
    bad = run_cli(daemon, "audit", "list", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "not a time" in bad.stderr


def test_cli_audit_verify(daemon: Daemon, client: Client) -> None:
    client.validate("echo verify", cwd="/tmp")
    ok = run_cli(daemon, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: ")
    head = client.verify_audit_log().head
    assert head is not None and f"head {head}" in ok.stdout.replace("\n", " ")
    anchored = run_cli(daemon, "audit", "verify", "--anchor", str(head), "--json")
    assert anchored.returncode == 0 and json.loads(anchored.stdout)["ok"] is True
    cut = run_cli(daemon, "audit", "verify", "--anchor", f"{head.seq + 1}:{'b' * 64}")
    assert cut.returncode == 1 and "TRUNCATED" in cut.stdout
    assert run_cli(daemon, "audit", "verify", "--anchor", "12").returncode == 2


def test_cli_audit_export_verifies_externally(
    daemon: Daemon, client: Client, tmp_path: Path
) -> None:
    client.validate(ASK, cwd="/tmp")
    out = tmp_path / "audit.jsonl"
    written = run_cli(daemon, "audit", "export", "--jsonl", str(out))
    assert written.returncode == 0, written.stderr
    data = out.read_bytes()
    # Root only, like the log: not readable by anyone else, even with a permissive umask.
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # Byte for byte what the log itself exports (the daemon is idle meanwhile).
    with open_log(daemon.state_dir) as log:
        direct = io.BytesIO()
        log.export_jsonl(direct)
    assert data == direct.getvalue()
    # And what an external verifier recomputes: canonical JSON, HMAC with the key, links.
    key = load_key(os.path.join(daemon.state_dir, KEY_FILE))
    prev = "0" * 64
    lines = data.decode().splitlines()
    for n, line in enumerate(lines, start=1):
        record = json.loads(line)
        body = json.dumps(
            record["event"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        assert record["seq"] == n and record["prev_hash"] == prev
        assert chain_hash(n, prev, body, key) == record["hash"]
        prev = record["hash"]
    assert f"exported {len(lines)} events" in written.stderr
    to_stdout = subprocess.run(
        [AIRLOCK, "audit", "export", "--jsonl"],
        capture_output=True,
        timeout=60,
        env={**os.environ, "AIRLOCK_SOCKET": daemon.socket},
    )
    assert to_stdout.returncode == 0 and to_stdout.stdout == data
    assert run_cli(daemon, "audit", "export").returncode == 2  # --jsonl is required
