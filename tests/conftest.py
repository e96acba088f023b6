"""Shared fixtures: a real daemon on a temporary Unix socket, and leak checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.client import Client

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="needs root: mount, pid and net namespaces, overlayfs and cgroups"
)
AIRLOCKD = str(Path(sys.executable).with_name("airlockd"))
AIRLOCK = str(Path(sys.executable).with_name("airlock"))


NOBODY = 65534

# What a client script needs, imported while still root: the checkout (and its venv) may sit under
# a directory only root can enter (a clone in /root), and grpc imports some modules only on first
# use (`grpc._channel` when a channel is made), which would fail once the script is uid 65534.
_CLIENT_PRELUDE = """\
import json, os, sys
import grpc, grpc._channel, grpc._interceptor, grpc._utilities
import grpc_status.rpc_status, google.rpc.error_details_pb2, encodings.idna
from airlock import AirlockError
from airlock.client import Client
os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})
"""


def run_client_as(
    body: str, uid: int = NOBODY, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (Python using ``Client``, ``AirlockError``, ``json``) as a real user ``uid``.

    Imports happen as root, then the process drops to ``uid`` (groups cleared) before ``body``
    connects: SO_PEERCRED records the credentials at connect, so the daemon sees a real non-root
    caller.
    """
    return subprocess.run(
        [sys.executable, "-c", _CLIENT_PRELUDE.format(uid=uid) + body],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
    )


def airlock_cgroups() -> set[str]:
    found = set()
    for controller in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            found |= {str(p) for p in controller.iterdir() if "airlock" in p.name}
    return found


def mount_table() -> list[str]:
    # Mount ids change as mounts come and go; compare what is mounted where.
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:]) for line in f)


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """Nothing the suite does may outlive it: mounts, cgroups, daemons."""
    mounts, cgroups = mount_table(), airlock_cgroups()
    yield
    assert mount_table() == mounts, "the test suite left mounts behind"
    assert airlock_cgroups() <= cgroups, "the test suite left cgroups behind"


@dataclass
class Daemon:
    socket: str
    state_dir: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> Client:
        return Client(self.socket)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_daemon(base: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    """Start airlockd on a socket under ``base`` and wait until it serves."""
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    sock, state = str(base / "airlock.sock"), str(base / "state")
    log_path = base / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            # --config: never the machine's /etc/airlock/airlockd.toml (a later --config wins).
            [AIRLOCKD, "--config", os.devnull, "--socket", sock, "--state-dir", state, *args],
            stdout=log,
            stderr=log,
            env=env or {**os.environ},
        )
    daemon = Daemon(sock, state, proc, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"airlockd exited with {proc.returncode}:\n{daemon.log()}")
        if os.path.exists(sock):
            with Client(sock, timeout=2) as c, contextlib.suppress(Exception):
                if c.health():
                    return daemon
        time.sleep(0.05)
    daemon.stop(signal.SIGKILL)
    raise RuntimeError(f"airlockd did not come up:\n{daemon.log()}")


@contextlib.contextmanager
def running_daemon(base: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    daemon = start_daemon(base, *args, env=env)
    try:
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, f"airlockd exited with {code}:\n{daemon.log()}"


# Small limits make the limit tests fast; the defaults are tested through GetCapabilities.
TEST_LIMITS = (
    "--output-limit",
    "64K",
    "--memory-limit",
    "256M",
    "--pids-limit",
    "64",
    "--scratch-size",
    "64M",
    "--max-timeout",
    "60",
    "--socket-mode",
    "0666",
)


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="airlock-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    with public_dir() as path:
        yield path


# A policy that has no opinion, for tests about the sandbox rather than the policy: a module
# sets DAEMON_ARGS = NEUTRAL_POLICY to give its `daemon` fixture this policy.
NEUTRAL_POLICY = ("--policy-dir", str(Path(__file__).parent / "data" / "neutral-policy"))
# The arguments of a daemon for sandbox tests: small limits, no policy opinion.
SANDBOX_ARGS = (*TEST_LIMITS, *NEUTRAL_POLICY)


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon for the module, with TEST_LIMITS and the module's DAEMON_ARGS."""
    if not ROOT:
        pytest.skip("needs root: mount, pid and net namespaces, overlayfs and cgroups")
    extra = getattr(request.module, "DAEMON_ARGS", ())
    with public_dir() as base, running_daemon(base, *TEST_LIMITS, *extra) as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chmod(tmp_path, 0o755)
    return ws
