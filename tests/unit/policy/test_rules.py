"""The YAML policy engine: loading (with file:line:column problems), matchers, layering.

Most tests judge hand-built command models (:mod:`airlock.policy.model`), so that each
matcher is tested exactly; the tests of inline tests and fixtures use the real parser.
"""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Mapping
from datetime import date
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from airlock._errors import InvalidRequest
from airlock.policy.loader import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    PolicyBundle,
    PolicyError,
    PolicyProblem,
    _yaml,
    load_bundle,
    read_fixtures,
)
from airlock.policy.model import Analysis, Classification, Redirect, SimpleCommand
from airlock.policy.rules import Globs
from airlock.types import Finding, FindingSource, Severity, Verdict
from tests.helpers.policy import load_policy, policy, policy_problems, rule_yaml, write_policy

# --------------------------------------------------------------------------- helpers


def cmd(
    *words: str,
    redirects: tuple[Redirect, ...] = (),
    assignments: tuple[tuple[str, str], ...] = (),
    wrappers: tuple[str, ...] = (),
    span: tuple[int, int] = (0, 0),
    background: bool = False,
    dynamic: bool = False,
    pipeline: int = -1,
    position: int = 0,
) -> SimpleCommand:
    """A command from its already-split words: "-rf" gives flags -r and -f, "--x=1" gives
    --x; every other word is a positional (no "--" handling: tests do not need it)."""
    argv0, args = words[0], words[1:]
    flags: list[str] = []
    positionals: list[str] = []
    for w in args:
        if w.startswith("--"):
            flags.append(w.split("=", 1)[0])
        elif w.startswith("-") and len(w) > 1:
            flags.extend(f"-{c}" for c in w[1:])
        else:
            positionals.append(w)
    return SimpleCommand(
        argv0=argv0,
        name=argv0.rsplit("/", 1)[-1],
        args=args,
        flags=tuple(flags),
        positionals=tuple(positionals),
        redirects=redirects,
        assignments=assignments,
        wrappers=wrappers,
        text=" ".join(words),
        span=span,
        dynamic=dynamic,
        background=background,
        pipeline=pipeline,
        pipeline_position=position,
    )


def line(
    *commands: SimpleCommand,
    source: str | None = None,
    pipelines: tuple[tuple[int, ...], ...] = (),
    findings: tuple[Finding, ...] = (),
    read_only: bool = False,
    normalized: str | None = None,
) -> Analysis:
    return Analysis(
        source=source if source is not None else "; ".join(c.text for c in commands),
        commands=commands,
        pipelines=pipelines,
        findings=findings,
        classification=Classification(),
        read_only=read_only,
        normalized=normalized if normalized is not None else "\n".join(c.text for c in commands),
    )


def load(tmp_path: Path, files: Mapping[str, str]) -> PolicyBundle:
    return load_policy(tmp_path, files, run_tests=False)


def problems(tmp_path: Path, files: Mapping[str, str]) -> tuple[PolicyProblem, ...]:
    return policy_problems(tmp_path, files, run_tests=False)


def rule(match: str, *, rid: str = "t.rule", decision: str = "deny", extra: str = "") -> str:
    """One rule's YAML, with ``match`` as a flow mapping."""
    return rule_yaml("match", match, rid=rid, decision=decision, extra=extra)


def fired(bundle: PolicyBundle, analysis: Analysis) -> list[str]:
    return [f.rule_id for f in bundle.evaluate(analysis).findings]


def one(tmp_path: Path, match: str, **kw: str) -> PolicyBundle:
    return load(tmp_path, {"p.yaml": policy(rule(match, **kw))})


# --------------------------------------------------------------------------- matchers


def test_argv0_matches_the_name_a_glob_or_the_full_path(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [rm, 'mkfs.*', /opt/*/danger]}")
    assert fired(b, line(cmd("rm", "x"))) == ["t.rule"]
    assert fired(b, line(cmd("/usr/bin/rm", "x"))) == ["t.rule"]  # the name is the basename
    assert fired(b, line(cmd("mkfs.ext4", "/dev/sda"))) == ["t.rule"]
    assert fired(b, line(cmd("/opt/x/danger"))) == ["t.rule"]
    assert fired(b, line(cmd("danger"))) == []  # a pattern with / matches the full argv0
    assert fired(b, line(cmd("RM", "x"))) == []  # case-sensitive
    assert fired(b, line(cmd("rmdir", "x"))) == []


def test_flags_all_any_none(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [rm], flags: {all: [-r], any: [-f, --force], none: [-i]}}")
    assert fired(b, line(cmd("rm", "-rf", "x"))) == ["t.rule"]  # -r matches the split -rf
    assert fired(b, line(cmd("rm", "-r", "--force", "x"))) == ["t.rule"]
    assert fired(b, line(cmd("rm", "-r", "x"))) == []  # no -f / --force
    assert fired(b, line(cmd("rm", "-f", "x"))) == []  # no -r
    assert fired(b, line(cmd("rm", "-rfi", "x"))) == []  # -i is excluded
    b2 = load(tmp_path / "2", {"p.yaml": policy(rule("{flags: {any: [--data]}}"))})
    assert fired(b2, line(cmd("curl", "--data=@secret", "u"))) == ["t.rule"]  # without =value


def test_positionals_any_all_none_and_home(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [cp], positionals: {any: ['~/.ssh/*'], none: ['*.pub']}}")
    assert fired(b, line(cmd("cp", "~/.ssh/id_rsa", "/tmp"))) == ["t.rule"]
    assert fired(b, line(cmd("cp", "$HOME/.ssh/id_rsa", "/tmp"))) == ["t.rule"]
    assert fired(b, line(cmd("cp", "${HOME}/.ssh/id_rsa", "/tmp"))) == ["t.rule"]
    assert fired(b, line(cmd("cp", "~/.ssh/id_rsa.pub", "/tmp"))) == []  # none: *.pub
    assert fired(b, line(cmd("cp", "/root/.ssh/id_rsa", "/tmp"))) == []
    b2 = load(tmp_path / "2", {"p.yaml": policy(rule("{positionals: {all: ['/etc/*', '*.bak']}}"))})
    assert fired(b2, line(cmd("mv", "/etc/passwd", "x.bak"))) == ["t.rule"]
    assert fired(b2, line(cmd("mv", "/etc/passwd", "x"))) == []  # '*.bak' matched by none
    assert fired(b2, line(cmd("mv", "/etc/x.bak"))) == ["t.rule"]  # one word may match both


def test_args_match_every_word_including_flag_values(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [curl], args: {any: ['--data=@*', '-T']}}")
    assert fired(b, line(cmd("curl", "--data=@/etc/passwd", "http://x"))) == ["t.rule"]
    assert fired(b, line(cmd("curl", "-T", "f", "http://x"))) == ["t.rule"]
    assert fired(b, line(cmd("curl", "--data=x", "http://x"))) == []


def test_redirects_default_to_writing_ops(tmp_path: Path) -> None:
    b = one(tmp_path, "{redirects: {any: ['~/.bashrc', /etc/*]}}")
    w = Redirect(">>", None, "~/.bashrc")
    assert fired(b, line(cmd("echo", "x", redirects=(w,)))) == ["t.rule"]
    assert fired(b, line(cmd("cat", redirects=(Redirect("<", None, "/etc/passwd"),)))) == []
    assert fired(b, line(cmd("echo", redirects=(Redirect("<>", 3, "/etc/x"),)))) == ["t.rule"]
    b2 = load(tmp_path / "2", {"p.yaml": policy(rule("{redirects: {ops: ['<'], any: [/etc/*]}}"))})
    assert fired(b2, line(cmd("cat", redirects=(Redirect("<", None, "/etc/shadow"),)))) == [
        "t.rule"
    ]
    assert fired(b2, line(cmd("echo", redirects=(Redirect(">", None, "/etc/shadow"),)))) == []
    b3 = load(tmp_path / "3", {"p.yaml": policy(rule("{redirects: {ops: ['&>']}}"))})
    assert fired(b3, line(cmd("make", redirects=(Redirect("&>", None, "log"),)))) == ["t.rule"]
    assert fired(b3, line(cmd("make", redirects=(Redirect(">", None, "log"),)))) == []


def test_assignments_match_names(tmp_path: Path) -> None:
    b = one(tmp_path, "{assignments: {any: [LD_PRELOAD, 'PYTHON*']}}")
    assert fired(b, line(cmd("ls", assignments=(("LD_PRELOAD", "/tmp/x.so"),)))) == ["t.rule"]
    assert fired(b, line(cmd("ls", assignments=(("PYTHONPATH", "."),)))) == ["t.rule"]
    assert fired(b, line(cmd("ls", assignments=(("X", "LD_PRELOAD"),)))) == []


def test_wrapped_by(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [rm], wrapped_by: [sudo, 'bash -c']}")
    assert fired(b, line(cmd("rm", "x", wrappers=("sudo",)))) == ["t.rule"]
    assert fired(b, line(cmd("rm", "x", wrappers=("env", "bash -c")))) == ["t.rule"]
    assert fired(b, line(cmd("rm", "x", wrappers=("env",)))) == []
    assert fired(b, line(cmd("rm", "x"))) == []


def test_background_and_dynamic(tmp_path: Path) -> None:
    b = one(tmp_path, "{background: true}")
    assert fired(b, line(cmd("sleep", "9", background=True))) == ["t.rule"]
    assert fired(b, line(cmd("sleep", "9"))) == []
    b2 = load(tmp_path / "2", {"p.yaml": policy(rule("{dynamic: true}"))})
    assert fired(b2, line(cmd("$X", "a", dynamic=True))) == ["t.rule"]
    assert fired(b2, line(cmd("ls"))) == []
    b3 = load(tmp_path / "3", {"p.yaml": policy(rule("{argv0: [ls], dynamic: false}"))})
    assert fired(b3, line(cmd("ls"))) == ["t.rule"]


def test_pipeline_from_an_earlier_command(tmp_path: Path) -> None:
    b = one(tmp_path, "{pipeline: {from: {argv0: [curl, wget]}, to: {argv0: [sh, bash]}}}")
    curl = cmd("curl", "-s", "http://x", pipeline=0, position=0)
    sh = cmd("sh", pipeline=0, position=1, span=(20, 22))
    result = b.evaluate(line(curl, sh, pipelines=((0, 1),)))
    assert [(f.rule_id, f.span) for f in result.findings] == [("t.rule", (20, 22))]
    # The same commands, not in one pipeline; or in the wrong order.
    assert fired(b, line(cmd("curl", "http://x"), cmd("sh"))) == []
    sh0 = cmd("sh", pipeline=0, position=0)
    curl1 = cmd("curl", "http://x", pipeline=0, position=1)
    assert fired(b, line(sh0, curl1, pipelines=((0, 1),))) == []
    # Different pipelines of one line.
    other = cmd("sh", pipeline=1, position=1)
    assert fired(b, line(curl, cmd("cat", pipeline=1), other, pipelines=((0,), (1, 2)))) == []
    # Without `to`: any later command; the rule's other keys constrain it too.
    b2 = load(
        tmp_path / "2", {"p.yaml": policy(rule("{argv0: [tee], pipeline: {from: {argv0: [cat]}}}"))}
    )
    cat = cmd("cat", "/etc/shadow", pipeline=0)
    tee = cmd("tee", "x", pipeline=0, position=2)
    assert fired(b2, line(cat, cmd("grep", "x", pipeline=0, position=1), tee)) == ["t.rule"]
    assert fired(b2, line(cat, cmd("grep", pipeline=0, position=1))) == []


def test_empty_match_mappings_are_rejected(tmp_path: Path) -> None:
    found = problems(tmp_path, {"p.yaml": policy(rule("{}"))})
    assert "must not be empty" in found[0].message
    found = problems(tmp_path / "2", {"p.yaml": policy(rule("{flags: {}}"))})
    assert "must not be empty" in found[0].message and "all, any, none" in found[0].hint


def test_regex_is_a_line_rule_fired_once(tmp_path: Path) -> None:
    b = one(tmp_path, "{regex: 'base64 +-d'}", decision="ask")
    a = line(cmd("echo", "x"), cmd("base64", "-d"), source="echo x | base64  -d | sh")
    result = b.evaluate(a)
    assert [(f.rule_id, f.span, f.subcommand) for f in result.findings] == [
        ("t.rule", (0, len(a.source)), a.source)
    ]
    assert result.verdict is Verdict.ASK
    assert fired(b, line(cmd("ls"))) == []
    # A line rule fires even when the parser found no command at all.
    assert fired(b, line(source="# base64 -d")) == ["t.rule"]


def test_regex_with_command_keys_is_per_command(tmp_path: Path) -> None:
    b = one(tmp_path, "{argv0: [git], regex: 'push +--force'}")
    a = line(cmd("git", "push", "--force"), cmd("ls"), source="git push --force; ls")
    assert [f.subcommand for f in b.evaluate(a).findings] == ["git push --force"]


def test_normalized_regex(tmp_path: Path) -> None:
    b = one(tmp_path, "{normalized_regex: '^rm -rf /$'}")
    a = line(cmd("rm", "-rf", "/"), source="'r'm -rf /", normalized="rm -rf /")
    assert fired(b, a) == ["t.rule"]
    assert fired(b, line(cmd("rm", "-rf", "/x"), normalized="rm -rf /x")) == []


def test_line_span_counts_bytes(tmp_path: Path) -> None:
    b = one(tmp_path, "{regex: 'é'}")
    assert b.evaluate(line(source="echo é")).findings[0].span == (0, 7)


def test_macro_any_of_and_not(tmp_path: Path) -> None:
    header = """\
    macros:
      download: {argv0: [curl, wget]}
      to_shell: {any_of: [{argv0: [sh, bash]}, {argv0: [python3], flags: {any: [-c]}}]}
      shell_pipe: {pipeline: {from: {macro: download}, to: {macro: to_shell}}}
    """
    b = load(
        tmp_path,
        {
            "p.yaml": policy(
                rule("{macro: shell_pipe}", rid="pipe"),
                rule("{macro: download, not: {args: {any: ['https://*']}}}", rid="plain-http"),
                header=header,
            )
        },
    )
    curl = cmd("curl", "http://x", pipeline=0)
    py = cmd("python3", "-c", "x", pipeline=0, position=1)
    assert sorted(fired(b, line(curl, py, pipelines=((0, 1),)))) == ["pipe", "plain-http"]
    py_file = cmd("python3", "x.py", pipeline=0, position=1)
    assert fired(b, line(curl, py_file, pipelines=((0, 1),))) == ["plain-http"]
    assert fired(b, line(cmd("wget", "https://x"))) == []


def test_lists_in_patterns(tmp_path: Path) -> None:
    header = """\
    lists:
      system_dirs: [/, /etc, '/usr/*']
      rm_like: [rm, shred]
      recursive: [-r, -R, --recursive]
    """
    b = load(
        tmp_path,
        {
            "p.yaml": policy(
                rule(
                    "{argv0: [$rm_like], flags: {any: [$recursive]},"
                    " positionals: {any: [$system_dirs, /boot]}}"
                ),
                header=header,
            )
        },
    )
    assert fired(b, line(cmd("rm", "-rf", "/"))) == ["t.rule"]
    assert fired(b, line(cmd("shred", "--recursive", "/usr/lib"))) == ["t.rule"]
    assert fired(b, line(cmd("rm", "-R", "/boot"))) == ["t.rule"]
    assert fired(b, line(cmd("rm", "-rf", "/home"))) == []
    assert fired(b, line(cmd("rm", "/etc"))) == []


def test_lists_and_macros_are_shared_across_files(tmp_path: Path) -> None:
    b = load(
        tmp_path,
        {
            "a/lists.yaml": "version: 1\nlists:\n  shells: [sh, bash]\n"
            "macros:\n  shell: {argv0: [$shells]}\n",
            "b/rules.yaml": policy(rule("{macro: shell}")),
        },
    )
    assert fired(b, line(cmd("bash"))) == ["t.rule"]


def test_globs_exact_and_patterns() -> None:
    g = Globs([("$l", ("a", "b*")), ("~/x", ("~/x",))], home=True)
    assert g.match("a") and g.match("bcd") and not g.match("ab")
    assert g.match("$HOME/x") and g.match("~/x") and g.match("${HOME}/x")
    assert g.which("bz") == "'b*' (from $l)"
    assert g.literal_names is None
    assert Globs.of(["rm", "mv"]).literal_names == frozenset({"rm", "mv"})


# --------------------------------------------------------------------------- exceptions


def test_exception_stops_the_rule_for_matching_words(tmp_path: Path) -> None:
    extra = """\
    exceptions:
      - values: ['/tmp/*', $scratch]
        justification: scratch space
    """
    b = load(
        tmp_path,
        {
            "p.yaml": policy(
                rule("{argv0: [rm]}", extra=extra),
                header="lists:\n  scratch: ['~/scratch/*']\n",
            )
        },
    )
    assert fired(b, line(cmd("rm", "-rf", "/tmp/build"))) == []
    assert fired(b, line(cmd("rm", "$HOME/scratch/x"))) == []
    assert fired(b, line(cmd("rm", "/var/x"))) == ["t.rule"]
    out = cmd("echo", redirects=(Redirect(">", None, "/tmp/log"),))
    b2 = load(
        tmp_path / "2",
        {"p.yaml": policy(rule("{argv0: [echo]}", extra=extra), header="lists:\n  scratch: [x]\n")},
    )
    assert fired(b2, line(out)) == []  # a redirect target counts too
    hits = b.explain(line(cmd("rm", "/tmp/x")))
    assert [(h.rule_id, h.fired, h.excepted_by) for h in hits] == [
        ("t.rule", False, "scratch space")
    ]


def test_expired_exception_is_ignored_and_warned(tmp_path: Path) -> None:
    extra = """\
    exceptions:
      - values: ['/tmp/*']
        justification: old
        expires: 2024-06-30
    """
    b = one(tmp_path, "{argv0: [rm]}", extra=extra)
    a = line(cmd("rm", "/tmp/x"))
    assert fired(b, a) == ["t.rule"]  # today is after 2024-06-30
    assert b.evaluate(a, today=date(2024, 6, 30)).findings == ()  # holds through its day
    assert fired(b, line(cmd("rm", "/tmp/x"))) == ["t.rule"]
    [warning] = b.warnings
    assert "expired on 2024-06-30" in warning.message
    assert (warning.line, warning.column) == (12, 18)


def test_invalid_exception_date(tmp_path: Path) -> None:
    extra = """\
    exceptions:
      - values: ['/tmp/*']
        justification: x
        expires: 2027-02-30
    """
    [p] = problems(tmp_path, {"p.yaml": policy(rule("{argv0: [rm]}", extra=extra))})
    assert "invalid date '2027-02-30'" in p.message and (p.line, p.column) == (12, 18)
    extra2 = extra.replace("2027-02-30", "30/06/2027")
    [p] = problems(tmp_path / "2", {"p.yaml": policy(rule("{argv0: [rm]}", extra=extra2))})
    assert "invalid date" in p.message and "YYYY-MM-DD" in p.hint


# --------------------------------------------------------------------------- verdicts


LAYERS = {
    "10-org.yaml": """\
    version: 1
    layer: organisation
    rules:
      - id: org.rm-root
        title: Deleting the root
        description: x
        decision: deny
        severity: critical
        match: {argv0: [rm], positionals: {any: [/]}}
    """,
    "20-team.yaml": """\
    version: 1
    layer: team
    rules:
      - id: team.rm
        title: Deleting files
        description: x
        decision: ask
        severity: medium
        match: {argv0: [rm]}
    """,
    "30-project.yaml": """\
    version: 1
    layer: project
    rules:
      - id: project.ok
        title: Everyday commands
        description: x
        decision: allow
        severity: info
        match: {argv0: [rm, ls, cat]}
    """,
}


def test_layers_strictest_wins_and_allow_never_cancels(tmp_path: Path) -> None:
    b = load(tmp_path, LAYERS)
    assert [r.layer.value for r in b.rules] == ["organisation", "team", "project"]
    v = b.evaluate(line(cmd("rm", "-rf", "/", span=(0, 9))))
    assert v.verdict is Verdict.DENY
    assert [(f.rule_id, f.verdict) for f in v.findings] == [
        ("org.rm-root", Verdict.DENY),
        ("team.rm", Verdict.ASK),
        ("project.ok", Verdict.ALLOW),
    ]
    assert all(f.source is FindingSource.STATIC for f in v.findings)
    assert b.evaluate(line(cmd("rm", "x"))).verdict is Verdict.ASK
    assert b.evaluate(line(cmd("ls"), cmd("cat", "f"))).verdict is Verdict.ALLOW


def test_allow_only_when_every_command_is_covered(tmp_path: Path) -> None:
    b = load(tmp_path, LAYERS)
    # `make` is neutral: no opinion, the dry run decides.
    v = b.evaluate(line(cmd("ls"), cmd("make")))
    assert v.verdict is None and [f.rule_id for f in v.findings] == ["project.ok"]
    assert b.evaluate(line(cmd("make"))).verdict is None
    assert b.evaluate(line(source="")).verdict is None  # nothing to allow
    # Deny and ask fire on nested/wrapped commands too: they are commands of the model.
    nested = cmd("rm", "/", wrappers=("sudo", "bash -c"), span=(0, 30))
    assert b.evaluate(line(cmd("ls"), nested)).verdict is Verdict.DENY


def test_allowed_read_only(tmp_path: Path) -> None:
    b = load(tmp_path, LAYERS)
    assert b.evaluate(line(cmd("ls"), read_only=True)).allowed_read_only
    assert not b.evaluate(line(cmd("ls"), read_only=False)).allowed_read_only
    assert not b.evaluate(line(cmd("make"), read_only=True)).allowed_read_only
    assert not b.evaluate(line(cmd("rm", "x"), read_only=True)).allowed_read_only


def test_parser_findings_join_and_order(tmp_path: Path) -> None:
    b = load(tmp_path, LAYERS)
    parse = Finding(
        "dynamic.command-name", Verdict.ASK, Severity.MEDIUM, "dyn", FindingSource.STATIC
    )
    decode = Finding(
        "decode-to-shell", Verdict.DENY, Severity.HIGH, "b64", FindingSource.STATIC, span=(5, 9)
    )
    v = b.evaluate(line(cmd("ls", span=(0, 2)), findings=(parse, decode)))
    assert v.verdict is Verdict.DENY
    assert [f.rule_id for f in v.findings] == [
        "decode-to-shell",
        "dynamic.command-name",
        "project.ok",
    ]
    # Strictest first, then by span.
    two = b.evaluate(line(cmd("rm", "a", span=(10, 14)), cmd("rm", "b", span=(0, 4))))
    assert [(f.rule_id, f.span) for f in two.findings] == [
        ("team.rm", (0, 4)),
        ("team.rm", (10, 14)),
        ("project.ok", (0, 4)),
        ("project.ok", (10, 14)),
    ]


def test_line_rule_cannot_allow(tmp_path: Path) -> None:
    [p] = problems(tmp_path, {"p.yaml": policy(rule("{regex: '^ls$'}", decision="allow"))})
    assert "allow rule cannot be a line rule" in p.message and (p.line, p.column) == (6, 15)


def test_indexing_keeps_glob_and_keyless_rules(tmp_path: Path) -> None:
    b = load(
        tmp_path,
        {
            "p.yaml": policy(
                rule("{argv0: [rm]}", rid="a"),
                rule("{argv0: ['r*']}", rid="b"),
                rule("{flags: {any: [-f]}}", rid="c"),
                rule("{any_of: [{argv0: [rm]}, {argv0: [mv]}]}", rid="d"),
                rule("{argv0: [rm], not: {argv0: [mv]}}", rid="e"),
            )
        },
    )
    assert sorted(fired(b, line(cmd("rm", "-f", "x")))) == ["a", "b", "c", "d", "e"]
    assert sorted(fired(b, line(cmd("mv", "-f", "x")))) == ["c", "d"]
    assert sorted(fired(b, line(cmd("cp", "x")))) == []


def test_evaluation_is_thread_safe(tmp_path: Path) -> None:
    b = load(tmp_path, LAYERS)
    analyses = [line(cmd("rm", "-rf", "/")), line(cmd("ls")), line(cmd("make"))]
    expected = [b.evaluate(a) for a in analyses]
    errors: list[str] = []

    def work() -> None:
        for _ in range(300):
            for a, want in zip(analyses, expected, strict=True):
                if b.evaluate(a) != want:
                    errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --------------------------------------------------------------------------- problems


def test_unknown_keys_name_line_column_and_allowed_keys(tmp_path: Path) -> None:
    text = """\
    version: 1
    rules:
      - id: a.b
        title: T
        description: D
        decision: deny
        severity: high
        match:
          argv0: [rm]
          positionls: {any: [/]}
        tagz: [x]
    """
    found = problems(tmp_path, {"p.yaml": text})
    assert [(p.line, p.column) for p in found] == [(10, 7), (11, 5)]
    assert found[0].message == "unknown key 'positionls' in rules[0].match"
    assert found[0].hint.startswith("did you mean 'positionals'? allowed keys: any_of, args,")
    assert "tags" in found[1].hint
    assert str(found[0]).startswith(f"{tmp_path / 'p.yaml'}:10:7: unknown key")


def test_schema_problems_are_located(tmp_path: Path) -> None:
    text = """\
    version: 2
    layer: company
    rules:
      - id: Bad_ID
        title: T
        decision: maybe
        severity: yes
        match: {argv0: rm}
    """
    found = problems(tmp_path, {"p.yaml": text})
    got = {(p.line, p.column): p.message for p in found}
    assert got[(1, 10)] == "version: must be 1, found 2"
    assert "'company' is not one of organisation, team, project" in got[(2, 8)]
    assert got[(4, 9)] == "invalid rule id 'Bad_ID'"
    assert got[(4, 5)] == "missing required key 'description' in rules[0]"
    assert "'maybe' is not one of allow, ask, deny" in got[(6, 15)]
    assert "found the boolean true" in got[(7, 15)]  # YAML 1.1: yes is a boolean
    assert "expected a list, found a string" in got[(8, 20)]


def test_each_schema_problem_is_reported_once(tmp_path: Path) -> None:
    # jsonschema reports a missing key once per schema branch requiring it: 11 for 5 problems.
    found = problems(tmp_path, {"p.yaml": "version: 1\nrules: [{id: bad, decision: maybe}]\n"})
    messages = [p.message for p in found]
    assert messages == [
        "missing required key 'title' in rules[0]",
        "missing required key 'description' in rules[0]",
        "missing required key 'severity' in rules[0]",
        "missing required key 'match' in rules[0]",
        "rules[0].decision: 'maybe' is not one of allow, ask, deny",
    ]


def test_duplicate_rule_ids_across_files(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        {"a.yaml": policy(rule("{argv0: [rm]}")), "b/c.yaml": policy(rule("{argv0: [mv]}"))},
    )
    [p] = found
    assert p.file == str(tmp_path / "b" / "c.yaml") and (p.line, p.column) == (3, 9)
    assert f"first defined at {tmp_path / 'a.yaml'}:3:9" in p.message


def test_duplicate_lists_unknown_lists_and_macros(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        {
            "a.yaml": "version: 1\nlists:\n  x: [a]\n",
            "b.yaml": "version: 1\nlists:\n  x: [b]\n  y: [$x]\n"
            "macros:\n  m1: {macro: m2}\n  m2: {macro: m1}\n"
            + "rules:"
            + rule("{argv0: [$nope], macro: nomacro}"),
        },
    )
    messages = [(p.line, p.column, p.message) for p in found]
    assert messages[0][:2] == (3, 3) and "list 'x' is already defined at" in messages[0][2]
    assert messages[1][:2] == (4, 7) and "looks like a list reference" in messages[1][2]
    assert any("macro cycle: m1 -> m2 -> m1" in m for _l, _c, m in messages)
    assert any("unknown list '$nope'" in m and (ln, c) == (14, 21) for ln, c, m in messages)
    assert any("unknown macro 'nomacro'" in m for _l, _c, m in messages)


def test_bad_regex_reports_its_position(tmp_path: Path) -> None:
    [p] = problems(tmp_path, {"p.yaml": policy(rule("{regex: 'ab(c'}"))})
    assert p.message.startswith("invalid regular expression: missing ), unterminated subpattern")
    assert (p.line, p.column) == (8, 23)  # the '(' inside the quoted regex
    [p] = problems(tmp_path / "2", {"p.yaml": policy(rule("{normalized_regex: x*+*}"))})
    assert "at position 3" in p.message


def test_policy_error_is_an_invalid_request_listing_every_problem(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        load(tmp_path, {"a.yaml": "version: 3\n", "b.yaml": "rules: []\n"})
    e = info.value
    assert isinstance(e, PolicyError) and e.reason == "INVALID_POLICY"
    text = str(e)
    assert f"{tmp_path / 'a.yaml'}:1:10: version: must be 1" in text
    assert f"{tmp_path / 'b.yaml'}:1:1: missing required key 'version'" in text


# --------------------------------------------------------------------------- malformed YAML


@pytest.mark.parametrize(
    ("content", "where", "needle"),
    [
        ("version: 1\nrules:\n\t- id: x\n", (3, 1), "tabs"),
        ("", (1, 1), "the file is empty"),
        ("# only a comment\n", (1, 1), "the file is empty"),
        ("---\n", (1, 1), "the file is empty"),
        ("- a\n- b\n", (1, 1), "must be a mapping, found a list"),
        ("version: 1\nversion: 1\n", (2, 1), "duplicate key 'version'"),
        ("version: 1\n---\nversion: 1\n", (2, 1), "more than one YAML document"),
        ("version: &v 1\nlayer: *v\n", (2, 8), "aliases"),
        ("version: !!python/object:os.system 1\n", (1, 10), "unsupported YAML tag"),
        ("version: 1\nrules: [\n", (3, 1), "invalid YAML"),
        ("version: 1\x07\n", (1, 11), "invalid character"),
        ("{[a]: 1}\n", (1, 2), "mapping key must be a plain string"),
    ],
)
def test_malformed_yaml_is_a_clear_problem(
    tmp_path: Path, content: str, where: tuple[int, int], needle: str
) -> None:
    (tmp_path / "p.yaml").write_text(content)
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path, run_tests=False)
    [p] = info.value.problems
    assert (p.line, p.column) == where, p
    assert needle in str(p)


def test_binary_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "b.yaml").write_bytes(b"version: 1\x00\n")
    (tmp_path / "c.yaml").write_bytes(b"version: 1\ntitle: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path, run_tests=False)
    a, b, c = info.value.problems
    assert "not UTF-8 text (byte 0x89)" in a.message and (a.line, a.column) == (1, 1)
    assert "NUL" in b.message and (b.line, b.column) == (1, 11)
    assert "not UTF-8" in c.message and (c.line, c.column) == (2, 11)


def test_deeply_nested_yaml(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nx: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path, run_tests=False)
    [p] = info.value.problems
    assert f"nesting too deep (more than {MAX_DEPTH} levels)" in p.message
    assert (p.line, p.column) == (2, 4 + MAX_DEPTH)  # the first bracket past the limit


@pytest.mark.parametrize(
    "value",
    [
        "{a: " * 1000 + "1" + "}" * 1000,  # flow mappings
        "- " + "[" * 1000 + "]" * 1000,  # inside a block sequence
        "\n" + "".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "v",  # block
    ],
    ids=["flow-mapping", "in-sequence", "block-mapping"],
)
def test_deep_nesting_has_our_own_message(tmp_path: Path, value: str) -> None:
    """Whatever nests too deep gets the loader's message, never the YAML library's."""
    (tmp_path / "p.yaml").write_text("version: 1\nx: " + value + "\n")
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path, run_tests=False)
    [p] = info.value.problems
    assert p.message == f"nesting too deep (more than {MAX_DEPTH} levels)"


def test_brackets_in_text_are_not_nesting(tmp_path: Path) -> None:
    """Brackets in comments, quoted, plain and block scalars are text, not flow collections."""
    many = "[" * (MAX_DEPTH + 10)
    (tmp_path / "p.yaml").write_text(
        f"version: 1  # {many}\n"
        f"a: '{many}'\n"
        f'b: "{many}\\" {many}"\n'
        f"c: x{many}\n"
        f"d: |\n  {many}\n  more {many}\n"
        f"e: ['c[', \"d{{\", {{f: [g]}}]\n"
    )
    doc = _yaml._compose((tmp_path / "p.yaml").read_text(), "p.yaml")
    assert doc.value["a"] == many and doc.value["c"] == "x" + many
    assert doc.value["d"] == f"{many}\nmore {many}\n"
    assert doc.value["e"] == ["c[", "d{", {"f": ["g"]}]


def test_huge_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\n" + "# padding\n" * 1_048_576)  # 10 MiB
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path, run_tests=False)
    [p] = info.value.problems
    assert f"file too large (more than {MAX_FILE_BYTES} bytes)" in p.message


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_bundle(tmp_path)
    with pytest.raises(PolicyError, match="no such file or directory"):
        load_bundle(tmp_path / "nope")


# --------------------------------------------------------------------------- the bundle


def test_version_files_and_hidden_files(tmp_path: Path) -> None:
    files = {
        "b.yaml": policy(rule("{argv0: [rm]}")),
        "a/x.yml": "version: 1\n",
        ".hidden.yaml": "garbage: [",
        ".git/c.yaml": "garbage: [",
        "notes.md": "not a policy",
    }
    b1 = load(tmp_path, files)
    assert b1.files == (str(tmp_path / "a" / "x.yml"), str(tmp_path / "b.yaml"))
    assert len(b1.version) == 64
    assert load_bundle(tmp_path, run_tests=False).version == b1.version
    (tmp_path / "a" / "x.yml").write_text("version: 1  # edited\n")
    assert load_bundle(tmp_path, run_tests=False).version != b1.version
    # Loading several paths at once, e.g. an organisation and a project directory.
    both = load_bundle([tmp_path / "a", tmp_path / "b.yaml"], run_tests=False)
    assert [r.id for r in both.rules] == ["t.rule"]


def test_rule_fields(tmp_path: Path) -> None:
    extra = """\
    references: [https://example.org/why]
    tags: [destructive]
    tests:
      match: ['rm x']
      not_match: ['ls']
    """
    b = one(tmp_path, "{argv0: [rm]}", extra=extra)
    [r] = b.rules
    assert (r.id, r.decision, r.severity, r.line, r.file) == (
        "t.rule",
        Verdict.DENY,
        Severity.HIGH,
        3,
        str(tmp_path / "p.yaml"),
    )
    assert r.references == ("https://example.org/why",) and r.tags == ("destructive",)
    assert [(t.command, t.expect_fire, t.line) for t in r.tests] == [
        ("rm x", True, 12),
        ("ls", False, 13),
    ]
    assert b.rule("t.rule") is r and b.rule("nope") is None


def test_unused_lists_and_macros_are_warnings(tmp_path: Path) -> None:
    b = load(tmp_path, {"p.yaml": "version: 1\nlists:\n  l: [a]\nmacros:\n  m: {argv0: [a]}\n"})
    assert [(w.line, w.message) for w in b.warnings] == [
        (3, "list 'l' is never used"),
        (5, "macro 'm' is never used"),
    ]


def test_schema_is_valid_draft_2020_12_with_descriptions() -> None:
    text = resources.files("airlock.policy").joinpath("data/policy.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for key, sub in schema["$defs"]["match"]["properties"].items():
        assert sub.get("description"), key


# --------------------------------------------------------------------------- fixtures


def test_fixture_file_parsing() -> None:
    text = textwrap.dedent(
        """\
        # A fixture file.
        # ruleid: fs.rm-root
        rm -rf /

        # ok: fs.rm-root, net.curl
        # ruleid: other
        rm -rf build/ \\
          dist/
        ls
        # just a comment
        #ruleid:last
        echo done
        # ruleid: dangling
        """
    )
    cases, found = read_fixtures("f.sh", text)
    assert [(c.line, c.rule_id, c.expect_fire, c.command) for c in cases] == [
        (3, "fs.rm-root", True, "rm -rf /"),
        (7, "fs.rm-root", False, "rm -rf build/ \\\n  dist/"),
        (7, "net.curl", False, "rm -rf build/ \\\n  dist/"),
        (7, "other", True, "rm -rf build/ \\\n  dist/"),
        (12, "last", True, "echo done"),
    ]
    [p] = found
    assert p.line == 13 and "not followed by a command" in p.message


# --------------------------------------------------------------------------- inline tests


def test_inline_tests_run_with_the_real_parser(tmp_path: Path) -> None:
    extra = """\
    exceptions:
      - values: ['/tmp/*']
        justification: scratch, long expired
        expires: 2001-01-01
    tests:
      match: ['rm -rf /', "sudo rm -r /etc", "bash -c 'rm -R /usr'", 'echo $(rm -rf /)']
      not_match: ['rm -rf build/', 'rm -rf /tmp/x', "echo 'rm -rf /'"]
    """
    text = policy(
        rule(
            "{argv0: [rm], flags: {any: [-r, -R]}, positionals: {any: [/, /etc, /usr]}}",
            extra=extra,
        )
    )
    write_policy(tmp_path, {"p.yaml": text})
    bundle = load_bundle(tmp_path)  # the inline tests pass: no error
    [r] = bundle.rules
    assert len(r.tests) == 7
    # 'rm -rf /tmp/x' passes as not_match although the exception has expired: inline tests
    # hold every exception in force, so a bundle does not stop loading on a date.
    [w] = bundle.warnings
    assert "expired on 2001-01-01" in w.message


def test_failing_inline_tests_reject_the_bundle_and_say_why(tmp_path: Path) -> None:
    extra = """\
    tests:
      match: ['chmod -R 777 /']
      not_match: ['rm x']
    """
    write_policy(tmp_path, {"p.yaml": policy(rule("{argv0: [rm]}", extra=extra))})
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path)
    first, second = info.value.problems
    assert (first.line, first.column) == (10, 15)
    assert first.message == (
        "inline test failed: rule 't.rule' should fire on 'chmod -R 777 /', but it did not fire: "
        "commands seen: 'chmod' (flags ['-R'], positionals ['777', '/'])"
    )
    assert (second.line, second.column) == (11, 19)
    assert second.message == (
        "inline test failed: rule 't.rule' should not fire on 'rm x', but it fired "
        "(argv0: name 'rm' matches rm)"
    )


def test_mutated_files_give_problems_never_tracebacks(tmp_path: Path) -> None:
    import random

    base = policy(
        rule("{argv0: [rm], flags: {any: [-r]}, positionals: {any: [$dirs]}}", rid="a.b"),
        rule("{pipeline: {from: {macro: dl}, to: {argv0: [sh]}}, regex: 'x+'}", rid="c.d"),
        header="lists:\n  dirs: [/, /etc]\nmacros:\n  dl: {argv0: [curl]}\n",
    ).encode()
    rng = random.Random(20261121)
    alphabet = b" \t\n:-[]{}'\"#&*!|>%@`$~?,019az\\\x00\xff\xc3"
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos:pos] = bytes([rng.choice(alphabet)])
            elif op < 0.8:
                del data[pos : pos + rng.randint(1, 5)]
            else:
                data[pos] = rng.choice(alphabet)
        (tmp_path / "p.yaml").write_bytes(bytes(data))
        try:
            load_bundle(tmp_path, run_tests=False)
        except PolicyError as e:
            assert e.problems and all(p.line >= 0 and p.column >= 0 for p in e.problems)


def test_rules_can_be_built_in_code() -> None:
    from airlock.policy.rules import Compiler, Rule, RuleException, RuleSet

    reported: list[str] = []
    compiler = Compiler({}, {}, lambda path, message, hint, offset: reported.append(message))
    matcher = compiler.match({"argv0": ["rm"], "positionals": {"any": ["~/*"]}}, ("x",))
    r = Rule(
        "code.rule",
        "Deletes in home",
        "d",
        Verdict.ASK,
        Severity.LOW,
        matcher,
        exceptions=(RuleException(("~/tmp/*",), "scratch"),),
    )
    rs = RuleSet([r])
    assert [f.rule_id for f in rs.evaluate(line(cmd("rm", "$HOME/x"))).findings] == ["code.rule"]
    # An exception covers a command only when it covers every operand: one excepted
    # operand must not let the others through.
    assert [f.rule_id for f in rs.evaluate(line(cmd("rm", "~/x", "~/tmp/y"))).findings] == [
        "code.rule"
    ]
    assert rs.evaluate(line(cmd("rm", "~/tmp/y", "~/tmp/z"))).findings == ()
    assert r.findings(line(cmd("rm", "~/x")))[0].verdict is Verdict.ASK
    assert reported == []
