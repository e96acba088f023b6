"""One request, one spelling: the daemon normalises a request's cwd once, and that spelling is
what the sandbox runs in, the workflow records, the audit log keeps and an approval is matched on.

A real daemon with the shipped policy (which asks before ``sudo``). The requests go through a
bare stub: the typed client would tidy the path itself (``os.path.abspath``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from pathlib import Path

import grpc

from airlock.api import convert
from airlock.audit import AuditFilter, RpcKind
from airlock.client import Client
from airlock.types import ExecFinished, ExecStarted, Verdict
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc
from tests.helpers import Daemon

# Root asks and approves: allow-self-approval (tests/daemon/test_approvals.py has the rule).
DAEMON_ARGS = ("--allow-self-approval",)

COMMAND = "sudo -n true || echo ran-after-approval"  # the shipped policy asks about sudo


def test_a_cwd_is_recorded_audited_and_approved_in_its_normal_form(
    daemon: Daemon, client: Client, workspace: Path
) -> None:
    (workspace / "x").mkdir()
    spelled = f"/{workspace}/./x/.."  # //tmp/.../ws/./x/.., an existing directory
    normal = str(workspace)
    session = f"spelling-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        stub = pb_grpc.SandboxServiceStub(channel)
        v = convert.validation_from_proto(
            stub.Validate(
                pb.ValidateRequest(command=COMMAND, cwd=spelled, session_id=session), timeout=60
            )
        )
        assert v.verdict is Verdict.ASK
        grant = client.approve(v.validation_id)
        # The ONCE token binds the cwd exactly: the same request spelled the same way matches.
        request = pb.ExecuteRequest(
            command=COMMAND, cwd=spelled, approval_token=grant.approval_token, session_id=session
        )
        events = [convert.exec_event_from_proto(m) for m in stub.Execute(request, timeout=60)]
    assert isinstance(events[0], ExecStarted) and events[0].authorization == "USER_VERIFIED"
    assert isinstance(events[-1], ExecFinished) and events[-1].exit_code == 0

    # Recorded: the validation and its approval, in the state store.
    state = f"file:{daemon.state_dir}/state.db?mode=ro"
    with contextlib.closing(sqlite3.connect(state, uri=True)) as db:
        recorded = db.execute(
            "SELECT cwd FROM validations WHERE validation_id = ?", (v.validation_id,)
        ).fetchall()
        approved = db.execute(
            "SELECT cwd FROM approvals WHERE validation_id = ?", (v.validation_id,)
        ).fetchall()
    assert recorded == [(normal,)] and approved == [(normal,)]

    # Audited: every event of the session names the same directory.
    stored, _token = client.list_audit_events(AuditFilter(session_id=session))
    assert [(s.event.kind, s.event.cwd) for s in stored] == [
        (RpcKind.VALIDATE, normal),
        (RpcKind.APPROVE, normal),
        (RpcKind.EXECUTE, normal),  # the decision
        (RpcKind.EXECUTE, normal),  # the outcome
    ]
