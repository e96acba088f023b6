"""An ``airlockd`` a bench started: find its spawner, wait until it serves, stop it.

Shared by ``bench/run.py`` and ``bench/issue16.py`` (each keeps its own ``Daemon`` record: what
it measures about the daemon differs); :func:`started` is the whole life of a plain one.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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


@contextlib.contextmanager
def started(
    extra: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    prefix: str = "airlock-bench-",
    timeout: float = 120,
) -> Iterator[tuple[subprocess.Popen[bytes], Client, str]]:
    """This tree's ``airlockd`` (``extra`` arguments) on a temporary socket and state directory,
    serving: the process, a client, a workspace directory. Stopped (and removed) after."""
    airlockd = str(Path(sys.executable).with_name("airlockd"))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        base = Path(tmp)
        (base / "ws").mkdir()
        sock, log = base / "a.sock", base / "airlockd.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [airlockd, "--socket", str(sock), "--state-dir", str(base / "state"), *extra],
                stderr=err,
                env=env,
            )
        try:
            wait_serving(proc, sock, log)
            with Client(str(sock), timeout=timeout) as c:
                yield proc, c, str(base / "ws")
        finally:
            stop(proc)
