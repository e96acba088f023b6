"""airlock.cli._tcp_peer: the owner of a loopback connection's client end, read from the
kernel's /proc/net/tcp and tcp6 with real socket pairs (another user's socket is in
tests/daemon/test_mcp.py, which runs as root)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock.cli._tcp_peer import SameUserOnly, is_local_address, parse_address, peer_uid

LITTLE = pytest.mark.skipif(sys.byteorder != "little", reason="the strings are little-endian")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@contextlib.contextmanager
def pair(
    listen: str, connect: str, dual_stack: bool = False
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, accepted) pair: a listener on ``listen``, a client to ``connect``."""
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family) as server:
        if dual_stack:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((listen, 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.socket(socket.AF_INET6 if ":" in connect else socket.AF_INET)
        client.connect((connect, port))
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


def ends(accepted: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client, server) as the server's socket sees them, as ASGI's scope gives them."""
    peer, own = accepted.getpeername(), accepted.getsockname()
    return (peer[0], peer[1]), (own[0], own[1])


def table_line(table: str, local: tuple[str, int]) -> list[str]:
    """The fields of the kernel's entry in ``table`` whose local end is ``local``."""
    ip = ipaddress.ip_address(local[0])
    with open(table) as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if parse_address(fields[1]) == (ip, local[1]):
                return fields
    raise AssertionError(f"no entry for {local} in {table}")


def test_ipv4_pair_is_this_users() -> None:
    with pair("127.0.0.1", "127.0.0.1") as (client, accepted):
        c, s = ends(accepted)
        assert c == client.getsockname()
        assert peer_uid(c, s) == os.geteuid()
        fields = table_line("/proc/net/tcp", c)
        assert parse_address(fields[2]) == (ipaddress.ip_address("127.0.0.1"), s[1])
        assert int(fields[7]) == os.geteuid() and int(fields[9]) != 0
        if sys.byteorder == "little":  # the kernel prints the address as a host-order word
            assert fields[1] == f"0100007F:{c[1]:04X}"


@IPV6
def test_ipv6_pair_is_this_users() -> None:
    with pair("::1", "::1") as (client, accepted):
        c, s = ends(accepted)
        assert c == client.getsockname()[:2]
        assert peer_uid(c, s) == os.geteuid()
        fields = table_line("/proc/net/tcp6", c)
        assert parse_address(fields[2]) == (ipaddress.ip_address("::1"), s[1])
        if sys.byteorder == "little":
            assert fields[1] == f"{'0' * 24}01000000:{c[1]:04X}"


@IPV6
def test_ipv4_client_of_a_dual_stack_listener() -> None:
    """The server sees ::ffff:127.0.0.1; the client's socket is in /proc/net/tcp as IPv4."""
    with pair("::", "127.0.0.1", dual_stack=True) as (client, accepted):
        c, s = ends(accepted)
        assert c[0] == "::ffff:127.0.0.1" and client.family == socket.AF_INET
        assert peer_uid(c, s) == os.geteuid()


def test_only_the_exact_connection_counts() -> None:
    """Both ends must match: the client's port towards another server port, or the same ports
    from another address, are no entry."""
    with pair("127.0.0.1", "127.0.0.1") as (_, accepted):
        c, s = ends(accepted)
        assert peer_uid(("127.0.0.1", c[1]), ("127.0.0.1", s[1] ^ 1)) is None
        assert peer_uid(("127.0.0.2", c[1]), s) is None


def test_a_closed_client_has_no_owner() -> None:
    """A client that closed first is orphaned (FIN_WAIT2, then TIME_WAIT): no process holds it,
    and the kernel prints it with inode 0 and, once in TIME_WAIT, uid 0. No owner (were it
    taken as uid 0, anyone could pass as root by closing right after sending)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.socket()
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        c, s = ends(accepted)
        client.close()  # FIN first: the client's end goes to TIME_WAIT
        assert accepted.recv(1) == b""
        try:
            fields = table_line("/proc/net/tcp", c)
            # Orphaned: no inode. Its uid is the creator's in FIN_WAIT2 (what a non-root run sees
            # here) and 0 in TIME_WAIT: either way no owner may be read from it.
            assert fields[9] == "0" and fields[7] in ("0", str(os.geteuid())), fields
            assert peer_uid(c, s) is None
        finally:
            accepted.close()


def test_a_reset_client_is_gone() -> None:
    with pair("127.0.0.1", "127.0.0.1") as (client, accepted):
        c, s = ends(accepted)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST: no entry left at all
        assert peer_uid(c, s) is None


def test_unreadable_or_garbled_tables_give_no_owner(tmp_path: Path) -> None:
    with pair("127.0.0.1", "127.0.0.1") as (_, accepted):
        c, s = ends(accepted)
        garbled = tmp_path / "tcp"
        garbled.write_text(Path("/proc/net/tcp").read_text() + "  9: 0100007F:ZZZZ junk\n")
        assert peer_uid(c, s, (str(garbled),)) is None
        assert peer_uid(c, s, (str(tmp_path / "absent"),)) is None
        assert peer_uid(("not an address", c[1]), s) is None


@LITTLE
def test_parse_address_strings() -> None:
    v4 = ipaddress.ip_address
    assert parse_address("0100007F:1F90") == (v4("127.0.0.1"), 8080)
    assert parse_address("0302010A:0016") == (v4("10.1.2.3"), 22)
    assert parse_address("00000000000000000000000001000000:0050") == (v4("::1"), 80)
    assert parse_address("B80D0120000000000000000001000000:01BB") == (v4("2001:db8::1"), 443)
    assert parse_address("0000000000000000FFFF00000100007F:0035") == (
        v4("::ffff:127.0.0.1"),
        53,
    )
    for bad in ("0100007F", "0100007F:1F9", "01007F:1F90", "XX00007F:1F90"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_local_addresses() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("::1")
    assert not is_local_address("203.0.113.254")  # TEST-NET-3: no host should have it


def _call(scope: dict[str, Any], uid: int | None = None) -> tuple[bool, list[Any]]:
    """Whether a request with ``scope`` reached the application, and what was sent back."""
    reached: list[Any] = []
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(SameUserOnly(app, uid=uid)(scope, receive, send))
    return bool(reached), sent


def test_middleware_serves_the_same_user_and_refuses_another() -> None:
    with pair("127.0.0.1", "127.0.0.1") as (_, accepted):
        c, s = ends(accepted)
        scope = {"type": "http", "client": c, "server": s, "path": "/mcp"}
        assert _call(scope) == (True, [])
        other = os.geteuid() + 1
        reached, sent = _call(scope, uid=other)
        assert not reached and sent[0]["status"] == 403
        body = sent[1]["body"].decode()
        assert body.count("\n") == 1
        assert f"acts as uid {other}" in body and f"belongs to uid {os.geteuid()}" in body
    # No client address (a Unix socket, a test client): refused, not guessed.
    reached, sent = _call({"type": "http", "client": None, "server": s})
    assert not reached and sent[0]["status"] == 403
    assert _call({"type": "lifespan"}, uid=other) == (True, [])  # start-up is not a request
