"""Netcap: a command in a loopback-only network namespace, every attempt recorded, none leaving."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import net, netcap
from airlock.sandbox.netcap import NetProtocol, NetworkAttempt
from tests.helpers.egress import run_recorded
from tests.helpers.fork import in_child

FAKE = ipaddress.ip_network("198.18.0.0/15")


@dataclass(frozen=True)
class Outcome:
    attempts: tuple[NetworkAttempt, ...]
    dropped: int
    lost: int
    setup_ms: float
    status: int
    output: bytes
    fds_before: list[str]
    fds_after: list[str]


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _sandboxed(script: str, close_fds: tuple[int, ...] = ()) -> Outcome:
    """Run ``bash -c script`` as nobody in a fresh netns with a recorder; what it recorded."""

    def run() -> Outcome:
        for fd in close_fds:
            os.close(fd)
        sc.unshare(sc.CLONE_NEWNET)
        net.loopback_up()
        fds_before = _fds()
        t0 = time.perf_counter()
        recorder = netcap.install()
        setup_ms = (time.perf_counter() - t0) * 1000
        status, output = run_recorded(recorder, ["/bin/bash", "-c", script])
        attempts = recorder.finish()
        dropped, lost = recorder.dropped, recorder.lost
        return Outcome(attempts, dropped, lost, setup_ms, status, output, fds_before, _fds())

    result: Outcome = in_child(run)
    return result


def _resolver() -> str:
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    return "127.0.0.1"


PYTHON_PART = """
python3 - <<'EOF'
import socket
addr = socket.gethostbyname("pypi.org")
print("pypi.org is", addr, flush=True)
s = socket.create_connection(("203.0.113.7", 4444), timeout=5)
s.sendall(b"hello")
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"datagram!", ("198.51.100.1", 53000))
u.close()
try:
    socket.create_connection(("127.0.0.1", HOSTPORT), timeout=2).close()
    print("host port reached", flush=True)
except OSError as e:
    print("host port:", e, flush=True)
EOF
"""

CURL_PART = """
curl -s -m 10 -o /dev/null http://example.com/path; echo "curl http: $?"
curl -sk -m 10 -o /dev/null https://pypi.org/; echo "curl https: $?"
"""

PYTHON_WEB_PART = """
python3 - <<'EOF'
import http.client, socket, ssl
c = http.client.HTTPConnection("example.com", timeout=10)
try:
    c.request("GET", "/path")
    c.getresponse()
except Exception as e:
    print("http:", e)
ctx = ssl.create_default_context()
try:
    with socket.create_connection(("pypi.org", 443), timeout=10) as s:
        ctx.wrap_socket(s, server_hostname="pypi.org")
except Exception as e:
    print("https:", e)
EOF
"""


def test_every_attempt_is_recorded_and_nothing_leaves() -> None:
    host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host.bind(("127.0.0.1", 0))
    host.listen(8)
    host.setblocking(False)
    port = host.getsockname()[1]
    web = CURL_PART if shutil.which("curl") else PYTHON_WEB_PART
    try:
        out = _sandboxed(PYTHON_PART.replace("HOSTPORT", str(port)) + web, (host.fileno(),))
        with pytest.raises(BlockingIOError):
            host.accept()  # nothing reached the host's loopback
    finally:
        host.close()
    text = out.output.decode(errors="replace")
    assert out.status == 0, text
    assert "host port: [Errno 111] Connection refused" in text
    assert out.dropped == 0

    resolver = _resolver()
    dns = [a for a in out.attempts if a.protocol == NetProtocol.DNS]
    assert {(a.dns_name, a.dns_type) for a in dns} == {
        ("pypi.org", "A"),
        ("pypi.org", "AAAA"),
        ("example.com", "A"),
        ("example.com", "AAAA"),
    }, dns
    assert {(a.address, a.port) for a in dns} == {(resolver, 53)}

    # The answer the command saw is the address its later connection was labelled with.
    pypi = text.split("pypi.org is ")[1].split()[0]
    assert ipaddress.ip_address(pypi) in FAKE

    # The refused connection to the host's port is recorded with its target, marked: in the
    # sandbox nothing listens there, on the host something does.
    refused = [a for a in out.attempts if a.refusal == netcap.HOST_SERVICE]
    assert [(a.protocol, a.address, a.port) for a in refused] == [
        (NetProtocol.TCP, "127.0.0.1", port)
    ]
    assert refused[0].refusal_detail == netcap.HOST_SERVICE_DETAIL

    # Order holds per socket, not across them: one handle() batch takes the TCP listener's
    # and the UDP socket's events in epoll's order, whichever was sent first.
    tcp = [a for a in out.attempts if a.protocol == NetProtocol.TCP and a.refusal != "host-service"]
    udps = [a for a in out.attempts if a.protocol == NetProtocol.UDP]
    assert [(a.address, a.port, a.dns_name) for a in tcp] == [
        ("203.0.113.7", 4444, ""),
        (tcp[1].address, 80, "example.com"),
        (pypi, 443, "pypi.org"),
    ]
    assert [(a.address, a.port, a.dns_name) for a in udps] == [("198.51.100.1", 53000, "")]
    (raw, http, tls), (udp,) = tcp, udps
    assert ipaddress.ip_address(http.address) in FAKE and http.address != pypi
    assert (raw.payload_prefix, raw.bytes_sent, raw.sni, raw.http_method) == (b"hello", 5, "", "")
    assert (udp.payload_prefix, udp.bytes_sent) == (b"datagram!", 9)
    assert (http.http_method, http.http_host, http.http_path) == ("GET", "example.com", "/path")
    assert http.payload_prefix.startswith(b"GET /path HTTP/1.1\r\n")
    assert tls.sni == "pypi.org" and tls.payload_prefix[:1] == b"\x16"
    assert tls.http_method == "" and 0 < len(tls.payload_prefix) <= 4096
    times = [a.time for a in out.attempts]
    assert times == sorted(times) and times[0] >= 0

    # Everything the recorder opened is closed again.
    assert out.fds_after == out.fds_before


def test_bounds_payload_and_attempts() -> None:
    script = """
python3 - <<'EOF'
import socket
s = socket.create_connection(("192.0.2.1", 80), timeout=5)
s.sendall(b"x" * 10000)
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"y" * 5000, ("192.0.2.2", 999))
for i in range(1100):
    u.sendto(b"z", ("192.0.2.2", 1000 + i % 7))
EOF
"""
    out = _sandboxed(script)
    assert out.status == 0, out.output
    first = out.attempts[0]
    assert (first.protocol, first.address, first.port) == (NetProtocol.TCP, "192.0.2.1", 80)
    assert first.payload_prefix == b"x" * 4096 and first.bytes_sent >= 4096
    big = out.attempts[1]
    assert (big.protocol, big.port, big.payload_prefix, big.bytes_sent) == (
        NetProtocol.UDP,
        999,
        b"y" * 4096,
        5000,
    )
    # 1102 attempts: 1000 kept, the rest counted. A flood the supervisor does not keep up
    # with is counted by the kernel's receive queue instead (``lost``); 1100 tiny datagrams
    # fit in its queue, so ``lost`` stays 0 here.
    assert len(out.attempts) == 1000 and out.dropped + out.lost == 102


def test_datagrams_a_full_receive_queue_dropped_are_counted() -> None:
    """A flood nobody reads in time: what the sink's receive queue dropped is counted
    (``lost``, the socket's kernel counter read at the end), so every datagram sent is
    either recorded or counted."""
    sent = 30_000  # the queue (4 MiB) holds a few thousand tiny datagrams

    def run() -> tuple[int, int, int]:
        sc.unshare(sc.CLONE_NEWNET)
        net.loopback_up()
        recorder = netcap.install()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for i in range(sent):  # the recorder handles nothing until finish()
                u.sendto(b"z", ("192.0.2.3", 1000 + i % 7))
        attempts = recorder.finish()
        return len(attempts), recorder.dropped, recorder.lost

    result: tuple[int, int, int] = in_child(run)
    recorded, dropped, lost = result
    assert lost > 0 and recorded == 1000, result
    assert recorded + dropped + lost == sent, result


def test_ipv6_and_a_silent_client_are_recorded() -> None:
    # A client that waits for the server to speak first is cut off at the read deadline.
    script = """
python3 - <<'EOF'
import socket
s = socket.create_connection(("2001:db8::5", 22), timeout=10)
print("got", s.recv(100), flush=True)
EOF
"""
    out = _sandboxed(script)
    assert out.status == 0, out.output
    assert b"got b''" in out.output
    [a] = out.attempts
    assert (a.protocol, a.address, a.port, a.payload_prefix) == (
        NetProtocol.TCP,
        "2001:db8::5",
        22,
        b"",
    )


def test_dns_over_tcp_and_the_sandboxs_own_loopback() -> None:
    script = """
python3 - <<'EOF'
import socket, struct, threading
query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
query += b"\\x05files\\x04test\\x00" + struct.pack("!HH", 1, 1)
with socket.create_connection(("192.0.2.53", 53), timeout=5) as s:
    s.sendall(struct.pack("!H", len(query)) + query)
    reply = s.recv(512)
ident = struct.unpack_from("!H", reply, 2)[0]
print("answer", socket.inet_ntoa(reply[-4:]), "id", hex(ident), flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected: replies must get through
u.settimeout(5)
u.sendto(query, ("192.0.2.53", 53))
reply, source = u.recvfrom(512)
print("udp answer", socket.inet_ntoa(reply[-4:]), "from", source, flush=True)
server = socket.create_server(("127.0.0.1", 8000))
threading.Thread(target=lambda: server.accept()[0].sendall(b"local ok"), daemon=True).start()
with socket.create_connection(("127.0.0.1", 8000), timeout=5) as c:
    print(c.recv(100).decode(), flush=True)
with socket.create_connection(("files.test", 21), timeout=5) as c:
    pass
EOF
"""
    out = _sandboxed(script)
    text = out.output.decode(errors="replace")
    assert out.status == 0, text
    assert "local ok" in text  # not captured: the sandbox's own loopback works as usual
    answer = text.split("answer ")[1].split()[0]
    assert ipaddress.ip_address(answer) in FAKE and "id 0x1234" in text
    # The same name, the same answer, from the address the query was sent to.
    assert f"udp answer {answer} from ('192.0.2.53', 53)" in text
    query, again, *lookups, conn = out.attempts  # the connection's own lookup: A and AAAA
    assert (again.protocol, again.address, again.dns_name) == (
        NetProtocol.DNS,
        "192.0.2.53",
        "files.test",
    )
    assert sorted((a.protocol, a.dns_name, a.dns_type) for a in lookups) == [
        (NetProtocol.DNS, "files.test", "A"),
        (NetProtocol.DNS, "files.test", "AAAA"),
    ]
    assert (query.protocol, query.address, query.port) == (NetProtocol.DNS, "192.0.2.53", 53)
    assert (query.dns_name, query.dns_type, query.bytes_sent) == ("files.test", "A", 28)
    assert (conn.protocol, conn.address, conn.port, conn.dns_name) == (
        NetProtocol.TCP,
        answer,
        21,
        "files.test",
    )


def test_refused_loopback_attempts_are_recorded_with_their_target() -> None:
    """A connection or datagram no socket of the sandbox takes on loopback is recorded (on
    the host, something may listen there); the command's own loopback server is not, nor is
    a connection it aborts with a reset, nor a UDP exchange with its own socket."""
    script = """
python3 - <<'EOF'
import socket, struct, threading
for family, addr in ((socket.AF_INET, ("127.0.0.1", 9200)), (socket.AF_INET6, ("::1", 9300)),
                     (socket.AF_INET, ("127.0.0.5", 5432))):
    try:
        socket.socket(family).connect(addr)
    except OSError as e:
        print(addr, e.errno, flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"metric:1|c", ("127.0.0.1", 8125))
server = socket.create_server(("127.0.0.1", 8000))
def serve():
    for _ in range(2):
        conn, _peer = server.accept()
        conn.sendall(b"own ok")
        conn.recv(1)  # the client has read it and closed
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # an abort: a reset with its real sequence number
threading.Thread(target=serve, daemon=True).start()
for _ in range(2):
    with socket.create_connection(("127.0.0.1", 8000), timeout=5) as c:
        print(c.recv(100).decode(), flush=True)
mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mine.bind(("127.0.0.1", 0))
u.sendto(b"to myself", mine.getsockname())
print(mine.recv(100).decode(), flush=True)
EOF
"""
    out = _sandboxed(script)
    text = out.output.decode(errors="replace")
    assert out.status == 0, text
    assert text.count("own ok") == 2 and "to myself" in text
    assert text.count(" 111") == 3, text  # ECONNREFUSED, each of them
    assert [(a.protocol, a.address, a.port, a.refusal) for a in out.attempts] == [
        (NetProtocol.TCP, "127.0.0.1", 9200, "host-service"),
        (NetProtocol.TCP, "::1", 9300, "host-service"),
        (NetProtocol.TCP, "127.0.0.5", 5432, "host-service"),
        (NetProtocol.UDP, "127.0.0.1", 8125, "host-service"),
    ]
    assert all(a.refusal_detail == netcap.HOST_SERVICE_DETAIL for a in out.attempts)
    assert out.dropped == out.lost == 0
    assert out.fds_after == out.fds_before


def test_refused_loopback_attempts_are_bounded() -> None:
    script = """
python3 - <<'EOF'
import socket
for i in range(1100):
    try:
        socket.socket().connect(("127.0.0.1", 20000 + i % 5))
    except OSError:
        pass
EOF
"""
    out = _sandboxed(script)
    assert out.status == 0, out.output
    assert len(out.attempts) == 1000 and out.dropped + out.lost == 100
    assert {a.port for a in out.attempts} == set(range(20000, 20005))


def _rules_in_fresh_netns(load: str, batch: bytes = b"") -> tuple[str, str]:
    """(error, `nft list ruleset`) after netcap's rules were loaded in a fresh netns: by
    netcap (``"netcap"``, or ``batch`` through netcap's sender), or by the nft binary from
    the ruleset's text (``"binary"``)."""

    def run() -> tuple[str, str]:
        sc.unshare(sc.CLONE_NEWNET)
        net.loopback_up()
        nft = shutil.which("nft") or "/usr/sbin/nft"
        error = ""
        try:
            if load == "binary":
                text = netcap._RULESET.format(
                    dns=netcap._DNS_PORT, port=netcap.SINK_PORT, group=netcap._NFLOG_GROUP
                )
                subprocess.run([nft, "-f", "-"], input=text.encode(), check=True)
            elif batch:
                netcap._program_nftables(batch)
            else:

                def no_library(commands: bytes) -> None:
                    raise AssertionError("libnftables was used")

                sc.nft_run = no_library  # in this child only: the batch must do it alone
                netcap._program_nftables()
        except OSError as exc:
            error = str(exc)
        listed = subprocess.run([nft, "list", "ruleset"], capture_output=True, check=True)
        return error, listed.stdout.decode()

    result: tuple[str, str] = in_child(run)
    return result


def test_the_batch_loads_the_rules_nft_loads_from_their_text() -> None:
    """netcap's prebuilt netlink batch (no nft process, no libnftables) loads the ruleset
    the nft binary loads from ``_RULESET``: the same listing, table, chains, sets and all."""
    error, via_batch = _rules_in_fresh_netns("netcap")
    error_binary, via_binary = _rules_in_fresh_netns("binary")
    assert error == error_binary == ""
    assert "tproxy to :1" in via_batch and "table inet airlock_netcap" in via_batch
    assert "log group 7" in via_batch and "meta l4proto { tcp, udp }" in via_batch
    assert via_batch == via_binary


def test_a_refused_batch_is_reported_and_none_of_it_is_loaded() -> None:
    # An expression the kernel does not know (in two rules; the messages before them are fine).
    bad = netcap._NFTABLES_BATCH.replace(b"tproxy\0", b"tproxz\0")
    assert bad != netcap._NFTABLES_BATCH
    error, listed = _rules_in_fresh_netns("netcap", bad)
    assert "nf_tables refused message" in error and os.strerror(2) in error, error
    assert listed.strip() == ""  # a batch is all or nothing
