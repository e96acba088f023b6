"""Attempts to reach a service on this machine, end to end: a real daemon, the default policy.

In the sandbox the host's loopback is another namespace's: a request to a search engine or a
database on 127.0.0.1 is refused there and would have gone unnoticed. The dry run records it
with its target (refusal ``host-service``), the shipped ``effect.network`` asks, the summary
says it, and the host's service never sees the connection.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.api import convert
from airlock.client import Client
from airlock.egress import HOST_SERVICE
from airlock.types import FindingSource, NetProtocol, Validation, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon
from tests.helpers.host import loopback_listener

PY = sys.executable


@pytest.fixture(scope="module")
def default_policy() -> Iterator[Client]:
    with public_dir() as base, running_daemon(base, *TEST_LIMITS) as d, d.client() as c:
        yield c


def dynamic(v: Validation) -> dict[str, Verdict]:
    return {f.rule_id: f.verdict for f in v.findings if f.source is FindingSource.DYNAMIC}


def run_script(client: Client, workspace: Path, code: str) -> Validation:
    """Run ``code`` from a file in the workspace (what a test suite or a tool does inside)."""
    (workspace / "job.py").write_text(code)
    return client.validate(f"{PY} job.py", cwd=str(workspace))


def test_a_request_to_a_service_on_the_hosts_loopback_is_recorded_and_asks(
    default_policy: Client, workspace: Path
) -> None:
    with loopback_listener() as (port, got):
        code = (
            "import socket\n"
            "for port in (9200, PORT):\n"
            "    try:\n"
            "        s = socket.create_connection(('127.0.0.1', port), timeout=2)\n"
            "        s.sendall(b'DELETE /logs HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n')\n"
            "        print('reached', port)\n"
            "    except OSError as e:\n"
            "        print('refused', port, e.errno)\n"
        ).replace("PORT", str(port))
        v = run_script(default_policy, workspace, code)
        # The host's listener works (a probe from the host reaches it) and saw nothing else.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            probe.sendall(b"probe")
        for _ in range(50):
            if got:
                break
            threading.Event().wait(0.05)
        assert got == [b"probe"]
    assert v.exit_code == 0, v.stderr
    assert v.stdout == f"refused 9200 111\nrefused {port} 111\n".encode()
    assert [(a.protocol, a.address, a.port, a.refusal) for a in v.network_attempts] == [
        (NetProtocol.TCP, "127.0.0.1", 9200, HOST_SERVICE),
        (NetProtocol.TCP, "127.0.0.1", port, HOST_SERVICE),
    ]
    assert v.verdict is Verdict.ASK
    assert dynamic(v)["effect.network"] is Verdict.ASK
    assert (
        f"Tried to reach a service on this machine: 127.0.0.1:9200, 127.0.0.1:{port} "
        "(refused in the sandbox; on the host something may listen)."
    ) in v.summary
    back = convert.validation_from_proto(convert.validation_to_proto(v))
    assert back.network_attempts == v.network_attempts


def test_a_datagram_to_a_closed_loopback_port_is_recorded(
    default_policy: Client, workspace: Path
) -> None:
    code = (
        "import socket\n"
        "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "u.sendto(b'deploys:1|c', ('::1', 8125))\n"
    )
    v = run_script(default_policy, workspace, code)
    assert v.exit_code == 0, v.stderr
    assert [(a.protocol, a.address, a.port, a.refusal) for a in v.network_attempts] == [
        (NetProtocol.UDP, "::1", 8125, HOST_SERVICE)
    ]
    assert dynamic(v)["effect.network"] is Verdict.ASK
    assert "Tried to reach a service on this machine: [::1]:8125/udp" in v.summary


def test_a_server_the_command_starts_on_loopback_records_nothing_and_is_allowed(
    default_policy: Client, workspace: Path
) -> None:
    code = (
        "import socket, threading\n"
        "srv = socket.create_server(('127.0.0.1', 9200))\n"
        "def serve():\n"
        "    for _ in range(3):\n"
        "        c, _ = srv.accept(); c.sendall(c.recv(10).upper()); c.close()\n"
        "threading.Thread(target=serve).start()\n"
        "for _ in range(3):\n"
        "    s = socket.create_connection(('127.0.0.1', 9200)); s.sendall(b'ping')\n"
        "    print(s.recv(10).decode())\n"
    )
    v = run_script(default_policy, workspace, code)
    assert v.stdout == b"PING\n" * 3, v.stderr
    assert v.network_attempts == ()
    assert "service on this machine" not in v.summary
    assert v.verdict is Verdict.ALLOW, v.findings
