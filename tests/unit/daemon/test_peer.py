"""The identity relay's hang-up at shutdown (``airlock.daemon._peer.PeerProxy.close``).

Real Unix sockets: a server on the internal socket, a caller on the public one, the relay
between them. A server's answer larger than the sockets' buffers is still on its way through
the relay when the server hangs up; ``close`` must let it through, and must still end for a
caller that never reads.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from airlock.daemon._peer import PeerProxy

_ANSWER = 16 * 1024 * 1024  # far more than the socket buffers on either side of the relay


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server that answers its caller's first bytes with ``_ANSWER`` bytes, then hangs up;
    yields (proxy, public path, an event set once the server is done, answered or cut off)."""
    internal = str(tmp_path / "internal.sock")
    public = str(tmp_path / "public.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(internal)
    server.listen(4)
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        try:
            with conn:
                conn.recv(64)
                conn.sendall(b"a" * _ANSWER)
        except OSError:
            pass  # the relay hung up on it
        finally:
            done.set()

    threading.Thread(target=serve, daemon=True).start()
    proxy = PeerProxy(public, internal, mode=0o600, gid=None)
    proxy.bind()
    proxy.start()
    try:
        yield proxy, public, done
    finally:
        proxy.close(drain_s=0)
        server.close()


def _read_all(sock: socket.socket) -> int:
    got = 0
    while chunk := sock.recv(1 << 20):
        got += len(chunk)
    return got


def test_close_lets_an_answer_already_sent_reach_its_caller(relay) -> None:  # type: ignore[no-untyped-def]
    proxy, public, _done = relay
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    caller.connect(public)
    caller.sendall(b"hello")  # not HTTP/2: relayed at once
    time.sleep(0.2)  # the server is now blocked in sendall, the buffers full
    closer = threading.Thread(target=proxy.close)  # the daemon's last step after its server
    closer.start()
    time.sleep(0.3)  # a close that hangs up at once has done it by now
    with caller:
        assert _read_all(caller) == _ANSWER
    closer.join(timeout=10)
    assert not closer.is_alive()


def test_close_gives_up_on_a_caller_that_does_not_read(relay) -> None:  # type: ignore[no-untyped-def]
    proxy, public, done = relay
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    caller.connect(public)
    caller.sendall(b"hello")
    time.sleep(0.2)
    proxy.close(drain_s=0.5)  # returns: the bound, not the caller, ends the wait
    with caller:
        assert _read_all(caller) < _ANSWER  # cut off: the caller gets EOF, not a hang
    assert done.wait(5)  # the server's side was hung up on too
