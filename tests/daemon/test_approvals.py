"""Approvals the agent cannot give itself, and the agent's context in the audit trail.

A real daemon (shipped policy) whose approvers are one extra uid and one group; the askers
and approvers are real non-root users (``run_client_as``): the kernel's credentials of
their connections decide who may approve.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock import types
from airlock._errors import InvalidRequest, ResourceExhausted
from airlock.audit import AuditFilter, RpcKind, StoredEvent
from airlock.client import Client
from tests.helpers import (
    AIRLOCK,
    TEST_LIMITS,
    Daemon,
    public_dir,
    run_client_as,
    running_daemon,
    start_daemon,
)

ASKER = 64101  # the agent's user
OTHER = 64102  # another user, not an approver
APPROVER = 64103  # named in --approvers
MEMBER = 64104  # in the approver group
APPROVER_GROUP = 64200
ASK = "chmod -R 777 build"  # the shipped policy asks about it

DAEMON_ARGS = ("--approvers", str(APPROVER), "--approver-groups", str(APPROVER_GROUP))


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    with public_dir() as path:
        yield path


@pytest.fixture(scope="module")
def daemon(base: Path) -> Iterator[Daemon]:
    with running_daemon(base / "d", *TEST_LIMITS, *DAEMON_ARGS) as d:
        yield d


def workspace_of(base: Path, uid: int) -> str:
    """A directory ``uid`` owns with a build/ in it (what the ASK command changes)."""
    ws = base / f"ws-{uid}-{time.monotonic_ns()}"
    (ws / "build").mkdir(parents=True)
    (ws / "build" / "a.o").write_text("x")
    for path in (ws, ws / "build", ws / "build" / "a.o"):
        os.chown(path, uid, uid)
    return str(ws)


def as_user(uid: int, body: str, groups: tuple[int, ...] = ()) -> Any:
    """Run ``body`` (which sets ``result``) as ``uid`` against the daemon; the JSON it printed.

    ``SOCKET`` is the daemon's socket; an AirlockError is printed as {"reason": ...}.
    """
    done = run_client_as(
        "try:\n"
        + "".join(f"    {line}\n" for line in body.strip().splitlines())
        + "except AirlockError as e:\n"
        + "    result = {'reason': e.reason}\n"
        + "print(json.dumps(result))\n",
        uid=uid,
        groups=groups,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def ask_as(daemon: Daemon, base: Path, uid: int, agent: str = "", ws: str = "") -> str:
    """A validation by ``uid`` (in ``ws``, else a new workspace) that the policy asks about;
    its id."""
    ws = ws or workspace_of(base, uid)
    got = as_user(
        uid,
        f"""
with Client({daemon.socket!r}) as c:
    v = c.validate({ASK!r}, cwd={ws!r}{agent})
    result = {{"id": v.validation_id, "verdict": v.verdict.name}}
""",
    )
    assert got["verdict"] == "ASK", got
    return str(got["id"])


def approve_as(daemon: Daemon, uid: int, vid: str, groups: tuple[int, ...] = ()) -> Any:
    return as_user(
        uid,
        f"""
with Client({daemon.socket!r}) as c:
    g = c.approve({vid!r})
    result = {{"token": bool(g.approval_token), "approver_uid": g.approver_uid}}
""",
        groups=groups,
    )


def pending_as(daemon: Daemon, uid: int) -> list[str]:
    got = as_user(
        uid,
        f"""
with Client({daemon.socket!r}) as c:
    result = [p.validation_id for p in c.list_pending()]
""",
    )
    assert isinstance(got, list), got
    return got


def events_of(client: Client, vid: str, kind: RpcKind) -> list[StoredEvent]:
    return [
        s for s in client.audit_events() if s.event.validation_id == vid and s.event.kind == kind
    ]


def test_the_askers_own_uid_cannot_approve_and_an_approver_can(
    daemon: Daemon, base: Path, client: Client
) -> None:
    vid = ask_as(daemon, base, ASKER)
    assert approve_as(daemon, ASKER, vid) == {"reason": "SELF_APPROVAL_NOT_ALLOWED"}
    # Even with the approver group among its own groups, the asker is still the asker.
    assert approve_as(daemon, ASKER, vid, groups=(APPROVER_GROUP,)) == {
        "reason": "SELF_APPROVAL_NOT_ALLOWED"
    }
    assert approve_as(daemon, OTHER, vid) == {"reason": "NOT_AN_APPROVER"}
    assert approve_as(daemon, APPROVER, vid) == {"token": True, "approver_uid": APPROVER}

    # By group: a member of --approver-groups approves another ask.
    second = ask_as(daemon, base, ASKER)
    assert approve_as(daemon, MEMBER, second) == {"reason": "NOT_AN_APPROVER"}
    assert approve_as(daemon, MEMBER, second, groups=(APPROVER_GROUP,))["token"] is True

    # The log says who approved, how the daemon knew, and who asked; and every refusal.
    approvals = [s.event for s in events_of(client, vid, RpcKind.APPROVE)]
    assert [(e.caller.uid, e.outcome.error) for e in approvals] == [
        (ASKER, "SELF_APPROVAL_NOT_ALLOWED"),
        (ASKER, "SELF_APPROVAL_NOT_ALLOWED"),
        (OTHER, "NOT_AN_APPROVER"),
        (APPROVER, ""),
    ]
    given = approvals[-1].approval
    assert given is not None and given.approved and given.approver is not None
    who = given.approver
    assert (who.uid, who.gid, who.asked_by_uid, who.asked_by_gid) == (
        APPROVER,
        APPROVER,
        ASKER,
        ASKER,
    )
    assert (who.basis, who.authenticated_by) == ("approver", "peer-credentials")
    assert all(e.approval is not None and not e.approval.approved for e in approvals[:3])
    assert client.verify_audit_log().ok


def test_a_run_on_an_approval_names_its_approver_in_the_log(
    daemon: Daemon, base: Path, client: Client
) -> None:
    ws = workspace_of(base, ASKER)
    vid = ask_as(daemon, base, ASKER, ws=ws)
    token = as_user(
        APPROVER,
        f"""
with Client({daemon.socket!r}) as c:
    result = c.approve({vid!r}).approval_token
""",
    )
    ran = as_user(
        ASKER,
        f"""
with Client({daemon.socket!r}) as c:
    events = list(c.execute({ASK!r}, cwd={ws!r}, approval_token={token!r}))
    result = {{"exit": events[-1].exit_code}}
""",
    )
    assert ran == {"exit": 0}
    assert (Path(ws) / "build").stat().st_mode & 0o777 == 0o777
    runs = [
        s.event
        for s in client.audit_events()
        if s.event.kind == RpcKind.EXECUTE and s.event.cwd == ws and s.event.approval
    ]
    assert len(runs) == 2  # its start and its end
    for run in runs:
        assert run.approval is not None
        assert run.approval.detail == (
            f"once approval {run.approval.detail.split()[2]} of validation {vid} by uid {APPROVER}"
        )


def test_root_does_not_approve_its_own_ask_either(
    daemon: Daemon, base: Path, client: Client
) -> None:
    ws = workspace_of(base, 0)
    v = client.validate(ASK, cwd=ws)
    assert v.verdict is types.Verdict.ASK
    with pytest.raises(Exception) as refused:
        client.approve(v.validation_id)
    assert getattr(refused.value, "reason", "") == "SELF_APPROVAL_NOT_ALLOWED"
    assert approve_as(daemon, APPROVER, v.validation_id)["token"] is True


def test_pending_lists_are_scoped(daemon: Daemon, base: Path, client: Client) -> None:
    mine = ask_as(daemon, base, ASKER)
    theirs = ask_as(daemon, base, OTHER)
    asker_sees, other_sees = pending_as(daemon, ASKER), pending_as(daemon, OTHER)
    assert mine in asker_sees and theirs not in asker_sees
    assert theirs in other_sees and mine not in other_sees
    assert {mine, theirs} <= set(pending_as(daemon, APPROVER))
    listed = {p.validation_id: p for p in client.list_pending()}  # root: an approver
    assert {mine, theirs} <= set(listed)
    p = listed[mine]
    assert (p.uid, p.command) == (ASKER, ASK)
    assert p.validation is not None and p.validation.findings  # the details to review
    assert any(c.path.endswith(b"/build/a.o") for c in p.validation.changes)
    # Approved, it waits no more.
    approve_as(daemon, APPROVER, mine)
    assert mine not in pending_as(daemon, ASKER)


def test_the_watch_stream_delivers_a_new_ask_and_is_bounded(
    daemon: Daemon, base: Path, client: Client
) -> None:
    stream = client.watch_pending()
    seen: list[types.PendingValidation | None] = []

    def read() -> None:
        seen.extend(stream)  # until cancelled

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)  # the watch is open (it first lists what waits already)
        target = [ask_as(daemon, base, ASKER, agent=", session_id='watch-1'")]
        deadline = time.monotonic() + 30
        while not any(i is not None and i.validation_id == target[0] for i in seen):
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        [item] = [i for i in seen if i is not None and i.validation_id == target[0]]
        assert item.uid == ASKER and item.session_id == "watch-1"
        assert item.validation is not None and item.validation.verdict is types.Verdict.ASK

        # Each holds a thread: root may hold 2 at once, and a third is refused. The two
        # race to the daemon: whichever comes second is refused.
        second, third = client.watch_pending(), client.watch_pending()
        outcomes = []
        for extra in (second, third):
            try:
                outcomes.append(next(iter(extra)))  # the pending list's first: at once
            except ResourceExhausted as refused:
                outcomes.append(refused.reason)
        assert sorted(map(str, outcomes)).count("TOO_MANY_WATCHES") == 1, outcomes
        second.cancel()
        third.cancel()
    finally:
        stream.cancel()
        reader.join(10)
    assert not reader.is_alive()
    # A cancelled watch gives its place back (the daemon notices within a moment).
    deadline = time.monotonic() + 10
    while True:
        again = client.watch_pending()
        it = iter(again)
        try:
            first = next(it)
            again.cancel()
            break
        except ResourceExhausted:
            assert time.monotonic() < deadline, "a cancelled watch was never released"
            time.sleep(0.2)
    assert first is None or first.validation_id


def test_allow_self_approval_is_honoured_and_audited(base: Path) -> None:
    with (
        running_daemon(base / "self", *TEST_LIMITS, "--allow-self-approval") as d,
        d.client() as root,
    ):
        vid = ask_as(d, base, ASKER)
        assert approve_as(d, ASKER, vid) == {"token": True, "approver_uid": ASKER}
        assert approve_as(d, OTHER, ask_as(d, base, ASKER)) == {"reason": "NOT_AN_APPROVER"}
        [given] = [s.event.approval for s in events_of(root, vid, RpcKind.APPROVE)]
        assert given is not None and given.approver is not None
        assert given.approver.uid == given.approver.asked_by_uid == ASKER
        assert given.approver.basis.startswith("self-approval")


def test_an_open_watch_does_not_hold_the_drain(base: Path) -> None:
    """SIGTERM ends every watch at once: the daemon stops well within its drain grace
    (max-timeout + 30 s = 90 s here), which a watch would otherwise use up."""
    d = start_daemon(base / "drain", *TEST_LIMITS)
    try:
        vid = ask_as(d, base, ASKER)
        with d.client() as root:
            stream = root.watch_pending()
            items = iter(stream)
            first = next(items)
            assert first is not None and first.validation_id == vid
            assert d.stop(timeout=30) == 0
            rest = list(items)  # the stream ended with the daemon
            assert all(i is None for i in rest)
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


# --- the CLI ------------------------------------------------------------------------------


def test_cli_pending_and_approve_ask_before_they_approve(daemon: Daemon, base: Path) -> None:
    vid = ask_as(daemon, base, ASKER)
    listed = daemon.cli("pending")
    assert listed.returncode == 0 and vid in listed.stdout and ASK in listed.stdout

    # No terminal and no --yes: nobody could confirm, so nothing is approved.
    refused = daemon.cli("approve", vid)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert vid in daemon.cli("pending").stdout

    # In a terminal: the review, then the question; "n" approves nothing, "y" does.
    for answer, code in ((b"n\n", 1), (b"y\n", 0)):
        out, status = _in_a_terminal(daemon, ["approve", vid], answer)
        assert status == code, out
        assert "Verdict: ASK" in out and "Approve it once? [y/N]" in out
        assert "a.o" in out  # the changes it would let through
    assert vid not in daemon.cli("pending").stdout

    # Scripts: --yes, and the token alone on stdout.
    other = ask_as(daemon, base, ASKER)
    scripted = daemon.cli("approve", "--yes", other)
    assert scripted.returncode == 0, scripted.stderr
    assert len(scripted.stdout.split()) == 1


def test_cli_pages_a_long_review_and_repeats_the_verdict_at_the_prompt(
    daemon: Daemon, base: Path
) -> None:
    # A terminal of 12 lines: the review is taller, so it goes through the pager (here a
    # script that keeps what it was given), and the verdict comes again above the question.
    vid = ask_as(daemon, base, ASKER)
    paged = base / "paged.txt"
    pager = base / "pager.sh"
    pager.write_text(f"#!/bin/sh\ncat > {paged}\necho PAGER-RAN\n")
    pager.chmod(0o755)
    env = {"AIRLOCK_PAGER": str(pager), "LINES": "12"}
    out, status = _in_a_terminal(daemon, ["approve", vid], b"n\n", env)
    assert status == 1, out
    assert "PAGER-RAN" in out
    report = re.sub(r"\x1b\[[0-9;]*m", "", paged.read_text())
    assert "Verdict: ASK" in report and "a.o" in report, report
    after = out[out.index("PAGER-RAN") :]
    assert "Verdict: ASK" in after and after.index("Verdict: ASK") < after.index("[y/N]"), out
    assert f"validation {vid} · as uid" in report
    assert f"validation {vid} · as uid" not in after  # the report itself went to the pager
    paged.unlink()

    # --no-pager, or a terminal tall enough: printed as it is, no pager.
    for args, extra in ((["approve", "--no-pager", vid], {}), (["approve", vid], {"LINES": "500"})):
        out, status = _in_a_terminal(daemon, args, b"n\n", {**env, **extra})
        assert status == 1, out
        assert "PAGER-RAN" not in out and not paged.exists()
        assert "a.o" in out and "Verdict: ASK" in out

    # `airlock validate` pages its report the same way; piped, it never does.
    ws = workspace_of(base, ASKER)
    out, status = _in_a_terminal(daemon, ["validate", "--cwd", ws, "--", ASK], b"n\n", env)
    assert "PAGER-RAN" in out and "a.o" in paged.read_text(), out
    paged.unlink()
    piped = subprocess.run(
        [AIRLOCK, "validate", "--cwd", ws, "--", ASK],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env, "AIRLOCK_SOCKET": daemon.socket},
    )
    assert "a.o" in piped.stdout and not paged.exists(), piped.stderr


def _in_a_terminal(
    daemon: Daemon, args: list[str], answer: bytes, env: dict[str, str] | None = None
) -> tuple[str, int]:
    """``airlock ARGS`` with a pseudo-terminal as stdin, stdout and stderr, sent ``answer``
    (no pager unless ``env`` names one: a real `less` would wait for a key)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [AIRLOCK, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={
            **os.environ,
            "AIRLOCK_SOCKET": daemon.socket,
            "COLUMNS": "120",
            "NO_COLOR": "1",
            "AIRLOCK_PAGER": "",
            **(env or {}),
        },
    )
    os.close(slave)
    output = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not sent and b"[y/N]" in output:
                os.write(master, answer)
                sent = True
        text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode(errors="replace"))  # styles
        return text, proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# --- the agent's context ------------------------------------------------------------------

CONTEXT = types.AgentContext(
    agent_name="claude-code",
    agent_version="2.1.0",
    session_id="sess-42",
    tool_use_id="toolu_01ABC",
    tool_description="Make the build directory world-writable",
    transcript_path="/home/a/.claude/projects/x/sess-42.jsonl",
    prompt_excerpt="please fix the permissions of build/",
)


def test_agent_context_round_trips_into_the_audit_log_and_filters_work(
    daemon: Daemon, base: Path, client: Client
) -> None:
    ws = workspace_of(base, 0)
    v = client.validate("ls", cwd=ws, agent=CONTEXT, session_id="sess-42")
    assert list(client.execute("true", cwd=ws, agent=CONTEXT))
    page, _ = client.list_audit_events(AuditFilter(tool_use_id="toolu_01ABC"))
    kinds = [s.event.kind for s in page]
    assert kinds == [RpcKind.VALIDATE, RpcKind.EXECUTE, RpcKind.EXECUTE], kinds
    assert page[0].event.validation_id == v.validation_id
    assert all(s.event.agent == CONTEXT for s in page)
    by_agent, _ = client.list_audit_events(AuditFilter(agent_name="claude-code"))
    assert {s.seq for s in page} <= {s.seq for s in by_agent}
    none, _ = client.list_audit_events(AuditFilter(agent_name="no-such-agent"))
    assert none == []
    assert client.verify_audit_log().ok

    listed = daemon.cli("audit", "list", "--tool-use", "toolu_01ABC", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 3 and rows[0]["agent"]["toolDescription"] == CONTEXT.tool_description
    table = daemon.cli(
        "audit", "list", "--agent", "claude-code", "--session", "sess-42", columns=200
    )
    assert "claude-code toolu_01ABC" in table.stdout, table.stdout


def test_oversize_agent_context_is_refused(daemon: Daemon, base: Path, client: Client) -> None:
    ws = workspace_of(base, 0)
    for name, size in (("prompt_excerpt", 4097), ("tool_description", 1025), ("agent_name", 65)):
        agent = types.AgentContext(**{name: "x" * size})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest) as refused:
            client.validate("ls", cwd=ws, agent=agent)
        assert refused.value.reason == "INVALID_AGENT_CONTEXT"
        assert f"agent.{name}" in str(refused.value)
    at_limit = types.AgentContext(prompt_excerpt="é" * 2048)  # 4096 bytes: allowed
    assert client.validate("ls", cwd=ws, agent=at_limit).verdict is types.Verdict.ALLOW


HOOKS = Path(__file__).resolve().parents[1] / "data" / "hooks"


@pytest.mark.parametrize(
    ("agent", "name", "fields"),
    [
        (
            "claude",
            "claude-code",
            {"session_id": "abc123", "tool_description": "List files", "tool_use_id": "toolu_x1"},
        ),
        ("codex", "codex", {"session_id": None, "tool_use_id": None}),
        ("gemini", "gemini-cli", {"session_id": "gemini-session-1", "tool_description": "list"}),
        ("cursor", "cursor", {"session_id": "conv-123", "tool_use_id": "gen-456"}),
    ],
)
def test_every_hook_sends_the_agents_context(
    daemon: Daemon, base: Path, client: Client, agent: str, name: str, fields: dict[str, Any]
) -> None:
    data = json.loads((HOOKS / f"{agent}.json").read_text())["input"]
    ws = workspace_of(base, 0)
    marker = f"echo {agent}-{time.monotonic_ns()}"
    if agent == "cursor":
        data["command"], data["cwd"] = marker, ws
    else:
        data["tool_input"]["command"], data["cwd"] = marker, ws
    if agent == "claude":
        data["tool_use_id"] = "toolu_x1"
    done = subprocess.run(
        [AIRLOCK, "hook", agent],
        input=json.dumps(data),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AIRLOCK_SOCKET": daemon.socket},
    )
    assert done.returncode == 0, done.stderr
    [event] = [s.event for s in client.audit_events() if s.event.command == marker]
    assert event.agent is not None and event.agent.agent_name == name
    for field, value in fields.items():
        expected = data.get(field) if value is None else value
        assert getattr(event.agent, field) == expected, (field, event.agent)
    if "transcript_path" in data:
        assert event.agent.transcript_path == (data["transcript_path"] or "")
