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


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


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
    )
