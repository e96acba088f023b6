"""compute_changes without a mount (the diff of real overlays: tests/sandbox/test_diff.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock.sandbox.diff import DiffOptions, Layer, compute_changes


def test_upper_must_exist(tmp_path: Path) -> None:
    from airlock import SandboxError

    layer = Layer(b"/", os.fsencode(tmp_path / "missing"), b"/")
    with pytest.raises(SandboxError):
        compute_changes([layer], DiffOptions(workspace=b"/"))
