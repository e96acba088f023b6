"""Netcap: record every network attempt of a sandbox while nothing leaves the machine.

The sandbox's network namespace has only ``lo``. :func:`install`, run by the
supervisor in that namespace (after ``net.loopback_up()``, before the command
runs), makes it look like a network without being one:

- every IPv4 and IPv6 destination is local (``local 0.0.0.0/0`` and ``local ::/0``
  routes on ``lo``, added over rtnetlink), so ``connect`` and ``sendto`` succeed
  instead of failing with ENETUNREACH, and every packet loops back on ``lo``;
- an nftables ``prerouting`` chain (``_RULESET``, sent as one netlink batch) hands
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
another namespace's, unreachable from here. What the sandbox's loopback *refuses* (a SYN
answered with a reset, a datagram with ICMP port unreachable) is logged by an nftables
``output`` chain to NFLOG and recorded as a ``host-service`` attempt: on the host, a
service may listen at that address and port.

The recorder is driven from the supervisor's single-threaded poll loop through
one descriptor: poll ``fileno()`` (an epoll set) for POLLIN, call ``handle()``
when it is readable or when ``timeout()`` seconds have passed. Nothing blocks;
every structure is bounded (:class:`NetcapLimits`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import re
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from airlock.egress import HOST_SERVICE, Decision, EgressPolicy, normalize_name
from airlock.sandbox.upstream import Upstream
from airlock.types import NetProtocol

__all__ = [
    "HttpFetch",
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
_SO_MEMINFO = 55  # u32 counters; SK_MEMINFO_DROPS, the ninth, is the socket's sk_drops
_SO_MEMINFO_BYTES = 9 * 4
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
  chain output {{
    type filter hook output priority filter; policy accept;
    tcp flags == (rst | ack) tcp sequence 0 log group {group}
    icmp type destination-unreachable icmp code port-unreachable log group {group}
    icmpv6 type destination-unreachable icmpv6 code port-unreachable log group {group}
  }}
}}
"""

# Refused loopback attempts. Everything that is not loopback goes to the sinkhole, so
# the only packets the output chain logs are the kernel's answers to a connection or
# datagram no socket of the sandbox takes: the RST+ACK with sequence 0 that answers a SYN
# to a closed port (a reset that aborts an open connection has its real sequence number),
# and ICMP port unreachable for UDP. They go to NFLOG group _NFLOG_GROUP of this network
# namespace, read by NetworkRecorder as "host-service" attempts: on the host, something
# may listen at that address and port (a search engine, a database), and the command
# that tried it would reach it there.
HOST_SERVICE_DETAIL = "refused in the sandbox; on the host something may listen there"
_NFLOG_GROUP = 7

# Host Unix sockets (a dry run only, ``SandboxTemplate.host_sockets``): a connect to one is
# recorded as a ``host-service`` attempt with the path as its address and the first bytes
# sent, then closed, so the client fails as it would have with ECONNREFUSED.
HOST_SOCKET_DETAIL = "refused in the sandbox; on the host a service listens at this socket"
_NFLOG_COPY = 128  # bytes of each logged packet: IPv6 + ICMPv6 + inner IPv6 + UDP is 96
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET, _NFULNL_MSG_CONFIG = 0, 1
_NFULA_PAYLOAD = 9
_NFULA_CFG_CMD, _NFULA_CFG_MODE, _NFULA_CFG_QTHRESH = 1, 2, 5
_NFULNL_CFG_CMD_BIND = 1
_NFULNL_COPY_PACKET = 2
_NFLOG_RCVBUF = 1 << 20


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
    # Egress (``NetworkRecorder.configure``): whether bytes went to the real destination, the
    # grant that allowed it, why it was refused or cut (an airlock.egress.REFUSALS code; every
    # attempt is "no-grant" when nothing is granted) and a sentence; the bytes relayed back;
    # the real address connected to.
    forwarded: bool = False
    grant: str = ""
    refusal: str = ""
    refusal_detail: str = ""
    bytes_received: int = 0
    upstream_address: str = ""


@dataclass(frozen=True)
class NetcapLimits:
    max_attempts: int = 1000  # then ``dropped`` counts the rest
    payload_bytes: int = 4096
    max_connections: int = 64  # open at once; past it, new ones are recorded and closed
    read_deadline_s: float = 1.0  # after accept, how long a connection may stay open
    batch: int = 256  # events processed per handle() call
    # Egress. A refused connection is reset once its first message is in, or after this long
    # (clients send theirs within a millisecond of connect; one that waits is reset here).
    refuse_wait_s: float = 0.05
    # A granted connection's first message (TLS ClientHello or HTTP request) must come within
    # this long; the upstream connection must be made within connect_timeout_s.
    first_message_s: float = 2.0
    connect_timeout_s: float = 10.0
    # Fetch-only (dry run): what a forwarded connection may send, client to server, its TLS
    # ClientHello included; and every connection of the run together, with the names resolved
    # upstream for it. Enough for requests (an HTTP request is ~0.3-1 KiB), not for uploads.
    upload_bytes: int = 64 * 1024
    upload_bytes_per_run: int = 1024 * 1024
    # A TLS ClientHello larger than this is refused (real ones are ~0.5-3 KiB, post-quantum
    # key shares included); it counts against both caps above.
    tls_hello_bytes: int = 8 * 1024
    # Per run: connections forwarded, and distinct names resolved upstream (a name is resolved
    # only for a forwarded connection to its placeholder, never for a lookup alone).
    forwarded_connections: int = 256
    upstream_names: int = 64
    http_head_bytes: int = 16 * 1024  # one HTTP request head at most
    relay_buffer: int = 256 * 1024  # per direction and connection, before reading pauses


# Execute's per-run counts (configure(fetch_only=False)): an install may fetch from many names.
EXECUTE_LIMITS = NetcapLimits(forwarded_connections=4096, upstream_names=512)

_DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA"}
_DNS_TYPES |= {33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


# --- netcap's rules as one nf_tables batch (issue 16) ---------------------------------------
#
# _RULESET is loaded as the nf_tables netlink batch ``nft -f`` sends for it (nftables 1.0.6,
# message for message; checked against what nft loads from the text in
# tests/sandbox/test_netcap.py), built once here, at import (in the spawner, before it
# forks), and sent as it is by each supervisor: no parsing, no libnftables cache per sandbox.
# The batch names the table, chains and sets, it holds no handle, so the same bytes load in
# any fresh network namespace. The kernel's ABI (include/uapi/linux/netfilter/nf_tables.h):
# attributes in network byte order, nested ones flagged; the anonymous sets are named
# "__set%d" (the kernel numbers them) and a rule finds its set by the batch's set id.
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFT_MSG_NEWTABLE, _NFT_MSG_NEWCHAIN, _NFT_MSG_NEWRULE = 0, 3, 6
_NFT_MSG_NEWSET, _NFT_MSG_NEWSETELEM = 9, 12
_NLM_F_APPEND = 0x800
_NLA_F_NESTED = 0x8000
_NFPROTO_INET, _NFPROTO_IPV4, _NFPROTO_IPV6 = 1, 2, 10
_NF_ACCEPT = 1
_NF_INET_PRE_ROUTING, _NF_INET_LOCAL_OUT = 0, 3
_NFT_REG_VERDICT, _NFT_REG_1 = 0, 1
_NFT_META_NFPROTO, _NFT_META_L4PROTO = 15, 16
_NFT_CT_DIRECTION = 1
_NFT_PAYLOAD_NETWORK, _NFT_PAYLOAD_TRANSPORT = 1, 2
_NFT_SET_ANONYMOUS, _NFT_SET_CONSTANT = 0x1, 0x2
_NFT_TYPE_INET_PROTOCOL = 12  # nft's datatype for a set of IP protocols
_NETCAP_TABLE = "airlock_netcap"


def _nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _nla(kind | _NLA_F_NESTED, b"".join(attrs))


def _be32(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack("!I", value & 0xFFFFFFFF))


def _name(kind: int, value: str) -> bytes:
    return _nla(kind, value.encode() + b"\0")


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, _nla(1, value))  # NFTA_DATA_VALUE


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, _name(1, name), _nest(2, *attrs))  # NFTA_LIST_ELEM{EXPR_NAME, EXPR_DATA}


def _meta(key: int) -> bytes:  # meta <key> into register 1
    return _expr("meta", _be32(2, key), _be32(1, _NFT_REG_1))


def _eq(value: bytes) -> bytes:  # register 1 == value, or the rule stops here
    return _expr("cmp", _be32(1, _NFT_REG_1), _be32(2, 0), _data(3, value))


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", *(_be32(k, v) for k, v in enumerate((1, base, offset, length), 1)))


def _in_set(set_id: int) -> bytes:  # register 1 in the batch's anonymous set ``set_id``
    return _expr("lookup", _be32(2, _NFT_REG_1), _name(1, "__set%d"), _be32(4, set_id))


def _accept() -> bytes:
    verdict = _nest(2, _nest(2, _be32(1, _NF_ACCEPT)))  # IMMEDIATE_DATA{DATA_VERDICT{CODE}}
    return _expr("immediate", _be32(1, _NFT_REG_VERDICT), verdict)


def _tproxy(port: int) -> bytes:  # tproxy to :port (any family)
    to_port = _expr("immediate", _be32(1, _NFT_REG_1), _data(2, struct.pack("!H", port)))
    return to_port + _expr("tproxy", _be32(1, socket.AF_UNSPEC), _be32(3, _NFT_REG_1))


def _log(group: int) -> bytes:
    return _expr("log", _nla(1, struct.pack("!H", group)))  # NFTA_LOG_GROUP


def _l4(protocol: int, nfproto: int = 0) -> bytes:  # what nft checks before a tcp/icmp match
    family = _meta(_NFT_META_NFPROTO) + _eq(bytes([nfproto])) if nfproto else b""
    return family + _meta(_NFT_META_L4PROTO) + _eq(bytes([protocol]))


def _nftables_batch(dns: int, port: int, group: int) -> tuple[bytes, int]:
    """The netlink batch that loads ``_RULESET`` with these values; how many messages it
    asks the kernel to acknowledge."""
    table = _name(1, _NETCAP_TABLE)  # NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE,SET_TABLE,...}
    tcp_udp = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)

    def chain(name: str, hook: int, priority: int) -> bytes:
        hook_attrs = _nest(4, _be32(1, hook), _be32(2, priority))
        return table + _name(3, name) + _name(7, "filter") + _be32(5, _NF_ACCEPT) + hook_attrs

    def rule(chain: str, *exprs: bytes) -> bytes:
        return table + _name(2, chain) + _nest(4, *exprs)

    def anonymous_set(set_id: int, members: tuple[int, ...]) -> tuple[bytes, bytes]:
        # nft's user data (opaque to the kernel, read back by ``nft list``): the key's byte
        # order (host) and its ``typeof``: expression 9 (meta) with key l4proto.
        typeof = bytes([0, 4]) + struct.pack("=I", 9) + bytes([1, 6, 0, 4])
        typeof += struct.pack("=I", _NFT_META_L4PROTO)
        udata = bytes([0, 4]) + struct.pack("=I", 1) + bytes([3, len(typeof)]) + typeof
        new_set = table + _name(2, "__set%d") + _be32(3, _NFT_SET_ANONYMOUS | _NFT_SET_CONSTANT)
        new_set += _be32(4, _NFT_TYPE_INET_PROTOCOL) + _be32(5, 1) + _be32(10, set_id)
        new_set += _nest(9, _be32(1, len(members))) + _nla(13, udata)
        elements = b"".join(_nest(i, _data(1, bytes([m]))) for i, m in enumerate(members, 1))
        new_elements = table + _name(2, "__set%d") + _be32(4, set_id) + _nest(3, elements)
        return new_set, new_elements

    set1, elements1 = anonymous_set(1, tcp_udp)
    set2, elements2 = anonymous_set(2, tcp_udp)
    create = _NLM_F_CREATE
    messages: list[tuple[int, int, bytes]] = [
        (_NFT_MSG_NEWTABLE, 0, table + _be32(2, 0)),
        (_NFT_MSG_NEWCHAIN, create, chain("prerouting", _NF_INET_PRE_ROUTING, -150)),  # mangle
        (_NFT_MSG_NEWCHAIN, create, chain("output", _NF_INET_LOCAL_OUT, 0)),  # filter
        # ct direction reply accept
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "prerouting", _expr("ct", _be32(2, _NFT_CT_DIRECTION), _be32(1, _NFT_REG_1)),
            _eq(b"\x01"), _accept())),
        (_NFT_MSG_NEWSET, create, set1),
        (_NFT_MSG_NEWSETELEM, create, elements1),
        # meta l4proto { tcp, udp } th dport {dns} tproxy to :{port} accept
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "prerouting", _meta(_NFT_META_L4PROTO), _in_set(1),
            _payload(_NFT_PAYLOAD_TRANSPORT, 2, 2), _eq(struct.pack("!H", dns)),
            _tproxy(port), _accept())),
        # ip daddr 127.0.0.0/8 accept
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "prerouting", _meta(_NFT_META_NFPROTO), _eq(bytes([_NFPROTO_IPV4])),
            _payload(_NFT_PAYLOAD_NETWORK, 16, 1), _eq(b"\x7f"), _accept())),
        # ip6 daddr ::1 accept
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "prerouting", _meta(_NFT_META_NFPROTO), _eq(bytes([_NFPROTO_IPV6])),
            _payload(_NFT_PAYLOAD_NETWORK, 24, 16), _eq(socket.inet_pton(socket.AF_INET6, "::1")),
            _accept())),
        (_NFT_MSG_NEWSET, create, set2),
        (_NFT_MSG_NEWSETELEM, create, elements2),
        # meta l4proto { tcp, udp } tproxy to :{port} accept
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "prerouting", _meta(_NFT_META_L4PROTO), _in_set(2), _tproxy(port), _accept())),
        # tcp flags == (rst | ack) tcp sequence 0 log group {group}
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "output", _l4(socket.IPPROTO_TCP), _payload(_NFT_PAYLOAD_TRANSPORT, 13, 1),
            _eq(b"\x14"), _payload(_NFT_PAYLOAD_TRANSPORT, 4, 4), _eq(bytes(4)), _log(group))),
        # icmp type destination-unreachable icmp code port-unreachable log group {group}
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "output", _l4(socket.IPPROTO_ICMP, _NFPROTO_IPV4),
            _payload(_NFT_PAYLOAD_TRANSPORT, 0, 2), _eq(b"\x03\x03"), _log(group))),
        # icmpv6 type destination-unreachable icmpv6 code port-unreachable log group {group}
        (_NFT_MSG_NEWRULE, create | _NLM_F_APPEND, rule(
            "output", _l4(socket.IPPROTO_ICMPV6, _NFPROTO_IPV6),
            _payload(_NFT_PAYLOAD_TRANSPORT, 0, 2), _eq(b"\x01\x04"), _log(group))),
    ]  # fmt: skip
    batch = [_nfnl(_NFNL_MSG_BATCH_BEGIN, 0, 0, socket.AF_UNSPEC, _NFNL_SUBSYS_NFTABLES)]
    for seq, (kind, flags, attrs) in enumerate(messages, 1):
        # every message acknowledged: a loaded batch is seen, not inferred from silence
        msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | kind
        batch.append(_nfnl(msg_type, flags | _NLM_F_ACK, seq, _NFPROTO_INET, 0, attrs))
    batch.append(_nfnl(_NFNL_MSG_BATCH_END, 0, len(messages) + 1, socket.AF_UNSPEC,
                       _NFNL_SUBSYS_NFTABLES))  # fmt: skip
    return b"".join(batch), len(messages)


def _nfnl(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("!BBH", family, 0, res_id) + attrs  # struct nfgenmsg
    return struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | flags, seq, 0) + body


_NFTABLES_BATCH, _NFTABLES_ACKS = _nftables_batch(_DNS_PORT, SINK_PORT, _NFLOG_GROUP)


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


def _program_nftables(batch: bytes = _NFTABLES_BATCH, acks: int = _NFTABLES_ACKS) -> None:
    """Send ``batch`` (by default netcap's rules) to this network namespace's nf_tables; raise
    unless all ``acks`` messages of it are acknowledged (a batch is all or nothing: after an
    error nothing of it is loaded)."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
    ) as nl:
        nl.bind((0, 0))
        nl.sendto(batch, (0, 0))
        # The kernel handles a batch within the send (module loads included): every answer
        # is queued by now, so an empty queue means a missing acknowledgement, never a wait.
        acked = 0
        while acked < acks:
            try:
                reply = nl.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise OSError(
                    f"netcap: nf_tables acknowledged {acked} of {acks} messages"
                ) from None
            offset = 0
            while offset + 20 <= len(reply):
                length, kind, _flags, seq = struct.unpack_from("=IHHI", reply, offset)
                if kind == _NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", reply, offset + 16)
                    if error:
                        what = os.strerror(-error)
                        raise OSError(-error, f"netcap: nf_tables refused message {seq}: {what}")
                    acked += 1
                offset += max(length + (-length % 4), 20)


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


def _nflog_attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + bytes(-length % 4)


def _nflog_socket() -> socket.socket:
    """A netlink socket bound to NFLOG group ``_NFLOG_GROUP`` of this network namespace,
    copying ``_NFLOG_COPY`` bytes of each packet and handing on every packet at once."""
    nl = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        _NETLINK_NETFILTER,
    )
    try:
        nl.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _NFLOG_RCVBUF)
        nl.bind((0, 0))
        for seq, attr in enumerate(
            (
                _nflog_attr(_NFULA_CFG_CMD, bytes([_NFULNL_CFG_CMD_BIND])),
                _nflog_attr(
                    _NFULA_CFG_MODE, struct.pack("!IBB", _NFLOG_COPY, _NFULNL_COPY_PACKET, 0)
                ),
                _nflog_attr(_NFULA_CFG_QTHRESH, struct.pack("!I", 1)),
            ),
            start=1,
        ):
            body = struct.pack("!BBH", socket.AF_UNSPEC, 0, _NFLOG_GROUP) + attr
            kind = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG
            flags = _NLM_F_REQUEST | _NLM_F_ACK
            nl.sendto(struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body, (0, 0))
            select.select([nl], [], [], 1.0)
            reply = nl.recv(65536)
            _length, kind = struct.unpack_from("=IH", reply)
            if kind != _NLMSG_ERROR:
                raise OSError(f"netcap: unexpected NFLOG reply {kind}")
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"netcap: binding NFLOG: {os.strerror(-error)}")
    except BaseException:
        nl.close()
        raise
    return nl


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _refused_loopback(packet: bytes) -> tuple[NetProtocol, str, int] | None:
    """What a logged packet refused: (protocol, address, port) of the attempt, or None.

    A TCP RST answering a SYN comes *from* the address and port that were tried; an ICMP
    port unreachable carries the datagram's IP and UDP headers, whose destination it is.
    Only loopback destinations count (everything else goes to the sinkhole), and not a
    DNS answer of the sinkhole that found its client gone (its source port is 53)."""
    try:
        version = packet[0] >> 4
        if version == 4:
            family, header, proto = socket.AF_INET, (packet[0] & 0xF) * 4, packet[9]
            src, dst = packet[12:16], packet[16:20]
        elif version == 6:
            family, header, proto = socket.AF_INET6, 40, packet[6]
            src, dst = packet[8:24], packet[24:40]
        else:
            return None
        if proto == socket.IPPROTO_TCP:
            (port,) = struct.unpack_from("!H", packet, header)
            address = socket.inet_ntop(family, src)
            return (NetProtocol.TCP, address, port) if _loopback(address) else None
        if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6):
            inner = packet[header + 8 :]
            if version == 4:
                inner_proto, inner_header = inner[9], (inner[0] & 0xF) * 4
                dst = inner[16:20]
            else:
                inner_proto, inner_header = inner[6], 40
                dst = inner[24:40]
            if inner_proto != socket.IPPROTO_UDP or len(dst) != len(src):
                return None
            source_port, port = struct.unpack_from("!HH", inner, inner_header)
            address = socket.inet_ntop(family, dst)
            if source_port == _DNS_PORT or not _loopback(address):
                return None
            return NetProtocol.UDP, address, port
    except (IndexError, struct.error, ValueError):
        pass
    return None


def install(limits: NetcapLimits | None = None) -> NetworkRecorder:
    """Turn the current (sandbox) network namespace into a recorded sinkhole.

    Run as root in a fresh network namespace whose ``lo`` is up, before the
    command starts. Costs about a millisecond (routes, sockets, the rules' netlink batch),
    so it belongs to sandbox preparation (the warm pool), not to a request.
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
        recorder._add_nflog(_nflog_socket())
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


def _host_of(value: str) -> str:
    """The name of a Host header value, without its port, lower case, no trailing dot."""
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value
    else:
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit():
            value = host
    return value.rstrip(".").lower()


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FETCH_METHODS = (b"GET", b"HEAD")


class HttpFetch:
    """Checks a client's stream of HTTP/1 requests: fetches only, to one name.

    ``feed`` returns the bytes that may go to the server (whole request heads that pass),
    and a refusal code with a sentence at the first that does not: a method other than GET
    or HEAD, a body (Content-Length other than 0, Transfer-Encoding), an Upgrade, a request
    target that is not a path (an absolute URL would let the server pick another host), a
    Host other than ``name`` (when a name was looked up), a missing or repeated Host, a
    head over ``max_head`` bytes, or bytes that are not a clean HTTP/1 head (bare CR or LF,
    NUL, folded lines: what a server and this check could read differently).
    """

    def __init__(self, name: str, max_head: int, *, fetch_only: bool = True) -> None:
        self.name = name
        self.max_head = max_head
        # Execute (not fetch-only): any method and a body; only the first request's head is
        # checked (its Host and target), then the stream passes as it is.
        self.fetch_only = fetch_only
        self.passthrough = False
        self.pending = bytearray()
        self.requests = 0

    def feed(self, data: bytes) -> tuple[bytes, str, str]:
        if self.passthrough:
            return data, "", ""
        self.pending += data
        out = bytearray()
        while True:
            end = self.pending.find(b"\r\n\r\n")
            if end < 0:
                if len(self.pending) > self.max_head:
                    return bytes(out), "not-fetch", "an HTTP request head is too large"
                return bytes(out), "", ""
            head = bytes(self.pending[: end + 4])
            refusal, detail = self._check(head[:-4])
            if refusal:
                return bytes(out), refusal, detail
            out += head
            del self.pending[: end + 4]
            self.requests += 1
            if not self.fetch_only:
                self.passthrough = True
                out += self.pending
                self.pending.clear()
                return bytes(out), "", ""

    def _check(self, head: bytes) -> tuple[str, str]:
        if len(head) > self.max_head:
            return "not-fetch", "an HTTP request head is too large"
        lines = head.split(b"\r\n")
        if any(b"\r" in x or b"\n" in x or b"\0" in x for x in lines):
            return "not-fetch", "an HTTP request head with a bare CR, LF or NUL"
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return "not-fetch", "not an HTTP/1 request"
        method, target = parts[0], parts[1]
        if self.fetch_only and method not in _FETCH_METHODS:
            shown = method[:16].decode("ascii", "replace")
            return "not-fetch", f"HTTP {shown} is not a fetch (a dry run forwards GET and HEAD)"
        if not target.startswith(b"/"):
            return "not-fetch", "the HTTP request target is not a path"
        hosts: list[str] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                return "not-fetch", "a malformed HTTP header"
            key, text = name.lower(), value.strip()
            if key == b"host":
                hosts.append(text.decode("ascii", "replace"))
            elif not self.fetch_only:
                continue
            elif (key == b"content-length" and text != b"0") or key == b"transfer-encoding":
                return "not-fetch", "an HTTP request with a body"
            elif key == b"upgrade":
                return "not-fetch", "an HTTP upgrade (to another protocol)"
        if len(hosts) > 1:
            return "name-mismatch", "an HTTP request with more than one Host"
        if self.name:
            if not hosts:
                return "name-mismatch", f"an HTTP request without Host to {self.name}"
            if _host_of(hosts[0]) != self.name:
                return "name-mismatch", f"HTTP Host {hosts[0]!r} is not {self.name}"
        return "", ""


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
    reset: bool = False  # refused under an egress policy: close with a TCP reset


_TLS_HANDSHAKE = 0x16
_HTTP_START = re.compile(rb"[A-Z]{1,16} ")


@dataclass
class _Relay:
    """A connection a grant allowed: the sandbox's client, and (once made) the real server."""

    key: int
    client: socket.socket
    index: int  # into NetworkRecorder._attempts
    name: str  # the name the placeholder address was issued for ("" for a CIDR grant)
    port: int
    grant: str
    deadline: float  # for the first message and the upstream connection; inf once relaying
    upstream: socket.socket | None = None
    upstream_address: str = ""
    mode: str = ""  # "" until the first message is checked, then "tls" or "http"
    first: bytearray = field(default_factory=bytearray)  # client bytes before the check
    http: HttpFetch | None = None
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False
    upstream_shut: bool = False
    sent: int = 0  # every byte the client sent
    prefix: bytearray = field(default_factory=bytearray)  # the first payload_bytes of them
    uploaded: int = 0  # client bytes counted against the caps
    forwarded: int = 0  # client bytes written to the server
    received: int = 0  # server bytes written to the client
    masks: dict[int, int] = field(default_factory=dict)  # fd -> registered epoll mask


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
        self._nflog: socket.socket | None = None  # refused loopback attempts (install())
        self._unix: dict[int, tuple[socket.socket, str]] = {}  # host socket stand-ins, by fd
        self._nflog_lost = 0  # NFLOG messages the kernel dropped (ENOBUFS)
        self._connections: dict[int, _Connection] = {}
        self._attempts: list[NetworkAttempt] = []
        self._name_to_addr: dict[str, str] = {}
        self._addr_to_name: dict[str, str] = {}
        self._next_fake = _FAKE_FIRST
        # Egress (configure()); without it nothing is granted and the sinkhole is as before.
        self._egress: EgressPolicy | None = None
        self._upstream: Upstream | None = None
        self._tainted: Callable[[], bool] | None = None
        self._taint = False  # the run has read a sensitive file: nothing more is forwarded
        self._relays: dict[int, _Relay] = {}  # by key
        self._relay_fds: dict[int, _Relay] = {}  # by client and upstream descriptor
        self._next_key = 0
        self._uploaded = 0  # client bytes forwarded in this run, counted against the cap
        self._forwarded = 0  # connections forwarded in this run
        self._names: set[str] = set()  # names resolved upstream in this run
        # Execute: no fetch-only checks, caps or taint (configure()); attempts that are
        # complete, by index, not yet taken by ``take_done()`` (the Execute stream).
        self._fetch_only = True
        self._done: list[int] = []

    # The supervisor's side.

    def configure(
        self,
        egress: EgressPolicy,
        upstream: Upstream | None,
        *,
        tainted: Callable[[], bool] | None = None,
        fetch_only: bool = True,
    ) -> None:
        """Forward what ``egress`` grants, fetch-only, through ``upstream`` (host side).

        ``tainted()`` says whether the run has read a sensitive file; it is asked before a
        connection is forwarded and before each chunk a client sends is relayed (it must take
        in what the read recorder has queued: an open is queued before it returns, so a read
        that precedes a send is always seen first). Once it says yes, every forwarded
        connection is cut and nothing more is forwarded. None: no read recorder, so nothing
        is forwarded at all (fail closed). Call before the command starts; a policy without
        an allow entry changes nothing.

        Not ``fetch_only`` (Execute, the command runs for real): a granted connection is
        still checked to name what it was granted for (TLS server name, the first HTTP
        request's Host), but may send anything, without caps, and no read taints it; every
        refused one (also with no grant at all) is reset at once, and ``limits`` are those
        of ``EXECUTE_LIMITS``.
        """
        if not fetch_only:
            self._fetch_only = False
            self.limits = dataclasses.replace(
                self.limits,
                forwarded_connections=EXECUTE_LIMITS.forwarded_connections,
                upstream_names=EXECUTE_LIMITS.upstream_names,
            )
            self._egress = egress  # refusals reset at once, also with no allow entry
        if not egress.enabled or upstream is None:
            if upstream is not None:
                upstream.close()
            return
        self._egress, self._upstream, self._tainted = egress, upstream, tainted
        self._epoll.register(upstream.fileno(), select.EPOLLIN)

    def take_done(self) -> tuple[NetworkAttempt, ...]:
        """The attempts completed since the last call (a connection once it is closed)."""
        done = tuple(self._attempts[i] for i in self._done)
        self._done.clear()
        return done

    @property
    def lost(self) -> int:
        """Datagrams the kernel dropped because a flood outran the supervisor (4 MiB queue)."""
        return sum(self._overflows.values()) + self._nflog_lost

    def fileno(self) -> int:
        """One descriptor to poll for POLLIN: readable when any sinkhole socket is."""
        return self._epoll.fileno()

    def timeout(self) -> float | None:
        """Seconds until ``handle()`` must run to close a connection, None if none open."""
        deadlines = [c.deadline for c in self._connections.values()]
        deadlines += [r.deadline for r in self._relays.values() if r.deadline != _NEVER]
        if self._upstream is not None:
            wait = self._upstream.timeout()
            if wait is not None:
                deadlines.append(time.monotonic() + wait)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def handle(self) -> None:
        """Process what is ready (a bounded batch) and expired connections; never blocks."""
        for fd, events in self._epoll.poll(0, self.limits.batch):
            if fd in self._listeners:
                self._accept(self._listeners[fd])
            elif fd in self._datagrams:
                self._receive(self._datagrams[fd])
            elif self._nflog is not None and fd == self._nflog.fileno():
                self._refusals(self._nflog)
            elif fd in self._unix:
                self._accept_unix(*self._unix[fd])
            elif fd in self._connections:
                self._read(self._connections[fd])
            elif fd in self._relay_fds:
                self._relay_event(self._relay_fds[fd], fd, events)
        if self._upstream is not None:  # its sockets (in the epoll set) and its deadlines
            self._upstream_results()
        now = time.monotonic()
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            self._finish(conn)
        for relay in [r for r in self._relays.values() if r.deadline <= now]:
            self._relay_expired(relay)

    def attempts(self) -> tuple[NetworkAttempt, ...]:
        """Everything recorded so far; ``finish()`` takes in what is still queued first."""
        return tuple(self._attempts)

    def finish(self) -> tuple[NetworkAttempt, ...]:
        """After the command: take in everything still queued, close, return the attempts.

        Each ``handle()`` takes a bounded batch; this repeats it until nothing is ready
        (bounded too: the queues hold at most 2 x 8 MiB), reads the kernel's drop counters
        of the UDP sockets, then closes everything.
        """
        for relay in list(self._relays.values()):  # the command is gone: so are its clients
            self._close_relay(relay)
        for _ in range(10_000):
            if not self._epoll.poll(0, 1):
                break
            self.handle()
        self._read_drop_counters()
        self.close()
        return self.attempts()

    def _completed(self, index: int) -> None:
        if index >= 0:
            self._done.append(index)

    def _read_drop_counters(self) -> None:
        """Per UDP socket, the datagrams its full queue dropped: the socket's ``sk_drops``
        through SO_MEMINFO (the "drops" column of /proc/net/udp{,6}, without reading those,
        which walks every UDP hash bucket of the host: ~0.6 ms CPU against 0.13). SO_RXQ_OVFL
        misses drops after the last read."""
        for fd, sock in self._datagrams.items():
            with contextlib.suppress(OSError):
                raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _SO_MEMINFO_BYTES)
                if len(raw) == _SO_MEMINFO_BYTES:  # older kernels have fewer counters
                    self._overflows[fd] = struct.unpack_from("=I", raw, _SO_MEMINFO_BYTES - 4)[0]

    def close(self) -> None:
        """Close every socket; what was recorded stays readable."""
        if self._epoll.closed:
            return
        for relay in list(self._relays.values()):
            self._close_relay(relay, reset=True)
        if self._upstream is not None:
            self._upstream.close()
        for conn in list(self._connections.values()):
            self._finish(conn)
        for s in (
            *self._listeners.values(),
            *self._datagrams.values(),
            *(u for u, _path in self._unix.values()),
        ):
            s.close()
        self._listeners.clear()
        self._datagrams.clear()
        self._unix.clear()
        if self._nflog is not None:
            self._nflog.close()
            self._nflog = None
        self._epoll.close()

    def add_host_socket(self, listener: socket.socket, path: str) -> None:
        """Record connections to ``listener`` (bound over host socket ``path`` in the
        sandbox) as ``host-service`` attempts; the recorder owns it from now on."""
        listener.setblocking(False)
        self._unix[listener.fileno()] = (listener, path)
        self._epoll.register(listener.fileno(), select.EPOLLIN)

    # Internals.

    def _add_listener(self, s: socket.socket) -> None:
        self._listeners[s.fileno()] = s
        self._epoll.register(s.fileno(), select.EPOLLIN)

    def _add_datagram(self, s: socket.socket) -> None:
        self._datagrams[s.fileno()] = s
        self._epoll.register(s.fileno(), select.EPOLLIN)

    def _add_nflog(self, s: socket.socket) -> None:
        self._nflog = s
        self._epoll.register(s.fileno(), select.EPOLLIN)

    def _refusals(self, nl: socket.socket) -> None:
        """Record the loopback attempts the kernel refused (NFLOG messages; a bounded batch)."""
        packet_type = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_PACKET
        for _ in range(self.limits.batch):
            try:
                data = nl.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the queue overflowed: some were lost
                    self._nflog_lost += 1
                    continue
                return
            offset = 0
            while offset + 20 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                end, p = min(offset + length, len(data)), offset + 20  # nlmsghdr, nfgenmsg
                offset += (length + 3) & ~3
                if kind != packet_type:
                    continue
                while p + 4 <= end:
                    attr_length, attr_type = struct.unpack_from("=HH", data, p)
                    if attr_length < 4:
                        break
                    if attr_type & 0x7FFF == _NFULA_PAYLOAD:
                        self._record_refused(data[p + 4 : p + attr_length])
                        break
                    p += (attr_length + 3) & ~3

    def _record_refused(self, packet: bytes) -> None:
        found = _refused_loopback(packet)
        if found is None:
            return
        protocol, address, port = found
        self._completed(
            self._record(
                NetworkAttempt(
                    protocol=protocol,
                    address=address,
                    port=port,
                    time=self._now(),
                    refusal=HOST_SERVICE,
                    refusal_detail=HOST_SERVICE_DETAIL,
                )
            )
        )

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
        decision = self._lookup(name)
        attempt = NetworkAttempt(
            protocol=NetProtocol.DNS,
            address=address,
            port=port,
            dns_name=name,
            dns_type=_DNS_TYPES.get(qtype, str(qtype)),
            payload_prefix=msg[: self.limits.payload_bytes],
            bytes_sent=len(msg),
            time=self._now(),
            grant=decision.grant,
            refusal=decision.refusal,
            refusal_detail=decision.detail,
        )
        if index >= 0:
            attempt = dataclasses.replace(attempt, time=self._attempts[index].time)
            self._attempts[index] = attempt
        else:
            index = self._record(attempt)
            self._completed(index)
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
            name = self._addr_to_name.get(address, "")
            dns = port == _DNS_PORT  # answered here like a query over UDP, never forwarded
            decision = _NO_GRANT if dns else self._decide(name, address, port)
            index = self._record(
                NetworkAttempt(
                    protocol=NetProtocol.TCP,
                    address=address,
                    port=port,
                    dns_name=name,
                    time=self._now(),
                    grant=decision.grant,
                    refusal=decision.refusal,
                    refusal_detail=decision.detail,
                )
            )
            reset = self._egress is not None and not dns
            if index < 0 or len(self._connections) + len(self._relays) >= (
                self.limits.max_connections
            ):
                if index >= 0 and decision.allowed:
                    self._attempts[index] = dataclasses.replace(
                        self._attempts[index], refusal="limit", refusal_detail=_LIMIT
                    )
                self._completed(index)
                _close(conn, reset=reset)
                continue
            conn.setblocking(False)
            if decision.allowed:
                refusal, detail = self._run_caps(name)
                if not refusal:
                    self._start_relay(conn, index, name, address, port, decision.grant)
                    continue
                self._attempts[index] = dataclasses.replace(
                    self._attempts[index], refusal=refusal, refusal_detail=detail
                )
            # Refused: kept until its first message is in (for the record), then reset at
            # once under an egress policy, so that the client fails fast.
            wait = self.limits.refuse_wait_s if reset else self.limits.read_deadline_s
            c = _Connection(conn, index, time.monotonic() + wait, bytearray(), 0, dns, reset)
            self._connections[conn.fileno()] = c
            self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _accept_unix(self, listener: socket.socket, path: str) -> None:
        """A connection to a host socket: recorded, read like a refused TCP one, closed."""
        for _ in range(self.limits.batch):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            index = self._record(
                NetworkAttempt(
                    protocol=NetProtocol.UNIX,
                    address=path,
                    port=0,
                    time=self._now(),
                    refusal=HOST_SERVICE,
                    refusal_detail=HOST_SOCKET_DETAIL,
                )
            )
            if index < 0 or len(self._connections) + len(self._relays) >= (
                self.limits.max_connections
            ):
                self._completed(index)
                conn.close()
                continue
            conn.setblocking(False)
            deadline = time.monotonic() + self.limits.read_deadline_s
            c = _Connection(conn, index, deadline, bytearray(), 0, dns=False)
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
        self._attempts[conn.index] = dataclasses.replace(
            old,
            dns_type="",
            payload_prefix=data,
            sni=parse_sni(data),
            http_method=method,
            http_host=host,
            http_path=path,
            bytes_sent=conn.total,
        )

    def _finish(self, conn: _Connection) -> None:
        self._update(conn)  # also an incomplete DNS query: it stays a TCP attempt
        self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._connections.pop(fd, None) is not None:
            self._completed(conn.index)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        _close(conn.sock, reset=conn.reset)

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
            name = self._addr_to_name.get(address, "")
            decision = _NO_GRANT
            if self._egress is not None:
                decision = self._egress.connection(name, address, port)
                if decision.allowed:
                    decision = Decision(decision.grant, "udp", "UDP is never forwarded")
            self._completed(
                self._record(
                    NetworkAttempt(
                        protocol=NetProtocol.UDP,
                        address=address,
                        port=port,
                        dns_name=name,
                        payload_prefix=data[: self.limits.payload_bytes],
                        bytes_sent=len(data),
                        time=self._now(),
                        grant=decision.grant,
                        refusal=decision.refusal,
                        refusal_detail=decision.detail,
                    )
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

    # Egress: decisions.

    def _lookup(self, name: str) -> Decision:
        if self._egress is None:
            return _NO_GRANT
        decision = self._egress.lookup(name)
        if decision.allowed and self._taint:
            return Decision(decision.grant, "sensitive-read", _TAINTED)
        return decision

    def _decide(self, name: str, address: str, port: int) -> Decision:
        if self._egress is None:
            return _NO_GRANT
        decision = self._egress.connection(name, address, port)
        if decision.allowed and self._check_taint():
            return Decision(decision.grant, "sensitive-read", _TAINTED)
        return decision

    def _run_caps(self, name: str) -> tuple[str, str]:
        """Whether the run may forward one more connection (to ``name``, resolved upstream
        unless it was already): (refusal, detail) when not; else counts it."""
        limits = self.limits
        if self._forwarded >= limits.forwarded_connections:
            return "limit", f"more than {limits.forwarded_connections} connections in one run"
        cost = 0
        if name and name not in self._names:
            if len(self._names) >= limits.upstream_names:
                return "limit", f"more than {limits.upstream_names} names resolved in one run"
            cost = len(name)  # what the queries carry out, whoever answers them
            if self._fetch_only and self._uploaded + cost > limits.upload_bytes_per_run:
                return "upload-cap", f"more than {limits.upload_bytes_per_run} bytes in one run"
            self._names.add(name)
        self._forwarded += 1
        self._uploaded += cost
        return "", ""

    def _check_taint(self) -> bool:
        """Whether the run has read a sensitive file; the first time, cut every relay."""
        if not self._fetch_only:
            return False  # Execute: the command runs for real, reading is no secret kept
        if self._taint:
            return True
        if self._tainted is not None and not self._tainted():
            return False
        self._taint = True
        for relay in list(self._relays.values()):
            self._cut(relay, "sensitive-read", _TAINTED)
        return True

    # Egress: relays.

    def _start_relay(
        self, conn: socket.socket, index: int, name: str, address: str, port: int, grant: str
    ) -> None:
        assert self._upstream is not None
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = self._next_key
        self._next_key += 1
        deadline = time.monotonic() + self.limits.first_message_s
        relay = _Relay(key, conn, index, name, port, grant, deadline)
        self._relays[key] = relay
        self._relay_fds[conn.fileno()] = relay
        self._epoll.register(conn.fileno(), select.EPOLLIN)
        relay.masks[conn.fileno()] = select.EPOLLIN
        # The upstream connection is made while the client sends its first message.
        self._upstream.submit(key, name, "" if name else address, port)

    def _upstream_results(self) -> None:
        assert self._upstream is not None
        for result in self._upstream.handle():
            relay = self._relays.get(result.key)
            if relay is None:  # the client went away (or was cut) meanwhile
                if result.sock is not None:
                    _close(result.sock, reset=True)
                continue
            if result.sock is None:
                self._cut(relay, result.refusal, result.detail)
                continue
            relay.upstream, relay.upstream_address = result.sock, result.address
            fd = result.sock.fileno()
            self._relay_fds[fd] = relay
            self._epoll.register(fd, 0)
            relay.masks[fd] = 0
            if relay.mode:
                relay.deadline = _NEVER
            self._pump(relay)

    def _relay_event(self, relay: _Relay, fd: int, events: int) -> None:
        if self._relays.get(relay.key) is not relay:
            return
        if relay.upstream is not None and fd == relay.upstream.fileno():
            if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self._from_upstream(relay)
            elif events & select.EPOLLOUT:
                self._pump(relay)
            return
        if fd != relay.client.fileno():
            return
        if events & (select.EPOLLERR | select.EPOLLHUP) and not events & select.EPOLLIN:
            self._close_relay(relay, reset=True)  # the client is gone: nobody to answer
        elif events & select.EPOLLIN:
            self._from_client(relay)
        elif events & select.EPOLLOUT:
            self._pump(relay)

    def _from_client(self, relay: _Relay) -> None:
        try:
            chunk = relay.client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close_relay(relay, reset=True)
            return
        if not chunk:
            relay.client_eof = True
            if not relay.mode:  # it closed before its first message: nothing was forwarded
                self._close_relay(relay)
            else:
                self._pump(relay)
            return
        relay.sent += len(chunk)
        room = self.limits.payload_bytes - len(relay.prefix)
        if room > 0:
            relay.prefix += chunk[:room]
        if self._check_taint():  # takes in the read recorder's queue first; cuts every relay
            return
        if relay.mode:
            self._upload(relay, chunk)
        else:
            self._first_message(relay, chunk)
        if self._relays.get(relay.key) is relay:
            self._pump(relay)

    def _first_message(self, relay: _Relay, chunk: bytes) -> None:
        """Check the client's first message: a TLS ClientHello naming the name that was looked
        up, or HTTP/1 requests (checked one by one by HttpFetch); anything else is refused."""
        relay.first += chunk
        data = relay.first
        if data[0] == _TLS_HANDSHAKE:
            if len(data) < 5:
                return
            length: int = struct.unpack_from("!H", data, 3)[0]
            if data[1] != 3 or bytes(data[5:6]) not in (b"", b"\x01"):
                self._cut(relay, "not-fetch", "a TLS record that is not a ClientHello")
                return
            if 5 + length > self.limits.tls_hello_bytes:
                detail = (
                    f"a TLS ClientHello of {5 + length} bytes"
                    f" (at most {self.limits.tls_hello_bytes})"
                )
                self._cut(relay, "upload-cap", detail)
                return
            if len(data) < 5 + length:
                return
            hello = bytes(data[: 5 + length])
            if relay.name:
                sni = normalize_name(parse_sni(hello))
                if sni != relay.name:
                    detail = f"TLS server name {sni or '(none)'} is not {relay.name}"
                    self._cut(relay, "name-mismatch", detail)
                    return
            relay.mode, relay.first = "tls", bytearray()
            self._upload(relay, hello + bytes(data[5 + length :]))  # the caps count it too
        elif _HTTP_START.match(data):
            relay.mode, relay.first = "http", bytearray()
            relay.http = HttpFetch(
                relay.name, self.limits.http_head_bytes, fetch_only=self._fetch_only
            )
            self._upload(relay, bytes(data))
        elif len(data) > 17 or not re.fullmatch(rb"[A-Z]*", data):
            self._cut(relay, "not-fetch", "neither a TLS ClientHello nor an HTTP request")
            return
        if relay.mode and self._relays.get(relay.key) is relay:
            # Checked: from now on only the upstream connection may still be late (the
            # upstream side gives up after connect_timeout_s and says why first).
            relay.deadline = (
                _NEVER
                if relay.upstream is not None
                else time.monotonic() + self.limits.connect_timeout_s + 1
            )

    def _upload(self, relay: _Relay, data: bytes) -> None:
        """Queue client bytes for the server, within the fetch-only checks and the caps."""
        refusal = detail = ""
        if relay.http is not None:
            data, refusal, detail = relay.http.feed(data)
        if data and not self._fetch_only:
            relay.to_upstream += data  # Execute: no caps
        elif data:
            limits = self.limits
            if relay.uploaded + len(data) > limits.upload_bytes:
                detail = f"more than {limits.upload_bytes} bytes sent on one connection"
                self._cut(relay, "upload-cap", detail)
                return
            if self._uploaded + len(data) > limits.upload_bytes_per_run:
                detail = f"more than {limits.upload_bytes_per_run} bytes sent in one run"
                self._cut(relay, "upload-cap", detail)
                return
            relay.uploaded += len(data)
            self._uploaded += len(data)
            relay.to_upstream += data
        if refusal:
            self._cut(relay, refusal, detail)

    def _from_upstream(self, relay: _Relay) -> None:
        assert relay.upstream is not None
        try:
            chunk = relay.upstream.recv(_RELAY_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close_relay(relay, reset=True)
            return
        if chunk and not relay.to_client:
            # Nothing queued: hand it straight on, queue only what the client does not take.
            try:
                n = relay.client.send(chunk)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close_relay(relay, reset=True)
                return
            relay.received += n
            relay.to_client += chunk[n:]
            self._masks(relay)
        elif chunk:
            relay.to_client += chunk
        else:  # the server is done: close its side now, then deliver what is left
            relay.upstream_eof = True
            self._drop_upstream(relay, reset=False)
        self._pump(relay)

    def _pump(self, relay: _Relay) -> None:
        """Write what is queued each way, as far as the sockets take it; half-close; close."""
        up = relay.upstream
        if up is not None and relay.to_upstream:
            try:
                n = up.send(relay.to_upstream)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close_relay(relay, reset=True)
                return
            del relay.to_upstream[:n]
            relay.forwarded += n
        if relay.to_client:
            try:
                n = relay.client.send(relay.to_client)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close_relay(relay, reset=True)
                return
            del relay.to_client[:n]
            relay.received += n
        if (
            up is not None
            and relay.client_eof
            and not relay.to_upstream
            and not relay.upstream_shut
        ):
            relay.upstream_shut = True
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)
        if relay.upstream_eof and not relay.to_client:
            self._close_relay(relay)
            return
        self._masks(relay)

    def _masks(self, relay: _Relay) -> None:
        room = self.limits.relay_buffer
        want = select.EPOLLOUT if relay.to_client else 0
        if not relay.client_eof and len(relay.to_upstream) < room:
            want |= select.EPOLLIN
        self._set_mask(relay, relay.client.fileno(), want)
        if relay.upstream is not None:
            want = select.EPOLLOUT if relay.to_upstream else 0
            if len(relay.to_client) < room:
                want |= select.EPOLLIN
            self._set_mask(relay, relay.upstream.fileno(), want)

    def _set_mask(self, relay: _Relay, fd: int, mask: int) -> None:
        if relay.masks.get(fd) != mask:
            self._epoll.modify(fd, mask)
            relay.masks[fd] = mask

    def _relay_expired(self, relay: _Relay) -> None:
        if not relay.mode:
            detail = f"no TLS ClientHello or HTTP request within {self.limits.first_message_s} s"
            self._cut(relay, "not-fetch", detail)
        elif relay.upstream is None:
            self._cut(relay, "connect", "no connection to the destination in time")
        else:
            relay.deadline = _NEVER

    def _cut(self, relay: _Relay, refusal: str, detail: str) -> None:
        """Refuse or cut a relay: record why, reset both sides."""
        self._record_relay(relay, refusal, detail)
        self._close_relay(relay, reset=True)

    def _drop_upstream(self, relay: _Relay, *, reset: bool) -> None:
        up = relay.upstream
        if up is None:
            return
        fd = up.fileno()
        self._relay_fds.pop(fd, None)
        relay.masks.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        _close(up, reset=reset)
        relay.upstream = None

    def _close_relay(self, relay: _Relay, *, reset: bool = False) -> None:
        if self._relays.pop(relay.key, None) is None:
            return
        if relay.upstream is None and self._upstream is not None:
            self._upstream.cancel(relay.key)  # still connecting: stop
        self._record_relay(relay)
        self._completed(relay.index)
        self._drop_upstream(relay, reset=reset)
        fd = relay.client.fileno()
        self._relay_fds.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        _close(relay.client, reset=reset)

    def _record_relay(self, relay: _Relay, refusal: str = "", detail: str = "") -> None:
        old = self._attempts[relay.index]
        data = bytes(relay.prefix)
        method, host, path = parse_http(data)
        self._attempts[relay.index] = dataclasses.replace(
            old,
            payload_prefix=data,
            sni=parse_sni(data),
            http_method=method,
            http_host=host,
            http_path=path,
            bytes_sent=relay.sent,
            forwarded=relay.forwarded > 0,
            refusal=old.refusal or refusal,
            refusal_detail=old.refusal_detail or detail,
            bytes_received=relay.received,
            upstream_address=relay.upstream_address,
        )


_NEVER = float("inf")
_RELAY_CHUNK = 256 * 1024
_NOTHING = "no egress grant: nothing leaves the sandbox"
_NO_GRANT = Decision(refusal="no-grant", detail=_NOTHING)
_TAINTED = "the run had read a sensitive file: nothing is forwarded after that"
_LIMIT = "too many connections open at once"
_LINGER_RESET = struct.pack("ii", 1, 0)


def _close(sock: socket.socket, *, reset: bool) -> None:
    """Close ``sock``; with ``reset``, abort it (SO_LINGER 0: the peer gets a TCP reset)."""
    if reset:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()
