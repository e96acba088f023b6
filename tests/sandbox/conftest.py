"""tests/sandbox: the kernel's mechanisms (namespaces, overlayfs, cgroups, fanotify, seccomp), no
daemon. Every test here needs root: tests/conftest.py skips them all otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)
