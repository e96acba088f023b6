"""User identity: become the caller, with no capabilities and no way to gain any."""

from __future__ import annotations

import os

from airlock.sandbox import _syscalls


def shed_bounding_set() -> None:
    """Step 1, before anything is known of the request: nothing execve'd can gain capabilities.

    Empties the bounding and ambient sets and locks the securebits (uid 0 gains
    nothing at execve). Needs CAP_SETPCAP, so it comes before the uid change; the
    process keeps its permitted set (CAP_SETUID, ...) for :func:`become`.
    """
    _syscalls.drop_bounding_set()
    _syscalls.lock_securebits()


def become(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Step 2: switch to ``uid``/``gid``/``groups`` and shed the remaining privileges.

    Groups, gid, uid; then the capability sets are cleared (the locked
    securebits keep a uid change from doing it); then no_new_privs, so no setuid
    binary or file capability can raise them again.
    """
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _syscalls.clear_capabilities()
    _syscalls.set_no_new_privs()
