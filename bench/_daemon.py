"""An ``airlockd`` a bench started: find its spawner, wait until it serves, stop it.

Shared by ``bench/run.py`` and ``bench/issue16.py`` (each keeps its own ``Daemon`` record: what
it measures about the daemon differs).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import psutil

from airlock.client import Client


def spawner_pid(daemon_pid: int) -> int | None:
    """The daemon's spawner helper, if it has one yet."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(daemon_pid).children():
            if "airlock.sandbox.spawner" in " ".join(child.cmdline()):
                return int(child.pid)
    return None


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the daemon drains), SIGKILL after 60 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_serving(proc: subprocess.Popen[bytes], sock: Path, log: Path, guard_s: float = 30) -> None:
    """Return once the daemon answers health checks on ``sock``; RuntimeError (with its log) if
    it exits first, or, stopped, if it does not come up within ``guard_s``."""
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"airlockd exited with {proc.returncode}:\n{log.read_text()}")
        if sock.exists():
            with Client(str(sock), timeout=2) as c, contextlib.suppress(Exception):
                if c.health():
                    return
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"airlockd did not come up:\n{log.read_text()}")
