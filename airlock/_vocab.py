"""The few shared types ``airlock hook`` needs, in a module that imports nothing heavy.

``airlock hook`` runs before every shell command an agent issues; importing all of
:mod:`airlock.types` (two dozen frozen dataclasses, each made with ``exec``) cost it
about a fifth of its start-up (docs/performance.md section 11). These are defined here
and re-exported unchanged by :mod:`airlock.types`, which stays the one place to import them
from elsewhere: ``airlock.types.Verdict is airlock._vocab.Verdict``.
"""

from __future__ import annotations

import enum

__all__ = ["AGENT_LIMITS", "FindingSource", "Severity", "Verdict"]


class Verdict(enum.IntEnum):
    """The decision about a command, ordered from least to most strict."""

    ALLOW = 1
    ASK = 2
    DENY = 3


class Severity(enum.IntEnum):
    INFO = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5


class FindingSource(enum.IntEnum):
    BUILTIN = 1
    STATIC = 2
    DYNAMIC = 3


# The most UTF-8 bytes of each field of an AgentContext (``airlock.core.request`` refuses
# more: INVALID_AGENT_CONTEXT; the hooks cut to it). It is stored in the audit events of the
# call, so it is small.
AGENT_LIMITS = {
    "agent_name": 64,
    "agent_version": 64,
    "session_id": 256,
    "tool_use_id": 256,
    "tool_description": 1024,
    "transcript_path": 4096,
    "prompt_excerpt": 4096,
}
