"""The audit trail's frozen types (candidates for ``airlock.types``).

An :class:`AuditEvent` is what one RPC (Validate, Approve, Apply, Discard, Execute)
contributes to the log (or, kind ``POLICY``, the operator's acceptance of a policy reload
that drops rules or files); the log stores it as a :class:`StoredEvent`, which adds its
place in the hash chain. The other types are the arguments and results of
``AuditLog.list`` and ``AuditLog.verify``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from airlock.types import AgentContext, Verdict

__all__ = [
    "Anchor",
    "Approval",
    "Approver",
    "AuditEvent",
    "AuditFilter",
    "Authorization",
    "Caller",
    "Outcome",
    "ProblemKind",
    "RpcKind",
    "RuleDecision",
    "StoredEvent",
    "VerifyProblem",
    "VerifyResult",
]


class RpcKind(enum.IntEnum):
    """The call an event records."""

    VALIDATE = 1
    APPROVE = 2
    APPLY = 3
    DISCARD = 4
    EXECUTE = 5
    POLICY = 6  # not a call: the operator accepted a policy reload that drops rules or files


class Authorization(enum.IntEnum):
    """Why an approval was given (or refused)."""

    USER_VERIFIED = 1  # a person confirmed it, through a channel the daemon verified
    SESSION_GRANTED = 2  # an earlier grant in the same session covers it
    POLICY_ALLOWED = 3  # the policy allows it without asking
    AUTO_APPROVED = 4  # the daemon's configuration approves it without asking


class ProblemKind(enum.IntEnum):
    """What ``verify`` found wrong with the chain."""

    EDITED = 1  # an event's hash does not match its contents (or the rule index disagrees)
    DELETED = 2  # a sequence number is missing, or an event does not link to the one before
    REORDERED = 3  # an intact event sits at a sequence number it was not written at
    TRUNCATED = 4  # the log ends before the anchor's event
    REWRITTEN = 5  # the event at the anchor's sequence number has another hash


@dataclass(frozen=True)
class Caller:
    """Who called: the kernel's peer credentials, and the executable of that pid."""

    uid: int
    pid: int
    gid: int = -1
    exe: str = ""  # /proc/PID/exe when the call arrived; "" if it could not be read


@dataclass(frozen=True)
class RuleDecision:
    """One static finding, as the log keeps it: the rule and its decision."""

    rule_id: str
    verdict: Verdict


@dataclass(frozen=True)
class Approver:
    """Who gave an approval and how the daemon knows, apart from who asked for it.

    The approver is the Approve call's caller, known by the kernel's credentials of its
    connection (SO_PEERCRED: ``authenticated_by`` "peer-credentials"); who asked is the
    validation's user. ``basis`` says why the approver may approve: "approver" (one of
    the daemon's approvers) or "self-approval" (its own ask; allow-self-approval is set).
    """

    uid: int
    gid: int
    asked_by_uid: int
    asked_by_gid: int
    basis: str
    authenticated_by: str = "peer-credentials"


@dataclass(frozen=True)
class Approval:
    approved: bool
    authorization: Authorization
    detail: str = ""  # who or what authorized it: a session grant, a policy rule, ...
    approver: Approver | None = None  # an Approve's approver (None in older events)


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None = None  # None: nothing ran
    applied_paths: tuple[str, ...] = ()
    error: str = ""  # the reason of a failed call (an AirlockError reason); "" on success


@dataclass(frozen=True)
class AuditEvent:
    """One call, as the audit log records it. Never holds environment values."""

    kind: RpcKind
    caller: Caller
    command: str = ""
    cwd: str = ""
    env_sha256: str = ""  # see ``airlock.audit.canonical.env_sha256``
    findings: tuple[RuleDecision, ...] = ()
    effects: str = ""  # a text summary of the effects (the dry run's changes)
    verdict: Verdict | None = None
    approval: Approval | None = None
    outcome: Outcome = field(default_factory=Outcome)
    validation_id: str = ""
    session_id: str = ""
    time_ns: int = field(default_factory=time.time_ns)  # nanoseconds since the epoch
    agent: AgentContext | None = None  # what made the agent ask, as it said (not verified)


@dataclass(frozen=True)
class StoredEvent:
    """An event in the log: its sequence number (from 1) and its links in the chain."""

    seq: int
    prev_hash: str  # the ``hash`` of event ``seq - 1``; 64 zeros for the first event
    hash: str  # hex SHA-256 (or HMAC-SHA256 with the log's key) of the canonical record
    event: AuditEvent


@dataclass(frozen=True)
class AuditFilter:
    """Which events ``list`` returns; every field set must match (None: any)."""

    since_ns: int | None = None  # time_ns >= since_ns
    until_ns: int | None = None  # time_ns < until_ns
    verdict: Verdict | None = None
    rule_id: str | None = None  # the event has a finding of this rule
    session_id: str | None = None
    uid: int | None = None  # the caller's uid
    agent_name: str | None = None  # the agent context's agent name
    tool_use_id: str | None = None  # the agent context's tool-use id


@dataclass(frozen=True)
class Anchor:
    """The head of the chain, kept somewhere the log's writer cannot rewrite.

    Its text form is ``SEQ:HASH``.
    """

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


@dataclass(frozen=True)
class VerifyProblem:
    kind: ProblemKind
    seq: int  # the first sequence number at which the chain is wrong
    detail: str


@dataclass(frozen=True)
class VerifyResult:
    events: int  # events checked and found intact, from seq 1
    head: Anchor | None  # the last intact event (None: the log is empty or seq 1 is bad)
    problem: VerifyProblem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None
