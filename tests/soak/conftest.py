"""tests/soak: long runs against a real airlockd (``make soak``). Every test here needs root
(tests/conftest.py skips them otherwise) and is marked ``soak``, which ``make test`` leaves out."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.soak)
