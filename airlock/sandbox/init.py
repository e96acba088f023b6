"""The sandbox's init and command processes: one small exec'd program, ``airlock-sandbox-init``.

pid 1 of the sandbox and the command's last steps before its exec (join the cgroup, shed
capabilities, wait for the run spec, become the caller, seccomp filters, exec) are carried
out by ``native/airlock-sandbox-init.c``, built by ``make install`` and into the wheel. The
supervisor starts it with ``posix_spawn`` (glibc: ``clone(CLONE_VM | CLONE_VFORK)``) right after
unsharing the pid namespace, so it is pid 1 there, and no copy of the supervisor's Python
image is made: two forks of a ~25 MB Python process per dry run were a quarter of its CPU
(docs/decisions.md §37).

This module is the program's other half: its arguments and descriptors (``spawn``), the run
spec's encoding (``encode_spec``); the reports it writes on the status pipe are read by
``contain._status`` ("R" set up; "S" and a wait status; "E", a kind, NUL, what failed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import proctrace
from airlock.sandbox.plan import InitOp, PivotRoot, Proc, ReadOnlyRebind, RunSpec

__all__ = ["HELPER", "InitFds", "arguments", "encode_spec", "spawn"]

# Built next to this module (make install: in the source tree; a wheel: in site-packages).
HELPER = str(Path(__file__).with_name("airlock-sandbox-init"))

# The program's descriptors (native/airlock-sandbox-init.c).
_FD_SPEC, _FD_STATUS, _FD_OUT, _FD_ERR, _FD_TRACE, _FD_PROCS = 10, 11, 12, 13, 14, 15
_MAX_PROCS = 16
# Sources are moved above every target first, so no dup2 overwrites a source still to come.
_ABOVE_TARGETS = 64
_SPEC_MAGIC = b"AIS1"


@dataclass(frozen=True)
class InitFds:
    """The supervisor's ends handed to init: the spec pipe's read end, the status pipe's and
    the output pipes' write ends, the cgroup.procs fds, the tracer channel's command end."""

    spec_r: int
    status_w: int
    out_w: int
    err_w: int
    procs: tuple[int, ...]
    trace: int = -1


def arguments(
    init_setup: tuple[InitOp, ...], seccomp_program: bytes, trace: bool, grace_ms: int = 0
) -> list[str]:
    """The program's argument list for a template (see the C file's header). ``grace_ms``: how
    long the processes the command leaves running may go on after it exited."""
    argv = ["airlock-sandbox-init"]
    for op in init_setup:
        match op:
            case Proc(target):
                argv += ["--proc", target]
            case ReadOnlyRebind(target):
                argv += ["--ro", target]
            case PivotRoot(new_root):
                argv += ["--pivot", new_root]
    argv += ["--last-cap", str(sc.last_capability())]
    if seccomp_program:
        argv += ["--seccomp", seccomp_program.hex()]
    if trace:
        argv += ["--trace", "--trace-filter", proctrace.filter_program().hex()]
    if grace_ms:
        argv += ["--grace-ms", str(grace_ms)]
    return argv


def spawn(argv: list[str], fds: InitFds) -> int:
    """Start the program as the next child (pid 1 after ``unshare(CLONE_NEWPID)``): its pid."""
    if len(fds.procs) > _MAX_PROCS:
        raise OSError(errno.E2BIG, f"init: more than {_MAX_PROCS} cgroup.procs descriptors")
    argv = [*argv, "--procs", str(len(fds.procs))]
    wanted = [
        (fds.spec_r, _FD_SPEC),
        (fds.status_w, _FD_STATUS),
        (fds.out_w, _FD_OUT),
        (fds.err_w, _FD_ERR),
        *((fd, _FD_PROCS + i) for i, fd in enumerate(fds.procs)),
    ]
    if fds.trace >= 0:
        wanted.append((fds.trace, _FD_TRACE))
    high: list[int] = []
    try:
        for source, _target in wanted:
            high.append(fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, _ABOVE_TARGETS))
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        ]
        actions += [
            (os.POSIX_SPAWN_DUP2, fd, target) for fd, (_s, target) in zip(high, wanted, strict=True)
        ]
        try:
            return os.posix_spawn(HELPER, argv, {}, file_actions=actions)
        except (FileNotFoundError, PermissionError) as exc:  # not built, or not executable
            raise OSError(
                exc.errno, f"{HELPER}: {exc.strerror} (built by `make install`, or in the wheel)"
            ) from None
    finally:
        for fd in high:
            os.close(fd)


def _strings(items: list[str]) -> bytes:
    out = b"\0".join(os.fsencode(s) for s in items) + b"\0"
    if out.count(0) != len(items):
        raise ValueError("a run spec's argument, variable or directory holds a NUL byte")
    return out


def encode_spec(spec: RunSpec) -> bytes:
    """What the command process reads: who, where, what to exec (the C file's header)."""
    groups = spec.groups
    head = struct.pack(
        f"=4s5I{len(groups)}I",
        _SPEC_MAGIC,
        spec.uid,
        spec.gid,
        len(groups),
        len(spec.argv),
        len(spec.env),
        *groups,
    )
    env = [f"{name}={value}" for name, value in spec.env]
    return head + _strings([spec.cwd, *spec.argv, *env])
