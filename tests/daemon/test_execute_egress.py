"""Egress for Execute, end to end: a real daemon whose policy grants the lab's ``pkg.test`` and
``pypi.test`` under ``egress.execute`` (and ``other.test`` only under ``egress.dry_run``), with
``--test-resolve`` pointing the names at the egress lab (tests/helpers/egress.py).

Execute forwards what its grants allow as it is (uploads too: the command runs for real), still
checks that a connection names what it was granted for, refuses everything else at once, and
reports every attempt in the stream as it completes, in the final event and in the audit log.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.policy.store import default_policy_dir
from airlock.types import (
    ExecEvent,
    ExecFinished,
    ExecOutput,
    NetProtocol,
    NetworkAttemptInfo,
    ProcessInfo,
)
from tests.helpers import AIRLOCK, TEST_LIMITS, public_dir, running_daemon
from tests.helpers.egress import Lab, egress_lab, package_index

from .test_egress_pip import wheel_bytes

# Execute's /tmp is private: the system's interpreter, not a venv under /tmp.
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"

GRANT = """\
version: 1
egress:
  execute:
    allow:
      - {{name: lab, hosts: [pkg.test, pypi.test], ports: [80, 443, 8443], cidrs: [{cidr}]}}
  dry_run:
    allow:
      - {{name: lab-dry, hosts: [other.test], ports: [443], cidrs: [{cidr}]}}
"""


@dataclass
class Env:
    lab: Lab
    client: Client
    socket: str


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with (
        public_dir() as base,
        egress_lab(base, names=("pkg.test", "other.test", "pypi.test")) as lab,
    ):
        packages = base / "packages"
        packages.mkdir()
        name, data = wheel_bytes("airlock-demo-hello", "1.0", {"hello/__init__.py": "X = 1\n"})
        (packages / name).write_bytes(data)
        policy = base / "policy"
        shutil.copytree(default_policy_dir(), policy / "default")
        (policy / "lab.yaml").write_text(GRANT.format(cidr=lab.cidr))
        with (
            package_index(lab, packages),
            running_daemon(
                base / "d", *TEST_LIMITS, "--policy-dir", str(policy), *lab.resolve_args()
            ) as d,
            d.client() as client,
        ):
            yield Env(lab, client, d.socket)


@pytest.fixture
def ca(env: Env, workspace: Path) -> str:
    """The lab's CA in the workspace: Execute's /tmp (where the lab keeps it) is private."""
    shutil.copy(env.lab.ca, workspace / "ca.pem")
    return "ca.pem"


def execute(lab_env: Env, command: str, workspace: Path, **kw: object) -> list[ExecEvent]:
    return list(lab_env.client.execute(command, cwd=str(workspace), **kw))  # type: ignore[arg-type]


def finished(events: list[ExecEvent]) -> ExecFinished:
    assert isinstance(events[-1], ExecFinished), events[-1]
    return events[-1]


def streamed(events: list[ExecEvent]) -> list[NetworkAttemptInfo]:
    return [e for e in events if isinstance(e, NetworkAttemptInfo)]


def tcp(
    attempts: list[NetworkAttemptInfo] | tuple[NetworkAttemptInfo, ...],
) -> list[NetworkAttemptInfo]:
    return [a for a in attempts if a.protocol is NetProtocol.TCP]


def stderr(events: list[ExecEvent]) -> str:
    data = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 2)
    return data.decode(errors="replace")


def test_execute_uploads_to_a_granted_name_and_streams_the_attempt(
    env: Env, workspace: Path, ca: str
) -> None:
    # 300 KB: past a dry run's 64 KiB per connection. (A connection is reported once closed;
    # the sleep keeps the command running past that.)
    script = (
        "import ssl, urllib.request\n"
        f"ctx = ssl.create_default_context(cafile={ca!r})\n"
        "req = urllib.request.Request('https://pkg.test/upload', data=b'r' * 300_000)\n"
        "print(urllib.request.urlopen(req, context=ctx).status)\n"
    )
    before = len(env.lab.requests())
    events = execute(env, f"{PY} -c {shlex.quote(script)} && sleep 0.5", workspace)
    end = finished(events)
    assert end.exit_code == 0, stderr(events)
    (post,) = [r for r in env.lab.requests()[before:]]
    assert (post["method"], post["path"], post["body"], post["host"]) == (
        "POST",
        "/upload",
        300_000,
        "pkg.test",
    )
    # The attempt came in the stream, before the end and before the processes.
    live = tcp(streamed(events))
    assert len(live) == 1
    a = live[0]
    assert (a.forwarded, a.grant, a.refusal, a.sni, a.dns_name) == (
        True,
        "lab",
        "",
        "pkg.test",
        "pkg.test",
    )
    assert a.bytes_sent > 300_000 and a.bytes_received > 0
    assert a.upstream_address == env.lab.address
    kinds = [type(e) for e in events]
    assert kinds.index(NetworkAttemptInfo) < kinds.index(ProcessInfo)
    # The final event has every attempt, the DNS lookups too.
    assert tcp(end.network_attempts) == live
    assert any(
        x.protocol is NetProtocol.DNS and x.dns_name == "pkg.test" for x in end.network_attempts
    )


def test_a_name_without_an_execute_grant_is_refused_at_once_and_reported(
    env: Env, workspace: Path, ca: str
) -> None:
    before = len(env.lab.requests())
    # other.test is granted for dry runs only; 10.0.0.1 by address, by no grant at all.
    events = execute(
        env,
        f"curl -sS --cacert {ca} https://other.test/bytes/10; echo curl=$?;"
        f" {PY} -c \"import socket; s = socket.create_connection(('10.0.0.1', 443), 5);"
        " s.sendall(b'x'); print('recv', s.recv(10))\"; echo py=$?",
        workspace,
        timeout=20,
    )
    end = finished(events)
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    assert b"curl=35" in out or b"curl=56" in out or b"curl=7" in out, out
    assert b"py=1" in out, out  # connection reset: the client fails, it does not wait
    assert env.lab.requests()[before:] == []
    refused = tcp(streamed(events))
    assert [(a.dns_name or a.address, a.port, a.refusal, a.forwarded) for a in refused] == [
        ("other.test", 443, "no-grant", False),
        ("10.0.0.1", 443, "no-grant", False),
    ]
    assert tcp(end.network_attempts) == refused
    assert "no grant covers other.test:443" in refused[0].refusal_detail


def test_the_tls_name_must_be_the_granted_name(env: Env, workspace: Path, ca: str) -> None:
    """Domain fronting: connect to pkg.test's placeholder address, name other.test in SNI."""
    script = (
        "import socket, ssl\n"
        "addr = socket.gethostbyname('pkg.test')\n"
        f"ctx = ssl.create_default_context(cafile={ca!r})\n"
        "raw = socket.create_connection((addr, 443), 5)\n"
        "try:\n"
        "    ctx.wrap_socket(raw, server_hostname='other.test')\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    events = execute(env, f"{PY} -c {shlex.quote(script)}", workspace, timeout=20)
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    assert out.startswith(b"refused"), out
    (a,) = tcp(finished(events).network_attempts)
    assert (a.dns_name, a.refusal, a.forwarded) == ("pkg.test", "name-mismatch", False)
    assert "other.test" in a.refusal_detail


def test_pip_install_from_a_granted_index_installs_for_real(
    env: Env, workspace: Path, ca: str
) -> None:
    events = execute(
        env,
        f"{PY} -m pip --disable-pip-version-check install --no-cache-dir --cert {ca}"
        " --index-url https://pypi.test:8443/simple/ --target site airlock-demo-hello",
        workspace,
        env={"PIP_CONFIG_FILE": os.devnull, "PATH": "/usr/bin:/bin", "HOME": str(workspace)},
        timeout=60,
    )
    assert finished(events).exit_code == 0, stderr(events)
    assert (workspace / "site" / "hello" / "__init__.py").read_text() == "X = 1\n"
    attempts = tcp(finished(events).network_attempts)
    assert attempts and all((a.dns_name, a.forwarded) == ("pypi.test", True) for a in attempts)


def test_the_audit_log_and_the_cli_say_what_was_reached_and_refused(
    env: Env, workspace: Path, ca: str
) -> None:
    airlock = AIRLOCK
    proc = subprocess.run(
        [airlock, "run", "--socket", env.socket, "--cwd",
         str(workspace), "--", f"curl -sS --cacert {ca} -o /dev/null https://pkg.test/bytes/5000;"
         f" curl -sS --cacert {ca} https://other.test/ -o /dev/null; true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "airlock: refused other.test:443: no grant covers other.test:443" in proc.stderr
    assert "under egress.execute.allow would allow it" in proc.stderr
    audit = subprocess.run(
        [airlock, "audit", "list", "--socket", env.socket, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr
    lines = [x for x in audit.stdout.splitlines() if "finished: exited" in x]
    assert lines, audit.stdout[-2000:]
    last = lines[-1]
    assert "received" in last and "from pkg.test" in last and "egress grant lab" in last, last
    assert "Refused other.test:443 (no egress grant" in last, last
