"""``airlock hook codex`` answering Codex's PermissionRequest (its approval prompt).

The answers are read here as Codex reads them (``codex_reads``, after
codex-rs/hooks/src/events/permission_request.rs, recorded in
tests/data/hooks/codex-permission-request.json): Airlock's allow is no decision, its ask and
deny are a deny, and no verdict and no failure is ever a grant. No daemon: the validation
is faked (tests/daemon/test_hook.py has the real one)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airlock import types
from airlock._errors import AirlockError, FailedPrecondition, SandboxError, Unavailable
from airlock.cli import hook, hookconf
from airlock.cli.main import main as airlock_main

DATA = Path(__file__).resolve().parents[2] / "data" / "hooks"
FIXTURE: dict[str, Any] = json.loads((DATA / "codex-permission-request.json").read_text())
VID = "val-0456"

Validate = Callable[[hook.Request], types.Validation]


def stdin(command: str = "rm -f /tmp/example", cwd: str = "/tmp", **changes: Any) -> str:
    data = json.loads(json.dumps(FIXTURE["input"]))
    data["tool_input"]["command"] = command
    data["cwd"] = cwd
    data.update(changes)
    return json.dumps(data)


def validation(verdict: types.Verdict) -> types.Validation:
    return types.Validation(
        validation_id=VID,
        verdict=verdict,
        summary="removes 1 file outside the workspace",
        findings=(
            types.Finding(
                rule_id="fs.delete-outside",
                verdict=verdict,
                severity=types.Severity.HIGH,
                message="deletes a file outside the workspace",
                source=types.FindingSource.DYNAMIC,
            ),
        ),
    )


def returning(v: types.Validation) -> Validate:
    return lambda req: v


def raising(e: BaseException) -> Validate:
    def validate(req: hook.Request) -> types.Validation:
        raise e

    return validate


def codex_reads(answer: hook.Answer) -> tuple[str, str]:
    """(allow | deny | none, message) as Codex's parse_completed reads the hook's exit code,
    stdout and stderr; "failed" (no decision either) for output it rejects."""
    if answer.exit_code == 2:
        return ("deny", answer.stderr.strip()) if answer.stderr.strip() else ("failed", "")
    if answer.exit_code != 0:
        return "failed", ""
    text = answer.stdout.strip()
    if not text:
        return "none", ""
    try:
        out = json.loads(text)
    except ValueError:
        return ("failed", "") if text[0] in "{[" else ("none", "")
    allowed_top = {
        "continue",
        "stopReason",
        "suppressOutput",
        "systemMessage",
        "hookSpecificOutput",
    }
    if not isinstance(out, dict) or set(out) - allowed_top:
        return "failed", ""
    if out.get("continue", True) is not True or "stopReason" in out or out.get("suppressOutput"):
        return "failed", ""
    spec = out.get("hookSpecificOutput")
    if spec is None:
        return "none", ""
    if set(spec) - {"hookEventName", "decision"} or "hookEventName" not in spec:
        return "failed", ""
    decision = spec.get("decision")
    if decision is None:
        return "none", ""
    known = {"behavior", "message", "updatedInput", "updatedPermissions", "addDirectories"}
    if set(decision) - (known | {"interrupt"}) or decision.get("behavior") not in (
        "allow",
        "deny",
    ):
        return "failed", ""
    if "updatedInput" in decision or "updatedPermissions" in decision or decision.get("interrupt"):
        return "failed", ""
    if decision["behavior"] == "allow":
        return "allow", ""
    message = (decision.get("message") or "").strip()
    return "deny", message or "PermissionRequest hook denied approval"


def shape(answer: hook.Answer) -> dict[str, Any]:
    """The deny as Airlock writes it: one line, PermissionRequest's own form, nothing else."""
    assert answer.exit_code == 0 and answer.stderr == ""
    assert answer.stdout.endswith("\n") and answer.stdout.count("\n") == 1
    out: dict[str, Any] = json.loads(answer.stdout)
    assert out == {
        "hookSpecificOutput": {
            "hookEventName": "PermissionRequest",
            "decision": {
                "behavior": "deny",
                "message": out["hookSpecificOutput"]["decision"]["message"],
            },
        }
    }
    return out


# --- the fixture ----------------------------------------------------------------------------


def test_the_fixture_records_its_sources() -> None:
    assert FIXTURE["agent"] == "codex" and FIXTURE["event"] == "PermissionRequest"
    assert FIXTURE["input"]["hook_event_name"] == hook.PERMISSION_REQUEST
    for source in FIXTURE["checked_against"]:
        assert source["url"].startswith("https://github.com/openai/codex/") and source["title"]
    assert FIXTURE["blocking_form"]["hookSpecificOutput"]["decision"]["behavior"] == "deny"


def test_the_request_is_read_from_permission_request_input() -> None:
    req = hook.parse_request("codex", stdin("echo hi", "/srv/w"))
    assert (req.command, req.cwd) == ("echo hi", "/srv/w")
    assert req.session_id == FIXTURE["input"]["session_id"]
    assert req.agent_values() == {
        "agent_name": "codex",
        "agent_version": "",
        "session_id": FIXTURE["input"]["session_id"],
        "tool_use_id": "",  # PermissionRequest carries none
        "tool_description": "remove the stale build marker",  # the request's justification
        "transcript_path": "/tmp/codex-transcript.jsonl",
        "prompt_excerpt": "",
    }


def test_the_event_picks_the_answers_form() -> None:
    assert hook.event_of("codex", stdin()) == "PermissionRequest"
    pre = json.loads((DATA / "codex.json").read_text())["input"]
    assert hook.event_of("codex", json.dumps(pre)) == "PreToolUse"
    for raw in ("{not json", "[]", stdin(hook_event_name="PostToolUse"), "{}"):
        assert hook.event_of("codex", raw) == "PreToolUse"
    assert hook.event_of("claude", stdin()) == "PreToolUse"  # only Codex answers it
    # The same verdict, each event in its own form.
    deny = returning(validation(types.Verdict.DENY))
    assert "permissionDecision" in hook.handle("codex", json.dumps(pre), deny).stdout
    shape(hook.handle("codex", stdin(), deny))


# --- allow / ask / deny ---------------------------------------------------------------------


def test_allow_is_no_decision_so_codex_asks_the_person() -> None:
    answer = hook.handle("codex", stdin(), returning(validation(types.Verdict.ALLOW)))
    assert answer == hook.Answer("")
    assert codex_reads(answer) == ("none", "")


def test_ask_is_a_deny_with_the_approve_command() -> None:
    answer = hook.handle("codex", stdin(), returning(validation(types.Verdict.ASK)))
    shape(answer)
    got, message = codex_reads(answer)
    assert got == "deny"
    assert message.startswith("Airlock asks a person before this runs; it was not run: ")
    assert "removes 1 file outside the workspace" in message
    assert "fs.delete-outside: deletes a file outside the workspace" in message
    assert message.endswith(  # the dry run asked: Apply writes what it showed
        f"To approve: airlock approve {VID}. Then write the changes it showed with: "
        f"airlock apply {VID}."
    )


def test_deny_is_a_deny_with_the_reason() -> None:
    answer = hook.handle("codex", stdin(), returning(validation(types.Verdict.DENY)))
    shape(answer)
    got, message = codex_reads(answer)
    assert got == "deny"
    assert message.startswith("Airlock denies this: removes 1 file outside the workspace.")
    assert "airlock approve" not in message


def test_a_network_approval_is_judged_by_its_command() -> None:
    """Codex's network approvals arrive as Bash too, with the command that made the request
    (or a synthetic ``network-access ...`` one): judged like any other command."""
    seen: list[hook.Request] = []

    def validate(req: hook.Request) -> types.Validation:
        seen.append(req)
        return validation(types.Verdict.DENY)

    raw = stdin(
        "curl https://example.com",
        tool_input={
            "command": "curl https://example.com",
            "description": "network-access example.com",
        },
    )
    assert codex_reads(hook.handle("codex", raw, validate))[0] == "deny"
    assert [r.command for r in seen] == ["curl https://example.com"]


# --- fail closed: never a grant --------------------------------------------------------------

ok = returning(validation(types.Verdict.ALLOW))


def not_a_validation(req: hook.Request) -> types.Validation:
    return None  # type: ignore[return-value]  # a daemon answer that is no verdict


FAILURES: dict[str, tuple[str, Validate]] = {
    "daemon down": (stdin(), raising(Unavailable("cannot connect to /run/airlock/airlock.sock"))),
    "timeout": (
        stdin(),
        raising(AirlockError("did not answer in time", reason="DEADLINE_EXCEEDED")),
    ),
    "audit unavailable": (
        stdin(),
        raising(FailedPrecondition("the audit log is closed", reason="AUDIT_UNAVAILABLE")),
    ),
    "sandbox error": (stdin(), raising(SandboxError("no cgroup"))),
    "any exception": (stdin(), raising(RuntimeError("boom"))),
    "not a validation": (stdin(), not_a_validation),
    "no command": (stdin(tool_input={}), ok),
    "blank command": (stdin(tool_input={"command": "  "}), ok),
    "command not a string": (stdin(tool_input={"command": ["rm", "x"]}), ok),
    "no tool_input": (stdin(tool_input="rm x"), ok),
    "relative cwd": (stdin(cwd="rel/dir"), ok),
    "no cwd": (stdin(cwd=""), ok),
    "another tool": (stdin(tool_name="apply_patch"), ok),
    "the old network tool name": (stdin(tool_name="NetworkAccess"), ok),
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_every_failure_is_a_deny(mode: str) -> None:
    raw, validate = FAILURES[mode]
    answer = hook.handle("codex", raw, validate)
    shape(answer)
    got, message = codex_reads(answer)
    assert got == "deny"
    assert message.startswith("Airlock could not judge this, so it is blocked: ")
    assert "\n" not in message and len(message) > 50


@pytest.mark.parametrize("raw", ["{not json", "", "[]", stdin(hook_event_name="PostToolUse")])
def test_unreadable_input_is_blocked_in_the_pre_shell_form(raw: str) -> None:
    """Input whose event cannot be read gets PreToolUse's deny; were it Codex's approval
    prompt after all, Codex reads that as a failed hook: no decision, never a grant."""
    answer = hook.handle("codex", raw, ok)
    out = json.loads(answer.stdout)
    assert out["hookSpecificOutput"]["permissionDecision"] == "deny"
    assert codex_reads(answer)[0] == "failed"


def test_no_verdict_and_no_failure_is_a_grant() -> None:
    answers = [hook.handle("codex", stdin(), returning(validation(v))) for v in types.Verdict] + [
        hook.handle("codex", raw, validate) for raw, validate in FAILURES.values()
    ]
    answers.append(hook.answer_error("codex", "anything", hook.PERMISSION_REQUEST))
    assert len(answers) == len(types.Verdict) + len(FAILURES) + 1
    assert all(codex_reads(a)[0] != "allow" for a in answers)
    assert all('"allow"' not in a.stdout for a in answers)


# --- the command line -----------------------------------------------------------------------


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], raw: str
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(raw))
    code = airlock_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_no_daemon_denies_the_approval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real client at a socket nobody serves: PermissionRequest's deny, exit 0."""
    sock = str(tmp_path / "none.sock")
    argv = ["hook", "codex", "--socket", sock, "--timeout", "5"]
    code, out, err = _run(monkeypatch, capsys, argv, stdin())
    assert code == 0 and err == ""
    answer = hook.Answer(out)
    shape(answer)
    got, message = codex_reads(answer)
    assert got == "deny" and ("[UNAVAILABLE]" in message or "[DEADLINE_EXCEEDED]" in message)


def test_cli_bad_arguments_deny_in_the_inputs_form(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(monkeypatch, capsys, ["hook", "codex", "--timeout", "x"], stdin())
    assert code == 0
    assert codex_reads(hook.Answer(out)) == (
        "deny",
        "Airlock could not judge this, so it is blocked: airlock hook was called with bad "
        "arguments",
    )
    shape(hook.Answer(out))


def test_install_registers_both_events() -> None:
    """The settings entry Codex needs for this answer to be asked at all."""
    assert hookconf.target("codex").events == ("PreToolUse", "PermissionRequest")
