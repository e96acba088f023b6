"""Validate, then Apply or Discard, through a real daemon: the reviewed changes, exactly once.

The changeset format and the apply algorithm have their own tests (test_changeset.py); these
check the workflow around them: kept changes, conflicts, idempotency, approvals, restarts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from airlock import Conflict, FailedPrecondition, NotFound, PermissionDenied
from airlock.client import Client
from airlock.types import Verdict
from tests.helpers import (
    NEUTRAL_POLICY,
    SANDBOX_ARGS,
    public_dir,
    run_client_as,
    running_daemon,
)

from .test_validate import tree_digest

# Its validations are root's and root approves them: that needs allow-self-approval.
DAEMON_ARGS = (*NEUTRAL_POLICY, "--allow-self-approval")


def seed(ws: Path) -> None:
    (ws / "keep.txt").write_text("unchanged\n")
    (ws / "edit.txt").write_text("one\ntwo\n")
    (ws / "gone.txt").write_text("bye\n")
    (ws / "run.sh").write_text("#!/bin/sh\n")
    (ws / "olddir").mkdir()
    (ws / "olddir" / "inner").write_text("x")


CHANGES = (
    "echo new > new.txt; printf 'one\\nTWO\\n' > edit.txt; rm gone.txt; chmod 755 run.sh;"
    " mkdir -p deep/er/est && echo leaf > deep/er/est/leaf; ln -s edit.txt link;"
    " rm -r olddir; : > empty; head -c 300000 /dev/urandom > blob.bin; cat edit.txt"
)


def test_apply_writes_exactly_the_dry_runs_view(client: Client, tmp_path: Path) -> None:
    host, expected = tmp_path / "host", tmp_path / "expected"
    for ws in (host, expected):
        ws.mkdir()
        seed(ws)
    before = tree_digest(host)
    v = client.validate(CHANGES, cwd=str(host))
    assert v.verdict is Verdict.ALLOW and v.changes_digest and not v.changes_not_kept
    assert tree_digest(host) == before  # the dry run changed nothing
    out = client.apply(v.validation_id)
    assert not out.replayed and out.bytes_written >= 300_000
    assert {p.decode() for p in out.applied_paths} >= {
        str(host / n) for n in ("new.txt", "edit.txt", "gone.txt", "run.sh", "link", "olddir")
    }
    # The same commands run directly on a copy give the same tree, except the random blob.
    import subprocess

    subprocess.run(["bash", "-c", CHANGES], cwd=expected, check=True, capture_output=True)
    (expected / "blob.bin").write_bytes((host / "blob.bin").read_bytes())
    assert _listing(host) == _listing(expected)
    assert (host / "edit.txt").read_text() == "one\nTWO\n"
    assert os.readlink(host / "link") == "edit.txt"
    assert (host / "run.sh").stat().st_mode & 0o777 == 0o755
    assert not (host / "gone.txt").exists() and not (host / "olddir").exists()


def _listing(root: Path) -> list[tuple[str, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            data = (
                os.readlink(p).encode()
                if p.is_symlink()
                else (p.read_bytes() if p.is_file() else b"")
            )
            out.append((str(p.relative_to(root)), st.st_mode, data))
    return out


def test_apply_twice_applies_once(client: Client, workspace: Path) -> None:
    v = client.validate("echo 1 >> counter", cwd=str(workspace))
    first = client.apply(v.validation_id)
    (workspace / "counter").write_text("edited by hand\n")
    second = client.apply(v.validation_id)
    assert second.replayed and second.applied_paths == first.applied_paths
    assert (workspace / "counter").read_text() == "edited by hand\n"  # not written again


def test_a_host_change_since_the_dry_run_aborts_with_nothing_written(
    client: Client, workspace: Path
) -> None:
    (workspace / "a.txt").write_text("a\n")
    (workspace / "b.txt").write_text("b\n")
    v = client.validate("echo A > a.txt; echo B > b.txt; echo C > c.txt", cwd=str(workspace))
    (workspace / "b.txt").write_text("changed on the host\n")
    snapshot = tree_digest(workspace)
    with pytest.raises(Conflict) as info:
        client.apply(v.validation_id)
    assert info.value.reason == "APPLY_CONFLICT"
    assert str(workspace / "b.txt") in info.value.message
    assert tree_digest(workspace) == snapshot
    # Nothing was used up: after the host is put back, the same validation applies.
    (workspace / "b.txt").write_text("b\n")
    client.apply(v.validation_id)
    assert (workspace / "c.txt").read_text() == "C\n"


def test_discard_drops_the_changes(client: Client, daemon_state: Path, workspace: Path) -> None:
    v = client.validate("echo x > x.txt", cwd=str(workspace))
    kept = daemon_state / "changesets" / v.validation_id
    assert kept.is_dir()
    client.discard(v.validation_id)
    client.discard(v.validation_id)  # twice is fine
    assert not kept.exists()
    with pytest.raises(FailedPrecondition) as info:
        client.apply(v.validation_id)
    assert info.value.reason == "VALIDATION_DISCARDED"
    assert not (workspace / "x.txt").exists()
    with pytest.raises(NotFound):
        client.apply("0" * 32)


@pytest.fixture
def daemon_state(daemon: object) -> Path:
    return Path(daemon.state_dir)  # type: ignore[attr-defined]


def test_an_asked_validation_needs_approval_and_survives_a_restart(tmp_path: Path) -> None:
    target = tmp_path / "outside" / f"file-{time.time_ns()}"
    target.parent.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    with public_dir() as base:
        with running_daemon(base, *SANDBOX_ARGS, "--allow-self-approval") as d, d.client() as c:
            v = c.validate(f"echo reviewed > {target}", cwd=str(ws))
            assert v.verdict is Verdict.ASK  # a change outside the workspace
            with pytest.raises(FailedPrecondition) as info:
                c.apply(v.validation_id)
            assert info.value.reason == "APPROVAL_REQUIRED"
            grant = c.approve(v.validation_id)
            assert grant.approval_token and grant.approver_uid == 0
        # A restart between Approve and Apply keeps the approval.
        with running_daemon(base, *SANDBOX_ARGS) as d, d.client() as c:
            out = c.apply(v.validation_id)
            assert str(target).encode() in out.applied_paths
    assert target.read_text() == "reviewed\n"


def test_only_the_validations_user_may_apply(client: Client, public_tmp: Path) -> None:

    ws = public_tmp / "ws"
    ws.mkdir()
    v = client.validate("echo mine > mine.txt", cwd=str(ws))
    proc = run_client_as(
        f"with Client({client.socket_path!r}) as c:\n"
        "    try:\n"
        f"        c.apply({v.validation_id!r}); print('applied')\n"
        "    except AirlockError as e:\n"
        "        print(type(e).__name__, e.reason)\n"
    )
    assert proc.stdout.split() == [PermissionDenied.__name__, "NOT_YOUR_VALIDATION"], proc.stderr
    assert not (ws / "mine.txt").exists()


def test_every_decision_and_action_is_in_the_audit_log(client: Client, tmp_path: Path) -> None:
    from airlock.audit import AuditFilter, RpcKind
    from airlock.types import ExecFinished

    ws = tmp_path / "audited"
    ws.mkdir()
    session = f"audit-{time.time_ns()}"
    outside = tmp_path / f"outside-{time.time_ns()}"
    asked = client.validate(f"echo x > {outside}", cwd=str(ws), session_id=session)
    assert asked.verdict is Verdict.ASK
    client.approve(asked.validation_id)
    client.apply(asked.validation_id)
    client.apply(asked.validation_id)  # a replay acts on nothing: not a new event
    dropped = client.validate("echo y > y.txt", cwd=str(ws), session_id=session)
    client.discard(dropped.validation_id)
    events = list(client.execute("echo run", cwd=str(ws), session_id=session))
    assert isinstance(events[-1], ExecFinished)

    stored, _token = client.list_audit_events(AuditFilter(session_id=session))
    kinds = [s.event.kind for s in stored]
    assert kinds == [
        RpcKind.VALIDATE,
        RpcKind.APPROVE,
        RpcKind.APPLY,  # its start, before anything is written
        RpcKind.APPLY,  # its outcome
        RpcKind.VALIDATE,
        RpcKind.DISCARD,
        RpcKind.EXECUTE,  # the decision, before the command runs
        RpcKind.EXECUTE,  # the outcome
    ]
    assert stored[2].event.effects.startswith("starting:")
    apply_event = stored[3].event
    assert apply_event.outcome.applied_paths == (str(outside),)
    assert apply_event.validation_id == asked.validation_id
    assert stored[6].event.outcome.exit_code is None and stored[7].event.outcome.exit_code == 0
    assert client.verify_audit_log().ok


def test_runs_with_too_many_changes_keep_none(public_tmp: Path) -> None:
    ws = public_tmp / "many"
    ws.mkdir()
    args = (*SANDBOX_ARGS, "--keep-changes-max", "5")
    with running_daemon(public_tmp / "d", *args) as d, d.client() as c:
        v = c.validate("for i in 1 2 3 4 5 6; do echo $i > f$i; done", cwd=str(ws))
        assert len(v.changes) == 6 and not v.changes_digest
        assert "more than the 5" in v.changes_not_kept
        assert not list((Path(d.state_dir) / "changesets").iterdir())
        with pytest.raises(FailedPrecondition) as info:  # nothing to apply, and why
            c.apply(v.validation_id)
        assert info.value.reason == "CHANGES_NOT_KEPT" and "more than the 5" in info.value.message
        small = c.validate("echo 1 > one", cwd=str(ws))
        assert small.changes_digest
