"""The hook's two protobuf messages on the wire, without the protobuf runtime.

``airlock hook`` runs before every shell command an agent issues and sends one message
(``ValidateRequest``) and reads one (``ValidateResponse``). Importing the protobuf runtime and
the generated messages for that cost it about a fifth of its start-up (docs/performance.md
section 11), so this module writes and reads exactly those two, by hand, with the standard
library only (see :mod:`airlock._vocab` for why that matters; docs/decisions.md §34).

Writing follows proto3: fields in number order, a field at its default (an empty string) left
out, each ``env`` entry a length-delimited ``{1: key, 2: value}`` message (both always written,
as protobuf writes them), strings as UTF-8 (a string that cannot be, such as a lone surrogate,
raises ``UnicodeEncodeError`` as protobuf does). ``agent``, when given, is always written
(present, if empty), as ``msg.agent.CopyFrom(...)`` makes it.

Reading takes fields 1-4 of a ``ValidateResponse`` (id, verdict, summary, findings) and fields
1-5 of each ``Finding``, and skips every other field by its wire type without looking inside.
It fails closed: anything that is not a well-formed message raises :class:`WireError`
(a truncated varint, tag or length; a length past the end; a varint over 10 bytes or 64 bits;
field number 0; the group wire types 3 and 4 and the invalid 6 and 7; a read field with
another wire type than its own; a read singular field twice; a read string that is not
UTF-8; an enum value that is no int32). Enum values are returned as numbers, unknown ones
included (the hook maps them, an unknown verdict to DENY). A verdict that is absent reads as
0 (unspecified), which the hook takes for DENY.

The field numbers and types below are checked against the generated descriptors by
tests/unit/cli/test_hookwire.py, so that they cannot drift from proto/airlock/v1/sandbox.proto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AGENT_CONTEXT",
    "FINDING",
    "VALIDATE_REQUEST",
    "VALIDATE_RESPONSE",
    "WireError",
    "decode_validate_response",
    "encode_validate_request",
]

# Each field this module writes or reads: name -> (number, kind), kind one of "string",
# "enum", "message:<Type>", "repeated message:<Type>", "map<string,string>".
VALIDATE_REQUEST = {
    "command": (1, "string"),
    "cwd": (2, "string"),
    "env": (3, "map<string,string>"),
    "session_id": (8, "string"),
    "agent": (9, "message:AgentContext"),
}
AGENT_CONTEXT = {
    "agent_name": (1, "string"),
    "agent_version": (2, "string"),
    "session_id": (3, "string"),
    "tool_use_id": (4, "string"),
    "tool_description": (5, "string"),
    "transcript_path": (6, "string"),
    "prompt_excerpt": (7, "string"),
}
VALIDATE_RESPONSE = {
    "validation_id": (1, "string"),
    "verdict": (2, "enum"),
    "summary": (3, "string"),
    "findings": (4, "repeated message:Finding"),
}
FINDING = {
    "rule_id": (1, "string"),
    "verdict": (2, "enum"),
    "severity": (3, "enum"),
    "message": (4, "string"),
    "source": (5, "enum"),
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_OF = {"string": _LEN, "enum": _VARINT}

if TYPE_CHECKING:
    # (rule_id, verdict, severity, message, source), enums as numbers
    Finding = tuple[str, int, int, str, int]
    # (validation_id, verdict, summary, findings)
    Response = tuple[str, int, str, tuple[Finding, ...]]


class WireError(ValueError):
    """The bytes are not a well-formed message of the expected type."""


# --- writing ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_KEY, _VALUE = _tag(1, _LEN), _tag(2, _LEN)  # a map entry's
_REQUEST_TAGS = {name: _tag(number, _LEN) for name, (number, _) in VALIDATE_REQUEST.items()}
_AGENT_FIELDS = sorted(
    (number, name, _tag(number, _LEN)) for name, (number, _) in AGENT_CONTEXT.items()
)


def encode_validate_request(
    command: str,
    cwd: str,
    env: Mapping[str, str],
    session_id: str = "",
    agent: Mapping[str, str] | None = None,
) -> bytes:
    """A serialized ``ValidateRequest`` with these fields (the others unset); ``agent`` by
    AgentContext field name (a name it has not: ``ValueError``)."""
    tags = _REQUEST_TAGS
    parts = []
    for name, value in (("command", command), ("cwd", cwd)):
        if value:
            parts.append(_len_field(tags[name], value.encode("utf-8")))
    env_tag = tags["env"]
    for key, value in env.items():
        entry = _len_field(_KEY, key.encode("utf-8")) + _len_field(_VALUE, value.encode("utf-8"))
        parts.append(_len_field(env_tag, entry))
    if session_id:
        parts.append(_len_field(tags["session_id"], session_id.encode("utf-8")))
    if agent is not None:
        unknown = set(agent) - AGENT_CONTEXT.keys()
        if unknown:
            raise ValueError(f"AgentContext has no field {sorted(unknown)[0]!r}")
        fields = b"".join(
            _len_field(tag, agent[name].encode("utf-8"))
            for _, name, tag in _AGENT_FIELDS
            if agent.get(name)
        )
        parts.append(_len_field(tags["agent"], fields))
    return b"".join(parts)


# --- reading ------------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (before ``end``) and the position after it."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> 64:
                raise WireError("varint over 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _scan(data: bytes, pos: int, end: int, read: Mapping[int, int]) -> dict[int, list[int | bytes]]:
    """The fields numbered in ``read`` (number -> wire type) of the message in
    ``data[pos:end]``, in order of appearance; every other field skipped by wire type."""
    found: dict[int, list[int | bytes]] = {}
    while pos < end:
        tag, pos = _read_varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0 or tag > 0xFFFFFFFF:
            raise WireError(f"bad field number {number}")
        expected = read.get(number)
        if expected is not None and wire != expected:
            raise WireError(f"field {number} has wire type {wire}, not {expected}")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _read_varint(data, pos, end)
        elif wire == _LEN:
            length, pos = _read_varint(data, pos, end)
            if length > end - pos:
                raise WireError(f"field {number}'s length goes past the end")
            value = data[pos : pos + length] if expected is not None else b""
            pos += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if size > end - pos:
                raise WireError(f"truncated fixed-size field {number}")
            pos += size
            continue  # no field read here has these wire types
        else:
            raise WireError(f"field {number} has wire type {wire} (a group or invalid)")
        if expected is not None:
            found.setdefault(number, []).append(value)
    return found


def _one(found: dict[int, list[int | bytes]], number: int) -> int | bytes | None:
    values = found.get(number)
    if not values:
        return None
    if len(values) > 1:
        raise WireError(f"field {number} appears more than once")
    return values[0]


def _string(found: dict[int, list[int | bytes]], number: int) -> str:
    raw = _one(found, number)
    if raw is None:
        return ""
    assert isinstance(raw, bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"field {number} is not UTF-8") from None


def _enum(found: dict[int, list[int | bytes]], number: int) -> int:
    raw = _one(found, number)
    if raw is None:
        return 0
    assert isinstance(raw, int)
    if raw >> 63:  # a negative int32 is written sign-extended to 64 bits
        raw -= 1 << 64
    if not -(1 << 31) <= raw < 1 << 31:
        raise WireError(f"field {number} is not an int32 enum value")
    return raw


def _wire_types(fields: Mapping[str, tuple[int, str]]) -> dict[int, int]:
    return {number: _WIRE_OF.get(kind, _LEN) for number, kind in fields.values()}


_RESPONSE_WIRE = _wire_types(VALIDATE_RESPONSE)
_FINDING_WIRE = _wire_types(FINDING)
_F = {name: number for name, (number, _) in FINDING.items()}
_R = {name: number for name, (number, _) in VALIDATE_RESPONSE.items()}


def _finding(raw: bytes) -> Finding:
    found = _scan(raw, 0, len(raw), _FINDING_WIRE)
    return (
        _string(found, _F["rule_id"]),
        _enum(found, _F["verdict"]),
        _enum(found, _F["severity"]),
        _string(found, _F["message"]),
        _enum(found, _F["source"]),
    )


def decode_validate_response(data: bytes) -> Response:
    """``(validation_id, verdict, summary, findings)`` of a serialized ``ValidateResponse``,
    each finding ``(rule_id, verdict, severity, message, source)``, enums as numbers;
    :class:`WireError` if ``data`` is not a well-formed one."""
    found = _scan(data, 0, len(data), _RESPONSE_WIRE)
    findings = []
    for raw in found.get(_R["findings"], ()):
        assert isinstance(raw, bytes)  # length-delimited (checked by _scan)
        findings.append(_finding(raw))
    return (
        _string(found, _R["validation_id"]),
        _enum(found, _R["verdict"]),
        _string(found, _R["summary"]),
        tuple(findings),
    )
