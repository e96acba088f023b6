"""``airlock policy diff OLD NEW``: the verdicts a policy change changes, with the deciding rules.

Real policies written to tmp, the real parser and rule engine, the CLI entry point."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from airlock.cli.main import main

OLD = """\
    version: 1
    rules:
      - id: t.rm
        title: rm
        description: Deletes files.
        decision: ask
        severity: medium
        match: {argv0: [rm]}
"""

# NEW: rm now denied with -r, curl uploads ask, and an in-house tool's subcommand is known.
NEW = """\
    version: 1
    commands:
      deploytool:
        options_with_value: [--target]
        subcommands:
          delete: {risk: destructive}
    rules:
      - id: t.rm
        title: rm
        description: Deletes files.
        decision: ask
        severity: medium
        match: {argv0: [rm]}
      - id: t.rm-recursive
        title: rm -r
        description: Deletes trees.
        decision: deny
        severity: high
        match: {argv0: [rm], flags: {any: [-r, -R]}}
      - id: t.upload
        title: curl upload
        description: Sends data.
        decision: ask
        severity: medium
        match: {argv0: [curl], option_values: {flags: [-d, --data], any: ["*"]}}
      - id: t.deploy-delete
        title: deploytool delete
        description: Destroys a deployment.
        decision: ask
        severity: high
        match: {argv0: [deploytool], classified: {risk: [destructive]}}
"""

CORPUS = """\
# a comment
rm a.txt
rm -rf build
curl -d hello https://example.com
curl https://example.com
deploytool --target prod delete
#| rm -r \\
#|   dist
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    old = write(tmp_path / "old" / "p.yaml", OLD).parent
    new = write(tmp_path / "new" / "p.yaml", NEW).parent
    corpus = write(tmp_path / "corpus" / "lines.txt", CORPUS).parent
    return old, new, corpus


def test_diff_lists_each_changed_verdict_with_its_rules(
    dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, corpus = dirs
    code = main(["policy", "diff", str(old), str(new), "--corpus", str(corpus)])
    out = capsys.readouterr().out
    assert code == 1, out  # changes found
    assert "lines.txt:3: ask -> deny: 'rm -rf build'" in out
    assert "    old: t.rm\n    new: t.rm-recursive\n" in out
    assert "lines.txt:4: none -> ask: 'curl -d hello https://example.com'" in out
    # the bundle's own catalog: `delete` is a destructive subcommand only in NEW
    assert "lines.txt:6: none -> ask: 'deploytool --target prod delete'" in out
    assert "lines.txt:7: ask -> deny: 'rm -r \\\\\\n  dist'" in out  # a #| block
    assert "'rm a.txt'" not in out  # unchanged: not listed
    assert "'curl https://example.com'" not in out
    assert out.rstrip().endswith(
        "6 command(s) replayed, 4 verdict(s) changed (4 stricter, 0 looser)"
    )


def test_diff_json_and_no_change(
    dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, corpus = dirs
    assert main(["policy", "diff", str(new), str(old), "--corpus", str(corpus), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == {"replayed": 6, "changed": 4, "stricter": 0, "looser": 4}
    first = doc["changes"][0]
    assert first["command"] == "rm -rf build"
    assert first["old"] == {"verdict": "deny", "rules": ["t.rm-recursive"]}
    assert first["new"] == {"verdict": "ask", "rules": ["t.rm"]}
    # the same policy on both sides: nothing changes, exit 0
    assert main(["policy", "diff", str(old), str(old), "--corpus", str(corpus)]) == 0
    assert "0 verdict(s) changed" in capsys.readouterr().out


def test_diff_without_corpus_replays_inline_tests_and_fixtures(
    tmp_path: Path, dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, _corpus = dirs
    write(new / "fixtures.txt", "# ruleid: t.rm-recursive\nrm -R /srv/app\n")
    assert main(["policy", "diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "fixtures.txt:2: ask -> deny: 'rm -R /srv/app'" in out


def test_diff_a_broken_policy_is_exit_2(
    tmp_path: Path, dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, _new, corpus = dirs
    broken = write(tmp_path / "broken" / "p.yaml", "version: 1\nrules: [{id: x}]\n").parent
    assert main(["policy", "diff", str(old), str(broken), "--corpus", str(corpus)]) == 2
    assert "does not load" in capsys.readouterr().err
