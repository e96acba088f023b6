"""The human report of ``airlock validate`` as a person meets it: bounded for large changes
(``--summary``, ``--no-diff``, ``--all``), not wrapped when piped, says when changes were not
kept, and a caller kept out of the socket is told which group to join."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import AIRLOCK, Daemon, public_dir, running_daemon
from tests.helpers.users import run_client_as

MANY = "for i in $(seq 300); do printf 'line\\n%.0s' $(seq 100) > f$i; done"


def validate(daemon: Daemon, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``airlock validate`` with its output piped, as a script would see it (no COLUMNS)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["AIRLOCK_SOCKET"] = daemon.socket
    return subprocess.run(
        [AIRLOCK, "validate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env=env,
    )


def test_large_change_set_is_bounded(daemon: Daemon, workspace: Path) -> None:
    full = validate(daemon, workspace, "--all", "--", MANY)
    bounded = validate(daemon, workspace, "--", MANY)
    assert full.returncode == bounded.returncode == 0, bounded.stderr
    assert full.stdout.count("\ndiff /") == 300
    lines = bounded.stdout.splitlines()
    assert "… and 100 more (--all lists every change; --json prints them all)" in bounded.stdout
    assert "… diffs of 280 more files left out (--all shows them)" in bounded.stdout
    assert "(first 60 of " in bounded.stdout  # each diff cut too
    assert len(lines) < len(full.stdout.splitlines()) / 5
    assert lines[0].startswith("Verdict: ALLOW")


def test_summary_and_no_diff(daemon: Daemon, workspace: Path) -> None:
    summary = validate(daemon, workspace, "--summary", "--", MANY)
    assert summary.returncode == 0
    assert summary.stdout.startswith("Verdict: ALLOW")
    assert "Changes:" not in summary.stdout and "\ndiff /" not in summary.stdout
    assert len(summary.stdout.splitlines()) < 20  # the verdict, static line, findings
    no_diff = validate(daemon, workspace, "--no-diff", "--", "echo a > x; echo b > y")
    assert "Changes: 2" in no_diff.stdout and "\ndiff /" not in no_diff.stdout
    both = validate(daemon, workspace, "--summary", "--all", "--", "true")
    assert both.returncode == 2  # one or the other


def test_piped_output_is_not_wrapped(daemon: Daemon, workspace: Path) -> None:
    name = "a-file-name-long-enough-to-pass-eighty-columns-on-its-own-" + "x" * 40
    done = validate(daemon, workspace, "--", f"echo hi > {name}")
    assert done.returncode == 0
    first = done.stdout.splitlines()[0]
    assert first.startswith("Verdict: ALLOW") and len(first) > 100  # one line, not cut at 80
    assert any(name in line for line in done.stdout.splitlines())


@pytest.fixture(scope="module")
def strict() -> Iterator[Daemon]:
    """Changes never kept (--keep-changes-max 0), and the socket for root's group only."""
    args = ("--keep-changes-max", "0", "--socket-mode", "0660")
    with public_dir() as base, running_daemon(base, *args) as d:
        yield d


def test_changes_not_kept_are_said_so(strict: Daemon, workspace: Path) -> None:
    done = validate(strict, workspace, "--", "echo hi > big")
    assert done.returncode == 0, done.stderr
    assert "Not kept for apply:" in done.stdout
    # Validating again would not keep them either: what would (decisions: airlock/_notkept.py).
    assert "run the command with Execute" in done.stdout
    assert "validate again to keep them" not in done.stdout


def test_socket_permission_names_the_group(strict: Daemon) -> None:
    body = f"""
try:
    Client({strict.socket!r}).health()
except AirlockError as e:
    print(e)
"""
    done = run_client_as(body)
    assert "Permission denied" in done.stdout, done
    assert "group 'root'" in done.stdout and "usermod -aG root" in done.stdout
    assert "is airlockd running" not in done.stdout


def test_run_warns_of_piped_input_it_cannot_pass(daemon: Daemon, workspace: Path) -> None:
    env = {**os.environ, "AIRLOCK_SOCKET": daemon.socket}

    def run(stdin: str | None, *words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [AIRLOCK, "run", "--", *words],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=workspace,
            timeout=120,
            env=env,
        )

    piped = run("y\n", "cat; echo ran > got")
    assert piped.returncode == 0
    assert "warning: 2 bytes are waiting on standard input" in piped.stderr
    assert "does not pass input" in piped.stderr
    assert piped.stdout == ""  # the command read end of file, as the warning says
    assert (workspace / "got").read_text() == "ran\n"
    empty = run("", "true")  # an empty pipe (CI) is no reason to warn
    assert empty.returncode == 0 and "warning" not in empty.stderr
    devnull = run(None, "true")
    assert devnull.returncode == 0 and "warning" not in devnull.stderr
    (workspace / "input.txt").write_text("data")
    with open(workspace / "input.txt") as f:
        redirected = subprocess.run(
            [AIRLOCK, "run", "--", "true"], stdin=f, capture_output=True, text=True,
            cwd=workspace, timeout=120, env=env,
        )  # fmt: skip
    assert redirected.returncode == 0 and "4 bytes are waiting" in redirected.stderr
