"""Netcap: record every network attempt of a sandbox while nothing leaves the machine.

The sandbox's network namespace has only ``lo``. :func:`install`, run by the
supervisor in that namespace (after ``net.loopback_up()``, before the command
runs), makes it look like a network without being one:

- every IPv4 and IPv6 destination is local (``local 0.0.0.0/0`` and ``local ::/0``
  routes on ``lo``, added over rtnetlink), so ``connect`` and ``sendto`` succeed
  instead of failing with ENETUNREACH, and every packet loops back on ``lo``;
- an nftables ``prerouting`` chain (programmed with the ``nft`` binary) hands
  every TCP connection and UDP datagram that is not plain loopback traffic to the
  supervisor's transparent sockets (TPROXY). Port 53 is taken even towards a
  loopback resolver (``/etc/resolv.conf`` may name 127.0.0.53). Packets in the
  conntrack *reply* direction (what the sinkhole sends back) pass untouched;
- :class:`NetworkRecorder` owns those sockets. A TCP connection's original
  destination is its ``getsockname()``; a datagram's comes with
  ``IP_RECVORIGDSTADDR``. DNS queries (UDP or TCP, port 53) are answered with an
  address from 198.18.0.0/15 per name (AAAA and other types get an empty answer,
  so clients fall back to IPv4), and later connections to that address are
  labelled with the name. TCP connections are read up to 4 KiB or a short
  deadline, then closed without a byte sent back.

The sandbox's own loopback (127.0.0.0/8, ::1, other than port 53) is left alone:
a server the command starts on localhost still works, and the host's loopback is
another namespace's, unreachable from here.

The recorder is driven from the supervisor's single-threaded poll loop through
one descriptor: poll ``fileno()`` (an epoll set) for POLLIN, call ``handle()``
when it is readable or when ``timeout()`` seconds have passed. Nothing blocks;
every structure is bounded (:class:`NetcapLimits`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from airlock.types import NetProtocol

__all__ = [
    "NetProtocol",
    "NetcapLimits",
    "NetworkAttempt",
    "NetworkRecorder",
    "install",
    "parse_http",
    "parse_sni",
]

# Linux socket options Python does not name.
_IP_TRANSPARENT = 19
_IP_RECVORIGDSTADDR = 20  # also the cmsg type IP_ORIGDSTADDR
_IPV6_RECVORIGDSTADDR = 74  # also the cmsg type IPV6_ORIGDSTADDR
_IPV6_TRANSPARENT = 75
_SO_RXQ_OVFL = 40  # a cmsg with the count of datagrams the receive queue dropped
_SO_RCVBUFFORCE = 33
_UDP_RCVBUF = 4 << 20

# rtnetlink
_RTM_NEWROUTE = 24
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_RT_TABLE_LOCAL = 255
_RTPROT_STATIC = 4
_RT_SCOPE_HOST = 254
_RTN_LOCAL = 2
_RTA_OIF, _RTA_TABLE = 4, 15

# The sinkhole's port (TCP and UDP, IPv4 and IPv6). Below 1024, so an unprivileged
# command cannot take it first; it is bound before the command exists anyway.
SINK_PORT = 1
_DNS_PORT = 53
# Answers come from 198.18.0.0/15 (RFC 2544 benchmarking: never a real host).
_FAKE_FIRST = struct.unpack("!I", socket.inet_aton("198.18.0.1"))[0]
_FAKE_LAST = struct.unpack("!I", socket.inet_aton("198.19.255.254"))[0]

_RULESET = """\
table inet airlock_netcap {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    ct direction reply accept
    meta l4proto {{ tcp, udp }} th dport {dns} tproxy to :{port} accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    meta l4proto {{ tcp, udp }} tproxy to :{port} accept
  }}
}}
"""


@dataclass(frozen=True)
class NetworkAttempt:
    """One DNS query, TCP connection or UDP datagram the sandbox tried to send out."""

    protocol: NetProtocol
    # Where it was going: the resolver for DNS, the original destination otherwise.
    address: str
    port: int
    # DNS: the name asked for. TCP/UDP: the name our DNS answer mapped to ``address``.
    dns_name: str = ""
    # DNS only: the query type ("A", "AAAA", "HTTPS", or the number).
    dns_type: str = ""
    # The first bytes sent (at most ``NetcapLimits.payload_bytes``); for DNS the query.
    payload_prefix: bytes = b""
    # Parsed from payload_prefix: a TLS ClientHello's server name, an HTTP request.
    sni: str = ""
    http_method: str = ""
    http_host: str = ""
    http_path: str = ""
    # Everything sent, also past the prefix (until the sinkhole closed the connection).
    bytes_sent: int = 0
    # Seconds since ``NetworkRecorder.origin`` (time.monotonic(); by default, installation).
    time: float = 0.0


@dataclass(frozen=True)
class NetcapLimits:
    max_attempts: int = 1000  # then ``dropped`` counts the rest
    payload_bytes: int = 4096
    max_connections: int = 64  # open at once; past it, new ones are recorded and closed
    read_deadline_s: float = 1.0  # after accept, how long a connection may stay open
    batch: int = 256  # events processed per handle() call


_DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA"}
_DNS_TYPES |= {33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


# --- Set-up ---------------------------------------------------------------------------------


def _add_local_default_route(family: int) -> None:
    """``ip route add local default dev lo table local`` over rtnetlink."""
    rtmsg = struct.pack("BBBBBBBBI", family, 0, 0, 0, _RT_TABLE_LOCAL, _RTPROT_STATIC,
                        _RT_SCOPE_HOST, _RTN_LOCAL, 0)  # fmt: skip
    attrs = struct.pack("HHI", 8, _RTA_OIF, socket.if_nametoindex("lo"))
    attrs += struct.pack("HHI", 8, _RTA_TABLE, _RT_TABLE_LOCAL)
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
    body = rtmsg + attrs
    msg = struct.pack("IHHII", 16 + len(body), _RTM_NEWROUTE, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.sendto(msg, (0, 0))
        reply = nl.recv(65536)
    _length, kind = struct.unpack_from("IH", reply)
    if kind != _NLMSG_ERROR:
        raise OSError(f"netcap: unexpected rtnetlink reply {kind}")
    (error,) = struct.unpack_from("i", reply, 16)
    if error:
        raise OSError(-error, f"netcap: adding a local default route: {os.strerror(-error)}")


def _nft_binary() -> str:
    found = shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise OSError(errno.ENOENT, "netcap: the nft binary (package nftables) is not installed")
    return found


def _program_nftables() -> None:
    ruleset = _RULESET.format(dns=_DNS_PORT, port=SINK_PORT)
    done = subprocess.run(
        [_nft_binary(), "-f", "-"], input=ruleset.encode(), capture_output=True, check=False
    )
    if done.returncode != 0:
        raise OSError(f"netcap: nft failed: {done.stderr.decode(errors='replace').strip()}")


def _transparent(family: int, kind: int) -> socket.socket:
    s = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
            if kind == socket.SOCK_DGRAM:
                s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVORIGDSTADDR, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, _IP_TRANSPARENT, 1)
            if kind == socket.SOCK_DGRAM:
                s.setsockopt(socket.IPPROTO_IP, _IP_RECVORIGDSTADDR, 1)
        if kind == socket.SOCK_DGRAM:
            s.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _UDP_RCVBUF)
    except BaseException:
        s.close()
        raise
    return s


def install(limits: NetcapLimits | None = None) -> NetworkRecorder:
    """Turn the current (sandbox) network namespace into a recorded sinkhole.

    Run as root in a fresh network namespace whose ``lo`` is up, before the
    command starts. Costs a few ms, most of it the ``nft`` process, so it belongs
    to sandbox preparation (the warm pool), not to a request.
    """
    recorder = NetworkRecorder(limits or NetcapLimits())
    try:
        _add_local_default_route(socket.AF_INET)
        _add_local_default_route(socket.AF_INET6)
        for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
            tcp = _transparent(family, socket.SOCK_STREAM)
            recorder._add_listener(tcp)
            tcp.bind((addr, SINK_PORT))
            tcp.listen(128)
            udp = _transparent(family, socket.SOCK_DGRAM)
            recorder._add_datagram(udp)
            udp.bind((addr, SINK_PORT))
        _program_nftables()  # last: until now nothing was redirected to unbound sockets
    except BaseException:
        recorder.close()
        raise
    return recorder


# --- Parsers --------------------------------------------------------------------------------


def parse_sni(data: bytes) -> str:
    """The server name of a TLS ClientHello at the start of ``data`` ("" if none)."""
    try:
        if len(data) < 9 or data[0] != 0x16 or data[5] != 0x01:
            return ""
        end = min(len(data), 5 + struct.unpack_from("!H", data, 3)[0])
        p = 9 + 2 + 32  # record header, handshake header, version, random
        p += 1 + data[p]  # session id
        p += 2 + struct.unpack_from("!H", data, p)[0]  # cipher suites
        p += 1 + data[p]  # compression methods
        ext_end = min(end, p + 2 + struct.unpack_from("!H", data, p)[0])
        p += 2
        while p + 4 <= ext_end:
            ext_type, ext_len = struct.unpack_from("!HH", data, p)
            p += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)...
                q, list_end = p + 2, min(p + ext_len, ext_end)
                while q + 3 <= list_end:
                    name_type, name_len = data[q], struct.unpack_from("!H", data, q + 1)[0]
                    q += 3
                    if name_type == 0:
                        return data[q : q + name_len].decode("ascii", errors="replace")
                    q += name_len
                return ""
            p += ext_len
    except (struct.error, IndexError):
        pass
    return ""


_HTTP_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND MKCOL".split()
)


def parse_http(data: bytes) -> tuple[str, str, str]:
    """(method, Host, path) of an HTTP/1 request at the start of ``data`` ("" if not one)."""
    line, _, rest = data.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in _HTTP_METHODS or not parts[2].startswith(b"HTTP/"):
        return "", "", ""
    host = b""
    for header in rest.split(b"\r\n"):
        if not header:
            break
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip()
            break
    return (
        parts[0].decode("ascii"),
        host.decode("ascii", errors="replace"),
        parts[1].decode("ascii", errors="replace"),
    )


def _parse_dns_query(msg: bytes) -> tuple[int, int, str, int, int] | None:
    """(id, flags, name, qtype, end of question) of a DNS query, or None."""
    if len(msg) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", msg)
    if flags & 0x8000 or qdcount < 1:
        return None
    labels: list[str] = []
    p = 12
    while True:
        if p >= len(msg):
            return None
        n = msg[p]
        p += 1
        if n == 0:
            break
        if n & 0xC0 or len(labels) > 127:
            return None  # compression does not occur in a question
        labels.append(msg[p : p + n].decode("ascii", errors="replace"))
        p += n
    if p + 4 > len(msg):
        return None
    (qtype,) = struct.unpack_from("!H", msg, p)
    return ident, flags, ".".join(labels).lower(), qtype, p + 4


def _dns_answer(msg: bytes, query: tuple[int, int, str, int, int], address: str | None) -> bytes:
    """A response to ``msg``: one A record if ``address``, else an empty NOERROR answer."""
    ident, flags, _name, _qtype, end = query
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080  # QR, opcode, RD copied; RA
    answer = b""
    if address is not None:
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", ident, reply_flags, 1, 1 if answer else 0, 0, 0) + (
        msg[12:end] + answer
    )


def _complete(data: bytearray) -> bool:
    """Whether ``data`` is a whole first message: a TLS record, or an HTTP/1 request with its
    body. The client now waits for an answer that will never come: close at once instead of
    at the read deadline, so that a `curl` in the dry run fails fast."""
    if len(data) >= 5 and data[0] == 0x16:
        record_length: int = struct.unpack_from("!H", data, 3)[0]
        return len(data) >= 5 + record_length
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or not parse_http(bytes(data[: head_end + 4]))[0]:
        return False
    length = 0
    for header in bytes(data[:head_end]).split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return data.endswith(b"0\r\n\r\n")
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return False
    return len(data) >= head_end + 4 + length


# --- The recorder ---------------------------------------------------------------------------


def _sockaddr(family: int, raw: bytes) -> tuple[str, int]:
    if family == socket.AF_INET:
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, addr), port


@dataclass
class _Connection:
    sock: socket.socket
    index: int  # into NetworkRecorder._attempts
    deadline: float
    data: bytearray
    total: int
    dns: bool


class NetworkRecorder:
    """The sinkhole's sockets and what they saw. Made by :func:`install`."""

    def __init__(self, limits: NetcapLimits) -> None:
        self.limits = limits
        self.dropped = 0  # attempts past max_attempts
        self._overflows: dict[int, int] = {}  # per UDP socket: datagrams the kernel dropped
        # Attempt times are relative to this; the supervisor may set it to the run's start
        # (a warm sandbox is installed long before its request).
        self.origin = time.monotonic()
        self._epoll = select.epoll()
        self._listeners: dict[int, socket.socket] = {}
        self._datagrams: dict[int, socket.socket] = {}
        self._connections: dict[int, _Connection] = {}
        self._attempts: list[NetworkAttempt] = []
        self._name_to_addr: dict[str, str] = {}
        self._addr_to_name: dict[str, str] = {}
        self._next_fake = _FAKE_FIRST

    # The supervisor's side.

    @property
    def lost(self) -> int:
        """Datagrams the kernel dropped because a flood outran the supervisor (4 MiB queue)."""
        return sum(self._overflows.values())

    def fileno(self) -> int:
        """One descriptor to poll for POLLIN: readable when any sinkhole socket is."""
        return self._epoll.fileno()

    def timeout(self) -> float | None:
        """Seconds until ``handle()`` must run to close a connection, None if none open."""
        if not self._connections:
            return None
        first = min(c.deadline for c in self._connections.values())
        return max(0.0, first - time.monotonic())

    def handle(self) -> None:
        """Process what is ready (a bounded batch) and expired connections; never blocks."""
        for fd, _events in self._epoll.poll(0, self.limits.batch):
            if fd in self._listeners:
                self._accept(self._listeners[fd])
            elif fd in self._datagrams:
                self._receive(self._datagrams[fd])
            elif fd in self._connections:
                self._read(self._connections[fd])
        now = time.monotonic()
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            self._finish(conn)

    def attempts(self) -> tuple[NetworkAttempt, ...]:
        """Everything recorded so far; ``finish()`` takes in what is still queued first."""
        return tuple(self._attempts)

    def finish(self) -> tuple[NetworkAttempt, ...]:
        """After the command: take in everything still queued, close, return the attempts.

        Each ``handle()`` takes a bounded batch; this repeats it until nothing is ready
        (bounded too: the queues hold at most 2 x 8 MiB), reads the kernel's drop counters
        of the UDP sockets, then closes everything.
        """
        for _ in range(10_000):
            if not self._epoll.poll(0, 1):
                break
            self.handle()
        self._read_drop_counters()
        self.close()
        return self.attempts()

    def _read_drop_counters(self) -> None:
        """Per UDP socket, the datagrams its full queue dropped (the last column of
        /proc/net/udp{,6} in this namespace); SO_RXQ_OVFL misses drops after the last read."""
        inodes = {os.fstat(fd).st_ino: fd for fd in self._datagrams}
        for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    fd = inodes.get(int(fields[9])) if len(fields) > 12 else None
                    if fd is not None:
                        self._overflows[fd] = int(fields[-1])

    def close(self) -> None:
        """Close every socket; what was recorded stays readable."""
        if self._epoll.closed:
            return
        for conn in list(self._connections.values()):
            self._finish(conn)
        for s in (*self._listeners.values(), *self._datagrams.values()):
            s.close()
        self._listeners.clear()
        self._datagrams.clear()
        self._epoll.close()

    # Internals.

    def _add_listener(self, s: socket.socket) -> None:
        self._listeners[s.fileno()] = s
        self._epoll.register(s.fileno(), select.EPOLLIN)

    def _add_datagram(self, s: socket.socket) -> None:
        self._datagrams[s.fileno()] = s
        self._epoll.register(s.fileno(), select.EPOLLIN)

    def _record(self, attempt: NetworkAttempt) -> int:
        if len(self._attempts) >= self.limits.max_attempts:
            self.dropped += 1
            return -1
        self._attempts.append(attempt)
        return len(self._attempts) - 1

    def _now(self) -> float:
        return time.monotonic() - self.origin

    def _fake_address(self, name: str) -> str | None:
        addr = self._name_to_addr.get(name)
        if addr is None:
            if self._next_fake > _FAKE_LAST:
                return None
            addr = socket.inet_ntoa(struct.pack("!I", self._next_fake))
            self._next_fake += 1
            self._name_to_addr[name] = addr
            self._addr_to_name[addr] = name
        return addr

    def _dns(self, msg: bytes, address: str, port: int, index: int = -1) -> bytes | None:
        """Record a DNS query (in place of attempt ``index`` if given); the response to send."""
        query = _parse_dns_query(msg)
        if query is None:
            return None
        _ident, _flags, name, qtype, _end = query
        attempt = NetworkAttempt(
            protocol=NetProtocol.DNS,
            address=address,
            port=port,
            dns_name=name,
            dns_type=_DNS_TYPES.get(qtype, str(qtype)),
            payload_prefix=msg[: self.limits.payload_bytes],
            bytes_sent=len(msg),
            time=self._now(),
        )
        if index >= 0:
            attempt = dataclasses.replace(attempt, time=self._attempts[index].time)
            self._attempts[index] = attempt
        else:
            index = self._record(attempt)
        answer = None
        if qtype == 1:  # A; a name is remembered only for a recorded query (bounded)
            answer = self._fake_address(name) if index >= 0 else self._name_to_addr.get(name)
        return _dns_answer(msg, query, answer)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self.limits.batch):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            address, port = conn.getsockname()[:2]
            index = self._record(
                NetworkAttempt(
                    protocol=NetProtocol.TCP,
                    address=address,
                    port=port,
                    dns_name=self._addr_to_name.get(address, ""),
                    time=self._now(),
                )
            )
            if index < 0 or len(self._connections) >= self.limits.max_connections:
                conn.close()
                continue
            conn.setblocking(False)
            deadline = time.monotonic() + self.limits.read_deadline_s
            c = _Connection(conn, index, deadline, bytearray(), 0, port == _DNS_PORT)
            self._connections[conn.fileno()] = c
            self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _read(self, conn: _Connection) -> None:
        room = self.limits.payload_bytes - len(conn.data)
        try:
            chunk = conn.sock.recv(max(room, 1))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        conn.total += len(chunk)
        conn.data += chunk[:room]
        if conn.dns and len(conn.data) >= 2:
            # DNS over TCP: a 2-byte length, then the query; answer it like one over UDP.
            (length,) = struct.unpack_from("!H", conn.data)
            if len(conn.data) >= 2 + length:
                old = self._attempts[conn.index]
                query = bytes(conn.data[2 : 2 + length])
                reply = self._dns(query, old.address, old.port, conn.index)
                if reply is None:
                    self._update(conn)  # not a DNS query: keep it as a TCP attempt
                else:
                    with contextlib.suppress(OSError):
                        conn.sock.send(struct.pack("!H", len(reply)) + reply)
                self._forget(conn)
                return
        if not chunk or len(conn.data) >= self.limits.payload_bytes or _complete(conn.data):
            self._finish(conn)
        else:
            self._update(conn)

    def _update(self, conn: _Connection) -> None:
        old = self._attempts[conn.index]
        data = bytes(conn.data)
        method, host, path = parse_http(data)
        self._attempts[conn.index] = NetworkAttempt(
            protocol=old.protocol,
            address=old.address,
            port=old.port,
            dns_name=old.dns_name,
            payload_prefix=data,
            sni=parse_sni(data),
            http_method=method,
            http_host=host,
            http_path=path,
            bytes_sent=conn.total,
            time=old.time,
        )

    def _finish(self, conn: _Connection) -> None:
        self._update(conn)  # also an incomplete DNS query: it stays a TCP attempt
        self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        self._connections.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        conn.sock.close()

    def _receive(self, sock: socket.socket) -> None:
        family = sock.family
        level = socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6
        ctype = _IP_RECVORIGDSTADDR if family == socket.AF_INET else _IPV6_RECVORIGDSTADDR
        for _ in range(self.limits.batch):
            try:
                data, ancillary, _flags, peer = sock.recvmsg(
                    65535, socket.CMSG_SPACE(28) + socket.CMSG_SPACE(4)
                )
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to record
            dest = None
            for lvl, t, d in ancillary:
                if lvl == level and t == ctype:
                    dest = d
                elif lvl == socket.SOL_SOCKET and t == _SO_RXQ_OVFL and len(d) >= 4:
                    self._overflows[sock.fileno()] = struct.unpack("=I", d[:4])[0]
            if dest is None:
                continue
            address, port = _sockaddr(family, dest)
            if port == _DNS_PORT:
                reply = self._dns(data, address, port)
                if reply is not None:
                    self._reply(family, (address, port), peer, reply)
                    continue
            self._record(
                NetworkAttempt(
                    protocol=NetProtocol.UDP,
                    address=address,
                    port=port,
                    dns_name=self._addr_to_name.get(address, ""),
                    payload_prefix=data[: self.limits.payload_bytes],
                    bytes_sent=len(data),
                    time=self._now(),
                )
            )

    def _reply(
        self, family: int, source: tuple[str, int], peer: tuple[str, int], data: bytes
    ) -> None:
        """Send ``data`` to ``peer`` from ``source`` (the address the query was sent to)."""
        try:
            with _transparent(family, socket.SOCK_DGRAM) as s:
                s.bind(source)
                s.sendto(data, peer)
        except OSError:
            pass  # the client is gone or the source is taken: it sees a timeout
