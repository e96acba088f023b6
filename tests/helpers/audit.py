"""Audit events for tests: varied, deterministic, and the same in every module that uses them."""

from __future__ import annotations

import random

from airlock.audit import (
    Approval,
    AuditEvent,
    Authorization,
    Caller,
    Outcome,
    RpcKind,
    RuleDecision,
    env_sha256,
)
from airlock.types import Verdict

T0 = 1_700_000_000_000_000_000  # November 2023: time ranges of the tests are in the past
SESSIONS = ("s-a", "s-b", "s-c")
RULES = ("rm.recursive", "net.curl-pipe", "git.push-force", "sudo")


def event(i: int, **changes: object) -> AuditEvent:
    """A varied, deterministic event number ``i``."""
    rnd = random.Random(i)
    verdict = (Verdict.ALLOW, Verdict.ALLOW, Verdict.ASK, Verdict.DENY)[i % 4]
    rules = rnd.sample(RULES, rnd.choice((0, 0, 1, 2)))
    fields: dict[str, object] = {
        "kind": RpcKind(1 + i % 5),
        "caller": Caller(uid=1000 + i % 3, pid=4000 + i, gid=1000, exe="/usr/bin/python3"),
        "command": f"echo {i} > out{i}.txt",
        "cwd": "/home/u/src",
        "env_sha256": env_sha256([("HOME", "/home/u"), ("I", str(i))]),
        "findings": tuple(RuleDecision(r, verdict) for r in rules),
        "effects": f"1 file created: out{i}.txt",
        "verdict": verdict,
        "approval": (Approval(True, Authorization.USER_VERIFIED, "tty") if i % 5 == 1 else None),
        "outcome": Outcome(exit_code=0, applied_paths=(f"/home/u/src/out{i}.txt",))
        if i % 5 == 2
        else Outcome(),
        "validation_id": f"v{i}",
        "session_id": SESSIONS[i % 3],
        "time_ns": T0 + i * 1_000_000_000,
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]
