"""Compilation: the checked documents of a bundle become its rules, and the bundle itself.

Lists and macros are shared by every file; rule ids are unique across the bundle. Static
rules (``match:``) compile to :mod:`airlock.policy.rules`, effect rules (``effect:``) to
:mod:`airlock.policy.effects`. :class:`PolicyBundle` is what loading returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from airlock.egress import EgressPolicy
from airlock.policy.effects import (
    EffectCompiler,
    EffectRule,
    EffectTest,
    judge_effects,
    synthetic_effects,
)
from airlock.policy.loader._problems import PolicyProblem, _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.model import Analysis
from airlock.policy.rules import (
    DECISIONS,
    SEVERITIES,
    Compiler,
    Globs,
    JsonPath,
    Layer,
    PathContext,
    Rule,
    RuleException,
    RuleHit,
    RuleSet,
    RuleTest,
    StaticVerdict,
)
from airlock.types import Effects, Finding

if TYPE_CHECKING:
    from airlock.policy.shell import Catalog

_T = TypeVar("_T")


@dataclass(frozen=True)
class PolicyBundle:
    """A loaded, compiled, immutable policy; safe to share between threads."""

    version: str  # sha256 hex of the sorted (path, bytes) of all files
    files: tuple[str, ...]
    rules: tuple[Rule, ...]  # the static rules (``match:``)
    warnings: tuple[PolicyProblem, ...] = ()
    effect_rules: tuple[EffectRule, ...] = ()  # the rules judged on a dry run (``effect:``)
    # The union of every file's ``sensitive_paths`` (sorted, deduplicated, lists resolved):
    # what the dry run's file-open recorder watches. Empty when no file sets it.
    sensitive_globs: tuple[str, ...] = ()
    # What a dry run and Execute may reach for real (``egress:``, presets expanded); empty
    # policies grant nothing. The presets the bundle defines: name -> description.
    egress_dry_run: EgressPolicy = field(default_factory=EgressPolicy)
    egress_execute: EgressPolicy = field(default_factory=EgressPolicy)
    egress_presets: tuple[tuple[str, str], ...] = ()
    # Filesystem grants (``writable_paths:``, presets expanded): ``~/DIR`` each, sorted;
    # Execute binds them read-write, effect rules put a dry run's changes there in the
    # ``granted`` scope. The presets the bundle defines: name -> description.
    writable_paths: tuple[str, ...] = ()
    writable_presets: tuple[tuple[str, str], ...] = ()
    # The command catalog its lines are analysed with: the built-in one with the bundle's
    # ``commands:`` merged over it; None when the bundle declares none (the built-in one).
    catalog: Catalog | None = field(default=None, repr=False, compare=False)
    _ruleset: RuleSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ruleset", RuleSet(self.rules))

    def analyze(self, command: str) -> Analysis:
        """The static analysis of ``command`` with this bundle's command catalog."""
        from airlock.policy.shell import analyze  # the parser, imported late (tree-sitter)

        return analyze(command, catalog=self.catalog)

    def evaluate(
        self, analysis: Analysis, *, today: date | None = None, context: PathContext | None = None
    ) -> StaticVerdict:
        """The static verdict of ``analysis`` (``today``: for exception expiry; default UTC;
        ``context``: the cwd and home its relative paths resolve against, see
        :class:`~airlock.policy.rules.PathContext`; None: paths only as written)."""
        return self._ruleset.evaluate(analysis, today=today, context=context)

    def explain(
        self, analysis: Analysis, *, today: date | None = None, context: PathContext | None = None
    ) -> tuple[RuleHit, ...]:
        """Every rule whose match holds on ``analysis``, with the reasons."""
        return self._ruleset.explain(analysis, today=today, context=context)

    def judge_effects(self, effects: Effects, *, today: date | None = None) -> tuple[Finding, ...]:
        """One DYNAMIC finding per effect rule that fires on ``effects``, strictest first.

        ``today`` is accepted for symmetry with :meth:`evaluate`; effect rules have no
        exceptions, so no date changes the result. Pure and thread-safe."""
        return judge_effects(self.effect_rules, effects)

    def rule(self, rule_id: str) -> Rule | None:
        """The static rule ``rule_id`` (None for an effect rule or an unknown id)."""
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None

    def effect_rule(self, rule_id: str) -> EffectRule | None:
        for r in self.effect_rules:
            if r.id == rule_id:
                return r
        return None


@dataclass
class _Context:
    """What the files define, for the semantic checks of the whole bundle."""

    lists: dict[str, tuple[JsonPath, list[str]]] = field(default_factory=dict)
    macros: dict[str, tuple[JsonPath, dict[str, Any]]] = field(default_factory=dict)
    rule_ids: dict[str, JsonPath] = field(default_factory=dict)


def _at(problems: _Problems, path: JsonPath, *, key: bool = True) -> str:
    file, line, column = problems.where(path, key=key)
    return f"{file}:{line}:{column}"


def _define(
    kind: str,
    table: dict[str, tuple[JsonPath, _T]],
    name: str,
    path: JsonPath,
    value: _T,
    problems: _Problems,
) -> None:
    if name in table:
        problems.add(
            path,
            f"{kind} {name!r} is already defined at {_at(problems, table[name][0])}",
            f"{kind} names are shared by every file of the bundle; define it once",
            key=True,
        )
        return
    table[name] = (path, value)


def _collect_definitions(doc: _Doc, ctx: _Context, problems: _Problems) -> None:
    value: dict[str, Any] = doc.value
    for name, items in value.get("lists", {}).items():
        path: JsonPath = (doc.file, "lists", name)
        for i, item in enumerate(items):
            if item.startswith("$"):
                problems.add(
                    (*path, i),
                    f"list item {item!r} looks like a list reference",
                    "a list cannot reference another list; write [$] for a literal $",
                )
        _define("list", ctx.lists, name, path, items, problems)
    for name, match in value.get("macros", {}).items():
        _define("macro", ctx.macros, name, (doc.file, "macros", name), match, problems)


def _parse_date(text: str, path: JsonPath, problems: _Problems) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        problems.add(path, f"invalid date {text!r}: {e}", "write a real date as YYYY-MM-DD")
        return None


def _check_id(rule_id: str, path: JsonPath, ctx: _Context, problems: _Problems) -> None:
    """Rule ids are unique across the bundle, static and effect rules alike."""
    if rule_id in ctx.rule_ids:
        problems.add(
            (*path, "id"),
            f"duplicate rule id {rule_id!r} (first defined at "
            f"{_at(problems, ctx.rule_ids[rule_id], key=False)})",
            "rule ids are unique across the bundle; rename one",
        )
    else:
        ctx.rule_ids[rule_id] = (*path, "id")


def _inline_tests(
    raw: dict[str, Any], path: JsonPath, problems: _Problems
) -> Iterator[tuple[Any, bool, JsonPath, int, int]]:
    """A rule's inline test entries, ``match`` then ``not_match``: (entry, whether the rule
    should fire, its path, line, column)."""
    for key, expect in (("match", True), ("not_match", False)):
        for j, entry in enumerate(raw.get("tests", {}).get(key, ())):
            tpath: JsonPath = (*path, "tests", key, j)
            _file, line, column = problems.where(tpath)
            yield entry, expect, tpath, line, column


def _effect_test_text(entry: Any) -> str:
    """An inline test entry as one line of YAML flow style, for reports."""
    text: str = yaml.safe_dump(
        entry, default_flow_style=True, sort_keys=False, width=1 << 30, allow_unicode=True
    )
    return text.strip().removesuffix("...").strip()


def _compile_effect_rule(
    doc: _Doc,
    index: int,
    raw: dict[str, Any],
    layer: Layer,
    effects: EffectCompiler,
    ctx: _Context,
    problems: _Problems,
) -> EffectRule | None:
    path: JsonPath = (doc.file, "rules", index)
    before = len(problems.errors)
    rule_id: str = raw["id"]
    _check_id(rule_id, path, ctx, problems)
    matcher = effects.effect(raw["effect"], (*path, "effect"))
    tests = [
        EffectTest(
            synthetic_effects(entry, tpath, problems.report),
            _effect_test_text(entry),
            expect,
            doc.file,
            line,
            column,
        )
        for entry, expect, tpath, line, column in _inline_tests(raw, path, problems)
    ]
    if len(problems.errors) > before:
        return None
    return EffectRule(
        id=rule_id,
        title=raw["title"],
        description=raw["description"],
        decision=DECISIONS[raw["decision"]],
        severity=SEVERITIES[raw["severity"]],
        matcher=matcher,
        layer=layer,
        file=doc.file,
        line=doc.values.get(path[1:], (0, 0))[0],
        references=tuple(raw.get("references", ())),
        tags=tuple(raw.get("tags", ())),
        tests=tuple(tests),
    )


def _sensitive_globs(
    docs: Sequence[_Doc], effects: EffectCompiler, problems: _Problems
) -> tuple[str, ...]:
    """The union of every file's ``sensitive_paths``, lists resolved, sorted."""
    found: set[str] = set()
    for doc in docs:
        patterns = doc.value.get("sensitive_paths")
        if patterns is None:
            continue
        for _label, pats in effects.path_patterns(patterns, (doc.file, "sensitive_paths")):
            found.update(pats)
    return tuple(sorted(found))


def _compile_rule(
    doc: _Doc,
    index: int,
    raw: dict[str, Any],
    layer: Layer,
    compiler: Compiler,
    ctx: _Context,
    problems: _Problems,
    today: date,
) -> Rule | None:
    path: JsonPath = (doc.file, "rules", index)
    before = len(problems.errors)
    rule_id: str = raw["id"]
    _check_id(rule_id, path, ctx, problems)
    matcher = compiler.match(raw["match"], (*path, "match"))
    decision = DECISIONS[raw["decision"]]
    if matcher.line_only and raw["decision"] == "allow":
        problems.add(
            (*path, "decision"),
            "an allow rule cannot be a line rule (its match has only regex keys)",
            "an allow must say which commands it covers: add argv0 (or another command key) "
            "to the match",
        )
    if matcher.names() == frozenset():
        problems.add(
            (*path, "match"),
            f"rule {rule_id!r} can never fire: its argv0 conditions exclude each other",
            "",
            warning=True,
        )
    exceptions: list[RuleException] = []
    for i, exc in enumerate(raw.get("exceptions", ())):
        epath: JsonPath = (*path, "exceptions", i)
        expires = None
        if "expires" in exc:
            expires = _parse_date(exc["expires"], (*epath, "expires"), problems)
            if expires is not None and expires < today:
                problems.add(
                    (*epath, "expires"),
                    f"exception of rule {rule_id!r} expired on {expires.isoformat()}; "
                    "it is ignored",
                    "renew it with a later `expires:` or remove it",
                    warning=True,
                )
        entries = compiler.entries(exc["values"], (*epath, "values"))
        exceptions.append(
            RuleException(
                values=tuple(exc["values"]),
                justification=exc["justification"],
                expires=expires,
                globs=Globs(entries, home=True),
            )
        )
    if len(problems.errors) > before:
        return None
    tests = [
        RuleTest(command, expect, doc.file, line, column)
        for command, expect, _tpath, line, column in _inline_tests(raw, path, problems)
    ]
    return Rule(
        id=rule_id,
        title=raw["title"],
        description=raw["description"],
        decision=decision,
        severity=SEVERITIES[raw["severity"]],
        matcher=matcher,
        layer=layer,
        file=doc.file,
        line=doc.values.get(path[1:], (0, 0))[0],
        exceptions=tuple(exceptions),
        references=tuple(raw.get("references", ())),
        tags=tuple(raw.get("tags", ())),
        tests=tuple(tests),
    )


def _unused(ctx: _Context, compiler: Compiler, problems: _Problems) -> None:
    used_lists = compiler.used_lists
    for name, (path, _items) in ctx.lists.items():
        if name not in used_lists:
            problems.add(path, f"list {name!r} is never used", "", key=True, warning=True)
    for name, (path, _raw) in ctx.macros.items():
        if name not in compiler.used_macros:
            problems.add(path, f"macro {name!r} is never used", "", key=True, warning=True)
