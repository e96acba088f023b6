"""Who owns the other end of a TCP connection on this host: the kernel's socket tables.

``airlock mcp --http`` acts as the user who started it, so it must serve only that user's
processes. A TCP peer has no SO_PEERCRED, but a connection made on this host has both ends in
this network namespace's ``/proc/net/tcp`` (``tcp6``): the client's socket is the entry whose
local address is the connection's remote one and whose remote address is the server's; its
``uid`` column is the owner of that socket (the file system uid of the process that created it,
kept by the kernel: no unprivileged process can change it). ``peer_uid`` reads it, and
``SameUserOnly`` (an ASGI middleware) refuses every request whose client socket is not owned by
the server's own uid, before the application sees the request.

Fail closed: an entry that is missing, unparsable, ambiguous, or not held by a process (inode 0:
a closed socket in TIME_WAIT or orphaned, whose uid the kernel reports as 0) gives no owner,
and the request is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["SameUserOnly", "is_local_address", "parse_address", "peer_uid"]

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def parse_address(text: str) -> Address:
    """``0100007F:1F90`` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them:
    the address in 32-bit words of host byte order, the port a number. Raises ValueError."""
    addr, sep, port = text.partition(":")
    if not sep or len(port) != 4:
        raise ValueError(f"not an address in /proc/net/tcp: {text!r}")
    if len(addr) not in (8, 32):
        raise ValueError(f"not an address in /proc/net/tcp: {text!r}")
    packed = b"".join(
        int(addr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr), 8)
    )
    ip = ipaddress.ip_address(packed)
    return ip, int(port, 16)


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    """IPv4-mapped IPv6 addresses as IPv4: a dual-stack socket and an IPv4 one agree."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _owners(client: Address, server: Address, tables: tuple[str, ...]) -> list[tuple[int, int]]:
    """(uid, inode) of every entry whose local end is ``client`` and remote end ``server``."""
    want = ((_canonical(client[0]), client[1]), (_canonical(server[0]), server[1]))
    found: list[tuple[int, int]] = []
    for table in tables:
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel: nothing there
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            if len(fields) < 10:
                raise ValueError(f"a short line in {table}: {line!r}")
            local, remote = parse_address(fields[1]), parse_address(fields[2])
            if ((_canonical(local[0]), local[1]), (_canonical(remote[0]), remote[1])) == want:
                found.append((int(fields[7]), int(fields[9])))
    return found


def peer_uid(
    client: tuple[str, int], server: tuple[str, int], tables: tuple[str, ...] = _TABLES
) -> int | None:
    """The uid owning the client end of the TCP connection ``client`` -> ``server`` (each an
    (address, port) as the server's socket sees them), or None when the kernel's tables do not
    say: no such socket in this network namespace (a remote peer, or one already gone), one no
    process holds (inode 0), several that disagree, or a table that cannot be parsed."""
    try:
        c = (ipaddress.ip_address(client[0].split("%")[0]), int(client[1]))
        s = (ipaddress.ip_address(server[0].split("%")[0]), int(server[1]))
        owners = _owners(c, s, tables)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if not owners or any(inode == 0 for _, inode in owners):
        return None
    uids = {uid for uid, _ in owners}
    return uids.pop() if len(uids) == 1 else None


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this host (of this network namespace): one a socket
    can bind to. Loopback always is; an error other than "not available" counts as local (the
    caller then checks the owner, and refuses when it cannot)."""
    try:
        ip = _canonical(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return True
    if ip.is_loopback:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError as e:
        return e.errno != errno.EADDRNOTAVAIL
    return True


class SameUserOnly:
    """ASGI middleware: HTTP requests (and websockets) are served only when the client's socket
    belongs to ``uid`` (default: this process's effective uid), checked per request from the
    kernel's tables, before ``app`` sees anything. With ``remote`` (``--allow-remote``), a
    client whose address is not one of this host's is let through unchecked; a local one is
    checked all the same. A refusal is HTTP 403 with a one-line reason."""

    def __init__(self, app: App, uid: int | None = None, remote: bool = False) -> None:
        self.app = app
        self.uid = os.geteuid() if uid is None else uid
        self.remote = remote

    def refusal(self, scope: Scope) -> str | None:
        client, server = scope.get("client"), scope.get("server")
        if not client or not server or server[1] is None:
            return "the connection's addresses are unknown (not TCP?)"
        if self.remote and not is_local_address(str(client[0])):
            return None
        owner = peer_uid((str(client[0]), int(client[1])), (str(server[0]), int(server[1])))
        if owner is None:
            return (
                f"the owner of the connection from {client[0]}:{client[1]} could not be "
                "established from /proc/net/tcp"
            )
        if owner != self.uid:
            return (
                f"this MCP server acts as uid {self.uid} and serves only that user's "
                f"processes; the connection belongs to uid {owner}"
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: the application's own start-up
            return
        reason = self.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        body = f"airlock: refused: {reason}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
