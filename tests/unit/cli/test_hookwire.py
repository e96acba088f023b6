"""``airlock.cli._hookwire``: the hook's two messages written and read without protobuf.

Checked against the real generated classes (``airlock.v1.sandbox_pb2``): the field numbers and
types against their descriptors (no drift from the .proto); what it writes, parsed by
protobuf, is the intended ``ValidateRequest``; protobuf's serialization of random
``ValidateResponse``s (every field set at random, unknown fields added) reads the same id,
verdict, summary and findings; malformed input (hand-made cases, every truncation of a valid
answer, random bytes) raises :class:`WireError` and nothing else, and a truncation that
happens to read is never more permissive than the whole. End to end through
``hook.daemon_validator`` against a real grpc server: the server parses what the hook sends,
and the hook maps the answer (unknown enum numbers included) as it did with protobuf.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock._errors import AirlockError
from airlock._vocab import AGENT_LIMITS, FindingSource, Severity, Verdict
from airlock.cli import _hookwire as wire
from airlock.cli import hook
from airlock.cli._hookwire import WireError, decode_validate_response, encode_validate_request
from airlock.v1 import sandbox_pb2 as pb

# --- no drift from the .proto -------------------------------------------------------------


def _kind(field: Any) -> str:
    """A descriptor's field in the module's notation."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            assert (key.number, value.number) == (1, 2)
            if key.type == value.type == FieldDescriptor.TYPE_STRING:
                return "map<string,string>"
            return f"map of {key.type}/{value.type}"
        return f"{'repeated ' if field.is_repeated else ''}message:{entry.name}"
    assert not field.is_repeated, field.full_name
    return {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_ENUM: "enum"}.get(
        field.type, f"type {field.type}"
    )


@pytest.mark.parametrize(
    ("table", "descriptor"),
    [
        (wire.VALIDATE_REQUEST, pb.ValidateRequest.DESCRIPTOR),
        (wire.AGENT_CONTEXT, pb.AgentContext.DESCRIPTOR),
        (wire.VALIDATE_RESPONSE, pb.ValidateResponse.DESCRIPTOR),
        (wire.FINDING, pb.Finding.DESCRIPTOR),
    ],
    ids=lambda x: getattr(x, "name", ""),
)
def test_fields_are_the_descriptors(table: dict[str, tuple[int, str]], descriptor: Any) -> None:
    for name, (number, kind) in table.items():
        field = descriptor.fields_by_name[name]
        assert (field.number, _kind(field)) == (number, kind), field.full_name
        assert descriptor.fields_by_number[number] is field


def test_enums_and_agent_context_are_complete() -> None:
    enums: dict[tuple[Any, str], type[Verdict | Severity | FindingSource]] = {
        (pb.ValidateResponse, "verdict"): Verdict,
        (pb.Finding, "verdict"): Verdict,
        (pb.Finding, "severity"): Severity,
        (pb.Finding, "source"): FindingSource,
    }
    for (cls, name), kind in enums.items():
        enum_type = cls.DESCRIPTOR.fields_by_name[name].enum_type
        assert enum_type.name == kind.__name__
        values = {v.number for v in enum_type.values}
        assert values == {0} | {int(k) for k in kind}  # 0 is UNSPECIFIED: the hook's fallback
    # Every AgentContext field is written, under its own name (the hook sends all of them).
    assert set(wire.AGENT_CONTEXT) == {f.name for f in pb.AgentContext.DESCRIPTOR.fields}
    assert set(wire.AGENT_CONTEXT) == set(AGENT_LIMITS)


# --- writing --------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
AGENTS = st.none() | st.dictionaries(st.sampled_from(sorted(wire.AGENT_CONTEXT)), TEXT)


@settings(max_examples=300)
@given(TEXT, TEXT, st.dictionaries(TEXT, TEXT, max_size=6), TEXT, AGENTS)
def test_request_is_what_protobuf_reads(
    command: str, cwd: str, env: dict[str, str], session: str, agent: dict[str, str] | None
) -> None:
    raw = encode_validate_request(command, cwd, env, session, agent)
    expected = pb.ValidateRequest(command=command, cwd=cwd, env=env, session_id=session)
    if agent is not None:
        expected.agent.CopyFrom(pb.AgentContext(**agent))
    got = pb.ValidateRequest.FromString(raw)
    assert got == expected
    assert got.HasField("agent") == (agent is not None)
    if len(env) <= 1:  # byte for byte what protobuf writes (its order of map entries varies)
        assert raw == expected.SerializeToString()


def test_request_with_what_protobuf_refuses() -> None:
    with pytest.raises(ValueError, match="no field 'agent_nam'"):
        encode_validate_request("ls", "/", {}, agent={"agent_nam": "x"})
    # A lone surrogate (JSON can hold one) is refused as protobuf refuses it.
    for args in (("\udcff", "/", {}), ("ls", "/", {"A": "\ud800"}), ("ls", "/", {"\ud800": ""})):
        with pytest.raises(UnicodeEncodeError):
            encode_validate_request(*args)
        with pytest.raises(UnicodeEncodeError):
            pb.ValidateRequest(command=args[0], cwd=args[1], env=args[2]).SerializeToString()
    assert encode_validate_request("", "", {}) == b""
    assert encode_validate_request("", "", {}, agent={}) == b"J\x00"  # present, if empty


# --- reading: protobuf's own serialization --------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(draw: st.DrawFn, field: Any) -> Any:
    t = field.type
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return draw(st.sampled_from(known) | st.integers(*_INT_RANGES[t]))
    if t in _INT_RANGES:
        return draw(st.integers(*_INT_RANGES[t]))
    if t == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if t == FieldDescriptor.TYPE_STRING:
        return draw(TEXT)
    if t == FieldDescriptor.TYPE_BYTES:
        return draw(st.binary(max_size=24))
    if t == FieldDescriptor.TYPE_FLOAT:
        return draw(st.floats(width=32))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return draw(st.floats())
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def _fill(draw: st.DrawFn, msg: Any, depth: int) -> Any:
    """Set each field of ``msg`` at random (or leave it), every kind of field and message
    of the schema, nested to ``depth``."""
    for field in msg.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        name, sub = field.name, field.message_type
        if sub is not None and depth <= 0:
            continue
        if sub is not None and sub.GetOptions().map_entry:
            key_field, value_field = sub.fields_by_name["key"], sub.fields_by_name["value"]
            target = getattr(msg, name)
            for _ in range(draw(st.integers(0, 2))):
                key = _scalar(draw, key_field)
                if value_field.message_type is not None:
                    _fill(draw, target[key], depth - 1)
                else:
                    target[key] = _scalar(draw, value_field)
        elif sub is not None and field.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                _fill(draw, getattr(msg, name).add(), depth - 1)
        elif sub is not None:
            getattr(msg, name).SetInParent()
            _fill(draw, getattr(msg, name), depth - 1)
        elif field.is_repeated:
            getattr(msg, name).extend(_scalar(draw, field) for _ in range(draw(st.integers(0, 3))))
        else:
            setattr(msg, name, _scalar(draw, field))
    return msg


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def _unknown_fields(draw: st.DrawFn, known: frozenset[int]) -> bytes:
    """Fields this schema does not have, of every wire type but the groups."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        number = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in known))
        kind = draw(st.sampled_from([0, 1, 2, 5]))
        if kind == 0:
            payload = _varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == 1:
            payload = draw(st.binary(min_size=8, max_size=8))
        elif kind == 5:
            payload = draw(st.binary(min_size=4, max_size=4))
        else:
            body = draw(st.binary(max_size=16))
            payload = _varint(len(body)) + body
        out += _tag(number, kind) + payload
    return out


_RESPONSE_NUMBERS = frozenset(pb.ValidateResponse.DESCRIPTOR.fields_by_number)
_FINDING_NUMBERS = frozenset(pb.Finding.DESCRIPTOR.fields_by_number)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A ValidateResponse as protobuf serializes it, every field set at random, with unknown
    fields before and after (in the message and in its findings)."""
    msg = pb.ValidateResponse()
    _fill(draw, msg, depth=3)
    for finding in msg.findings:
        # protobuf keeps unknown fields and writes them back after the known ones
        finding.MergeFromString(draw(_unknown_fields(_FINDING_NUMBERS)))
    head, tail = draw(_unknown_fields(_RESPONSE_NUMBERS)), draw(_unknown_fields(_RESPONSE_NUMBERS))
    return head + msg.SerializeToString() + tail


def _protobuf_reads(raw: bytes) -> tuple[str, int, str, tuple[tuple[str, int, int, str, int], ...]]:
    r = pb.ValidateResponse.FromString(raw)
    return (
        r.validation_id,
        r.verdict,
        r.summary,
        tuple((f.rule_id, f.verdict, f.severity, f.message, f.source) for f in r.findings),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_response_reads_as_protobuf_reads_it(raw: bytes) -> None:
    assert decode_validate_response(raw) == _protobuf_reads(raw)


def test_response_fixed_example() -> None:
    r = pb.ValidateResponse(
        validation_id="val-1",
        verdict=pb.VERDICT_DENY,
        summary="deletes everything",
        sandboxed=True,
        exit_code=-1,
        stdout=b"x" * 70000,
        policy_version="abc",
    )
    r.findings.add(
        rule_id="fs.rm",
        verdict=pb.VERDICT_DENY,
        severity=pb.SEVERITY_CRITICAL,
        message="rm -rf /",
        source=pb.FINDING_SOURCE_STATIC,
        subcommand="rm -rf /",
        span_end=8,
    )
    r.findings.add(rule_id="x", verdict=9, severity=-3, source=77)  # numbers this side lacks
    r.changes.add(path="/a")
    r.timings.total.seconds = 3
    assert decode_validate_response(r.SerializeToString()) == (
        "val-1",
        3,
        "deletes everything",
        (("fs.rm", 3, 5, "rm -rf /", 2), ("x", 9, -3, "", 77)),
    )
    assert decode_validate_response(b"") == ("", 0, "", ())  # no verdict: 0, a DENY


# --- reading: malformed input fails closed --------------------------------------------------

MALFORMED = {
    "truncated tag": b"\x80",
    "truncated varint": b"\x10\x80",
    "varint over 10 bytes": b"\x10" + b"\x80" * 10 + b"\x01",
    "varint over 64 bits": b"\x10" + b"\xff" * 9 + b"\x02",
    "tag over 32 bits": b"\x80\x80\x80\x80\x10\x01",
    "field number 0": b"\x00\x01",
    "length past the end": b"\x0a\x05abc",
    "huge length": b"\x0a" + b"\xff" * 9 + b"\x01",
    "truncated fixed64": b"\xf9\x01abc",  # field 31, unknown
    "truncated fixed32": b"\xfd\x01ab",
    "start group": b"\x0b\x0c\x10\x01",
    "end group": b"\x0c",
    "wire type 6": b"\x0e\x00",
    "wire type 7": b"\x0f\x00",
    "id not UTF-8": b"\x0a\x02\xc3\x28",
    "summary a surrogate": b"\x1a\x03\xed\xa0\x80",
    "verdict length-delimited": b"\x12\x01\x01",
    "id a varint": b"\x08\x01",
    "verdict twice": b"\x10\x03\x10\x01",
    "id twice": b"\x0a\x00\x0a\x00",
    "verdict over int32": b"\x10\x80\x80\x80\x80\x10",  # 2**32: protobuf keeps the low 32 bits
    "verdict below int32": b"\x10" + _varint(2**64 - 2**31 - 1),
    "finding truncated": b"\x22\x04\x0a\x03ab",  # its rule_id's length past its end
    "finding's message not UTF-8": b"\x22\x03\x22\x01\xff",
    "finding's verdict twice": b"\x22\x04\x10\x01\x10\x03",
    "finding's severity length-delimited": b"\x22\x03\x1a\x01\x01",
    "finding a group": b"\x22\x02\x0b\x0c",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_answer_raises(name: str) -> None:
    with pytest.raises(WireError):
        decode_validate_response(MALFORMED[name])


def _strictness(verdict: int) -> int:
    return int(hook._of(Verdict, verdict, Verdict.DENY))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_truncation_raises_or_is_no_more_permissive(raw: bytes) -> None:
    """_h2call hands over only a whole message (the gRPC length prefix must match the body:
    test_h2call's "length prefix too short"), so a truncation never reaches the reader; were
    it to, it raises, or (cut on a field boundary) reads a prefix: the verdict the whole
    has or none (a DENY), the id and summary or nothing, some of the findings."""
    whole = decode_validate_response(raw)
    for cut in range(len(raw)):
        try:
            part = decode_validate_response(raw[:cut])
        except WireError:
            continue
        assert part[1] in (whole[1], 0)
        assert _strictness(part[1]) >= _strictness(whole[1])
        assert part[0] in (whole[0], "") and part[2] in (whole[2], "")
        assert part[3] == whole[3][: len(part[3])]


def _raises_or_reads_as_protobuf(raw: bytes) -> None:
    """Only WireError, and what reads at all reads as protobuf reads it (this side is the
    stricter: it refuses duplicates, wrong wire types, groups and enum values past int32)."""
    try:
        got = decode_validate_response(raw)
    except WireError:
        return
    try:
        expected = _protobuf_reads(raw)
    except DecodeError:
        return  # bad content inside a field this side skips without reading
    assert got == expected


@settings(max_examples=1000)
@given(st.binary(max_size=64) | st.lists(st.sampled_from(list(MALFORMED.values()))).map(b"".join))
def test_random_bytes_raise_or_read_as_protobuf(raw: bytes) -> None:
    _raises_or_reads_as_protobuf(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.data())
def test_damaged_answer_raises_or_reads_as_protobuf(raw: bytes, data: st.DataObject) -> None:
    """A valid answer with one byte changed."""
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]
    _raises_or_reads_as_protobuf(raw)


# --- end to end: the hook's call against a real grpc server ----------------------------------


class _Service:
    def __init__(self) -> None:
        self.answer = b""
        self.requests: list[pb.ValidateRequest] = []
        self.lock = threading.Lock()

    def validate(self, request: pb.ValidateRequest, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.requests.append(request)
        return self.answer


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[_Service, str]]:
    svc = _Service()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        svc.validate,
        request_deserializer=pb.ValidateRequest.FromString,
        response_serializer=bytes,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("airlock.v1.SandboxService", {"Validate": handler}),)
    )
    path = str(tmp_path / "grpc.sock")
    server.add_insecure_port("unix:" + path)
    server.start()
    try:
        yield svc, path
    finally:
        server.stop(None).wait()


def test_hook_call_end_to_end(
    service: tuple[_Service, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, path = service
    monkeypatch.setenv("AIRLOCK_WIRE_TEST", "ünï")
    r = pb.ValidateResponse(validation_id="val-7", verdict=pb.VERDICT_ASK, summary="reads")
    r.findings.add(rule_id="a", verdict=pb.VERDICT_ASK, severity=pb.SEVERITY_HIGH, message="m")
    r.findings.add(rule_id="b", verdict=42, severity=0, source=9)  # unknown: the strict side
    svc.answer = r.SerializeToString()
    req = hook.Request("ls -l", "/tmp", "s-1", agent_values={"agent_name": "claude-code"})
    got = hook.daemon_validator(path, 10)(req)
    assert got == hook.Judgement(
        "val-7",
        Verdict.ASK,
        "reads",
        (
            hook.JudgedFinding("a", Verdict.ASK, Severity.HIGH, "m", FindingSource.BUILTIN),
            hook.JudgedFinding("b", Verdict.DENY, Severity.CRITICAL, "", FindingSource.BUILTIN),
        ),
    )
    (sent,) = svc.requests
    assert (sent.command, sent.cwd, sent.session_id) == ("ls -l", "/tmp", "s-1")
    assert sent.env["AIRLOCK_WIRE_TEST"] == "ünï"
    assert sent.agent == pb.AgentContext(agent_name="claude-code")
    # An unknown verdict, or none, is a DENY, as with the generated classes.
    for verdict in (0, 4, -1):
        answer = pb.ValidateResponse(validation_id="v", verdict=pb.Verdict.ValueType(verdict))
        svc.answer = answer.SerializeToString()
        assert hook.daemon_validator(path, 10)(req).verdict is Verdict.DENY


def test_unreadable_answer_is_the_blocking_answer(service: tuple[_Service, str]) -> None:
    svc, path = service
    svc.answer = b"\x10\x01\x10\x01"  # ALLOW, twice: refused
    with pytest.raises(AirlockError, match="cannot be read") as e:
        hook.daemon_validator(path, 10)(hook.Request("ls", "/tmp"))
    assert e.value.reason == "INTERNAL"
    raw = '{"tool_name": "Bash", "tool_input": {"command": "ls"}, "cwd": "/tmp"}'
    answer = hook.handle("claude", raw, hook.daemon_validator(path, 10))
    assert '"permissionDecision":"deny"' in answer.stdout
    assert "cannot be read" in answer.stdout and "[INTERNAL]" in answer.stdout
