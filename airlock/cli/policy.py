"""``airlock policy``: lint, test and explain policies, without a daemon.

::

    airlock policy lint PATH...
    airlock policy test [--coverage [--fail-under PERCENT]] [--json] PATH...
    airlock policy explain [--policy DIR] [--json] [--effects FILE] [--cwd DIR] [--home DIR]
                           [-- COMMAND...]
    airlock policy diff OLD NEW [--corpus DIR]... [--audit-log FILE]... [--json]

Exit status: 0 ok, 1 problems (lint errors, failed tests, an invalid policy), 2 usage error;
diff: 0 no verdict changes, 1 changes, 2 a policy does not load, an audit log cannot be read,
or a usage error.
test --coverage: the rules and exceptions nothing exercises never change the status, unless
--fail-under PERCENT is given (1 when less than PERCENT is exercised; it implies --coverage).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from airlock._errors import AirlockError
from airlock.cli._policy_diff import MAX_AUDIT_EVENTS
from airlock.egress import EgressPolicy, EgressRule
from airlock.policy import store
from airlock.policy.loader import (
    PolicyBundle,
    PolicyError,
    PolicyProblem,
    iter_fixture_files,
    load_bundle,
    read_effects_file,
    read_fixtures,
    run_fixture,
    run_inline_tests,
)
from airlock.policy.model import Analysis, SimpleCommand
from airlock.policy.rules import PathContext, RuleHit, StaticVerdict
from airlock.types import Effects, Finding, Verdict

__all__ = ["default_policy_dir", "main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def default_policy_dir() -> Path | None:
    """``$AIRLOCK_POLICY_DIR``, else the shipped default policy if it is installed."""
    env = os.environ.get("AIRLOCK_POLICY_DIR")
    if env:
        return Path(env)
    shipped = store.default_policy_dir()
    return shipped if shipped.is_dir() else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock policy",
        description="Lint, test and explain Airlock policies (no daemon needed).",
        epilog="Exit status: 0 ok, 1 problems found, 2 usage error.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    lint = sub.add_parser(
        "lint",
        help="check policy files (schema, meaning, inline tests)",
        description="Load the policy files under PATH... as one bundle and print every problem "
        "as file:line:column: error|warning: message (hint).",
    )
    lint.add_argument("paths", nargs="+", metavar="PATH", help="a policy directory or file")
    test = sub.add_parser(
        "test",
        help="run the inline tests and the fixture files",
        description="Run every rule's inline tests and every fixture file (*.sh, *.txt) under "
        "PATH...: a `# ruleid: ID` line before a command means rule ID must fire on it, "
        "`# ok: ID` that it must not.",
    )
    test.add_argument("paths", nargs="+", metavar="PATH", help="a policy directory or file")
    test.add_argument("-v", "--verbose", action="store_true", help="also list the passing tests")
    test.add_argument(
        "--coverage",
        action="store_true",
        help="also list the rules and exceptions no inline test or fixture command exercises",
    )
    test.add_argument(
        "--fail-under",
        type=float,
        metavar="PERCENT",
        help="exit 1 when less than PERCENT of the rules, exceptions and "
        "effect rules are exercised (implies --coverage; without it, coverage never changes "
        "the exit status)",
    )
    test.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser(
        "path",
        help="print where the shipped default policy is installed",
        description="Print the directory of the default policy installed with this package "
        "(the daemon's policy when it is given no --policy-dir); copy it to start a layer.",
    )
    explain = sub.add_parser(
        "explain",
        help="show the command model, the rules that fire and the static verdict",
        usage="airlock policy explain [-h] [--policy DIR] [--json] [--effects FILE] "
        "[--cwd DIR] [--home DIR] [-- COMMAND...]",
        description="Parse COMMAND (its words joined by spaces into one bash command line) and "
        "show what the policy sees and decides, without running anything. With --effects, "
        "also judge the dry-run effects FILE describes with the policy's effect rules.",
    )
    explain.add_argument(
        "--policy",
        metavar="DIR",
        help="the policy directory (default: $AIRLOCK_POLICY_DIR, else the shipped default policy)",
    )
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.add_argument(
        "--effects",
        metavar="FILE",
        help="a YAML file describing a dry run's effects (files, programs, network, "
        "sensitive_reads: the format of an effect rule's inline test entry), judged with "
        "the effect rules",
    )
    explain.add_argument(
        "--cwd",
        metavar="DIR",
        help="the working directory the command runs in: its relative paths are matched as "
        "what they name from there, as the daemon does (default: the current directory)",
    )
    explain.add_argument(
        "--home",
        metavar="DIR",
        help="the home directory of the user the command runs as, what ~ and the paths below "
        "it are matched as (default: yours, from the password database)",
    )
    explain.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command's words"
    )
    explain.set_defaults(subparser=explain)
    diff = sub.add_parser(
        "diff",
        help="list every static verdict a policy change changes",
        description="Replay command lines through the policies OLD and NEW (each with its own "
        "command catalog) and list every line whose static verdict changes, with the rules "
        "that decided it on each side. The lines: every command of the fixture files under "
        "--corpus DIR (repeatable); the commands of the Validate and Execute events of each "
        "--audit-log FILE (repeatable; the daemon's STATE/audit.sqlite3, opened read-only: "
        f"the newest {MAX_AUDIT_EVENTS} such events over all the files); with neither, the "
        "fixture files under OLD and NEW and the inline tests of both policies' rules. Each "
        "distinct command is replayed once. Static verdicts only: the dry runs are not re-run "
        "(a line the dry run would decide shows as none).",
        epilog="Exit status: 0 no verdict changes, 1 changes, 2 a policy does not load, an "
        "audit log cannot be read, or a usage error.",
    )
    diff.add_argument("old", metavar="OLD", help="the policy before (directory or file)")
    diff.add_argument("new", metavar="NEW", help="the policy after (directory or file)")
    diff.add_argument(
        "--corpus", action="append", metavar="DIR", help="a directory or file of command lines"
    )
    diff.add_argument(
        "--audit-log",
        action="append",
        metavar="FILE",
        help="an Airlock audit log (STATE/audit.sqlite3) whose Validate and Execute commands "
        "are replayed (repeatable; read-only)",
    )
    diff.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _print_problems(
    problems: Sequence[PolicyProblem], kind: str, out: TextIO, *, sort: bool = True
) -> None:
    ordered = sorted(problems, key=lambda p: (p.file, p.line, p.column)) if sort else problems
    for p in ordered:
        where = f"{p.file}:{p.line}:{p.column}" if p.line else p.file
        hint = f" ({p.hint})" if p.hint else ""
        out.write(f"{where}: {kind}: {p.message}{hint}\n")


def _lint(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.paths)
    except PolicyError as e:
        _print_problems(e.problems, "error", sys.stdout)
        _print_problems(e.warnings, "warning", sys.stdout)
        n = len(e.problems)
        sys.stderr.write(f"{n} error{'s' if n != 1 else ''}, {len(e.warnings)} warning(s)\n")
        return EXIT_PROBLEMS
    _print_problems(bundle.warnings, "warning", sys.stdout)
    sys.stderr.write(
        f"ok: {len(bundle.files)} file(s), {_rule_count(bundle)}, "
        f"{len(bundle.warnings)} warning(s); version {bundle.version[:12]}\n"
    )
    return EXIT_OK


def _rule_count(bundle: PolicyBundle) -> str:
    n = len(bundle.rules) + len(bundle.effect_rules)
    effect = f" ({len(bundle.effect_rules)} effect)" if bundle.effect_rules else ""
    return f"{n} rule(s){effect}"


def _test(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.paths, run_tests=False)
    except PolicyError as e:
        _print_problems(e.problems, "error", sys.stdout)
        sys.stderr.write("the policy does not load; no tests were run\n")
        return EXIT_PROBLEMS
    results = run_inline_tests((*bundle.rules, *bundle.effect_rules), analyze=bundle.analyze)
    inline = sum(len(r.tests) for r in bundle.rules)
    inline += sum(len(r.tests) for r in bundle.effect_rules)
    problems: list[PolicyProblem] = []
    fixtures = 0
    for file in iter_fixture_files(args.paths):
        fixtures += 1
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(PolicyProblem(file, 0, 0, f"cannot read the fixture file: {e}"))
            continue
        cases, found = read_fixtures(file, text)
        problems.extend(found)
        results.extend(run_fixture(bundle, case) for case in cases)
    failed = [r for r in results if not r.ok]
    passed = len(results) - len(failed)
    status = EXIT_PROBLEMS if failed or problems else EXIT_OK
    covered = None
    if args.coverage or args.fail_under is not None:
        from airlock.cli import _policy_coverage as pc
        from airlock.cli._policy_diff import corpus_lines

        covered = pc.coverage(bundle, [line.command for line in corpus_lines(args.paths)])
        if args.fail_under is not None and covered.percent < args.fail_under:
            status = EXIT_PROBLEMS
    if args.json:
        doc: dict[str, Any] = {
            "passed": passed,
            "failed": len(failed),
            "inline": inline,
            "fixture_files": fixtures,
            "results": [
                {
                    "file": r.file,
                    "line": r.line,
                    "rule_id": r.rule_id,
                    "command": r.command,
                    "expect_fire": r.expect_fire,
                    "ok": r.ok,
                    "detail": r.detail,
                }
                for r in (results if args.verbose else failed)
            ],
            "errors": [{"file": p.file, "line": p.line, "message": p.message} for p in problems],
        }
        if covered is not None:
            doc["coverage"] = pc.json_doc(covered)
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return status
    for r in results if args.verbose else failed:
        sys.stdout.write(f"{r}\n")
    _print_problems(problems, "error", sys.stdout)
    sys.stdout.write(
        f"{passed} passed, {len(failed)} failed"
        + (f", {len(problems)} error(s)" if problems else "")
        + f" ({inline} inline, {len(results) - inline} from {fixtures} fixture file(s))\n"
    )
    if covered is not None:
        pc.write_text(sys.stdout, covered)
    return status


# --------------------------------------------------------------------------- explain


def _command_json(i: int, c: SimpleCommand) -> dict[str, Any]:
    return {
        "index": i,
        "argv0": c.argv0,
        "name": c.name,
        "args": list(c.args),
        "flags": list(c.flags),
        "positionals": list(c.positionals),
        "option_values": [{"flag": f, "value": v} for f, v in c.option_values],
        "redirects": [
            {"op": r.op, "fd": r.fd, "target": r.target, "dynamic": r.dynamic} for r in c.redirects
        ],
        "assignments": [{"name": n, "value": v} for n, v in c.assignments],
        "wrappers": list(c.wrappers),
        "text": c.text,
        "span": list(c.span),
        "depth": c.depth,
        "dynamic": c.dynamic,
        "dynamic_args": c.dynamic_args,
        "background": c.background,
        "pipeline": c.pipeline,
        "pipeline_position": c.pipeline_position,
        "classification": {
            "action": c.classification.action.name,
            "risk": c.classification.risk.name,
            "scope": c.classification.scope.name,
        },
    }


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "rule_id": f.rule_id,
        "verdict": f.verdict.name,
        "severity": f.severity.name,
        "message": f.message,
        "source": f.source.name,
        "subcommand": f.subcommand,
        "span": list(f.span),
    }


def _explain_json(
    command: str,
    policy: Path,
    bundle: PolicyBundle,
    analysis: Analysis,
    hits: Sequence[RuleHit],
    verdict: StaticVerdict,
) -> dict[str, Any]:
    cls = analysis.classification
    return {
        "command": command,
        "policy": {"directory": str(policy), "version": bundle.version, "rules": len(bundle.rules)},
        "analysis": {
            "commands": [_command_json(i, c) for i, c in enumerate(analysis.commands)],
            "pipelines": [list(p) for p in analysis.pipelines],
            "findings": [_finding_json(f) for f in analysis.findings],
            "classification": {
                "action": cls.action.name,
                "risk": cls.risk.name,
                "scope": cls.scope.name,
            },
            "read_only": analysis.read_only,
            "normalized": analysis.normalized,
        },
        "rules": [
            {
                "rule_id": h.rule_id,
                "decision": h.decision.name,
                "command": h.command,
                "fired": h.fired,
                "reasons": list(h.reasons),
                "excepted_by": h.excepted_by,
            }
            for h in hits
        ],
        "verdict": verdict.verdict.name if verdict.verdict is not None else None,
        "allowed_read_only": verdict.allowed_read_only,
        "findings": [_finding_json(f) for f in verdict.findings],
    }


def _words(values: Sequence[str]) -> str:
    return " ".join(repr(v) for v in values) if values else "-"


def _explain_text(
    command: str,
    policy: Path,
    bundle: PolicyBundle,
    analysis: Analysis,
    hits: Sequence[RuleHit],
    verdict: StaticVerdict,
) -> str:
    lines = [f"command: {command!r}"]
    lines.append(f"policy: {policy} ({len(bundle.rules)} rules, version {bundle.version[:12]})")
    cls = analysis.classification
    lines.append(
        f"line: {len(analysis.commands)} command(s); read_only={analysis.read_only}; "
        f"action={cls.action.name} risk={cls.risk.name} scope={cls.scope.name}"
    )
    if analysis.normalized:
        lines.append("normalized:")
        lines.extend(f"  {n}" for n in analysis.normalized.split("\n"))
    lines.append("commands:")
    if not analysis.commands:
        lines.append("  (none)")
    for i, c in enumerate(analysis.commands):
        c_cls = c.classification
        lines.append(f"  [{i}] {c.text!r}  span {c.span[0]}..{c.span[1]}  depth {c.depth}")
        lines.append(f"      argv0: {c.argv0!r}  name: {c.name!r}")
        lines.append(f"      flags: {_words(c.flags)}")
        lines.append(f"      positionals: {_words(c.positionals)}")
        if c.option_values:
            shown = " ".join(f"{f} {v!r}" for f, v in c.option_values)
            lines.append(f"      option values: {shown}")
        if c.redirects:
            redirects = " ".join(
                repr(f"{r.fd if r.fd is not None else ''}{r.op}{r.target}") for r in c.redirects
            )
            lines.append(f"      redirects: {redirects}")
        if c.assignments:
            lines.append(f"      assignments: {_words([f'{n}={v}' for n, v in c.assignments])}")
        if c.wrappers:
            lines.append(f"      wrappers: {_words(c.wrappers)}")
        marks = [
            name
            for name, on in (
                ("dynamic", c.dynamic),
                ("dynamic_args", c.dynamic_args),
                ("background", c.background),
            )
            if on
        ]
        if c.pipeline >= 0:
            marks.append(f"pipeline {c.pipeline} position {c.pipeline_position}")
        if marks:
            lines.append(f"      {', '.join(marks)}")
        lines.append(
            f"      classification: action={c_cls.action.name} risk={c_cls.risk.name} "
            f"scope={c_cls.scope.name}"
        )
    lines.append("parser findings:")
    if not analysis.findings:
        lines.append("  (none)")
    for f in analysis.findings:
        lines.append(f"  {f.verdict.name} {f.rule_id} ({f.severity.name.lower()}): {f.message}")
    lines.append("rules whose match holds:")
    if not hits:
        lines.append("  (none)")
    for h in hits:
        where = "line" if h.command < 0 else f"[{h.command}]"
        status = f"excepted ({h.excepted_by})" if h.excepted_by else "fires"
        lines.append(f"  {where} {h.rule_id}: {h.decision.name}, {status}")
        lines.extend(f"      {r}" for r in h.reasons)
    shown = verdict.verdict.name if verdict.verdict is not None else "none (the dry run decides)"
    lines.append(f"static verdict: {shown}")
    if verdict.allowed_read_only:
        lines.append("  read-only and allowed: eligible for the read-only fast path")
    for f in verdict.findings:
        lines.append(
            f"  {f.verdict.name} {f.rule_id} ({f.severity.name.lower()}, {f.source.name.lower()})"
            f": {f.message} [{f.span[0]}..{f.span[1]}]"
        )
    return "\n".join(lines) + "\n"


def _effects_json(effects: Effects, findings: Sequence[Finding]) -> dict[str, Any]:
    verdict = max((f.verdict for f in findings), default=Verdict.ALLOW)
    return {
        "workspace": effects.workspace,
        "home": effects.home,
        "changes": [
            {"path": os.fsdecode(c.path), "kind": c.kind.name, "in_workspace": c.in_workspace}
            for c in effects.changes
        ],
        "processes": [[os.fsdecode(a) for a in p.argv] for p in effects.processes],
        "network": [
            {"protocol": a.protocol.name, "address": a.address, "port": a.port, "host": a.host}
            for a in effects.network
        ],
        "sensitive_reads": [os.fsdecode(r.path) for r in effects.sensitive_reads],
        "work_lost": [
            {"kind": w.kind.name.lower(), "path": os.fsdecode(w.path), "count": w.count}
            for w in effects.work_lost
        ],
        "findings": [_finding_json(f) for f in findings],
        "verdict": verdict.name,
    }


def _effects_text(path: str, effects: Effects, findings: Sequence[Finding]) -> str:
    lines = [f"effects: {path} (workspace {effects.workspace}, home {effects.home})"]
    for c in effects.changes:
        where = "workspace" if c.in_workspace else "outside the workspace"
        lines.append(f"  change: {os.fsdecode(c.path)} {c.kind.name.lower()} ({where})")
    for p in effects.processes:
        lines.append(f"  process: {_words([os.fsdecode(a) for a in p.argv])}")
    for a in effects.network:
        lines.append(f"  network: {a.protocol.name.lower()} {a.host} {a.address}:{a.port}")
    for r in effects.sensitive_reads:
        lines.append(f"  sensitive read: {os.fsdecode(r.path)}")
    for w in effects.work_lost:
        what = os.fsdecode(w.path) if w.path else f"{w.count}"
        lines.append(f"  work lost: {w.kind.name.lower()} {what}")
    lines.append("effect rules that fire:")
    if not findings:
        lines.append("  (none)")
    for f in findings:
        lines.append(f"  {f.verdict.name} {f.rule_id} ({f.severity.name.lower()}): {f.message}")
    verdict = max((f.verdict for f in findings), default=Verdict.ALLOW)
    lines.append(f"effect verdict: {verdict.name}")
    return "\n".join(lines) + "\n"


def _egress_mode(policy: EgressPolicy) -> dict[str, Any]:
    def entry(r: EgressRule) -> dict[str, Any]:
        ports = [f"{lo}-{hi}" if lo != hi else lo for lo, hi in r.ports]
        return {"grant": r.label, "hosts": list(r.hosts), "ports": ports, "cidrs": list(r.cidrs)}

    return {"allow": [entry(r) for r in policy.allow], "deny": [entry(r) for r in policy.deny]}


def _egress_json(bundle: PolicyBundle) -> dict[str, Any]:
    return {
        "dry_run": _egress_mode(bundle.egress_dry_run),
        "execute": _egress_mode(bundle.egress_execute),
        "presets": {name: description for name, description in bundle.egress_presets},
    }


def _egress_text(bundle: PolicyBundle) -> str:
    """The policy's egress: what a dry run (and Execute) may reach, one line per entry."""

    def where(r: EgressRule) -> str:
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in r.ports) or "any"
        names = " ".join([*r.hosts, *r.cidrs])
        return f"{names} port {ports}"

    lines = []
    for mode, policy in (("dry run", bundle.egress_dry_run), ("execute", bundle.egress_execute)):
        if not policy.allow and not policy.deny:
            lines.append(f"egress ({mode}): nothing granted")
            continue
        lines.append(f"egress ({mode}):")
        lines.extend(f"  allow {where(r)} ({r.label})" for r in policy.allow)
        lines.extend(f"  deny {where(r)} ({r.label})" for r in policy.deny)
    if bundle.egress_presets:
        names = ", ".join(name for name, _ in bundle.egress_presets)
        lines.append(f"egress presets defined (switched on with egress.MODE.presets): {names}")
    if bundle.writable_paths:
        lines.append(
            "writable in Execute besides cwd (dry run: scope granted): "
            + " ".join(bundle.writable_paths)
        )
    else:
        lines.append("writable in Execute besides cwd: nothing granted")
    if bundle.writable_presets:
        names = ", ".join(name for name, _ in bundle.writable_presets)
        lines.append(f"writable presets defined (writable_paths.presets): {names}")
    return "\n".join(lines) + "\n"


def _explain_context(args: argparse.Namespace) -> PathContext:
    """Where the explained command runs: ``--cwd`` (default: here) and ``--home`` (default:
    the caller's, as the daemon finds it), both made absolute; as the daemon judges it."""
    cwd = os.path.realpath(args.cwd) if args.cwd else os.getcwd()
    if args.home is not None:
        home = os.path.abspath(args.home) if args.home else ""
    else:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = os.environ.get("HOME", "")
    return PathContext.of(cwd, home)


def _explain(args: argparse.Namespace) -> int:
    words: list[str] = args.command
    if words[:1] == ["--"]:
        words = words[1:]
    if not words and not args.effects:
        args.subparser.error("a COMMAND is required, after -- (or --effects FILE)")
    command = " ".join(words)
    policy = Path(args.policy) if args.policy else default_policy_dir()
    if policy is None:
        sys.stderr.write(
            "airlock policy: error: no policy directory: pass --policy DIR or set "
            "AIRLOCK_POLICY_DIR\n"
        )
        return EXIT_PROBLEMS
    try:
        bundle = load_bundle(policy)
    except PolicyError as e:
        _print_problems(e.problems, "error", sys.stderr)
        sys.stderr.write(f"airlock policy: error: the policy in {policy} does not load\n")
        return EXIT_PROBLEMS
    effects: Effects | None = None
    if args.effects:
        try:
            effects = read_effects_file(args.effects)
        except PolicyError as e:
            _print_problems(e.problems, "error", sys.stderr)
            sys.stderr.write(f"airlock policy: error: cannot read the effects in {args.effects}\n")
            return EXIT_PROBLEMS
    doc: dict[str, Any] = {}
    text = ""
    if words:
        context = _explain_context(args)
        analysis = bundle.analyze(command)  # with the bundle's command catalog
        hits = bundle.explain(analysis, context=context)
        verdict = bundle.evaluate(analysis, context=context)
        doc = _explain_json(command, policy, bundle, analysis, hits, verdict)
        doc["context"] = {"cwd": context.cwd, "home": context.home}
        text = _explain_text(command, policy, bundle, analysis, hits, verdict)
        text = text.replace(
            "\n",
            f"\ncwd: {context.cwd}  home: {context.home or '(none)'} (relative paths are "
            "matched from the cwd, paths below the home as ~/...)\n",
            1,
        )
    else:
        doc["policy"] = {"directory": str(policy), "version": bundle.version}
        doc["policy"]["rules"] = len(bundle.rules)
        text = f"policy: {policy} ({_rule_count(bundle)}, version {bundle.version[:12]})\n"
    doc["policy"]["effect_rules"] = len(bundle.effect_rules)
    doc["policy"]["egress"] = _egress_json(bundle)
    doc["policy"]["writable_paths"] = {
        "paths": list(bundle.writable_paths),
        "presets": dict(bundle.writable_presets),
    }
    text += _egress_text(bundle)
    if effects is not None:
        findings = bundle.judge_effects(effects)
        doc["effects"] = _effects_json(effects, findings)
        text += _effects_text(args.effects, effects, findings)
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from airlock.cli import _policy_diff as pd

    bundles: list[PolicyBundle] = []
    for path in (args.old, args.new):
        try:
            bundles.append(load_bundle(path, run_tests=False))
        except PolicyError as e:
            _print_problems(e.problems, "error", sys.stderr)
            sys.stderr.write(f"airlock policy: error: the policy in {path} does not load\n")
            return EXIT_USAGE
    old, new = bundles
    audit = None
    if args.audit_log:
        try:
            audit = pd.audit_lines(args.audit_log)
        except AirlockError as e:
            sys.stderr.write(f"airlock policy: error: {' '.join(str(e).split())}\n")
            return EXIT_USAGE
    if args.corpus:
        lines = pd.corpus_lines(args.corpus)
    elif audit is None:
        lines = [*pd.corpus_lines([args.old, args.new]), *pd.inline_lines(old, new)]
    else:
        lines = []
    if audit is not None:
        lines = [*lines, *audit.lines]
    changes = pd.diff(old, new, lines)
    replayed = len({line.command for line in lines})
    (pd.write_json if args.json else pd.write_text)(sys.stdout, replayed, changes, audit)
    return EXIT_PROBLEMS if changes else EXIT_OK


def _analyzer() -> Callable[[str], Analysis]:
    from airlock.policy.shell import analyze  # the real parser, imported late (tree-sitter)

    return analyze


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``airlock policy`` with ``argv`` (the words after ``policy``); return the status."""
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
        if args.action == "path":
            sys.stdout.write(f"{store.default_policy_dir()}\n")
            return EXIT_OK
        if args.action == "explain":
            return _explain(args)
        if args.action == "lint":
            return _lint(args)
        if args.action == "diff":
            return _diff(args)
        return _test(args)
    except SystemExit as e:  # --help or a usage error
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except (AirlockError, OSError) as e:
        sys.stderr.write(f"airlock policy: error: {' '.join(str(e).split())}\n")
        return EXIT_PROBLEMS
