"""User identity: become the caller, with no capabilities and no way to gain any."""

from __future__ import annotations

import os

from airlock.sandbox import _syscalls


def become(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Switch this process to ``uid``/``gid``/``groups`` and shed every privilege.

    The order is the checklist: bounding set and securebits while CAP_SETPCAP is
    still held; then groups, gid, uid; then the remaining capability sets; then
    no_new_privs so no setuid binary or file capability can raise them again.
    """
    _syscalls.drop_bounding_set()
    _syscalls.lock_securebits()
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _syscalls.clear_capabilities()
    _syscalls.set_no_new_privs()
