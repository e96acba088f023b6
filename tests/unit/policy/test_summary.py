"""The plain-language summary of a dry run."""

from __future__ import annotations

from airlock.policy.summary import summarize
from airlock.types import ChangeKind, FileChange, FileType, Termination


def _summary(*changes: FileChange) -> str:
    return summarize(
        changes=changes,
        changes_truncated=False,
        termination=Termination.EXITED,
        exit_code=0,
        signal=0,
        timeout_s=30,
        workspace="/w",
    )


def test_unreadable_changes_are_said_to_be_hidden_and_not_kept() -> None:
    readable = FileChange(b"/w/a", ChangeKind.CREATED, FileType.REGULAR, in_workspace=True)
    secret = FileChange(
        b"/w/s", ChangeKind.MODIFIED, FileType.REGULAR, in_workspace=True, unreadable=True
    )
    assert "may not read" not in _summary(readable)
    text = _summary(readable, secret)
    assert "1 changed file(s) hold content you may not read: not shown, not kept." in text
