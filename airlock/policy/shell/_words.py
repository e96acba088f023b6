"""Words: from tree-sitter-bash nodes to the text bash would pass, quotes removed.

Single, double, ANSI-C (``$'\\x72m'``) and translated (``$"..."``) quoting, backslash escapes
and line continuations (``\\rm``, ``r''m`` and ``r\\<newline>m`` are all ``rm``), with one
kind letter per character so that callers can tell literal text from expansions. Also here:
``_dec`` and ``_encode``, between the line's bytes and text, losing no byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, TypeAlias

import tree_sitter

Node: TypeAlias = tree_sitter.Node

_EXPANSIONS: Final = frozenset(
    {"simple_expansion", "expansion", "command_substitution", "arithmetic_expansion"}
)
_BRACE_RE: Final = re.compile(r"\{[^{}]*(?:,|\.\.)[^{}]*\}")
_CONTINUATION_RE: Final = re.compile(rb"(?:\\\n)*")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


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
