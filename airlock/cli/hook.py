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
codex    PermissionRequest, tool ``Bash``   nothing for allow (no decision: Codex asks
                                            the person as usual); ``decision``
                                            ``{"behavior": "deny", "message"}``
                                            otherwise. Never a grant
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
recorded in tests/data/hooks/<agent>.json (Codex's PermissionRequest in
codex-permission-request.json).

Codex runs ``airlock hook codex`` for two events, told apart by ``hook_event_name``:
PreToolUse before each shell command, and PermissionRequest when its own sandbox or
approval policy is about to ask the person to approve one (more access, network). The
answer to PermissionRequest never grants: Airlock judges whether a command may run, not
whether Codex may lift its own sandbox for it, so an allow is "no decision" (the person
decides in Codex's prompt), an ask or a deny is a deny, and so is every failure
(docs/decisions.md section 32). Codex itself treats a hook that fails, times out or
answers badly as no decision, which falls back to its prompt: never a grant either.

Start-up is kept light: the one call is made over HTTP/2 by :mod:`airlock.cli._h2call`
(``h2``, pure Python) without importing grpc, its two messages are written and read by
:mod:`airlock.cli._hookwire` without the protobuf runtime (which only the error path loads),
and the typed client (with its conversions) is not imported at all. Nor is
:mod:`airlock.types`: the few shared types used here come from :mod:`airlock._vocab`
(which ``airlock.types`` re-exports), and the daemon's answer is read into a
:class:`Judgement`; :func:`answer_verdict` takes it or an ``airlock.types.Validation``.
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol, TypeVar

from airlock._environ import caller_environment
from airlock._vocab import AGENT_LIMITS, FindingSource, Severity, Verdict
from airlock.cli import _h2call, _hookwire

if TYPE_CHECKING:
    from airlock._errors import AirlockError
    from airlock.types import AgentContext

# Nothing here imports airlock.types or airlock._errors on the allow path, nor defines a
# dataclass: they cost this process, which runs before every shell command, about a fifth of
# its start-up (docs/performance.md section 11). The error path imports the error tree.

__all__ = [
    "AGENTS",
    "DEFAULT_DEADLINE_S",
    "PERMISSION_REQUEST",
    "Answer",
    "HookError",
    "Judged",
    "JudgedFinding",
    "Judgement",
    "Request",
    "answer_error",
    "answer_verdict",
    "event_of",
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
# Codex's approval prompt for a shell command (tests/data/hooks/codex-permission-request.json).
PERMISSION_REQUEST = "PermissionRequest"
# Every event an agent's hook answers: its pre-shell event first (the form of an answer
# to input whose event cannot be read), then any other.
_EVENTS: dict[str, tuple[str, ...]] = {
    agent: (event, PERMISSION_REQUEST) if agent == "codex" else (event,)
    for agent, event in _EVENT.items()
}


class HookError(Exception):
    """The hook's input cannot be judged (the message is the one-line reason)."""


class Request:
    """What the agent is about to run, read from its hook JSON (immutable).

    ``agent`` (what the agent said about the call) is an ``airlock.types.AgentContext``,
    made when first read: the hook itself sends :meth:`agent_values`, so that it need not
    import ``airlock.types``.
    """

    __slots__ = ("_agent", "_agent_values", "command", "cwd", "session_id")
    command: str
    cwd: str
    session_id: str
    _agent: AgentContext | None
    _agent_values: dict[str, str] | None

    def __init__(
        self,
        command: str,
        cwd: str,
        session_id: str = "",
        agent: AgentContext | None = None,
        *,
        agent_values: Mapping[str, str] | None = None,
    ) -> None:
        if agent is not None:
            agent_values = {name: getattr(agent, name) for name in AGENT_LIMITS}
        init = object.__setattr__
        init(self, "command", command)
        init(self, "cwd", cwd)
        init(self, "session_id", session_id)
        init(self, "_agent", agent)
        init(self, "_agent_values", None if agent_values is None else dict(agent_values))

    @property
    def agent(self) -> AgentContext | None:
        if self._agent is None and self._agent_values is not None:
            from airlock.types import AgentContext

            object.__setattr__(self, "_agent", AgentContext(**self._agent_values))
        return self._agent

    def agent_values(self) -> dict[str, str] | None:
        """The agent context's fields by name (all of ``AGENT_LIMITS``'s), or None."""
        if self._agent_values is None:
            return None
        return {name: self._agent_values.get(name, "") for name in AGENT_LIMITS}

    def _key(self) -> tuple[str, str, str, dict[str, str] | None]:
        return (self.command, self.cwd, self.session_id, self.agent_values())

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Request) else NotImplemented

    def __hash__(self) -> int:
        return hash((self.command, self.cwd, self.session_id))

    def __repr__(self) -> str:
        return (
            f"Request(command={self.command!r}, cwd={self.cwd!r}, "
            f"session_id={self.session_id!r}, agent={self.agent_values()!r})"
        )

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"cannot assign to field {name!r}: a Request is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"cannot delete field {name!r}: a Request is immutable")


# The agent context each agent's hook input gives (docs: tests/data/hooks/<agent>.json):
# (agent name, {AgentContext field: (where in the input, key)}) with "" the top level and
# "tool_input" the tool call's input.
_AGENT_FIELDS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "claude": (
        "claude-code",
        {
            "session_id": ("", "session_id"),
            "tool_use_id": ("", "tool_use_id"),
            "tool_description": ("tool_input", "description"),
            "transcript_path": ("", "transcript_path"),
        },
    ),
    "codex": (
        "codex",
        {
            "session_id": ("", "session_id"),
            "tool_use_id": ("", "tool_use_id"),
            "tool_description": ("tool_input", "description"),  # PermissionRequest's
            "transcript_path": ("", "transcript_path"),
        },
    ),
    "gemini": (
        "gemini-cli",
        {
            "session_id": ("", "session_id"),
            "tool_description": ("tool_input", "description"),
            "transcript_path": ("", "transcript_path"),
        },
    ),
    "cursor": (
        "cursor",
        {
            "agent_version": ("", "cursor_version"),
            "session_id": ("", "conversation_id"),
            "tool_use_id": ("", "generation_id"),
        },
    ),
}


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (never inside a character)."""
    raw = text.encode("utf-8", "surrogatepass")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


def agent_context(agent: str, data: Mapping[str, Any]) -> AgentContext:
    """What ``agent``'s hook input says about the call, each field cut to its limit."""
    from airlock.types import AgentContext

    return AgentContext(**agent_values(agent, data))


def agent_values(agent: str, data: Mapping[str, Any]) -> dict[str, str]:
    """:func:`agent_context`'s fields by name (those the input gives), without the type."""
    name, fields = _AGENT_FIELDS[agent]
    values = {"agent_name": name}
    tool_input = data.get("tool_input")
    for field_name, (where, key) in fields.items():
        source = tool_input if where == "tool_input" else data
        if isinstance(source, dict):
            values[field_name] = _string(source, key).replace("\0", "")
    return {k: _cut(v, AGENT_LIMITS[k]) for k, v in values.items()}


class Answer(NamedTuple):
    """What the hook process writes and how it exits."""

    stdout: str
    exit_code: int = 0
    stderr: str = ""


# --- reading the agent's input ----------------------------------------------------------


def _string(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def event_of(agent: str, raw: str) -> str:
    """The event ``raw`` is for, among those ``agent``'s hook answers: what the answer's
    form follows. The agent's pre-shell event when the input names no other it answers
    (unreadable input included: :func:`parse_request` then says what is wrong)."""
    events = _EVENTS[agent]
    if len(events) > 1:
        try:
            data = json.loads(raw)
        except ValueError:
            return events[0]
        if isinstance(data, dict) and data.get("hook_event_name") in events:
            return str(data["hook_event_name"])
    return events[0]


def parse_request(agent: str, raw: str) -> Request:
    """The command in ``agent``'s hook JSON; :class:`HookError` if there is none to judge."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise HookError(f"the hook input is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise HookError("the hook input is not a JSON object")
    event = data.get("hook_event_name")
    if event is not None and event not in _EVENTS[agent]:
        raise HookError(
            f"airlock hook {agent} answers {' and '.join(_EVENTS[agent])} only, not {event!r}: "
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
    return Request(
        command=command, cwd=cwd, session_id=session, agent_values=agent_values(agent, data)
    )


# --- writing the agent's answer ---------------------------------------------------------


class _FindingLike(Protocol):
    @property
    def rule_id(self) -> str: ...
    @property
    def verdict(self) -> int: ...
    @property
    def severity(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def source(self) -> int: ...


class Judged(Protocol):
    """What an answer is made from: an ``airlock.types.Validation`` or a :class:`Judgement`."""

    @property
    def validation_id(self) -> str: ...
    @property
    def verdict(self) -> int: ...
    @property
    def summary(self) -> str: ...
    @property
    def findings(self) -> Sequence[_FindingLike]: ...


class JudgedFinding(NamedTuple):
    """The fields of an ``airlock.types.Finding`` the answer uses."""

    rule_id: str
    verdict: Verdict
    severity: Severity
    message: str
    source: FindingSource


class Judgement(NamedTuple):
    """The fields of an ``airlock.types.Validation`` the answer uses, as the daemon sent
    them (mapped as :mod:`airlock.api.convert` maps them), without importing ``airlock.types``.
    """

    validation_id: str
    verdict: Verdict
    summary: str
    findings: tuple[JudgedFinding, ...]


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    line = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in line)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def _main_finding(v: Judged) -> _FindingLike | None:
    if not v.findings:
        return None
    return max(v.findings, key=lambda f: (int(f.verdict), int(f.severity)))


def _after_approval(v: Judged) -> str:
    """What to do once a person has approved: ``airlock run --token`` when the static pass
    asked (Execute needs the token), else apply the changes the dry run showed. A question
    the dry run alone raised (changes outside the working directory, a process left running)
    is not one Execute answers: it runs the command for real with only the working directory
    writable, and needs no token for it."""
    static = any(f.source == FindingSource.STATIC and f.verdict >= Verdict.ASK for f in v.findings)
    if static:
        return "Then run it with: airlock run --token TOKEN -- COMMAND"
    return f"Then write the changes it showed with: airlock apply {v.validation_id}"


def reason_of(v: Judged, *, ask_as_deny: bool) -> str:
    """One line: what the command would do, the main finding and, for an ask, how to
    approve it."""
    summary = v.summary.strip().rstrip(".")
    parts = [summary or "no summary"]
    finding = _main_finding(v)
    # The daemon's summary of a policy verdict already names its main finding by rule id.
    if finding is not None and f"({finding.rule_id})" not in summary:
        parts.append(f"{finding.rule_id}: {finding.message.strip().rstrip('.')}")
    if v.verdict == Verdict.ALLOW:
        head = "Airlock allows this"
    elif v.verdict == Verdict.ASK:
        head = "Airlock asks a person before this runs"
        if ask_as_deny:
            head += "; it was not run"
        parts.append(f"To approve: airlock approve {v.validation_id}")
        if ask_as_deny:
            parts.append(_after_approval(v))
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


def _permission_request_deny(reason: str) -> str:
    return _json(
        {
            "hookSpecificOutput": {
                "hookEventName": PERMISSION_REQUEST,
                "decision": {"behavior": "deny", "message": reason},
            }
        }
    )


def _decide(agent: str, decision: str, reason: str, event: str | None = None) -> Answer:
    """``decision`` (allow / ask / deny) in ``agent``'s form for ``event`` (default: its
    pre-shell event); ask only where it exists."""
    if agent == "codex" and event == PERMISSION_REQUEST:
        # Never {"behavior": "allow"}: that would grant what Codex's own policy asks a
        # person about. An allow is no decision (empty stdout), so Codex asks the person.
        return Answer("" if decision == "allow" else _permission_request_deny(reason))
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


def answer_verdict(agent: str, v: Judged, event: str | None = None) -> Answer:
    """The agent's answer to a validation (verdicts compared by value: a
    :class:`Judgement` or an ``airlock.types.Validation``) for ``event`` (default: the
    agent's pre-shell event)."""
    can_ask = agent in ("claude", "cursor")
    reason = reason_of(v, ask_as_deny=not can_ask)
    if v.verdict == Verdict.ALLOW:
        return _decide(agent, "allow", reason, event)
    if v.verdict == Verdict.ASK and can_ask:
        return _decide(agent, "ask", reason, event)
    return _decide(agent, "deny", reason, event)


def answer_error(agent: str, why: str, event: str | None = None) -> Answer:
    """The agent's blocking answer when the command could not be judged."""
    return _decide(
        agent, "deny", _one_line(f"Airlock could not judge this, so it is blocked: {why}"), event
    )


# --- the handler --------------------------------------------------------------------------

Validator = Callable[[Request], Judged]


# The same default as airlock.client (a unit test checks), without importing the client:
# its conversions pull in the audit types, about a third of the hook's start-up.
_DEFAULT_SOCKET_PATH = "/run/airlock/airlock.sock"
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
VALIDATE_METHOD = "/airlock.v1.SandboxService/Validate"
_ERROR_DOMAIN = "airlock.dev"  # airlock.api.status.DOMAIN (a unit test checks)


def _class_of_code() -> dict[int, type[AirlockError]]:
    """gRPC status code -> the error class airlock.api.status maps it to (its _CLASS_OF_CODE,
    by number: a unit test checks they are the same), without importing grpc; made on the
    error path only."""
    from airlock import _errors as e

    return {
        1: e.Cancelled,
        2: e.AirlockError,
        3: e.InvalidRequest,
        5: e.NotFound,
        7: e.PermissionDenied,
        8: e.ResourceExhausted,
        9: e.FailedPrecondition,
        10: e.Conflict,
        13: e.SandboxError,
        14: e.Unavailable,
    }


_E = TypeVar("_E", bound=enum.IntEnum)


def _of(kind: type[_E], value: int, fallback: _E) -> _E:
    try:
        return kind(value)
    except ValueError:
        return fallback  # unspecified, or newer than this client: the strict side


def _reason_in(details: bytes) -> str | None:
    """The Airlock reason in a ``grpc-status-details-bin`` (a ``google.rpc.Status`` whose
    details hold an ``ErrorInfo`` of Airlock's domain), or None."""
    if not details:
        return None
    from google.rpc import error_details_pb2, status_pb2

    try:
        status = status_pb2.Status.FromString(details)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == _ERROR_DOMAIN and info.reason:
                    reason: str = info.reason
                    return reason
    except Exception:  # unreadable details: treat them as absent, as the typed client does
        return None
    return None


def error_of_call(e: _h2call.CallError, target: str) -> AirlockError:
    """The Airlock error a failed call stands for, as :func:`airlock.api.status.from_rpc_error`
    makes it from a grpc error: the daemon's class and reason when it sent them; otherwise
    the class of the code, with "cannot reach the daemon" for UNAVAILABLE and "did not answer
    in time" for DEADLINE_EXCEEDED."""
    from airlock._errors import AirlockError, Unavailable

    name = _h2call.code_name(e.code)
    message = e.message or name.replace("_", " ").lower()
    cls = _class_of_code().get(e.code, AirlockError)
    reason = _reason_in(e.details) if e.from_server else None
    if reason is not None:
        return cls(message, reason=reason)
    if e.code == _h2call.UNAVAILABLE:
        if e.errno == errno.EACCES:
            from airlock.api.status import _access_hint  # only on this error: it loads grpc

            return Unavailable(
                f"cannot reach the Airlock daemon at {target} ({message}): {_access_hint(target)}"
            )
        return Unavailable(
            f"cannot reach the Airlock daemon at {target} ({message}); is airlockd running?"
        )
    if e.code == _h2call.DEADLINE_EXCEEDED:
        return AirlockError(f"the Airlock daemon did not answer in time: {message}", reason=name)
    return cls(message, reason=name)


def daemon_validator(socket: str | None, deadline: float) -> Validator:
    """Judge a request with the daemon at ``socket``, waiting at most ``deadline`` seconds.

    The hook's one call is made without grpc, by :mod:`airlock.cli._h2call` (HTTP/2 with
    ``h2``), its two messages written and read without protobuf, by
    :mod:`airlock.cli._hookwire`, and only the fields the answer uses are read (the id,
    verdict, summary and findings, each mapped as :mod:`airlock.api.convert` maps them):
    ``import grpc`` and the typed client would cost this process, which runs before every
    shell command, about as much again as all the rest of its start-up, and the protobuf
    runtime a fifth (docs/performance.md section 11). Every failure of the call is an
    :class:`airlock.AirlockError`, as the typed client raises it.
    """
    path = os.path.abspath(socket or os.environ.get("AIRLOCK_SOCKET") or _DEFAULT_SOCKET_PATH)

    def validate(req: Request) -> Judgement:
        # The agent's environment, as the client and CLI send theirs by default; a variable the
        # API cannot carry is left out silently (stdout and stderr are the agent's to read).
        request = _hookwire.encode_validate_request(
            req.command, req.cwd, caller_environment(), req.session_id, req.agent_values()
        )
        try:
            raw = _h2call.unary(
                path, VALIDATE_METHOD, request, deadline, max_response=_MAX_RECEIVE_BYTES
            )
        except _h2call.CallError as e:
            raise error_of_call(e, path) from None
        try:
            # _h2call returns exactly the one message the length prefix announced, so this
            # reads a whole answer, never a truncated one.
            validation_id, verdict, summary, findings = _hookwire.decode_validate_response(raw)
        except _hookwire.WireError as e:
            from airlock._errors import AirlockError

            raise AirlockError(
                f"the daemon's answer cannot be read ({e})", reason="INTERNAL"
            ) from None
        return Judgement(
            validation_id=validation_id,
            verdict=_of(Verdict, verdict, Verdict.DENY),
            summary=summary,
            findings=tuple(
                JudgedFinding(
                    rule_id=rule_id,
                    verdict=_of(Verdict, f_verdict, Verdict.DENY),
                    severity=_of(Severity, severity, Severity.CRITICAL),
                    message=message,
                    source=_of(FindingSource, source, FindingSource.BUILTIN),
                )
                for rule_id, f_verdict, severity, message, source in findings
            ),
        )

    return validate


def handle(agent: str, raw: str, validate: Validator) -> Answer:
    """The answer to ``raw`` (the hook's stdin) for ``agent``. Never raises (but for
    KeyboardInterrupt and the like): every failure is the agent's blocking answer, in the
    form of the event ``raw`` is for (:func:`event_of`)."""
    event = _EVENTS[agent][0]
    try:
        event = event_of(agent, raw)
        req = parse_request(agent, raw)
        v = validate(req)
        if not isinstance(getattr(v, "verdict", None), Verdict) or not all(
            isinstance(getattr(v, name, None), str) for name in ("validation_id", "summary")
        ):
            return answer_error(agent, f"the daemon's answer is not a verdict: {v!r}", event)
        return answer_verdict(agent, v, event)
    except HookError as e:
        return answer_error(agent, str(e), event)
    except Exception as e:  # AirlockError (daemon down, deadline, audit...), or a bug
        text, tag = str(e), f"[{getattr(e, 'reason', '') or type(e).__name__}]"
        return answer_error(agent, text if tag in text else f"{text} {tag}", event)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock hook",
        description="Answer a coding agent's pre-shell hook (and Codex's PermissionRequest): "
        "read its JSON on stdin, ask the daemon, print the verdict in the agent's format. "
        "Fails closed.",
        epilog="To add this hook to the agent's settings (or remove it): "
        "airlock hook install|uninstall AGENT [--project DIR].",
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
        event = None
        if len(_EVENTS[agent]) > 1:  # the answer's form follows the input's event
            try:
                event = event_of(agent, sys.stdin.read())
            except Exception:  # unreadable: the pre-shell event's form
                event = None
        answer = answer_error(agent, "airlock hook was called with bad arguments", event)
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
