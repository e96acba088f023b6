"""Compiled policy rules and their evaluation against a command model.

Pure code: no I/O (but ``PathContext.of``, which resolves a home's links), no clock unless
the caller leaves ``today`` out, no shared mutable state, so one :class:`RuleSet` may be used
by many threads at once. A :class:`PathContext` (the cwd and the caller's home) makes paths
match as what they resolve to.

The pieces, from small to large:

* :class:`Globs`: a precompiled set of fnmatch patterns (exact names in a
  frozenset, the rest in one alternation regex).
* :class:`Matcher`: a compiled ``match`` mapping: a conjunction of conditions,
  one per key. Each condition can *test* a command (the fast path) or say *why*
  it holds (for ``airlock policy explain``).
* :class:`Compiler`: turns the YAML-shaped ``match`` mappings into matchers,
  resolving ``$lists`` and macros. It knows nothing about files: problems are
  reported through a callback with the JSON path of the offending value.
* :class:`Rule`: one compiled rule; :class:`RuleSet`: the rules indexed by
  command name, with :meth:`RuleSet.evaluate` (the static verdict) and
  :meth:`RuleSet.explain`.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from airlock.policy.model import Analysis, Classification, SimpleCommand
from airlock.types import ActionClass, Finding, FindingSource, RiskTier, Scope, Severity, Verdict

__all__ = [
    "DECISIONS",
    "SEVERITIES",
    "WRITING_OPS",
    "Compiler",
    "Globs",
    "JsonPath",
    "Layer",
    "Matcher",
    "PathContext",
    "Rule",
    "RuleException",
    "RuleHit",
    "RuleSet",
    "RuleTest",
    "StaticVerdict",
    "today_utc",
]

JsonPath = tuple[str | int, ...]

WRITING_OPS = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})
DECISIONS: Mapping[str, Verdict] = {
    "allow": Verdict.ALLOW,
    "ask": Verdict.ASK,
    "deny": Verdict.DENY,
}
SEVERITIES: Mapping[str, Severity] = {
    "info": Severity.INFO,
    "low": Severity.LOW,
    "medium": Severity.MEDIUM,
    "high": Severity.HIGH,
    "critical": Severity.CRITICAL,
}
_LINE_KEYS = frozenset({"regex", "normalized_regex"})
_GLOB_CHARS = frozenset("*?[")


class Layer(enum.StrEnum):
    """Where a policy file sits. Informational: the strictest decision always wins."""

    ORGANISATION = "organisation"
    TEAM = "team"
    PROJECT = "project"


def today_utc() -> date:
    """Today's date in UTC: the day exception expiry dates are compared with."""
    return datetime.now(UTC).date()


# --------------------------------------------------------------------------- globs


def _home_variants(pattern: str) -> tuple[str, ...]:
    """A leading ``~`` (alone or before ``/``) also matches a literal ``$HOME`` / ``${HOME}``."""
    if pattern == "~" or pattern.startswith("~/"):
        rest = pattern[1:]
        return (pattern, "$HOME" + rest, "${HOME}" + rest)
    return (pattern,)


class Globs:
    """Precompiled fnmatch patterns (case-sensitive; ``*`` also matches ``/``).

    ``entries`` are ``(label, patterns)`` pairs: the label is what the policy
    wrote (``"$system_dirs"`` or a pattern), the patterns what it stands for.
    """

    __slots__ = ("_exact", "_regex", "entries", "home")

    def __init__(self, entries: Iterable[tuple[str, Sequence[str]]], *, home: bool = False) -> None:
        self.entries = tuple((label, tuple(pats)) for label, pats in entries)
        self.home = home
        exact: set[str] = set()
        regexes: list[str] = []
        for _label, pats in self.entries:
            for pat in pats:
                for variant in _home_variants(pat) if home else (pat,):
                    if _GLOB_CHARS.isdisjoint(variant):
                        exact.add(variant)
                    else:
                        regexes.append(fnmatch.translate(variant))
        self._exact = frozenset(exact)
        self._regex = re.compile("|".join(regexes)) if regexes else None

    @classmethod
    def of(cls, patterns: Iterable[str], *, home: bool = False) -> Globs:
        """Globs from plain patterns (no list references)."""
        return cls(((p, (p,)) for p in patterns), home=home)

    @property
    def literal_names(self) -> frozenset[str] | None:
        """The exact strings this matches, when it has no glob (else None)."""
        return None if self._regex is not None else self._exact

    def match(self, value: str) -> bool:
        return value in self._exact or (
            self._regex is not None and self._regex.match(value) is not None
        )

    def which(self, value: str) -> str | None:
        """The label of the first entry matching ``value`` (slow; for explanations)."""
        for label, pats in self.entries:
            for pat in pats:
                for variant in _home_variants(pat) if self.home else (pat,):
                    if fnmatch.fnmatchcase(value, variant):
                        return label if label == pat else f"{pat!r} (from {label})"
        return None

    def first(self, values: Iterable[str]) -> str | None:
        """The first of ``values`` that matches, or None."""
        for value in values:
            if self.match(value):
                return value
        return None


def _quote(value: str) -> str:
    return repr(value)


def _shown(hit: tuple[str, str]) -> str:
    """A matched word, with the form that matched when it is not the word as written."""
    word, form = hit
    return _quote(word) if word == form else f"{_quote(word)} (as {_quote(form)})"


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class PathContext:
    """Where a line runs, for matching the paths it names (hashable: part of memo keys).

    ``cwd``: the request's working directory (absolute); ``home``: the home directory of
    the user the command runs as ("" when unknown); ``real_home``: the same with its
    symbolic links resolved, when it differs (the cwd always has them resolved). With a
    context, a word that is a path is also matched as what it resolves to: a relative one
    from the cwd (or from a directory a ``cd`` in the line leads to), spelled absolute and,
    below the home, with ``~``. Without one (inline tests), only as written and normalized.
    """

    cwd: str
    home: str = ""
    real_home: str = ""

    @classmethod
    def of(cls, cwd: str, home: str) -> PathContext:
        """The context of a line run in ``cwd`` (its links already resolved) by a user whose
        home is ``home``, as the password database names it; its real path is found here (a
        cwd below a home reached through a link is still below it)."""
        real = os.path.realpath(home) if home.startswith("/") else ""
        return cls(cwd=cwd, home=home, real_home=real if real != home else "")

    def homes(self) -> tuple[str, ...]:
        """The spellings of the home to turn back into ``~`` (none for "" or "/")."""
        out: list[str] = []
        for h in (self.home, self.real_home):
            h = _clean(h) if h.startswith("/") else ""
            if h and h != "/" and h not in out:
                out.append(h)
        return tuple(out)


# Directory changes a line may make: bounded, so that `cd a; cd a; ...` stays cheap.
_MAX_CWDS = 32
_MAX_CD_ROUNDS = 8
_CD_COMMANDS = frozenset({"cd", "pushd"})
_CD_FLAGS = frozenset({"-L", "-P", "-e", "-@", "-n"})
_UNKNOWN_DIR = "\0"  # a cd target the analysis cannot know (`cd "$D"`, `cd -`, a glob)


def _clean(path: str) -> str:
    """``path`` (absolute) normalized: no ".", "..", doubled or trailing "/"."""
    n = posixpath.normpath(path)
    return "/" + n.lstrip("/") if n.startswith("//") else n


def _tilde_rest(word: str) -> str | None:
    """What follows the home in ``~``, ``~/x``, ``$HOME/x``, ``${HOME}/x`` (None: not so)."""
    for prefix in ("~", "$HOME", "${HOME}"):
        if word == prefix or word.startswith(prefix + "/"):
            return word[len(prefix) :]
    return None


def _under_home(rest: str) -> str | None:
    """``rest`` (what follows ``~``) normalized as ``~/...``; None if it leaves the home."""
    parts: list[str] = []
    for part in rest.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(["~", *parts])


class _Paths:
    """The forms a word is matched in, for one line (and one context). Not shared."""

    __slots__ = ("_cache", "_cwds", "_home", "_homes")

    def __init__(self, analysis: Analysis, context: PathContext | None) -> None:
        self._cache: dict[str, tuple[tuple[str, ...], ...]] = {}
        self._homes = context.homes() if context is not None else ()
        self._home = self._homes[0] if self._homes else ""
        self._cwds: tuple[str, ...] = ()
        if context is not None and context.cwd.startswith("/"):
            self._cwds = self._directories(analysis, _clean(context.cwd))

    def _cd_target(self, cmd: SimpleCommand) -> str:
        """Where ``cd``/``pushd`` goes: an absolute path, a relative one, or _UNKNOWN_DIR."""
        words = [w for w in cmd.positionals if w not in _CD_FLAGS]
        if not words:
            return self._home or _UNKNOWN_DIR  # cd alone: the home
        word = words[0]
        rest = _tilde_rest(word)
        if rest is not None:
            return self._home + rest if self._home else _UNKNOWN_DIR
        if word == "-" or "\0" in word or any(c in word for c in "$`*?[{~"):
            return _UNKNOWN_DIR
        return word

    def _directories(self, analysis: Analysis, cwd: str) -> tuple[str, ...]:
        """The directories a command of the line may run in: the cwd, and wherever any
        combination of its ``cd``/``pushd`` may lead (in any order: a function defined
        before a ``cd`` runs after it, a loop repeats one; and each may fail). A target the
        analysis cannot know counts as the home, where the files these rules protect are."""
        targets: list[str] = []
        for cmd in analysis.commands:
            if cmd.name in _CD_COMMANDS:
                target = self._cd_target(cmd)
                if target == _UNKNOWN_DIR:
                    targets.extend(self._homes)
                elif target not in targets:
                    targets.append(target)
        found = [cwd]
        for _round in range(min(len(targets), _MAX_CD_ROUNDS)):
            added = False
            for base in list(found):
                for target in targets:
                    d = _clean(posixpath.join(base, target))
                    if d not in found and len(found) < _MAX_CWDS:
                        found.append(d)
                        added = True
            if not added:
                break
        return tuple(found)

    def readings(self, word: str) -> tuple[tuple[str, ...], ...]:
        """What ``word`` names, one reading per directory it may be relative to (one for an
        absolute or ``~`` word): the normalized path, absolute, and as ``~/...`` below the
        home. Empty when it is no path we can resolve (``$VAR/x``, ``~user``)."""
        found = self._cache.get(word)
        if found is not None:
            return found
        readings: list[tuple[str, ...]] = []
        absolute: list[str] = []
        rest = _tilde_rest(word)
        if not word or "\0" in word:
            pass
        elif word.startswith("/"):
            absolute.append(word)
        elif rest is not None:
            if self._home:
                absolute.append(self._home + rest)
            else:
                under = _under_home(rest)
                if under is not None:
                    readings.append((under,))
        elif word.startswith(("$", "~")):
            pass  # another variable, another user's home: not a path we can resolve
        elif self._cwds:
            absolute.extend(c + "/" + word for c in self._cwds)
        else:
            readings.append((posixpath.normpath(word),))
        for a in absolute:
            n = _clean(a)
            tilde = [
                "~" if n == h else "~" + n[len(h) :]
                for h in self._homes
                if n == h or n.startswith(h + "/")
            ]
            # Below the home, a relative or ~ word is matched as ~/...: the spelling rules
            # name the caller's own files in, and the one `~/.bashrc` was always matched in
            # (not /home/u/project/.bashrc, which the glob /home/*/.bashrc also matches: its
            # * spans "/"). A word written absolute keeps its absolute form too.
            kept = tilde if tilde and not word.startswith("/") else [n, *tilde]
            readings.append(tuple(dict.fromkeys(kept)))
        result = tuple(readings)
        self._cache[word] = result
        return result

    def forms(self, word: str) -> tuple[str, ...]:
        """``word`` as written, then every form of every reading (see :meth:`readings`)."""
        return tuple(dict.fromkeys((word, *(f for r in self.readings(word) for f in r))))

    def covered(self, globs: Globs, word: str) -> bool:
        """Whether an exception's ``globs`` cover ``word``: as written (unless it climbs
        with ``..``: ``build/../../.bashrc`` is not in ``build/*``), or in every reading."""
        if globs.match(word) and not _dot_dot(word):
            return True
        readings = self.readings(word)
        return bool(readings) and all(any(globs.match(f) for f in r) for r in readings)


def _dot_dot(word: str) -> bool:
    return ".." in word.split("/")


# --------------------------------------------------------------------------- the line


_NO_COMMAND = SimpleCommand(
    argv0="",
    name="",
    args=(),
    flags=(),
    positionals=(),
    redirects=(),
    assignments=(),
    wrappers=(),
    text="",
    span=(0, 0),
)


_EMPTY = Analysis(
    source="",
    commands=(),
    pipelines=(),
    findings=(),
    classification=Classification(),
    read_only=True,
    normalized="",
)


class _Line:
    """Per-evaluation state: the analysis and caches (never shared between calls)."""

    __slots__ = ("_context", "_paths", "_pipes", "analysis", "regex_cache")

    def __init__(self, analysis: Analysis, context: PathContext | None = None) -> None:
        self.analysis = analysis
        self.regex_cache: dict[int, bool] = {}
        self._pipes: dict[int, list[SimpleCommand]] | None = None
        self._context = context
        self._paths: _Paths | None = None

    @property
    def paths(self) -> _Paths:
        if self._paths is None:
            self._paths = _Paths(self.analysis, self._context)
        return self._paths

    def path_hit(self, globs: Globs, words: Iterable[str]) -> tuple[str, str] | None:
        """The first word one of whose forms (``_Paths.forms``) matches, with that form."""
        forms = self.paths.forms
        for word in words:
            for form in forms(word):
                if globs.match(form):
                    return word, form
        return None

    def earlier_in_pipeline(self, cmd: SimpleCommand) -> list[SimpleCommand]:
        if cmd.pipeline < 0 or cmd.pipeline_position <= 0:
            return []
        if self._pipes is None:
            pipes: dict[int, list[SimpleCommand]] = {}
            for c in self.analysis.commands:
                if c.pipeline >= 0:
                    pipes.setdefault(c.pipeline, []).append(c)
            self._pipes = pipes
        return [
            c
            for c in self._pipes.get(cmd.pipeline, ())
            if c.pipeline_position < cmd.pipeline_position
        ]


# --------------------------------------------------------------------------- conditions


class _Cond:
    """One key of a match mapping."""

    key = ""
    line_only = False

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        raise NotImplementedError

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        """A short explanation when the condition holds; None when it does not."""
        raise NotImplementedError

    def names(self) -> frozenset[str] | None:
        """The command names this condition can hold for (None: any)."""
        return None


class _Argv0(_Cond):
    key = "argv0"

    def __init__(self, by_name: Globs | None, by_path: Globs | None) -> None:
        self.by_name = by_name
        self.by_path = by_path

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return (self.by_name is not None and self.by_name.match(cmd.name)) or (
            self.by_path is not None and self.by_path.match(cmd.argv0)
        )

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if self.by_name is not None and self.by_name.match(cmd.name):
            return f"argv0: name {_quote(cmd.name)} matches {self.by_name.which(cmd.name)}"
        if self.by_path is not None and self.by_path.match(cmd.argv0):
            return f"argv0: {_quote(cmd.argv0)} matches {self.by_path.which(cmd.argv0)}"
        return None

    def names(self) -> frozenset[str] | None:
        if self.by_path is not None or self.by_name is None:
            return None
        return self.by_name.literal_names


class _Flags(_Cond):
    key = "flags"

    def __init__(
        self, all_: tuple[str, ...], any_: frozenset[str] | None, none: frozenset[str]
    ) -> None:
        self.all = all_
        self.any = any_
        self.none = none

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        flags = cmd.flags
        for f in self.all:
            if f not in flags:
                return False
        if self.any is not None and self.any.isdisjoint(flags):
            return False
        return not self.none or self.none.isdisjoint(flags)

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if not self.test(line, cmd):
            return None
        parts = []
        if self.all:
            parts.append("all of " + ", ".join(self.all))
        if self.any is not None:
            parts.append("any: " + ", ".join(f for f in cmd.flags if f in self.any))
        if self.none:
            parts.append("none of " + ", ".join(sorted(self.none)))
        return "flags: " + "; ".join(parts)


class _Positionals(_Cond):
    key = "positionals"

    def __init__(self, any_: Globs | None, all_: tuple[Globs, ...], none: Globs | None) -> None:
        self.any = any_
        self.all = all_
        self.none = none

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        pos = cmd.positionals
        if self.any is not None and line.path_hit(self.any, pos) is None:
            return False
        for g in self.all:
            if line.path_hit(g, pos) is None:
                return False
        return self.none is None or line.path_hit(self.none, pos) is None

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if not self.test(line, cmd):
            return None
        parts = []
        if self.any is not None:
            hit = line.path_hit(self.any, cmd.positionals)
            assert hit is not None
            parts.append(f"any: {_shown(hit)} matches {self.any.which(hit[1])}")
        for g in self.all:
            hit = line.path_hit(g, cmd.positionals)
            assert hit is not None
            parts.append(f"all: {_shown(hit)} matches {g.which(hit[1])}")
        if self.none is not None:
            parts.append("none: no positional matches")
        return "positionals: " + "; ".join(parts)


class _Words(_Cond):
    """``args`` (every argument word) or ``assignments`` (leading NAME=value names)."""

    def __init__(self, key: str, globs: Globs) -> None:
        self.key = key
        self.globs = globs

    def _words(self, cmd: SimpleCommand) -> Iterable[str]:
        if self.key == "assignments":
            return (name for name, _value in cmd.assignments)
        return cmd.args

    def _hit(self, line: _Line, cmd: SimpleCommand) -> tuple[str, str] | None:
        if self.key == "assignments":  # names, not paths
            found = self.globs.first(self._words(cmd))
            return None if found is None else (found, found)
        return line.path_hit(self.globs, cmd.args)

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return self._hit(line, cmd) is not None

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        hit = self._hit(line, cmd)
        if hit is None:
            return None
        return f"{self.key}: {_shown(hit)} matches {self.globs.which(hit[1])}"


class _OptionValues(_Cond):
    """``option_values``: the value of some option (of ``flags``, if given) matches."""

    key = "option_values"

    def __init__(self, flags: frozenset[str] | None, globs: Globs) -> None:
        self.flags = flags
        self.globs = globs

    def _hit(self, line: _Line, cmd: SimpleCommand) -> tuple[str, tuple[str, str]] | None:
        for flag, value in cmd.option_values:
            if self.flags is None or flag in self.flags:
                hit = line.path_hit(self.globs, (value,))
                if hit is not None:
                    return flag, hit
        return None

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return bool(cmd.option_values) and self._hit(line, cmd) is not None

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        found = self._hit(line, cmd)
        if found is None:
            return None
        flag, hit = found
        return f"option_values: {flag} {_shown(hit)} matches {self.globs.which(hit[1])}"


class _Redirects(_Cond):
    key = "redirects"

    def __init__(self, targets: Globs | None, ops: frozenset[str]) -> None:
        self.targets = targets
        self.ops = ops

    def _hit(self, line: _Line, cmd: SimpleCommand) -> str | None:
        for r in cmd.redirects:
            if r.op not in self.ops:
                continue
            written = f"{r.fd if r.fd is not None else ''}{r.op}{r.target}"
            if self.targets is None:
                return _quote(written)
            hit = line.path_hit(self.targets, (r.target,))
            if hit is not None:
                return _quote(written) + ("" if hit[0] == hit[1] else f" (as {_quote(hit[1])})")
        return None

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        if not cmd.redirects:
            return False
        return self._hit(line, cmd) is not None

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        hit = self._hit(line, cmd)
        return None if hit is None else f"redirects: {hit}"


class _Wrapped(_Cond):
    key = "wrapped_by"

    def __init__(self, globs: Globs) -> None:
        self.globs = globs

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return bool(cmd.wrappers) and self.globs.first(cmd.wrappers) is not None

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        hit = self.globs.first(cmd.wrappers)
        return None if hit is None else f"wrapped_by: {_quote(hit)}"


class _Flag(_Cond):
    """``background`` or ``dynamic``: a boolean attribute equals the wanted value."""

    def __init__(self, key: str, wanted: bool) -> None:
        self.key = key
        self.wanted = wanted

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        value: bool = cmd.background if self.key == "background" else cmd.dynamic
        return value is self.wanted

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        return f"{self.key}: {str(self.wanted).lower()}" if self.test(line, cmd) else None


class _Classified(_Cond):
    """``classified``: the command's four-axis classification (the command catalog's
    baseline, refined by its arguments) has one of the wanted values on each axis given."""

    key = "classified"

    def __init__(self, axes: tuple[tuple[str, frozenset[int]], ...]) -> None:
        self.axes = axes

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        c = cmd.classification
        return all(int(getattr(c, axis)) in wanted for axis, wanted in self.axes)

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if not self.test(line, cmd):
            return None
        c = cmd.classification
        shown = ", ".join(f"{axis}={getattr(c, axis).name.lower()}" for axis, _ in self.axes)
        return f"classified: {shown}"


class _Regex(_Cond):
    """``regex`` (the raw line) or ``normalized_regex`` (Analysis.normalized)."""

    line_only = True

    def __init__(self, key: str, pattern: re.Pattern[str]) -> None:
        self.key = key
        self.pattern = pattern

    def _text(self, line: _Line) -> str:
        a = line.analysis
        return a.normalized if self.key == "normalized_regex" else a.source

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        cache = line.regex_cache
        found = cache.get(id(self))
        if found is None:
            found = cache[id(self)] = self.pattern.search(self._text(line)) is not None
        return found

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        m = self.pattern.search(self._text(line))
        return None if m is None else f"{self.key}: {self.pattern.pattern!r} found {m.group()!r}"


class _Pipeline(_Cond):
    key = "pipeline"

    def __init__(self, from_: Matcher, to: Matcher | None) -> None:
        self.from_ = from_
        self.to = to

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        if cmd.pipeline < 0 or cmd.pipeline_position <= 0:
            return False
        if self.to is not None and not self.to.test(line, cmd):
            return False
        return any(self.from_.test(line, c) for c in line.earlier_in_pipeline(cmd))

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if not self.test(line, cmd):
            return None
        source = next(c for c in line.earlier_in_pipeline(cmd) if self.from_.test(line, c))
        return f"pipeline: from {source.text!r} ({'; '.join(self.from_.why(line, source))})"

    def names(self) -> frozenset[str] | None:
        return None if self.to is None else self.to.names()


class _Macro(_Cond):
    key = "macro"

    def __init__(self, name: str, target: Matcher) -> None:
        self.name = name
        self.target = target
        self.line_only = target.line_only

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return self.target.test(line, cmd)

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        if not self.target.test(line, cmd):
            return None
        return f"macro {self.name}: ({'; '.join(self.target.why(line, cmd))})"

    def names(self) -> frozenset[str] | None:
        return self.target.names()


class _AnyOf(_Cond):
    key = "any_of"

    def __init__(self, options: tuple[Matcher, ...]) -> None:
        self.options = options
        self.line_only = all(o.line_only for o in options)

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return any(o.test(line, cmd) for o in self.options)

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        for i, o in enumerate(self.options):
            if o.test(line, cmd):
                return f"any_of[{i}]: ({'; '.join(o.why(line, cmd))})"
        return None

    def names(self) -> frozenset[str] | None:
        result: set[str] = set()
        for o in self.options:
            n = o.names()
            if n is None:
                return None
            result |= n
        return frozenset(result)


class _Not(_Cond):
    key = "not"

    def __init__(self, inner: Matcher) -> None:
        self.inner = inner
        self.line_only = inner.line_only

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        return not self.inner.test(line, cmd)

    def why(self, line: _Line, cmd: SimpleCommand) -> str | None:
        return "not: the inner match does not hold" if self.test(line, cmd) else None


class Matcher:
    """A compiled ``match`` mapping: every condition must hold for the same command."""

    __slots__ = ("_names", "conds", "line_only")

    def __init__(self, conds: Sequence[_Cond]) -> None:
        self.conds = tuple(conds)
        # A match with no per-command condition is judged once for the whole line.
        self.line_only = all(c.line_only for c in self.conds)
        names: frozenset[str] | None = None
        for c in self.conds:
            n = c.names()
            if n is not None:
                names = n if names is None else names & n
        self._names = names

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.conds)

    def names(self) -> frozenset[str] | None:
        """The command names this can hold for, when that is a known finite set."""
        return self._names

    def test(self, line: _Line, cmd: SimpleCommand) -> bool:
        for c in self.conds:  # noqa: SIM110 (a plain loop is faster than all() here)
            if not c.test(line, cmd):
                return False
        return True

    def why(self, line: _Line, cmd: SimpleCommand) -> list[str]:
        """One explanation per condition (the caller has checked that the match holds)."""
        return [c.why(line, cmd) or f"{c.key}: (does not hold)" for c in self.conds]


# --------------------------------------------------------------------------- compiling

Report = Callable[[JsonPath, str, str, int | None], None]
"""report(path, message, hint, offset): offset is a position inside the string at path."""


class Compiler:
    """Compiles ``match`` mappings (already schema-valid) into :class:`Matcher`.

    ``lists`` maps a list name to (path of its definition, items); ``macros`` a
    macro name to (path, raw match). Problems go to ``report``; the returned
    matcher is then unusable (the caller rejects the bundle).
    """

    def __init__(
        self,
        lists: Mapping[str, tuple[JsonPath, Sequence[str]]],
        macros: Mapping[str, tuple[JsonPath, Mapping[str, Any]]],
        report: Report,
    ) -> None:
        self.lists = lists
        self.macros = macros
        self.report = report
        self._compiled_macros: dict[str, Matcher] = {}
        self._compiling: list[str] = []
        self.used_lists: set[str] = set()
        self.used_macros: set[str] = set()

    # ---- patterns

    def entries(self, patterns: Sequence[str], path: JsonPath) -> list[tuple[str, tuple[str, ...]]]:
        """Each written pattern with what it stands for (``$name`` -> the list's items)."""
        out: list[tuple[str, tuple[str, ...]]] = []
        for i, pat in enumerate(patterns):
            if pat.startswith("$"):
                name = pat[1:]
                found = self.lists.get(name)
                if found is None:
                    known = ", ".join(sorted(self.lists)) or "none"
                    self.report(
                        (*path, i),
                        f"unknown list {pat!r} (defined lists: {known})",
                        "define it under `lists:` in any file of the bundle, or write [$] for a "
                        "literal $",
                        None,
                    )
                    continue
                self.used_lists.add(name)
                out.append((pat, tuple(found[1])))
            else:
                out.append((pat, (pat,)))
        return out

    def globs(self, patterns: Sequence[str], path: JsonPath, *, home: bool) -> Globs:
        return Globs(self.entries(patterns, path), home=home)

    def strings(self, patterns: Sequence[str], path: JsonPath) -> tuple[str, ...]:
        return tuple(s for _label, pats in self.entries(patterns, path) for s in pats)

    def regex(self, pattern: str, path: JsonPath) -> re.Pattern[str] | None:
        try:
            return re.compile(pattern)
        except re.error as e:
            self.report(
                path,
                f"invalid regular expression: {e.msg} at position {e.pos}",
                "regexes are Python `re` syntax; in YAML, single-quote them so that "
                "backslashes stay as written",
                e.pos,
            )
            return None
        except (RecursionError, OverflowError, MemoryError) as e:
            self.report(path, f"regular expression too complex: {type(e).__name__}", "", None)
            return None

    # ---- matches

    def macro(self, name: str, path: JsonPath) -> Matcher | None:
        done = self._compiled_macros.get(name)
        if done is not None:
            return done
        if name in self._compiling:
            cycle = " -> ".join([*self._compiling[self._compiling.index(name) :], name])
            self.report(path, f"macro cycle: {cycle}", "a macro cannot use itself", None)
            return None
        found = self.macros.get(name)
        if found is None:
            known = ", ".join(sorted(self.macros)) or "none"
            self.report(
                path,
                f"unknown macro {name!r} (defined macros: {known})",
                "define it under `macros:` in any file of the bundle",
                None,
            )
            return None
        self._compiling.append(name)
        try:
            matcher = self.match(found[1], found[0])
        finally:
            self._compiling.pop()
        self._compiled_macros[name] = matcher
        return matcher

    def match(self, raw: Mapping[str, Any], path: JsonPath) -> Matcher:
        conds: list[_Cond] = []
        for key, value in raw.items():
            cond = self._cond(key, value, (*path, key))
            if cond is not None:
                conds.append(cond)
        return Matcher(conds)

    def _cond(self, key: str, value: Any, path: JsonPath) -> _Cond | None:
        if key == "argv0":
            entries = self.entries(value, path)
            by_name = [(lab, tuple(p for p in pats if "/" not in p)) for lab, pats in entries]
            by_path = [(lab, tuple(p for p in pats if "/" in p)) for lab, pats in entries]
            by_name = [(lab, pats) for lab, pats in by_name if pats]
            by_path = [(lab, pats) for lab, pats in by_path if pats]
            return _Argv0(Globs(by_name) if by_name else None, Globs(by_path) if by_path else None)
        if key == "flags":
            return _Flags(
                self.strings(value.get("all", ()), (*path, "all")),
                frozenset(self.strings(value["any"], (*path, "any"))) if "any" in value else None,
                frozenset(self.strings(value.get("none", ()), (*path, "none"))),
            )
        if key == "positionals":
            all_ = tuple(
                Globs(self.entries([p], (*path, "all")), home=True) for p in value.get("all", ())
            )
            return _Positionals(
                self.globs(value["any"], (*path, "any"), home=True) if "any" in value else None,
                all_,
                self.globs(value["none"], (*path, "none"), home=True) if "none" in value else None,
            )
        if key == "args":
            return _Words("args", self.globs(value["any"], (*path, "any"), home=True))
        if key == "option_values":
            flags = (
                frozenset(self.strings(value["flags"], (*path, "flags")))
                if "flags" in value
                else None
            )
            return _OptionValues(flags, self.globs(value["any"], (*path, "any"), home=True))
        if key == "assignments":
            return _Words("assignments", self.globs(value["any"], (*path, "any"), home=False))
        if key == "redirects":
            targets = (
                self.globs(value["any"], (*path, "any"), home=True) if "any" in value else None
            )
            ops = frozenset(value["ops"]) if "ops" in value else WRITING_OPS
            return _Redirects(targets, ops)
        if key == "wrapped_by":
            return _Wrapped(self.globs(value, path, home=False))
        if key in ("background", "dynamic"):
            return _Flag(key, bool(value))
        if key == "classified":
            enums = {"action": ActionClass, "risk": RiskTier, "scope": Scope}
            return _Classified(
                tuple(
                    (axis, frozenset(int(enums[axis][v.upper()]) for v in value[axis]))
                    for axis in ("action", "risk", "scope")
                    if axis in value
                )
            )
        if key == "pipeline":
            from_ = self.match(value["from"], (*path, "from"))
            to = self.match(value["to"], (*path, "to")) if "to" in value else None
            return _Pipeline(from_, to)
        if key in _LINE_KEYS:
            pattern = self.regex(value, path)
            return None if pattern is None else _Regex(key, pattern)
        if key == "macro":
            self.used_macros.add(value)
            target = self.macro(value, path)
            return None if target is None else _Macro(value, target)
        if key == "any_of":
            return _AnyOf(tuple(self.match(m, (*path, i)) for i, m in enumerate(value)))
        if key == "not":
            return _Not(self.match(value, path))
        self.report(path, f"unknown match key {key!r}", "", None)  # the schema prevents this
        return None


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class RuleException:
    """A rule does not fire for a command whose operands all match ``values`` (until ``expires``).

    The operands are the positionals and redirect targets (the arguments when there
    are neither). *Every* one must match: an exception for ``/tmp/*`` must not let
    ``rm -rf / /tmp/x`` through because one of its operands is excepted.
    """

    values: tuple[str, ...]
    justification: str
    expires: date | None = None
    # The compiled values (with lists resolved by the loader); default: from ``values``.
    globs: Globs | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.globs is None:
            object.__setattr__(self, "globs", Globs.of(self.values, home=True))

    def active(self, today: date) -> bool:
        """Whether it is in force on ``today`` (it holds through its expiry day)."""
        return self.expires is None or today <= self.expires

    def covers(self, cmd: SimpleCommand, line: _Line | None = None) -> bool:
        """Whether every operand of ``cmd`` (and there is one) matches an exception value,
        as written or as what it names (``_Paths.covered``; ``line``: the line's context)."""
        g = self.globs
        assert g is not None  # set by __post_init__
        operands = [*cmd.positionals, *(r.target for r in cmd.redirects if r.target)]
        if not operands:
            operands = list(cmd.args)
        paths = (line if line is not None else _Line(_EMPTY)).paths
        return bool(operands) and all(paths.covered(g, word) for word in operands)


@dataclass(frozen=True)
class RuleTest:
    """One inline test of a rule: ``command`` must (or must not) make the rule fire."""

    command: str
    expect_fire: bool  # from tests.match (True) or tests.not_match (False)
    file: str = ""
    line: int = 0
    column: int = 0


@dataclass(frozen=True)
class Rule:
    """One compiled rule."""

    id: str
    title: str
    description: str
    decision: Verdict
    severity: Severity
    matcher: Matcher = field(repr=False, compare=False)
    layer: Layer = Layer.PROJECT
    file: str = ""
    line: int = 0
    exceptions: tuple[RuleException, ...] = ()
    references: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tests: tuple[RuleTest, ...] = ()

    @property
    def line_rule(self) -> bool:
        """Judged once for the whole line (its match has only regex keys)."""
        return self.matcher.line_only

    def _exception_for(
        self, commands: Iterable[SimpleCommand], today: date, line: _Line | None = None
    ) -> RuleException | None:
        if not self.exceptions:
            return None
        cmds = tuple(commands)
        for exc in self.exceptions:
            if exc.active(today) and cmds and all(exc.covers(c, line) for c in cmds):
                return exc
        return None

    def _finding(self, text: str, span: tuple[int, int]) -> Finding:
        return Finding(
            rule_id=self.id,
            verdict=self.decision,
            severity=self.severity,
            message=self.title,
            source=FindingSource.STATIC,
            subcommand=text,
            span=span,
        )

    def findings(
        self, analysis: Analysis, *, today: date | None = None, context: PathContext | None = None
    ) -> tuple[Finding, ...]:
        """This rule alone on ``analysis``: its findings (used for inline tests)."""
        return (
            RuleSet((self,))
            .evaluate(analysis, today=today, parser_findings=False, context=context)
            .findings
        )


@dataclass(frozen=True)
class StaticVerdict:
    """The static verdict of one command line."""

    verdict: Verdict | None  # None: no opinion, the dry run decides
    findings: tuple[Finding, ...]  # strictest first, then by span
    allowed_read_only: bool  # ALLOW, and the analysis says the line only reads


@dataclass(frozen=True)
class RuleHit:
    """A rule whose match held (for ``airlock policy explain``)."""

    rule_id: str
    decision: Verdict
    command: int  # index into Analysis.commands; -1 for a line rule
    reasons: tuple[str, ...]  # one per top-level matcher key
    excepted_by: str = ""  # the justification of the exception that stopped it, if any

    @property
    def fired(self) -> bool:
        return not self.excepted_by


def _line_span(source: str) -> tuple[int, int]:
    return (0, len(source.encode("utf-8", "surrogatepass")))


def _sort_key(f: Finding) -> tuple[int, int, int, int, str, str]:
    return (-f.verdict, -f.severity, f.span[0], f.span[1], f.rule_id, f.subcommand)


class RuleSet:
    """Rules indexed for evaluation. Immutable after construction; thread-safe."""

    __slots__ = ("_by_name", "_general", "_line", "rules")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        by_name: dict[str, list[Rule]] = {}
        general: list[Rule] = []
        line: list[Rule] = []
        for rule in self.rules:
            if rule.line_rule:
                line.append(rule)
                continue
            names = rule.matcher.names()
            if names is None:
                general.append(rule)
            else:
                for n in names:
                    by_name.setdefault(n, []).append(rule)
        self._line = tuple(line)
        self._general = tuple(general)
        self._by_name = {n: tuple(rs) + self._general for n, rs in by_name.items()}

    def _candidates(self, cmd: SimpleCommand) -> tuple[Rule, ...]:
        return self._by_name.get(cmd.name, self._general)

    def evaluate(
        self,
        analysis: Analysis,
        *,
        today: date | None = None,
        parser_findings: bool = True,
        context: PathContext | None = None,
    ) -> StaticVerdict:
        """The static verdict: the strictest ask/deny finding, else ALLOW when every
        command is covered by an allow rule, else None (no opinion). ``context``: where the
        line runs, to match the paths it names as what they resolve to (:class:`PathContext`)."""
        day = today if today is not None else today_utc()
        line = _Line(analysis, context)
        findings: list[Finding] = list(analysis.findings) if parser_findings else []
        commands = analysis.commands
        for rule in self._line:
            if (
                rule.matcher.test(line, _NO_COMMAND)
                and rule._exception_for(commands, day, line) is None
            ):
                findings.append(rule._finding(analysis.source, _line_span(analysis.source)))
        covered = 0
        for cmd in commands:
            is_covered = False
            for rule in self._candidates(cmd):
                if rule.matcher.test(line, cmd) and rule._exception_for((cmd,), day, line) is None:
                    findings.append(rule._finding(cmd.text, cmd.span))
                    if rule.decision is Verdict.ALLOW:
                        is_covered = True
            covered += is_covered
        strict = max(
            (f.verdict for f in findings if f.verdict in (Verdict.ASK, Verdict.DENY)),
            default=None,
        )
        verdict: Verdict | None
        if strict is not None:
            verdict = strict
        elif commands and covered == len(commands):
            verdict = Verdict.ALLOW
        else:
            verdict = None
        findings.sort(key=_sort_key)
        return StaticVerdict(
            verdict=verdict,
            findings=tuple(findings),
            allowed_read_only=verdict is Verdict.ALLOW and analysis.read_only,
        )

    def explain(
        self, analysis: Analysis, *, today: date | None = None, context: PathContext | None = None
    ) -> tuple[RuleHit, ...]:
        """Every rule whose match holds, with why (including those an exception stopped)."""
        day = today if today is not None else today_utc()
        line = _Line(analysis, context)
        hits: list[RuleHit] = []
        for rule in self._line:
            if rule.matcher.test(line, _NO_COMMAND):
                exc = rule._exception_for(analysis.commands, day, line)
                hits.append(
                    RuleHit(
                        rule.id,
                        rule.decision,
                        -1,
                        tuple(rule.matcher.why(line, _NO_COMMAND)),
                        exc.justification if exc else "",
                    )
                )
        for i, cmd in enumerate(analysis.commands):
            for rule in self._candidates(cmd):
                if rule.matcher.test(line, cmd):
                    exc = rule._exception_for((cmd,), day, line)
                    hits.append(
                        RuleHit(
                            rule.id,
                            rule.decision,
                            i,
                            tuple(rule.matcher.why(line, cmd)),
                            exc.justification if exc else "",
                        )
                    )
        return tuple(hits)
