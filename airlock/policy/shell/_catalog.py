"""The command catalog: what commands do, and which of them run other commands.

Read once, at import, from ``airlock/policy/data/commands.yaml`` (per command: action, risk,
scope, read-only conditions, flag syntax, subcommands; the shells, interpreters, downloaders and
decoders; the path classes) and ``airlock/policy/data/wrappers.yaml`` (sudo, env, xargs, ssh,
``bash -c``, ``find -exec``, ...). A :class:`Catalog` answers look-ups by command name:
:data:`BUILTIN` (the data files), or a policy bundle's (its ``commands:`` entries merged over
it, :meth:`Catalog.extended`); :func:`_interpreter` and everything else read
:data:`_COMMANDS` and :data:`_WRAPPERS`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import yaml

from airlock.policy.model import ActionClass, RiskTier, Scope

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
    posix_options: bool = False
    optional_value: frozenset[str] = frozenset()  # short options whose value is attached only

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
    "posix_options",
    "options_with_optional_value",
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
        posix_options=bool(raw.get("posix_options", parent.posix_options)),
        optional_value=parent.optional_value
        | frozenset(_strs(raw.get("options_with_optional_value"), where)),
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
            posix_options=spec.posix_options,
            optional_value=spec.optional_value,
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


def _load_commands() -> tuple[_CommandData, dict[str, Any]]:
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
    raw_commands: dict[str, Any] = {str(k): v for k, v in (raw.get("commands") or {}).items()}
    for key, value in raw_commands.items():
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
    data = _CommandData(
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
    return data, raw_commands


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


_COMMANDS, _RAW_COMMANDS = _load_commands()
_WRAPPERS: Final = _load_wrappers()

# Keys whose lists a bundle's entry adds to the built-in entry's (the others replace).
_LIST_KEYS: Final = frozenset(
    {
        "options_with_value",
        "global_options_with_value",
        "options_with_optional_value",
        "unsafe_flags",
        "read_only_args",
        "when",
    }
)


def _merge(base: Any, over: Any) -> dict[str, Any]:
    """A bundle's entry merged over a built-in one: scalars replace, the lists of
    :data:`_LIST_KEYS` are extended, subcommands are merged one by one."""
    merged: dict[str, Any] = dict(base) if isinstance(base, dict) else {}
    if not isinstance(over, dict):
        return merged if over is None else over  # not a mapping: _spec reports it
    for key, value in over.items():
        if key == "subcommands" and isinstance(value, dict):
            subs = dict(merged.get("subcommands") or {})
            for name, entry in value.items():
                subs[str(name)] = _merge(subs.get(str(name)), entry)
            merged[key] = subs
        elif key in _LIST_KEYS and isinstance(value, list):
            merged[key] = [*(merged.get(key) or ()), *value]
        else:
            merged[key] = value
    return merged


class Catalog:
    """The command catalog an analysis reads: the built-in one (:data:`BUILTIN`) or a
    policy bundle's (the built-in one with the bundle's ``commands:`` entries merged over it,
    :meth:`extended`). Immutable; its look-ups are cached per catalog (bounded)."""

    __slots__ = ("_data", "entries", "lookup")

    def __init__(self, data: _CommandData, entries: tuple[str, ...] = ()) -> None:
        self._data = data
        self.entries = entries  # the command keys a bundle declared (none for the built-in)
        self.lookup: Callable[[str], _Spec | None] = functools.lru_cache(maxsize=4096)(self._lookup)

    def _lookup(self, name: str) -> _Spec | None:
        spec = self._data.exact.get(name)
        if spec is not None:
            return spec
        for pattern, candidate in self._data.globs:
            if fnmatch.fnmatchcase(name, pattern):
                return candidate
        return None

    def extended(self, entries: Mapping[str, Any], where: str = "commands") -> Catalog:
        """This catalog with ``entries`` (keys as in commands.yaml's ``commands``) merged
        over it. Raises ValueError naming the entry (``where.KEY...``) that is wrong."""
        if not entries:
            return self
        exact = dict(self._data.exact)
        globs = list(self._data.globs)
        for key, value in entries.items():
            key = str(key)
            spec = _spec(f"{where}.{key}", _merge(_RAW_COMMANDS.get(key), value), _COMMANDS.default)
            if any(c in key for c in "*?["):
                globs = [(key, spec), *((k, s) for k, s in globs if k != key)]
            else:
                exact[key] = spec
        data = dataclasses.replace(self._data, exact=exact, globs=tuple(globs))
        return Catalog(data, (*self.entries, *(str(k) for k in entries)))


BUILTIN: Final = Catalog(_COMMANDS)
_lookup: Final = BUILTIN.lookup


@functools.lru_cache(maxsize=1024)
def _interpreter(name: str) -> _Interp | None:
    for pattern, interp in _COMMANDS.interpreters:
        if fnmatch.fnmatchcase(name, pattern):
            return interp
    return None
