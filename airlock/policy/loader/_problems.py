"""Problems of a policy bundle, and where they are: ``file:line:column: message (hint)``.

:class:`_Problems` collects them while a bundle loads, turning the JSON path of a value into
its place in the file it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from airlock._errors import InvalidRequest
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath


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


def _order(p: PolicyProblem) -> tuple[str, int, int]:
    return (p.file, p.line, p.column)
