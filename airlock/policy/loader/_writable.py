"""Filesystem grants: the bundle's ``writable_paths`` and ``writable_presets`` keys become the
directories below the caller's home that Execute binds read-write besides its working
directory (package caches), and whose changes in a dry run are in the ``granted`` scope of
effect rules instead of ``home``.

Every file may add paths and switch presets on; the bundle uses the union. Presets are
defined once in the bundle and grant nothing until ``writable_paths.presets`` names them.
A path is ``~/`` and at least one more component: no globs, no ``.`` or ``..``, nothing
outside the home (a cache elsewhere is the operator's to bind, not a policy's to grant).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airlock.policy.loader._presets import read_presets
from airlock.policy.loader._problems import _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath

_GLOB = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class WritablePreset:
    name: str
    description: str
    paths: tuple[str, ...]
    where: str  # FILE:LINE of its definition


def writable_path_problem(path: str) -> tuple[str, str] | None:
    """(message, hint) when ``path`` cannot be a filesystem grant; None when it can."""
    hint = "write a directory below your home as ~/DIR (for example ~/.cache/pip)"
    if not path.startswith("~/"):
        return f"{path!r} is not below the home directory", hint
    parts = path[2:].rstrip("/").split("/")
    if not parts or parts == [""] or any(p in ("", ".", "..") for p in parts):
        return f"{path!r} is not a plain directory below the home directory", hint
    if _GLOB.search(path) or "\0" in path:
        return f"{path!r} has a glob character; a grant names one directory", hint
    return None


def _normal(path: str) -> str:
    return "~/" + path[2:].rstrip("/")


def _paths(raw: Sequence[str], path: JsonPath, problems: _Problems) -> list[str]:
    out: list[str] = []
    for i, value in enumerate(raw):
        problem = writable_path_problem(value)
        if problem:
            problems.add((*path, i), *problem)
        else:
            out.append(_normal(value))
    return out


def _presets(docs: Sequence[_Doc], problems: _Problems) -> dict[str, WritablePreset]:
    def build(name: str, raw: dict[str, Any], path: JsonPath, at: str) -> WritablePreset:
        paths = tuple(_paths(raw["paths"], (*path, "paths"), problems))
        return WritablePreset(name, raw["description"], paths, at)

    return read_presets(docs, "writable_presets", "writable", problems, build)


def compile_writable(
    docs: Sequence[_Doc], problems: _Problems
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(the granted paths, sorted, each ``~/...``; the presets the bundle defines as
    (name, description))."""
    presets = _presets(docs, problems)
    found: set[str] = set()
    for doc in docs:
        raw: dict[str, Any] = doc.value.get("writable_paths", {})
        path: JsonPath = (doc.file, "writable_paths")
        for i, name in enumerate(raw.get("presets", ())):
            preset = presets.get(name)
            if preset is None:
                defined = ", ".join(sorted(presets)) or "none"
                problems.add(
                    (*path, "presets", i),
                    f"unknown writable preset {name!r}",
                    f"defined presets: {defined} (the shipped ones are in the default "
                    "policy's filesystem.yaml: copy it into your policy directory)",
                )
                continue
            found.update(preset.paths)
        found.update(_paths(raw.get("paths", ()), (*path, "paths"), problems))
    return tuple(sorted(found)), tuple((p.name, p.description) for p in presets.values())
