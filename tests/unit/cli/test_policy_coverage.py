"""``airlock policy test --coverage``: the rules and exceptions no inline test or fixture
exercises. Real policies written to tmp, the real parser and rule engine, the CLI entry."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from airlock.cli.main import main

POLICY = """\
    version: 1
    rules:
      - id: t.rm
        title: rm
        description: Deletes files.
        decision: ask
        severity: medium
        match: {argv0: [rm]}
        exceptions:
          - values: ["build/*"]
            justification: build output
          - values: ["build/cache"]
            justification: shadowed by the first, never reached
        tests:
          match: ["rm -rf src"]
          not_match: ["rm -rf build/x"]
      - id: t.curl
        title: curl
        description: Talks to the network.
        decision: ask
        severity: medium
        match: {argv0: [curl]}
      - id: t.chmod
        title: chmod
        description: Changes modes.
        decision: ask
        severity: low
        match: {argv0: [chmod]}
        exceptions:
          - values: ["+x", "*.sh"]
            justification: scripts
      - id: t.home
        title: home write
        description: Writes home.
        decision: ask
        severity: medium
        effect:
          files: {scope: [home]}
        tests:
          not_match:
            - files: [{path: src/x, kind: created}]
      - id: t.system
        title: system write
        description: Writes the system.
        decision: deny
        severity: high
        effect:
          files: {scope: [system]}
        tests:
          match:
            - files: [{path: /etc/passwd, kind: modified}]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", "test", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    write(tmp_path / "policy" / "p.yaml", POLICY)
    return tmp_path / "policy"


def test_lists_what_nothing_exercises(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--coverage", str(policy))
    assert code == 0  # gaps alone never fail without --fail-under
    p = policy / "p.yaml"
    gaps = [line for line in out.splitlines() if line.startswith(str(p))]
    assert gaps == [
        f"{p}:3: exception t.rm: exception 2 (values: build/cache) never stopped the rule on "
        "an inline test or fixture command",
        f"{p}:17: rule t.curl: no tests.match command and no fixture command makes it fire",
        f"{p}:23: rule t.chmod: no tests.match command and no fixture command makes it fire",
        f"{p}:23: exception t.chmod: exception 1 (values: +x, *.sh) never stopped the rule on an "
        "inline test or fixture command",
        f"{p}:32: effect rule t.home: no tests.match entry makes it fire",
    ]
    # 3 rules + 3 exceptions + 2 effect rules; t.rm, its first exception, t.system exercised
    assert out.splitlines()[-1] == (
        "coverage: 37.5%: rules 1/3, exceptions 1/3, effect rules 1/2 exercised "
        "(0 fixture command(s))"
    )


def test_fixture_commands_exercise_rules_and_exceptions(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The corpus format: unannotated lines count too, and so do `#|` blocks and
    # continuations; a `# ok:` line that an exception stops exercises the exception.
    write(
        tmp_path / "corpus" / "dangerous.txt",
        """\
        # expect: ask
        curl \\
          https://example.com
        # ok: t.chmod
        chmod +x run.sh
        #| bash <<'EOF'
        #| chmod 777 secret
        #| EOF
        """,
    )
    code, out, _ = run(capsys, "--coverage", "--json", str(policy), str(tmp_path / "corpus"))
    assert code == 0
    doc = json.loads(out)
    assert doc["failed"] == 0 and doc["passed"] == 5  # 4 inline + the `# ok:` case
    cov = doc["coverage"]
    assert cov["rules"] == {"total": 3, "exercised": 3}
    assert cov["exceptions"] == {"total": 3, "exercised": 2}
    assert cov["effect_rules"] == {"total": 2, "exercised": 1}
    assert cov["fixture_commands"] == 3
    assert cov["percent"] == 75.0
    assert [(g["kind"], g["rule_id"]) for g in cov["unexercised"]] == [
        ("exception", "t.rm"),
        ("effect rule", "t.home"),
    ]


def test_a_not_match_command_of_another_rule_does_not_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # t.b's not_match line would make t.a fire, but it is t.b's test, not t.a's.
    write(
        tmp_path / "p.yaml",
        """\
        version: 1
        rules:
          - id: t.a
            title: a
            description: a
            decision: ask
            severity: low
            match: {argv0: [rm]}
          - id: t.b
            title: b
            description: b
            decision: ask
            severity: low
            match: {argv0: [mv]}
            tests:
              match: ["mv a b"]
              not_match: ["rm a"]
        """,
    )
    code, out, _ = run(capsys, "--coverage", str(tmp_path))
    assert code == 0
    assert "rule t.a: no tests.match command" in out
    assert "rule t.b:" not in out


def test_fail_under(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--coverage", "--fail-under", "37.5", str(policy))[0] == 0
    code, out, _ = run(capsys, "--fail-under", "40", str(policy))  # implies --coverage
    assert code == 1
    assert "coverage: 37.5%" in out


def test_failed_tests_still_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "policy" / "p.yaml", POLICY)
    write(tmp_path / "fx" / "cases.sh", "# ruleid: t.curl\nwget https://example.com\n")
    code, out, _ = run(capsys, "--coverage", str(tmp_path / "policy"), str(tmp_path / "fx"))
    assert code == 1
    assert "FAIL: t.curl should fire on 'wget https://example.com'" in out
    assert "coverage: " in out


def test_shipped_policy_is_fully_exercised(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[3]
    code, out, _ = run(
        capsys,
        "--coverage",
        "--fail-under",
        "100",
        str(root / "airlock" / "policy" / "default"),
        str(root / "tests" / "corpus"),
    )
    assert code == 0, out
    assert "coverage: 100.0%" in out
