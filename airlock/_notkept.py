"""What to do when a dry run's changes were not kept for Apply, by why they were not.

A validation whose changes were not kept says why in ``changes_not_kept`` (the message of the
error that stopped keeping them, its reason in brackets, or the supervisor's sentence about
too many changes). Validating again helps only when the cause is gone by then: a quota full of
other validations' changes, a failure. It never helps when the run itself is the cause (more
changes than a dry run keeps, more bytes than one run may keep, a change Apply cannot make):
the same command would not be kept again. :func:`not_kept_advice` says which.

Stdlib only: the daemon's state store and the CLI's report both use it.
"""

from __future__ import annotations

import re

__all__ = ["not_kept_advice"]

# The supervisor's own sentence (sandbox/contain.py): "N changes are more than the M a dry run
# keeps for Apply; ...": it carries no reason.
_TOO_MANY = re.compile(r"\b\d+ changes are more than the \d+ a dry run keeps\b")
_REASON = re.compile(r"\[([A-Z][A-Z0-9_]*)\]\s*\.?\s*$")

_RUN = "validating again would not keep them: run the command with Execute (`airlock run`)"
_ADVICE = {
    # The run itself: the same command would not be kept again.
    "too many": _RUN + " or in smaller steps",
    "CHANGESET_QUOTA": _RUN + " or in smaller steps",
    "CHANGES_TRUNCATED": _RUN + " or in smaller steps",
    "CHANGESET_TREE_LIMIT": _RUN + " or in smaller steps",
    "CHANGES_UNREADABLE": _RUN,
    "CHANGESET_UNSUPPORTED": _RUN,
    "not kept": "this daemon keeps no changes: run the command with Execute (`airlock run`)",
    # The space other validations hold: freed by applying, discarding or expiry.
    "CHANGESET_QUOTA_EXCEEDED": (
        "apply or discard pending validations (`airlock pending`) or wait for them to expire, "
        "then validate again"
    ),
    "no space": "validate again once the daemon's state directory has free space",
}
_AGAIN = "validate again to keep them"


def not_kept_advice(why: str) -> str:
    """What to do about a dry run's changes not kept for Apply, ``why`` being the validation's
    ``changes_not_kept``: one plain clause, no final period ("validate again to keep them"
    when nothing says that cannot help)."""
    if _TOO_MANY.search(why):
        return _ADVICE["too many"]
    if why.startswith("the daemon does not keep changes"):
        return _ADVICE["not kept"]
    found = _REASON.search(why)
    reason = found.group(1) if found else ""
    if reason == "CHANGESET_QUOTA" and why.startswith("no space left"):
        return _ADVICE["no space"]  # the disk was full, not the run too large
    return _ADVICE.get(reason, _AGAIN)
