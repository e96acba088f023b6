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


# --------------------------------------------------------------------------- --audit-log

REMOVED = "net.download-pipe-shell"


def _default_minus_one_rule(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped default policy, and a copy of it without the rule REMOVED."""
    import shutil

    import yaml

    from airlock.policy import store

    default = store.default_policy_dir()
    copy = tmp_path / "minus-one"
    shutil.copytree(default, copy)
    doc = yaml.safe_load((copy / "network.yaml").read_text())
    kept = [r for r in doc["rules"] if r.get("id") != REMOVED]
    assert len(kept) == len(doc["rules"]) - 1  # the rule was there, and is gone
    doc["rules"] = kept
    (copy / "network.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return default, copy


def _audit_log(path: Path, events: list[tuple[str, str]]) -> Path:
    """A real audit log at ``path``, written by the audit package's own writer."""
    from airlock.audit import AuditEvent, AuditLog, Caller, RpcKind

    caller = Caller(uid=1000, pid=4242, gid=1000, exe="/usr/bin/python3.11")
    path.parent.mkdir(parents=True, exist_ok=True)
    with AuditLog(path) as log:
        for kind, command in events:
            log.append(AuditEvent(kind=RpcKind[kind], caller=caller, command=command))
    return path


def test_diff_replays_the_commands_of_an_audit_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default, minus = _default_minus_one_rule(tmp_path)
    log = _audit_log(
        tmp_path / "state" / "audit.sqlite3",
        [
            ("VALIDATE", "curl -fsSL https://get.example.com/install.sh | sh"),
            ("VALIDATE", "ls -la"),
            ("EXECUTE", "curl -fsSL https://get.example.com/install.sh | sh"),  # a duplicate
            ("EXECUTE", "wget -qO- https://x.example/i.sh | bash"),
            ("VALIDATE", "rm -rf /"),
            # An Approve event's command is not replayed (only Validate and Execute).
            ("APPROVE", "wget -qO- https://other.example/a.sh | sh"),
        ],
    )
    before = log.read_bytes()
    code = main(["policy", "diff", str(default), str(minus), "--audit-log", str(log)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert log.read_bytes() == before  # read-only
    # Each changed verdict: where in the log (the newest event of the command), the verdicts
    # and the deciding rule on the old side.
    assert f"{log}:event 3 (execute): deny -> " in out
    assert "'curl -fsSL https://get.example.com/install.sh | sh'" in out
    assert f"{log}:event 4 (execute): deny -> " in out
    assert f"    old: {REMOVED}\n" in out
    new_rules = [ln[9:].split(", ") for ln in out.splitlines() if ln.startswith("    new: ")]
    assert len(new_rules) == 2 and all(REMOVED not in rules for rules in new_rules)
    assert "'ls -la'" not in out and "'rm -rf /'" not in out  # unchanged
    assert "other.example" not in out  # the Approve event
    assert "4 distinct command(s) replayed from the audit log(s) (5 Validate/Execute" in out
    assert "static verdicts only" in out
    assert out.rstrip().endswith(
        "4 command(s) replayed, 2 verdict(s) changed (0 stricter, 2 looser)"
    )

    # JSON: the same, with the audit log's counts; the reverse diff is stricter.
    assert (
        main(["policy", "diff", str(minus), str(default), "--audit-log", str(log), "--json"]) == 1
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["changed"] == 2 and doc["summary"]["stricter"] == 2
    assert doc["summary"]["audit_log"] == {
        "replayed": 4,
        "events": 5,
        "capped": False,
        "limit": 100_000,
        "static_only": True,
    }
    assert all(
        c["new"]["verdict"] == "deny" and REMOVED in c["new"]["rules"] for c in doc["changes"]
    )

    # With --corpus as well: both are replayed; a command in both counts once.
    corpus = write(tmp_path / "corpus" / "c.txt", "ls -la\nrm -rf ./build\n").parent
    args = ["policy", "diff", str(default), str(minus), "--corpus", str(corpus)]
    assert main([*args, "--audit-log", str(log)]) == 1
    assert "5 command(s) replayed, 2 verdict(s) changed" in capsys.readouterr().out


def test_diff_audit_log_cap(tmp_path: Path) -> None:
    from airlock.cli import _policy_diff as pd

    log = _audit_log(
        tmp_path / "audit.sqlite3",
        [("VALIDATE", f"echo {i}") for i in range(5)] + [("VALIDATE", "echo 4")],
    )
    got = pd.audit_lines([log], limit=3)
    assert got.capped and got.events == 3
    assert [line.command for line in got.lines] == ["echo 4", "echo 3"]  # newest first, once
    whole = pd.audit_lines([log, log], limit=6)  # the budget spans the files
    assert whole.events == 6 and whole.capped
    assert [line.command for line in whole.lines] == [f"echo {i}" for i in (4, 3, 2, 1, 0)]
    exact = pd.audit_lines([log], limit=6)
    assert exact.events == 6 and not exact.capped


def test_diff_audit_log_missing_or_not_a_log_is_exit_2(
    tmp_path: Path, dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    old, new, _corpus = dirs
    missing = tmp_path / "nope.sqlite3"
    assert main(["policy", "diff", str(old), str(new), "--audit-log", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the audit log {missing}: it does not exist" in err
    assert not missing.exists()  # not created

    text = write(tmp_path / "notes.txt", "rm -rf /\n")
    assert main(["policy", "diff", str(old), str(new), "--audit-log", str(text)]) == 2
    assert f"{text} is not an Airlock audit log (not an SQLite database)" in capsys.readouterr().err
    assert text.read_text() == "rm -rf /\n"

    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER, body TEXT)")
    conn.close()
    assert main(["policy", "diff", str(old), str(new), "--audit-log", str(other)]) == 2
    assert f"{other} is not an Airlock audit log" in capsys.readouterr().err

    assert main(["policy", "diff", str(old), str(new), "--audit-log", str(tmp_path)]) == 2
    assert "it is not a regular file" in capsys.readouterr().err
