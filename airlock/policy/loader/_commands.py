"""The bundle's command catalog: ``commands:`` entries merged over the built-in catalog.

A policy file may declare command catalog entries (the keys of
``airlock/policy/data/commands.yaml``) for in-house tools, or extend the built-in ones
(``options_with_value`` of a wrapper script, a subcommand that deletes). The bundle's
catalog is the built-in one with every file's entries merged over it; the static analysis
of a line judged by the bundle reads it (:meth:`PolicyBundle.analyze`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airlock.policy.loader._problems import _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath

if TYPE_CHECKING:
    from airlock.policy.shell import Catalog


def compile_commands(docs: Sequence[_Doc], problems: _Problems) -> Catalog | None:
    """The bundle's catalog, or None when no file declares ``commands:`` (the built-in
    one applies). A command declared by two files, or an entry the catalog rejects, is a
    problem at its place."""
    entries: dict[str, Any] = {}
    where: dict[str, JsonPath] = {}
    for doc in docs:
        raw: dict[str, Any] = doc.value.get("commands") or {}
        for name, entry in raw.items():
            path: JsonPath = (doc.file, "commands", name)
            if name in where:
                file, line, column = problems.where(where[name], key=True)
                problems.add(
                    path,
                    f"command {name!r} is already declared at {file}:{line}:{column}",
                    "declare each command in one file of the bundle",
                    key=True,
                )
                continue
            where[name] = path
            entries[name] = entry
    if not entries:
        return None
    from airlock.policy.shell import BUILTIN  # the parser's package, imported when needed

    catalog = BUILTIN
    for name, entry in entries.items():
        try:
            catalog = catalog.extended({name: entry}, "commands")
        except (ValueError, KeyError, TypeError) as e:
            problems.add(
                where[name],
                f"invalid command entry: {e}",
                "use the keys of airlock/policy/data/commands.yaml (docs/policy-reference.md)",
                key=True,
            )
    return catalog
