"""How fast the state directory grows: bytes per audit record and per kept validation.

Run as root: ``.venv/bin/python bench/state_size.py [--validations N]``. Starts a real
daemon (the shipped policy) in a temporary directory, sends N validations of each kind,
stops the daemon (so that SQLite folds its write-ahead logs into the files) and reports
the growth of ``audit.sqlite3``, ``state.db`` and ``changesets/`` (on-disk bytes) per
validation, over a state directory where a daemon started and stopped with nothing done.
Each kind runs on a fresh daemon and state directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from run import start_daemon

from airlock.client import Client

KINDS: dict[str, Callable[[int], str]] = {
    "no changes (not kept)": lambda i: f"ls -la /etc > /dev/null; echo {i}",
    "one new file (changes kept)": lambda i: f"echo {i % 100:02d} > out{i}.txt",
}


def sizes(state: Path) -> dict[str, int]:
    out = {
        name: sum(p.stat().st_size for p in state.glob(f"{name}*"))  # with any -wal and -shm
        for name in ("audit.sqlite3", "state.db")
    }
    du = subprocess.run(
        ["du", "-s", "-B1", str(state / "changesets")], capture_output=True, text=True, check=True
    )
    out["changesets"] = int(du.stdout.split()[0])
    return out


def run_validations(base: Path, command: Callable[[int], str], n: int) -> dict[str, int]:
    """The sizes after a fresh daemon validated ``command(i)`` for i < n, and stopped."""
    daemon = start_daemon(base, "--log-level", "warning")
    try:
        with Client(daemon.socket, timeout=120) as client:
            for i in range(n):
                client.validate(command(i), cwd=daemon.workspace)
    finally:
        code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"airlockd exited with {code}:\n{daemon.log_path.read_text()}")
    return sizes(Path(daemon.state_dir))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validations", type=int, default=300, metavar="N")
    n = ap.parse_args().validations
    base = Path(tempfile.mkdtemp(prefix="airlock-bench-size-"))
    try:
        empty = run_validations(base / "empty", lambda i: "", 0)
        rows = []
        for number, (kind, command) in enumerate(KINDS.items()):
            after = run_validations(base / str(number), command, n)
            rows.append((kind, {k: (after[k] - empty[k]) / n for k in after}))
        print(f"{n} validations of each kind; bytes per validation:")
        for kind, per in rows:
            cells = ", ".join(f"{name} {value:,.0f}" for name, value in per.items())
            print(f"  {kind}: {cells}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
