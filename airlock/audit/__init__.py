"""The audit trail: an append-only, hash-chained log of every call that decides or acts.

- ``model``: the frozen types (``AuditEvent``, ``StoredEvent``, ``AuditFilter``, ...);
- ``canonical``: the canonical byte encoding and the chain's hash (what an external
  verifier reimplements);
- ``log``: ``AuditLog``, the SQLite store, and the optional HMAC key file.

Usage::

    with AuditLog.in_state_dir(state_dir) as log:
        stored = log.append(AuditEvent(kind=RpcKind.VALIDATE, caller=caller_of(peer), ...))
        page, token = log.list(AuditFilter(verdict=Verdict.DENY), page_size=50)
        result = log.verify(anchor)
"""

from __future__ import annotations

from airlock.audit.canonical import (
    GENESIS_HASH,
    chain_hash,
    decode_event,
    encode_event,
    env_sha256,
    path_text,
    rule_decisions,
)
from airlock.audit.log import (
    KEY_FILE,
    LOG_FILE,
    MAX_PAGE_SIZE,
    AuditError,
    AuditLog,
    caller_of,
    load_key,
    parse_anchor,
    read_events,
)
from airlock.audit.model import (
    Anchor,
    Approval,
    Approver,
    AuditEvent,
    AuditFilter,
    Authorization,
    Caller,
    Outcome,
    ProblemKind,
    RpcKind,
    RuleDecision,
    StoredEvent,
    VerifyProblem,
    VerifyResult,
)

__all__ = [
    "GENESIS_HASH",
    "KEY_FILE",
    "LOG_FILE",
    "MAX_PAGE_SIZE",
    "Anchor",
    "Approval",
    "Approver",
    "AuditError",
    "AuditEvent",
    "AuditFilter",
    "AuditLog",
    "Authorization",
    "Caller",
    "Outcome",
    "ProblemKind",
    "RpcKind",
    "RuleDecision",
    "StoredEvent",
    "VerifyProblem",
    "VerifyResult",
    "caller_of",
    "chain_hash",
    "decode_event",
    "encode_event",
    "env_sha256",
    "load_key",
    "parse_anchor",
    "path_text",
    "read_events",
    "rule_decisions",
]
