"""Egress grants: which real destinations a sandboxed command may reach. Pure code, no I/O.

A policy's ``egress:`` key (docs/policy-reference.md, "Egress") compiles, per mode (dry
run, Execute), to one :class:`EgressPolicy`: allow entries (the *grants*) and deny
entries. The sandbox's network recorder (:mod:`airlock.sandbox.netcap`) asks it, for
every connection, whether to forward it and under which grant, and for every address a
granted name resolves to, whether that address may be reached at all.

Rules, in order:

1. A deny entry that matches wins: its hosts (exact names, ``*.suffix``, or ``*`` for
   every name), its CIDRs, on its ports (no ports: every port).
2. An allow entry grants a connection to a name in its ``hosts``, or to an address in its
   ``cidrs``, on one of its ``ports``. Nothing else is granted.
3. The address a granted name resolves to is refused when it is not a public unicast
   address (loopback, private, link-local, the 169.254.169.254 metadata service,
   carrier-grade NAT, benchmarking and documentation ranges, multicast; an IPv6 address
   that embeds such an IPv4 address) or lies in one of the host's own networks, unless an
   allow entry's ``cidrs`` names it.

Names are compared in lower case without a trailing dot. Every refusal has a stable code
(:data:`REFUSALS`): effect rules match on it and reports explain it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "HOST_SERVICE",
    "REFUSALS",
    "Decision",
    "EgressPolicy",
    "EgressRule",
    "IPNetwork",
    "host_pattern_problem",
    "normalize_name",
    "special_address",
    "suggestion",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Why an attempt was not forwarded (or was cut): code -> what it means.
REFUSALS: dict[str, str] = {
    "no-grant": "no egress grant of the policy covers it",
    "denied": "an egress deny entry of the policy matches it",
    "address": "the name resolves to a loopback, private, link-local or host address",
    "resolve": "the name did not resolve to an address",
    "connect": "the destination did not accept the connection",
    "name-mismatch": "the TLS server name or HTTP Host is not the name that was looked up",
    "not-fetch": "a dry run forwards only fetches: HTTP GET/HEAD without a body, or TLS",
    "upload-cap": "it sent more than a dry run lets a connection (or a run) send",
    "sensitive-read": "the run had read a sensitive file: nothing is forwarded after that",
    "udp": "UDP is never forwarded",
    "limit": "too many connections at once, or forwarded connections or names in one run",
    "host-service": "a connection or datagram to a loopback port nothing in the sandbox listens"
    " on: refused there, but on the host a service (a database, a search engine) may listen",
}

# The refusal code of an attempt to reach a service on this machine (see REFUSALS).
HOST_SERVICE = "host-service"

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_name(name: str) -> str:
    """A DNS name as grants compare it: lower case, without a trailing dot."""
    return name.strip().rstrip(".").lower()


def host_pattern_problem(pattern: str, *, deny: bool = False) -> tuple[str, str] | None:
    """(message, hint) when ``pattern`` is not a valid host pattern; None when it is.

    A host pattern is a DNS name (``pypi.org``) or ``*.`` and a name (``*.pythonhosted.org``:
    every name below it, not the name itself). ``*`` alone (every name) is for deny entries.
    """
    if pattern == "*":
        if deny:
            return None
        return (
            "a grant of every name ('*')",
            "list the names the command needs; '*' is allowed in deny entries only",
        )
    body = pattern[2:] if pattern.startswith("*.") else pattern
    try:
        ipaddress.ip_address(body.strip("[]"))
    except ValueError:
        pass
    else:
        return (
            f"host pattern {pattern!r} is an address",
            "put addresses and networks in cidrs: (e.g. 203.0.113.7/32)",
        )
    if "*" in body:
        return (
            f"host pattern {pattern!r}: '*' may only begin a pattern, as '*.'",
            "write *.example.com for every name below example.com",
        )
    name = normalize_name(body)
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return (
            f"host pattern {pattern!r} is not a DNS name",
            "letters, digits, '-' and '_' in labels separated by dots; no scheme, port or path",
        )
    if pattern.startswith("*.") and len(labels) < 2:
        return (
            f"host pattern {pattern!r} covers a whole top-level domain",
            "name the registrable domain: *.example.com",
        )
    return None


def _host_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def special_address(ip: IPAddress, host_networks: Iterable[IPNetwork] = ()) -> str:
    """Why ``ip`` must not be reached without a CIDR grant ("" when it may be).

    Anything that is not a public unicast address: loopback, private, link-local (and so
    the 169.254.169.254 metadata service), carrier-grade NAT, benchmarking (which holds the
    sandbox's own placeholder answers, 198.18.0.0/15), documentation and reserved ranges,
    multicast; an IPv6 address embedding such an IPv4 address; and the host's own networks.
    """
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = special_address(inner, host_networks)
        if why:
            return f"{ip} embeds {inner}: {why}"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        extra = " (the cloud metadata service)" if str(ip) == "169.254.169.254" else ""
        return f"{ip} is a link-local address{extra}"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{ip} is not a unicast address"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
        return f"{ip} is a local-use NAT64 address"
    if not ip.is_global:
        return f"{ip} is a private or special-purpose address"
    for net in host_networks:
        if ip.version == net.version and ip in net:
            return f"{ip} is in the host's own network {net}"
    return ""


@dataclass(frozen=True)
class EgressRule:
    """One allow or deny entry."""

    hosts: tuple[str, ...] = ()  # normalized names, "*.suffix", or "*" (deny only)
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: every port
    # Networks as text ("10.0.0.0/8"): the sandbox's message format carries no other classes.
    cidrs: tuple[str, ...] = ()
    # What reports call it: an allow entry's ``name``, its preset's name, or FILE:LINE.
    label: str = ""

    def covers_port(self, port: int) -> bool:
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)

    def names_host(self, name: str) -> bool:
        return bool(name) and any(_host_matches(p, name) for p in self.hosts)

    def names_address(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in _networks(self.cidrs))


@dataclass(frozen=True)
class Decision:
    """A grant's label when allowed; else a refusal code (:data:`REFUSALS`) and a sentence."""

    grant: str = ""
    refusal: str = ""
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return not self.refusal


@functools.lru_cache(maxsize=256)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _ip(address: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class EgressPolicy:
    """The grants of one mode. Empty (no allow entry): nothing is forwarded, as before."""

    allow: tuple[EgressRule, ...] = ()
    deny: tuple[EgressRule, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.allow)

    def lookup(self, name: str) -> Decision:
        """A DNS query for ``name``: granted when some allow entry names it (on any port)."""
        name = normalize_name(name)
        for rule in self.deny:
            if rule.names_host(name) and not rule.ports:
                return Decision(refusal="denied", detail=f"{name} is denied ({rule.label})")
        for rule in self.allow:
            if rule.names_host(name):
                return Decision(grant=rule.label)
        return Decision(refusal="no-grant", detail=f"no grant names {name}")

    def connection(self, name: str, address: str, port: int) -> Decision:
        """A TCP connection to ``name`` (its placeholder address) or, without a name, to the
        literal ``address``, on ``port``."""
        name = normalize_name(name)
        ip = _ip(address) if not name else None
        what = f"{name}:{port}" if name else f"{address}:{port}"
        for rule in self.deny:
            if rule.covers_port(port) and (
                rule.names_host(name) or (ip is not None and rule.names_address(ip))
            ):
                return Decision(refusal="denied", detail=f"{what} is denied ({rule.label})")
        for rule in self.allow:
            if rule.covers_port(port) and (
                rule.names_host(name) or (ip is not None and rule.names_address(ip))
            ):
                return Decision(grant=rule.label)
        return Decision(refusal="no-grant", detail=f"no grant covers {what}")

    def upstream(
        self, address: str, port: int, host_networks: Iterable[IPNetwork] = ()
    ) -> Decision:
        """Whether a resolved ``address`` may be connected to (a ``Decision`` without a grant).

        Denied CIDRs win; special and host addresses need an allow entry whose ``cidrs``
        name them (on this port)."""
        ip = _ip(address)
        if ip is None:
            return Decision(refusal="address", detail=f"{address!r} is not an address")
        for rule in self.deny:
            if rule.covers_port(port) and rule.names_address(ip):
                return Decision(refusal="denied", detail=f"{ip} is denied ({rule.label})")
        why = special_address(ip, host_networks)
        if not why:
            return Decision()
        for rule in self.allow:
            if rule.covers_port(port) and rule.names_address(ip):
                return Decision()
        return Decision(refusal="address", detail=why)


def suggestion(name: str, address: str, port: int) -> str:
    """The allow entry that would grant a refused connection, as one line of YAML."""
    if name:
        return f"{{hosts: [{normalize_name(name)}], ports: [{port}]}}"
    ip = _ip(address)
    net = f"{ip}/{ip.max_prefixlen}" if ip is not None else address
    return f"{{cidrs: [{net}], ports: [{port}]}}"
