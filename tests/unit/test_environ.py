"""airlock._environ: the caller's environment as a request carries it (the default of the client,
the CLI, the hook and the MCP server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from airlock._environ import caller_environment


def test_it_is_os_environ_unchanged_when_every_variable_can_be_carried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRLOCK_TEST_MARK", "héllo wörld = 1")
    monkeypatch.setenv("AIRLOCK_TEST_EMPTY", "")
    skipped: list[str] = []
    env = caller_environment(skipped.append)
    assert env == dict(os.environ) and skipped == []
    assert env["AIRLOCK_TEST_MARK"] == "héllo wörld = 1" and env["AIRLOCK_TEST_EMPTY"] == ""
    env["AIRLOCK_TEST_MARK"] = "changed"  # a copy: os.environ is not touched
    assert os.environ["AIRLOCK_TEST_MARK"] == "héllo wörld = 1"


def test_a_name_or_value_that_is_not_utf8_is_left_out_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(os.environb, b"AIRLOCK_BAD_NAME\xff", b"x")
    monkeypatch.setitem(os.environb, b"AIRLOCK_BAD_VALUE", b"caf\xe9")
    monkeypatch.setenv("AIRLOCK_GOOD", "yes")
    skipped: list[str] = []
    env = caller_environment(skipped.append)
    assert sorted(skipped) == [
        "not passing b'AIRLOCK_BAD_NAME\\xff': not valid UTF-8",
        "not passing b'AIRLOCK_BAD_VALUE': not valid UTF-8",
    ]
    assert not any(k.startswith("AIRLOCK_BAD") for k in env)
    assert env["AIRLOCK_GOOD"] == "yes"
    for key, value in env.items():  # what is left is what the API carries
        key.encode("utf-8"), value.encode("utf-8")
    # Without a callback they are left out silently, the same way.
    assert caller_environment() == env


def test_an_empty_name_is_left_out() -> None:
    """Only execve makes one (``env '=x' ...``); the daemon would refuse it (INVALID_ENV)."""
    probe = (
        "import json, os; from airlock._environ import caller_environment; s = [];"
        " e = caller_environment(s.append);"
        " print(json.dumps([s, '' in os.environ, '' in e, e.get('AIRLOCK_TEST_MARK')]))"
    )
    done = subprocess.run(
        ["env", "=x", "AIRLOCK_TEST_MARK=kept", sys.executable, "-c", probe],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    skipped, in_environ, sent, mark = json.loads(done.stdout)
    assert (in_environ, sent, mark) == (True, False, "kept")
    assert skipped == ["not passing a variable with an empty name"]


def test_it_imports_nothing_heavy() -> None:
    """``airlock hook`` imports it on its allow path (bench/hook.py lists the unwanted)."""
    probe = (
        "import json, sys, airlock; before = set(sys.modules); import airlock._environ;"
        " print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == ["airlock._environ"]
