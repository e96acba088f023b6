"""Fixtures and hooks for the whole suite: the one root gate, the unit check, leak checks.

tests/unit needs no root and no daemon; tests/sandbox (the kernel, no daemon) and tests/daemon
(a real airlockd) mark every test they collect ``root``, and the hook here skips those when the
suite does not run as root. Shared helpers live in tests/helpers.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import airlock_cgroups, mount_table, public_dir

ROOT = os.geteuid() == 0
NEEDS_ROOT = "needs root: mount, pid and net namespaces, overlayfs and cgroups"
TESTS = Path(__file__).resolve().parent
UNIT = TESTS / "unit"
# What starts a daemon (tests/helpers/daemon.py): never for a test under tests/unit.
DAEMON_STARTERS = frozenset({"start_daemon", "running_daemon"})


@functools.cache
def _daemon_starters_imported(path: Path) -> tuple[str, ...]:
    """The daemon starters a test module imports from tests.helpers, at any depth."""
    package = path.relative_to(TESTS.parent).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            if not module.startswith("tests.helpers"):
                continue
            for alias in node.names:
                if alias.name in DAEMON_STARTERS or alias.name in ("*", "daemon"):
                    found.append(f"{module}.{alias.name}")
            if module == "tests.helpers.daemon":
                found.append(module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tests.helpers.daemon")]
        elif isinstance(node, ast.Attribute) and node.attr in DAEMON_STARTERS:
            found.append(ast.unparse(node))  # `import tests.helpers as h` ... `h.start_daemon`
    return tuple(dict.fromkeys(found))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The one root gate, after the directories' conftest.py files marked their tests."""
    wrong = []
    for item in items:
        if item.path.is_relative_to(UNIT):
            if item.get_closest_marker("root"):
                wrong.append(f"{item.nodeid}: marked root")
            if item.path.suffix == ".py":
                starters = _daemon_starters_imported(item.path)
                wrong += [f"{item.nodeid}: imports {name}" for name in starters]
        elif item.get_closest_marker("root") and not ROOT:
            item.add_marker(pytest.mark.skip(reason=NEEDS_ROOT))
    if wrong:
        raise pytest.UsageError(
            "tests/unit must run without root and without a daemon; move these to tests/sandbox "
            "or tests/daemon:\n  " + "\n  ".join(wrong)
        )


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """Nothing the suite does may outlive it: mounts, cgroups, daemons."""
    mounts, cgroups = mount_table(), airlock_cgroups()
    yield
    assert mount_table() == mounts, "the test suite left mounts behind"
    assert airlock_cgroups() <= cgroups, "the test suite left cgroups behind"


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    with public_dir() as path:
        yield path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chmod(tmp_path, 0o755)
    return ws
