"""Caller identity: the kernel's SO_PEERCRED for every connection on the public socket.

gRPC's Python server does not expose the accepted socket, so it cannot read
SO_PEERCRED. Airlock therefore accepts connections on the public socket itself,
reads the caller's pid/uid/gid there, and relays the bytes to the gRPC server's
internal socket (in a root-only 0700 directory). Each relay connection is bound
to a unique abstract address, which gRPC reports as the call's peer
(``unix-abstract:airlock-peer-...``); the servicer maps it back to the
credentials. A caller cannot forge it: only root can reach the internal socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading

from airlock.types import PeerCred

__all__ = ["PeerProxy"]

_log = logging.getLogger("airlock.daemon")
_ABSTRACT_PREFIX = "unix-abstract:"
_CHUNK = 256 * 1024


def _peercred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
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
        mode: int,
        gid: int | None,
        max_connections: int = 512,
    ) -> None:
        self._public_path = public_path
        self._internal_path = internal_path
        self._mode = mode
        self._gid = gid
        self._max = max_connections
        self._peers: dict[str, PeerCred] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
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
        with self._lock:
            if len(self._conns) >= self._max:
                conn.close()
                return
        cred = _peercred(conn)
        name = self._prefix + secrets.token_hex(8)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.bind("\0" + name)
        upstream.connect(self._internal_path)
        with self._lock:
            self._peers[name] = cred
            self._conns.update((conn, upstream))
        to_server = threading.Thread(target=_pump, args=(conn, upstream), daemon=True)
        to_server.start()

        def back() -> None:
            _pump(upstream, conn)
            to_server.join()
            with self._lock:
                self._peers.pop(name, None)
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

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
