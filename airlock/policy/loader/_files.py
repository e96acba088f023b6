"""The files of a policy: which ones, their bytes and text, and their YAML documents."""

from __future__ import annotations

import os
from collections.abc import Iterable

import yaml

from airlock.policy.loader._problems import PolicyProblem, _Problems
from airlock.policy.loader._yaml import _compose, _Doc, _yaml_error, _YamlProblem

MAX_FILE_BYTES = 1024 * 1024  # a policy file is small; this bounds parse time and memory
POLICY_SUFFIXES = (".yaml", ".yml")
FIXTURE_SUFFIXES = (".sh", ".txt")

StrPath = str | os.PathLike[str]


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


def _paths(path: StrPath | Iterable[StrPath]) -> list[StrPath]:
    if isinstance(path, str | os.PathLike):
        return [path]
    return list(path)


def _parse(file: str, text: str, problems: _Problems) -> _Doc | None:
    """The file's document, or None when its YAML is invalid (the problem is added)."""
    try:
        return _compose(text, file)
    except yaml.YAMLError as e:
        yp = _yaml_error(e, text)
    except _YamlProblem as e:
        yp = e
    problems.errors.append(PolicyProblem(file, yp.line, yp.column, yp.message, yp.hint))
    return None
