"""Words: from tree-sitter-bash nodes to the text bash would pass, quotes removed.

Single, double, ANSI-C (``$'\\x72m'``) and translated (``$"..."``) quoting, backslash escapes
and line continuations (``\\rm``, ``r''m`` and ``r\\<newline>m`` are all ``rm``), with one
kind letter per character so that callers can tell literal text from expansions. Also here:
``_dec``, ``_text`` and ``_encode``, between the line's bytes and text, losing no byte.

Text is taken from the line by offsets and decoded straight from a view of its bytes (no
intermediate copy), and every character a word is made of is charged to the analysis's
budget (:mod:`._budget`) before it is kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, TypeAlias

import tree_sitter

from airlock.policy.shell._budget import _Budget

Node: TypeAlias = tree_sitter.Node

_EXPANSIONS: Final = frozenset(
    {"simple_expansion", "expansion", "command_substitution", "arithmetic_expansion"}
)
_BRACE_RE: Final = re.compile(r"\{[^{}]*(?:,|\.\.)[^{}]*\}")
_CONTINUATION_RE: Final = re.compile(rb"(?:\\\n)*")


def _dec(data: bytes | memoryview) -> str:
    return str(data, "utf-8", "surrogateescape")


# Below this many bytes a slice is cheaper than a view.
_VIEW_MIN: Final = 256


def _text(data: bytes, start: int, end: int) -> str:
    """``data[start:end]`` decoded, without copying the bytes first when they are many."""
    if end - start < _VIEW_MIN:
        return data[start:end].decode("utf-8", "surrogateescape")
    return str(memoryview(data)[start:end], "utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    for errors in ("strict", "surrogateescape", "surrogatepass"):
        try:
            return text.encode("utf-8", errors)
        except UnicodeEncodeError:
            continue
    return text.encode("utf-8", "replace")  # pragma: no cover - surrogatepass encodes all


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


Runs: TypeAlias = tuple[tuple[str, int], ...]


class _Word:
    """One shell word after quote removal.

    ``runs`` says what each stretch of ``value`` is, as (kind, length) pairs: L unquoted
    literal, Q quoted or escaped literal, X expansion (kept as its source text), P process
    substitution. ``dynamic``: it contains an expansion; ``procsub``: a process substitution;
    ``glob`` and ``brace``: unquoted pathname or brace expansion.
    """

    __slots__ = ("brace", "dynamic", "end", "glob", "procsub", "runs", "start", "value")

    def __init__(self, value: str, runs: Runs, start: int, end: int) -> None:
        self.value = value
        self.runs = runs
        self.start = start
        self.end = end
        kinds = {k for k, _ in runs}
        self.dynamic = "X" in kinds
        self.procsub = "P" in kinds
        self.glob = self.brace = False
        if "L" in kinds and ("*" in value or "?" in value or "[" in value or "{" in value):
            plain = self.plain()
            bracket = plain.find("[")
            self.glob = "*" in plain or "?" in plain or (bracket >= 0 and "]" in plain[bracket:])
            self.brace = "{" in plain and _BRACE_RE.search(plain) is not None

    @classmethod
    def literal(cls, value: str, start: int, end: int) -> _Word:
        return cls(value, (("L", len(value)),) if value else (), start, end)

    def plain(self) -> str:
        """The value with every character that is not an unquoted literal made a NUL."""
        if len(self.runs) == 1:
            return self.value if self.runs[0][0] == "L" else "\0" * len(self.value)
        parts: list[str] = []
        pos = 0
        for kind, length in self.runs:
            parts.append(self.value[pos : pos + length] if kind == "L" else "\0" * length)
            pos += length
        return "".join(parts)

    def expands_after(self, index: int) -> bool:
        """Whether an expansion or a process substitution ends after ``value[index]``."""
        pos = 0
        for kind, length in self.runs:
            pos += length
            if pos > index and kind in "XP":
                return True
        return False


class _WordBuilder:
    """Builds one word from its parts; every character is charged to ``budget``."""

    __slots__ = ("budget", "parts", "runs")

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget
        self.parts: list[str] = []
        self.runs: list[tuple[str, int]] = []

    def add(self, text: str, kind: str) -> None:
        if text:
            self.budget.charge(len(text))
            self.parts.append(text)
            if self.runs and self.runs[-1][0] == kind:
                self.runs[-1] = (kind, self.runs[-1][1] + len(text))
            else:
                self.runs.append((kind, len(text)))

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
        value = self.parts[0] if len(self.parts) == 1 else "".join(self.parts)
        return _Word(value, tuple(self.runs), start, end)


def _quoted_body(node: Node, data: bytes, builder: _WordBuilder, prefix: int) -> None:
    """A double-quoted string: literal text between expansions, escapes per bash."""
    start, end = node.start_byte + prefix, node.end_byte
    if end - 1 >= start and data[end - 1] == 0x22:  # "
        end -= 1
    pos = start
    for child in node.children:
        if child.type in _EXPANSIONS:
            if child.start_byte > pos:
                builder.double_quoted(_text(data, pos, child.start_byte))
            builder.add(_text(data, child.start_byte, child.end_byte), "X")
            pos = child.end_byte
    if end > pos:
        builder.double_quoted(_text(data, pos, end))


def _word_part(node: Node, data: bytes, builder: _WordBuilder) -> None:
    t = node.type
    start, end = node.start_byte, node.end_byte
    if t == "raw_string":
        closed = end - start >= 2 and data[end - 1] == 0x27  # '
        builder.add(_text(data, start + 1, end - 1 if closed else end), "Q")
    elif t == "ansi_c_string":
        closed = end - start >= 3 and data[end - 1] == 0x27
        builder.add(_ansi_c(_text(data, start + 2, end - 1 if closed else end)), "Q")
    elif t == "string":
        _quoted_body(node, data, builder, 1)
    elif t == "translated_string":
        _quoted_body(node, data, builder, 2)
    elif t in _EXPANSIONS:
        builder.add(_text(data, start, end), "X")
    elif t == "process_substitution":
        builder.add(_text(data, start, end), "P")
    elif t == "concatenation":
        pos = start
        for child in node.children:
            if child.start_byte > pos:
                builder.unquoted(_text(data, pos, child.start_byte))
            if child.type == "concatenation":  # not produced by the grammar; stay shallow
                builder.unquoted(_text(data, child.start_byte, child.end_byte))
            else:
                _word_part(child, data, builder)
            pos = max(pos, child.end_byte)
        if end > pos:
            builder.unquoted(_text(data, pos, end))
    else:
        # word, number, brace_expression, extglob_pattern, '$', regex, ... : unquoted text
        builder.unquoted(_text(data, start, end))


def _word(nodes: Sequence[Node], data: bytes, budget: _Budget) -> _Word:
    """One word from one node, or from several joined by line continuations."""
    if len(nodes) == 1 and nodes[0].type in ("word", "number"):  # the common case, fast
        start, end = nodes[0].start_byte, nodes[0].end_byte
        if data.find(b"\\", start, end) < 0:
            budget.charge(end - start)
            return _Word.literal(_text(data, start, end), start, end)
    builder = _WordBuilder(budget)
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


def _assignment(node: Node, data: bytes, budget: _Budget) -> tuple[str, str]:
    """NAME and quote-removed value of a variable_assignment node."""
    name_node = node.child_by_field_name("name")
    value_node = node.child_by_field_name("value")
    name = _text(data, name_node.start_byte, name_node.end_byte) if name_node else ""
    budget.charge(len(name))
    return name, _word([value_node], data, budget).value if value_node else ""


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
