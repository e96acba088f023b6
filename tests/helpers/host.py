"""The host as the tests see it: its mounts, its cgroups, directories other users can use."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="airlock-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _first_bytes(conn: socket.socket) -> bytes:
    return conn.recv(100) or b"<connected>"


@contextlib.contextmanager
def loopback_listener(
    read: Callable[[socket.socket], Any] = _first_bytes,
) -> Iterator[tuple[int, list[Any]]]:
    """A TCP listener on the host's 127.0.0.1 that records whatever reaches it: its port and,
    per connection, what ``read`` took from it (by default the first bytes, ``b"<connected>"``
    for a connection that sent none)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    got: list[Any] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                got.append(read(conn))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        t.join()
        srv.close()
