"""Mounts: read the host's mount table and execute the plan's mount operations."""

from __future__ import annotations

import os
import stat

from airlock.sandbox import _syscalls as sc
from airlock.sandbox.plan import (
    Bind,
    Devpts,
    HostMount,
    InitOp,
    Mkdir,
    Mknod,
    MountOp,
    Overlay,
    PivotRoot,
    Proc,
    ReadOnlyRebind,
    Symlink,
    Sysfs,
    Tmpfs,
    parse_mountinfo,
)

_OVERLAY_OPTIONS = "redirect_dir=off,index=off,metacopy=off,xino=off"
_PROC_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


def _inspect(path: str) -> tuple[bool, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return False, 0o755, 0, 0
    return stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def host_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[HostMount, ...]:
    with open(mountinfo) as f:
        return parse_mountinfo(f.read(), _inspect)


def make_private() -> None:
    """Stop mount events from propagating back to the host (call first in a new mount ns)."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def _rebind_readonly(target: str) -> None:
    if not os.path.lexists(target):
        return
    sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC)
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _PROC_FLAGS)


def execute(op: MountOp | InitOp) -> None:
    """Carry out one plan operation; raises OSError naming the step on failure."""
    match op:
        case Tmpfs(target, options, flags):
            sc.mount("tmpfs", target, "tmpfs", flags, options)
        case Overlay(target, lower, upper, work):
            data = f"lowerdir={lower},upperdir={upper},workdir={work},{_OVERLAY_OPTIONS}"
            sc.mount("overlay", target, "overlay", 0, data)
        case Bind(source, target, readonly):
            sc.mount(source, target, None, sc.MS_BIND)
            if readonly:
                sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
        case ReadOnlyRebind(target):
            _rebind_readonly(target)
        case Mkdir(path, mode, uid, gid):
            os.mkdir(path, mode)
            if uid or gid:
                os.chown(path, uid, gid)
            os.chmod(path, mode)  # not subject to the umask; after chown, which clears setgid
        case Mknod(path, major, minor, mode):
            os.mknod(path, mode | 0o020000, os.makedev(major, minor))
            os.chmod(path, mode)
        case Symlink(target, path):
            os.symlink(target, path)
        case Proc(target):
            sc.mount("proc", target, "proc", _PROC_FLAGS)
        case Sysfs(target):
            sc.mount("sysfs", target, "sysfs", _PROC_FLAGS | sc.MS_RDONLY)
        case Devpts(target):
            sc.mount(
                "devpts",
                target,
                "devpts",
                sc.MS_NOSUID | sc.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620",
            )
        case PivotRoot(new_root):
            os.chdir(new_root)
            sc.pivot_root(".", ".")
            sc.umount2(".", sc.MNT_DETACH)
            os.chdir("/")


def execute_step(op: MountOp | InitOp) -> None:
    """``execute``, with the failing operation named in the error."""
    try:
        execute(op)
    except OSError as exc:
        raise OSError(exc.errno, f"{op}: {exc.strerror or exc}") from None
