"""``airlock hook claude|codex|gemini|cursor``: answer a coding agent's pre-shell hook.

The agent runs this before each shell command with its hook JSON on stdin; this asks
the daemon (``--socket``, else ``$AIRLOCK_SOCKET``) and answers in the agent's format:

=======  =================================  ===========================================
agent    event (stdin)                      answer (stdout, exit 0)
=======  =================================  ===========================================
claude   PreToolUse, tool ``Bash``          ``hookSpecificOutput.permissionDecision``
                                            allow / ask / deny, with the reason
codex    PreToolUse, tool ``Bash``          nothing for allow; ``permissionDecision``
                                            deny with a non-empty reason otherwise
                                            (Codex takes no bare allow and no ask)
gemini   BeforeTool, ``run_shell_command``  ``{"decision": "allow"|"deny", "reason"}``
                                            (no ask: an ask is a deny)
cursor   beforeShellExecution               ``{"permission": "allow"|"ask"|"deny",
                                            "user_message", "agent_message"}``
=======  =================================  ===========================================

It fails closed: a daemon that is down or too slow, input it cannot read, another
event or tool than the agent's shell (the hook is meant to be registered for the shell
tool only, so anything else is a misconfiguration), or any error is answered with the
agent's blocking form and a one-line reason, never with an answer that lets it run.
Where the agent cannot ask (Codex, Gemini) an ask is a deny whose reason gives the
``airlock approve`` command. The sources these formats were checked against are
recorded in tests/data/hooks/<agent>.json.

Start-up is kept light: the gRPC client is imported only when a command is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airlock import types

__all__ = [
    "AGENTS",
    "DEFAULT_DEADLINE_S",
    "Answer",
    "HookError",
    "Request",
    "answer_error",
    "answer_verdict",
    "handle",
    "main",
    "parse_request",
]

AGENTS = ("claude", "codex", "gemini", "cursor")
# The daemon's answer must come before the agent gives up on the hook: an agent that
# kills a slow hook runs the command (Claude's default hook timeout is 60 s).
DEFAULT_DEADLINE_S = 45.0
_MAX_REASON = 600

_SHELL_TOOL = {"claude": "Bash", "codex": "Bash", "gemini": "run_shell_command"}
_EVENT = {
    "claude": "PreToolUse",
    "codex": "PreToolUse",
    "gemini": "BeforeTool",
    "cursor": "beforeShellExecution",
}


class HookError(Exception):
    """The hook's input cannot be judged (the message is the one-line reason)."""


@dataclass(frozen=True)
class Request:
    """What the agent is about to run, read from its hook JSON."""

    command: str
    cwd: str
    session_id: str = ""


@dataclass(frozen=True)
class Answer:
    """What the hook process writes and how it exits."""

    stdout: str
    exit_code: int = 0
    stderr: str = ""


# --- reading the agent's input ----------------------------------------------------------


def _string(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def parse_request(agent: str, raw: str) -> Request:
    """The command in ``agent``'s hook JSON; :class:`HookError` if there is none to judge."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise HookError(f"the hook input is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise HookError("the hook input is not a JSON object")
    event = data.get("hook_event_name")
    if event is not None and event != _EVENT[agent]:
        raise HookError(
            f"airlock hook {agent} answers {_EVENT[agent]} only, not {event!r}: "
            "register it for that event"
        )
    if agent == "cursor":
        command = _string(data, "command")
        cwd = _string(data, "cwd")
        roots = data.get("workspace_roots")
        if not cwd and isinstance(roots, list) and roots and isinstance(roots[0], str):
            cwd = roots[0]
        session = _string(data, "conversation_id")
    else:
        tool = data.get("tool_name")
        if tool != _SHELL_TOOL[agent]:
            raise HookError(
                f"airlock hook {agent} judges the shell tool {_SHELL_TOOL[agent]} only, "
                f"not {tool!r}: register it with that matcher"
            )
        tool_input = data.get("tool_input")
        if not isinstance(tool_input, dict):
            raise HookError("the hook input has no tool_input object")
        command = _string(tool_input, "command")
        cwd = _string(data, "cwd")
        if agent == "gemini":
            sub = _string(tool_input, "dir_path") or _string(tool_input, "directory")
            if sub and cwd:
                cwd = os.path.join(cwd, sub)
        session = _string(data, "session_id")
    if not command.strip():
        raise HookError("the hook input has no command")
    if not cwd or not os.path.isabs(cwd):
        raise HookError(f"the hook input has no absolute working directory (cwd: {cwd!r})")
    return Request(command=command, cwd=cwd, session_id=session)


# --- writing the agent's answer ---------------------------------------------------------


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    line = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in line)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def _main_finding(v: types.Validation) -> types.Finding | None:
    if not v.findings:
        return None
    return max(v.findings, key=lambda f: (f.verdict, f.severity))


def reason_of(v: types.Validation, *, ask_as_deny: bool) -> str:
    """One line: what the command would do, the main finding and, for an ask, how to
    approve it."""
    parts = [v.summary.strip().rstrip(".") or "no summary"]
    finding = _main_finding(v)
    if finding is not None:
        parts.append(f"{finding.rule_id}: {finding.message.strip().rstrip('.')}")
    if v.verdict is types.Verdict.ALLOW:
        head = "Airlock allows this"
    elif v.verdict is types.Verdict.ASK:
        head = "Airlock asks a person before this runs"
        if ask_as_deny:
            head += "; it was not run"
        parts.append(f"to approve: airlock approve {v.validation_id}")
        if ask_as_deny:
            parts.append("then run it with: airlock run --token TOKEN -- COMMAND")
    else:
        head = "Airlock denies this"
    return _one_line(f"{head}: " + ". ".join(parts) + ".")


def _json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def _pre_tool_use(decision: str, reason: str) -> str:
    return _json(
        {
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": decision,
                "permissionDecisionReason": reason,
            }
        }
    )


def _decide(agent: str, decision: str, reason: str) -> Answer:
    """``decision`` (allow / ask / deny) in ``agent``'s form; ask only where it exists."""
    if agent == "claude":
        return Answer(_pre_tool_use(decision, reason))
    if agent == "codex":
        # Codex fails open on a bare allow and on ask: allow is no output at all.
        return Answer("" if decision == "allow" else _pre_tool_use("deny", reason))
    if agent == "gemini":
        return Answer(
            _json({"decision": "allow" if decision == "allow" else "deny", "reason": reason})
        )
    return Answer(_json({"permission": decision, "user_message": reason, "agent_message": reason}))


def answer_verdict(agent: str, v: types.Validation) -> Answer:
    """The agent's answer to a validation."""
    can_ask = agent in ("claude", "cursor")
    reason = reason_of(v, ask_as_deny=not can_ask)
    if v.verdict is types.Verdict.ALLOW:
        return _decide(agent, "allow", reason)
    if v.verdict is types.Verdict.ASK and can_ask:
        return _decide(agent, "ask", reason)
    return _decide(agent, "deny", reason)


def answer_error(agent: str, why: str) -> Answer:
    """The agent's blocking answer when the command could not be judged."""
    return _decide(
        agent, "deny", _one_line(f"Airlock could not judge this, so it is blocked: {why}")
    )


# --- the handler --------------------------------------------------------------------------

Validator = Callable[[Request], types.Validation]


def _environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in os.environ.items():
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            continue  # the API carries UTF-8; such a variable is left out
        env[key] = value
    return env


def daemon_validator(socket: str | None, deadline: float) -> Validator:
    """Judge a request with the daemon at ``socket``, waiting at most ``deadline`` seconds."""

    def validate(req: Request) -> types.Validation:
        from airlock.client import Client  # grpc: imported only when there is a command

        with Client(socket, timeout=deadline) as client:
            return client.validate(
                req.command, cwd=req.cwd, env=_environment(), session_id=req.session_id
            )

    return validate


def handle(agent: str, raw: str, validate: Validator) -> Answer:
    """The answer to ``raw`` (the hook's stdin) for ``agent``. Never raises (but for
    KeyboardInterrupt and the like): every failure is the agent's blocking answer."""
    try:
        req = parse_request(agent, raw)
        v = validate(req)
        if not isinstance(v, types.Validation) or not isinstance(v.verdict, types.Verdict):
            return answer_error(agent, f"the daemon's answer is not a verdict: {v!r}")
        return answer_verdict(agent, v)
    except HookError as e:
        return answer_error(agent, str(e))
    except Exception as e:  # AirlockError (daemon down, deadline, audit...), or a bug
        text, tag = str(e), f"[{getattr(e, 'reason', '') or type(e).__name__}]"
        return answer_error(agent, text if tag in text else f"{text} {tag}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock hook",
        description="Answer a coding agent's pre-shell hook: read its JSON on stdin, ask the "
        "daemon, print the verdict in the agent's format. Fails closed.",
    )
    parser.add_argument("agent", choices=AGENTS, help="whose hook format to read and answer")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="the daemon's Unix socket (default: $AIRLOCK_SOCKET, else the system socket)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="how long to wait for the daemon, in seconds; keep it below the agent's hook "
        f"timeout (default {DEFAULT_DEADLINE_S:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``airlock hook`` with ``argv`` (the words after ``hook``); the exit status."""
    args_given = list(argv) if argv is not None else sys.argv[1:]
    agent = args_given[0] if args_given and args_given[0] in AGENTS else None
    try:
        args = _parser().parse_args(args_given)
    except SystemExit as e:
        if e.code in (0, None):
            return 0
        if agent is None:
            return 2  # no agent: no format to answer in; a usage error
        answer = answer_error(agent, "airlock hook was called with bad arguments")
        sys.stdout.write(answer.stdout)
        return answer.exit_code
    try:
        raw = sys.stdin.read()
    except Exception as e:  # undecodable bytes, a closed stdin
        answer = answer_error(args.agent, f"cannot read the hook input: {e}")
    else:
        answer = handle(args.agent, raw, daemon_validator(args.socket, args.timeout))
    if answer.stderr:
        sys.stderr.write(answer.stderr)
    sys.stdout.write(answer.stdout)
    sys.stdout.flush()
    return answer.exit_code


if __name__ == "__main__":
    sys.exit(main())
