"""The host as the tests see it: its mounts, its cgroups, directories other users can use."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
