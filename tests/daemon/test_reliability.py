"""Issue 15, item 11 against a real daemon: hostile ids are refused up front with a short
answer, and every malformed request leaves one (rate-limited) line in the daemon's log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock._errors import InvalidRequest
from airlock.api.status import from_rpc_error
from airlock.audit import AuditFilter
from airlock.client import Client
from airlock.core.ids import MAX_ID_BYTES
from airlock.v1 import sandbox_pb2 as pb
from tests.helpers import Daemon

HUGE = "a" * 10_000
SANDBOX = "/airlock.v1.SandboxService/"


def _workspace(daemon: Daemon) -> str:
    # Not the socket's directory: Execute refuses a cwd that holds the daemon's socket.
    ws = Path(daemon.state_dir).parent / "ws"
    ws.mkdir(exist_ok=True)
    return str(ws)


CALLS: dict[str, Callable[[Client, str, str], Any]] = {
    "approve": lambda c, ws, v: c.approve(v),
    "apply": lambda c, ws, v: c.apply(v),
    "discard": lambda c, ws, v: c.discard(v),
    "validate-session": lambda c, ws, v: c.validate("true", cwd=ws, session_id=v),
    "execute-token": lambda c, ws, v: list(c.execute("touch f", cwd=ws, approval_token=v)),
    "execute-session": lambda c, ws, v: list(c.execute("touch f", cwd=ws, session_id=v)),
    "audit-session": lambda c, ws, v: c.list_audit_events(AuditFilter(session_id=v)),
    "audit-rule": lambda c, ws, v: c.list_audit_events(AuditFilter(rule_id=v)),
    "audit-page-token": lambda c, ws, v: c.list_audit_events(page_token=v),
    # The client checks an anchor itself: the daemon's check is reached through the stub.
    "verify-anchor": lambda c, ws, v: _stub_call(
        c, "VerifyAuditLog", pb.VerifyAuditLogRequest(anchor=v)
    ),
}


def _stub_call(c: Client, method: str, request: Any) -> Any:
    try:
        return getattr(c._stub, method)(request, timeout=30)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


@pytest.mark.parametrize("value", [HUGE, "v\nforged log line"], ids=["10000-chars", "newline"])
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_a_hostile_id_is_invalid_argument_and_not_echoed(
    daemon: Daemon, client: Client, call: str, value: str
) -> None:
    # Before: the id was echoed into the status, whose trailer then passed gRPC's metadata
    # limit, and the client saw RESOURCE_EXHAUSTED.
    with pytest.raises(InvalidRequest) as caught:
        CALLS[call](client, _workspace(daemon), value)
    assert caught.value.reason == "INVALID_ID"
    assert len(caught.value.message) < 200, caught.value.message
    assert "a" * 17 not in caught.value.message and "\n" not in caught.value.message


def test_an_id_at_the_limit_is_looked_up(client: Client) -> None:
    # The bound is on size: an id of MAX_ID_BYTES is checked against the store as any other.
    from airlock._errors import NotFound

    with pytest.raises(NotFound):
        client.apply("b" * MAX_ID_BYTES)
    with pytest.raises(InvalidRequest):
        client.apply("b" * (MAX_ID_BYTES + 1))


def _raw_validate(daemon: Daemon, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        call = channel.unary_unary(
            SANDBOX + "Validate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    return info.value


def _malformed_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("reason") == "MALFORMED_REQUEST"]


def test_a_malformed_request_leaves_one_bounded_log_line(daemon: Daemon) -> None:
    before = len(_malformed_lines(daemon))
    error = _raw_validate(daemon, b"\xff" * 50_000)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    lines = _malformed_lines(daemon)[before:]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["msg"] == "rejected" and line["rpc"] == "Validate"
    assert line["code"] == "INVALID_ARGUMENT" and line["bytes"] == 50_000
    assert line["uid"] == 0  # the caller, from the relay's SO_PEERCRED
    assert len(json.dumps(line)) < 1000


def test_a_flood_of_malformed_requests_is_rate_limited_in_the_log(daemon: Daemon) -> None:
    before = len(_malformed_lines(daemon))
    flood = 300
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        call = channel.unary_unary(
            SANDBOX + "Validate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for _ in range(flood):
            with pytest.raises(grpc.RpcError) as info:
                call(b"\x0a\x80", timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Every refusal was answered; the log kept a bounded share of them and counts the rest.
    time.sleep(0.2)  # the budget refills (20 lines a second): the next line is written
    _raw_validate(daemon, b"\x0a\x80")  # and says how many were left out
    lines = _malformed_lines(daemon)[before:]
    assert 1 <= len(lines) < flood
    assert len(lines) + sum(e["suppressed"] for e in lines) >= flood
