"""A real npm registry for tests: verdaccio (package.json's devDependencies, installed by
``make install``) in the egress lab's network namespace (tests/helpers/egress.py), over HTTPS
with the lab's test certificate, serving packages the test stores in its storage directory.

:func:`npm_package` makes a package tarball the way ``npm pack`` lays it out (``package/...``)
and :func:`store` puts it in verdaccio's storage with its packument (the document
``GET /NAME`` answers), so nothing is published over the network and no account is needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from .egress import Lab

ROOT = Path(__file__).resolve().parents[2]
VERDACCIO = ROOT / "node_modules" / "verdaccio" / "bin" / "verdaccio"

CONFIG = """\
storage: {storage}
listen: https://0.0.0.0:{port}
https:
  key: {key}
  cert: {cert}
uplinks: {{}}
packages:
  "**":
    access: $all
    publish: $authenticated
web:
  enable: false
log: {{type: stdout, format: json, level: warn}}
"""


def available() -> str:
    """Why the registry cannot run here ("" if it can)."""
    if shutil.which("node") is None:
        return "node is not installed (make deps installs it)"
    if not VERDACCIO.exists():
        return "verdaccio is not installed (make install runs npm ci)"
    return ""


def npm_package(name: str, version: str, files: dict[str, str], **manifest: object) -> bytes:
    """A package tarball (.tgz) holding ``package/package.json`` and ``files``."""
    package_json = {"name": name, "version": version, **manifest}
    entries = {"package/package.json": json.dumps(package_json, indent=2) + "\n"}
    entries |= {f"package/{path}": text for path, text in files.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, text in entries.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 499162500
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store(storage: Path, tarball: bytes, registry: str) -> None:
    """Put ``tarball`` in verdaccio's ``storage`` as the only version of its package."""
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        member = tar.extractfile("package/package.json")
        assert member is not None
        manifest = json.loads(member.read())
    name, version = manifest["name"], manifest["version"]
    filename = f"{name}-{version}.tgz"
    shasum = hashlib.sha1(tarball).hexdigest()  # npm's own field
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    scripts = manifest.get("scripts", {})
    stamp = "2026-12-07T00:00:00.000Z"
    packument = {
        "name": name,
        "versions": {
            version: {
                **manifest,
                "_id": f"{name}@{version}",
                "hasInstallScript": any(
                    s in scripts for s in ("preinstall", "install", "postinstall")
                ),
                "dist": {
                    "tarball": f"{registry.rstrip('/')}/{name}/-/{filename}",
                    "shasum": shasum,
                    "integrity": integrity,
                },
            }
        },
        "dist-tags": {"latest": version},
        "time": {"created": stamp, "modified": stamp, version: stamp},
        "_uplinks": {},
        "_distfiles": {},
        "_attachments": {filename: {"shasum": shasum, "version": version}},
        "_rev": "1-0000000000000000",
        "_id": name,
        "readme": "",
    }
    directory = storage / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / filename).write_bytes(tarball)
    (directory / "package.json").write_text(json.dumps(packument, indent=2))


@contextlib.contextmanager
def npm_registry(lab: Lab, storage: Path, port: int = 8443) -> Iterator[str]:
    """verdaccio serving ``storage`` over HTTPS on ``port`` in the lab's namespace; yields its
    address as ``ADDRESS:PORT``."""
    config = storage.parent / "verdaccio.yaml"
    config.write_text(CONFIG.format(storage=storage, port=port, key=lab.key, cert=lab.cert))
    log = (storage.parent / "verdaccio.log").open("wb")
    proc = subprocess.Popen(
        ["nsenter", "-t", str(lab.pid), "-n", "--", "node", str(VERDACCIO), "--config",
         str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=storage.parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # reachable from the host once it listens
            if proc.poll() is not None:
                raise RuntimeError(f"verdaccio exited: {config.with_suffix('.log').read_text()}")
            try:
                socket.create_connection((lab.address, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"{lab.address}:{port}"
    finally:
        proc.kill()
        proc.wait()
        log.close()
