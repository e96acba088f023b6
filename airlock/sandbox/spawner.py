"""The spawner: a small helper process that forks one supervisor per dry run.

The gRPC server runs many threads, and forking a threaded process is unsafe
(locks held by other threads stay locked in the child). So the daemon *execs*
this helper once, before its server starts, and asks it for sandboxes::

    daemon ──(control socket: 1 byte + SCM_RIGHTS fd)──▶ spawner ──fork──▶ supervisor
       ▲                                                                      │
       └──────────────── per-request socket: plan in, result out ─────────────┘

The helper imports only the sandbox modules (no grpc), so it is small and its
forks are fast. It never reads plans itself: each supervisor reads its own plan
from the per-request socket and writes the result back on it. Closing that socket
from the daemon's side cancels the dry run.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

from airlock._errors import Cancelled, SandboxError, Unavailable
from airlock.sandbox import _syscalls as sc

__all__ = ["Spawner", "main"]

_HEADER = struct.Struct("!Q")
_MAX_MESSAGE = 256 * 1024 * 1024


class _RestrictedUnpickler(pickle.Unpickler):
    """Only Airlock's own dataclasses and enums may be named in a message."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("airlock.") and not name.startswith("_"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _dumps(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the socket")
        buf += chunk
    return bytes(buf)


def _recv_message(sock: socket.socket) -> Any:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > _MAX_MESSAGE:
        raise EOFError(f"message of {size} bytes is too large")
    return _RestrictedUnpickler(io.BytesIO(_recv_exact(sock, size))).load()


# --- Helper side ------------------------------------------------------------------------------


def _serve_one(request_fd: int) -> None:
    """In a forked child: read the plan, supervise it, send the result back."""
    from airlock.sandbox.contain import SandboxResult, supervise

    sock = socket.socket(fileno=request_fd)
    try:
        plan = _recv_message(sock)
        try:
            result = supervise(plan, sock.fileno())
        except Exception as exc:
            result = SandboxResult(error=f"{type(exc).__name__}: {exc}", error_kind="setup")
        sock.sendall(_dumps(result))
    except (OSError, EOFError):
        pass  # the daemon went away; nothing to report to


def main(argv: list[str] | None = None) -> int:
    """Entry point of the helper: ``python -m airlock.sandbox.spawner FD``."""
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    control.set_inheritable(False)
    sc.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() == 1:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    # Warm the imports every supervisor needs, so forks do not repeat them.
    import airlock.sandbox.contain  # noqa: F401

    fd_size = array.array("i").itemsize
    while True:
        try:
            msg, ancdata, _flags, _addr = control.recvmsg(
                1, socket.CMSG_LEN(fd_size), socket.MSG_CMSG_CLOEXEC
            )
        except InterruptedError:
            continue
        if not msg:
            return 0  # the daemon closed the control socket: shut down
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fd_size)])
        for request_fd in fds:
            pid = os.fork()
            if pid == 0:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _serve_one(request_fd)
                os._exit(0)
            os.close(request_fd)


# --- Daemon side ------------------------------------------------------------------------------


class Run:
    """One dry run in flight: ``result()`` waits for it, ``cancel()`` tears it down."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def result(self) -> Any:
        try:
            return _recv_message(self._sock)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            if self._cancelled:
                raise Cancelled("the request was cancelled; the sandbox was torn down") from None
            raise SandboxError(f"the sandbox supervisor failed: {exc}") from None
        finally:
            self._sock.close()


class Spawner:
    """The daemon's handle on the helper process. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def start(self) -> None:
        """Exec the helper. Call before any gRPC thread exists, and again to restart it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "airlock.sandbox.spawner", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        theirs.close()
        self._control = ours

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def submit(self, plan: object) -> Run:
        """Hand a plan to a new supervisor; returns at once."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._control is None or (self._proc and self._proc.poll() is not None):
                    self.start()  # exec (not fork) from a threaded process is safe
                assert self._control is not None
                fds = array.array("i", [theirs.fileno()])
                self._control.sendmsg([b"R"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            ours.close()
            raise Unavailable(f"the sandbox helper is not running: {exc}") from None
        finally:
            theirs.close()
        try:
            ours.sendall(_dumps(plan))
        except OSError as exc:
            ours.close()
            raise SandboxError(f"could not hand the plan to the sandbox: {exc}") from None
        return Run(ours)

    def stop(self) -> None:
        with self._lock:
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


if __name__ == "__main__":
    sys.exit(main())
