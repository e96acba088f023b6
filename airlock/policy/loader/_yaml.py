"""YAML with positions: a policy file's plain values, and where each one starts.

:func:`_compose` builds the values from the YAML event stream, iteratively, and records the
line and column of every value and mapping key (:class:`_Doc`), so that every later problem
can point at its place. It refuses what a policy has no use for and a reviewer could be
misled by: several documents, aliases, tags, duplicate keys, non-string keys, and nesting
deeper than :data:`MAX_DEPTH` (:func:`_check_flow_depth` checks flow collections before the
parser sees them). :func:`_yaml_error` gives the YAML library's own errors the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from airlock.policy.rules import JsonPath

MAX_DEPTH = 64  # YAML nesting; the format needs about a dozen levels


class _YamlProblem(Exception):
    def __init__(self, line: int, column: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message
        self.hint = hint


@dataclass
class _Doc:
    """A parsed file: plain values plus where each value and mapping key starts."""

    file: str
    value: Any = None
    values: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)
    styles: dict[JsonPath, str | None] = field(default_factory=dict)


_RESOLVER: Any = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_STR = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "timestamp")
)
_SEQ_TAGS = frozenset({None, "!", "tag:yaml.org,2002:seq"})
_MAP_TAGS = frozenset({None, "!", "tag:yaml.org,2002:map"})
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _pos(mark: Any) -> tuple[int, int]:
    return (int(mark.line) + 1, int(mark.column) + 1)


def _scalar(event: yaml.ScalarEvent) -> Any:
    tag = event.tag
    if tag in (None, "!"):
        implicit = event.implicit
        tag = _STR if tag == "!" else _RESOLVER.resolve(yaml.ScalarNode, event.value, implicit)
    if tag not in _SCALAR_TAGS:
        raise _YamlProblem(
            *_pos(event.start_mark),
            f"unsupported YAML tag {tag!r}",
            "write plain strings, numbers and booleans",
        )
    if tag in (_STR, "tag:yaml.org,2002:timestamp"):
        return event.value  # dates stay text: the loader checks them itself
    marks: Any = (event.start_mark, event.end_mark)
    node = yaml.ScalarNode(tag, event.value, marks[0], marks[1], event.style)
    try:
        return _CONSTRUCTOR.construct_object(node)
    except (yaml.YAMLError, ValueError) as e:
        raise _YamlProblem(*_pos(event.start_mark), f"invalid value {event.value!r}: {e}") from e


def _check_flow_depth(text: str) -> None:
    """Refuse flow collections (``[ ]``, ``{ }``) nested deeper than MAX_DEPTH.

    This runs before any YAML parser sees the text: a parser scans a whole flow collection ahead
    of the events it yields, and libyaml has a nesting limit (and a message) of its own that
    changes between versions, so the composer's depth check alone cannot be the first to fire.
    Block nesting needs no such scan: its events arrive line by line and the composer bounds it.
    The scan knows just enough YAML to find where flow collections open: comments, quoted
    scalars, block scalars (``|``, ``>``) and plain scalars (``a[0]`` is text, not a sequence).
    """
    depth = 0
    node_start = True  # the next character may start a node
    block_indent = -1  # inside a block scalar: the indentation of the line that opened it
    line, line_start, i, n = 1, 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line, line_start, i = line + 1, i + 1, i + 1
            node_start = True
            if block_indent >= 0 and depth == 0:  # skip the block scalar's lines
                while i < n:
                    end = text.find("\n", i)
                    end = n if end < 0 else end
                    body = text[i:end]
                    if body.strip() and len(body) - len(body.lstrip(" ")) <= block_indent:
                        break
                    line, line_start, i = line + 1, end + 1, end + 1
                block_indent = -1
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#" and (i == line_start or text[i - 1] in " \t"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if node_start and c in "'\"":  # a quoted scalar, possibly over several lines
            j = i + 1
            while j < n:
                if text[j] == "\\" and c == '"':
                    j += 2
                    continue
                if text[j] == c:
                    if c == "'" and j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            line += text.count("\n", i, j)
            if "\n" in text[i:j]:
                line_start = text.rfind("\n", i, j) + 1
            i, node_start = j + 1, False
            continue
        if c in "[{" and (node_start or depth):
            depth += 1
            if depth > MAX_DEPTH:
                raise _YamlProblem(
                    line,
                    i - line_start + 1,
                    f"nesting too deep (more than {MAX_DEPTH} levels)",
                    "a policy file needs only a few levels",
                )
            i, node_start = i + 1, True
            continue
        if c in "]}" and depth:
            depth -= 1
            i, node_start = i + 1, False
            continue
        if c in ",?" and depth:
            i, node_start = i + 1, True
            continue
        if c in "|>" and node_start and not depth:
            indent = text[line_start:i]
            block_indent = len(indent) - len(indent.lstrip(" "))
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in ":-?" and (i + 1 >= n or text[i + 1] in " \t\r\n" or (depth and c == ":")):
            i, node_start = i + 1, True  # a key's value, or a sequence entry, starts next
            continue
        if c in "!&" and node_start:  # a tag or an anchor before the node
            while i < n and text[i] not in " \t\r\n":
                i += 1
            continue
        # Plain text: up to the next indicator that can end it.
        i, node_start = i + 1, False
        stops = ",[]{}" if depth else ""
        while i < n and text[i] not in "\n" + stops:
            if text[i] == ":" and (i + 1 >= n or text[i + 1] in " \t\r\n" or depth):
                break
            if text[i] == "#" and text[i - 1] in " \t":
                break
            i += 1


def _compose(text: str, file: str) -> _Doc:
    """Build plain values from the YAML event stream, iteratively (no recursion)."""
    _check_flow_depth(text)
    doc = _Doc(file)
    # Each frame: [container, path, pending key or None]
    stack: list[list[Any]] = []
    documents = 0
    have_root = False

    def place(event: Any) -> JsonPath | None:
        """The path of a new value, or None when the event is a mapping key."""
        if not stack:
            return ()
        container, path, key = stack[-1]
        if isinstance(container, list):
            return (*path, len(container))
        if key is None:
            return None
        return (*path, key)

    def attach(value: Any) -> None:
        nonlocal have_root
        if not stack:
            doc.value, have_root = value, True
            return
        frame = stack[-1]
        if isinstance(frame[0], list):
            frame[0].append(value)
        else:
            frame[0][frame[2]] = value
            frame[2] = None

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    "more than one YAML document in the file",
                    "a policy file is one mapping; remove the `---` separator or split the file",
                )
            continue
        if isinstance(event, yaml.AliasEvent):
            raise _YamlProblem(
                *_pos(event.start_mark),
                f"YAML aliases (*{event.anchor}) are not supported",
                "use `lists:` or `macros:` to share values",
            )
        if not isinstance(event, yaml.NodeEvent | yaml.CollectionEndEvent):
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            container, _path, _key = stack.pop()
            attach(container)
            continue
        path = place(event)
        if path is None:  # a mapping key
            if not isinstance(event, yaml.ScalarEvent):
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    "a mapping key must be a plain string",
                    "write `key: value`",
                )
            key = event.value
            frame = stack[-1]
            key_path = (*frame[1], key)
            if key in frame[0]:
                first = doc.keys[key_path]
                raise _YamlProblem(
                    *_pos(event.start_mark),
                    f"duplicate key {key!r} (first at line {first[0]}, column {first[1]})",
                    "each key may appear once in a mapping",
                )
            doc.keys[key_path] = _pos(event.start_mark)
            frame[2] = key
            frame[0][key] = None  # reserve, for the duplicate check
            continue
        doc.values[path] = _pos(event.start_mark)
        if isinstance(event, yaml.ScalarEvent):
            doc.styles[path] = event.style
            attach(_scalar(event))
            continue
        if len(stack) >= MAX_DEPTH:
            raise _YamlProblem(
                *_pos(event.start_mark),
                f"nesting too deep (more than {MAX_DEPTH} levels)",
                "a policy file needs only a few levels",
            )
        if isinstance(event, yaml.SequenceStartEvent):
            if event.tag not in _SEQ_TAGS:
                raise _YamlProblem(*_pos(event.start_mark), f"unsupported YAML tag {event.tag!r}")
            stack.append([[], path, None])
        else:
            assert isinstance(event, yaml.MappingStartEvent)
            if event.tag not in _MAP_TAGS:
                raise _YamlProblem(*_pos(event.start_mark), f"unsupported YAML tag {event.tag!r}")
            stack.append([{}, path, None])
    if not have_root or doc.value is None:
        raise _YamlProblem(
            1, 1, "the file is empty", "a policy file is a mapping: `version: 1` and `rules: [...]`"
        )
    return doc


def _yaml_error(e: yaml.YAMLError, text: str) -> _YamlProblem:
    if isinstance(e, yaml.reader.ReaderError):
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        before = text[: e.position]
        line = before.count("\n") + 1
        column = e.position - (before.rfind("\n") + 1) + 1
        return _YamlProblem(
            line,
            column,
            f"invalid character {char!r} in YAML: {e.reason}",
            "a policy file is UTF-8 text without control characters",
        )
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        line, column = _pos(e.problem_mark)
        hint = ""
        lines = text.split("\n")
        if line <= len(lines) and "\t" in lines[line - 1][: column + 1]:
            hint = "indent with spaces: YAML does not allow tabs for indentation"
        elif e.context:
            hint = e.context
        return _YamlProblem(line, column, f"invalid YAML: {e.problem}", hint)
    return _YamlProblem(1, 1, f"invalid YAML: {e}")
