"""The plain-language summary of a dry run."""

from __future__ import annotations

from airlock.egress import HOST_SERVICE
from airlock.policy.summary import summarize
from airlock.types import (
    ChangeKind,
    FileChange,
    FileType,
    NetProtocol,
    NetworkAttemptInfo,
    Termination,
)


def _summary(*changes: FileChange) -> str:
    return summarize(
        changes=changes,
        changes_truncated=False,
        termination=Termination.EXITED,
        exit_code=0,
        signal=0,
        timeout_s=30,
        workspace="/w",
    )


def test_unreadable_changes_are_said_to_be_hidden_and_not_kept() -> None:
    readable = FileChange(b"/w/a", ChangeKind.CREATED, FileType.REGULAR, in_workspace=True)
    secret = FileChange(
        b"/w/s", ChangeKind.MODIFIED, FileType.REGULAR, in_workspace=True, unreadable=True
    )
    assert "may not read" not in _summary(readable)
    text = _summary(readable, secret)
    assert "1 changed file(s) hold content you may not read: not shown, not kept." in text


def _network_summary(attempts: list[NetworkAttemptInfo], *, egress: bool = False) -> str:
    return summarize(
        changes=(),
        changes_truncated=False,
        termination=Termination.EXITED,
        exit_code=0,
        signal=0,
        timeout_s=30,
        workspace="/w",
        network=attempts,
        egress=egress,
    )


def test_attempts_to_reach_a_service_on_this_machine_have_their_own_sentence() -> None:
    local = [
        NetworkAttemptInfo(NetProtocol.TCP, "127.0.0.1", 9200, refusal=HOST_SERVICE),
        NetworkAttemptInfo(NetProtocol.TCP, "127.0.0.1", 9200, refusal=HOST_SERVICE),
        NetworkAttemptInfo(NetProtocol.TCP, "::1", 5432, refusal=HOST_SERVICE),
        NetworkAttemptInfo(NetProtocol.UDP, "127.0.0.1", 8125, refusal=HOST_SERVICE),
    ]
    away = NetworkAttemptInfo(NetProtocol.TCP, "203.0.113.7", 443, refusal="no-grant")
    expected = (
        "Tried to reach a service on this machine: 127.0.0.1:9200, [::1]:5432, "
        "127.0.0.1:8125/udp (refused in the sandbox; on the host something may listen)."
    )
    text = _network_summary([*local, away])
    assert expected in text
    assert "Tried to reach 203.0.113.7:443 (blocked during the dry run)." in text
    assert "127.0.0.1:9200 (blocked" not in text
    under_egress = _network_summary([*local, away], egress=True)
    assert expected in under_egress
    assert "Refused 203.0.113.7:443 (no egress grant" in under_egress
    assert "Refused 127.0.0.1" not in under_egress
