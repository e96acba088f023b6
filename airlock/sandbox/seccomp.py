"""Seccomp: the system calls no sandboxed command needs, refused with EPERM.

The command already runs without capabilities and with no_new_privs, so most of
these calls would fail anyway. The filter is defence in depth against a kernel
bug reachable through them (the bulk of container escapes go through exactly
this surface: mount and namespace calls, bpf, io_uring, keyctl, userfaultfd,
perf_event_open). It is compiled once with libseccomp (``pyseccomp``) into
classic BPF in the daemon, carried in the inert sandbox template as bytes, and
installed by the command process with one ``seccomp(2)`` call right before its
``execve``: no library call happens in the sandbox.

Denied calls return EPERM rather than killing the process, so a program that
probes for a feature (``unshare`` in a test suite, io_uring in a runtime) falls
back instead of crashing. ``ptrace`` is denied outright: attaching to another
process is the concern, and a debugger in an agent's command is rare enough.
``clone`` with a namespace flag is refused too, and ``clone3`` answers ENOSYS
(its flags live in memory a filter cannot read) so the C library falls back to
``clone``.
Calls unknown to the running kernel's architecture table are skipped.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

from airlock.sandbox import _syscalls as sc

__all__ = ["DENIED_SYSCALLS", "deny_program", "install"]

# Grouped by what they would give a command; see docs/threat-model.md.
DENIED_SYSCALLS: tuple[str, ...] = (
    # Mounts and namespaces: the sandbox's shape is the supervisor's to decide.
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    # Kernel code and the running kernel.
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "syslog", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm",
    "quotactl", "quotactl_fd", "nfsservctl", "lookup_dcookie", "vhangup",
    # Attack surface with a history of exploitable bugs.
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
    "name_to_handle_at", "process_vm_readv", "process_vm_writev", "kcmp",
    "ptrace", "fanotify_init",
)  # fmt: skip
# New namespaces through clone(2) flags (a user namespace hands out capabilities inside it).
_NAMESPACE_FLAGS = (
    sc.CLONE_NEWNS, sc.CLONE_NEWUTS, sc.CLONE_NEWIPC, sc.CLONE_NEWPID, sc.CLONE_NEWNET,
    sc.CLONE_NEWCGROUP, 0x10000000,  # CLONE_NEWUSER
)  # fmt: skip


@functools.cache
def deny_program() -> bytes:
    """The filter as classic BPF bytes for this machine's architecture (compiled once)."""
    import pyseccomp  # type: ignore[import-untyped]  # libseccomp; only the daemon loads it

    f = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in dict.fromkeys(DENIED_SYSCALLS):
        try:
            f.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a system call of this architecture
    for flag in _NAMESPACE_FLAGS:
        f.add_rule(
            pyseccomp.ERRNO(errno.EPERM), "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag)
        )
    # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes the C library
    # fall back to clone(2), whose flags the rules above see (what Docker's profile does too).
    f.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, "seccomp: libseccomp produced no usable BPF program")
    return program


def install(program: bytes) -> None:
    """Install ``program`` in this process (needs no_new_privs); inherited across fork/exec."""
    sc.seccomp_set_filter(program)


def denied_in_this_process() -> bool:
    """Whether a denying filter is in force here (``Seccomp:`` 2 in /proc/self/status)."""
    with open(f"/proc/{os.getpid()}/status") as f:
        return any(line.split() == ["Seccomp:", "2"] for line in f)
