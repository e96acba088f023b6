"""``bench/ab.py --daemon``'s worker: dry runs through a real daemon and the Python client.

Started by ``bench/ab.py`` with the working directory and ``PYTHONPATH`` of one source tree,
so that this process (the client, its protobuf conversion), the ``airlockd`` it starts and
that daemon's spawner (``python -m``, which imports from the working directory) all run that
tree's ``airlock``. The daemon has default settings (warm pool of 2, changes kept for Apply
up to 2,000) and ``tests/data/neutral-policy``, so every command is dry-run.

Protocol (as ``bench/_direct.py``'s): one line per request on stdin, one JSON object per line
on stdout. ``engine N`` runs N ``Validate(command)`` calls and replies with, per call, the
client's wall time (``run_s``), the part of it spent converting the response to
``airlock.types`` (``convert_s``), the daemon's ``total_s``, ``sandbox_s``, ``command_s``
and ``diff_s``; and how many were served warm. ``quit`` stops the daemon and exits. Times
are seconds (``time.perf_counter``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from airlock.api.convert import validation_from_proto
from airlock.client import Client

NEUTRAL_POLICY = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "neutral-policy"
)
_ENV = {"PATH": "/usr/bin:/bin"}


class Worker:
    def __init__(self, state_dir: str, cwd: str, command: str, expect: int | None) -> None:
        self.cwd, self.command, self.expect = cwd, command, expect
        self.socket = os.path.join(state_dir, "airlock.sock")
        self.log = open(os.path.join(state_dir, "daemon.log"), "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from airlock.daemon.main import main; sys.exit(main())",
                "--socket",
                self.socket,
                "--state-dir",
                os.path.join(state_dir, "state"),
                "--policy-dir",
                NEUTRAL_POLICY,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        self.failures: list[str] = []
        deadline = time.monotonic() + 60
        while True:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"airlockd exited with {self.daemon.returncode}")
            if os.path.exists(self.socket):
                with contextlib.suppress(Exception):
                    self.client = Client(self.socket, timeout=120)
                    if self.client.health():
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("airlockd did not come up")
            time.sleep(0.05)

    def run(self, runs: int) -> dict[str, Any]:
        keys = ("run_s", "convert_s", "total_s", "diff_s", "command_s", "sandbox_s")
        out: dict[str, Any] = {key: [] for key in keys}
        warm = 0
        for _ in range(runs):
            t0 = time.perf_counter()
            raw = self.client.validate_raw(self.command, cwd=self.cwd, env=_ENV, timeout=120)
            t1 = time.perf_counter()
            v = validation_from_proto(raw)
            t2 = time.perf_counter()
            out["run_s"].append(t2 - t0)
            out["convert_s"].append(t2 - t1)
            out["total_s"].append(v.timings.total_s)
            out["diff_s"].append(v.timings.diff_s)
            out["command_s"].append(v.timings.command_s)
            out["sandbox_s"].append(v.timings.sandbox_s)
            warm += bool(v.timings.warm)
            if v.exit_code != 0 or (self.expect is not None and len(v.changes) != self.expect):
                self.failures.append(f"exit {v.exit_code}, {len(v.changes)} changes")
        out["warm_runs"] = warm
        return out

    def quit(self) -> dict[str, Any]:
        self.client.close()
        self.daemon.terminate()
        try:
            code = self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            code = self.daemon.wait()
        if code != 0:
            self.failures.append(f"airlockd exited with {code}")
        self.log.close()
        return {"failures": self.failures}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--command", default="true")
    p.add_argument("--expect-changes", type=int, default=None)
    a = p.parse_args()
    worker = Worker(a.state_dir, a.cwd, a.command, a.expect_changes)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "pid": os.getpid(), "daemon_pid": worker.daemon.pid})
    try:
        for line in sys.stdin:
            mode, _, arg = line.strip().partition(" ")
            if mode == "engine":
                reply(worker.run(int(arg or "0")))
            elif mode == "quit":
                reply(worker.quit())
                return 0
            else:
                reply({"error": f"unknown mode {mode!r}"})
    finally:
        if worker.daemon.poll() is None:
            worker.daemon.kill()
            worker.daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
