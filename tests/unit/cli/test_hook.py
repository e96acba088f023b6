"""``airlock hook``: each agent's answer to allow / ask / deny, and that every failure is
that agent's blocking answer. No daemon: the validation is faked."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airlock import types
from airlock._errors import AirlockError, FailedPrecondition, SandboxError, Unavailable
from airlock.cli import hook
from airlock.cli.main import main as airlock_main

DATA = Path(__file__).resolve().parents[2] / "data" / "hooks"
AGENTS = hook.AGENTS
VID = "val-0123"


def fixture(agent: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"{agent}.json").read_text())
    return data


def stdin_for(agent: str, command: str = "ls", cwd: str = "/tmp") -> str:
    data = fixture(agent)["input"]
    if agent == "cursor":
        data["command"] = command
        data["cwd"] = cwd
    else:
        data["tool_input"]["command"] = command
        data["cwd"] = cwd
    return json.dumps(data)


def validation(verdict: types.Verdict) -> types.Validation:
    return types.Validation(
        validation_id=VID,
        verdict=verdict,
        summary="changes the mode of 3 files in the workspace",
        findings=(
            types.Finding(
                rule_id="info.read",
                verdict=types.Verdict.ALLOW,
                severity=types.Severity.INFO,
                message="reads files",
                source=types.FindingSource.STATIC,
            ),
            types.Finding(
                rule_id="fs.world-writable",
                verdict=verdict,
                severity=types.Severity.HIGH,
                message="makes files world-writable",
                source=types.FindingSource.DYNAMIC,
            ),
        ),
    )


def returning(v: types.Validation) -> Callable[[hook.Request], types.Validation]:
    def validate(req: hook.Request) -> types.Validation:
        return v

    return validate


def raising(e: BaseException) -> Callable[[hook.Request], types.Validation]:
    def validate(req: hook.Request) -> types.Validation:
        raise e

    return validate


def decision(agent: str, answer: hook.Answer) -> tuple[str, str]:
    """(allow|ask|deny|none, reason) as the agent reads the answer; asserts its shape."""
    assert answer.exit_code == 0
    assert answer.stderr == ""
    if answer.stdout == "":
        assert agent == "codex"
        return "none", ""
    assert answer.stdout.endswith("\n") and answer.stdout.count("\n") == 1
    out = json.loads(answer.stdout)
    if agent in ("claude", "codex"):
        assert set(out) == {"hookSpecificOutput"}
        spec = out["hookSpecificOutput"]
        assert set(spec) == {"hookEventName", "permissionDecision", "permissionDecisionReason"}
        assert spec["hookEventName"] == "PreToolUse"
        return spec["permissionDecision"], spec["permissionDecisionReason"]
    if agent == "gemini":
        assert set(out) == {"decision", "reason"}
        return out["decision"], out["reason"]
    assert set(out) == {"permission", "user_message", "agent_message"}
    assert out["user_message"] == out["agent_message"]
    return out["permission"], out["agent_message"]


# --- allow / ask / deny -----------------------------------------------------------------

EXPECTED = {
    # agent: (allow, ask, deny) as the agent reads them
    "claude": ("allow", "ask", "deny"),
    "codex": ("none", "deny", "deny"),
    "gemini": ("allow", "deny", "deny"),
    "cursor": ("allow", "ask", "deny"),
}


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("index,verdict", list(enumerate(types.Verdict)))
def test_verdicts(agent: str, index: int, verdict: types.Verdict) -> None:
    answer = hook.handle(agent, stdin_for(agent), returning(validation(verdict)))
    got, reason = decision(agent, answer)
    assert got == EXPECTED[agent][index]
    if got == "none":
        return
    assert "\n" not in reason
    assert "changes the mode of 3 files in the workspace" in reason
    # The main finding, not the informational one.
    assert "fs.world-writable: makes files world-writable" in reason
    assert "info.read" not in reason
    if verdict is types.Verdict.ASK:
        assert f"airlock approve {VID}" in reason
    else:
        assert "airlock approve" not in reason


def test_a_finding_the_summary_names_is_not_repeated() -> None:
    # The daemon's summary of a policy verdict names its main finding by rule id already.
    v = dataclasses.replace(
        validation(types.Verdict.DENY),
        summary="Policy denies: makes files world-writable (fs.world-writable) in `chmod -R 777 .`",
    )
    _got, reason = decision("claude", hook.handle("claude", stdin_for("claude"), returning(v)))
    assert reason.count("fs.world-writable") == 1, reason
    _got, reason = decision(
        "claude", hook.handle("claude", stdin_for("claude"), returning(validation(v.verdict)))
    )
    assert reason.count("fs.world-writable") == 1, reason


@pytest.mark.parametrize("agent", ["codex", "gemini"])
def test_ask_as_deny_says_it_was_not_run(agent: str) -> None:
    """The dry run asked (a DYNAMIC finding): once approved, Apply writes what it showed;
    `airlock run` would not (only the working directory is writable there, and Execute needs
    no token for what only the dry run questioned)."""
    answer = hook.handle(agent, stdin_for(agent), returning(validation(types.Verdict.ASK)))
    got, reason = decision(agent, answer)
    assert got == "deny"
    assert reason.startswith("Airlock asks a person before this runs; it was not run:")
    assert reason.endswith(
        f"To approve: airlock approve {VID}. Then write the changes it showed with: "
        f"airlock apply {VID}."
    )


@pytest.mark.parametrize("agent", ["codex", "gemini"])
def test_a_static_ask_is_run_with_the_token(agent: str) -> None:
    v = validation(types.Verdict.ASK)
    static = dataclasses.replace(v.findings[1], source=types.FindingSource.STATIC)
    v = dataclasses.replace(v, findings=(v.findings[0], static))
    got, reason = decision(agent, hook.handle(agent, stdin_for(agent), returning(v)))
    assert got == "deny"
    assert reason.endswith(
        f"To approve: airlock approve {VID}. Then run it with: "
        "airlock run --token TOKEN -- COMMAND."
    )


def test_request_is_read_from_each_format() -> None:
    seen: list[hook.Request] = []

    def validate(req: hook.Request) -> types.Validation:
        seen.append(req)
        return validation(types.Verdict.ALLOW)

    for agent in AGENTS:
        hook.handle(agent, stdin_for(agent, "echo hi", "/srv/w"), validate)
    assert [r.command for r in seen] == ["echo hi"] * 4
    assert [r.cwd for r in seen] == ["/srv/w"] * 4
    assert [r.session_id for r in seen] == [
        "abc123",
        "019a0000-0000-7000-8000-000000000000",
        "gemini-session-1",
        "conv-123",
    ]


def test_gemini_dir_path_and_cursor_workspace_root() -> None:
    seen: list[hook.Request] = []

    def validate(req: hook.Request) -> types.Validation:
        seen.append(req)
        return validation(types.Verdict.ALLOW)

    gemini = json.loads(stdin_for("gemini", cwd="/srv"))
    gemini["tool_input"]["dir_path"] = "sub"
    hook.handle("gemini", json.dumps(gemini), validate)
    cursor = json.loads(stdin_for("cursor"))
    cursor["cwd"] = ""
    cursor["workspace_roots"] = ["/srv/root"]
    hook.handle("cursor", json.dumps(cursor), validate)
    assert [r.cwd for r in seen] == ["/srv/sub", "/srv/root"]


def test_reason_is_one_line_and_bounded() -> None:
    v = types.Validation(
        validation_id=VID,
        verdict=types.Verdict.DENY,
        summary="line one\nline two\x1b[31m " + "x" * 2000,
    )
    _, reason = decision("claude", hook.answer_verdict("claude", v))
    assert "\n" not in reason and "\x1b" not in reason and "\\x1b" in reason
    assert len(reason) <= 600


# --- fail closed: every failure is the agent's blocking answer --------------------------


def _with(agent: str, **changes: Any) -> str:
    data = json.loads(stdin_for(agent))
    data.update(changes)
    return json.dumps(data)


def _tool_input(agent: str, tool_input: Any) -> str:
    if agent == "cursor":
        return _with(agent, command=tool_input)
    return _with(agent, tool_input=tool_input)


ok = returning(validation(types.Verdict.ALLOW))

FAILURES: dict[str, Callable[[str], tuple[str, Callable[[hook.Request], types.Validation]]]] = {
    "daemon down": lambda a: (
        stdin_for(a),
        raising(Unavailable("cannot connect to /run/airlock/airlock.sock")),
    ),
    "timeout": lambda a: (
        stdin_for(a),
        raising(AirlockError("did not answer in time", reason="DEADLINE_EXCEEDED")),
    ),
    "audit unavailable": lambda a: (
        stdin_for(a),
        raising(FailedPrecondition("the audit log is closed", reason="AUDIT_UNAVAILABLE")),
    ),
    "sandbox error": lambda a: (stdin_for(a), raising(SandboxError("no cgroup"))),
    "any exception": lambda a: (stdin_for(a), raising(RuntimeError("boom"))),
    "not a validation": lambda a: (stdin_for(a), lambda req: None),  # type: ignore[arg-type,return-value]
    "not JSON": lambda a: ("{not json", ok),
    "empty input": lambda a: ("", ok),
    "a JSON list": lambda a: ("[]", ok),
    "no command": lambda a: (_tool_input(a, "" if a == "cursor" else {}), ok),
    "blank command": lambda a: (_tool_input(a, "  " if a == "cursor" else {"command": " "}), ok),
    "command not a string": lambda a: (
        _tool_input(a, ["ls"] if a == "cursor" else {"command": ["ls"]}),
        ok,
    ),
    "relative cwd": lambda a: (_with(a, cwd="rel/dir"), ok),
    "another event": lambda a: (_with(a, hook_event_name="PostToolUse"), ok),
    "another tool": lambda a: (
        _with(a, tool_name="Write")
        if a != "cursor"
        else _with(a, hook_event_name="beforeReadFile"),
        ok,
    ),
    "no tool_input": lambda a: (
        _with(a, tool_input="ls") if a != "cursor" else _with(a, command=None),
        ok,
    ),
}


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("mode", list(FAILURES))
def test_every_failure_blocks(agent: str, mode: str) -> None:
    raw, validate = FAILURES[mode](agent)
    answer = hook.handle(agent, raw, validate)
    assert answer.exit_code == 0
    assert answer.stderr == ""
    got, reason = decision(agent, answer)
    assert got == "deny"
    assert reason.startswith("Airlock could not judge this, so it is blocked: ")
    assert "\n" not in reason and len(reason) > 50


def test_daemon_errors_name_their_reason() -> None:
    answer = hook.handle(
        "claude",
        stdin_for("claude"),
        raising(FailedPrecondition("the audit log is closed", reason="AUDIT_UNAVAILABLE")),
    )
    assert decision("claude", answer)[1].endswith("the audit log is closed [AUDIT_UNAVAILABLE]")


# --- the command line -------------------------------------------------------------------


def _run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    stdin: str,
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = airlock_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("agent", AGENTS)
def test_cli_no_daemon_blocks(
    agent: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real client, at a socket nobody serves: the blocking answer on stdout alone."""
    sock = str(tmp_path / "none.sock")
    code, out, err = _run(
        monkeypatch, capsys, ["hook", agent, "--socket", sock, "--timeout", "5"], stdin_for(agent)
    )
    assert code == 0 and err == ""
    got, reason = decision(agent, hook.Answer(out))
    assert got == "deny"
    assert "[UNAVAILABLE]" in reason or "[DEADLINE_EXCEEDED]" in reason


def test_cli_honours_airlock_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "from-env.sock")
    monkeypatch.setenv("AIRLOCK_SOCKET", sock)
    code, out, _ = _run(monkeypatch, capsys, ["hook", "claude"], stdin_for("claude"))
    assert code == 0
    assert sock in decision("claude", hook.Answer(out))[1]


def test_cli_bad_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An agent named: its blocking answer; none: a usage error (no format to answer in).
    code, out, _ = _run(monkeypatch, capsys, ["hook", "claude", "--timeout", "x"], "{}")
    assert code == 0 and decision("claude", hook.Answer(out))[0] == "deny"
    code, out, _ = _run(monkeypatch, capsys, ["hook", "nobody"], "{}")
    assert code == 2 and out == ""


def test_hook_is_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert airlock_main(["--help"]) == 0
    assert "hook" in capsys.readouterr().out


def test_fixtures_record_their_sources() -> None:
    for agent in AGENTS:
        data = fixture(agent)
        assert data["agent"] == agent
        assert data["checked_against"]
        for source in data["checked_against"]:
            assert source["url"].startswith("https://") and source["title"]
