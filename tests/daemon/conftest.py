"""tests/daemon: a real airlockd on a temporary Unix socket. Every test here needs root:
tests/conftest.py skips them all otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.client import Client
from tests.helpers import TEST_LIMITS, Daemon, public_dir, running_daemon

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon for the module, with TEST_LIMITS and the module's DAEMON_ARGS."""
    extra = getattr(request.module, "DAEMON_ARGS", ())
    with public_dir() as base, running_daemon(base, *TEST_LIMITS, *extra) as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c
