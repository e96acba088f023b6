"""A request's working directory, resolved once, with the rights of the user it runs as.

A caller names its working directory by path, and a path can lead anywhere: through a
symbolic link to ``/proc/sys`` or ``/dev``, or into a directory that user may not enter.
:func:`resolve` opens the directory once, as the command's user (its uid, gid and
supplementary groups, switched on the calling thread only, for that one ``open``), and
reports what it found: the path with every link resolved, the directory's device and inode,
and whether it is on a kernel file system. Every later check reads that, and Execute's
sandbox binds exactly that directory: the supervisor opens the resolved path without
following any link and refuses it unless its device and inode are the ones checked
(``mnt.execute``, ``plan.Bind.identity``).

A directory that does not exist, is not a directory, or lies where the user may not search
gives one error, :class:`NotAccessible`, with nothing of the kernel's reason: the answer
tells nothing of what lies where the caller cannot look.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from airlock._errors import SandboxError
from airlock.sandbox import _syscalls as sc

__all__ = ["KERNEL_FS_MAGIC", "NotAccessible", "Workdir", "resolve"]

# File systems of the kernel's own interfaces (linux/magic.h), never a workspace. devtmpfs
# reports tmpfs's magic; it is told by its device instead (the one mounted on /dev).
KERNEL_FS_MAGIC = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1CD1: "devpts",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x6165676C: "pstore",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x42494E4D: "binfmt_misc",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x65735543: "fusectl",
    0x958458F6: "hugetlbfs",
    0x19800202: "mqueue",
    0x6E736673: "nsfs",
    0x67596969: "rpc_pipefs",
}
_TMPFS_MAGIC = 0x01021994
_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_AT_FDCWD = -100
_UNCHANGED = 0xFFFFFFFF  # setfsuid(-1) changes nothing and returns the current fsuid


class NotAccessible(Exception):
    """The user cannot enter the directory: it does not exist, is not a directory, lies
    below a directory the user may not search, or changed while it was being resolved."""


@dataclass(frozen=True)
class Workdir:
    """A working directory as :func:`resolve` found it."""

    path: str  # absolute, every symbolic link resolved, no "." or ".."
    dev: int
    ino: int
    fd: int  # an O_PATH descriptor of it, open inside ``resolve``'s ``with`` only
    kernel_fs: str  # the kernel file system it is on ("proc", "devtmpfs", ...), or ""

    @property
    def identity(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@contextlib.contextmanager
def resolve(path: str, uid: int, gid: int, groups: tuple[int, ...]) -> Iterator[Workdir]:
    """Open the directory ``path`` (absolute) as ``uid``/``gid``/``groups``; yield what it is.

    The user must be able to search the directory itself and every directory on the way
    (links are followed, as ``chdir`` would). Raises :class:`NotAccessible` if it cannot,
    :class:`airlock.SandboxError` if this thread could not take the user's rights.
    """
    fd = _open_as(os.fsencode(path) + b"/.", uid, gid, groups)
    try:
        st = os.fstat(fd)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            here = os.lstat(real)
        except OSError:
            raise NotAccessible(path) from None
        # A directory removed, moved or covered by a mount while being resolved: the path is
        # no longer the directory (a deleted one reads as "PATH (deleted)").
        if not real.startswith("/") or not stat.S_ISDIR(here.st_mode) or not _same(st, here):
            raise NotAccessible(path)
        yield Workdir(real, st.st_dev, st.st_ino, fd, _kernel_fs(fd, st))
    finally:
        os.close(fd)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _kernel_fs(fd: int, st: os.stat_result) -> str:
    magic = sc.fstatfs_type(fd)
    if magic in KERNEL_FS_MAGIC:
        return KERNEL_FS_MAGIC[magic]
    if magic == _TMPFS_MAGIC:
        with contextlib.suppress(OSError):
            dev, root = os.stat("/dev"), os.stat("/")
            if dev.st_dev != root.st_dev and st.st_dev == dev.st_dev:
                return "devtmpfs"  # the file system mounted on /dev, wherever it is reached
    return ""


def _open_as(path: bytes, uid: int, gid: int, groups: tuple[int, ...]) -> int:
    """``open(path, O_PATH | O_DIRECTORY)`` with the file-system rights of ``uid``.

    uid 0 opens with root's own rights (a root command may enter any directory). A daemon
    that is not root (tests) cannot take anyone's rights and runs no command as another
    user: it opens with its own. Otherwise this thread takes ``groups`` and ``gid``, and
    ``uid`` as its file-system uid around the one ``open`` (which drops root's file-system
    capabilities: the kernel checks search permission on every directory, ACLs included),
    then gives them back; every switch is verified.
    """
    if uid == 0 or os.geteuid() != 0:
        return _open(path)
    if sc.securebits() & sc.SECBIT_NO_SETUID_FIXUP or sc.setfsuid(_UNCHANGED) != 0:
        raise _switch_failed()  # the fsuid would not drop root's capabilities
    saved_groups = os.getgroups()
    sc.setgroups_thread(groups)
    saved_gid = sc.setfsgid(gid)
    try:
        if sc.setfsgid(gid) != gid:
            raise _switch_failed()
        before = sc.setfsuid(uid)
        try:
            fd = _open(path)
        finally:
            during = sc.setfsuid(0)
        if before != 0 or during != uid:
            os.close(fd)
            raise _switch_failed()
        return fd
    finally:
        sc.setfsuid(0)
        sc.setfsgid(saved_gid)
        sc.setgroups_thread(saved_groups)


def _open(path: bytes) -> int:
    """Open ``path`` refusing "magic" links (``/proc/PID/cwd``, ``/proc/PID/fd/N``, ...) on
    the way: the kernel lets a thread with ``CAP_SYS_PTRACE`` (root's, which ``setfsuid``
    keeps) follow another process's links straight into a directory below one the caller may
    not search, which would tell the caller where that process is and what exists there."""
    try:
        return sc.openat2(_AT_FDCWD, path, sc.OpenHow(_FLAGS, 0, sc.RESOLVE_NO_MAGICLINKS))
    except OSError as exc:
        if exc.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE):
            raise  # the daemon's trouble, not the directory's
        raise NotAccessible(os.fsdecode(path[:-2])) from None


def _switch_failed() -> SandboxError:
    return SandboxError("cannot take the caller's file-system rights to look up its cwd")
