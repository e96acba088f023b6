"""Small YAML policies written to a test's directory and loaded (tests/unit/policy)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from airlock.policy.loader import PolicyBundle, PolicyError, PolicyProblem, load_bundle


def write_policy(root: Path, files: Mapping[str, str]) -> Path:
    """``files`` (name: dedented text) written below ``root``; ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def load_policy(root: Path, files: Mapping[str, str], *, run_tests: bool) -> PolicyBundle:
    return load_bundle(write_policy(root, files), run_tests=run_tests)


def policy_problems(
    root: Path, files: Mapping[str, str], *, run_tests: bool
) -> tuple[PolicyProblem, ...]:
    """The problems that make loading ``files`` fail (it must fail)."""
    with pytest.raises(PolicyError) as info:
        load_policy(root, files, run_tests=run_tests)
    return info.value.problems


def rule_yaml(key: str, value: str, *, rid: str, decision: str, extra: str) -> str:
    """One rule's YAML, with ``key`` (match, effect) given ``value`` as a flow mapping."""
    return f"""
  - id: {rid}
    title: Test rule {rid}
    description: For the tests.
    decision: {decision}
    severity: high
    {key}: {value}
{textwrap.indent(textwrap.dedent(extra), "    ")}"""


def policy(*rules: str, header: str = "") -> str:
    return "version: 1\n" + textwrap.dedent(header) + "rules:" + "".join(rules) + "\n"
