"""Count the real fsync calls a Python script makes, phase by phase (strace)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])


def fsyncs_per_phase(script: str, trace: Path, *args: str) -> list[int]:
    """Run ``script`` (``python -c``; ``sys.argv[1:]`` = ``args``, then the repository root)
    under strace; each ``os.getppid()`` it calls starts a phase. Returns how many ``fsync`` and
    ``fdatasync`` calls each phase made. Skips the test where strace is not installed."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    tracer = [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync,getppid"]
    subprocess.run([*tracer, sys.executable, "-c", script, *args, ROOT], check=True, timeout=60)
    phases: list[int] = []
    for line in trace.read_text().splitlines():
        if "getppid(" in line:
            phases.append(0)
        elif phases and ("fsync(" in line or "fdatasync(" in line):
            phases[-1] += 1
    return phases
