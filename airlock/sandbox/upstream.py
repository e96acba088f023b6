"""Upstream: the host-side connections of the egress relay (docs/decisions.md, "Egress").

The network recorder (:mod:`airlock.sandbox.netcap`) lives in the sandbox's network
namespace, in the supervisor's one thread. A connection a grant allows must reach the real
destination, which only the host's network namespace can: this module opens its sockets
there and drives them from the same poll loop, without threads or helper processes.

- **Sockets in the host's namespace.** A socket belongs to the network namespace its
  creator was in when it was made. The supervisor keeps a descriptor of the host's
  namespace from before it unshared; to make an upstream socket it ``setns``-es into it,
  calls ``socket()``, and ``setns``-es back (a few microseconds). Everything else (connect,
  send, receive) works on the descriptor from the sandbox's namespace. (Threads are not an
  option: after the supervisor has unshared its pid namespace, the kernel refuses to create
  them.)
- **Names, resolved here.** ``/etc/hosts`` first, then A and AAAA queries over UDP to the
  host's resolvers (``/etc/resolv.conf``, as the host sees it), non-blocking, with retries
  and a deadline. One resolution per name per run, started when a connection to the name's
  placeholder is forwarded (never for a lookup alone: the recorder caps and counts the names
  resolved, :class:`airlock.sandbox.netcap.NetcapLimits`). For tests only, ``resolve`` maps
  names to addresses without either (``airlockd --test-resolve NAME=ADDR``).
- **Every address checked.** :meth:`airlock.egress.EgressPolicy.upstream` refuses loopback,
  private, link-local, metadata and the host's own addresses unless a CIDR grant names
  them; the first address that passes and accepts a non-blocking connect wins.

The recorder polls :meth:`Upstream.fileno` (an epoll set), calls :meth:`Upstream.handle`
when it is readable or when :meth:`Upstream.timeout` has passed, and gets each finished
connection (or why there is none) as a :class:`Result`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from airlock.egress import EgressPolicy, IPNetwork
from airlock.sandbox import _digest
from airlock.sandbox import _syscalls as sc

__all__ = ["Result", "Upstream", "host_networks", "parse_dns_answer"]

_DNS_TRY_S = 1.0  # per query round, per resolver
_DNS_ROUNDS = 2
_A, _AAAA = 1, 28


@dataclass(frozen=True)
class Result:
    """A finished connection: a connected non-blocking socket, or why there is none."""

    key: int
    sock: socket.socket | None
    address: str = ""  # the real address connected to
    refusal: str = ""  # an airlock.egress.REFUSALS code
    detail: str = ""
    seconds: float = 0.0  # from submit() to the connection (resolution included)


@dataclass
class _Resolution:
    name: str
    addresses: list[tuple[int, str]] = field(default_factory=list)  # (family, address)
    error: str = ""
    done: bool = False
    waiting: list[_Job] = field(default_factory=list)
    sock: socket.socket | None = None
    ids: dict[int, int] = field(default_factory=dict)  # query id -> qtype, still unanswered
    server: int = 0  # index into the resolvers, times rounds
    deadline: float = 0.0


@dataclass
class _Job:
    key: int
    name: str
    address: str
    port: int
    started: float
    deadline: float
    candidates: list[tuple[int, str]] = field(default_factory=list)
    sock: socket.socket | None = None
    trying: str = ""
    refusal: tuple[str, str] | None = None


def parse_dns_answer(msg: bytes) -> tuple[int, int, list[tuple[int, str]]]:
    """(id, rcode, [(family, address), ...]) of a DNS response's A and AAAA answers."""
    ident, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    p = 12

    def skip_name(p: int) -> int:
        while True:
            n = msg[p]
            if n & 0xC0 == 0xC0:
                return p + 2
            p += 1 + n
            if n == 0:
                return p

    for _ in range(qdcount):
        p = skip_name(p) + 4
    found: list[tuple[int, str]] = []
    for _ in range(ancount):
        p = skip_name(p)
        rtype, _cls, _ttl, length = struct.unpack_from("!HHIH", msg, p)
        p += 10
        data = msg[p : p + length]
        if rtype == _A and length == 4:
            found.append((socket.AF_INET, socket.inet_ntop(socket.AF_INET, data)))
        elif rtype == _AAAA and length == 16:
            found.append((socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, data)))
        p += length
    return ident, flags & 0xF, found


def _query(ident: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part for part in name.encode("idna").split(b".") if part)
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + (struct.pack("!HH", qtype, 1))
    )


def _resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    found: list[str] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    found.append(str(ipaddress.ip_address(parts[1].split("%", 1)[0])))
    return found or ["127.0.0.1"]


def _hosts_file(name: str, path: str = "/etc/hosts") -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if len(words) >= 2 and name in (w.rstrip(".").lower() for w in words[1:]):
                with contextlib.suppress(ValueError):
                    ip = ipaddress.ip_address(words[0].split("%", 1)[0])
                    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                    found.append((family, str(ip)))
    return found


def host_networks() -> tuple[IPNetwork, ...]:
    """The networks of the interfaces of the current network namespace."""
    import psutil  # only here: the recorder imports this module in every supervisor

    out: list[IPNetwork] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.address:
                continue
            address = a.address.split("%", 1)[0]
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(address))
                if a.netmask:
                    mask = a.netmask.split("/", 1)[0]
                    out.append(ipaddress.ip_network(f"{address}/{mask}", strict=False))
    return tuple(dict.fromkeys(out))


class Upstream:
    """Resolves granted names and connects to them from the host's network namespace.

    Made in the sandbox's network namespace (the one it returns to after each socket).
    Single-threaded and non-blocking: poll :meth:`fileno`, call :meth:`handle`.
    """

    def __init__(
        self,
        host_netns: int,
        policy: EgressPolicy,
        *,
        resolve: Mapping[str, tuple[str, ...]] | None = None,
        connect_timeout_s: float = 10.0,
        resolvers: list[str] | None = None,
    ) -> None:
        self._host = host_netns
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._policy = policy
        self._overrides = {k.rstrip(".").lower(): v for k, v in (resolve or {}).items()}
        self._timeout = connect_timeout_s
        self._resolvers = resolvers
        self._epoll = select.epoll()
        self._resolutions: dict[str, _Resolution] = {}
        self._by_fd: dict[int, tuple[Callable[[], None], socket.socket]] = {}
        self._jobs: dict[int, _Job] = {}
        self._done: list[Result] = []
        self._networks: tuple[IPNetwork, ...] | None = None

    # The recorder's side.

    def fileno(self) -> int:
        return self._epoll.fileno()

    def timeout(self) -> float | None:
        """Seconds until :meth:`handle` must run (a query to retry, a connect to give up)."""
        deadlines = [r.deadline for r in self._resolutions.values() if not r.done]
        deadlines += [j.deadline for j in self._jobs.values()]
        if self._done:
            return 0.0
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def submit(self, key: int, name: str, address: str, port: int) -> None:
        """Resolve ``name`` (or take the literal ``address``), check, connect to ``port``."""
        now = time.monotonic()
        job = _Job(key, name, address, port, now, now + self._timeout)
        self._jobs[key] = job
        if not name:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            job.candidates = [(family, address)]
            self._next(job)
            return
        resolution = self._resolution(name)
        if resolution.done:
            self._resolved(job, resolution)
        else:
            resolution.waiting.append(job)

    def cancel(self, key: int) -> None:
        """The client went away: drop the job and close its socket."""
        job = self._jobs.pop(key, None)
        if job is not None and job.sock is not None:
            self._forget(job.sock)
            job.sock.close()

    def handle(self) -> list[Result]:
        """Process ready sockets and expired deadlines; the connections finished since."""
        for fd, _events in self._epoll.poll(0):
            entry = self._by_fd.get(fd)
            if entry is not None:
                entry[0]()
        now = time.monotonic()
        for resolution in list(self._resolutions.values()):
            if not resolution.done and resolution.deadline <= now:
                self._retry(resolution)
        for job in list(self._jobs.values()):
            if job.deadline <= now:
                self._fail(job, "connect", f"no connection within {self._timeout:g} s")
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        for key in list(self._jobs):
            self.cancel(key)
        for resolution in self._resolutions.values():
            if resolution.sock is not None:
                resolution.sock.close()
                resolution.sock = None
        for r in self._done:
            if r.sock is not None:
                r.sock.close()
        self._done = []
        self._by_fd.clear()
        if not self._epoll.closed:
            self._epoll.close()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    # Sockets in the host's namespace.

    def _socket(self, family: int, kind: int) -> socket.socket:
        sc.setns(self._host, sc.CLONE_NEWNET)
        try:
            return socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        finally:
            sc.setns(self._home, sc.CLONE_NEWNET)  # never stay in the host's namespace

    def _host_networks(self) -> tuple[IPNetwork, ...]:
        if self._networks is None:
            sc.setns(self._host, sc.CLONE_NEWNET)
            try:
                self._networks = host_networks()
            except Exception:  # psutil failing: the other checks still hold
                self._networks = ()
            finally:
                sc.setns(self._home, sc.CLONE_NEWNET)
        return self._networks

    def _watch(self, sock: socket.socket, events: int, handler: Callable[[], None]) -> None:
        self._by_fd[sock.fileno()] = (handler, sock)
        self._epoll.register(sock.fileno(), events)

    def _forget(self, sock: socket.socket) -> None:
        self._by_fd.pop(sock.fileno(), None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(sock.fileno())

    # Resolution.

    def _resolution(self, name: str) -> _Resolution:
        found = self._resolutions.get(name)
        if found is not None:
            return found
        r = self._resolutions[name] = _Resolution(name)
        override = self._overrides.get(name)
        if override is not None:
            r.addresses = [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in override]
            r.done = True
            return r
        listed = _hosts_file(name)
        if listed:
            r.addresses, r.done = listed, True
            return r
        if self._resolvers is None:
            self._resolvers = _resolvers()
        self._ask(r)
        return r

    def _ask(self, r: _Resolution) -> None:
        """Send the A and AAAA queries to the next resolver."""
        assert self._resolvers is not None
        if r.sock is not None:
            self._forget(r.sock)
            r.sock.close()
            r.sock = None
        server = self._resolvers[r.server % len(self._resolvers)]
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        try:
            sock = self._socket(family, socket.SOCK_DGRAM)
            sock.connect((server, 53))
            r.ids = {}
            for qtype in (_A, _AAAA):
                ident = _digest.random_bits(16)
                r.ids[ident] = qtype
                sock.send(_query(ident, r.name, qtype))
        except OSError as exc:
            r.deadline = 0.0  # try the next resolver at once
            r.error = f"{r.name}: resolver {server}: {exc.strerror or exc}"
            return
        r.sock = sock
        r.deadline = time.monotonic() + _DNS_TRY_S
        self._watch(sock, select.EPOLLIN, lambda: self._answer(r))

    def _answer(self, r: _Resolution) -> None:
        while r.sock is not None:
            try:
                msg = r.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                r.error = f"{r.name}: {exc.strerror or exc}"
                r.deadline = 0.0
                return
            try:
                ident, rcode, found = parse_dns_answer(msg)
            except (struct.error, IndexError):
                continue
            if ident not in r.ids:
                continue
            del r.ids[ident]
            if rcode == 3:
                self._finish(r, f"{r.name} does not exist (NXDOMAIN)")
                return
            r.addresses += found
            if not r.ids:
                self._finish(r, "" if r.addresses else f"{r.name} has no address")
                return

    def _retry(self, r: _Resolution) -> None:
        assert self._resolvers is not None
        r.server += 1
        if r.server >= len(self._resolvers) * _DNS_ROUNDS:
            if r.addresses:  # one of the two answers came: good enough
                self._finish(r, "")
            else:
                self._finish(r, r.error or f"{r.name}: no answer from {', '.join(self._resolvers)}")
            return
        self._ask(r)

    def _finish(self, r: _Resolution, error: str) -> None:
        r.done, r.error = True, error
        if r.sock is not None:
            self._forget(r.sock)
            r.sock.close()
            r.sock = None
        waiting, r.waiting = r.waiting, []
        for job in waiting:
            if job.key in self._jobs:
                self._resolved(job, r)

    def _resolved(self, job: _Job, r: _Resolution) -> None:
        if r.error and not r.addresses:
            self._fail(job, "resolve", r.error)
            return
        # IPv4 first: a host with no IPv6 route fails AAAA connects slowly.
        job.candidates = sorted(r.addresses, key=lambda fa: fa[0] != socket.AF_INET)
        self._next(job)

    # Connection.

    def _next(self, job: _Job) -> None:
        """Try the next candidate address that the policy allows."""
        networks = self._host_networks()
        while job.candidates:
            family, address = job.candidates.pop(0)
            decision = self._policy.upstream(address, job.port, networks)
            if not decision.allowed:
                job.refusal = job.refusal or (decision.refusal, decision.detail)
                continue
            try:
                sock = self._socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                job.refusal = job.refusal or ("connect", f"{address}: {exc.strerror or exc}")
                continue
            code = sock.connect_ex((address, job.port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                why = f"{address}:{job.port}: {os.strerror(code)}"
                job.refusal = job.refusal or ("connect", why)
                continue
            job.sock, job.trying = sock, address
            self._watch(sock, select.EPOLLOUT, lambda: self._connected(job))
            return
        refusal = job.refusal or ("connect", f"no address of {job.name or job.address}")
        self._fail(job, *refusal)

    def _connected(self, job: _Job) -> None:
        sock = job.sock
        if sock is None or self._jobs.get(job.key) is not job:
            return
        self._forget(sock)
        job.sock = None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            sock.close()
            job.refusal = job.refusal or (
                "connect",
                f"{job.trying}:{job.port}: {os.strerror(code)}",
            )
            self._next(job)
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        del self._jobs[job.key]
        elapsed = time.monotonic() - job.started
        self._done.append(Result(job.key, sock, address=job.trying, seconds=elapsed))

    def _fail(self, job: _Job, refusal: str, detail: str) -> None:
        if self._jobs.pop(job.key, None) is None:
            return
        if job.sock is not None:
            self._forget(job.sock)
            job.sock.close()
        elapsed = time.monotonic() - job.started
        self._done.append(Result(job.key, None, refusal=refusal, detail=detail, seconds=elapsed))
