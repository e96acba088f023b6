"""A real airlockd on a temporary Unix socket: the daemon starters (tests/daemon only)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from airlock.client import Client

from .paths import AIRLOCK, AIRLOCKD, DATA


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

    def cli(
        self, *args: str, cwd: str = "/tmp", columns: int = 120
    ) -> subprocess.CompletedProcess[str]:
        """``airlock *args`` against this daemon, ``columns`` wide; what it printed."""
        return subprocess.run(
            [AIRLOCK, *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=60,
            env={**os.environ, "AIRLOCK_SOCKET": self.socket, "COLUMNS": str(columns)},
        )

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

# A policy that has no opinion, for tests about the sandbox rather than the policy: a module
# sets DAEMON_ARGS = NEUTRAL_POLICY to give its `daemon` fixture this policy.
NEUTRAL_POLICY = ("--policy-dir", str(DATA / "neutral-policy"))
# The arguments of a daemon for sandbox tests: small limits, no policy opinion.
SANDBOX_ARGS = (*TEST_LIMITS, *NEUTRAL_POLICY)
