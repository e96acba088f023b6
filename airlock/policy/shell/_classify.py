"""Classification: the action, risk and scope of one command, and whether it is read-only.

From the catalog's entry for the command (and its subcommand), its flags and positionals,
the paths among its arguments and where its redirects write.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Final

from airlock.policy.model import ActionClass, Classification, RiskTier, Scope
from airlock.policy.shell._catalog import _COMMANDS, Catalog, _Spec
from airlock.policy.shell._draft import _Cmd, _Parsed, _split_options, _takes_next

_TRUNCATE_OPS: Final = frozenset({">", ">|", "&>"})
_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|[^/\s:@]+@[^/\s:]+:")


def _parse(top: _Spec, args: Sequence[str]) -> _Parsed:
    """``args`` read with ``top``: the options before each subcommand word (global options
    and the level's options, with their values), the subcommand words, then the options,
    option values and positionals after the last one."""
    flags: list[str] = []
    positionals: list[str] = []
    values: list[tuple[str, str]] = []
    global_flags: list[str] = []
    spec, start, matched = top, 0, False
    while spec.subcommands:
        with_value = spec.global_options_with_value | spec.options_with_value
        i = start
        while i < len(args):
            arg = args[i]
            if arg == "--" or len(arg) < 2 or arg[0] != "-":
                break
            i += 2 if _takes_next(arg, spec.flag_style, with_value) else 1
        if i >= len(args) or args[i] not in spec.subcommands:
            break
        f, p, v = _split_options(
            args[start:i], spec.flag_style, with_value, spec.posix_options, spec.optional_value
        )
        flags += f
        positionals += p
        values += v
        if not matched:
            global_flags = f
        positionals.append(args[i])
        spec, start, matched = spec.subcommands[args[i]], i + 1, True
    rest = args[start:]
    f, p, v = _split_options(
        rest, spec.flag_style, spec.options_with_value, spec.posix_options, spec.optional_value
    )
    flags += f
    positionals += p
    values += v
    if not matched:
        f, p, rest = flags, positionals, args
    return _Parsed(
        spec=spec,
        matched=matched,
        flags=tuple(flags),
        positionals=tuple(positionals),
        option_values=tuple(values),
        global_flags=tuple(global_flags),
        sub_flags=tuple(f),
        sub_positionals=tuple(p),
        sub_args=tuple(rest),
    )


# Only short words are cached: the cache outlives the analysis, and 8,192 long words (each
# level of a nested `$( )` is one) would keep hundreds of megabytes alive after it.
_CACHED_PATH_MAX: Final = 512


def _path_info(value: str) -> tuple[Scope | None, bool]:
    """The scope a word reaches if it is a path (None if not), and whether it is sensitive."""
    if len(value) <= _CACHED_PATH_MAX:
        return _cached_path_info(value)
    return _uncached_path_info(value)


def _uncached_path_info(value: str) -> tuple[Scope | None, bool]:
    if value.startswith(("$HOME", "${HOME}")):
        value = "~" + value[5 if value.startswith("$HOME") else 7 :]
    sensitive = _COMMANDS.sensitive_paths.match(value) is not None
    return _path_scope(value), sensitive


_cached_path_info: Final = functools.lru_cache(maxsize=8192)(_uncached_path_info)


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


def _classify(cmd: _Cmd, catalog: Catalog) -> tuple[Classification, bool]:
    """The command's classification, and whether it is read-only on its own."""
    base = catalog.lookup(cmd.name) if cmd.words and not cmd.dynamic else None
    if not cmd.words:
        spec = None
        action, risk, scope = ActionClass.READ, RiskTier.SAFE, Scope.WORKSPACE
    else:
        top = base or _COMMANDS.default
        own = cmd.own_args()
        parsed = cmd.parsed if cmd.parsed is not None else _parse(top, own)
        spec = parsed.spec
        flags, positionals = parsed.sub_flags, parsed.sub_positionals
        sub_args = parsed.sub_args
        action, risk, scope = spec.action, spec.risk, spec.scope
        unsafe = parsed.matched and bool(top.unsafe_flags.intersection(parsed.global_flags))
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
