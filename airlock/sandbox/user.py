"""User identity: become the caller, with no capabilities and no way to gain any.

For Apply and the lost-work checker (Python processes). A sandbox's command does the same
steps, and first empties its bounding set and locks its securebits, in its init program
(native/airlock-sandbox-init.c, sandbox/init.py).
"""

from __future__ import annotations

import os

from airlock.sandbox import _syscalls


def become(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Switch to ``uid``/``gid``/``groups`` and shed the remaining privileges.

    Groups, gid, uid; then the capability sets are cleared (the locked
    securebits keep a uid change from doing it); then no_new_privs, so no setuid
    binary or file capability can raise them again.
    """
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _syscalls.clear_capabilities()
    _syscalls.set_no_new_privs()
