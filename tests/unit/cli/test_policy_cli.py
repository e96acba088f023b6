"""``airlock policy lint|test|explain``: run through ``airlock.client.cli.main``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airlock.cli.main import main
from airlock.policy.loader import load_bundle

GOOD = """\
version: 1
layer: organisation
lists:
  system_dirs: [/, /etc, /usr]
rules:
  - id: fs.rm-system
    title: Recursive deletion of a system directory
    description: Destroys the machine.
    decision: deny
    severity: critical
    match:
      argv0: [rm]
      flags: {any: [-r, -R, --recursive]}
      positionals: {any: [$system_dirs]}
    exceptions:
      - values: [/usr]
        justification: an old exception
        expires: 2020-01-01
    tests:
      match: ["rm -rf /", "sudo rm -r /etc"]
      not_match: ["rm -rf build/"]
  - id: read.ls
    title: Listing files
    description: Reads only.
    decision: allow
    severity: info
    match: {argv0: [ls, cat]}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- lint


def test_lint_ok_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "p.yaml", GOOD)
    code, out, err = run(capsys, "lint", str(tmp_path))
    assert code == 0
    assert out == (
        f"{tmp_path / 'p.yaml'}:18:18: warning: exception of rule 'fs.rm-system' expired on "
        "2020-01-01; it is ignored (renew it with a later `expires:` or remove it)\n"
    )
    assert err.startswith("ok: 1 file(s), 2 rule(s), 1 warning(s); version ")


def test_lint_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.yaml", GOOD)
    write(
        tmp_path / "b.yaml",
        """\
        version: 1
        rules:
          - id: fs.rm-system
            title: Again
            description: x
            decision: ask
            severity: low
            match: {argv0: [rm], regex: '[z-a]', flagz: {}}
        """,
    )
    code, out, err = run(capsys, "lint", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'b.yaml'}:8:42: error: unknown key 'flagz'")
    assert "(did you mean 'flags'? allowed keys:" in lines[0]
    assert lines[-1].startswith(f"{tmp_path / 'a.yaml'}:18:18: warning: exception")
    assert err == "1 error, 1 warning(s)\n"
    # Once the schema error is fixed, the semantic errors show.
    (tmp_path / "b.yaml").write_text((tmp_path / "b.yaml").read_text().replace(", flagz: {}", ""))
    code, out, _err = run(capsys, "lint", str(tmp_path))
    assert code == 1
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert errors == [
        f"{tmp_path / 'b.yaml'}:3:9: error: duplicate rule id 'fs.rm-system' (first defined at "
        f"{tmp_path / 'a.yaml'}:6:9) (rule ids are unique across the bundle; rename one)",
        f"{tmp_path / 'b.yaml'}:8:35: error: invalid regular expression: bad character range "
        "z-a at position 1 (regexes are Python `re` syntax; in YAML, single-quote them so that "
        "backslashes stay as written)",
    ]


def test_lint_missing_path_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "lint", str(tmp_path / "nope"))
    assert code == 1 and "no such file or directory" in out
    code, _out, err = run(capsys, "lint")
    assert code == 2 and "required" in err
    code, out, _err = run(capsys, "--help")
    assert code == 0 and "explain" in out


def test_lint_broken_files_never_traceback(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "tabs.yaml").write_text("version: 1\nrules:\n\t- id: x\n")
    (tmp_path / "big.yml").write_text("#" * (2 * 1024 * 1024))
    done = subprocess.run(
        [sys.executable, "-m", "airlock.cli.main", "policy", "lint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout.count(": error: ") == 3


# --------------------------------------------------------------------------- test


FIXTURE = """\
# ruleid: fs.rm-system
rm -rf /
# ok: fs.rm-system
rm -rf build/
# ruleid: read.ls
ls -la
"""


def test_test_runs_inline_tests_and_fixtures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "policy" / "p.yaml", GOOD)
    write(tmp_path / "policy" / "fixtures" / "fs.sh", FIXTURE)
    code, out, _err = run(capsys, "test", str(tmp_path / "policy"))
    assert out.splitlines()[-1] == "6 passed, 0 failed (3 inline, 3 from 1 fixture file(s))"
    assert code == 0
    code, out, _err = run(capsys, "test", "-v", str(tmp_path / "policy"))
    assert code == 0 and out.count(": ok: ") == 6


def test_test_reports_failures_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path / "p.yaml", GOOD.replace('not_match: ["rm -rf build/"]', 'not_match: ["rm -r /"]')
    )
    write(
        tmp_path / "more.txt",
        """\
        # ok: read.ls
        ls
        # ruleid: fs.rm-system
        rm -rf /home
        # ruleid: no.such-rule
        true
        # ruleid: read.ls
        """,
    )
    code, out, _err = run(capsys, "test", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    p, more = tmp_path / "p.yaml", tmp_path / "more.txt"
    assert lines[0].startswith(
        f"{p}:21:19: FAIL: fs.rm-system should not fire on 'rm -r /': it fired (argv0:"
    )
    assert lines[1].startswith(f"{more}:2:1: FAIL: read.ls should not fire on 'ls': it fired")
    assert lines[2].startswith(f"{more}:4:1: FAIL: fs.rm-system should fire on 'rm -rf /home'")
    assert lines[3] == (
        f"{more}:6:1: FAIL: no.such-rule should fire on 'true': the bundle has no rule "
        "'no.such-rule'"
    )
    assert lines[4] == f"{more}:7:1: error: annotation for 'read.ls' is not followed by a command"
    assert lines[5] == "2 passed, 4 failed, 1 error(s) (3 inline, 3 from 1 fixture file(s))"


def test_inline_test_failure_rejects_the_bundle(tmp_path: Path) -> None:
    from airlock.policy.loader import PolicyError

    bad = GOOD.replace('match: ["rm -rf /", "sudo rm -r /etc"]', 'match: ["rm -f /"]')
    write(tmp_path / "p.yaml", bad)
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path)
    [p] = info.value.problems
    assert (p.line, p.column) == (20, 15)
    assert p.message.startswith(
        "inline test failed: rule 'fs.rm-system' should fire on 'rm -f /', but it did not fire:"
        " commands seen: 'rm' (flags ['-f'], positionals ['/'])"
    )


# --------------------------------------------------------------------------- explain


def test_explain_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "p.yaml", GOOD)
    code, out, _err = run(
        capsys, "explain", "--policy", str(tmp_path), "--", "ls", "&&", "sudo", "rm", "-rf", "/"
    )
    assert code == 0
    assert "command: 'ls && sudo rm -rf /'" in out
    assert "argv0: 'rm'  name: 'rm'" in out and "wrappers: 'sudo'" in out
    assert "flags: '-r' '-f'" in out and "positionals: '/'" in out
    assert "fs.rm-system: DENY, fires" in out
    assert "argv0: name 'rm' matches rm" in out
    assert "positionals: any: '/' matches '/' (from $system_dirs)" in out
    assert "static verdict: DENY" in out


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "p.yaml", GOOD)
    code, out, _err = run(capsys, "explain", "--policy", str(tmp_path), "--json", "--", "ls -la")
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "ALLOW"
    assert doc["analysis"]["commands"][0]["name"] == "ls"
    assert doc["analysis"]["commands"][0]["flags"] == ["-l", "-a"]
    assert [r["rule_id"] for r in doc["rules"]] == ["read.ls"]
    assert doc["findings"][0]["source"] == "STATIC"
    # Neutral: no rule mentions make.
    code, out, _err = run(capsys, "explain", "--policy", str(tmp_path), "--json", "--", "make")
    assert json.loads(out)["verdict"] is None


def test_explain_policy_from_env_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "good" / "p.yaml", GOOD)
    monkeypatch.setenv("AIRLOCK_POLICY_DIR", str(tmp_path / "good"))
    code, out, _err = run(capsys, "explain", "--", "cat", "x")
    assert code == 0 and "static verdict: ALLOW" in out
    write(tmp_path / "bad" / "p.yaml", "version: 2\n")
    code, _out, err = run(capsys, "explain", "--policy", str(tmp_path / "bad"), "--", "ls")
    assert code == 1 and "version: must be 1" in err and "does not load" in err
    code, _out, err = run(capsys, "explain", "--policy", str(tmp_path / "good"), "--")
    assert code == 2 and "a COMMAND is required" in err
