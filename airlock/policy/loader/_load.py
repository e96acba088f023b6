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

Also here, for ``airlock policy test``: :func:`run_inline_tests`,
:func:`read_fixtures` and :func:`run_fixture`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from typing import Any, TypeVar

import jsonschema
import yaml

from airlock._errors import InvalidRequest
from airlock.policy.effects import (
    EffectCompiler,
    EffectRule,
    EffectTest,
    check_effect_test,
    judge_effects,
    synthetic_effects,
)
from airlock.policy.model import Analysis
from airlock.policy.rules import (
    DECISIONS,
    SEVERITIES,
    Compiler,
    Globs,
    JsonPath,
    Layer,
    Rule,
    RuleException,
    RuleHit,
    RuleSet,
    RuleTest,
    StaticVerdict,
)
from airlock.types import Effects, Finding

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "FixtureCase",
    "PolicyBundle",
    "PolicyError",
    "PolicyProblem",
    "TestResult",
    "collect_files",
    "iter_fixture_files",
    "load_bundle",
    "read_effects_file",
    "read_fixtures",
    "run_fixture",
    "run_inline_tests",
]

MAX_FILE_BYTES = 1024 * 1024  # a policy file is small; this bounds parse time and memory
MAX_DEPTH = 64  # YAML nesting; the format needs about a dozen levels
POLICY_SUFFIXES = (".yaml", ".yml")
FIXTURE_SUFFIXES = (".sh", ".txt")

StrPath = str | os.PathLike[str]
_T = TypeVar("_T")
Analyzer = Callable[[str], Analysis]


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class PolicyProblem:
    """One problem of a policy bundle; ``line``/``column`` are 1-based (0: the whole file)."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.message}" + (f" ({self.hint})" if self.hint else "")


class PolicyError(InvalidRequest):
    """A policy bundle was rejected; ``problems`` says where and why, every one of them."""

    default_reason = "INVALID_POLICY"

    def __init__(
        self, problems: Sequence[PolicyProblem], warnings: Sequence[PolicyProblem] = ()
    ) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        n = len(self.problems)
        listed = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid policy: {n} problem{'s' if n != 1 else ''}:\n{listed}")


# --------------------------------------------------------------------------- the bundle


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
    _ruleset: RuleSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ruleset", RuleSet(self.rules))

    def evaluate(self, analysis: Analysis, *, today: date | None = None) -> StaticVerdict:
        """The static verdict of ``analysis`` (``today``: for exception expiry; default UTC)."""
        return self._ruleset.evaluate(analysis, today=today)

    def explain(self, analysis: Analysis, *, today: date | None = None) -> tuple[RuleHit, ...]:
        """Every rule whose match holds on ``analysis``, with the reasons."""
        return self._ruleset.explain(analysis, today=today)

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


# --------------------------------------------------------------------------- YAML with marks


class _YamlProblem(Exception):
    def __init__(self, line: int, column: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message
        self.hint = hint


@dataclass
class _Doc:
    """A parsed file: plain values plus where each value and mapping key starts."""

    file: str
    value: Any = None
    values: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)
    styles: dict[JsonPath, str | None] = field(default_factory=dict)


_RESOLVER: Any = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_STR = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "timestamp")
)
_SEQ_TAGS = frozenset({None, "!", "tag:yaml.org,2002:seq"})
_MAP_TAGS = frozenset({None, "!", "tag:yaml.org,2002:map"})
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _pos(mark: Any) -> tuple[int, int]:
    return (int(mark.line) + 1, int(mark.column) + 1)


def _scalar(event: yaml.ScalarEvent) -> Any:
    tag = event.tag
    if tag in (None, "!"):
        implicit = event.implicit
        tag = _STR if tag == "!" else _RESOLVER.resolve(yaml.ScalarNode, event.value, implicit)
    if tag not in _SCALAR_TAGS:
        raise _YamlProblem(
            *_pos(event.start_mark),
            f"unsupported YAML tag {tag!r}",
            "write plain strings, numbers and booleans",
        )
    if tag in (_STR, "tag:yaml.org,2002:timestamp"):
        return event.value  # dates stay text: the loader checks them itself
    marks: Any = (event.start_mark, event.end_mark)
    node = yaml.ScalarNode(tag, event.value, marks[0], marks[1], event.style)
    try:
        return _CONSTRUCTOR.construct_object(node)
    except (yaml.YAMLError, ValueError) as e:
        raise _YamlProblem(*_pos(event.start_mark), f"invalid value {event.value!r}: {e}") from e


def _check_flow_depth(text: str) -> None:
    """Refuse flow collections (``[ ]``, ``{ }``) nested deeper than MAX_DEPTH.

    This runs before any YAML parser sees the text: a parser scans a whole flow collection ahead
    of the events it yields, and libyaml has a nesting limit (and a message) of its own that
    changes between versions, so the composer's depth check alone cannot be the first to fire.
    Block nesting needs no such scan: its events arrive line by line and the composer bounds it.
    The scan knows just enough YAML to find where flow collections open: comments, quoted
    scalars, block scalars (``|``, ``>``) and plain scalars (``a[0]`` is text, not a sequence).
    """
    depth = 0
    node_start = True  # the next character may start a node
    block_indent = -1  # inside a block scalar: the indentation of the line that opened it
    line, line_start, i, n = 1, 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line, line_start, i = line + 1, i + 1, i + 1
            node_start = True
            if block_indent >= 0 and depth == 0:  # skip the block scalar's lines
                while i < n:
                    end = text.find("\n", i)
                    end = n if end < 0 else end
                    body = text[i:end]
                    if body.strip() and len(body) - len(body.lstrip(" ")) <= block_indent:
                        break
                    line, line_start, i = line + 1, end + 1, end + 1
                block_indent = -1
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#" and (i == line_start or text[i - 1] in " \t"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if node_start and c in "'\"":  # a quoted scalar, possibly over several lines
            j = i + 1
            while j < n:
                if text[j] == "\\" and c == '"':
                    j += 2
                    continue
                if text[j] == c:
                    if c == "'" and j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            line += text.count("\n", i, j)
            if "\n" in text[i:j]:
                line_start = text.rfind("\n", i, j) + 1
            i, node_start = j + 1, False
            continue
        if c in "[{" and (node_start or depth):
            depth += 1
            if depth > MAX_DEPTH:
                raise _YamlProblem(
                    line,
                    i - line_start + 1,
                    f"nesting too deep (more than {MAX_DEPTH} levels)",
                    "a policy file needs only a few levels",
                )
            i, node_start = i + 1, True
            continue
        if c in "]}" and depth:
            depth -= 1
            i, node_start = i + 1, False
            continue
        if c in ",?" and depth:
            i, node_start = i + 1, True
            continue
        if c in "|>" and node_start and not depth:
            indent = text[line_start:i]
            block_indent = len(indent) - len(indent.lstrip(" "))
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in ":-?" and (i + 1 >= n or text[i + 1] in " \t\r\n" or (depth and c == ":")):
            i, node_start = i + 1, True  # a key's value, or a sequence entry, starts next
            continue
        if c in "!&" and node_start:  # a tag or an anchor before the node
            while i < n and text[i] not in " \t\r\n":
                i += 1
            continue
        # Plain text: up to the next indicator that can end it.
        i, node_start = i + 1, False
        stops = ",[]{}" if depth else ""
        while i < n and text[i] not in "\n" + stops:
            if text[i] == ":" and (i + 1 >= n or text[i + 1] in " \t\r\n" or depth):
                break
            if text[i] == "#" and text[i - 1] in " \t":
                break
            i += 1


def _compose(text: str, file: str) -> _Doc:
    """Build plain values from the YAML event stream, iteratively (no recursion)."""
    _check_flow_depth(text)
    doc = _Doc(file)
    # Each frame: [container, path, pending key or None]
    stack: list[list[Any]] = []
    documents = 0
    have_root = False

    def place(event: Any) -> JsonPath | None:
        """The path of a new value, or None when the event is a mapping key."""
        if not stack:
            return ()
        container, path, key = stack[-1]
        if isinstance(container, list):
            return (*path, len(container))
        if key is None:
            return None
        return (*path, key)

    def attach(value: Any) -> None:
        nonlocal have_root
        if not stack:
            doc.value, have_root = value, True
            return
        frame = stack[-1]
        if isinstance(frame[0], list):
            frame[0].append(value)
        else:
            frame[0][frame[2]] = value
            frame[2] = None

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    "more than one YAML document in the file",
                    "a policy file is one mapping; remove the `---` separator or split the file",
                )
            continue
        if isinstance(event, yaml.AliasEvent):
            raise _YamlProblem(
                *_pos(event.start_mark),
                f"YAML aliases (*{event.anchor}) are not supported",
                "use `lists:` or `macros:` to share values",
            )
        if not isinstance(event, yaml.NodeEvent | yaml.CollectionEndEvent):
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            container, _path, _key = stack.pop()
            attach(container)
            continue
        path = place(event)
        if path is None:  # a mapping key
            if not isinstance(event, yaml.ScalarEvent):
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    "a mapping key must be a plain string",
                    "write `key: value`",
                )
            key = event.value
            frame = stack[-1]
            key_path = (*frame[1], key)
            if key in frame[0]:
                first = doc.keys[key_path]
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    f"duplicate key {key!r} (first at line {first[0]}, column {first[1]})",
                    "each key may appear once in a mapping",
                )
            doc.keys[key_path] = _pos(event.start_mark)
            frame[2] = key
            frame[0][key] = None  # reserve, for the duplicate check
            continue
        doc.values[path] = _pos(event.start_mark)
        if isinstance(event, yaml.ScalarEvent):
            doc.styles[path] = event.style
            attach(_scalar(event))
            continue
        if len(stack) >= MAX_DEPTH:
            raise _YamlProblem(
                *_pos(event.start_mark),
                f"nesting too deep (more than {MAX_DEPTH} levels)",
                "a policy file needs only a few levels",
            )
        if isinstance(event, yaml.SequenceStartEvent):
            if event.tag not in _SEQ_TAGS:
                raise _YamlProblem(*_pos(event.start_mark), f"unsupported YAML tag {event.tag!r}")
            stack.append([[], path, None])
        else:
            assert isinstance(event, yaml.MappingStartEvent)
            if event.tag not in _MAP_TAGS:
                raise _YamlProblem(*_pos(event.start_mark), f"unsupported YAML tag {event.tag!r}")
            stack.append([{}, path, None])
    if not have_root or doc.value is None:
        raise _YamlProblem(
            1, 1, "the file is empty", "a policy file is a mapping: `version: 1` and `rules: [...]`"
        )
    return doc


def _yaml_error(e: yaml.YAMLError, text: str) -> _YamlProblem:
    if isinstance(e, yaml.reader.ReaderError):
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        before = text[: e.position]
        line = before.count("\n") + 1
        column = e.position - (before.rfind("\n") + 1) + 1
        return _YamlProblem(
            line,
            column,
            f"invalid character {char!r} in YAML: {e.reason}",
            "a policy file is UTF-8 text without control characters",
        )
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        line, column = _pos(e.problem_mark)
        hint = ""
        lines = text.split("\n")
        if line <= len(lines) and "\t" in lines[line - 1][: column + 1]:
            hint = "indent with spaces: YAML does not allow tabs for indentation"
        elif e.context:
            hint = e.context
        return _YamlProblem(line, column, f"invalid YAML: {e.problem}", hint)
    return _YamlProblem(1, 1, f"invalid YAML: {e}")


# --------------------------------------------------------------------------- schema


@functools.cache
def _schema() -> dict[str, Any]:
    text = resources.files("airlock.policy").joinpath("data/policy.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def _describe(path: JsonPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "the file"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
}


_NOT_ALLOWED = {
    "match": (
        "a rule has either `match:` (a static rule) or `effect:` (an effect rule), not both",
        "split it into two rules with their own ids",
    ),
    "exceptions": (
        "an effect rule has no `exceptions:`",
        "narrow the effect instead: files.not_paths, sensitive_reads.not_paths or "
        "network.not_hosts",
    ),
}


def _literal(value: Any) -> str:
    """A YAML scalar as a policy author would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class _Problems:
    """Collects problems, locating JSON paths in the parsed documents."""

    def __init__(self) -> None:
        self.errors: list[PolicyProblem] = []
        self.warnings: list[PolicyProblem] = []
        self.docs: dict[str, _Doc] = {}

    def where(self, path: JsonPath, *, key: bool = False) -> tuple[str, int, int]:
        file = str(path[0])
        doc = self.docs.get(file)
        if doc is None:
            return file, 0, 0
        rest = path[1:]
        while True:
            loc = (doc.keys if key else doc.values).get(rest) or doc.values.get(rest)
            if loc is not None or not rest:
                break
            rest = rest[:-1]
        return (file, *(loc or (1, 1)))

    def add(
        self,
        path: JsonPath,
        message: str,
        hint: str = "",
        *,
        key: bool = False,
        offset: int | None = None,
        warning: bool = False,
    ) -> None:
        file, line, column = self.where(path, key=key)
        if offset is not None and line:
            doc = self.docs[file]
            style = doc.styles.get(path[1:], "")
            if style in (None, "'"):  # exact only without escapes; else: the string's start
                column += offset + (1 if style else 0)
        problem = PolicyProblem(file, line, column, message, hint)
        (self.warnings if warning else self.errors).append(problem)

    def report(self, path: JsonPath, message: str, hint: str, offset: int | None) -> None:
        self.add(path, message, hint, offset=offset)


def _schema_problems(
    doc: _Doc, problems: _Problems, validator: jsonschema.protocols.Validator | None = None
) -> bool:
    """Validate one document against the schema (default: a policy file); True when valid."""
    validator = validator or _validator()
    errors = sorted(validator.iter_errors(doc.value), key=lambda e: list(map(str, e.path)))
    for e in errors:
        path: JsonPath = (doc.file, *e.absolute_path)
        where = _describe(tuple(e.absolute_path))
        v = e.validator
        schema: Any = e.schema
        instance: Any = e.instance
        expected: Any = e.validator_value
        if v == "additionalProperties":
            allowed = sorted(schema.get("properties", {}))
            for k in instance:
                if k not in allowed:
                    problems.add(
                        (*path, k),
                        f"unknown key {k!r} in {where}",
                        f"{_did_you_mean(k, allowed)}allowed keys: {', '.join(allowed)}",
                        key=True,
                    )
        elif v == "required":
            for k in expected:
                if k not in instance:
                    hint = (
                        "a rule has `match:` (a static rule, judged on the command line) or "
                        "`effect:` (an effect rule, judged on what the dry run did)"
                        if k == "match"
                        else ""
                    )
                    problems.add(path, f"missing required key {k!r} in {where}", hint)
        elif v == "type":
            if isinstance(expected, list):
                wanted = " or ".join(_TYPE_NAMES.get(str(x), str(x)) for x in expected)
            else:
                wanted = _TYPE_NAMES.get(str(expected), str(expected))
            hint = ""
            in_tests = "tests" in e.absolute_path
            if expected == "string" and isinstance(instance, dict):
                hint = "quote it: in a plain YAML string, ': ' starts a mapping" + (
                    " (a static rule's tests are command lines; effects are for effect rules)"
                    if in_tests
                    else ""
                )
            elif expected == "object" and in_tests and isinstance(instance, str):
                hint = (
                    "an effect rule's tests are effects (files, programs, network, "
                    "sensitive_reads), not command lines"
                )
            elif expected == "string" and not isinstance(instance, list):
                hint = (
                    "quote it: YAML reads unquoted yes/no/on/off/true/false as booleans, "
                    "digits as numbers and an empty value as null"
                )
            if not e.absolute_path:
                problems.add(
                    path,
                    f"a policy file must be a mapping, found {_kind(instance)}",
                    "start with `version: 1`",
                )
            else:
                problems.add(path, f"{where}: expected {wanted}, found {_kind(instance)}", hint)
        elif v == "enum":
            choices = [str(c) for c in expected]
            if isinstance(instance, str):
                hint = _did_you_mean(instance, choices).strip()
                if instance == "allow" and e.absolute_path[-1] == "decision":
                    hint = (
                        "an effect rule asks or denies: a dry run that no rule objects to is "
                        "ALLOW already, and an allow could not cancel another rule's ask"
                    )
                problems.add(
                    path, f"{where}: {instance!r} is not one of {', '.join(choices)}", hint
                )
            else:
                problems.add(
                    path,
                    f"{where}: expected one of {', '.join(choices)}, found {_kind(instance)}",
                    "quote it: YAML reads unquoted yes/no/on/off/true/false as booleans",
                )
        elif v == "const":
            hint = "this engine reads policy format version 1" if where == "version" else ""
            problems.add(
                path, f"{where}: must be {_literal(expected)}, found {_literal(instance)}", hint
            )
        elif v == "not":
            # The schema's way of saying "not this key here" (see the rule's if/then).
            last = e.absolute_path[-1] if e.absolute_path else ""
            message, hint = _NOT_ALLOWED.get(
                str(last), (f"{where} is not allowed here", "remove it")
            )
            problems.add(path, message, hint, key=True)
        elif v == "pattern":
            last = e.absolute_path[-1] if e.absolute_path else ""
            if last == "id":
                problems.add(
                    path,
                    f"invalid rule id {instance!r}",
                    "ids are lowercase letters, digits, '.', '_' and '-', starting with a letter "
                    "or digit, e.g. fs.rm-recursive-system",
                )
            elif last == "title":
                problems.add(path, f"{where}: the title must be one line", "")
            elif last == "expires":
                problems.add(path, f"{where}: invalid date {instance!r}", "write YYYY-MM-DD")
            elif len(e.absolute_path) == 1 and last in ("lists", "macros"):
                problems.add(
                    (*path, str(instance)),
                    f"invalid {str(last)[:-1]} name {instance!r}",
                    "names are letters, digits, '_' and '-', starting with a letter or '_'",
                    key=True,
                )
            else:
                problems.add(
                    path,
                    f"{where}: invalid name {instance!r}",
                    "names are letters, digits, '_' and '-', starting with a letter or '_'",
                )
        elif v == "minProperties":
            allowed = sorted(schema.get("properties", {}))
            problems.add(
                path,
                f"{where}: must not be empty",
                f"give at least one of: {', '.join(allowed)}",
            )
        elif v in ("minItems", "minLength"):
            problems.add(path, f"{where}: must not be empty", "")
        else:
            problems.add(path, f"{where}: {e.message}", "")
    return not errors


# --------------------------------------------------------------------------- files


def collect_files(
    paths: Iterable[StrPath], suffixes: tuple[str, ...] = POLICY_SUFFIXES
) -> tuple[list[tuple[str, str]], list[PolicyProblem]]:
    """Every file under ``paths`` whose name ends with ``suffixes``: (path, path relative to
    its root), sorted by path; names starting with "." are skipped. An explicit file is
    taken whatever its name."""
    found: list[tuple[str, str]] = []
    problems: list[PolicyProblem] = []
    for root in paths:
        root_s = os.fspath(root)
        if os.path.isfile(root_s):
            if root_s.endswith(suffixes):
                found.append((root_s, os.path.basename(root_s)))
            continue
        if not os.path.isdir(root_s):
            problems.append(PolicyProblem(root_s, 0, 0, "no such file or directory"))
            continue
        for dirpath, dirs, files in os.walk(root_s):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(suffixes):
                    continue
                full = os.path.join(dirpath, name)
                found.append((full, os.path.relpath(full, root_s)))
    found.sort()
    return found, problems


def _read(path: str, problems: _Problems) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        problems.errors.append(PolicyProblem(path, 0, 0, f"cannot read: {e.strerror or e}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        problems.errors.append(
            PolicyProblem(
                path,
                0,
                0,
                f"file too large (more than {MAX_FILE_BYTES} bytes)",
                "policy files are small; split the rules into several files",
            )
        )
        return None
    return data


def _decode(path: str, data: bytes, problems: _Problems) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        problems.errors.append(
            PolicyProblem(
                path,
                line,
                column,
                f"not UTF-8 text (byte 0x{data[e.start]:02x})",
                "a policy file is UTF-8 YAML; is this a binary file?",
            )
        )
        return None
    if "\x00" in text:
        head = text[: text.index("\x00")]
        problems.errors.append(
            PolicyProblem(
                path,
                head.count("\n") + 1,
                len(head) - (head.rfind("\n") + 1) + 1,
                "the file contains a NUL character",
                "a policy file is UTF-8 YAML; is this a binary file?",
            )
        )
        return None
    return text.removeprefix("\ufeff")


# --------------------------------------------------------------------------- semantics


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
    tests: list[EffectTest] = []
    for key, expect in (("match", True), ("not_match", False)):
        for j, entry in enumerate(raw.get("tests", {}).get(key, ())):
            tpath: JsonPath = (*path, "tests", key, j)
            synthetic = synthetic_effects(entry, tpath, problems.report)
            _file, line, column = problems.where(tpath)
            tests.append(
                EffectTest(synthetic, _effect_test_text(entry), expect, doc.file, line, column)
            )
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
    tests: list[RuleTest] = []
    for key, expect in (("match", True), ("not_match", False)):
        for j, command in enumerate(raw.get("tests", {}).get(key, ())):
            _file, line, column = problems.where((*path, "tests", key, j))
            tests.append(RuleTest(command, expect, doc.file, line, column))
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


# --------------------------------------------------------------------------- inline tests


@dataclass(frozen=True)
class TestResult:
    """One inline test or fixture case: where it is written, and what happened."""

    file: str
    line: int
    column: int
    rule_id: str
    command: str
    expect_fire: bool
    ok: bool
    detail: str = ""  # what happened instead, when not ok

    __test__ = False  # not a pytest test class

    def __str__(self) -> str:
        want = "fire" if self.expect_fire else "not fire"
        status = "ok" if self.ok else "FAIL"
        return (
            f"{self.file}:{self.line}:{self.column}: {status}: {self.rule_id} should {want} on "
            f"{self.command!r}" + (f": {self.detail}" if self.detail else "")
        )


def _default_analyzer() -> Analyzer:
    from airlock.policy.shell import analyze  # the real parser, imported late (tree-sitter)

    return analyze


def _commands_summary(analysis: Analysis) -> str:
    if not analysis.commands:
        return "the parser found no command"
    shown = "; ".join(
        f"{c.name!r} (flags {list(c.flags)}, positionals {list(c.positionals)}"
        + (f", wrappers {list(c.wrappers)}" if c.wrappers else "")
        + ")"
        for c in analysis.commands[:4]
    )
    more = len(analysis.commands) - 4
    return f"commands seen: {shown}" + (f" and {more} more" if more > 0 else "")


def _check(rule: Rule, command: str, expect_fire: bool, analyze: Analyzer, today: date) -> str:
    """'' when the rule behaves as expected on ``command``; else what happened instead."""
    try:
        analysis = analyze(command)
    except Exception as e:  # the parser should never raise; report it as a test failure
        return f"the parser failed: {type(e).__name__}: {e}"
    ruleset = RuleSet((rule,))
    fired = ruleset.evaluate(analysis, today=today, parser_findings=False).findings
    if bool(fired) == expect_fire:
        return ""
    hits = ruleset.explain(analysis, today=today)
    if expect_fire:
        stopped = [h for h in hits if not h.fired]
        if stopped:
            return f"it matched but the exception {stopped[0].excepted_by!r} stopped it"
        parser = "".join(f"; parser finding {f.rule_id}" for f in analysis.findings)
        return f"it did not fire: {_commands_summary(analysis)}{parser}"
    reasons = "; ".join(next(h.reasons for h in hits if h.fired))
    return f"it fired ({reasons})"


def _effect_results(rule: EffectRule) -> list[TestResult]:
    return [
        TestResult(
            test.file or rule.file,
            test.line or rule.line,
            test.column or 1,
            rule.id,
            test.text,
            test.expect_fire,
            not (detail := check_effect_test(rule, test)),
            detail,
        )
        for test in rule.tests
    ]


def run_inline_tests(
    rules: Iterable[Rule | EffectRule], *, analyze: Analyzer | None = None
) -> list[TestResult]:
    """Run every rule's inline tests: static rules' with the real parser unless
    ``analyze`` is given, effect rules' on the synthetic effects of their entries
    (the entry, as YAML flow text, is the result's ``command``).

    Every exception counts as in force, whatever its expiry date, so that whether a
    bundle loads never depends on the date (``airlock policy lint`` warns about
    expired exceptions instead)."""
    results: list[TestResult] = []
    analyzer: Analyzer | None = analyze
    for rule in rules:
        if isinstance(rule, EffectRule):
            results.extend(_effect_results(rule))
            continue
        for test in rule.tests:
            if analyzer is None:
                analyzer = _default_analyzer()
            detail = _check(rule, test.command, test.expect_fire, analyzer, date.min)
            results.append(
                TestResult(
                    test.file or rule.file,
                    test.line or rule.line,
                    test.column or 1,
                    rule.id,
                    test.command,
                    test.expect_fire,
                    not detail,
                    detail,
                )
            )
    return results


# --------------------------------------------------------------------------- loading


def _version(files: Sequence[tuple[str, str, bytes]]) -> str:
    h = hashlib.sha256()
    for _path, rel, data in sorted(files, key=lambda f: (f[1], f[0])):
        name = rel.encode("utf-8", "surrogateescape")
        h.update(len(name).to_bytes(8, "big") + name)
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _paths(path: StrPath | Iterable[StrPath]) -> list[StrPath]:
    if isinstance(path, str | os.PathLike):
        return [path]
    return list(path)


def load_bundle(
    path: StrPath | Iterable[StrPath],
    *,
    run_tests: bool = True,
    analyze: Analyzer | None = None,
    today: date | None = None,
) -> PolicyBundle:
    """Load every policy file under ``path`` (a directory, a file, or several of them).

    Raises :class:`PolicyError` listing every problem. ``run_tests=False`` skips the
    inline tests (for ``airlock policy test``, which reports them one by one);
    ``analyze`` replaces the real parser (default: :func:`airlock.policy.shell.analyze`);
    ``today`` is the date expired exceptions are warned about (default: UTC today).
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
    docs: list[_Doc] = []
    for file, rel in found:
        data = _read(file, problems)
        if data is None:
            continue
        read.append((file, rel, data))
        text = _decode(file, data, problems)
        if text is None:
            continue
        try:
            doc = _compose(text, file)
        except yaml.YAMLError as e:
            yp = _yaml_error(e, text)
            problems.errors.append(PolicyProblem(file, yp.line, yp.column, yp.message, yp.hint))
            continue
        except _YamlProblem as yp:
            problems.errors.append(PolicyProblem(file, yp.line, yp.column, yp.message, yp.hint))
            continue
        except RecursionError:
            problems.errors.append(PolicyProblem(file, 0, 0, "the YAML is nested too deeply"))
            continue
        problems.docs[file] = doc
        if _schema_problems(doc, problems):
            docs.append(doc)

    ctx = _Context()
    for doc in docs:
        _collect_definitions(doc, ctx, problems)
    compiler = Compiler(ctx.lists, ctx.macros, problems.report)
    effects = EffectCompiler(compiler, problems.report)
    for name, (mpath, _raw) in ctx.macros.items():
        compiler.macro(name, mpath)
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
    _unused(ctx, compiler, problems)

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
    )


def _inline_test_problems(
    rules: Sequence[Rule] | Sequence[EffectRule], analyze: Analyzer | None
) -> list[PolicyProblem]:
    if not any(r.tests for r in rules):
        return []
    if analyze is None and not any(isinstance(r, EffectRule) for r in rules):
        try:
            analyze = _default_analyzer()
        except ImportError as e:
            return [
                PolicyProblem(
                    rules[0].file, 0, 0, f"cannot run the inline tests: no parser ({e})", ""
                )
            ]
    out = []
    for result in run_inline_tests(rules, analyze=analyze):
        if not result.ok:
            want = "fire" if result.expect_fire else "not fire"
            out.append(
                PolicyProblem(
                    result.file,
                    result.line,
                    result.column,
                    f"inline test failed: rule {result.rule_id!r} should {want} on "
                    f"{result.command!r}, but {result.detail}",
                    "fix the rule's match (or effect), or the test",
                )
            )
    return out


def _order(p: PolicyProblem) -> tuple[str, int, int]:
    return (p.file, p.line, p.column)


def _unused(ctx: _Context, compiler: Compiler, problems: _Problems) -> None:
    used_lists = compiler.used_lists
    for name, (path, _items) in ctx.lists.items():
        if name not in used_lists:
            problems.add(path, f"list {name!r} is never used", "", key=True, warning=True)
    for name, (path, _raw) in ctx.macros.items():
        if name not in compiler.used_macros:
            problems.add(path, f"macro {name!r} is never used", "", key=True, warning=True)


# --------------------------------------------------------------------------- effects files


@functools.cache
def _effects_validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    sub_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"]}
    sub_schema["$ref"] = "#/$defs/effectTest"
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(
        sub_schema
    )
    return validator


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
        try:
            doc = _compose(text, file) if text.strip() else _Doc(file, {})
        except yaml.YAMLError as e:
            yp = _yaml_error(e, text)
            problems.errors.append(PolicyProblem(file, yp.line, yp.column, yp.message, yp.hint))
        except _YamlProblem as yp:
            problems.errors.append(PolicyProblem(file, yp.line, yp.column, yp.message, yp.hint))
        else:
            problems.docs[file] = doc
            if not isinstance(doc.value, dict):
                problems.add(
                    (file,),
                    f"an effects file is a mapping, found {_kind(doc.value)}",
                    "give any of: files, programs, network, sensitive_reads",
                )
            elif _schema_problems(doc, problems, _effects_validator()):
                effects = synthetic_effects(doc.value, (file,), problems.report)
    if problems.errors or effects is None:
        raise PolicyError(sorted(problems.errors, key=_order))
    return effects


# --------------------------------------------------------------------------- fixtures

_ANNOTATION = re.compile(r"^#\s*(ruleid|ok)\s*:\s*(.+?)\s*$")


@dataclass(frozen=True)
class FixtureCase:
    """One annotated command of a fixture file."""

    file: str
    line: int  # of the command
    command: str
    rule_id: str
    expect_fire: bool  # "# ruleid:" (True) or "# ok:" (False)


def read_fixtures(path: str, text: str) -> tuple[list[FixtureCase], list[PolicyProblem]]:
    """Parse a fixture file: ``# ruleid: ID`` / ``# ok: ID`` (IDs may be comma-separated)
    on the lines before a command line apply to it; a command line ending with a
    backslash continues on the next line; blank lines and other comments are ignored."""
    cases: list[FixtureCase] = []
    problems: list[PolicyProblem] = []
    pending: list[tuple[str, bool, int]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        i += 1
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = _ANNOTATION.match(stripped)
            if m:
                for rid in m.group(2).split(","):
                    if rid.strip():
                        pending.append((rid.strip(), m.group(1) == "ruleid", i))
            continue
        start = i
        command = raw
        while command.endswith("\\") and i < len(lines):
            command = command + "\n" + lines[i]
            i += 1
        for rid, fire, _ in pending:
            cases.append(FixtureCase(path, start, command, rid, fire))
        pending = []
    for rid, _fire, line in pending:
        problems.append(
            PolicyProblem(path, line, 1, f"annotation for {rid!r} is not followed by a command")
        )
    return cases, problems


def run_fixture(
    bundle: PolicyBundle, case: FixtureCase, *, analyze: Analyzer | None = None
) -> TestResult:
    """Evaluate the whole bundle on the case's command; did its rule fire as annotated?"""
    analyzer = analyze or _default_analyzer()

    def result(ok: bool, detail: str) -> TestResult:
        return TestResult(
            case.file, case.line, 1, case.rule_id, case.command, case.expect_fire, ok, detail
        )

    if bundle.rule(case.rule_id) is None:
        if bundle.effect_rule(case.rule_id) is not None:
            return result(
                False,
                f"{case.rule_id!r} is an effect rule: it judges a dry run, not a command line; "
                "test it with inline tests",
            )
        return result(False, f"the bundle has no rule {case.rule_id!r}")
    try:
        analysis = analyzer(case.command)
    except Exception as e:
        return result(False, f"the parser failed: {type(e).__name__}: {e}")
    verdict = bundle.evaluate(analysis)
    fired = [f for f in verdict.findings if f.rule_id == case.rule_id]
    if bool(fired) == case.expect_fire:
        return result(True, "")
    if case.expect_fire:
        stopped = [h for h in bundle.explain(analysis) if h.rule_id == case.rule_id]
        if stopped:
            return result(False, f"an exception stopped it ({stopped[0].excepted_by})")
        return result(False, f"it did not fire: {_commands_summary(analysis)}")
    return result(False, f"it fired on {fired[0].subcommand!r}")


def iter_fixture_files(paths: Iterable[StrPath]) -> Iterator[str]:
    """The fixture files (``*.sh``, ``*.txt``) under ``paths``."""
    found, _missing = collect_files(paths, FIXTURE_SUFFIXES)
    for file, _rel in found:
        yield file
