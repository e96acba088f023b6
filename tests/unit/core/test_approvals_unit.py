"""Approvers, the agent context and the pending board, without a daemon (no root needed).

The daemon side (real users, real sockets) is tests/daemon/test_approvals.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from airlock import types
from airlock._errors import InvalidRequest, PermissionDenied, ResourceExhausted
from airlock.api import convert
from airlock.audit import (
    Approval,
    Approver,
    AuditEvent,
    AuditFilter,
    AuditLog,
    Authorization,
    Caller,
    RpcKind,
    decode_event,
    encode_event,
)
from airlock.audit.canonical import MalformedEvent
from airlock.cli import hook
from airlock.core.config import Approvers
from airlock.core.pending import MAX_WATCHES_PER_UID, PendingBoard
from airlock.core.request import check_agent
from airlock.types import AGENT_LIMITS, AgentContext, PeerCred, Validation, Verdict

HOOKS = Path(__file__).resolve().parents[2] / "data" / "hooks"
AGENT = AgentContext(
    agent_name="claude-code",
    session_id="s-1",
    tool_use_id="toolu_1",
    tool_description="List files",
    transcript_path="/home/u/t.jsonl",
    prompt_excerpt="list them",
)


def peer(uid: int, gid: int | None = None, groups: tuple[int, ...] = ()) -> PeerCred:
    return PeerCred(pid=1, uid=uid, gid=uid if gid is None else gid, groups=groups)


# --- who may approve ------------------------------------------------------------------------


def test_approvers_refuse_the_askers_uid_and_non_approvers() -> None:
    a = Approvers(uids=(0, 1001), gids=(500,))
    assert a.how(peer(1001), 2000) == "approver"
    assert a.how(peer(0), 2000) == "approver"
    assert a.how(peer(3000, groups=(500,)), 2000) == "approver"  # by a supplementary group
    assert a.how(peer(3000, gid=500), 2000) == "approver"  # by the primary group
    for who, owner, reason in (
        (peer(2000), 2000, "SELF_APPROVAL_NOT_ALLOWED"),
        (peer(2000, groups=(500,)), 2000, "SELF_APPROVAL_NOT_ALLOWED"),  # an approver, but its own
        (peer(0), 0, "SELF_APPROVAL_NOT_ALLOWED"),  # root too
        (peer(3000), 2000, "NOT_AN_APPROVER"),
    ):
        with pytest.raises(PermissionDenied) as refused:
            a.how(who, owner)
        assert refused.value.reason == reason
    assert Approvers(allow_self_approval=True).how(peer(2000), 2000).startswith("self-approval")
    with pytest.raises(PermissionDenied):  # self-approval does not make anyone an approver
        Approvers(allow_self_approval=True).how(peer(3000), 2000)


# --- the agent context ----------------------------------------------------------------------


def test_the_agent_context_is_checked_field_by_field() -> None:
    assert check_agent(None) is None and check_agent(AgentContext()) is None
    assert check_agent(AGENT) is AGENT
    for name, limit in AGENT_LIMITS.items():
        assert check_agent(AgentContext(**{name: "é" * (limit // 2)}))  # at the limit in bytes
        with pytest.raises(InvalidRequest) as refused:
            check_agent(AgentContext(**{name: "x" * (limit + 1)}))
        assert refused.value.reason == "INVALID_AGENT_CONTEXT" and f"agent.{name}" in str(
            refused.value
        )
    with pytest.raises(InvalidRequest):
        check_agent(AgentContext(session_id="a\0b"))


def test_the_agent_context_crosses_the_wire_unchanged() -> None:
    req = types.ValidateRequest("ls", "/tmp", (), agent=AGENT)
    assert convert.validate_request_from_proto(convert.validate_request_to_proto(req)) == req
    ex = types.ExecuteRequest("ls", "/tmp", (), agent=AGENT)
    assert convert.execute_request_from_proto(convert.execute_request_to_proto(ex)) == ex
    bare = types.ValidateRequest("ls", "/tmp", ())
    assert (
        convert.validate_request_from_proto(convert.validate_request_to_proto(bare)).agent is None
    )


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (
            "claude",
            {
                "agent_name": "claude-code",
                "session_id": "abc123",
                "tool_use_id": "toolu_01ABC",
                "tool_description": "List files",
                "transcript_path": "/tmp/transcript.jsonl",
            },
        ),
        (
            "codex",
            {
                "agent_name": "codex",
                "session_id": "019a0000-0000-7000-8000-000000000000",
                "tool_use_id": "call-1",
            },
        ),
        (
            "gemini",
            {
                "agent_name": "gemini-cli",
                "session_id": "gemini-session-1",
                "tool_description": "list",
                "transcript_path": "/tmp/gemini-transcript.json",
            },
        ),
        ("cursor", {"agent_name": "cursor", "session_id": "conv-123", "tool_use_id": "gen-456"}),
    ],
)
def test_each_hook_reads_the_agents_context_from_its_fixture(
    agent: str, expected: dict[str, str]
) -> None:
    data = json.loads((HOOKS / f"{agent}.json").read_text())["input"]
    req = hook.parse_request(agent, json.dumps(data))
    assert req.agent == AgentContext(**expected)


def test_a_hook_cuts_a_long_description_to_its_limit_instead_of_failing() -> None:
    data = json.loads((HOOKS / "claude.json").read_text())["input"]
    data["tool_input"]["description"] = "ü" * 5000
    req = hook.parse_request("claude", json.dumps(data))
    assert req.agent is not None
    assert len(req.agent.tool_description.encode()) <= AGENT_LIMITS["tool_description"]
    assert check_agent(req.agent) is req.agent


# --- the audit log ---------------------------------------------------------------------------


def _event(**more: object) -> AuditEvent:
    return AuditEvent(
        kind=RpcKind.APPROVE,
        caller=Caller(uid=1001, pid=7, gid=1001, exe="/usr/bin/airlock"),
        command="chmod -R 777 build",
        cwd="/w",
        verdict=Verdict.ASK,
        validation_id="v1",
        time_ns=1,
        **more,  # type: ignore[arg-type]
    )


def test_older_events_encode_as_before_and_new_fields_round_trip() -> None:
    plain = _event(approval=Approval(True, Authorization.USER_VERIFIED, "tty"))
    body = encode_event(plain)
    assert b'"agent"' not in body and b'"approver"' not in body  # the first version's shape
    assert decode_event(body) == plain
    who = Approver(uid=1001, gid=1001, asked_by_uid=2000, asked_by_gid=2000, basis="approver")
    full = _event(approval=Approval(True, Authorization.USER_VERIFIED, "x", who), agent=AGENT)
    assert decode_event(encode_event(full)) == full
    raw = json.loads(encode_event(full))
    assert raw["approval"]["approver"]["authenticated_by"] == "peer-credentials"
    raw["agent"]["extra"] = "no"
    with pytest.raises(MalformedEvent):
        decode_event(json.dumps(raw))


def test_the_log_filters_by_agent_and_tool_call(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.sqlite3") as log:
        log.append(_event())
        log.append(_event(agent=AGENT))
        other = AgentContext(agent_name="codex", tool_use_id="call-9")
        log.append(_event(agent=other))
        page, _ = log.list(AuditFilter(agent_name="claude-code"))
        assert [s.seq for s in page] == [2]
        page, _ = log.list(AuditFilter(tool_use_id="call-9"))
        assert [s.seq for s in page] == [3] and page[0].event.agent == other
        assert log.verify().ok


# --- the pending board -----------------------------------------------------------------------


def _ask(vid: str) -> Validation:
    return Validation(validation_id=vid, verdict=Verdict.ASK, summary="s", stdout=b"x" * 100_000)


def test_the_board_keeps_asks_bounded_and_wakes_watches() -> None:
    board = PendingBoard(heartbeat_s=0.05, max_watch_s=5)
    board.post(Validation(validation_id="allowed", verdict=Verdict.ALLOW, summary=""), None)
    assert board.details("allowed") == (None, None)  # only asks are kept
    watch = board.watch(peer(0))
    cancelled = threading.Event()
    assert watch.next(cancelled) == ()  # a heartbeat
    board.post(_ask("a1"), AGENT)
    assert watch.next(cancelled) == ("a1",)
    kept, agent = board.details("a1")
    assert kept is not None and len(kept.stdout) == 16 * 1024 and agent == AGENT
    # Per uid, a bounded number of watches; closing one gives its place back.
    more = [board.watch(peer(0)) for _ in range(MAX_WATCHES_PER_UID - 1)]
    with pytest.raises(ResourceExhausted) as refused:
        board.watch(peer(0))
    assert refused.value.reason == "TOO_MANY_WATCHES"
    more[0].close()
    board.watch(peer(0)).close()
    # A cancellation or the board's close ends a waiting watch at once.
    woke: list[object] = []
    waiter = threading.Thread(target=lambda: woke.append(watch.next(cancelled)))
    board.heartbeat_s = 60
    waiter.start()
    time.sleep(0.1)
    board.close()
    waiter.join(5)
    assert woke == [None]
    watch.close()


def test_a_watch_ends_after_its_time() -> None:
    board = PendingBoard(heartbeat_s=0.05, max_watch_s=0.2)
    watch = board.watch(peer(5))
    items = []
    while (item := watch.next(threading.Event())) is not None:
        items.append(item)
    assert items and all(i == () for i in items)
    watch.close()
