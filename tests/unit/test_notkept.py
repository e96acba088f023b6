"""The advice after "changes not kept for Apply" (airlock/_notkept.py): it depends on why."""

from __future__ import annotations

import pytest

from airlock._notkept import not_kept_advice

RUN = "validating again would not keep them: run the command with Execute (`airlock run`)"
QUOTA = (
    "apply or discard pending validations (`airlock pending`) or wait for them to expire, "
    "then validate again"
)


@pytest.mark.parametrize(
    ("why", "advice"),
    [
        # More changes than --keep-changes-max: the same command has as many again.
        (
            "2502 changes are more than the 2000 a dry run keeps for Apply; run the command "
            "with Execute instead",
            RUN + " or in smaller steps",
        ),
        # More bytes than one run may keep (keep_changes_bytes, 256 MiB).
        (
            "the changes are larger than the space allowed for keeping them [CHANGESET_QUOTA]",
            RUN + " or in smaller steps",
        ),
        ("the change list was truncated [CHANGES_TRUNCATED]", RUN + " or in smaller steps"),
        ("a deleted directory is too large [CHANGESET_TREE_LIMIT]", RUN + " or in smaller steps"),
        ("a device node [CHANGESET_UNSUPPORTED]", RUN),
        ("content uid 1000 may not read [CHANGES_UNREADABLE]", RUN),
        # The space other validations hold: freed by applying, discarding or expiry.
        (
            "keeping the 100 bytes of changes of validation v2 would exceed the changeset quota "
            "(1000 of 1000 bytes in use); discard validations or wait for them to expire "
            "[CHANGESET_QUOTA_EXCEEDED]",
            QUOTA,
        ),
        (
            "no space left to keep the changes: [Errno 28] No space left on device "
            "[CHANGESET_QUOTA]",
            "validate again once the daemon's state directory has free space",
        ),
        (
            "the daemon does not keep changes",
            "this daemon keeps no changes: run the command with Execute (`airlock run`)",
        ),
        # A failure: it may well not happen again.
        ("cannot save the changes: I/O error [CHANGESET_FAILED]", "validate again to keep them"),
        ("something a newer daemon says [SOMETHING_NEW]", "validate again to keep them"),
    ],
)
def test_the_advice_depends_on_why_the_changes_were_not_kept(why: str, advice: str) -> None:
    assert not_kept_advice(why) == advice
    assert "\n" not in advice and not advice.endswith(".")
