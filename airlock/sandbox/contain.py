"""Contain: run one plan, top to bottom. The sandbox set-up reads as a checklist.

Three processes take part in one dry run::

    supervisor (forked by the spawner; root; new mnt/net/ipc/uts namespaces; owns the scratch tmpfs)
     └── init   (pid 1 of a new pid namespace; its own copy of the mount namespace; pivots into the
         │       overlay root; reaps orphans; its death kills every process in the sandbox)
         └── command (bash -c COMMAND as the caller's uid/gid, no capabilities, no_new_privs)

The supervisor never enters the sandbox's root, so after the command's whole
process tree is gone it still sees the overlay's upper layers and computes the
diff; then it exits and the kernel frees every mount with its namespace. No
mount is ever made in the host's mount namespace, so nothing can leak there,
even if the daemon is killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import time
from dataclasses import dataclass

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import mnt, net, user
from airlock.sandbox.cgroup import Cgroup, CgroupStats
from airlock.sandbox.diff import DiffResult, compute_changes
from airlock.sandbox.plan import SandboxPlan
from airlock.types import Termination

__all__ = ["SandboxResult", "supervise"]

_READ_CHUNK = 65536
# After the command ends, how long stray output may keep its pipes open (it cannot: the pid
# namespace is gone; this only bounds a kernel that is slow to tear it down).
_DRAIN_S = 5.0


@dataclass(frozen=True)
class SandboxResult:
    """What the supervisor reports back for one plan."""

    termination: Termination = Termination.EXITED
    exit_code: int = -1
    signal: int = 0
    stdout: bytes = b""
    stdout_truncated: bool = False
    stderr: bytes = b""
    stderr_truncated: bool = False
    diff: DiffResult | None = None
    cgroup: CgroupStats | None = None
    setup_s: float = 0.0
    command_s: float = 0.0
    diff_s: float = 0.0
    # Set when the sandbox could not be set up: nothing (or not the command) ran.
    error: str = ""
    # "cwd" when the caller cannot enter the working directory, else "setup".
    error_kind: str = ""


class _Capture:
    """One output stream, kept up to a limit and drained past it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _report(fd: int, tag: bytes, payload: bytes) -> None:
    _write_all(fd, tag + payload)


def _exec_command(
    plan: SandboxPlan, out_w: int, err_w: int, error_w: int, procs: list[int]
) -> None:
    """In the command process: join the cgroup, wire stdio, become the caller, exec bash.

    Never returns. Writing "0" to an inherited ``cgroup.procs`` descriptor moves the
    writer itself, so the command is limited from its first instruction while init
    stays outside the cgroup (its death is what kills the sandbox; the OOM killer
    must never pick it).
    """
    step = "cgroup"
    try:
        for fd in procs:
            os.write(fd, b"0")
        step = "stdio"
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(error_w, 3, inheritable=False)
        os.closerange(4, 1 << 16)  # defence in depth: every other fd is close-on-exec already
        step = "uid"
        user.become(plan.uid, plan.gid, plan.groups)
        step = "cwd"
        os.chdir(plan.cwd)
        step = "exec"
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(plan.argv[0], list(plan.argv), dict(plan.env))
    except BaseException as exc:
        kind = b"cwd" if step == "cwd" else b"setup"
        os.write(
            3 if step not in ("cgroup", "stdio") else error_w,
            kind + b"\0" + f"{step}: {exc}".encode(errors="replace"),
        )
    os._exit(127)


def _init(plan: SandboxPlan, status_w: int, out_w: int, err_w: int, procs: list[int]) -> None:
    """Pid 1 of the sandbox. Reports the command's wait status, then exits. Never returns."""
    error_r, error_w = os.pipe()
    try:
        sc.set_parent_death_signal(signal.SIGKILL)
        sc.unshare(sc.CLONE_NEWNS)  # pivot_root below must not move the supervisor's root
        for op in plan.init_setup:
            mnt.execute_step(op)
        child = os.fork()
        if child == 0:
            os.close(error_r)
            _exec_command(plan, out_w, err_w, error_w, procs)
        for fd in (error_w, out_w, err_w, *procs):
            os.close(fd)
        failure = os.read(error_r, 4096)  # empty once exec succeeded (close-on-exec)
        while True:
            pid, status = os.wait()  # reaps orphans too, as a pid 1 must
            if pid == child:
                break
        if failure:
            _report(status_w, b"E", failure)
        else:
            _report(status_w, b"S", struct.pack("=i", status))
    except BaseException as exc:
        _report(status_w, b"E", f"setup\0sandbox init: {exc}".encode(errors="replace"))
    os._exit(0)


def _run_command(
    plan: SandboxPlan, cancel_fd: int, cgroup: Cgroup
) -> tuple[Termination, int, int, _Capture, _Capture, str, str, float]:
    """Start init and the command; watch output, the deadline and cancellation."""
    procs = [
        os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in cgroup.paths
    ]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, err_r, status_r, cancel_fd):
            os.close(fd)
        _init(plan, status_w, out_w, err_w, procs)
    for fd in (out_w, err_w, status_w, *procs):
        os.close(fd)
    stdout, stderr = _Capture(plan.output_bytes), _Capture(plan.output_bytes)
    status_msg = bytearray()
    forced: Termination | None = None
    try:
        deadline = started + plan.timeout_s
        poller = select.poll()
        streams = {out_r: stdout, err_r: stderr}
        for fd in (out_r, err_r, status_r, cancel_fd):
            poller.register(fd, select.POLLIN)
        open_fds = {out_r, err_r, status_r}
        while open_fds:
            now = time.monotonic()
            if forced is None and now >= deadline:
                forced = Termination.TIMED_OUT
                os.kill(pid, signal.SIGKILL)
                deadline = now + _DRAIN_S
            elif forced is not None and now >= deadline:
                break
            for fd, _events in poller.poll(max(0.0, deadline - now) * 1000):
                if fd == cancel_fd:
                    if forced is None:
                        forced = Termination.CANCELLED
                        os.kill(pid, signal.SIGKILL)
                        deadline = time.monotonic() + _DRAIN_S
                    poller.unregister(cancel_fd)
                    continue
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == status_r:
                    status_msg += chunk
                else:
                    streams[fd].feed(chunk)
    finally:
        for fd in (out_r, err_r, status_r):
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    command_s = time.monotonic() - started

    error, error_kind = "", ""
    termination, exit_code, signum = forced or Termination.EXITED, -1, 0
    if status_msg[:1] == b"S" and len(status_msg) >= 5:
        code = os.waitstatus_to_exitcode(struct.unpack("=i", bytes(status_msg[1:5]))[0])
        if forced is None:
            if code >= 0:
                exit_code = code
            else:
                termination, signum = Termination.SIGNALED, -code
    elif status_msg[:1] == b"E":
        kind, _, text = bytes(status_msg[1:]).partition(b"\0")
        error_kind, error = kind.decode(), text.decode(errors="replace")
    elif forced is None:
        error_kind, error = "setup", "the sandbox's init died without reporting a status"
    if forced is not None:
        signum = int(signal.SIGKILL)
    return termination, exit_code, signum, stdout, stderr, error, error_kind, command_s


def supervise(plan: SandboxPlan, cancel_fd: int) -> SandboxResult:
    """Run ``plan`` in a fresh sandbox and report what happened.

    ``cancel_fd`` becomes readable (data or EOF) when the caller gives up; the
    whole process tree is then killed. The checklist below is the only place
    the sandbox is put together.
    """
    t0 = time.monotonic()
    # 1. A cgroup for limits and accounting, created outside the sandbox.
    cgroup = Cgroup.create(plan.cgroup)
    try:
        # 2. New mount, pid (for children), network, IPC and UTS namespaces.
        sc.unshare(plan.namespaces)
        # 3. Nothing we mount from here on propagates to the host.
        mnt.make_private()
        # 4. Scratch tmpfs, overlays over every data mount, /dev, /sys, hidden paths.
        for op in plan.host_setup:
            mnt.execute_step(op)
        # 5. Hostname and a loopback-only network.
        sc.sethostname(plan.hostname)
        net.loopback_up()
        setup_s = time.monotonic() - t0
        # 6. Init (pid 1: /proc, pivot_root) and the command, under the deadline.
        termination, exit_code, signum, out, err, error, error_kind, command_s = _run_command(
            plan, cancel_fd, cgroup
        )
        # 7. Accounting, then the cgroup goes (every process in it is dead by now).
        stats = cgroup.stats()
    finally:
        cgroup.remove()
    if stats.oom_kills and termination in (Termination.SIGNALED, Termination.EXITED):
        termination = Termination.OUT_OF_MEMORY
    if error:
        return SandboxResult(error=error, error_kind=error_kind, stderr=bytes(err.data))
    # 8. The diff of the upper layers, read from outside the sandbox's root.
    t_diff = time.monotonic()
    diff = compute_changes(plan.layers, plan.diff)
    return SandboxResult(
        termination=termination,
        exit_code=exit_code,
        signal=signum,
        stdout=bytes(out.data),
        stdout_truncated=out.truncated,
        stderr=bytes(err.data),
        stderr_truncated=err.truncated,
        diff=diff,
        cgroup=stats,
        setup_s=setup_s,
        command_s=command_s,
        diff_s=time.monotonic() - t_diff,
    )
