"""Proctrace: a complete record of the process tree a sandboxed command starts.

Two kernel mechanisms, each used for what it reports exactly:

- **seccomp user notification** on ``execve``/``execveat``. The command process
  installs the filter right before it execs the shell (:func:`install`); every
  descendant inherits it and none can remove it. Each exec stops in the kernel
  until the supervisor has read the filename and argv from ``/proc/PID/mem`` and
  the cwd, uid and pid-namespace pid from ``/proc/PID``, checked that the
  notification is still valid (so a recycled pid cannot feed it another
  process's memory), and answered CONTINUE.
- **the process-events connector** (netlink ``CN_PROC``): fork, exec and exit
  events with host pids, the wait status and a CLOCK_MONOTONIC timestamp, for
  every process of the host. The tracer keeps the descendants of the sandbox's
  init, following fork events (the kernel queues a child's fork event before
  the child can run, so a descendant is never missed, however short-lived, and
  re-parenting by ``setsid``/double fork does not matter). An exec event
  confirms the exec that the notification announced (failed ``execvp`` PATH
  probes are dropped); exit events give the status and the end time, also for
  processes SIGKILLed when the pid namespace's init dies.

The supervisor owns a :class:`ProcessTracer`; its one :meth:`~ProcessTracer.fileno`
goes into the supervisor's poll loop, and :meth:`~ProcessTracer.handle` does a
bounded amount of work and never blocks. Everything is bounded: processes
recorded, argv bytes per exec, programs per process.

Wiring (see docs/decisions.md, "Process tree capture")::

    supervisor: conn = open_connector()            # before unshare(CLONE_NEWNET)
                sup, cmd = channel()               # cmd is inherited by init and the command
    command:    ... become the caller; chdir; the notification filter, its listener sent over
                cmd; execve(...)   (the init program: native/airlock-sandbox-init.c; tests
                and bench/ call install(cmd.fileno()), the same steps in Python)
    supervisor: tracer = ProcessTracer(conn, sup, init_pid)   # before the command may exec
                poll loop: tracer.fileno() readable -> tracer.handle()
                timeout:   tracer.note_timeout(); kill(init)
                after waitpid(init): tracer.finish(); tracer.records(); tracer.close()
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import platform
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field

from airlock.sandbox import _digest
from airlock.sandbox import _syscalls as sc

__all__ = [
    "MAX_ARGV_BYTES",
    "MAX_PROCESSES",
    "ProcessRecord",
    "ProcessTracer",
    "channel",
    "install",
    "open_connector",
]

MAX_PROCESSES = 10_000
MAX_ARGV_BYTES = 4096
# Programs remembered per process (the first ones and the last): `env X nohup foo` is 3.
_MAX_EXECUTABLES = 8
_MAX_PATH_BYTES = 4096

# --- The seccomp filter ---------------------------------------------------------------------

_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SECCOMP_DATA_NR = 0
_SECCOMP_DATA_ARCH = 4

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_AUDIT_ARCH_ARM = 0x40000028
_X32_SYSCALL_BIT = 0x40000000

_EXECVE, _EXECVEAT = 0, 1
# arch -> {syscall number: (which call, pointer size)}
_ExecTable = dict[int, dict[int, tuple[int, int]]]
_EXEC_SYSCALLS: dict[str, _ExecTable] = {
    "x86_64": {
        _AUDIT_ARCH_X86_64: {
            59: (_EXECVE, 8),
            322: (_EXECVEAT, 8),
            _X32_SYSCALL_BIT | 520: (_EXECVE, 4),
            _X32_SYSCALL_BIT | 545: (_EXECVEAT, 4),
        },
        _AUDIT_ARCH_I386: {11: (_EXECVE, 4), 358: (_EXECVEAT, 4)},
    },
    "aarch64": {
        _AUDIT_ARCH_AARCH64: {221: (_EXECVE, 8), 281: (_EXECVEAT, 8)},
        _AUDIT_ARCH_ARM: {11: (_EXECVE, 4), 387: (_EXECVEAT, 4)},
    },
}

# struct seccomp_notif (80 bytes), seccomp_notif_resp (24 bytes); ioctl numbers are generic.
_NOTIF = struct.Struct("=QIIiIQ6Q")
_NOTIF_RESP = struct.Struct("=QqiI")
_IOCTL_NOTIF_RECV = (3 << 30) | (_NOTIF.size << 16) | (ord("!") << 8) | 0
_IOCTL_NOTIF_SEND = (3 << 30) | (_NOTIF_RESP.size << 16) | (ord("!") << 8) | 1
_IOCTL_NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2
_IOCTL_NOTIF_SET_FLAGS = (1 << 30) | (8 << 16) | (ord("!") << 8) | 4
_USER_NOTIF_FLAG_CONTINUE = 1
_USER_NOTIF_FD_SYNC_WAKE_UP = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000

# --- The process-events connector -----------------------------------------------------------

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_PROC_CN_MCAST_LISTEN = 1
_PROC_EVENT_NONE = 0
_PROC_EVENT_FORK = 0x1
_PROC_EVENT_EXEC = 0x2
_PROC_EVENT_UID = 0x4
_PROC_EVENT_EXIT = 0x80000000
_NL_HDR = struct.Struct("=IHHII")
_CN_HDR = struct.Struct("=IIIIHH")
_EV_HDR = struct.Struct("=IIQ")
_EV_FORK = struct.Struct("=iiii")
_EV_EXEC = struct.Struct("=ii")
_EV_EXIT = struct.Struct("=iiII")
_EV_UID = struct.Struct("=iiII")
_EV_ACK = struct.Struct("=I")
_EV_OFFSET = _NL_HDR.size + _CN_HDR.size
_DATA_OFFSET = _EV_OFFSET + _EV_HDR.size
_RCVBUF_BYTES = 8 * 1024 * 1024
_SO_RCVBUFFORCE = 33
_ACK_TIMEOUT_S = 2.0

# Work done per handle() call, so output draining and the deadline are never starved.
_ROUNDS_PER_HANDLE = 64
_EVENTS_PER_ROUND = 256
# More events than the receive buffer can hold (each takes at least 256 bytes of it).
_DRAIN_ALL = _RCVBUF_BYTES // 256


@dataclass(frozen=True)
class ProcessRecord:
    """One process of the sandbox, from its fork (or first sighting) to its exit.

    Times are seconds relative to the tracer's ``origin`` (a ``time.monotonic()``
    value), from the kernel's event timestamps. ``argv`` and ``cwd`` are bytes, as
    file paths are elsewhere in Airlock; ``argv`` is the last program's, or the
    parent's (inherited) when the process never exec'd (a subshell).
    """

    host_pid: int
    # In the sandbox's pid namespace: exact for a process that exec'd; read when its fork is
    # seen otherwise, so None for a fork that was gone by then (a subshell of microseconds).
    pid: int | None
    host_ppid: int
    # The parent at fork time (not the reaper it was re-parented to); 1 is the sandbox's init.
    ppid: int | None
    argv: tuple[bytes, ...]
    argv_truncated: bool
    # Every program the process exec'd, in order (the first few and the last), as resolved
    # paths: ("/usr/bin/env", "/usr/bin/curl"). Empty for a process that never exec'd.
    executables: tuple[bytes, ...]
    exec_count: int
    # The working directory at its last exec (else as read when its fork was seen, else the
    # parent's), as the sandbox sees it.
    cwd: bytes | None
    # The real uid, kept current by the connector's uid events.
    uid: int | None
    started_s: float | None
    ended_s: float | None
    exit_code: int | None
    signal: int | None
    core_dumped: bool
    # Still running when the command (the sandbox's first process) exited on its own (not
    # killed by the timeout): a daemon, or a background job it did not wait for.
    outlived_command: bool
    # Alive when the supervisor gave up (note_timeout: timeout or cancellation), then SIGKILLed.
    killed_by_timeout: bool


def open_connector() -> socket.socket:
    """A netlink socket for the process-events connector, not yet subscribed.

    The connector only exists in the initial network namespace: call this before
    the supervisor unshares ``CLONE_NEWNET`` (the socket keeps its namespace).
    Needs CAP_NET_ADMIN. Events only flow once a :class:`ProcessTracer` subscribes,
    so a socket held by a warm sandbox costs nothing while it waits.
    """
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_CONNECTOR
    )
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF_BYTES)
    except BaseException:
        sock.close()
        raise
    return sock


def channel() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, command's end): the command hands the listener over it.

    Both are close-on-exec; the command's end must reach the command process through
    its forks (init closes its copy), and :func:`install` closes it before the exec.
    """
    sup, cmd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    return sup, cmd


def _filter_program(machine: str) -> bytes:
    """Classic BPF: USER_NOTIF for execve/execveat of every ABI of ``machine``, else ALLOW."""
    table = _EXEC_SYSCALLS.get(machine)
    if table is None:
        raise OSError(errno.ENOSYS, f"process tracing: unsupported architecture {machine}")
    # (code, k, jump-if-true label, jump-if-false label); labels resolve to forward offsets.
    insns: list[tuple[int, int, str, str]] = [(_BPF_LD_W_ABS, _SECCOMP_DATA_ARCH, "", "")]
    insns += [(_BPF_JEQ_K, arch, f"arch{i}", "") for i, arch in enumerate(table)]
    insns.append((_BPF_RET_K, _SECCOMP_RET_ALLOW, "", ""))
    labels: dict[str, int] = {}
    for i, calls in enumerate(table.values()):
        labels[f"arch{i}"] = len(insns)
        insns.append((_BPF_LD_W_ABS, _SECCOMP_DATA_NR, "", ""))
        insns += [(_BPF_JEQ_K, nr, "notify", "") for nr in calls]
        insns.append((_BPF_RET_K, _SECCOMP_RET_ALLOW, "", ""))
    labels["notify"] = len(insns)
    insns.append((_BPF_RET_K, _SECCOMP_RET_USER_NOTIF, "", ""))
    out = bytearray()
    for pc, (code, k, jt, jf) in enumerate(insns):
        t = labels[jt] - pc - 1 if jt else 0
        f = labels[jf] - pc - 1 if jf else 0
        out += struct.pack("=HBBI", code, t, f, k)
    return bytes(out)


@functools.cache
def filter_program() -> bytes:
    """The notification filter for this machine's architectures (built once; the sandbox's
    init program installs it, sandbox/init.py)."""
    return _filter_program(platform.machine())


def install(channel_fd: int) -> None:
    """In the command process, right before ``execve``: trace this process and its descendants.

    Needs no_new_privs (``user.become`` sets it). Installs the filter, sends its
    listener to the supervisor over ``channel_fd`` (the command's end of
    :func:`channel`) and closes both, so nothing in the sandbox can answer its own
    notifications. The ``execve`` that follows waits until the supervisor answers.
    """
    program = filter_program()
    flags = sc.SECCOMP_FILTER_FLAG_NEW_LISTENER | sc.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    try:
        listener = sc.seccomp_set_filter(program, flags)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # WAIT_KILLABLE_RECV is Linux 5.19+
            raise
        listener = sc.seccomp_set_filter(program, sc.SECCOMP_FILTER_FLAG_NEW_LISTENER)
    sock = socket.socket(fileno=channel_fd)
    try:
        socket.send_fds(sock, [b"L"], [listener])
    finally:
        os.close(listener)
        sock.close()


# --- The supervisor's side ------------------------------------------------------------------


@dataclass
class _Exec:
    """What one exec notification read, waiting for the exec event that confirms it."""

    executable: bytes
    argv: tuple[bytes, ...]
    truncated: bool
    cwd: bytes | None
    uid: int | None
    ns_pid: int | None


@dataclass
class _Proc:
    host_pid: int
    host_ppid: int
    ns_pid: int | None = None
    ns_ppid: int | None = None
    argv: tuple[bytes, ...] = ()
    argv_truncated: bool = False
    executables: list[bytes] = field(default_factory=list)
    exec_count: int = 0
    cwd: bytes | None = None
    uid: int | None = None
    started_ns: int | None = None
    ended_ns: int | None = None
    status: int | None = None
    threads: int = 1
    recorded: bool = True
    pending: _Exec | None = None
    # The parent's record (exact even if host pids are recycled); None: init or unknown.
    parent: _Proc | None = None

    def apply(self, ex: _Exec) -> None:
        self.argv, self.argv_truncated = ex.argv, ex.truncated
        if len(self.executables) >= _MAX_EXECUTABLES:
            self.executables[-1] = ex.executable
        else:
            self.executables.append(ex.executable)
        self.exec_count += 1
        self.cwd = ex.cwd if ex.cwd is not None else self.cwd
        self.uid = ex.uid if ex.uid is not None else self.uid
        self.ns_pid = ex.ns_pid if ex.ns_pid is not None else self.ns_pid


@dataclass(frozen=True)
class _Status:
    tgid: int
    ppid: int
    uid: int
    ns_pids: tuple[int, ...]


def _status_field(text: bytes, key: bytes) -> bytes:
    start = text.find(key)
    if start < 0:
        return b""
    start += len(key)
    end = text.find(b"\n", start)
    return text[start:end] if end >= 0 else text[start:]


def _read_status(pid: int) -> _Status | None:
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096)  # the fields we need are in the first 1 KiB
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        tgid = int(_status_field(text, b"\nTgid:"))
        ppid = int(_status_field(text, b"\nPPid:"))
        uid = int(_status_field(text, b"\nUid:").split()[0])
        ns_pids = tuple(int(v) for v in _status_field(text, b"\nNStgid:").split())
    except (ValueError, IndexError):
        return None
    return _Status(tgid, ppid, uid, ns_pids)


def _readlink(path: str) -> bytes | None:
    try:
        return os.readlink(os.fsencode(path))
    except OSError:
        return None


def _wait_status(status: int | None) -> tuple[int | None, int | None, bool]:
    """(exit code, signal, core dumped) from a kernel exit code in wait-status form."""
    if status is None:
        return None, None, False
    sig = status & 0x7F
    if sig == 0:
        return (status >> 8) & 0xFF, None, False
    return None, sig, bool(status & 0x80)


class ProcessTracer:
    """The supervisor's end: follows one sandbox's process tree. Not thread-safe.

    ``connector`` comes from :func:`open_connector`, ``channel`` is the supervisor's
    end of :func:`channel`, ``init_pid`` the sandbox's pid 1 as the supervisor sees
    it (a child of the supervisor). Construct it before the command may exec:
    subscribing is synchronous, so no fork after this returns is missed. The
    tracer owns and closes both sockets. ``connector`` may be None (no CN_PROC,
    for example in a container's pid namespace): then only execs are recorded,
    every attempt (failed ones included), with no times or exit statuses.
    """

    def __init__(
        self,
        connector: socket.socket | None,
        channel: socket.socket,
        init_pid: int,
        *,
        max_processes: int = MAX_PROCESSES,
        max_argv_bytes: int = MAX_ARGV_BYTES,
        origin: float | None = None,
        sync_wakeup: bool = True,
    ) -> None:
        self._conn = connector
        self._sync_wakeup = sync_wakeup
        self._channel: socket.socket | None = channel
        self._listener = -1
        self._init_pid = init_pid
        self._max_processes = max_processes
        self._max_argv = max_argv_bytes
        self._origin_ns = int((time.monotonic() if origin is None else origin) * 1e9)
        self._machine = _EXEC_SYSCALLS.get(platform.machine(), {})
        self._live: dict[int, _Proc] = {}
        self._all: list[_Proc] = []
        self._root: _Proc | None = None
        self._init_exited = False
        self._timeout_ns: int | None = None
        self._buf = bytearray(8192)
        self.dropped = 0
        self.events_lost = False
        self.notifications = 0
        self._epoll = select.epoll()
        try:
            init = _read_status(init_pid)
            if init is None or not init.ns_pids:
                raise OSError(errno.ESRCH, f"process tracing: no init process {init_pid}")
            # NStgid lists the pids from our namespace inwards; init's depth is the sandbox's.
            self._ns_level = len(init.ns_pids) - 1
            self._epoll.register(channel.fileno(), select.EPOLLIN)
            if connector is not None:
                self._subscribe(connector)
                self._epoll.register(connector.fileno(), select.EPOLLIN)
            # Children init forked before we subscribed (a warm sandbox's command process):
            # anything forked after is in the events.
            self._adopt_children()
        except BaseException:
            self.close()
            raise

    # --- Public API --------------------------------------------------------------------------

    def fileno(self) -> int:
        """One descriptor for the supervisor's poll loop; readable when there is work."""
        return self._epoll.fileno()

    def handle(self) -> None:
        """Consume ready events and answer ready notifications; bounded, never blocks."""
        for _ in range(_ROUNDS_PER_HANDLE):
            ready = self._epoll.poll(0)
            if not ready:
                return
            for fd, mask in ready:
                if self._conn is not None and fd == self._conn.fileno():
                    self._drain_connector(_EVENTS_PER_ROUND)
                elif fd == self._listener:
                    if mask & select.EPOLLIN:
                        self._notification()
                    elif mask & (select.EPOLLHUP | select.EPOLLERR):
                        self._epoll.unregister(fd)  # every traced process is gone
                elif self._channel is not None and fd == self._channel.fileno():
                    self._take_listener()

    def note_timeout(self) -> None:
        """Call right before killing the sandbox for a timeout (or cancellation)."""
        if self._timeout_ns is None:
            self._timeout_ns = time.monotonic_ns()

    def finish(self, timeout_s: float = 2.0) -> None:
        """After init has been reaped (never before): read the exit events still queued.

        Every process of the sandbox is dead by then, but an exit event can trail
        the parent's wakeup by a few microseconds. Waits at most ``timeout_s``, and
        only that long if events were lost.
        """
        self.handle()
        if self._conn is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._live or not self._init_exited:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if select.select([self._conn], [], [], left)[0]:
                self._drain_connector(_EVENTS_PER_ROUND)

    def records(self) -> tuple[ProcessRecord, ...]:
        """Every process recorded so far, in the order they were first seen."""
        root = self._root
        # A command killed by the timeout did not exit on its own: nothing outlived it.
        root_end = root.ended_ns if root is not None and not self._killed(root) else None
        out = []
        for p in self._all:
            code, sig, core = _wait_status(p.status)
            ns_ppid = p.parent.ns_pid if p.parent is not None else p.ns_ppid
            out.append(
                ProcessRecord(
                    host_pid=p.host_pid,
                    pid=p.ns_pid,
                    host_ppid=p.host_ppid,
                    ppid=ns_ppid,
                    argv=p.argv,
                    argv_truncated=p.argv_truncated,
                    executables=tuple(p.executables),
                    exec_count=p.exec_count,
                    cwd=p.cwd,
                    uid=p.uid,
                    started_s=self._seconds(p.started_ns),
                    ended_s=self._seconds(p.ended_ns),
                    exit_code=code,
                    signal=sig,
                    core_dumped=core,
                    outlived_command=(
                        p is not self._root
                        and root_end is not None
                        and (p.ended_ns is None or p.ended_ns > root_end)
                    ),
                    killed_by_timeout=self._killed(p),
                )
            )
        return tuple(out)

    @property
    def truncated(self) -> bool:
        """More processes ran than ``max_processes``; ``dropped`` counts the rest."""
        return self.dropped > 0

    def close(self) -> None:
        """Release every descriptor; the tracer is unusable after. Call it once the sandbox is
        gone: while the listener is open a traced exec waits for an answer, once it is closed a
        traced execve fails with ENOSYS."""
        with contextlib.suppress(OSError):
            self._epoll.close()
        if self._listener >= 0:
            with contextlib.suppress(OSError):
                os.close(self._listener)
            self._listener = -1
        for sock in (self._channel, self._conn):
            if sock is not None:
                sock.close()
        self._channel = None

    def __enter__(self) -> ProcessTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- The connector -----------------------------------------------------------------------

    def _subscribe(self, conn: socket.socket) -> None:
        """Join the group and ask for fork/exec/exit events; wait for the kernel's ack.

        The kernel drops the request silently outside the initial pid and user
        namespaces; without an ack, tracing would quietly record nothing.
        """
        conn.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _CN_IDX_PROC)
        # The ack comes back to every listener with the sequence number rewritten: tell ours
        # from another supervisor's by a random ack number (the kernel answers with ack + 1).
        ack = _digest.random_bits(31) + 1
        self._send_control(conn, struct.pack("=I", _PROC_CN_MCAST_LISTEN), ack)
        deadline = time.monotonic() + _ACK_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([conn], [], [], left)[0]:
                raise OSError(
                    errno.EPERM,
                    "process tracing: the process-events connector did not answer "
                    "(it only serves the initial pid and user namespaces)",
                )
            n = conn.recv_into(self._buf)
            if n < _DATA_OFFSET + _EV_ACK.size:
                continue
            r_ack = _CN_HDR.unpack_from(self._buf, _NL_HDR.size)[3]
            (what,) = struct.unpack_from("=I", self._buf, _EV_OFFSET)
            if what == _PROC_EVENT_NONE and r_ack == ack + 1:
                (err,) = _EV_ACK.unpack_from(self._buf, _DATA_OFFSET)
                if err:
                    raise OSError(err, f"process tracing: connector: {os.strerror(err)}")
                break
            self._dispatch(n)
        # Then only fork, exec and exit events (struct proc_input, Linux 6.6+; an older
        # kernel ignores the 8-byte form and keeps sending everything, which the parser
        # skips). Handled synchronously; its ack is filtered out like any other event type.
        mask = _PROC_EVENT_FORK | _PROC_EVENT_EXEC | _PROC_EVENT_UID | _PROC_EVENT_EXIT
        self._send_control(conn, struct.pack("=II", _PROC_CN_MCAST_LISTEN, mask), 0)

    @staticmethod
    def _send_control(conn: socket.socket, payload: bytes, ack: int) -> None:
        cn = _CN_HDR.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, ack, len(payload), 0) + payload
        conn.send(_NL_HDR.pack(_NL_HDR.size + len(cn), _NLMSG_DONE, 0, 0, 0) + cn)

    def _drain_connector(self, budget: int) -> bool:
        """Read up to ``budget`` datagrams without blocking; True if the queue is empty."""
        assert self._conn is not None
        for _ in range(budget):
            try:
                n = self._conn.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the queue overflowed: some events are gone
                    self.events_lost = True
                    continue
                raise
            self._dispatch(n)
        return False

    def _dispatch(self, n: int) -> None:
        buf = self._buf
        off = 0
        while off + _DATA_OFFSET <= n:
            length, kind, _flags, _seq, _port = _NL_HDR.unpack_from(buf, off)
            if length < _NL_HDR.size or kind == _NLMSG_ERROR:
                return
            if off + _DATA_OFFSET <= n and kind == _NLMSG_DONE:
                what, _cpu, ts = _EV_HDR.unpack_from(buf, off + _EV_OFFSET)
                data = off + _DATA_OFFSET
                if what == _PROC_EVENT_FORK:
                    _ppid, ptgid, cpid, ctgid = _EV_FORK.unpack_from(buf, data)
                    self._on_fork(ts, ptgid, cpid, ctgid)
                elif what == _PROC_EVENT_EXEC:
                    _pid, tgid = _EV_EXEC.unpack_from(buf, data)
                    self._on_exec(ts, tgid)
                elif what == _PROC_EVENT_UID:
                    _pid, tgid, ruid, _euid = _EV_UID.unpack_from(buf, data)
                    proc = self._live.get(tgid)
                    if proc is not None:
                        proc.uid = ruid
                elif what == _PROC_EVENT_EXIT:
                    pid, tgid, code, _exit_signal = _EV_EXIT.unpack_from(buf, data)
                    self._on_exit(ts, pid, tgid, code)
            off += (length + 3) & ~3

    def _on_fork(self, ts: int, ptgid: int, cpid: int, ctgid: int) -> None:
        if cpid != ctgid:  # a new thread of a process
            proc = self._live.get(ctgid)
            if proc is not None:
                proc.threads += 1
            return
        parent = self._live.get(ptgid)
        if parent is None and ptgid != self._init_pid:
            return  # not ours
        known = self._live.get(ctgid)
        if known is not None:  # its exec notification came first
            known.started_ns, known.host_ppid, known.parent = ts, ptgid, parent
            known.ns_ppid = 1 if parent is None else None
            return
        proc = self._new(ctgid, ptgid, ts)
        proc.parent = parent
        if parent is not None:
            proc.argv, proc.argv_truncated = parent.argv, parent.argv_truncated
            proc.cwd, proc.uid = parent.cwd, parent.uid
        else:
            proc.ns_ppid = 1
        if proc.recorded:
            # Best effort for a process that never execs: it may already be gone.
            status = _read_status(ctgid)
            if status is not None and self._ns_pid(status) is not None:
                proc.ns_pid = self._ns_pid(status)
                proc.uid = status.uid
                proc.cwd = _readlink(f"/proc/{ctgid}/cwd") or proc.cwd

    def _on_exec(self, ts: int, tgid: int) -> None:
        proc = self._live.get(tgid)
        if proc is None:
            return
        if proc.started_ns is None:  # forked before tracing began (the command itself)
            proc.started_ns = ts
        ex, proc.pending = proc.pending, None
        if ex is None and proc.recorded:
            ex = self._exec_from_proc(tgid)  # not announced (an ABI the filter does not know)
        if ex is not None:
            proc.apply(ex)

    def _on_exit(self, ts: int, pid: int, tgid: int, code: int) -> None:
        if tgid == self._init_pid and pid == tgid:
            self._init_exited = True
            return
        proc = self._live.get(tgid)
        if proc is None:
            return
        proc.threads -= 1
        if proc.threads > 0:
            return  # a thread, or a leader that exited before the others
        proc.ended_ns, proc.status, proc.pending = ts, code, None
        del self._live[tgid]

    def _adopt_children(self) -> None:
        try:
            with open(f"/proc/{self._init_pid}/task/{self._init_pid}/children", "rb") as f:
                children = [int(v) for v in f.read().split()]
        except (OSError, ValueError):
            return  # no CONFIG_PROC_CHILDREN: the first exec notification finds the command
        for pid in children:
            if pid in self._live:
                continue
            status = _read_status(pid)
            if status is None or status.ppid != self._init_pid:
                continue  # gone, or a recycled pid
            proc = self._new(pid, self._init_pid, None)
            proc.ns_ppid = 1
            proc.uid = status.uid
            proc.cwd = _readlink(f"/proc/{pid}/cwd")
            proc.ns_pid = self._ns_pid(status)

    def _new(self, tgid: int, ppid: int, ts: int | None) -> _Proc:
        proc = _Proc(host_pid=tgid, host_ppid=ppid, started_ns=ts)
        if self._root is None and ppid == self._init_pid:
            self._root = proc  # the command process
        if len(self._all) < self._max_processes:
            self._all.append(proc)
        else:
            proc.recorded = False
            self.dropped += 1
        self._live[tgid] = proc
        return proc

    # --- seccomp notifications ---------------------------------------------------------------

    def _take_listener(self) -> None:
        assert self._channel is not None
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(self._channel, 16, 4, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            fds = []
        for extra in fds[1:]:
            os.close(extra)
        if fds and self._listener < 0:
            self._listener = fds[0]
            self._epoll.register(self._listener, select.EPOLLIN)
            if self._sync_wakeup:
                # Linux 6.6+: the exec'ing process and the supervisor hand the CPU to each
                # other directly, as for a synchronous call (see docs/decisions.md).
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self._listener, _IOCTL_NOTIF_SET_FLAGS, _USER_NOTIF_FD_SYNC_WAKE_UP)
        elif fds:
            os.close(fds[0])
        # One listener per sandbox: the command's end is closed before it execs.
        self._epoll.unregister(self._channel.fileno())
        self._channel.close()
        self._channel = None

    def _notification(self) -> None:
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self._listener, _IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the process died between poll and receive
            raise
        notif_id, tid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
        self.notifications += 1
        if self._conn is not None:
            # Every event of this process from before this execve is queued by now: its fork,
            # and the exec event that confirms its previous exec. Read them first, or this
            # attempt would be taken for the one that event confirms.
            self._drain_connector(_DRAIN_ALL)
        ex: _Exec | None = None
        status: _Status | None = None
        tgid = -1
        try:
            call = self._machine.get(arch, {}).get(nr)
            # A tid that is a live process's pid is that process; its uid is kept current by
            # the connector's uid events. Otherwise (a thread, a process not read yet, no
            # connector), /proc/TID/status says which process it is and who.
            known = self._live.get(tid) if self._conn is not None else None
            if call is not None and known is not None and known.ns_pid is not None:
                tgid = tid
                if known.recorded:
                    ex = self._read_exec(tid, call, args, known.ns_pid, known.uid)
            elif call is not None:
                status = _read_status(tid)
                if status is not None:
                    tgid = status.tgid
                    proc = self._live.get(tgid)
                    if proc is None or proc.recorded:
                        ns_pid = self._ns_pid(status)
                        ex = self._read_exec(tid, call, args, ns_pid, status.uid)
            # The pid could have been recycled while we read: only trust a live notification.
            fcntl.ioctl(self._listener, _IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
        except OSError:
            ex = None
        finally:
            resp = bytearray(_NOTIF_RESP.pack(notif_id, 0, 0, _USER_NOTIF_FLAG_CONTINUE))
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._listener, _IOCTL_NOTIF_SEND, resp, True)
        if ex is None or tgid < 0:
            return
        proc = self._live.get(tgid)
        if proc is None:  # first sighting: the command itself, or a fork event was lost
            ppid = status.ppid if status is not None else 0
            proc = self._new(tgid, ppid, None)
            proc.parent = self._live.get(ppid)
            proc.ns_ppid = 1 if ppid == self._init_pid else None
        if self._conn is None:
            if proc.started_ns is None:
                proc.started_ns = time.monotonic_ns()  # first seen: no fork events to say
            proc.apply(ex)  # no exec events to confirm it
        else:
            proc.pending = ex

    def _read_exec(
        self, tid: int, call: tuple[int, int], args: list[int], ns_pid: int | None, uid: int | None
    ) -> _Exec:
        which, psize = call
        if which == _EXECVE:
            dirfd, path_ptr, argv_ptr, flags = _AT_FDCWD, args[0], args[1], 0
        else:
            dirfd = struct.unpack("=i", struct.pack("=I", args[0] & 0xFFFFFFFF))[0]
            path_ptr, argv_ptr, flags = args[1], args[2], args[4]
        cwd = _readlink(f"/proc/{tid}/cwd")
        mem = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            path, _ = _read_cstring(mem, path_ptr, _MAX_PATH_BYTES)
            argv, truncated = self._read_argv(mem, argv_ptr, psize)
        finally:
            os.close(mem)
        base = cwd if dirfd == _AT_FDCWD else _readlink(f"/proc/{tid}/fd/{dirfd}")
        if not path and flags & _AT_EMPTY_PATH:
            executable = base or b""
        elif path.startswith(b"/") or base is None:
            executable = path
        else:
            executable = os.path.join(base, path)
        return _Exec(executable, argv, truncated, cwd, uid, ns_pid)

    def _read_argv(self, mem: int, ptr: int, psize: int) -> tuple[tuple[bytes, ...], bool]:
        budget = self._max_argv
        fmt = "=" + ("Q" if psize == 8 else "I")
        pointers: list[int] = []
        # Each argument costs at least its NUL, so at most `budget` pointers matter.
        while len(pointers) < budget:
            try:
                chunk = os.pread(mem, psize * 64, ptr + psize * len(pointers))
            except OSError:
                break
            done = False
            for (value,) in struct.iter_unpack(fmt, chunk[: len(chunk) - len(chunk) % psize]):
                if value == 0:
                    done = True
                    break
                pointers.append(value)
            if done or len(chunk) < psize * 64:
                break
        truncated = len(pointers) >= budget
        pointers = pointers[:budget]
        if not pointers:
            return (), truncated
        # Strings usually sit together: read their span once when it is small.
        lo, hi = min(pointers), max(pointers)
        span = b""
        if hi - lo < 2 * budget:
            with contextlib.suppress(OSError):
                span = os.pread(mem, hi - lo + min(budget, 4096), lo)
        argv: list[bytes] = []
        for p in pointers:
            room = budget - 1  # the string's bytes; its NUL costs one more
            if room < 0:
                truncated = True
                break
            s, complete = _find_cstring(span, p - lo, room)
            if s is None:
                s, complete = _read_cstring(mem, p, room)
            argv.append(s)
            budget -= len(s) + 1
            if not complete:
                truncated = True
                break
        return tuple(argv), truncated

    def _exec_from_proc(self, tgid: int) -> _Exec | None:
        """After the fact, for an exec no notification announced: /proc/PID/cmdline."""
        try:
            with open(f"/proc/{tgid}/cmdline", "rb") as f:
                raw = f.read(self._max_argv + 1)
        except OSError:
            return None
        truncated = len(raw) > self._max_argv
        argv = tuple(raw[: self._max_argv].split(b"\0")[:-1]) if raw else ()
        st = _read_status(tgid)
        ns_pid = self._ns_pid(st) if st is not None else None
        return _Exec(
            _readlink(f"/proc/{tgid}/exe") or b"",
            argv,
            truncated,
            _readlink(f"/proc/{tgid}/cwd"),
            st.uid if st is not None else None,
            ns_pid,
        )

    def _ns_pid(self, status: _Status) -> int | None:
        """The pid in the sandbox's namespace; None if the process is not in it (a recycled pid)."""
        if len(status.ns_pids) > self._ns_level:
            return status.ns_pids[self._ns_level]
        return None

    def _killed(self, p: _Proc) -> bool:
        """Alive when note_timeout() was called, then SIGKILLed."""
        return (
            self._timeout_ns is not None
            and p.status is not None
            and p.status & 0x7F == signal.SIGKILL
            and p.ended_ns is not None
            and p.ended_ns >= self._timeout_ns
            and (p.started_ns is None or p.started_ns <= self._timeout_ns)
        )

    def _seconds(self, ns: int | None) -> float | None:
        return None if ns is None else (ns - self._origin_ns) / 1e9


def _find_cstring(span: bytes, at: int, limit: int) -> tuple[bytes | None, bool]:
    """Like :func:`_read_cstring`, from an already read span; (None, False) if it is not in it."""
    if at < 0 or at >= len(span):
        return None, False
    end = span.find(b"\0", at, at + limit + 1)
    if end >= 0:
        return span[at:end], True
    if len(span) > at + limit:
        return span[at : at + limit], False
    return None, False


def _read_cstring(mem: int, addr: int, limit: int) -> tuple[bytes, bool]:
    """(up to ``limit`` bytes of the NUL-terminated string at ``addr``, whether its NUL came)."""
    out = bytearray()
    while len(out) <= limit:
        want = min(256 if not out else 4096, limit + 1 - len(out))
        try:
            chunk = os.pread(mem, want, addr + len(out))
        except OSError:
            return bytes(out[:limit]), False
        if not chunk:
            break
        end = chunk.find(b"\0")
        if end >= 0:
            out += chunk[:end]
            return (bytes(out), True) if len(out) <= limit else (bytes(out[:limit]), False)
        out += chunk
    return bytes(out[:limit]), False
