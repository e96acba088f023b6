"""Loading a policy directory into an immutable :class:`PolicyBundle`.

Every ``*.yaml``/``*.yml`` file under the directory (recursively, sorted by path;
names starting with ``.`` are skipped) is one policy file. Loading is all or
nothing: the files are parsed with their line/column marks, validated against
``data/policy.schema.json``, checked for meaning (unknown lists and macros,
duplicate ids, invalid regexes and dates, ...), compiled, and finally every
rule's inline ``tests`` are run (static rules with the real parser, effect rules
on the synthetic effects their tests describe). Any problem rejects the bundle
with a :class:`PolicyError` that lists every problem as
``file:line:column: message (hint)``.

A rule is either *static* (``match:``, judged on the command line: :mod:`rules`)
or an *effect rule* (``effect:``, judged on what the dry run did: :mod:`effects`).
The bundle keeps them apart: :attr:`PolicyBundle.rules` are the static rules,
:attr:`PolicyBundle.effect_rules` the others.

Also here: :func:`read_effects_file`, the effects a YAML file describes (for ``airlock
policy explain --effects``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from datetime import date
from typing import TYPE_CHECKING

from airlock.policy._schema import (
    SchemaCheck,
    _effects_validator,
    _kind,
    _schema_problems,
    check_in_process,
)
from airlock.policy.effects import EffectCompiler, EffectRule, synthetic_effects
from airlock.policy.loader._commands import compile_commands
from airlock.policy.loader._compile import (
    PolicyBundle,
    _collect_definitions,
    _compile_effect_rule,
    _compile_rule,
    _Context,
    _sensitive_globs,
    _unused,
)
from airlock.policy.loader._egress import compile_egress
from airlock.policy.loader._files import StrPath, _decode, _parse, _paths, _read, collect_files
from airlock.policy.loader._problems import PolicyError, PolicyProblem, _order, _Problems
from airlock.policy.loader._tests import Analyzer, _inline_test_problems
from airlock.policy.loader._writable import compile_writable
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import Compiler, Layer, Rule
from airlock.types import Effects

if TYPE_CHECKING:
    from airlock.policy.shell import Catalog


def _version(files: Sequence[tuple[str, str, bytes]]) -> str:
    h = hashlib.sha256()
    for _path, rel, data in sorted(files, key=lambda f: (f[1], f[0])):
        name = rel.encode("utf-8", "surrogateescape")
        h.update(len(name).to_bytes(8, "big") + name)
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def snapshot(path: StrPath | Iterable[StrPath]) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """The policy files under ``path`` as :func:`load_bundle` would read them right now:
    (the version a bundle of exactly these bytes gets, each file's (relative path, size,
    mtime in ns)). A file that cannot be read counts with size -1. For the policy store's
    reloads: two equal snapshots a moment apart say the files are at rest, and a loaded
    bundle whose version equals a snapshot's was compiled from exactly those bytes."""
    found, _missing = collect_files(_paths(path))
    read: list[tuple[str, str, bytes]] = []
    stats: list[tuple[str, int, int]] = []
    for file, rel in found:
        try:
            st = os.stat(file)
        except OSError:
            stats.append((rel, -1, 0))
            continue
        data = _read(file, _Problems())
        if data is None:
            stats.append((rel, -1, st.st_mtime_ns))
            continue
        read.append((file, rel, data))
        stats.append((rel, st.st_size, st.st_mtime_ns))
    return _version(read), tuple(stats)


def load_bundle(
    path: StrPath | Iterable[StrPath],
    *,
    run_tests: bool = True,
    analyze: Analyzer | None = None,
    today: date | None = None,
    schema: SchemaCheck = check_in_process,
) -> PolicyBundle:
    """Load every policy file under ``path`` (a directory, a file, or several of them).

    Raises :class:`PolicyError` listing every problem. ``run_tests=False`` skips the
    inline tests (for ``airlock policy test``, which reports them one by one);
    ``analyze`` replaces the real parser (default: :func:`airlock.policy.shell.analyze`);
    ``today`` is the date expired exceptions are warned about (default: UTC today);
    ``schema`` checks the parsed files against the schema (default: in this process; the
    daemon's :func:`~airlock.policy._schema.check_in_child` keeps ``jsonschema`` out).
    """
    from airlock.policy.rules import today_utc

    day = today or today_utc()
    problems = _Problems()
    found, missing = collect_files(_paths(path))
    problems.errors.extend(missing)
    if not found and not missing:
        where = ", ".join(os.fspath(p) for p in _paths(path))
        problems.errors.append(
            PolicyProblem(
                where, 0, 0, "no policy files (*.yaml, *.yml) found", "point at a policy directory"
            )
        )
    read: list[tuple[str, str, bytes]] = []
    parsed: list[_Doc] = []
    for file, rel in found:
        data = _read(file, problems)
        if data is None:
            continue
        read.append((file, rel, data))
        text = _decode(file, data, problems)
        if text is None:
            continue
        try:
            doc = _parse(file, text, problems)
        except RecursionError:
            problems.errors.append(PolicyProblem(file, 0, 0, "the YAML is nested too deeply"))
            continue
        if doc is None:
            continue
        problems.docs[file] = doc
        parsed.append(doc)
    docs = _schema_checked(parsed, problems, schema)

    ctx = _Context()
    for doc in docs:
        _collect_definitions(doc, ctx, problems)
    compiler = Compiler(ctx.lists, ctx.macros, problems.report)
    effects = EffectCompiler(compiler, problems.report)
    for name, (mpath, _raw) in ctx.macros.items():
        compiler.macro(name, mpath)
    for doc in docs:  # before the effect rules, whose network conditions use them
        effects.bind(
            doc.value.get("credential_destinations", ()), (doc.file, "credential_destinations")
        )
    rules: list[Rule] = []
    effect_rules: list[EffectRule] = []
    for doc in docs:
        layer = Layer(doc.value.get("layer", "project"))
        for i, raw in enumerate(doc.value.get("rules", ())):
            if "effect" in raw:
                effect_rule = _compile_effect_rule(doc, i, raw, layer, effects, ctx, problems)
                if effect_rule is not None:
                    effect_rules.append(effect_rule)
                continue
            rule = _compile_rule(doc, i, raw, layer, compiler, ctx, problems, day)
            if rule is not None:
                rules.append(rule)
    sensitive = _sensitive_globs(docs, effects, problems)
    egress_dry_run, egress_execute, presets = compile_egress(docs, problems)
    writable, writable_presets = compile_writable(docs, problems)
    catalog = compile_commands(docs, problems)
    _unused(ctx, compiler, problems)
    if analyze is None and catalog is not None:  # inline tests read the bundle's catalog
        analyze = _analyzer_with(catalog)

    if run_tests and not problems.errors:
        problems.errors.extend(_inline_test_problems(rules, analyze))
        problems.errors.extend(_inline_test_problems(effect_rules, analyze))
    if problems.errors:
        raise PolicyError(sorted(problems.errors, key=_order), problems.warnings)
    return PolicyBundle(
        version=_version(read),
        files=tuple(f for f, _rel in found),
        rules=tuple(rules),
        warnings=tuple(sorted(problems.warnings, key=_order)),
        effect_rules=tuple(effect_rules),
        sensitive_globs=sensitive,
        egress_dry_run=egress_dry_run,
        egress_execute=egress_execute,
        egress_presets=tuple((p.name, p.description) for p in presets.values()),
        writable_paths=writable,
        writable_presets=writable_presets,
        catalog=catalog,
    )


def _schema_checked(parsed: list[_Doc], problems: _Problems, schema: SchemaCheck) -> list[_Doc]:
    """The documents the schema takes; the problems of the others added to ``problems``. A
    check that could not be made is a problem of every file (the policy is not loaded)."""
    if not parsed:
        return []
    try:
        found = schema([("policy", doc.file, doc.value) for doc in parsed])
    except OSError as exc:
        for doc in parsed:
            problems.errors.append(
                PolicyProblem(doc.file, 0, 0, f"could not check the file against the schema: {exc}")
            )
        return []
    valid = []
    for doc, (ok, added) in zip(parsed, found, strict=True):
        for path, message, hint, key in added:
            problems.add(path, message, hint, key=key)
        if ok:
            valid.append(doc)
    return valid


def _analyzer_with(catalog: Catalog) -> Analyzer:
    from airlock.policy.shell import analyze  # the real parser, imported late (tree-sitter)

    return lambda command: analyze(command, catalog=catalog)


def read_effects_file(path: StrPath) -> Effects:
    """The effects a YAML file describes, in the format of an effect rule's inline test
    entry (``files``, ``programs``, ``network``, ``sensitive_reads``; ``~`` is
    /home/user, relative paths are in /workspace), for ``airlock policy explain
    --effects``. Raises :class:`PolicyError` with file:line:column problems."""
    file = os.fspath(path)
    problems = _Problems()
    effects: Effects | None = None
    data = _read(file, problems)
    text = _decode(file, data, problems) if data is not None else None
    if text is not None:
        doc = _parse(file, text, problems) if text.strip() else _Doc(file, {})
        if doc is not None:
            problems.docs[file] = doc
            if not isinstance(doc.value, dict):
                problems.add(
                    (file,),
                    f"an effects file is a mapping, found {_kind(doc.value)}",
                    "give any of: files, programs, network, sensitive_reads",
                )
            elif _schema_problems(doc.file, doc.value, problems, _effects_validator()):
                effects = synthetic_effects(doc.value, (file,), problems.report)
    if problems.errors or effects is None:
        raise PolicyError(sorted(problems.errors, key=_order))
    return effects
