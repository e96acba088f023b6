"""Mounts: read the host's mount table, check a workspace, execute the plan's mount operations.

The one piece of the sandbox that reads the host's mount table (``host_mounts``) and makes
mounts (``execute``). ``workspace_conflict`` is the check that keeps the daemon's socket
and state out of any read-write bind: the request check calls it for an Execute's working
directory, and ``execute`` calls it again on the directory it is about to bind. Execute's
workspace is bound only if it is still the directory the request check resolved (its device
and inode, ``Bind.identity``), looked up again following no symbolic link.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Iterable

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


def _inspect(path: str) -> tuple[int, int, int, int]:
    """(file type, permission bits, uid, gid) of a mount's root; type 0 if root cannot stat it."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0o755, 0, 0
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def host_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[HostMount, ...]:
    """The host's mounts as this process sees them (``plan.parse_mountinfo``).

    Mount points are bytes to the kernel: one that is not UTF-8 (a Latin-1 USB label) is
    decoded with ``surrogateescape``, so ``os.fsencode`` gives its bytes back.
    """
    with open(mountinfo, "rb") as f:
        return parse_mountinfo(f.read().decode("utf-8", "surrogateescape"), _inspect)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _chain(path: str) -> list[str]:
    """``path`` (resolved) and every directory above it, up to ``/``."""
    out = [os.path.realpath(path)]
    while out[-1] != "/":
        out.append(posixpath.dirname(out[-1]))
    return out


def workspace_conflict(workspace: str | int, protected: Iterable[str]) -> str:
    """Why ``workspace`` must not be bound read-write into a sandbox, or "" if it may be.

    It must not contain one of the ``protected`` paths (the daemon's socket, its state
    directory), nor lie inside one: an Executed command would reach the daemon through its
    socket, or its state, as the caller's uid, in its own tree. Directories are compared by
    device and inode, not by spelling, so a symlink or another bind mount of the same
    directory is caught too. ``workspace`` is a path, or a descriptor (``O_PATH``) of the
    directory about to be bound, which is what the supervisor checks: the path may have
    changed since the request was checked. A protected path that does not exist is skipped.
    """
    where = f"/proc/self/fd/{workspace}" if isinstance(workspace, int) else workspace
    try:
        ws = os.stat(workspace)
        ws_chain = [os.stat(p) for p in _chain(where)]
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror or exc}"
    for path in protected:
        try:
            target = os.stat(path)
            above = [os.stat(p) for p in _chain(path)]
        except OSError:
            continue  # not there (yet): nothing of it can be exposed
        if any(_same(ws, d) for d in above):
            return f"it contains {path}"
        if stat.S_ISDIR(target.st_mode) and any(_same(d, target) for d in ws_chain):
            return f"it is inside {path}"
    return ""


def make_private() -> None:
    """Stop mount events from propagating back to the host (call first in a new mount ns)."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def _rebind_readonly(target: str) -> None:
    if not os.path.lexists(target):
        return
    sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC)
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _PROC_FLAGS)


# Execute's workspace: its path was resolved when the request was checked, so it has no link.
_EXACT = sc.OpenHow(
    os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
    0,
    sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS,
)


def _open_checked(source: str, identity: tuple[int, int]) -> int:
    """An O_PATH descriptor of the directory at ``source`` if it is ``identity``; else EPERM.

    One lookup, following no symbolic link: a component swapped for a link since the
    request was checked fails it (ELOOP), and a directory swapped for another (a rename)
    has another device and inode. Either way nothing is bound.
    """
    try:
        fd = sc.openat2(-100, os.fsencode(source), _EXACT)  # -100: AT_FDCWD
    except OSError as exc:
        raise OSError(
            errno.EPERM,
            f"refusing to bind {source} read-write: it is no longer the directory that was "
            f"checked ({exc.strerror})",
        ) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        raise OSError(
            errno.EPERM,
            f"refusing to bind {source} read-write: it is no longer the directory that was "
            "checked (another directory is there now)",
        )
    return fd


def _bind_writable(
    source: str,
    target: str,
    protected: tuple[str, ...],
    identity: tuple[int, int] | None = None,
) -> None:
    """Bind ``source`` read-write, unless it exposes a protected path.

    The directory is opened first and the check and the bind both use that descriptor, so
    a path component swapped for a symlink after the check cannot redirect the bind. With
    ``identity`` (Execute's workspace), it must be the very directory the request check
    resolved and checked (``_open_checked``).
    """
    if identity is not None:
        fd = _open_checked(source, identity)
    else:
        fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
    try:
        problem = workspace_conflict(fd, protected)
        if problem:
            raise OSError(errno.EPERM, f"refusing to bind {source} read-write: {problem}")
        sc.mount(f"/proc/self/fd/{fd}", target, None, sc.MS_BIND)
    finally:
        os.close(fd)


def _bind_flags(target: str, flags: int, readonly: bool) -> None:
    """Give a new bind mount its flags: a bind takes none of them when it is made.

    The remount sets the bind's own flags to exactly these (nosuid, nodev, read-only): the
    host mount's are not carried over, and the plan always asks for nosuid and nodev.
    """
    flags |= sc.MS_RDONLY if readonly else 0
    if flags:
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | flags)


def execute(op: MountOp | InitOp, protected: tuple[str, ...] = ()) -> None:
    """Carry out one plan operation; raises OSError naming the step on failure.

    ``protected`` (``SandboxTemplate.protected``): what no read-write bind may contain.
    """
    match op:
        case Tmpfs(target, options, flags):
            sc.mount("tmpfs", target, "tmpfs", flags, options)
        case Overlay(target, lower, upper, work, base, flags) if upper:
            data = f"lowerdir={lower},upperdir={upper},workdir={work},{_OVERLAY_OPTIONS}"
            sc.mount("overlay", target, "overlay", flags, data)
        case Overlay(target, lower, upper, work, base, flags):
            # No upper layer: read-only, and overlayfs then wants a second lower layer.
            data = f"lowerdir={lower}:{base},{_OVERLAY_OPTIONS}"
            sc.mount("overlay", target, "overlay", flags | sc.MS_RDONLY, data)
        case Bind(source, target, readonly, identity, flags) if not readonly and (
            protected or identity is not None
        ):
            _bind_writable(source, target, protected, identity)
            _bind_flags(target, flags, readonly)
        case Bind(source, target, readonly, _identity, flags):
            sc.mount(source, target, None, sc.MS_BIND)
            _bind_flags(target, flags, readonly)
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


def execute_step(op: MountOp | InitOp, protected: tuple[str, ...] = ()) -> None:
    """``execute``, with the failing operation named in the error."""
    try:
        execute(op, protected)
    except OSError as exc:
        raise OSError(exc.errno, f"{op}: {exc.strerror or exc}") from None
