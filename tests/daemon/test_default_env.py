"""The environment a request carries by default (issue 13, docs/decisions.md section 33): the
caller's, the same through the Python client, ``airlock validate``/``run`` and ``airlock hook``;
``env={}`` and ``--clean-env`` send none; a variable the API cannot carry is left out with a
warning, never a refused request."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from airlock._environ import caller_environment
from airlock.audit import RpcKind, StoredEvent, env_sha256
from airlock.client import Client
from airlock.types import ExecEvent, ExecFinished, ExecOutput, Verdict
from tests.helpers import AIRLOCK, NEUTRAL_POLICY, Daemon

DAEMON_ARGS = NEUTRAL_POLICY
HOOK_INPUT = Path(__file__).resolve().parents[1] / "data" / "hooks" / "claude.json"


@pytest.fixture
def mark(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> str:
    """A variable the command needs, set in this process's environment, which the CLI and the
    hook run below inherit unchanged (AIRLOCK_SOCKET included, so no extra variable)."""
    value = f"mark-{uuid.uuid4().hex}"
    monkeypatch.setenv("AIRLOCK_TEST_MARK", value)
    monkeypatch.setenv("AIRLOCK_SOCKET", daemon.socket)
    return value


def needs_mark(tag: str) -> str:
    """A command that fails unless $AIRLOCK_TEST_MARK is set, and prints it; ``tag`` makes it
    unique, to find its audit events."""
    return f': {tag}; test -n "$AIRLOCK_TEST_MARK" && printf %s "$AIRLOCK_TEST_MARK"'


def cli(*args: str, cwd: Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``airlock *args`` with exactly this process's ``os.environ``. Passed explicitly: the C
    environment a child inherits by default can hold more (pytest loads readline, which sets
    LINES and COLUMNS there but not in ``os.environ``)."""
    return subprocess.run(
        [*prefix, AIRLOCK, *args], capture_output=True, text=True, cwd=cwd, timeout=60,
        env=dict(os.environ),
    )  # fmt: skip


def cli_validation(done: subprocess.CompletedProcess[str]) -> tuple[str, int, bytes]:
    """The id, the command's exit code and its stdout from ``airlock validate --json``."""
    assert done.returncode == 0, done.stderr  # ALLOW
    doc = json.loads(done.stdout)
    return doc["validationId"], doc.get("exitCode", 0), base64.b64decode(doc.get("stdout", ""))


def hook(command: str, cwd: Path) -> str:
    """``airlock hook claude`` for ``command``: its permission decision."""
    data = json.loads(HOOK_INPUT.read_text())["input"]
    data["tool_input"]["command"], data["cwd"] = command, str(cwd)
    done = subprocess.run(
        [AIRLOCK, "hook", "claude"], input=json.dumps(data), capture_output=True, text=True,
        timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    decision: str = json.loads(done.stdout)["hookSpecificOutput"]["permissionDecision"]
    return decision


def execute(client: Client, command: str, cwd: Path, **kw: Any) -> tuple[int, bytes]:
    events: list[ExecEvent] = list(client.execute(command, cwd=str(cwd), **kw))
    end = events[-1]
    assert isinstance(end, ExecFinished)
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    return end.exit_code, out


def events_of(client: Client, command: str) -> list[StoredEvent]:
    return [s for s in client.audit_events() if s.event.command == command]


def test_client_default_cli_and_hook_send_the_same_environment(
    client: Client, workspace: Path, mark: str
) -> None:
    command = needs_mark(uuid.uuid4().hex)
    v = client.validate(command, cwd=str(workspace))
    assert (v.verdict, v.exit_code, v.stdout) == (Verdict.ALLOW, 0, mark.encode())
    cli_id, cli_exit, cli_out = cli_validation(
        cli("validate", "--json", "--", command, cwd=workspace)
    )
    assert (cli_exit, cli_out) == (0, mark.encode())
    assert hook(command, workspace) == "allow"
    assert execute(client, command, workspace) == (0, mark.encode())
    run = cli("run", "--", command, cwd=workspace)
    assert (run.returncode, run.stdout) == (0, mark), run.stderr
    # Not only the variable: the whole environment, by its hash in the audit log.
    events = events_of(client, command)
    # Execute records two events: its decision, then its outcome.
    assert [s.event.kind for s in events] == [RpcKind.VALIDATE] * 3 + [RpcKind.EXECUTE] * 4
    assert {s.event.validation_id for s in events[:2]} == {v.validation_id, cli_id}
    assert {s.event.env_sha256 for s in events} == {env_sha256(caller_environment().items())}


def test_an_empty_mapping_and_clean_env_send_none(
    client: Client, workspace: Path, mark: str
) -> None:
    command = needs_mark(uuid.uuid4().hex)
    v = client.validate(command, cwd=str(workspace), env={})
    assert (v.exit_code, v.stdout) == (1, b"")
    _, cli_exit, cli_out = cli_validation(
        cli("validate", "--json", "--clean-env", "--", command, cwd=workspace)
    )
    assert (cli_exit, cli_out) == (1, b"")
    assert execute(client, command, workspace, env={}) == (1, b"")
    assert cli("run", "--clean-env", "--", command, cwd=workspace).returncode == 1
    events = events_of(client, command)
    assert [s.event.kind for s in events] == [RpcKind.VALIDATE] * 2 + [RpcKind.EXECUTE] * 4
    assert {s.event.env_sha256 for s in events} == {env_sha256([])}


def test_a_variable_that_is_not_utf8_is_left_out_with_a_warning(
    client: Client, workspace: Path, mark: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(os.environb, b"AIRLOCK_BAD_NAME\xff", b"x")
    monkeypatch.setitem(os.environb, b"AIRLOCK_BAD_VALUE", b"\xff")
    command = needs_mark(uuid.uuid4().hex) + "; echo; env | grep -c AIRLOCK_BAD"
    printed = f"{mark}\n0\n".encode()  # the mark is there, neither bad variable
    with pytest.warns(RuntimeWarning) as warned:
        v = client.validate(command, cwd=str(workspace))
    assert (v.verdict, v.stdout) == (Verdict.ALLOW, printed)
    assert sorted(str(w.message) for w in warned) == [
        "airlock: not passing b'AIRLOCK_BAD_NAME\\xff': not valid UTF-8",
        "airlock: not passing b'AIRLOCK_BAD_VALUE': not valid UTF-8",
    ]
    assert {w.filename for w in warned} == {__file__}  # the caller's line, not the client's
    with pytest.warns(RuntimeWarning) as warned:
        assert execute(client, command, workspace) == (1, printed)  # grep -c found none: 1
    assert len(warned) == 2
    done = cli("validate", "--json", "--", command, cwd=workspace)
    assert cli_validation(done)[2] == printed
    assert "airlock: warning: not passing b'AIRLOCK_BAD_VALUE': not valid UTF-8" in done.stderr
    assert "airlock: warning: not passing b'AIRLOCK_BAD_NAME\\xff'" in done.stderr
    assert hook(command, workspace) == "allow"  # not a refusal, and silent


def test_a_variable_with_an_empty_name_is_left_out(workspace: Path, mark: str) -> None:
    """Only execve can make one (``env '=x' ...``); the daemon refuses a request with it
    (INVALID_ENV), so the default must not send it."""
    command = needs_mark(uuid.uuid4().hex)
    done = cli("validate", "--json", "--", command, cwd=workspace, prefix=("env", "=x"))
    assert cli_validation(done)[1:] == (0, mark.encode())
    assert "airlock: warning: not passing a variable with an empty name" in done.stderr


def test_the_mcp_server_sends_its_environment_too(
    client: Client, workspace: Path, mark: str
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    command = needs_mark(uuid.uuid4().hex)
    got: dict[str, Any] = {}
    # The server is started with exactly this process's os.environ (see cli above).
    params = StdioServerParameters(command=AIRLOCK, args=["mcp"], env=dict(os.environ))

    async def main() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            args = {"command": command, "cwd": str(workspace)}
            got["validate"] = (await s.call_tool("validate", args)).structured_content
            got["run"] = (await s.call_tool("run", args)).structured_content

    anyio.run(main)
    assert got["validate"]["verdict"] == "allow" and got["run"]["exit_code"] == 0, got
    assert got["run"]["stdout"] == mark
    events = events_of(client, command)
    assert [s.event.kind for s in events] == [RpcKind.VALIDATE] + [RpcKind.EXECUTE] * 2
    assert {s.event.env_sha256 for s in events} == {env_sha256(caller_environment().items())}
