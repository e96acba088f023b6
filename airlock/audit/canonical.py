"""The canonical byte encoding of audit events, and the chain's hash.

This is everything an external verifier needs; ``docs/decisions.md`` ("The audit
log") states the same rules in prose.

**Event body.** An event is encoded as JSON text in UTF-8 with:

- object keys sorted (every key is ASCII, so byte, code point and UTF-16 order agree),
  no insignificant whitespace (separators ``,`` and ``:``);
- strings escaped as RFC 8785 (JCS) does: only ``"``, ``\\`` and U+0000..U+001F are
  escaped, the five with short forms as ``\\b \\t \\n \\f \\r`` and the rest as
  ``\\u00xx`` (lowercase hex); everything else is written as itself in UTF-8. A string
  that is not valid Unicode (a lone surrogate) cannot be encoded: convert bytes first
  with :func:`path_text`;
- no floats: integers in plain decimal (times are integer nanoseconds since the
  epoch), ``true``/``false``/``null``; enums by name (``"VALIDATE"``, ``"DENY"``);
- arrays in the event's order;
- keys added after the first version are written only when they hold something, so an
  older event is encoded as it always was: ``agent`` (the agent context of the call)
  and ``approval.approver`` (who approved, apart from who asked).

This is exactly ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` in Python, and agrees with RFC 8785 except that
integers are not limited to 2**53 (nanosecond times are larger).

**Chain hash.** Event ``seq`` (from 1) with the previous event's hash ``prev`` (64
``0`` for the first event) has::

    record = b"airlock-audit-v1\\n" + ascii(decimal seq) + b"\\n" + ascii(prev) + b"\\n" + body
    hash   = lowercase hex of SHA-256(record)            (unkeyed log)
           = lowercase hex of HMAC-SHA256(key, record)    (keyed log)

**Environment.** ``env_sha256`` is the SHA-256 of the ``NAME=VALUE\\0`` entries sorted
by their bytes and concatenated: the same as ``env -0 | LC_ALL=C sort -z | sha256sum``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from airlock.audit.model import (
    Approval,
    Approver,
    AuditEvent,
    Authorization,
    Caller,
    Outcome,
    RpcKind,
    RuleDecision,
)
from airlock.types import AgentContext, Finding, Verdict

__all__ = [
    "FORMAT",
    "GENESIS_HASH",
    "MalformedEvent",
    "chain_hash",
    "decode_event",
    "encode_event",
    "env_sha256",
    "key_id",
    "path_text",
    "record_hasher",
    "rule_decisions",
]

FORMAT = "airlock-audit-v1"
GENESIS_HASH = "0" * 64
_PREFIX = FORMAT.encode("ascii") + b"\n"
_E = TypeVar("_E", RpcKind, Verdict, Authorization)


class MalformedEvent(ValueError):
    """An event cannot be encoded (a non-integer time, a lone surrogate) or decoded."""


# --- Encoding ---------------------------------------------------------------------------------


def _int(name: str, value: object) -> int:
    if type(value) is not int:
        raise MalformedEvent(f"{name} must be an int, not {type(value).__name__}")
    return value


def _to_json(e: AuditEvent) -> dict[str, Any]:
    approval = None
    if e.approval is not None:
        approval = {
            "approved": bool(e.approval.approved),
            "authorization": Authorization(e.approval.authorization).name,
            "detail": e.approval.detail,
        }
        who = e.approval.approver
        if who is not None:
            approval["approver"] = {
                "asked_by_gid": _int("approver.asked_by_gid", who.asked_by_gid),
                "asked_by_uid": _int("approver.asked_by_uid", who.asked_by_uid),
                "authenticated_by": who.authenticated_by,
                "basis": who.basis,
                "gid": _int("approver.gid", who.gid),
                "uid": _int("approver.uid", who.uid),
            }
    exit_code = e.outcome.exit_code
    more: dict[str, Any] = {}
    if e.agent is not None:
        more["agent"] = {name: getattr(e.agent, name) for name in _AGENT_KEYS}
    return more | {
        "approval": approval,
        "caller": {
            "exe": e.caller.exe,
            "gid": _int("caller.gid", e.caller.gid),
            "pid": _int("caller.pid", e.caller.pid),
            "uid": _int("caller.uid", e.caller.uid),
        },
        "command": e.command,
        "cwd": e.cwd,
        "effects": e.effects,
        "env_sha256": e.env_sha256,
        "findings": [
            {"rule_id": f.rule_id, "verdict": Verdict(f.verdict).name} for f in e.findings
        ],
        "kind": RpcKind(e.kind).name,
        "outcome": {
            "applied_paths": list(e.outcome.applied_paths),
            "error": e.outcome.error,
            "exit_code": None if exit_code is None else _int("outcome.exit_code", exit_code),
        },
        "session_id": e.session_id,
        "time_ns": _int("time_ns", e.time_ns),
        "validation_id": e.validation_id,
        "verdict": None if e.verdict is None else Verdict(e.verdict).name,
    }


def encode_event(event: AuditEvent) -> bytes:
    """The canonical bytes of ``event`` (the body that is hashed and stored)."""
    try:
        text = json.dumps(
            _to_json(event),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MalformedEvent(
            f"a string of the event is not valid Unicode ({err.reason} at {err.start}); "
            "convert bytes with path_text()"
        ) from None
    except (TypeError, ValueError) as err:
        raise MalformedEvent(f"the event cannot be encoded: {err}") from None


# --- Decoding ---------------------------------------------------------------------------------


def _obj(value: object, keys: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedEvent(f"{where} is not an object")
    if value.keys() != keys:
        raise MalformedEvent(f"{where} has keys {sorted(value)}, expected {sorted(keys)}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedEvent(f"{where} is not a string")
    return value


def _opt_int(value: object, where: str) -> int | None:
    return None if value is None else _int(where, value)


def _enum(cls: type[_E], value: object, where: str) -> _E:
    try:
        return cls[_str(value, where)]
    except KeyError:
        raise MalformedEvent(f"{where} is not a {cls.__name__}: {value!r}") from None


_EVENT_KEYS = frozenset(
    {
        "approval",
        "caller",
        "command",
        "cwd",
        "effects",
        "env_sha256",
        "findings",
        "kind",
        "outcome",
        "session_id",
        "time_ns",
        "validation_id",
        "verdict",
    }
)
_CALLER_KEYS = frozenset({"exe", "gid", "pid", "uid"})
_APPROVAL_KEYS = frozenset({"approved", "authorization", "detail"})
_APPROVER_KEYS = frozenset(
    {"asked_by_gid", "asked_by_uid", "authenticated_by", "basis", "gid", "uid"}
)
_AGENT_KEYS = (
    "agent_name",
    "agent_version",
    "prompt_excerpt",
    "session_id",
    "tool_description",
    "tool_use_id",
    "transcript_path",
)
_OUTCOME_KEYS = frozenset({"applied_paths", "error", "exit_code"})
_FINDING_KEYS = frozenset({"rule_id", "verdict"})


def decode_event(body: str | bytes) -> AuditEvent:
    """The event whose canonical encoding is ``body``; MalformedEvent if it is not one."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedEvent(f"not JSON: {err}") from None
    agent = None
    if isinstance(raw, dict) and "agent" in raw:  # written since agent contexts exist
        raw = dict(raw)
        g = _obj(raw.pop("agent"), frozenset(_AGENT_KEYS), "agent")
        agent = AgentContext(**{k: _str(g[k], f"agent.{k}") for k in _AGENT_KEYS})
    d = _obj(raw, _EVENT_KEYS, "event")
    c = _obj(d["caller"], _CALLER_KEYS, "caller")
    o = _obj(d["outcome"], _OUTCOME_KEYS, "outcome")
    paths = o["applied_paths"]
    if not isinstance(paths, list):
        raise MalformedEvent("outcome.applied_paths is not an array")
    findings = d["findings"]
    if not isinstance(findings, list):
        raise MalformedEvent("findings is not an array")
    approval = None
    if d["approval"] is not None:
        approver = None
        if isinstance(d["approval"], dict) and "approver" in d["approval"]:
            a = dict(d["approval"])
            w = _obj(a.pop("approver"), _APPROVER_KEYS, "approval.approver")
            approver = Approver(
                uid=_int("approval.approver.uid", w["uid"]),
                gid=_int("approval.approver.gid", w["gid"]),
                asked_by_uid=_int("approval.approver.asked_by_uid", w["asked_by_uid"]),
                asked_by_gid=_int("approval.approver.asked_by_gid", w["asked_by_gid"]),
                basis=_str(w["basis"], "approval.approver.basis"),
                authenticated_by=_str(w["authenticated_by"], "approval.approver.authenticated_by"),
            )
        else:
            a = d["approval"]
        a = _obj(a, _APPROVAL_KEYS, "approval")
        if not isinstance(a["approved"], bool):
            raise MalformedEvent("approval.approved is not a boolean")
        approval = Approval(
            approved=a["approved"],
            authorization=_enum(Authorization, a["authorization"], "approval.authorization"),
            detail=_str(a["detail"], "approval.detail"),
            approver=approver,
        )
    decisions = []
    for i, item in enumerate(findings):
        f = _obj(item, _FINDING_KEYS, f"findings[{i}]")
        decisions.append(
            RuleDecision(
                rule_id=_str(f["rule_id"], f"findings[{i}].rule_id"),
                verdict=_enum(Verdict, f["verdict"], f"findings[{i}].verdict"),
            )
        )
    return AuditEvent(
        kind=_enum(RpcKind, d["kind"], "kind"),
        caller=Caller(
            uid=_int("caller.uid", c["uid"]),
            pid=_int("caller.pid", c["pid"]),
            gid=_int("caller.gid", c["gid"]),
            exe=_str(c["exe"], "caller.exe"),
        ),
        command=_str(d["command"], "command"),
        cwd=_str(d["cwd"], "cwd"),
        env_sha256=_str(d["env_sha256"], "env_sha256"),
        findings=tuple(decisions),
        effects=_str(d["effects"], "effects"),
        verdict=None if d["verdict"] is None else _enum(Verdict, d["verdict"], "verdict"),
        approval=approval,
        outcome=Outcome(
            exit_code=_opt_int(o["exit_code"], "outcome.exit_code"),
            applied_paths=tuple(_str(p, "outcome.applied_paths[]") for p in paths),
            error=_str(o["error"], "outcome.error"),
        ),
        validation_id=_str(d["validation_id"], "validation_id"),
        session_id=_str(d["session_id"], "session_id"),
        time_ns=_int("time_ns", d["time_ns"]),
        agent=agent,
    )


# --- Hashing ----------------------------------------------------------------------------------


def chain_hash(seq: int, prev_hash: str, body: bytes, key: bytes | None = None) -> str:
    """The hash of event ``seq``, chained to ``prev_hash`` (see the module docstring)."""
    record = b"%b%d\n%b\n%b" % (_PREFIX, seq, prev_hash.encode("ascii"), body)
    if key is None:
        return hashlib.sha256(record).hexdigest()
    return hmac.digest(key, record, "sha256").hex()


def record_hasher(key: bytes | None = None) -> Callable[[int, str, bytes], str]:
    """``chain_hash`` for many records, faster: the prefix and the key's pads are hashed once.

    HMAC as RFC 2104 defines it (inner and outer SHA-256 over the padded key), with the
    states after the pads copied for each record instead of recomputed.
    """
    keyed = key is not None
    raw_key = key or b""
    block = (hashlib.sha256(raw_key).digest() if len(raw_key) > 64 else raw_key).ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block) + _PREFIX if keyed else _PREFIX)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(seq: int, prev_hash: str, body: bytes) -> str:
        h = inner.copy()
        h.update(b"%d\n%b\n%b" % (seq, prev_hash.encode("ascii"), body))
        if not keyed:
            return h.hexdigest()
        o = outer.copy()
        o.update(h.digest())
        return o.hexdigest()

    return digest


def key_id(key: bytes) -> str:
    """A short public name of an HMAC key: tells a wrong key from a tampered log."""
    return hmac.digest(key, FORMAT.encode("ascii") + b" key id", "sha256").hex()[:16]


def env_sha256(env: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of the environment: ``NAME=VALUE\\0`` entries sorted by their bytes."""
    entries = sorted(
        k.encode("utf-8", "surrogateescape") + b"=" + v.encode("utf-8", "surrogateescape") + b"\0"
        for k, v in env
    )
    return hashlib.sha256(b"".join(entries)).hexdigest()


def path_text(raw: bytes) -> str:
    """A path as text for the log: UTF-8, any invalid byte written as ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


def rule_decisions(findings: Iterable[Finding]) -> tuple[RuleDecision, ...]:
    """The static findings of a validation, as the log keeps them."""
    return tuple(RuleDecision(rule_id=f.rule_id, verdict=f.verdict) for f in findings)
