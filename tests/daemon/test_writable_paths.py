"""Filesystem grants end to end: a real daemon whose policy is the shipped default plus
``writable_paths`` naming directories of the caller's (root's) home: Execute writes the
granted cache for real and nothing else of the home, a grant reached through a symbolic link
(outside the home, or to another directory of it) stays read-only, and a dry run's writes to
the granted cache do not ask while the same writes elsewhere in the home do."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.policy.store import default_policy_dir
from airlock.types import ExecFinished, ExecOutput, Verdict
from tests.helpers import TEST_LIMITS, public_dir, running_daemon


@dataclass
class Env:
    client: Client
    cache: Path  # granted
    other: Path  # not granted
    link: Path  # granted, but a symbolic link to a directory outside the home
    outside: Path
    link_in: Path  # granted, but a symbolic link to ``other`` (as a command could make one)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    home = Path(os.path.expanduser("~root"))
    tag = secrets.token_hex(4)
    cache = home / ".cache" / f"airlock-test-{tag}"
    other = home / ".cache" / f"airlock-other-{tag}"
    link = home / f"airlock-link-{tag}"
    link_in = home / ".cache" / f"airlock-link-in-{tag}"
    with public_dir() as base:
        outside = base / "outside"
        try:
            for d in (cache, other, outside):
                d.mkdir(parents=True)
            link.symlink_to(outside)
            link_in.symlink_to(other)
            policy = base / "policy"
            shutil.copytree(default_policy_dir(), policy / "default")
            (policy / "caches.yaml").write_text(
                "version: 1\nwritable_paths:\n  paths:\n"
                f"    - ~/.cache/{cache.name}\n    - ~/{link.name}\n"
                f"    - ~/.cache/{link_in.name}\n"
            )
            with (
                running_daemon(base / "d", *TEST_LIMITS, "--policy-dir", str(policy)) as d,
                d.client() as client,
            ):
                yield Env(client, cache, other, link, outside, link_in)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(other, ignore_errors=True)
            link.unlink(missing_ok=True)
            link_in.unlink(missing_ok=True)


def test_execute_writes_the_granted_cache_and_nothing_else_of_the_home(
    env: Env, workspace: Path
) -> None:
    events = list(
        env.client.execute(
            f"echo cached > {env.cache}/f; echo cache=$?;"
            f" echo no > {env.other}/f 2>/dev/null; echo other=$?;"
            f" echo no > {env.link}/f 2>/dev/null; echo link=$?;"
            f" echo no > {env.link_in}/f 2>/dev/null; echo link_in=$?;"
            " echo kept > out.txt",
            cwd=str(workspace),
        )
    )
    end = events[-1]
    assert isinstance(end, ExecFinished) and end.exit_code == 0
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    assert out.split() == [b"cache=0", b"other=1", b"link=1", b"link_in=1"], out
    assert (env.cache / "f").read_text() == "cached\n"  # for real, on the host
    assert not (env.other / "f").exists() and not (env.outside / "f").exists()
    assert (workspace / "out.txt").read_text() == "kept\n"


def test_a_dry_run_s_cache_writes_do_not_ask_but_other_home_writes_do(
    env: Env, workspace: Path
) -> None:
    v = env.client.validate(
        f"mkdir -p {env.cache}/http && echo x > {env.cache}/http/entry", cwd=str(workspace)
    )
    assert v.exit_code == 0, v.stderr
    assert {c.path for c in v.changes} >= {os.fsencode(f"{env.cache}/http/entry")}
    assert v.verdict is Verdict.ALLOW, v.findings
    v = env.client.validate(
        f"mkdir -p {env.other}/http && echo x > {env.other}/http/entry", cwd=str(workspace)
    )
    assert v.verdict is Verdict.ASK
    assert "effect.home-write" in [f.rule_id for f in v.findings]
    assert not (env.cache / "http").exists()  # a dry run: nothing on the host
