"""The schema check in a child process (policy/_schema.py): the daemon's way of loading a
policy without importing jsonschema. Real child interpreters; no mock."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from airlock.policy.loader import PolicyError, check_in_child, check_in_process, load_bundle
from airlock.policy.store import default_policy_dir

BAD_POLICY = {"version": 2, "rules": [{"id": "X", "decison": "ask", "severity": "loud"}]}


def _default_docs() -> list[tuple[str, str, Any]]:
    from airlock.policy.loader._files import _decode, _parse, _paths, _read, collect_files
    from airlock.policy.loader._problems import _Problems

    found, missing = collect_files(_paths(default_policy_dir()))
    assert found and not missing
    problems = _Problems()
    docs: list[tuple[str, str, Any]] = []
    for file, _rel in found:
        data = _read(file, problems)
        assert data is not None
        text = _decode(file, data, problems)
        assert text is not None
        doc = _parse(file, text, problems)
        assert doc is not None
        docs.append(("policy", file, doc.value))
    return docs


def test_the_child_finds_what_this_process_finds() -> None:
    docs = [
        *_default_docs(),
        ("policy", "bad.yaml", BAD_POLICY),
        ("policy", "list.yaml", ["not", "a", "mapping"]),
        ("effects", "effects.yaml", {"files": "no"}),
        ("effects", "ok.yaml", {"files": [{"path": "/tmp/x", "kind": "created"}]}),
        ("policy", "odd.yaml", {"version": 1, "title": float("nan"), "n": 10**30}),
    ]
    child = check_in_child(docs)
    assert child == check_in_process(docs)
    assert [ok for ok, _ in child[:-5]] == [True] * (len(docs) - 5)
    assert [ok for ok, _ in child[-5:]] == [False, False, False, True, False]
    messages = [m for _path, m, _hint, _key in child[-5][1]]
    assert "unknown key 'decison' in rules[0]" in messages
    assert "version: must be 1, found 2" in messages


def _policy_dir(tmp_path: Path) -> Path:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "rules.yaml").write_text(
        textwrap.dedent("""\
        version: 1
        rules:
          - id: broken
            title: x
            description: x
            severity: high
            decision: maybe
            match: {argv0: cowsay}
        """)
    )
    return policy


def test_a_load_checked_in_the_child_places_the_problem(tmp_path: Path) -> None:
    policy = _policy_dir(tmp_path)
    with pytest.raises(PolicyError) as child:
        load_bundle(policy, schema=check_in_child)
    with pytest.raises(PolicyError) as here:
        load_bundle(policy)
    assert str(child.value) == str(here.value)
    assert "rules.yaml:7:" in str(child.value) and "'maybe' is not one of" in str(child.value)


def _fake_python(tmp_path: Path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return os.fspath(path)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("cat >/dev/null; echo boom >&2; exit 3", "the schema check failed (exit 3): boom"),
        ("cat >/dev/null; echo '[]'", "another number of documents"),
        ("cat >/dev/null; echo 'not json'", "answered something else"),
    ],
)
def test_a_check_that_cannot_be_made_fails_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, why: str
) -> None:
    """Fail closed: a policy the schema check did not take is not loaded."""
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, body))
    with pytest.raises(PolicyError) as info:
        load_bundle(default_policy_dir(), schema=check_in_child)
    assert "could not check the file against the schema" in str(info.value)
    assert why in str(info.value)


def test_a_value_json_cannot_carry_is_refused() -> None:
    with pytest.raises(OSError, match="cannot be sent to the schema check"):
        check_in_child([("policy", "x.yaml", {"version": {1, 2}})])
