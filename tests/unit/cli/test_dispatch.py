"""The ``airlock`` entry point only dispatches: ``airlock hook`` (run before every shell
command an agent issues) loads the generated messages and h2 (its one call is made by
airlock.cli._h2call), and none of the CLI's other weight: no grpc, no rich, no policy engine
or tree-sitter, no audit types, no typed client, no MCP SDK. No daemon: the hook answers
"daemon down", which still goes through the call (tests/daemon/test_hook.py checks the same
on an allowed command, with a daemon)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airlock.cli import hook
from airlock.cli.main import main as airlock_main
from airlock.client import DEFAULT_SOCKET_PATH

DATA = Path(__file__).resolve().parents[2] / "data" / "hooks"
UNWANTED = (
    "grpc",
    "grpc_status",
    "airlock.v1.sandbox_pb2_grpc",
    "airlock.api.status",
    "rich",
    "tree_sitter",
    "tree_sitter_bash",
    "yaml",
    "jsonschema",
    "airlock.policy",
    "airlock.audit",
    "airlock.api.convert",
    "airlock.client",
    "airlock.cli.commands",
    "airlock.cli.render",
    "mcp",
)

PROBE = """
import sys
from airlock.cli.main import main
code = main(sys.argv[1:])
print("@@", code, file=sys.stderr)
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
"""


def modules_after(args: list[str], stdin: str, tmp_path: Path) -> tuple[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "AIRLOCK_SOCKET": str(tmp_path / "no-daemon.sock"),
            "PATH": "/usr/bin:/bin",
            # Where the checkout and its packages are when not in a venv (.ci/unit-as-nobody).
            **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ},
        },
    )
    lines = done.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("@@ "))
    return done.stdout, [lines[start].removeprefix("@@ "), *lines[start + 1 :]]


@pytest.mark.parametrize("agent", hook.AGENTS)
def test_hook_path_imports_no_grpc_and_nothing_heavy(agent: str, tmp_path: Path) -> None:
    stdin = (DATA / f"{agent}.json").read_text()
    data = json.loads(stdin)["input"]
    data["cwd"] = str(tmp_path)
    out, lines = modules_after(["hook", agent], json.dumps(data), tmp_path)
    assert lines[0] == "0"
    assert "no-daemon.sock" in out  # answered "cannot judge: daemon down", fail closed
    loaded = set(lines[1:])
    assert "airlock.cli._h2call" in loaded and "airlock.cli._hookwire" in loaded
    # The request is written without protobuf (airlock.cli._hookwire), and a daemon that is
    # down sends no status details to read with it.
    assert not {m for m in loaded if m.startswith(("google.protobuf", "airlock.v1."))}
    heavy = sorted(m for m in loaded if m.split(".")[0] in UNWANTED or m.startswith(UNWANTED))
    assert heavy == []


def test_hook_install_path_imports_no_grpc(tmp_path: Path) -> None:
    _, lines = modules_after(["hook", "install", "vim"], "", tmp_path)
    assert lines[0] == "2"  # a usage error, after the dispatch
    assert "grpc" not in set(lines[1:]) and "airlock.cli.hookconf" in set(lines[1:])


def test_policy_path_imports_no_grpc(tmp_path: Path) -> None:
    _, lines = modules_after(["policy", "--help"], "", tmp_path)
    assert "grpc" not in set(lines[1:])


def test_hook_default_socket_is_the_clients() -> None:
    assert hook._DEFAULT_SOCKET_PATH == DEFAULT_SOCKET_PATH


def test_help_lists_hook_and_mcp(capsys: pytest.CaptureFixture[str]) -> None:
    assert airlock_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hook" in out and "mcp" in out


def test_other_actions_still_parse(capsys: pytest.CaptureFixture[str]) -> None:
    assert airlock_main(["validate"]) == 2  # no COMMAND: a usage error from airlock.cli.commands
    assert "COMMAND is required" in capsys.readouterr().err
