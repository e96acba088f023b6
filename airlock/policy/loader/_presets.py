"""Named presets (``egress_presets``, ``writable_presets``): defined once per bundle, by any
file, and granting nothing until a file switches them on. One reader for every kind."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from airlock.policy.loader._problems import _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath

_P = TypeVar("_P")


def where(problems: _Problems, path: JsonPath) -> str:
    """FILE:LINE of ``path``, as problems and presets name a definition."""
    file, line, _column = problems.where(path)
    return f"{os.path.basename(file)}:{line}"


def read_presets(
    docs: Sequence[_Doc],
    key: str,
    kind: str,
    problems: _Problems,
    build: Callable[[str, dict[str, Any], JsonPath, str], _P],
) -> dict[str, _P]:
    """Every file's ``key`` mapping, by name: ``build(name, raw, path, where)`` makes each; a
    name defined twice is reported at its second definition (``kind``: "egress", ...)."""
    presets: dict[str, _P] = {}
    defined_at: dict[str, str] = {}
    for doc in docs:
        for name, raw in doc.value.get(key, {}).items():
            path: JsonPath = (doc.file, key, name)
            if name in presets:
                problems.add(
                    path,
                    f"{kind} preset {name!r} is already defined at {defined_at[name]}",
                    "preset names are shared by every file of the bundle; define it once",
                    key=True,
                )
                continue
            defined_at[name] = where(problems, path)
            presets[name] = build(name, raw, path, defined_at[name])
    return presets
