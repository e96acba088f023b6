"""An egress lab: "the internet" for tests, in a network namespace the test creates.

Nothing leaves the machine. :func:`egress_lab` makes a network namespace (unshare) joined to the
host's by a veth pair on a private /30 (10.233.X.0/30, X picked so that it overlaps no
route of the host), a test certificate authority and a server certificate (``openssl``
CLI) for the lab's names, and starts :data:`SERVER` in the namespace: HTTPS on 443 and
plain HTTP on 80, which serve ``GET /bytes/N`` (N bytes), files under ``root`` and accept
any other method, and log every request (method, path, Host, body bytes received) as one
JSON line; and a resolver on UDP port 53 that answers A queries for the lab's names with
the server's address (NXDOMAIN for any other name), logging every query. The server's
process holds the namespace (nothing is mounted); everything (the process, the namespace, the
veth pair) is gone on exit. :func:`package_index` adds pypiserver (over HTTPS) in the same
namespace.

:func:`run_sandboxed` runs a script in a sandbox-like network namespace with the recorder
installed and configured, without a daemon (tests/sandbox, bench/egress.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from airlock.egress import EgressPolicy
from airlock.sandbox import _syscalls as sc
from airlock.sandbox import net, netcap
from airlock.sandbox.netcap import NetcapLimits, NetProtocol, NetworkAttempt
from airlock.sandbox.upstream import Upstream

from .fork import in_child

SERVER = r"""
import http.server, json, os, socket, ssl, struct, sys, threading
log_path, root, cert, key, names, address = sys.argv[1:7]
names = set(names.split(","))
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _log(self, body):
        entry = {"method": self.command, "path": self.path, "host": self.headers.get("Host", ""),
                 "body": body, "tls": isinstance(self.connection, ssl.SSLSocket)}
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _send(self, status, data, head=False):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self, head=False):
        self._log(0)
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if not head:
                chunk = b"x" * 65536
                while n > 0:
                    self.wfile.write(chunk[: min(n, len(chunk))])
                    n -= min(n, len(chunk))
            return
        path = os.path.normpath(os.path.join(root, self.path.split("?")[0].lstrip("/")))
        if path.startswith(root) and os.path.isfile(path):
            with open(path, "rb") as f:
                self._send(200, f.read(), head)
        else:
            self._send(404, b"not found\n", head)

    def do_HEAD(self):
        self.do_GET(head=True)

    def _body(self):
        got = 0
        length = int(self.headers.get("Content-Length", "0") or 0)
        try:
            while got < length:
                chunk = self.rfile.read(min(65536, length - got))
                if not chunk:
                    break
                got += len(chunk)
        finally:
            self._log(got)
        self._send(200, b"stored\n")

    do_POST = do_PUT = do_PATCH = do_DELETE = _body

def serve(port, tls):
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # cut connections are expected
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()

def dns():
    # A resolver for the lab's names: A records with the lab's address, NXDOMAIN else.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        q, peer = s.recvfrom(512)
        ident = struct.unpack_from("!H", q)[0]
        p, labels = 12, []
        while q[p]:
            labels.append(q[p + 1 : p + 1 + q[p]].decode())
            p += 1 + q[p]
        qtype, end = struct.unpack_from("!H", q, p + 1)[0], p + 5
        known = ".".join(labels).lower() in names
        with lock, open(log_path + ".dns", "a") as f:  # every query that reaches the lab
            f.write(".".join(labels) + "\n")
        answer = b""
        if known and qtype == 1:
            answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
        flags = 0x8180 | (0 if known else 3)
        head = struct.pack("!HHHHHH", ident, flags, 1, 1 if answer else 0, 0, 0)
        s.sendto(head + q[12:end] + answer, peer)

threading.Thread(target=dns, daemon=True).start()
threading.Thread(target=serve, args=(80, False), daemon=True).start()
print("ready", flush=True)
serve(443, True)
"""


@dataclass
class Lab:
    pid: int  # the server's process, which holds the lab's network namespace
    host_address: str  # the host's end of the veth
    address: str  # the lab server's address
    cidr: str  # the /30 both are in
    ca: Path  # the test CA's certificate (PEM), readable by everyone
    cert: Path  # the servers' certificate and key, for every lab name
    key: Path
    root: Path  # files the servers serve
    log: Path  # one JSON line per request the servers received
    names: tuple[str, ...]

    def requests(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def dns_queries(self) -> list[str]:
        """Every name the lab's resolver was asked for (one line per query)."""
        path = Path(str(self.log) + ".dns")
        return path.read_text().splitlines() if path.exists() else []

    def resolve_args(self, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
        """airlockd --test-resolve arguments: every lab name to the lab server, and ``extra``."""
        args: list[str] = []
        for name, address in [*((n, self.address) for n in self.names), *extra]:
            args += ["--test-resolve", f"{name}={address}"]
        return args


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _free_subnet() -> ipaddress.IPv4Network:
    routes = subprocess.run(
        ["ip", "-4", "-o", "route", "show", "table", "all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in routes.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
            first = line.split()[1]
        with contextlib.suppress(ValueError):
            if first != "default":
                taken.append(ipaddress.ip_network(first, strict=False))
    for _ in range(200):
        net = ipaddress.IPv4Network(
            f"10.233.{secrets.randbelow(250)}.{4 * secrets.randbelow(64)}/30"
        )
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.233.x.y/30 for the egress lab")


def make_certificates(directory: Path, names: Sequence[str]) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for ``names``, made with openssl."""
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        "openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=Airlock test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _run("openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _run(
        "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    for p in (ca, cert):
        p.chmod(0o644)
    return ca, cert, key


@contextlib.contextmanager
def egress_lab(directory: Path, names: Sequence[str] = ("pkg.test", "other.test")) -> Iterator[Lab]:
    """The lab, in ``directory`` (which other users must be able to traverse)."""
    tag = secrets.token_hex(3)
    host_if, lab_if = f"aleg{tag}h", f"aleg{tag}n"
    net = _free_subnet()
    host_addr, lab_addr = str(net[1]), str(net[2])
    ca, cert, key = make_certificates(directory, names)
    root = directory / "root"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    log = directory / "requests.jsonl"
    server: subprocess.Popen[bytes] | None = None
    try:
        # The server's process holds the namespace (no /run/netns mount that could outlive
        # the test); it binds before the namespace has addresses, then the veth is moved in.
        server = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-c", SERVER,
             str(log), str(root), str(cert), str(key), ",".join(names), lab_addr],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert server.stdout is not None
        if server.stdout.readline() != b"ready\n":
            raise RuntimeError("the egress lab's server did not start")
        inside = ("nsenter", "-t", str(server.pid), "-n", "--")
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", lab_if)
        _run("ip", "link", "set", lab_if, "netns", str(server.pid))
        _run("ip", "addr", "add", f"{host_addr}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run(*inside, "ip", "addr", "add", f"{lab_addr}/30", "dev", lab_if)
        _run(*inside, "ip", "link", "set", lab_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        deadline = time.monotonic() + 10
        while True:  # reachable from the host, on both ports
            try:
                for port in (80, 443):
                    socket.create_connection((lab_addr, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        log.unlink(missing_ok=True)
        yield Lab(server.pid, host_addr, lab_addr, str(net), ca, cert, key, root, log, tuple(names))
    finally:
        if server is not None:
            server.kill()  # the namespace, and the veth pair with it, go with the process
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)


INDEX = r"""
import pypiserver, ssl, sys, wsgiref.simple_server
root, cert, key, port = sys.argv[1:5]
app = pypiserver.app(roots=[root], authenticate=[], password_file=".")

class Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = wsgiref.simple_server.make_server("0.0.0.0", int(port), app, handler_class=Quiet)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def package_index(lab: Lab, packages: Path, port: int = 8443) -> Iterator[str]:
    """pypiserver (from the dev lock) serving ``packages`` over HTTPS on ``port`` in the lab's
    namespace; yields its address as ``ADDRESS:PORT``."""
    proc = subprocess.Popen(
        ["nsenter", "-t", str(lab.pid), "-n", "--", sys.executable, "-c", INDEX,
         str(packages), str(lab.cert), str(lab.key), str(port)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("pypiserver did not start in the egress lab")
        yield f"{lab.address}:{port}"
    finally:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Outcome:
    attempts: tuple[NetworkAttempt, ...]
    status: int
    output: str

    def tcp(self) -> list[NetworkAttempt]:
        return [a for a in self.attempts if a.protocol is NetProtocol.TCP]

    def results(self) -> dict[str, object]:
        """The script's JSON lines ("key": value), merged."""
        out: dict[str, object] = {}
        for line in self.output.splitlines():
            if line.startswith("{"):
                out.update(json.loads(line))
        return out


def run_sandboxed(
    script: str,
    egress: EgressPolicy,
    resolve: dict[str, tuple[str, ...]],
    *,
    marker: str = "",
    limits: NetcapLimits | None = None,
    resolvers: list[str] | None = None,
) -> Outcome:
    """Run ``python3 -c script`` as nobody in a fresh network namespace with the recorder
    installed and configured as the supervisor does (sandbox/contain.py); what it recorded.

    The "sensitive read" is ``marker``: once that file exists, the run is tainted."""

    def run() -> Outcome:
        host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        sc.unshare(sc.CLONE_NEWNET)
        net.loopback_up()
        recorder = netcap.install(limits)
        upstream = Upstream(
            host_net, egress, resolve=resolve, connect_timeout_s=5, resolvers=resolvers
        )
        tainted = (lambda: os.path.exists(marker)) if marker else (lambda: False)
        recorder.configure(egress, upstream, tainted=tainted)
        status, output = run_recorded(recorder, ["/usr/bin/python3", "-c", script])
        return Outcome(recorder.finish(), status, output.decode(errors="replace"))

    result: Outcome = in_child(run)
    return result


def run_recorded(
    recorder: netcap.NetworkRecorder, argv: Sequence[str], timeout_s: float = 60
) -> tuple[int, bytes]:
    """Run ``argv`` as nobody (output and errors to one pipe) while ``recorder`` handles what
    it attempts, until it exits or ``timeout_s`` has passed (then it is killed); its wait
    status (-1 if killed) and output. The recorder is left to finish."""
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        os.execv(argv[0], list(argv))
    os.close(out_w)
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    for fd in (recorder.fileno(), pidfd, out_r):
        poller.register(fd, select.POLLIN)
    output = bytearray()
    deadline = time.monotonic() + timeout_s
    status = -1
    while time.monotonic() < deadline:
        wait = recorder.timeout()
        ms = 1000 if wait is None else int(wait * 1000) + 1
        for fd, _ in poller.poll(ms):
            if fd == out_r:
                chunk = os.read(out_r, 65536)
                output += chunk
                if not chunk:
                    poller.unregister(out_r)
            elif fd == pidfd:
                _, status = os.waitpid(child, 0)
                poller.unregister(pidfd)
        recorder.handle()
        if status != -1:
            break
    else:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    os.close(pidfd)
    os.close(out_r)
    return status, bytes(output)
