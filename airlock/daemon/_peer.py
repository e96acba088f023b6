"""Caller identity: the kernel's SO_PEERCRED for every connection on the public socket.

gRPC's Python server does not expose the accepted socket, so it cannot read
SO_PEERCRED. Airlock therefore accepts connections on the public socket itself,
reads the caller's pid/uid/gid there, and relays the bytes to the gRPC server's
internal socket (in a root-only 0700 directory). Each relay connection is bound
to a unique abstract address, which gRPC reports as the call's peer
(``unix-abstract:airlock-peer-...``); the servicer maps it back to the
credentials. A caller cannot forge it: only root can reach the internal socket.

The whole identity (pid, uid, gid from SO_PEERCRED, supplementary groups from
SO_PEERGROUPS) is read once, at accept: both are the connecting process's
credentials at ``connect(2)``, and nothing is ever looked up again by pid.

Connections are bounded so that no caller can lock others out: at most
``per_uid`` open connections per non-root uid, and non-root callers together
never take the last ``root_reserve`` of ``max_connections``. A connection past
its limit is relayed (up to ``max_refused`` at once, each for at most
``refused_linger_s``) to a second server at ``refused_path`` that answers every
call RESOURCE_EXHAUSTED with the reason, instead of a bare closed socket; it
never reaches the real server. A connection that sends nothing
within ``first_request_s`` is closed (callers connect when they make a call), and so is one
whose first call has not fully arrived by then: a byte now and then keeps nothing open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

from airlock.types import PeerCred

__all__ = ["ConnectionLimits", "PeerProxy"]

_log = logging.getLogger("airlock.daemon")
_ABSTRACT_PREFIX = "unix-abstract:"
_CHUNK = 256 * 1024
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in every Python
_GID = struct.calcsize("I")


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the public socket holds, and for how long an idle one."""

    max_connections: int = 512
    per_uid: int = 64  # open at once, for each non-root uid
    root_reserve: int = 64  # of max_connections, only root may use these
    max_refused: int = 16  # over-limit connections kept to answer with the reason
    refused_linger_s: float = 5.0
    first_request_s: float = 10.0  # a connection that sends nothing for this long is closed


def _peergroups(conn: socket.socket) -> tuple[int, ...]:
    """The supplementary groups of the process that connected, as they were at connect."""
    size = 64 * _GID
    while True:
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536 * _GID:  # NGROUPS_MAX
                size *= 16
                continue
            raise
        return tuple(sorted(set(struct.unpack(f"{len(raw) // _GID}I", raw))))


def _peercred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=_peergroups(conn))


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS = 0x1  # the HTTP/2 frame that opens a call
_FIRST_REQUEST_MAX = 256 * 1024  # bytes a connection may send before its first call opens


def _first_request(src: socket.socket, dst: socket.socket, within: float) -> bool:
    """Relay ``src`` to ``dst`` until a whole first call has arrived (the HTTP/2 preface, then
    frames up to and including a complete HEADERS frame), within ``within`` seconds in all.

    False if ``src`` ended, or did not get that far in time: a byte now and then does not keep
    a connection that never makes a call."""
    deadline = time.monotonic() + within
    seen = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or len(seen) > _FIRST_REQUEST_MAX:
            return False
        src.settimeout(left)
        try:
            data = src.recv(_CHUNK)
        except TimeoutError:
            return False
        if not data:
            return False
        dst.sendall(data)
        seen += data
        if not _PREFACE.startswith(seen[: len(_PREFACE)]):
            return True  # not HTTP/2: the server answers that itself
        at = len(_PREFACE)
        while len(seen) >= at + 9:  # walk the complete frames
            length = int.from_bytes(seen[at : at + 3], "big")
            if len(seen) < at + 9 + length:
                break
            if seen[at + 3] == _HEADERS:
                return True
            at += 9 + length


def _pump(src: socket.socket, dst: socket.socket, first_within: float | None = None) -> None:
    """Copy ``src`` to ``dst`` until EOF; with ``first_within``, shut both down unless a
    whole first call arrives that soon (:func:`_first_request`)."""
    try:
        if first_within is not None:
            if not _first_request(src, dst, first_within):
                with contextlib.suppress(OSError):
                    src.shutdown(socket.SHUT_RDWR)
                return
            src.settimeout(None)
        while True:
            data = src.recv(_CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class PeerProxy:
    """Accepts callers on ``public_path`` and relays them to ``internal_path``."""

    def __init__(
        self,
        public_path: str,
        internal_path: str,
        *,
        refused_path: str | None = None,
        mode: int,
        gid: int | None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self._public_path = public_path
        self._internal_path = internal_path
        self._refused_path = refused_path
        self._mode = mode
        self._gid = gid
        self._limits = limits or ConnectionLimits()
        self._peers: dict[str, PeerCred] = {}
        self._refused: dict[str, str] = {}  # relay name -> why its calls are refused
        self._open_by_uid: dict[int, int] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        # Set once all of a relay's answers have reached its caller (the server hung up).
        self._answered: set[threading.Event] = set()
        self._prefix = f"airlock-peer-{os.getpid()}-"

    def bind(self) -> None:
        """Create the public socket (mode and group set before anyone can connect)."""
        path = self._public_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a daemon that died
            else:
                raise OSError(f"another daemon is already serving on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(path, -1, self._gid)
        os.chmod(path, self._mode)
        listener.listen(128)
        self._listener = listener

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="airlock-accept", daemon=True).start()

    def peer_of(self, grpc_peer: str) -> PeerCred | None:
        if not grpc_peer.startswith(_ABSTRACT_PREFIX):
            return None
        with self._lock:
            return self._peers.get(grpc_peer[len(_ABSTRACT_PREFIX) :])

    def refusal_of(self, grpc_peer: str) -> str | None:
        """Why calls on this connection are refused (it is over its uid's limit), or None."""
        with self._lock:
            return self._refused.get(grpc_peer[len(_ABSTRACT_PREFIX) :])

    def _admit(self, cred: PeerCred) -> str | None:
        """Count a new connection of ``cred``; None if it may be served, else why not.

        Called with the lock held. A refused connection is not counted."""
        lim = self._limits
        total = sum(self._open_by_uid.values())
        mine = self._open_by_uid.get(cred.uid, 0)
        why = None
        if total >= lim.max_connections:
            why = f"the daemon holds its maximum of {lim.max_connections} connections"
        elif cred.uid != 0 and mine >= lim.per_uid:
            why = (
                f"uid {cred.uid} already has {mine} connections open, the most one user may "
                "have; close idle clients and retry"
            )
        elif cred.uid != 0 and total >= lim.max_connections - lim.root_reserve:
            why = (
                f"the daemon holds {total} connections; the last {lim.root_reserve} of "
                f"{lim.max_connections} are kept for root"
            )
        if why is None:
            self._open_by_uid[cred.uid] = mine + 1
        return why

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stop accepting
            try:
                self._relay(conn)
            except OSError as exc:
                _log.warning("cannot relay a connection", extra={"error": str(exc)})
                conn.close()

    def _relay(self, conn: socket.socket) -> None:
        cred = _peercred(conn)
        with self._lock:
            refused = self._admit(cred)
            if refused is not None and (
                self._refused_path is None or len(self._refused) >= self._limits.max_refused
            ):
                conn.close()  # too many refusals in flight to answer this one too
                _log.warning("connection refused", extra={"uid": cred.uid, "why": refused})
                return
        name = self._prefix + secrets.token_hex(8)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("\0" + name)
            upstream.connect(self._internal_path if refused is None else str(self._refused_path))
        except OSError:
            upstream.close()
            with self._lock:
                if refused is None:
                    self._open_by_uid[cred.uid] -= 1
            raise
        answered = threading.Event()
        with self._lock:
            self._peers[name] = cred
            if refused is not None:
                self._refused[name] = refused
            self._conns.update((conn, upstream))
            self._answered.add(answered)
        if refused is not None:
            _log.warning("connection refused", extra={"uid": cred.uid, "why": refused})
            threading.Timer(self._limits.refused_linger_s, _hang_up, (conn,)).start()
        to_server = threading.Thread(
            target=_pump, args=(conn, upstream, self._limits.first_request_s), daemon=True
        )
        to_server.start()

        def back() -> None:
            _pump(upstream, conn)
            answered.set()
            to_server.join()
            with self._lock:
                self._answered.discard(answered)
                self._peers.pop(name, None)
                if self._refused.pop(name, None) is None:
                    self._open_by_uid[cred.uid] -= 1
                    if not self._open_by_uid[cred.uid]:
                        del self._open_by_uid[cred.uid]
                self._conns.difference_update((conn, upstream))
            conn.close()
            upstream.close()

        threading.Thread(target=back, name="airlock-relay", daemon=True).start()

    def stop_accepting(self) -> None:
        """Close the public socket; relays already running go on until their calls end."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._public_path)

    def close(self, drain_s: float = 5.0) -> None:
        """Stop accepting, let every relay pass on what the server has already sent, then
        hang up on the callers still connected.

        Call it after the gRPC server has stopped: a call that server finished may still be
        on its way to the caller through a relay (a large answer is many socket buffers),
        and the server's hang-up, which ends each relay's copy back, comes after its answer.
        Hanging up at once cut such answers off (the caller saw UNAVAILABLE, "GOAWAY
        received"). ``drain_s`` bounds the wait for a caller that does not read."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_s
        with self._lock:
            answering = list(self._answered)
        for answered in answering:
            answered.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def _hang_up(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
