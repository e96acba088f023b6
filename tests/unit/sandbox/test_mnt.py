"""mnt.workspace_conflict: a working directory that holds, or is inside, a protected path (binding
it on the kernel, in a daemon: tests/daemon/test_execute_isolation.py)."""

from __future__ import annotations

from airlock.sandbox import mnt


def test_workspace_conflict() -> None:
    assert mnt.workspace_conflict("/", ("/no/such/socket",)) == ""
    assert mnt.workspace_conflict("/", ("/proc/self",)) == "it contains /proc/self"
    assert mnt.workspace_conflict("/proc/self/fd", ("/proc/self",)) == "it is inside /proc/self"
    assert mnt.workspace_conflict("/usr", ("/proc/self",)) == ""
    assert "cannot inspect it" in mnt.workspace_conflict("/no/such/dir", ())
