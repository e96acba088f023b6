"""Raw Linux syscalls through ctypes: the only module in Airlock that uses ctypes.

Everything here is a thin, typed wrapper that raises ``OSError`` with the
errno on failure. Python 3.11 lacks ``os.unshare``/``os.setns`` (3.12+) and has
no ``mount``, ``pivot_root``, ``capset`` or ``prctl`` at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "clear_capabilities",
    "fork",
    "mount",
    "pivot_root",
    "set_no_new_privs",
    "set_parent_death_signal",
    "sethostname",
    "umount2",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155, "capset": 126},
    "aarch64": {"pivot_root": 41, "capset": 91},
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _syscall_number(name: str) -> int:
    try:
        return _SYSCALL_NUMBERS[platform.machine()][name]
    except KeyError:
        raise OSError(38, f"{name}: unsupported architecture {platform.machine()}") from None


def _b(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """``mount(2)``; the error names the target so a failed plan step is clear."""
    result = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    _check(result, f"mount {os.fsdecode(fstype or 'bind')} on {os.fsdecode(target)}")


def umount2(target: str | bytes, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {os.fsdecode(target)}")


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    result = _libc.syscall(_syscall_number("pivot_root"), _b(new_root), _b(put_old))
    _check(result, "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return int(_libc.prctl(option, arg2, arg3, 0, 0))


def set_no_new_privs() -> None:
    """Forbid privilege gain through execve (setuid bits, file capabilities)."""
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies."""
    _check(_prctl(_PR_SET_PDEATHSIG, signum), "prctl(PR_SET_PDEATHSIG)")


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


_LAST_CAP = _last_capability()  # read once: forks inherit it (0.3 ms per fresh read)


def last_capability() -> int:
    """The kernel's last capability number (``/proc/sys/kernel/cap_last_cap``, read once)."""
    return _LAST_CAP


def clear_capabilities() -> None:
    """Set the effective, permitted and inheritable sets to empty (``capset(2)``)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    result = _libc.syscall(_syscall_number("capset"), ctypes.byref(header), ctypes.byref(data))
    _check(result, "capset")


# --- seccomp, for airlock.sandbox.proctrace (appended block) ----------------------------------
#
# Installing a filter needs the seccomp(2) syscall (libc has no wrapper); everything else
# proctrace does with the filter's listener (ioctls, /proc/PID/mem) uses plain os/fcntl calls.

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

_SECCOMP_SYSCALL_NUMBERS = {"x86_64": 317, "aarch64": 277}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


class _SeccompNotifSizes(ctypes.Structure):
    _fields_ = [
        ("seccomp_notif", ctypes.c_uint16),
        ("seccomp_notif_resp", ctypes.c_uint16),
        ("seccomp_data", ctypes.c_uint16),
    ]


def _seccomp_number() -> int:
    try:
        return _SECCOMP_SYSCALL_NUMBERS[platform.machine()]
    except KeyError:
        raise OSError(38, f"seccomp: unsupported architecture {platform.machine()}") from None


def seccomp_set_filter(program: bytes, flags: int = 0) -> int:
    """Install a classic BPF program (8-byte ``sock_filter`` entries) as a seccomp filter.

    Needs no_new_privs (or CAP_SYS_ADMIN). Returns the syscall's result: with
    ``SECCOMP_FILTER_FLAG_NEW_LISTENER``, the listener's file descriptor (close-on-exec).
    """
    if not program or len(program) % 8 or len(program) // 8 > 4096:
        raise ValueError("a BPF program is 1 to 4096 eight-byte instructions")
    prog = _SockFprog(len(program) // 8, program)
    result = int(
        _libc.syscall(
            _seccomp_number(),
            ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(flags),
            ctypes.byref(prog),
        )
    )
    _check(result, "seccomp(SECCOMP_SET_MODE_FILTER)")
    return result


def seccomp_notif_sizes() -> tuple[int, int, int]:
    """The kernel's (seccomp_notif, seccomp_notif_resp, seccomp_data) sizes in bytes."""
    sizes = _SeccompNotifSizes()
    result = _libc.syscall(
        _seccomp_number(),
        ctypes.c_uint(_SECCOMP_GET_NOTIF_SIZES),
        ctypes.c_uint(0),
        ctypes.byref(sizes),
    )
    _check(result, "seccomp(SECCOMP_GET_NOTIF_SIZES)")
    return sizes.seccomp_notif, sizes.seccomp_notif_resp, sizes.seccomp_data


# --- fanotify, for airlock.sandbox.reads (appended block) -------------------------------------
#
# glibc wraps both calls; Python's stdlib has neither. Reading events is a plain os.read.

FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_MARK_ADD = 0x00000001
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_FILESYSTEM = 0x00000100
FAN_ACCESS = 0x00000001
FAN_OPEN = 0x00000020
FAN_OPEN_EXEC = 0x00001000
FAN_Q_OVERFLOW = 0x00004000

_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """``fanotify_init(2)``: a new notification group's descriptor. Needs CAP_SYS_ADMIN."""
    result = int(_libc.fanotify_init(flags, event_f_flags))
    _check(result, "fanotify_init")
    return result


def fanotify_mark(fd: int, flags: int, mask: int, path: str | bytes) -> None:
    """``fanotify_mark(2)`` on an absolute ``path`` (the error names it)."""
    result = int(_libc.fanotify_mark(fd, flags, mask, -100, _b(path)))  # -100: AT_FDCWD
    _check(result, f"fanotify_mark {os.fsdecode(path)}")


# --- renameat2 and syncfs, for airlock.apply (appended block) ---------------------------------
#
# Apply moves each new entry into place without replacing one that appeared meanwhile
# (RENAME_NOREPLACE), and makes a thousand written files durable with one syncfs
# instead of a thousand fsyncs. glibc wraps both; Python's os has neither.

RENAME_NOREPLACE = 1

_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    """``renameat2(2)``; EINVAL means the file system does not support ``flags``."""
    result = int(_libc.renameat2(old_dir_fd, old, new_dir_fd, new, flags))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2: {os.strerror(err)}", os.fsdecode(new))


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write out everything of the file system that holds ``fd``."""
    _check(int(_libc.syncfs(fd)), "syncfs")


# --- File-system credentials and openat2, for reading as the caller (appended block) ----------
#
# The diff and the changeset read file content with the caller's rights
# (airlock.sandbox.diff.CallerFiles). setfsuid, setfsgid and the raw setgroups syscall change
# the calling thread's credentials only (glibc's setgroups() would change every thread's), and
# an fsuid other than 0 takes the file-system capabilities (CAP_DAC_OVERRIDE, ...) out of the
# effective set until it is 0 again, unless SECBIT_NO_SETUID_FIXUP is set. openat2 resolves a
# whole relative path with the thread's credentials (search permission on every directory),
# refusing symbolic links, ".." and other mounts.

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
SECBIT_NO_SETUID_FIXUP = 0x04

_PR_GET_SECUREBITS = 27
_OPENAT2 = 437  # the same number on every architecture
_SETGROUPS = {"x86_64": 116, "aarch64": 159}

_libc.setfsuid.argtypes = [ctypes.c_uint32]
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsgid.argtypes = [ctypes.c_uint32]
_libc.setfsgid.restype = ctypes.c_int


class OpenHow(ctypes.Structure):
    """``struct open_how`` of ``openat2(2)``: flags, mode (0 unless creating) and resolve."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def setfsuid(uid: int) -> int:
    """Set this thread's file-system uid; returns the previous one.

    It reports no error: a refused change leaves the fsuid as it was, which the next
    call's result shows.
    """
    return int(_libc.setfsuid(uid))


def setfsgid(gid: int) -> int:
    """Set this thread's file-system gid; returns the previous one (see :func:`setfsuid`)."""
    return int(_libc.setfsgid(gid))


def setgroups_thread(groups: tuple[int, ...] | list[int]) -> None:
    """Set this thread's supplementary groups only (the raw syscall, not glibc's broadcast)."""
    try:
        number = _SETGROUPS[platform.machine()]
    except KeyError:
        raise OSError(38, f"setgroups: unsupported architecture {platform.machine()}") from None
    array = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), ctypes.byref(array))
    _check(int(result), "setgroups")


def securebits() -> int:
    """This thread's securebits (``PR_GET_SECUREBITS``)."""
    result = _prctl(_PR_GET_SECUREBITS)
    _check(result, "prctl(PR_GET_SECUREBITS)")
    return result


def openat2(dir_fd: int, path: bytes, how: OpenHow) -> int:
    """``openat2(2)``: open ``path`` relative to ``dir_fd`` as ``how`` says; a new descriptor."""
    result = int(
        _libc.syscall(
            ctypes.c_long(_OPENAT2),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return result


# --- fstatfs, for airlock.sandbox.workdir (appended block) ------------------------------------
#
# Which file system holds a working directory: a kernel one (procfs, sysfs, cgroup, ...) is
# never a workspace, whatever path leads to it (a symlink, a bind mount elsewhere). Python's os
# has statvfs, which does not report the file system's type.

_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int


def fstatfs_type(fd: int) -> int:
    """The magic number of the file system holding ``fd`` (``f_type`` of ``fstatfs(2)``)."""
    # struct statfs is 120 bytes on x86_64 and aarch64; f_type, a long, comes first.
    buf = ctypes.create_string_buffer(256)
    _check(int(_libc.fstatfs(fd, buf)), "fstatfs")
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


# --- setns, for airlock.sandbox.upstream (appended block) -------------------------------------
#
# The egress connector's threads move into the host's network namespace (a descriptor of it is
# kept from before the supervisor unshared), so that the sockets they open reach the host's
# network while the supervisor's own thread stays in the sandbox's. setns of a network
# namespace applies to the calling thread only.

_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (``setns(2)``)."""
    _check(int(_libc.setns(fd, nstype)), "setns")


# --- libnftables, for airlock.sandbox.netcap (appended block) ---------------------------------
#
# The sandbox's nftables rules are loaded with the library the nft binary is a front end of
# (same parser, same netlink batch: the ruleset listed afterwards is identical), which saves
# forking and exec'ing nft per sandbox (~3-9 ms wall, ~3 ms CPU on the 2-core VM). Loaded once
# by the spawner before it forks (load_libnftables), so supervisors do not dlopen it again.
# Where the library is missing, netcap runs the nft binary as before.
# Since decisions section 36 netcap sends a netlink batch built once instead (no parse, no
# library cache per sandbox); this block stays for bench/request_costs.py's comparison.

_NFT_CTX_DEFAULT = 0
_nftables: ctypes.CDLL | None = None
_nftables_looked_up = False


def load_libnftables() -> bool:
    """Load libnftables.so.1 (once); whether it is there."""
    global _nftables, _nftables_looked_up
    if not _nftables_looked_up:
        _nftables_looked_up = True
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            return False
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _nftables = lib
    return _nftables is not None


def nft_run(commands: bytes) -> None:
    """Run ``commands`` (what ``nft -f`` reads) in this network namespace with libnftables.

    Raises FileNotFoundError if the library is not installed (nothing was run), OSError with
    nft's message if the commands failed (a batch is all or nothing: then nothing changed).
    """
    if not load_libnftables() or _nftables is None:
        raise FileNotFoundError(errno.ENOENT, "libnftables.so.1 is not installed")
    lib = _nftables
    ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
    if not ctx:
        raise OSError(errno.ENOMEM, "nft_ctx_new failed")
    try:
        # Messages into buffers, never onto the process's stdout/stderr.
        if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
            raise OSError(errno.ENOMEM, "nft: cannot buffer its output")
        if lib.nft_run_cmd_from_buffer(ctx, commands) != 0:
            message = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise OSError(errno.EINVAL, message.strip() or "nft: the commands failed")
    finally:
        lib.nft_ctx_free(ctx)


# --- fork, for every process the sandbox forks (appended block) -----------------------------------
#
# After fork every page is shared copy-on-write, and each page the child (or the parent) then
# writes costs a page fault and a copy, ~4 us each on the 2-core VM. glibc's malloc sorts its
# unsorted free chunks (and merges the fast ones) on the first request it cannot serve from a
# cache or an exact fit: when that happens in a child, it writes to the header of every free
# chunk of the parent's heap, one fault per page they lie on (~370 in bench/ab.py's sandbox
# init, which inherits the supervisor's set-up garbage). One large request and its free in
# the parent just before the fork sorts them once, there (docs/performance.md, "Issue 16,
# page faults per fork").
_SETTLE_BYTES = 4096  # past the tcache (1032 B) and the small bins: malloc sorts everything


def fork() -> int:
    """``os.fork()``, with the parent's malloc free lists sorted first (see above)."""
    bytearray(_SETTLE_BYTES)  # allocated and freed at once: malloc's sorting is the point
    return os.fork()
