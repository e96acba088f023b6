"""Probe what this host's kernel offers, once, at daemon start."""

from __future__ import annotations

import os
from dataclasses import dataclass

from airlock.sandbox.cgroup import CgroupHost

__all__ = ["HostSupport", "probe"]

_NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time")


@dataclass(frozen=True)
class HostSupport:
    kernel_release: str
    namespaces: tuple[str, ...]
    overlayfs: bool
    seccomp: bool
    seccomp_user_notification: bool
    cgroups: CgroupHost
    # The proc connector (process events) serves only the initial pid and user namespaces.
    proc_connector: bool = False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# The kernel gives its initial namespaces fixed inode numbers (PROC_USER_INIT_INO and
# PROC_PID_INIT_INO in include/linux/proc_ns.h); /proc/1/ns may not be readable.
_INITIAL_NS_INODES = {"user": 0xEFFFFFFD, "pid": 0xEFFFFFFC}


def _in_initial_namespaces() -> bool:
    try:
        return all(
            os.stat(f"/proc/self/ns/{ns}").st_ino == ino for ns, ino in _INITIAL_NS_INODES.items()
        )
    except OSError:
        return False


def probe(cgroups: CgroupHost) -> HostSupport:
    namespaces = tuple(n for n in _NAMESPACES if os.path.exists(f"/proc/self/ns/{n}"))
    filesystems = {line.split()[-1] for line in _read("/proc/filesystems").splitlines() if line}
    actions = _read("/proc/sys/kernel/seccomp/actions_avail").split()
    status = _read("/proc/self/status")
    return HostSupport(
        kernel_release=os.uname().release,
        namespaces=namespaces,
        overlayfs="overlay" in filesystems,
        seccomp="Seccomp:" in status or bool(actions),
        seccomp_user_notification="user_notif" in actions,
        cgroups=cgroups,
        proc_connector=_in_initial_namespaces(),
    )
