"""airlockd's systemd packaging as the tests use it: `make install-service` into a DESTDIR."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .paths import CHECKOUT


def install_service(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        ["make", "-s", "-C", str(CHECKOUT), *args, f"DESTDIR={root}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def unit_settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found
