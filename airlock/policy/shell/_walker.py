"""Static analysis of a bash command line: every simple command it can run.

``analyze(command)`` parses the line with tree-sitter-bash and builds the command model
(:mod:`airlock.policy.model`): each simple command wherever it sits (pipelines, lists,
subshells, ``$( )``, backticks, process substitution, function/loop/branch bodies,
``bash -c`` strings, ``eval`` of literals, here-documents fed to a shell), with quotes
removed, flags split, redirects, wrappers unwrapped (data: ``data/wrappers.yaml``) and a
coarse classification (data: ``data/commands.yaml``).

Pure: no I/O except reading the two data files once, at import. Thread-safe (one
tree-sitter parser per thread). Never raises: anything it cannot analyse becomes a finding
(``parse.error``, ``parse.too-deep``, ``parse.too-large``, ``dynamic.*``,
``decode-to-shell``). The tree is walked with an explicit stack, never by recursion.

Spans are byte offsets into the UTF-8 encoding of the original line; a command found
inside a re-parsed string (``bash -c '...'``, ``eval``, a here-document) carries the span
of the outermost word or here-document body it came from, and its own text.

Conventions of the model this module fills in:
- A bare assignment (``X=1``) or a lone redirect (``> f``) is a command whose argv0 is ""
  (rules can still match its assignments and redirects); ``normalized`` leaves it out.
- ``wrappers`` holds wrapper names (``sudo``, ``docker exec``, ``find -exec``) and, for
  strings run as command lines, ``NAME -c`` (``bash -c``, ``su -c``, ``env -S``), ``eval``,
  ``trap``, or the shell's name when it reads a here-document or a piped literal script.
  Wrappers whose words are run through a remote or sub shell (``ssh``, ``watch``) are
  joined and re-parsed like ``bash -c``.
- ``dynamic_args``: an argument contains an expansion, or brace expansion, or the wrapper
  adds arguments at run time (xargs, find -exec). Globs are kept as written (``/*``).
- Here-document bodies are in ``Redirect.body``; bodies fed to a shell are also parsed,
  those fed to an interpreter (python, perl, ...) are left to the rules' regexes.
- ``read_only`` holds when there is no finding, and every command is read-only per
  commands.yaml (with its flag/positional conditions), has no writing redirect except to
  ``null_targets``, only harmless leading assignments (LANG, LC_*, ...) and a literal name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, TypeAlias

import tree_sitter
import tree_sitter_bash
import yaml

from airlock.policy.model import (
    ActionClass,
    Analysis,
    Classification,
    Redirect,
    RiskTier,
    Scope,
    SimpleCommand,
)
from airlock.types import Finding, FindingSource, Severity, Verdict

__all__ = [
    "DECODE_TO_SHELL",
    "DYNAMIC_COMMAND_NAME",
    "DYNAMIC_EVAL",
    "DYNAMIC_SHELL_STRING",
    "PARSE_ERROR",
    "PARSE_INTERNAL_ERROR",
    "PARSE_TOO_DEEP",
    "PARSE_TOO_LARGE",
    "analyze",
]

PARSE_ERROR: Final = "parse.error"
PARSE_TOO_DEEP: Final = "parse.too-deep"
PARSE_TOO_LARGE: Final = "parse.too-large"
PARSE_INTERNAL_ERROR: Final = "parse.internal-error"
DYNAMIC_COMMAND_NAME: Final = "dynamic.command-name"
DYNAMIC_EVAL: Final = "dynamic.eval"
DYNAMIC_SHELL_STRING: Final = "dynamic.shell-string"
DECODE_TO_SHELL: Final = "decode-to-shell"

_RULES: Final[dict[str, tuple[Verdict, Severity]]] = {
    PARSE_ERROR: (Verdict.ASK, Severity.MEDIUM),
    PARSE_TOO_DEEP: (Verdict.ASK, Severity.MEDIUM),
    PARSE_TOO_LARGE: (Verdict.ASK, Severity.MEDIUM),
    PARSE_INTERNAL_ERROR: (Verdict.ASK, Severity.HIGH),
    DYNAMIC_COMMAND_NAME: (Verdict.ASK, Severity.MEDIUM),
    DYNAMIC_EVAL: (Verdict.ASK, Severity.HIGH),
    DYNAMIC_SHELL_STRING: (Verdict.ASK, Severity.HIGH),
    DECODE_TO_SHELL: (Verdict.DENY, Severity.CRITICAL),
}
# Wrapper chains (sudo env nice ... cmd) may be this many times max_depth long.
_WRAPPER_CHAIN_FACTOR: Final = 4
# At most this many findings per rule id: the verdict is the same, the list stays readable.
_MAX_FINDINGS_PER_RULE: Final = 16

# ---------------------------------------------------------------------------------------------
# Data files

_ACTIONS: Final = {a.name.lower(): a for a in ActionClass}
_RISKS: Final = {r.name.lower(): r for r in RiskTier}
_SCOPES: Final = {s.name.lower(): s for s in Scope}


def _load_yaml(name: str) -> dict[str, Any]:
    text = resources.files("airlock.policy").joinpath("data").joinpath(name).read_text("utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster at import
    loaded = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    if not isinstance(loaded, dict) or loaded.get("version") != 1:
        raise ValueError(f"{name}: expected a mapping with version: 1")
    return loaded


def _check_keys(where: str, entry: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = set(entry) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings")
    return tuple(value)


def _globs(patterns: Iterable[str]) -> re.Pattern[str]:
    """One compiled matcher for a list of fnmatch globs (case-sensitive)."""
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(parts) if parts else "(?!)")


@dataclass(frozen=True, slots=True)
class _Cond:
    flags_any: frozenset[str] | None
    flags_all: frozenset[str] | None
    flags_none: frozenset[str] | None
    positionals_any: re.Pattern[str] | None
    positionals_min: int | None
    positionals_max: int | None
    args_any: re.Pattern[str] | None
    action: ActionClass | None
    risk: RiskTier | None
    scope: Scope | None

    def holds(self, flags: Sequence[str], positionals: Sequence[str], args: Sequence[str]) -> bool:
        if self.flags_any is not None and not self.flags_any.intersection(flags):
            return False
        if self.flags_all is not None and not self.flags_all.issubset(flags):
            return False
        if self.flags_none is not None and self.flags_none.intersection(flags):
            return False
        if self.positionals_min is not None and len(positionals) < self.positionals_min:
            return False
        if self.positionals_max is not None and len(positionals) > self.positionals_max:
            return False
        if self.positionals_any is not None and not any(
            self.positionals_any.match(p) for p in positionals
        ):
            return False
        return self.args_any is None or any(self.args_any.match(a) for a in args)


_COND_KEYS: Final = (
    "flags_any",
    "flags_all",
    "flags_none",
    "positionals_any",
    "positionals_min",
    "positionals_max",
    "args_any",
    "action",
    "risk",
    "scope",
)


def _cond(where: str, raw: Any) -> _Cond:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    _check_keys(where, raw, _COND_KEYS)

    def fs(key: str) -> frozenset[str] | None:
        return frozenset(_strs(raw[key], f"{where}.{key}")) if key in raw else None

    def ints(key: str) -> int | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, int):
            raise ValueError(f"{where}.{key}: expected an integer")
        return value

    return _Cond(
        flags_any=fs("flags_any"),
        flags_all=fs("flags_all"),
        flags_none=fs("flags_none"),
        positionals_any=_globs(_strs(raw["positionals_any"], where))
        if "positionals_any" in raw
        else None,
        positionals_min=ints("positionals_min"),
        positionals_max=ints("positionals_max"),
        args_any=_globs(_strs(raw["args_any"], where)) if "args_any" in raw else None,
        action=_ACTIONS[raw["action"]] if "action" in raw else None,
        risk=_RISKS[raw["risk"]] if "risk" in raw else None,
        scope=_SCOPES[raw["scope"]] if "scope" in raw else None,
    )


@dataclass(frozen=True, slots=True)
class _Spec:
    """One commands.yaml entry (a subcommand entry already merged with its command's)."""

    action: ActionClass
    risk: RiskTier
    scope: Scope
    read_only: bool
    read_only_args: frozenset[str]
    unsafe_flags: frozenset[str]
    max_positionals: int | None
    positionals_allowed: re.Pattern[str] | None
    paths: bool
    flag_style: str
    options_with_value: frozenset[str]
    global_options_with_value: frozenset[str]
    when: tuple[_Cond, ...]
    subcommands: Mapping[str, _Spec]

    @property
    def dynamic_ok(self) -> bool:
        """Whether dynamic arguments keep it read-only: no argument can make it write."""
        return (
            not self.unsafe_flags
            and self.max_positionals is None
            and self.positionals_allowed is None
        )


_SPEC_KEYS: Final = (
    "action",
    "risk",
    "scope",
    "read_only",
    "read_only_args",
    "unsafe_flags",
    "max_positionals",
    "positionals_allowed",
    "paths",
    "flag_style",
    "options_with_value",
    "global_options_with_value",
    "when",
    "subcommands",
)
_FLAG_STYLES: Final = ("default", "single_dash", "bundled_first_arg")


def _spec(where: str, raw: Any, parent: _Spec) -> _Spec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    _check_keys(where, raw, _SPEC_KEYS)
    style = raw.get("flag_style", parent.flag_style)
    if style not in _FLAG_STYLES:
        raise ValueError(f"{where}.flag_style: one of {_FLAG_STYLES}")
    when = tuple(_cond(f"{where}.when[{i}]", c) for i, c in enumerate(raw.get("when") or ()))
    allowed = raw.get("positionals_allowed")
    spec = _Spec(
        action=_ACTIONS[raw.get("action", parent.action.name.lower())],
        risk=_RISKS[raw.get("risk", parent.risk.name.lower())],
        scope=_SCOPES[raw.get("scope", parent.scope.name.lower())],
        read_only=bool(raw.get("read_only", False)),
        read_only_args=frozenset(_strs(raw.get("read_only_args"), where)),
        unsafe_flags=parent.unsafe_flags | frozenset(_strs(raw.get("unsafe_flags"), where)),
        max_positionals=raw.get("max_positionals"),
        positionals_allowed=_globs(_strs(allowed, where)) if allowed is not None else None,
        paths=bool(raw.get("paths", parent.paths)),
        flag_style=style,
        options_with_value=parent.options_with_value
        | frozenset(_strs(raw.get("options_with_value"), where)),
        global_options_with_value=frozenset(_strs(raw.get("global_options_with_value"), where)),
        when=parent.when + when,
        subcommands={},
    )
    subs = raw.get("subcommands") or {}
    if subs:
        child_parent = _Spec(
            action=spec.action,
            risk=spec.risk,
            scope=spec.scope,
            read_only=False,
            read_only_args=frozenset(),
            unsafe_flags=spec.unsafe_flags,
            max_positionals=None,
            positionals_allowed=None,
            paths=spec.paths,
            flag_style=spec.flag_style,
            options_with_value=spec.options_with_value,
            global_options_with_value=frozenset(),
            when=spec.when,
            subcommands={},
        )
        children = {str(k): _spec(f"{where}.{k}", v, child_parent) for k, v in subs.items()}
        spec = dataclasses.replace(spec, subcommands=children)
    return spec


@dataclass(frozen=True, slots=True)
class _Interp:
    code_options: frozenset[str]
    stdin_off: frozenset[str]


@dataclass(frozen=True, slots=True)
class _CommandData:
    default: _Spec
    exact: Mapping[str, _Spec]
    globs: tuple[tuple[str, _Spec], ...]
    read_only_assignments: re.Pattern[str]
    null_targets: frozenset[str]
    workspace_paths: re.Pattern[str]
    home_paths: re.Pattern[str]
    sensitive_paths: re.Pattern[str]
    shells: frozenset[str]
    interpreters: tuple[tuple[str, _Interp], ...]
    downloaders: frozenset[str]
    decoders: Mapping[str, _Cond]


def _load_commands() -> _CommandData:
    raw = _load_yaml("commands.yaml")
    _check_keys(
        "commands.yaml",
        raw,
        (
            "version",
            "defaults",
            "read_only_assignments",
            "null_targets",
            "paths",
            "sensitive_paths",
            "groups",
            "commands",
        ),
    )
    d = raw["defaults"]
    base = _Spec(
        action=_ACTIONS[d["action"]],
        risk=_RISKS[d["risk"]],
        scope=_SCOPES[d["scope"]],
        read_only=False,
        read_only_args=frozenset(),
        unsafe_flags=frozenset(),
        max_positionals=None,
        positionals_allowed=None,
        paths=True,
        flag_style="default",
        options_with_value=frozenset(),
        global_options_with_value=frozenset(),
        when=(),
        subcommands={},
    )
    exact: dict[str, _Spec] = {}
    globs: list[tuple[str, _Spec]] = []
    for key, value in (raw.get("commands") or {}).items():
        spec = _spec(f"commands.{key}", value, base)
        if any(c in str(key) for c in "*?["):
            globs.append((str(key), spec))
        else:
            exact[str(key)] = spec
    groups = raw.get("groups") or {}
    _check_keys("groups", groups, ("shells", "interpreters", "downloaders", "decoders"))
    interps = []
    for key, value in (groups.get("interpreters") or {}).items():
        value = value or {}
        _check_keys(f"interpreters.{key}", value, ("code_options", "stdin_off"))
        interps.append(
            (
                str(key),
                _Interp(
                    frozenset(_strs(value.get("code_options"), key)),
                    frozenset(_strs(value.get("stdin_off"), key)),
                ),
            )
        )
    paths = raw.get("paths") or {}
    _check_keys("paths", paths, ("workspace", "user_home"))
    return _CommandData(
        default=base,
        exact=exact,
        globs=tuple(globs),
        read_only_assignments=_globs(
            _strs(raw.get("read_only_assignments"), "read_only_assignments")
        ),
        null_targets=frozenset(_strs(raw.get("null_targets"), "null_targets")),
        workspace_paths=_globs(_strs(paths.get("workspace"), "paths.workspace")),
        home_paths=_globs(_strs(paths.get("user_home"), "paths.user_home")),
        sensitive_paths=_globs(_strs(raw.get("sensitive_paths"), "sensitive_paths")),
        shells=frozenset(_strs(groups.get("shells"), "shells")),
        interpreters=tuple(interps),
        downloaders=frozenset(_strs(groups.get("downloaders"), "downloaders")),
        decoders={
            str(k): _cond(f"decoders.{k}", v or {})
            for k, v in (groups.get("decoders") or {}).items()
        },
    )


@dataclass(frozen=True, slots=True)
class _Wrapper:
    key: str
    kind: str  # argv | shell | eval | trap | find
    label: str
    subcommand: str | None
    options_with_value: frozenset[str]
    prefix_options_with_value: frozenset[str]
    no_command_options: frozenset[str]
    string_options: frozenset[str]
    argv: bool
    argv_only_with: frozenset[str]
    assignments: bool
    skip_positionals: int
    command_after: str | None
    join_rest: bool
    argv_options: frozenset[str]
    background: bool
    compound_start: str | None
    compound_name: bool
    dynamic_args: bool


_WRAPPER_KEYS: Final = (
    "kind",
    "label",
    "options_with_value",
    "prefix_options_with_value",
    "no_command_options",
    "string_options",
    "argv",
    "argv_only_with",
    "assignments",
    "skip_positionals",
    "command_after",
    "join_rest",
    "argv_options",
    "background",
    "compound_start",
    "compound_name",
    "dynamic_args",
)
_WRAPPER_KINDS: Final = ("argv", "shell", "eval", "trap", "find")


def _load_wrappers() -> dict[str, tuple[_Wrapper, ...]]:
    raw = _load_yaml("wrappers.yaml")
    _check_keys("wrappers.yaml", raw, ("version", "wrappers", "shell_options"))
    out: dict[str, list[_Wrapper]] = {}
    for key, value in (raw.get("wrappers") or {}).items():
        value = value or {}
        where = f"wrappers.{key}"
        _check_keys(where, value, _WRAPPER_KEYS)
        kind = value.get("kind", "argv")
        if kind not in _WRAPPER_KINDS:
            raise ValueError(f"{where}.kind: one of {_WRAPPER_KINDS}")
        name, _, sub = str(key).partition(" ")
        out.setdefault(name, []).append(
            _Wrapper(
                key=str(key),
                kind=kind,
                label=str(value.get("label", key)),
                subcommand=sub or None,
                options_with_value=frozenset(_strs(value.get("options_with_value"), where)),
                prefix_options_with_value=frozenset(
                    _strs(value.get("prefix_options_with_value"), where)
                ),
                no_command_options=frozenset(_strs(value.get("no_command_options"), where)),
                string_options=frozenset(_strs(value.get("string_options"), where)),
                argv=bool(value.get("argv", True)),
                argv_only_with=frozenset(_strs(value.get("argv_only_with"), where)),
                assignments=bool(value.get("assignments", False)),
                skip_positionals=int(value.get("skip_positionals", 0)),
                command_after=value.get("command_after"),
                join_rest=bool(value.get("join_rest", False)),
                argv_options=frozenset(_strs(value.get("argv_options"), where)),
                background=bool(value.get("background", False)),
                compound_start=value.get("compound_start"),
                compound_name=bool(value.get("compound_name", False)),
                dynamic_args=bool(value.get("dynamic_args", False)),
            )
        )
    return {k: tuple(v) for k, v in out.items()}


_COMMANDS: Final = _load_commands()
_WRAPPERS: Final = _load_wrappers()


@functools.lru_cache(maxsize=4096)
def _lookup(name: str) -> _Spec | None:
    spec = _COMMANDS.exact.get(name)
    if spec is not None:
        return spec
    for pattern, candidate in _COMMANDS.globs:
        if fnmatch.fnmatchcase(name, pattern):
            return candidate
    return None


@functools.lru_cache(maxsize=1024)
def _interpreter(name: str) -> _Interp | None:
    for pattern, interp in _COMMANDS.interpreters:
        if fnmatch.fnmatchcase(name, pattern):
            return interp
    return None


# ---------------------------------------------------------------------------------------------
# tree-sitter

_LANGUAGE: Final = tree_sitter.Language(tree_sitter_bash.language())
_local = threading.local()


def _parser() -> tree_sitter.Parser:
    parser: tree_sitter.Parser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = tree_sitter.Parser(_LANGUAGE)
        _local.parser = parser
    return parser


def _parse(data: bytes, deadline: float) -> tree_sitter.Tree | None:
    """Parse, giving up at ``deadline`` (time.monotonic): tree-sitter's error recovery is
    superlinear on some garbage (a few thousand `)` take a second)."""
    parser = _parser()
    view = memoryview(data)

    def read(offset: int, _point: tree_sitter.Point) -> memoryview:
        return view[offset:]

    def progress(_offset: int, _has_error: bool) -> bool:
        return time.monotonic() > deadline

    try:
        return parser.parse(read, progress_callback=progress)
    except ValueError:  # cancelled
        parser.reset()  # or the next parse would resume this one
        return None


Node: TypeAlias = tree_sitter.Node

_REDIRECT_TYPES: Final = frozenset({"file_redirect", "heredoc_redirect", "herestring_redirect"})
_EXPANSIONS: Final = frozenset(
    {"simple_expansion", "expansion", "command_substitution", "arithmetic_expansion"}
)
_SUBSTITUTIONS: Final = frozenset({"command_substitution", "process_substitution"})
_WRITE_OPS: Final = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})
_TRUNCATE_OPS: Final = frozenset({">", ">|", "&>"})
_ASSIGNMENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=", re.ASCII)
_BRACE_RE: Final = re.compile(r"\{[^{}]*(?:,|\.\.)[^{}]*\}")
_CONTINUATION_RE: Final = re.compile(rb"(?:\\\n)*")
_BACKTICKS_RE: Final = re.compile(r"\\.|`((?:[^`\\]|\\.)*)`", re.DOTALL)  # group 1: `...`
_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|[^/\s:@]+@[^/\s:]+:")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    for errors in ("strict", "surrogateescape", "surrogatepass"):
        try:
            return text.encode("utf-8", errors)
        except UnicodeEncodeError:
            continue
    return text.encode("utf-8", "replace")  # pragma: no cover - surrogatepass encodes all


# ---------------------------------------------------------------------------------------------
# Words: quote removal


_SIMPLE_ESCAPES: Final = {
    "a": "\a",
    "b": "\b",
    "e": "\x1b",
    "E": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_OCT: Final = frozenset("01234567")


def _ansi_c(text: str) -> str:
    """Decode the escapes of ANSI-C quoting ($'...'), as bash does."""
    if "\\" not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "\\" or i + 1 >= n:
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        d = text[i + 1]
        if d in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[d].encode()
            i += 2
        elif d in _OCT:
            j = i + 1
            while j < n and j < i + 4 and text[j] in _OCT:
                j += 1
            out.append(int(text[i + 1 : j], 8) & 0xFF)
            i = j
        elif d in "xuU":
            limit = {"x": 2, "u": 4, "U": 8}[d]
            j = i + 2
            while j < n and j < i + 2 + limit and text[j] in _HEX:
                j += 1
            if j == i + 2:
                out += ("\\" + d).encode()
            elif d == "x":
                out.append(int(text[i + 2 : j], 16))
            else:
                code = int(text[i + 2 : j], 16)
                out += (chr(code) if code <= 0x10FFFF else "\ufffd").encode(
                    "utf-8", "surrogatepass"
                )
            i = j
        elif d == "c" and i + 2 < n:
            out.append(ord(text[i + 2]) & 0x1F)
            i += 3
        else:
            out += ("\\" + d).encode("utf-8", "surrogatepass")
            i += 2
    return _dec(bytes(out))


class _Word:
    """One shell word after quote removal.

    ``kinds`` has one letter per character of ``value``: L unquoted literal, Q quoted or
    escaped literal, X expansion (kept as its source text), P process substitution.
    ``dynamic``: it contains an expansion; ``procsub``: a process substitution; ``glob``
    and ``brace``: unquoted pathname or brace expansion.
    """

    __slots__ = ("brace", "dynamic", "end", "glob", "kinds", "procsub", "start", "value")

    def __init__(self, value: str, kinds: str, start: int, end: int) -> None:
        self.value = value
        self.kinds = kinds
        self.start = start
        self.end = end
        self.dynamic = "X" in kinds
        self.procsub = "P" in kinds
        self.glob = self.brace = False
        if "L" in kinds and ("*" in value or "?" in value or "[" in value or "{" in value):
            plain = "".join(c if k == "L" else "\0" for c, k in zip(value, kinds, strict=True))
            bracket = plain.find("[")
            self.glob = "*" in plain or "?" in plain or (bracket >= 0 and "]" in plain[bracket:])
            self.brace = "{" in plain and _BRACE_RE.search(plain) is not None


class _WordBuilder:
    __slots__ = ("kinds", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.kinds: list[str] = []

    def add(self, text: str, kind: str) -> None:
        if text:
            self.parts.append(text)
            self.kinds.append(kind * len(text))

    def unquoted(self, text: str) -> None:
        if "\\" not in text:
            self.add(text, "L")
            return
        i, n = 0, len(text)
        while i < n:
            j = text.find("\\", i)
            if j < 0:
                self.add(text[i:], "L")
                break
            self.add(text[i:j], "L")
            if j + 1 >= n:
                self.add("\\", "L")
                break
            if text[j + 1] != "\n":
                self.add(text[j + 1], "Q")
            i = j + 2

    def double_quoted(self, text: str, specials: str = '$`"\\') -> None:
        if "\\" not in text:
            self.add(text, "Q")
            return
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n:
                d = text[i + 1]
                if d == "\n":
                    i += 2
                    continue
                if d in specials:
                    out.append(d)
                    i += 2
                    continue
            out.append(c)
            i += 1
        self.add("".join(out), "Q")

    def build(self, start: int, end: int) -> _Word:
        return _Word("".join(self.parts), "".join(self.kinds), start, end)


def _quoted_body(node: Node, data: bytes, builder: _WordBuilder, prefix: int) -> None:
    """A double-quoted string: literal text between expansions, escapes per bash."""
    start, end = node.start_byte + prefix, node.end_byte
    if end - 1 >= start and data[end - 1 : end] == b'"':
        end -= 1
    pos = start
    for child in node.children:
        if child.type in _EXPANSIONS:
            if child.start_byte > pos:
                builder.double_quoted(_dec(data[pos : child.start_byte]))
            builder.add(_dec(data[child.start_byte : child.end_byte]), "X")
            pos = child.end_byte
    if end > pos:
        builder.double_quoted(_dec(data[pos:end]))


def _word_part(node: Node, data: bytes, builder: _WordBuilder) -> None:
    t = node.type
    text_bytes = data[node.start_byte : node.end_byte]
    if t == "raw_string":
        inner = (
            text_bytes[1:-1]
            if len(text_bytes) >= 2 and text_bytes.endswith(b"'")
            else text_bytes[1:]
        )
        builder.add(_dec(inner), "Q")
    elif t == "ansi_c_string":
        inner = (
            text_bytes[2:-1]
            if len(text_bytes) >= 3 and text_bytes.endswith(b"'")
            else text_bytes[2:]
        )
        builder.add(_ansi_c(_dec(inner)), "Q")
    elif t == "string":
        _quoted_body(node, data, builder, 1)
    elif t == "translated_string":
        _quoted_body(node, data, builder, 2)
    elif t in _EXPANSIONS:
        builder.add(_dec(text_bytes), "X")
    elif t == "process_substitution":
        builder.add(_dec(text_bytes), "P")
    elif t == "concatenation":
        pos = node.start_byte
        for child in node.children:
            if child.start_byte > pos:
                builder.unquoted(_dec(data[pos : child.start_byte]))
            if child.type == "concatenation":  # not produced by the grammar; stay shallow
                builder.unquoted(_dec(data[child.start_byte : child.end_byte]))
            else:
                _word_part(child, data, builder)
            pos = max(pos, child.end_byte)
        if node.end_byte > pos:
            builder.unquoted(_dec(data[pos : node.end_byte]))
    else:
        # word, number, brace_expression, extglob_pattern, '$', regex, ... : unquoted text
        builder.unquoted(_dec(text_bytes))


def _word(nodes: Sequence[Node], data: bytes) -> _Word:
    """One word from one node, or from several joined by line continuations."""
    if len(nodes) == 1 and nodes[0].type in ("word", "number"):  # the common case, fast
        start, end = nodes[0].start_byte, nodes[0].end_byte
        raw = data[start:end]
        if b"\\" not in raw:
            value = _dec(raw)
            return _Word(value, "L" * len(value), start, end)
    builder = _WordBuilder()
    for i, node in enumerate(nodes):
        if (
            node.type == "$"
            and i + 1 < len(nodes)
            and nodes[i + 1].type == "string"
            and nodes[i + 1].start_byte == node.end_byte
        ):
            continue  # $"..." (a translated string) is the string
        _word_part(node, data, builder)
    return builder.build(nodes[0].start_byte, nodes[-1].end_byte)


def _assignment(node: Node, data: bytes) -> tuple[str, str]:
    """NAME and quote-removed value of a variable_assignment node."""
    name_node = node.child_by_field_name("name")
    value_node = node.child_by_field_name("value")
    name = _dec(data[name_node.start_byte : name_node.end_byte]) if name_node else ""
    return name, _word([value_node], data).value if value_node else ""


def _group_words(nodes: Sequence[Node], data: bytes) -> list[list[Node]]:
    """Nodes that touch (or are separated only by backslash-newlines) form one word."""
    groups: list[list[Node]] = []
    for node in nodes:
        if groups:
            prev = groups[-1][-1]
            gap = data[prev.end_byte : node.start_byte]
            if (
                node.start_byte >= prev.end_byte
                and gap[:1] in (b"", b"\\")
                and _CONTINUATION_RE.fullmatch(gap)
            ):
                groups[-1].append(node)
                continue
        groups.append([node])
    return groups


# ---------------------------------------------------------------------------------------------
# The model under construction


@dataclass(slots=True)
class _Redir:
    op: str
    fd: int | None
    target: str
    dynamic: bool
    word: _Word | None = None
    body: str = ""
    body_dynamic: bool = False
    body_span: tuple[int, int] = (0, 0)
    heredoc: bool = False

    @property
    def writes(self) -> bool:
        return self.op in _WRITE_OPS


@dataclass(slots=True)
class _Job:
    """One string to parse: the line itself, or a string found in it (bash -c, eval, ...)."""

    data: bytes
    outer_span: tuple[int, int] | None
    depth: int
    wrappers: tuple[str, ...]
    background: bool


@dataclass
class _Cmd:
    """A simple command under construction (becomes a model.SimpleCommand)."""

    words: list[_Word]
    assignments: list[tuple[str, str]]
    redirects: list[_Redir]
    wrappers: tuple[str, ...]
    job: _Job
    nspan: tuple[int, int]  # span in the job's data
    pid: int
    pos: int
    background: bool
    depth: int
    own_end: int = -1  # words[1:own_end] are this command's own arguments (wrappers)
    excluded: tuple[tuple[int, int], ...] = ()  # word ranges run by find -exec
    is_wrapper: bool = False
    dynamic_args_extra: bool = False
    reads_stdin: bool = False
    flags: tuple[str, ...] = ()
    positionals: tuple[str, ...] = ()
    own: list[str] | None = None  # own_args(), once computed
    dynamic_args: bool = False  # set by finish()
    argv0: str = field(init=False)
    name: str = field(init=False)  # basename of argv0, unless that part is dynamic
    dynamic: bool = field(init=False)  # argv0 is not a literal

    def __post_init__(self) -> None:
        if not self.words:
            self.argv0 = self.name = ""
            self.dynamic = False
            return
        w = self.words[0]
        self.argv0 = self.name = w.value
        self.dynamic = w.dynamic or w.procsub or w.glob or w.brace
        slash = w.value.rfind("/")
        if 0 <= slash < len(w.value) - 1 and not any(k in "XP" for k in w.kinds[slash + 1 :]):
            self.name = w.value[slash + 1 :]

    @property
    def args(self) -> list[str]:
        return [w.value for w in self.words[1:]]

    def own_args(self) -> list[str]:
        """Its own arguments: not the command a wrapper runs, nor find's -exec commands.

        Cached: call it only once own_end and excluded are final (in finish())."""
        if self.own is not None:
            return self.own
        end = len(self.words) if self.own_end < 0 else self.own_end
        if not self.excluded:
            self.own = [w.value for w in self.words[1:end]]
        else:
            self.own = [
                self.words[i].value
                for i in range(1, end)
                if not any(a <= i < b for a, b in self.excluded)
            ]
        return self.own


def _split_flags(
    args: Sequence[str], style: str, with_value: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Flags (clusters split, long ones without =value) and positionals; none after --."""
    flags: list[str] = []
    positionals: list[str] = []
    ended = False
    for index, arg in enumerate(args):
        if ended:
            positionals.append(arg)
            continue
        if arg == "--":
            ended = True
            continue
        if len(arg) < 2 or arg[0] != "-":
            if style == "bundled_first_arg" and index == 0 and arg.isalpha():
                flags.extend("-" + c for c in arg)
                continue
            positionals.append(arg)
            continue
        if arg.startswith("--") or style == "single_dash":
            flags.append(arg.split("=", 1)[0])
        elif arg[1:].isdigit():
            flags.append(arg)
        else:
            for i in range(1, len(arg)):
                flag = "-" + arg[i]
                flags.append(flag)
                if flag in with_value:
                    break  # the rest of the word is the option's value
    return flags, positionals


# ---------------------------------------------------------------------------------------------
# The analysis


class _Limit(Exception):
    """Raised to stop extracting when max_commands is reached."""


# The walk's context: (pipeline id or -1, position in it, background, inherited redirects).
Ctx: TypeAlias = tuple[int, int, bool, tuple[_Redir, ...]]
_NO_CTX: Final[Ctx] = (-1, 0, False, ())


class _Analyzer:
    def __init__(
        self,
        source: str,
        data: bytes,
        max_depth: int,
        max_bytes: int,
        max_commands: int,
        max_parse_seconds: float,
    ):
        self.source = source
        self.max_parse_seconds = max_parse_seconds
        self.deadline = time.monotonic() + max_parse_seconds
        self.job = _Job(data, None, 0, (), False)
        self.data = data
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.max_commands = max_commands
        self.commands: list[_Cmd] = []
        self.findings: list[Finding] = []
        self.finding_counts: dict[str, int] = {}
        self.pipes: list[list[_Cmd]] = []
        self.jobs: list[_Job] = []
        self.bytes_parsed = 0
        self.decode_checks: list[tuple[_Cmd, _Word, str]] = []
        # Redirects of `a && b > f` / `a | b > f`: tree-sitter hangs them on the whole list
        # or pipeline; bash applies them to its last command. Keyed by that command's node.
        self.pending: dict[tuple[int, int, str], list[Node]] = {}

    # -- findings --------------------------------------------------------------------------

    def finding(self, rule: str, message: str, span: tuple[int, int], subcommand: str) -> None:
        count = self.finding_counts.get(rule, 0)
        if count >= _MAX_FINDINGS_PER_RULE:
            return
        self.finding_counts[rule] = count + 1
        verdict, severity = _RULES[rule]
        self.findings.append(
            Finding(
                rule_id=rule,
                verdict=verdict,
                severity=severity,
                message=message,
                source=FindingSource.STATIC,
                subcommand=subcommand,
                span=span,
            )
        )

    def real_span(self, job: _Job, span: tuple[int, int]) -> tuple[int, int]:
        return job.outer_span if job.outer_span is not None else span

    def real_text(self, span: tuple[int, int]) -> str:
        return _dec(self.data[span[0] : span[1]])

    # -- jobs ------------------------------------------------------------------------------

    def run(self) -> None:
        self.jobs.append(_Job(self.data, None, 0, (), False))
        index = 0
        while index < len(self.jobs):
            job = self.jobs[index]
            index += 1
            self.walk(job)

    def queue(self, cmd: _Cmd, text: str, span: tuple[int, int], label: str, what: str) -> None:
        """Parse ``text`` (a string the command runs as a command line) as its own job."""
        self.queue_job(cmd.job, text, span, (*cmd.wrappers, label), cmd.background, what)

    def queue_job(
        self,
        job: _Job,
        text: str,
        span: tuple[int, int],
        wrappers: tuple[str, ...],
        background: bool,
        what: str,
    ) -> None:
        real = self.real_span(job, span)
        if job.depth + 1 > self.max_depth:
            self.finding(
                PARSE_TOO_DEEP,
                f"Command lines are nested more than {self.max_depth} levels deep "
                f"({what} inside {what}...); the innermost ones were not analysed.",
                real,
                self.real_text(real),
            )
            return
        data = _encode(text)
        if self.bytes_parsed + len(data) > self.max_bytes:
            self.finding(
                PARSE_TOO_LARGE,
                f"The command lines nested in this one add up to more than {self.max_bytes} "
                "bytes; the rest were not analysed.",
                real,
                self.real_text(real),
            )
            return
        self.jobs.append(_Job(data, real, job.depth + 1, wrappers, background))

    def walk(self, job: _Job) -> None:
        self.bytes_parsed += len(job.data)
        self.job = job
        parse_data = job.data
        if b"<>" in parse_data:  # not in tree-sitter-bash's grammar; >> has the same shape
            parse_data = parse_data.replace(b"<>", b">>")
        if b"\0" in parse_data:
            # bash cannot receive a NUL (execve's strings end there), and tree-sitter's lexer
            # is quadratic on them: parse spaces instead, and fail closed.
            parse_data = parse_data.replace(b"\0", b" ")
            at = job.data.index(b"\0")
            span = self.real_span(job, (at, at + 1))
            self.finding(
                PARSE_ERROR,
                f"The command contains a NUL byte (byte {at}), which bash cannot receive; "
                "it was analysed as if it were a space.",
                span,
                self.real_text(span),
            )
        tree = _parse(parse_data, self.deadline)
        if tree is None:
            span = self.real_span(job, (0, len(job.data)))
            self.finding(
                PARSE_TOO_LARGE,
                f"The command could not be parsed within {self.max_parse_seconds:g} s (it is "
                "too large or too convoluted); it was not analysed.",
                span,
                self.real_text(span),
            )
            return
        root = tree.root_node
        if root.has_error:
            self.parse_error(job, root)
        first_pipe = len(self.pipes)
        first_check = len(self.decode_checks)
        first_cmd = len(self.commands)
        ctx0: Ctx = (-1, 0, job.background, ())
        stack: list[tuple[Node, Ctx]] = [(root, ctx0)]
        data = job.data
        self.pending = {}
        while stack:
            node, ctx = stack.pop()
            t = node.type
            extra: list[Node] = []
            if self.pending:
                extra = self.pending.pop((node.start_byte, node.end_byte, t), [])
            if t == "command":
                self.command(node, ctx, job, extra, node, stack)
                continue
            if t == "redirected_statement":
                self.redirected(node, ctx, job, stack, extra)
                continue
            if extra:
                redirs = tuple(r for red in extra for r in self.redirect(red, data))
                ctx = (ctx[0], ctx[1], ctx[2], ctx[3] + redirs)
            if t == "pipeline":
                self.pipeline(node, ctx, stack)
                continue
            if t in ("declaration_command", "unset_command"):
                self.declaration(node, ctx, job, stack)
                continue
            if t in ("variable_assignment", "variable_assignments"):
                parent = node.parent
                if parent is None or parent.type != "c_style_for_statement":
                    self.assignment_statement(node, ctx, job, stack)
                    continue
            if t == "heredoc_redirect":
                self.heredoc_children(node, ctx, stack)
                continue
            if t in _SUBSTITUTIONS or t == "function_definition":
                ctx = (-1, 0, False, ())
            elif t == "comment":
                continue
            self.push_children(node, ctx, stack)
        self.after_job(job, first_pipe, first_check, first_cmd)

    def push_children(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        children = node.children
        count = len(children)
        for i in range(count - 1, -1, -1):
            child = children[i]
            if not child.is_named or child.child_count == 0:
                continue
            if i + 1 < count and children[i + 1].type == "&" and not ctx[2]:
                stack.append((child, (ctx[0], ctx[1], True, ctx[3])))
            else:
                stack.append((child, ctx))

    def parse_error(self, job: _Job, root: Node) -> None:
        found = root
        while True:  # descend to the first ERROR or MISSING node, in document order
            child = next(
                (c for c in found.children if c.is_error or c.is_missing or c.has_error), None
            )
            if child is None:
                break
            found = child
            if child.is_error or child.is_missing:
                break
        where = found.start_byte
        if found.is_missing:
            detail = f"expected `{found.type}`"
        else:
            snippet = _dec(job.data[found.start_byte : found.end_byte])
            snippet = snippet if len(snippet) <= 40 else snippet[:37] + "..."
            detail = f"near `{snippet}`" if snippet.strip() else "at the end of the input"
        span = self.real_span(job, (found.start_byte, found.end_byte))
        inside = " in a nested command line" if job.outer_span is not None else ""
        self.finding(
            PARSE_ERROR,
            f"The command has a syntax error{inside} (byte {where}, {detail}); only the parts "
            "that parsed were analysed.",
            span,
            self.real_text(span),
        )

    def assignment_statement(
        self, node: Node, ctx: Ctx, job: _Job, stack: list[tuple[Node, Ctx]]
    ) -> None:
        """``X=1 Y=2`` alone: a command with no name, only assignments (rules can match them)."""
        if node.type == "variable_assignment":
            nodes = [node]
        else:
            nodes = [c for c in node.named_children if c.type == "variable_assignment"]
        parts = [part for a in nodes for part in a.named_children[1:] if part.child_count]
        stack.extend((part, _NO_CTX) for part in reversed(parts))
        cmd = _Cmd(
            words=[],
            assignments=[_assignment(a, job.data) for a in nodes],
            redirects=list(ctx[3]),
            wrappers=job.wrappers,
            job=job,
            nspan=(node.start_byte, node.end_byte),
            pid=ctx[0],
            pos=ctx[1],
            background=ctx[2],
            depth=job.depth,
        )
        self.add(cmd)
        self.finish(cmd)

    # -- structure -------------------------------------------------------------------------

    def new_pipe(self) -> int:
        self.pipes.append([])
        return len(self.pipes) - 1

    def pipeline(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        elements = self.pipe_elements(node, stack)
        pid = self.new_pipe()
        for i in range(len(elements) - 1, -1, -1):
            stack.append((elements[i], (pid, i, ctx[2], ctx[3])))

    def pipe_elements(self, node: Node, stack: list[tuple[Node, Ctx]]) -> list[Node]:
        """The commands of a pipeline, left to right.

        tree-sitter-bash nests ``a | b 2>&1 | c`` as ((a | b) 2>&1) | c: the inner pipeline
        is flattened into this one and its redirects go to its last command, as in bash.
        """
        out: list[Node] = []
        todo = [node]
        while todo:
            current = todo.pop()
            for child in current.children:
                if not child.is_named or child.type == "comment":
                    continue
                if child.type == "pipeline":
                    todo.append(child)
                    continue
                if child.type == "redirected_statement":
                    body = _statement_body(child)
                    if body is not None and body.type == "pipeline":
                        reds = [c for c in child.children if c.type in _REDIRECT_TYPES]
                        last = _last_pipeline_element(body)
                        key = (last.start_byte, last.end_byte, last.type)
                        self.pending.setdefault(key, []).extend(reds)
                        stack.extend((red, _NO_CTX) for red in reds)  # $( ) in targets
                        todo.append(body)
                        continue
                out.append(child)
        out.sort(key=lambda n: n.start_byte)
        return out

    @staticmethod
    def continuation(redirects: Sequence[Node]) -> Node | None:
        """``cat <<EOF | sh``: tree-sitter puts ``| sh`` inside the here-document node."""
        for red in redirects:
            if red.type != "heredoc_redirect":
                continue
            for child in red.children:
                if (
                    child.type == "pipeline"
                    and child.child_count
                    and child.children[0].type
                    in (
                        "|",
                        "|&",
                    )
                ):
                    return child
        return None

    def heredoc_children(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        for child in reversed(node.children):
            if child.type == "heredoc_body" and not self.heredoc_quoted(node):
                self.heredoc_backticks(child)
            if not child.is_named or child.child_count == 0:
                continue
            if child.type == "pipeline" and child.children[0].type in ("|", "|&"):
                pid, pos = ctx[0], ctx[1]
                if pid < 0:
                    pid, pos = self.new_pipe(), 0
                elements = self.pipe_elements(child, stack)
                for i in range(len(elements) - 1, -1, -1):
                    stack.append((elements[i], (pid, pos + 1 + i, ctx[2], ctx[3])))
            elif child.type == "heredoc_body":
                stack.append((child, (-1, 0, False, ())))
            else:
                stack.append((child, ctx))

    def heredoc_quoted(self, node: Node) -> bool:
        data = self.job.data
        start = next((c for c in node.children if c.type == "heredoc_start"), None)
        text = data[start.start_byte : start.end_byte] if start is not None else b""
        return any(q in text for q in (b"'", b'"', b"\\"))

    def heredoc_backticks(self, body: Node) -> None:
        """`cmd` in an unquoted here-document runs; tree-sitter-bash leaves it as text."""
        data = self.job.data
        if b"`" not in data[body.start_byte : body.end_byte]:
            return
        texts: list[tuple[int, int]] = []  # the literal text between expansions
        pos = body.start_byte
        for part in body.children:
            if part.type in _EXPANSIONS:
                texts.append((pos, part.start_byte))
                pos = part.end_byte
        texts.append((pos, body.end_byte))
        for start, end in texts:
            text = _dec(data[start:end])
            for match in _BACKTICKS_RE.finditer(text):
                if match.group(1) is None:
                    continue  # an escaped character
                inner = re.sub(r"\\([`$\\])", r"\1", match.group(1))
                self.queue_job(self.job, inner, (start, end), self.job.wrappers, False, "`...`")

    def redirected(
        self,
        node: Node,
        ctx: Ctx,
        job: _Job,
        stack: list[tuple[Node, Ctx]],
        extra: Sequence[Node] = (),
    ) -> None:
        body: Node | None = None
        reds: list[Node] = []
        for child in node.children:
            if child.type in _REDIRECT_TYPES:
                reds.append(child)
            elif child.is_named and child.type != "comment" and body is None:
                body = child
        if self.continuation(reds) is not None and ctx[0] < 0:
            ctx = (self.new_pipe(), 0, ctx[2], ctx[3])
        for red in reversed(reds):
            stack.append((red, ctx))
        reds.extend(extra)
        if body is not None and body.type == "command":
            self.command(body, ctx, job, reds, node, stack)
            return
        if body is None:
            self.command(node, ctx, job, reds, node, stack, redirects_only=True)
            return
        target = body
        while target.type in ("list", "pipeline", "negated_command"):
            kids = [c for c in target.children if c.is_named and c.type != "comment"]
            if not kids:
                break
            target = kids[-1]
        if target is body:  # a compound command: the redirects apply to all of it
            redirs = tuple(r for red in reds for r in self.redirect(red, job.data))
            stack.append((body, (ctx[0], ctx[1], ctx[2], ctx[3] + redirs)))
        else:
            key = (target.start_byte, target.end_byte, target.type)
            self.pending.setdefault(key, []).extend(reds)
            stack.append((body, ctx))

    # -- redirects -------------------------------------------------------------------------

    def redirect(self, node: Node, data: bytes, fd: int | None = None) -> list[_Redir]:
        out: list[_Redir] = []
        op = ""
        dests: list[Node] = []
        t = node.type
        for child in node.children:
            ct = child.type
            if ct == "file_descriptor":
                text = _dec(data[child.start_byte : child.end_byte])
                fd = int(text) if text.isdigit() and len(text) < 10 else None
            elif not child.is_named and not op and ct not in ("(", ")"):
                op = _dec(data[child.start_byte : child.end_byte])
            elif ct in ("file_redirect", "herestring_redirect") and t == "heredoc_redirect":
                out.extend(self.redirect(child, data))
            elif ct in ("heredoc_start", "heredoc_body", "heredoc_end", "pipeline", "ERROR"):
                continue
            elif child.is_named and t != "heredoc_redirect":
                dests.append(child)
        if t == "heredoc_redirect":
            out.insert(0, self.heredoc(node, data, fd))
            return out
        word = _word([dests[0]], data) if dests else None
        target = word.value if word else ""
        if op.endswith("-") and len(op) > 1 and op[-2] == "&":  # >&- <&- : close
            op, target = op[:-1], "-"
        if (
            op == ">&"
            and fd is None
            and word is not None
            and not target.isdigit()
            and target != "-"
        ):
            op = "&>"  # >&word is &>word
        out.insert(
            0,
            _Redir(
                op=op or ">",
                fd=fd,
                target=target,
                dynamic=bool(word and (word.dynamic or word.procsub)),
                word=word,
            ),
        )
        return out

    def heredoc(self, node: Node, data: bytes, fd: int | None) -> _Redir:
        op = "<<"
        quoted = False
        strip_tabs = False
        body = ""
        dynamic = False
        span = (node.start_byte, node.end_byte)
        for child in node.children:
            ct = child.type
            if not child.is_named and ct in ("<<", "<<-"):
                strip_tabs = data[child.start_byte : child.end_byte].endswith(b"-")
            elif ct == "heredoc_start":
                start = data[child.start_byte : child.end_byte]
                quoted = any(q in start for q in (b"'", b'"', b"\\"))
            elif ct == "heredoc_body":
                span = (child.start_byte, child.end_byte)
                builder = _WordBuilder()
                if quoted:
                    builder.add(_dec(data[child.start_byte : child.end_byte]), "Q")
                else:
                    pos = child.start_byte
                    for part in child.children:
                        if part.type in _EXPANSIONS:
                            if part.start_byte > pos:
                                builder.double_quoted(_dec(data[pos : part.start_byte]), "$`\\")
                            builder.add(_dec(data[part.start_byte : part.end_byte]), "X")
                            pos = part.end_byte
                    if child.end_byte > pos:
                        builder.double_quoted(_dec(data[pos : child.end_byte]), "$`\\")
                built = builder.build(child.start_byte, child.end_byte)
                body, dynamic = built.value, built.dynamic
                if not quoted and any(m.group(1) is not None for m in _BACKTICKS_RE.finditer(body)):
                    dynamic = True
                if strip_tabs:
                    body = "\n".join(line.lstrip("\t") for line in body.split("\n"))
        return _Redir(
            op=op,
            fd=fd,
            target="",
            dynamic=False,
            body=body,
            body_dynamic=dynamic,
            body_span=span,
            heredoc=True,
        )

    # -- commands --------------------------------------------------------------------------

    def add(self, cmd: _Cmd) -> None:
        if len(self.commands) >= self.max_commands:
            raise _Limit
        self.commands.append(cmd)
        if cmd.pid >= 0:
            self.pipes[cmd.pid].append(cmd)

    def command(
        self,
        node: Node,
        ctx: Ctx,
        job: _Job,
        extra_redirects: Sequence[Node],
        span_node: Node,
        stack: list[tuple[Node, Ctx]],
        redirects_only: bool = False,
    ) -> None:
        data = job.data
        word_nodes: list[Node] = []
        assign_nodes: list[Node] = []
        red_nodes: list[Node] = list(extra_redirects)
        own_reds: list[Node] = []
        background = ctx[2]
        if not redirects_only:
            for child in node.children:
                t = child.type
                if t == "variable_assignment" and not word_nodes:
                    assign_nodes.append(child)
                elif t == "command_name":
                    inner = child.named_children
                    word_nodes.append(inner[0] if inner else child)
                elif t in _REDIRECT_TYPES:
                    red_nodes.append(child)
                    own_reds.append(child)
                elif t in ("comment", "ERROR"):
                    continue
                elif t in ("subshell", "compound_statement"):  # coproc ( ... ), time ( ... )
                    first = word_nodes[0] if word_nodes else child
                    bg = ctx[2] or data[first.start_byte : first.end_byte] == b"coproc"
                    stack.append((child, (ctx[0], ctx[1], bg, ctx[3])))
                elif child.is_named or t == "$":
                    word_nodes.append(child)
        redirs: list[_Redir] = list(ctx[3])
        if red_nodes:
            red_nodes.sort(key=lambda n: n.start_byte)
            for red in red_nodes:
                if red.type == "file_redirect":
                    dests = [c for c in red.children if c.is_named and c.type != "file_descriptor"]
                    word_nodes.extend(dests[1:])  # `echo > a b`: b is an argument of echo
            word_nodes.sort(key=lambda n: n.start_byte)
            # `cat 0<f`, `cmd 2>a 0>b`: tree-sitter-bash may read a descriptor as a word.
            fds: dict[int, int] = {}
            red_starts = {r.start_byte for r in red_nodes}
            for w in word_nodes:
                if w.end_byte in red_starts and w.type in ("number", "word"):
                    text = data[w.start_byte : w.end_byte]
                    if text.isdigit() and len(text) < 10:
                        fds[w.end_byte] = int(text)
            if fds:
                word_nodes = [w for w in word_nodes if w.end_byte not in fds]
            for red in red_nodes:
                redirs.extend(self.redirect(red, data, fds.get(red.start_byte)))
        for red in reversed(own_reds):
            stack.append((red, ctx))
        for child in reversed(word_nodes):
            if child.child_count:
                stack.append((child, _NO_CTX))
        for a in assign_nodes:
            for part in a.named_children[1:]:
                if part.child_count:
                    stack.append((part, _NO_CTX))
        if (
            len(word_nodes) == 1
            and word_nodes[0].type == "word"
            and data[word_nodes[0].start_byte : word_nodes[0].end_byte] == b"}"
        ):
            return  # a stray `}` of `coproc NAME { ...; }`, which tree-sitter-bash splits
        words = [_word(group, data) for group in _group_words(word_nodes, data)]
        dropped = self.dropped_words(job, span_node, assign_nodes, word_nodes, red_nodes)
        if dropped:
            words = sorted([*words, *dropped], key=lambda w: w.start)
        if not words and not redirs:
            return
        assignments = [_assignment(a, data) for a in assign_nodes]
        end = node.end_byte
        for red in red_nodes:
            if red.type == "heredoc_redirect":
                for part in red.children:
                    if part.type in ("heredoc_start", "file_redirect", "herestring_redirect"):
                        end = max(end, part.end_byte)
            else:
                end = max(end, red.end_byte)
        start = span_node.start_byte
        cmd = _Cmd(
            words=words,
            assignments=assignments,
            redirects=redirs,
            wrappers=job.wrappers,
            job=job,
            nspan=(start, end),
            pid=ctx[0],
            pos=ctx[1],
            background=background,
            depth=job.depth,
        )
        self.add(cmd)
        self.unwrap(cmd)

    def dropped_words(
        self,
        job: _Job,
        span_node: Node,
        assign_nodes: Sequence[Node],
        word_nodes: Sequence[Node],
        red_nodes: Sequence[Node],
    ) -> list[_Word]:
        """Words tree-sitter-bash leaves out of the tree without an error.

        Known case: the `-` of `python3 - <<EOF` (and `cmd -<<EOF`). A lone `-` is put
        back; any other unexplained text fails closed with a parse.error finding.
        """
        data = job.data
        out: list[_Word] = []
        items: list[tuple[int, int]] = [(n.start_byte, n.end_byte) for n in assign_nodes]
        items += [(n.start_byte, n.end_byte) for n in word_nodes]
        for red in red_nodes:
            if red.type == "heredoc_redirect":
                op = next((c for c in red.children if not c.is_named), None)
                if op is not None and data[op.start_byte : op.start_byte + 1] == b"-":
                    out.append(_Word("-", "L", op.start_byte, op.start_byte + 1))
                    items.append((op.start_byte, red.end_byte))
                    continue
            items.append((red.start_byte, red.end_byte))
        items.sort()
        pos = span_node.start_byte
        for start, end in items:
            if start > pos and (start > pos + 1 or data[pos] != 0x20):
                gap = data[pos:start].replace(b"\\\n", b"").strip(b" \t\n\r\x0b\x0c\x00")
                if gap == b"-":
                    at = data.index(b"-", pos, start)
                    out.append(_Word("-", "L", at, at + 1))
                elif gap:
                    span = self.real_span(job, (pos, start))
                    self.finding(
                        PARSE_ERROR,
                        "Part of the command could not be parsed "
                        f"({_short(_dec(gap))}); only the parts that parsed were analysed.",
                        span,
                        self.real_text(span),
                    )
            pos = max(pos, end)
        return out

    def declaration(self, node: Node, ctx: Ctx, job: _Job, stack: list[tuple[Node, Ctx]]) -> None:
        data = job.data
        keyword = ""
        words: list[_Word] = []
        assignments: list[tuple[str, str]] = []
        parts: list[Node] = []  # to search for $( ), in order
        for child in node.children:
            if not child.is_named:
                if not keyword:
                    keyword = _dec(data[child.start_byte : child.end_byte])
                continue
            if child.type == "comment":
                continue
            words.append(_word([child], data))
            if child.type == "variable_assignment":
                assignments.append(_assignment(child, data))
                parts.extend(child.named_children[1:])
            else:
                parts.append(child)
        stack.extend((part, _NO_CTX) for part in reversed(parts) if part.child_count)
        kw = _Word(keyword, "L" * len(keyword), node.start_byte, node.start_byte + len(keyword))
        cmd = _Cmd(
            words=[kw, *words],
            assignments=assignments,
            redirects=list(ctx[3]),
            wrappers=job.wrappers,
            job=job,
            nspan=(node.start_byte, node.end_byte),
            pid=ctx[0],
            pos=ctx[1],
            background=ctx[2],
            depth=job.depth,
        )
        self.add(cmd)
        self.finish(cmd)

    # -- wrappers --------------------------------------------------------------------------

    def unwrap(self, first: _Cmd) -> None:
        todo = [first]
        limit = len(first.wrappers) + _WRAPPER_CHAIN_FACTOR * self.max_depth
        while todo:
            cmd = todo.pop()
            if len(cmd.wrappers) >= limit:
                span = self.real_span(cmd.job, cmd.nspan)
                self.finding(
                    PARSE_TOO_DEEP,
                    f"More than {limit - len(first.wrappers)} wrappers (sudo, env, ...) are "
                    "chained; the innermost commands were not analysed.",
                    span,
                    self.real_text(span),
                )
                self.finish(cmd)
                continue
            inner = self.unwrap_one(cmd)
            self.finish(cmd)
            for child in inner:
                self.add(child)
                todo.append(child)

    def wrapper_for(self, cmd: _Cmd) -> tuple[_Wrapper, int] | None:
        if not cmd.words or cmd.dynamic:
            return None
        specs = _WRAPPERS.get(cmd.name)
        if not specs:
            return None
        for spec in specs:
            if spec.subcommand is None:
                return spec, 1
            i = 1
            words = cmd.words
            while i < len(words):
                value = words[i].value
                if value.startswith("-") and len(value) > 1:
                    if value in spec.prefix_options_with_value:
                        i += 1
                    i += 1
                    continue
                if value == spec.subcommand:
                    return spec, i + 1
                break
        return None

    def unwrap_one(self, cmd: _Cmd) -> list[_Cmd]:
        found = self.wrapper_for(cmd)
        if found is None:
            self.note_interpreter(cmd)
            return []
        spec, start = found
        if spec.kind == "shell":
            self.shell(cmd, spec, start)
            return []
        if spec.kind == "eval":
            self.eval(cmd)
            return []
        if spec.kind == "trap":
            self.trap(cmd)
            return []
        if spec.kind == "find":
            return self.find(cmd)
        return self.argv_wrapper(cmd, spec, start)

    def inner(
        self,
        cmd: _Cmd,
        words: list[_Word],
        label: str,
        extra_assignments: Sequence[tuple[str, str]] = (),
        background: bool = False,
        dynamic_args: bool = False,
    ) -> _Cmd:
        return _Cmd(
            words=words,
            assignments=[*cmd.assignments, *extra_assignments],
            redirects=list(cmd.redirects),
            wrappers=(*cmd.wrappers, label),
            job=cmd.job,
            nspan=(words[0].start, words[-1].end),
            pid=cmd.pid,
            pos=cmd.pos,
            background=cmd.background or background,
            depth=cmd.depth,
            dynamic_args_extra=cmd.dynamic_args_extra or dynamic_args,
        )

    def argv_wrapper(self, cmd: _Cmd, spec: _Wrapper, start: int) -> list[_Cmd]:
        words = cmd.words
        n = len(words)
        i = start
        skip = spec.skip_positionals
        ended = False
        seen: set[str] = set()
        assignments: list[tuple[str, str]] = []
        strings: list[tuple[str, _Word, str]] = []
        inner_start: int | None = None
        if spec.compound_start is not None and i < n:
            if words[i].value == spec.compound_start:
                i += 1
            elif spec.compound_name and i + 1 < n and words[i + 1].value == spec.compound_start:
                i += 2
        while i < n:
            value = words[i].value
            is_option = not ended and len(value) > 1 and value[0] == "-" and not words[i].dynamic
            if is_option and value == "--":
                ended = True
                i += 1
                if spec.command_after == "--":
                    inner_start = i
                    break
                continue
            if is_option:
                if value.startswith("--"):
                    opt, eq, attached = value.partition("=")
                    seen.add(opt)
                    takes = opt in spec.options_with_value or opt in spec.string_options
                    if takes and not eq and i + 1 < n:
                        if opt in spec.string_options:
                            strings.append((opt, words[i + 1], words[i + 1].value))
                        i += 1
                    elif opt in spec.string_options and eq:
                        strings.append((opt, words[i], attached))
                    i += 1
                    continue
                for j in range(1, len(value)):
                    opt = "-" + value[j]
                    seen.add(opt)
                    if opt in spec.options_with_value or opt in spec.string_options:
                        attached_value = value[j + 1 :]
                        if attached_value:
                            if opt in spec.string_options:
                                strings.append((opt, words[i], attached_value))
                        elif i + 1 < n:
                            if opt in spec.string_options:
                                strings.append((opt, words[i + 1], words[i + 1].value))
                            i += 1
                        break
                i += 1
                continue
            if spec.assignments and not ended and _ASSIGNMENT_RE.match(value):
                name, _, val = value.partition("=")
                assignments.append((name, val))
                i += 1
                continue
            runs_argv = spec.argv and (not spec.argv_only_with or seen & spec.argv_only_with)
            if skip > 0 or not runs_argv:  # a wrapper's own positional (su USER)
                skip -= 1
                i += 1
                continue
            inner_start = i
            break
        cmd.own_end = inner_start if inner_start is not None else n
        if seen & spec.no_command_options:
            return []
        for opt, word, text in strings:
            cmd.is_wrapper = True
            label = f"{cmd.name} {opt}"
            if word.dynamic:
                self.dynamic_string(cmd, word, label)
            self.decode_checks.append((cmd, word, label))
            self.queue(cmd, text, (word.start, word.end), label, label)
        if inner_start is None or inner_start >= n:
            return []
        cmd.is_wrapper = True
        rest = words[inner_start:]
        if spec.join_rest and not (seen & spec.argv_options):
            text = " ".join(w.value for w in rest)
            span = (rest[0].start, rest[-1].end)
            if any(w.dynamic for w in rest):
                self.finding(
                    DYNAMIC_SHELL_STRING,
                    f"`{spec.label}` runs a command line built at run time, so what it runs "
                    "cannot be known before it runs.",
                    self.real_span(cmd.job, span),
                    self.real_text(self.real_span(cmd.job, span)),
                )
            self.queue(cmd, text, span, spec.label, spec.label)
            return []
        return [
            self.inner(
                cmd,
                list(rest),
                spec.label,
                assignments,
                background=spec.background,
                dynamic_args=spec.dynamic_args,
            )
        ]

    def find(self, cmd: _Cmd) -> list[_Cmd]:
        out: list[_Cmd] = []
        words = cmd.words
        excluded: list[tuple[int, int]] = []
        i = 1
        while i < len(words):
            opt = words[i].value
            if opt in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < len(words) and words[j].value not in (";", "+"):
                    j += 1
                if j > i + 1:
                    out.append(
                        self.inner(cmd, list(words[i + 1 : j]), f"find {opt}", dynamic_args=True)
                    )
                excluded.append((i + 1, j + 1))
                i = j + 1
                continue
            i += 1
        cmd.excluded = tuple(excluded)
        return out

    def dynamic_string(self, cmd: _Cmd, word: _Word, label: str) -> None:
        span = self.real_span(cmd.job, (word.start, word.end))
        self.finding(
            DYNAMIC_SHELL_STRING,
            f"`{label}` runs a string built at run time ({_short(word.value)}), so what it "
            "runs cannot be known before it runs.",
            span,
            self.real_text(span),
        )

    def shell(self, cmd: _Cmd, spec: _Wrapper, start: int) -> None:
        words = cmd.words
        i = start
        c_mode = s_mode = False
        while i < len(words):
            value = words[i].value
            if value in ("--", "-"):
                i += 1
                break
            if len(value) < 2 or value[0] not in "-+" or words[i].dynamic:
                break
            if value.startswith("--"):
                if value in spec.options_with_value:
                    i += 1
                i += 1
                continue
            letters = value[1:]
            c_mode = c_mode or "c" in letters
            s_mode = s_mode or "s" in letters
            if letters[-1:] in ("o", "O") and i + 1 < len(words):
                i += 1
            i += 1
        cmd.own_end = len(words)
        positional = words[i] if i < len(words) else None
        if c_mode:
            if positional is None:
                return
            cmd.is_wrapper = True
            label = f"{cmd.name} -c"
            if positional.dynamic:
                self.dynamic_string(cmd, positional, label)
            self.decode_checks.append((cmd, positional, label))
            self.queue(cmd, positional.value, (positional.start, positional.end), label, label)
            return
        if positional is not None and not s_mode and positional.value not in ("-", "/dev/stdin"):
            self.decode_checks.append((cmd, positional, cmd.name))  # bash <(curl ...)
            return
        cmd.reads_stdin = True
        self.feed_from_redirects(cmd)

    def feed_from_redirects(self, cmd: _Cmd) -> None:
        """A shell reading its script from a here-document or here-string: parse it."""
        for red in cmd.redirects:
            if red.heredoc:
                cmd.is_wrapper = True
                if red.body_dynamic:
                    span = self.real_span(cmd.job, red.body_span)
                    self.finding(
                        DYNAMIC_SHELL_STRING,
                        f"`{cmd.name}` runs a here-document with expansions in it, so what it "
                        "runs cannot be known before it runs.",
                        span,
                        self.real_text(span),
                    )
                self.queue(cmd, red.body, red.body_span, cmd.name, "here-documents")
            elif red.op == "<<<" and red.word is not None:
                cmd.is_wrapper = True
                if red.word.dynamic:
                    self.dynamic_string(cmd, red.word, cmd.name)
                self.decode_checks.append((cmd, red.word, cmd.name))
                self.queue(cmd, red.word.value, (red.word.start, red.word.end), cmd.name, "<<<")
            elif red.op == "<" and red.word is not None and red.word.procsub:
                self.decode_checks.append((cmd, red.word, cmd.name))

    def note_interpreter(self, cmd: _Cmd) -> None:
        """Interpreters and `source`: where their program comes from (for decode-to-shell)."""
        name = cmd.name
        if cmd.dynamic or not cmd.words:
            return
        if name in ("source", "."):
            if len(cmd.words) > 1:
                self.decode_checks.append((cmd, cmd.words[1], name))
            return
        interp = _interpreter(name)
        if interp is None:
            return
        words = cmd.words
        i = 1
        while i < len(words):
            value = words[i].value
            if value == "-" or len(value) < 2 or value[0] != "-":
                break
            opt = value.split("=", 1)[0]
            if opt in interp.code_options or value[:2] in interp.code_options:
                code = words[i + 1] if value == opt and i + 1 < len(words) else words[i]
                self.decode_checks.append((cmd, code, name))
                return
            if opt in interp.stdin_off or value[:2] in interp.stdin_off:
                return
            i += 1
        if i < len(words) and words[i].value not in ("-", "/dev/stdin"):
            self.decode_checks.append((cmd, words[i], name))
            return
        cmd.reads_stdin = True
        for red in cmd.redirects:
            if red.word is not None and (red.op == "<<<" or (red.op == "<" and red.word.procsub)):
                self.decode_checks.append((cmd, red.word, name))

    def eval(self, cmd: _Cmd) -> None:
        cmd.own_end = len(cmd.words)
        args = cmd.words[1:]
        if not args:
            return
        cmd.is_wrapper = True
        span = (args[0].start, args[-1].end)
        text = " ".join(w.value for w in args)
        if any(w.dynamic or w.procsub for w in args):
            real = self.real_span(cmd.job, span)
            self.finding(
                DYNAMIC_EVAL,
                f"eval runs a string built at run time ({_short(text)}), so what it runs "
                "cannot be known before it runs.",
                real,
                self.real_text(real),
            )
        for w in args:
            self.decode_checks.append((cmd, w, "eval"))
        self.queue(cmd, text, span, "eval", "eval")

    def trap(self, cmd: _Cmd) -> None:
        cmd.own_end = len(cmd.words)
        args = cmd.words[1:]
        if len(args) < 2 or args[0].value.startswith("-") or not args[0].value.strip():
            return
        action = args[0]
        if action.dynamic:
            self.dynamic_string(cmd, action, "trap")
        self.decode_checks.append((cmd, action, "trap"))
        self.queue(cmd, action.value, (action.start, action.end), "trap", "trap")

    def finish(self, cmd: _Cmd) -> None:
        """Flags and positionals of the command's own arguments; dynamic name finding."""
        spec = _lookup(cmd.name) if cmd.words else None
        style = spec.flag_style if spec else "default"
        with_value = spec.options_with_value if spec else frozenset()
        flags, positionals = _split_flags(cmd.own_args(), style, with_value)
        cmd.flags = tuple(flags)
        cmd.positionals = tuple(positionals)
        cmd.dynamic_args = cmd.dynamic_args_extra or any(
            w.dynamic or w.brace for w in cmd.words[1:]
        )
        if cmd.dynamic:
            span = self.real_span(cmd.job, cmd.nspan)
            self.finding(
                DYNAMIC_COMMAND_NAME,
                f"The name of the command to run ({_short(cmd.argv0)}) is computed at run "
                "time, so what it runs cannot be known before it runs.",
                span,
                self.real_text(span),
            )
            self.decode_checks.append((cmd, cmd.words[0], "the command name"))

    # -- after each job: decode-to-shell and literal feeds into shells ----------------------

    def after_job(self, job: _Job, first_pipe: int, first_check: int, first_cmd: int) -> None:
        job_cmds = [c for c in self.commands[first_cmd:] if c.job is job]
        for cmd, word, label in self.decode_checks[first_check:]:
            if cmd.job is not job:
                continue
            for other in job_cmds:
                if (
                    other is not cmd
                    and word.start <= other.nspan[0]
                    and other.nspan[1] <= word.end
                    and (self.is_decoder(other) or other.name in _COMMANDS.downloaders)
                ):
                    span = self.real_span(job, cmd.nspan)
                    self.finding(
                        DECODE_TO_SHELL,
                        f"`{label}` runs code produced by `{other.name}` "
                        f"({_short(word.value)}): downloaded or decoded code is hidden from "
                        "review.",
                        span,
                        self.real_text(span),
                    )
                    break
        for pid in range(first_pipe, len(self.pipes)):
            members = sorted(self.pipes[pid], key=lambda c: c.pos)
            for cmd in members:
                if not cmd.reads_stdin:
                    continue
                decoder = next((m for m in members if m.pos < cmd.pos and self.is_decoder(m)), None)
                if decoder is not None:
                    starts = [m.nspan[0] for m in members]
                    ends = [m.nspan[1] for m in members]
                    span = self.real_span(job, (min(starts), max(ends)))
                    self.finding(
                        DECODE_TO_SHELL,
                        f"`{cmd.name}` runs what `{decoder.name}` decodes: the code that runs "
                        "is hidden from review.",
                        span,
                        self.real_text(span),
                    )
                if cmd.name in _COMMANDS.shells:
                    self.literal_feed(cmd, [m for m in members if m.pos == cmd.pos - 1])

    def is_decoder(self, cmd: _Cmd) -> bool:
        cond = _COMMANDS.decoders.get(cmd.name)
        return cond is not None and cond.holds(cmd.flags, cmd.positionals, cmd.args)

    def literal_feed(self, shell: _Cmd, feeders: Sequence[_Cmd]) -> None:
        """``echo 'rm -rf /' | sh``, ``cat <<EOF | sh``: parse what the shell will read."""
        feeder = next((f for f in reversed(feeders) if not f.is_wrapper), None)
        if feeder is None:
            return
        text: str | None = None
        dynamic = False
        span = feeder.nspan
        args = feeder.words[1:]
        if feeder.name == "echo":
            interpret = False
            while args and re.fullmatch(r"-[neE]+", args[0].value):
                interpret = interpret or "e" in args[0].value
                args = args[1:]
            text = " ".join(w.value for w in args)
            text = _ansi_c(text) if interpret else text
            dynamic = any(w.dynamic for w in args)
        elif feeder.name == "printf" and args:
            fmt = args[0].value
            if "%" not in fmt:
                text, dynamic = _ansi_c(fmt), args[0].dynamic
            elif fmt in ("%s", "%s\\n", "%b", "%b\\n") and len(args) > 1:
                text = " ".join(w.value for w in args[1:])
                text = _ansi_c(text) if fmt.startswith("%b") else text
                dynamic = any(w.dynamic for w in args[1:])
        elif feeder.name == "cat" and not feeder.positionals:
            for red in feeder.redirects:
                if red.heredoc:
                    text, dynamic, span = red.body, red.body_dynamic, red.body_span
                elif red.op == "<<<" and red.word is not None:
                    text, dynamic = red.word.value, red.word.dynamic
                    span = (red.word.start, red.word.end)
        if text is None:
            return
        shell.is_wrapper = True
        if dynamic:
            real = self.real_span(shell.job, span)
            self.finding(
                DYNAMIC_SHELL_STRING,
                f"`{shell.name}` reads a script built at run time from `{feeder.name}`, so "
                "what it runs cannot be known before it runs.",
                real,
                self.real_text(real),
            )
        self.queue(shell, text, span, shell.name, "piped scripts")

    # -- results ---------------------------------------------------------------------------

    def result(self) -> Analysis:
        index = {id(c): i for i, c in enumerate(self.commands)}
        pipelines: list[tuple[int, ...]] = []
        pipe_index: dict[int, int] = {}
        for pid, members in enumerate(self.pipes):
            if len(members) < 2:
                continue
            ordered = sorted(members, key=lambda c: (c.pos, index[id(c)]))
            pipe_index[pid] = len(pipelines)
            pipelines.append(tuple(index[id(c)] for c in ordered))
        commands: list[SimpleCommand] = []
        lines: list[str] = []
        read_only = not any(f.rule_id != PARSE_INTERNAL_ERROR for f in self.findings)
        action, risk, scope = ActionClass.READ, RiskTier.SAFE, Scope.WORKSPACE
        for cmd in self.commands:
            span = self.real_span(cmd.job, cmd.nspan)
            classification, cmd_read_only = _classify(cmd)
            read_only = read_only and cmd_read_only
            action = max(action, classification.action)
            risk = max(risk, classification.risk)
            scope = max(scope, classification.scope)
            commands.append(
                SimpleCommand(
                    argv0=cmd.argv0,
                    name=cmd.name,
                    args=tuple(cmd.args),
                    flags=cmd.flags,
                    positionals=cmd.positionals,
                    redirects=tuple(
                        Redirect(op=r.op, fd=r.fd, target=r.target, dynamic=r.dynamic, body=r.body)
                        for r in cmd.redirects
                    ),
                    assignments=tuple(cmd.assignments),
                    wrappers=cmd.wrappers,
                    text=_dec(cmd.job.data[cmd.nspan[0] : cmd.nspan[1]]),
                    span=span,
                    depth=cmd.depth,
                    dynamic=cmd.dynamic,
                    dynamic_args=cmd.dynamic_args,
                    background=cmd.background,
                    pipeline=pipe_index.get(cmd.pid, -1),
                    pipeline_position=cmd.pos if cmd.pid in pipe_index else 0,
                    classification=classification,
                )
            )
            if not cmd.is_wrapper and cmd.words:
                lines.append(" ".join(w.value for w in cmd.words))
        return Analysis(
            source=self.source,
            commands=tuple(commands),
            pipelines=tuple(pipelines),
            findings=tuple(self.findings),
            classification=Classification(action, risk, scope),
            read_only=read_only,
            normalized="\n".join(lines),
        )


def _statement_body(node: Node) -> Node | None:
    """The body of a redirected_statement: its first named child that is not a redirect."""
    for child in node.children:
        if child.is_named and child.type not in _REDIRECT_TYPES and child.type != "comment":
            return child
    return None


def _last_pipeline_element(pipeline: Node) -> Node:
    node = pipeline
    for _ in range(1_000_000):  # bounded by the tree's depth
        kids = [c for c in node.children if c.is_named and c.type != "comment"]
        if not kids:
            return node
        last = kids[-1]
        if last.type == "redirected_statement":
            body = _statement_body(last)
            if body is not None and body.type == "pipeline":
                node = body
                continue
        if last.type != "pipeline":
            return last
        node = last
    return node  # pragma: no cover


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"`{text}`" if len(text) <= limit else f"`{text[: limit - 3]}...`"


# ---------------------------------------------------------------------------------------------
# Classification


def _subcommand(spec: _Spec, args: Sequence[str]) -> tuple[_Spec, list[str], bool]:
    """The subcommand entry, the arguments after the subcommand word, whether one matched."""
    if not spec.subcommands:
        return spec, list(args), False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("-") and len(arg) > 1:
            if arg in spec.global_options_with_value:
                i += 1
            i += 1
            continue
        break
    if i < len(args) and args[i] in spec.subcommands:
        sub, rest, _ = _subcommand(spec.subcommands[args[i]], args[i + 1 :])
        return sub, rest, True
    return spec, list(args), False


@functools.lru_cache(maxsize=8192)
def _path_info(value: str) -> tuple[Scope | None, bool]:
    """The scope a word reaches if it is a path (None if not), and whether it is sensitive."""
    if value.startswith(("$HOME", "${HOME}")):
        value = "~" + value[5 if value.startswith("$HOME") else 7 :]
    sensitive = _COMMANDS.sensitive_paths.match(value) is not None
    return _path_scope(value), sensitive


def _path_scope(value: str) -> Scope | None:
    if _URL_RE.match(value):
        return Scope.NETWORK
    if not value or not (value[0] in "/~." or "/" in value):
        return None
    if value[0] == "~":
        return Scope.USER_HOME
    if value[0] != "/":
        return Scope.WORKSPACE
    if _COMMANDS.workspace_paths.match(value):
        return Scope.WORKSPACE
    if _COMMANDS.home_paths.match(value):
        return Scope.USER_HOME
    return Scope.SYSTEM


def _path_candidates(args: Iterable[str]) -> Iterable[str]:
    for arg in args:
        yield arg
        if "=" in arg:
            yield arg.split("=", 1)[1]


@functools.lru_cache(maxsize=256)
def _classification(action: ActionClass, risk: RiskTier, scope: Scope) -> Classification:
    return Classification(action, risk, scope)


def _classify(cmd: _Cmd) -> tuple[Classification, bool]:
    """The command's classification, and whether it is read-only on its own."""
    base = _lookup(cmd.name) if cmd.words and not cmd.dynamic else None
    if not cmd.words:
        spec = None
        action, risk, scope = ActionClass.READ, RiskTier.SAFE, Scope.WORKSPACE
    else:
        top = base or _COMMANDS.default
        own = cmd.own_args()
        spec, sub_args, matched = _subcommand(top, own)
        action, risk, scope = spec.action, spec.risk, spec.scope
        unsafe = False
        if matched:
            flags, positionals = _split_flags(sub_args, spec.flag_style, spec.options_with_value)
            prefix = own[: len(own) - len(sub_args)]  # global options and subcommand words
            global_flags, _ = _split_flags(prefix, top.flag_style, top.options_with_value)
            unsafe = bool(top.unsafe_flags.intersection(global_flags))
        else:
            flags, positionals = list(cmd.flags), list(cmd.positionals)
        unsafe = unsafe or bool(spec.unsafe_flags.intersection(flags))
        for cond in spec.when:
            if cond.holds(flags, positionals, sub_args):
                action = max(action, cond.action or action)
                risk = max(risk, cond.risk or risk)
                scope = max(scope, cond.scope or scope)
        if cmd.dynamic:
            action = max(action, ActionClass.EXECUTE)
        for value in _path_candidates(own) if spec.paths else ():
            found, sensitive = _path_info(value)
            if found is not None:
                scope = max(scope, found)
            if sensitive:
                risk = RiskTier.SENSITIVE
    writes_ok = True
    for red in cmd.redirects:
        target = red.target
        if red.writes and (red.dynamic or target not in _COMMANDS.null_targets):
            writes_ok = False
            action = max(action, ActionClass.WRITE)
            if red.op in _TRUNCATE_OPS:
                risk = max(risk, RiskTier.DESTRUCTIVE)
        if target:
            found, sensitive = _path_info(target)
            if found is not None and red.writes:
                scope = max(scope, found)
            if sensitive:
                risk = RiskTier.SENSITIVE
    classification = _classification(action, risk, scope)
    if spec is None:  # no command name: only redirects and assignments
        safe = all(_COMMANDS.read_only_assignments.match(name) for name, _ in cmd.assignments)
        return classification, writes_ok and safe
    dynamic_args = cmd.dynamic_args
    own_args = cmd.own_args()
    if spec.read_only_args and own_args and spec.read_only_args.issuperset(own_args):
        return classification, writes_ok and not cmd.dynamic and not cmd.assignments
    read_only = (
        spec.read_only
        and writes_ok
        and not cmd.dynamic
        and not unsafe
        and (spec.max_positionals is None or len(positionals) <= spec.max_positionals)
        and (
            spec.positionals_allowed is None
            or all(spec.positionals_allowed.match(p) for p in positionals)
        )
        and (spec.dynamic_ok or not dynamic_args)
        and all(_COMMANDS.read_only_assignments.match(name) for name, _ in cmd.assignments)
    )
    return classification, read_only


# ---------------------------------------------------------------------------------------------
# The entry point


def analyze(
    command: str,
    *,
    max_depth: int = 8,
    max_bytes: int = 1 << 20,
    max_commands: int = 10_000,
    max_parse_seconds: float = 1.0,
) -> Analysis:
    """Parse a bash command line into the command model. Never raises.

    ``max_depth`` bounds re-parsing (``bash -c`` in ``bash -c`` ...), ``max_bytes`` the
    size of the line and of everything re-parsed from it, ``max_commands`` the number of
    simple commands extracted; every tree-sitter parse (the line's, and those of the strings
    re-parsed from it) must end within ``max_parse_seconds`` of the start of the analysis.
    Exceeding one adds a ``parse.too-deep`` or ``parse.too-large`` finding and the analysis
    keeps what it found so far.
    """
    if isinstance(command, bytes | bytearray):  # tolerated: typed str, but never raise
        command = bytes(command).decode("utf-8", "surrogateescape")
    elif not isinstance(command, str):
        command = str(command)
    if len(command) > max_bytes:
        return _too_large(command, len(command.encode("utf-8", "surrogatepass")), max_bytes)
    data = _encode(command)
    if len(data) > max_bytes:
        return _too_large(command, len(data), max_bytes)
    analyzer = _Analyzer(command, data, max_depth, max_bytes, max_commands, max_parse_seconds)
    try:
        try:
            analyzer.run()
        except _Limit:
            analyzer.finding(
                PARSE_TOO_LARGE,
                f"The command line holds more than {max_commands} commands; the rest were "
                "not analysed.",
                (0, len(data)),
                "",
            )
        return analyzer.result()
    except (Exception, RecursionError) as exc:  # a bug: fail closed, never crash the daemon
        return Analysis(
            source=command,
            commands=(),
            pipelines=(),
            findings=(
                Finding(
                    rule_id=PARSE_INTERNAL_ERROR,
                    verdict=_RULES[PARSE_INTERNAL_ERROR][0],
                    severity=_RULES[PARSE_INTERNAL_ERROR][1],
                    message=f"The static analysis failed ({type(exc).__name__}); the command "
                    "was not analysed.",
                    source=FindingSource.STATIC,
                    span=(0, len(data)),
                ),
            ),
            classification=Classification(),
            read_only=False,
            normalized="",
        )


def _too_large(command: str, size: int, limit: int) -> Analysis:
    finding = Finding(
        rule_id=PARSE_TOO_LARGE,
        verdict=_RULES[PARSE_TOO_LARGE][0],
        severity=_RULES[PARSE_TOO_LARGE][1],
        message=f"The command is {size} bytes, more than the {limit}-byte limit for static "
        "analysis; it was not analysed.",
        source=FindingSource.STATIC,
        span=(0, size),
    )
    return Analysis(
        source=command,
        commands=(),
        pipelines=(),
        findings=(finding,),
        classification=Classification(),
        read_only=False,
        normalized="",
    )
