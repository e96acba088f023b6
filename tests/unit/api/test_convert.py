"""The edge: protobuf <-> airlock.types conversion, and errors <-> gRPC status."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from fractions import Fraction
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from airlock import types
from airlock._errors import (
    AirlockError,
    Cancelled,
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
    SandboxError,
    Unavailable,
)
from airlock.api import convert as conv
from airlock.api.status import DOMAIN, from_rpc_error, status_code_of, to_rpc_status
from airlock.audit import (
    Anchor,
    Approval,
    Authorization,
    Caller,
    Outcome,
    ProblemKind,
    StoredEvent,
    VerifyProblem,
    VerifyResult,
    encode_event,
)
from airlock.client import Client
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc
from tests.helpers.audit import event as audit_event

# --- strategies ---------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
# Text protobuf can carry: no lone surrogates.
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
# Float seconds that are a whole number of nanoseconds, negative ones included.
SECONDS = st.integers(-(2**52), 2**52).map(lambda ns: ns / 1_000_000_000)
# Any bytes (mostly not UTF-8) and UTF-8 text, as absolute paths.
PATH = st.one_of(
    st.binary(max_size=40).map(lambda b: b"/" + b.replace(b"\0", b"")),
    TEXT.map(lambda s: ("/" + s.replace("\0", "")).encode("utf-8")),
)
UTF8_BYTES = TEXT.map(lambda s: s.encode("utf-8"))


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


CHANGES = st.builds(
    types.FileChange,
    path=PATH,
    kind=st.sampled_from(types.ChangeKind),
    file_type=st.sampled_from(types.FileType),
    previous_file_type=st.sampled_from(types.FileType),
    in_workspace=st.booleans(),
    size_before=optional(UINT64),
    size_after=optional(UINT64),
    sha256_after=TEXT,
    mode_before=optional(UINT32),
    mode_after=optional(UINT32),
    uid_after=optional(UINT32),
    gid_after=optional(UINT32),
    symlink_target=UTF8_BYTES,
    unified_diff=TEXT,
    binary=st.booleans(),
    diff_truncated=st.booleans(),
    entries_deleted=UINT64,
    unreadable=st.booleans(),
    other_type=st.sampled_from(types.OtherType),
    capabilities=TEXT,
    links=UINT32,
    linked_to=UTF8_BYTES,
)

FINDINGS = st.builds(
    types.Finding,
    rule_id=TEXT,
    verdict=st.sampled_from(types.Verdict),
    severity=st.sampled_from(types.Severity),
    message=TEXT,
    source=st.sampled_from(types.FindingSource),
    subcommand=TEXT,
    span=st.tuples(UINT32, UINT32),
)

VALIDATIONS = st.builds(
    types.Validation,
    validation_id=TEXT,
    verdict=st.sampled_from(types.Verdict),
    summary=TEXT,
    findings=st.lists(FINDINGS, max_size=3).map(tuple),
    sandboxed=st.booleans(),
    termination=st.sampled_from(types.Termination),
    exit_code=INT32,
    signal=INT32,
    stdout=st.binary(max_size=64),
    stdout_truncated=st.booleans(),
    stderr=st.binary(max_size=64),
    stderr_truncated=st.booleans(),
    changes=st.lists(CHANGES, max_size=4).map(tuple),
    changes_truncated=st.booleans(),
    timings=st.builds(
        types.Timings,
        static_analysis_s=SECONDS,
        sandbox_s=SECONDS,
        diff_s=SECONDS,
        total_s=SECONDS,
        sandbox_setup_s=SECONDS,
        command_s=SECONDS,
        warm=st.booleans(),
    ),
    resource_usage=st.builds(
        types.ResourceUsage,
        peak_memory_bytes=UINT64,
        cpu_time_s=SECONDS,
        memory_limit_hit=st.booleans(),
        pids_limit_hit=st.booleans(),
        scratch_bytes_used=UINT64,
    ),
    uid=UINT32,
    gid=UINT32,
    dry_run_skip=st.sampled_from(types.DryRunSkip),
    static=st.builds(
        types.StaticSummary,
        command_count=UINT32,
        command_names=st.lists(TEXT, max_size=3).map(tuple),
        action=st.sampled_from(types.ActionClass),
        risk=st.sampled_from(types.RiskTier),
        scope=st.sampled_from(types.Scope),
        read_only=st.booleans(),
    ),
    policy_version=TEXT,
)

REQUESTS = st.builds(
    types.ValidateRequest,
    command=TEXT,
    cwd=TEXT,
    env=st.dictionaries(TEXT, TEXT, max_size=5).map(lambda d: tuple(sorted(d.items()))),
    timeout_s=optional(SECONDS),
    uid=optional(UINT32),
    gid=optional(UINT32),
    force_dry_run=st.booleans(),
)


def over_the_wire(msg: Any) -> Any:
    """The message as the other side parses it."""
    return type(msg).FromString(msg.SerializeToString())


# --- round trips --------------------------------------------------------------------


@given(VALIDATIONS)
def test_validation_round_trips_exactly(v: types.Validation) -> None:
    assert conv.validation_from_proto(over_the_wire(conv.validation_to_proto(v))) == v


@given(CHANGES)
def test_file_change_round_trips_exactly(c: types.FileChange) -> None:
    assert conv.change_from_proto(over_the_wire(conv.change_to_proto(c))) == c


@given(CHANGES)
def test_a_change_read_from_the_wire_is_one_its_constructor_makes(c: types.FileChange) -> None:
    # change_from_proto installs the fields without FileChange.__init__ (faster): only when
    # that is equivalent, which holds for today's FileChange.
    assert conv._new_change is conv._new_change_direct
    back = conv.change_from_proto(over_the_wire(conv.change_to_proto(c)))
    made = types.FileChange(**vars(back))
    assert vars(back) == vars(made) and list(vars(back)) == list(vars(made))
    assert back == made and hash(back) == hash(made) and repr(back) == repr(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.path = b"/other"  # type: ignore[misc]


@given(PATH)
def test_path_is_escaped_text_and_raw_bytes_only_when_not_utf8(path: bytes) -> None:
    msg = conv.change_to_proto(
        types.FileChange(path=path, kind=types.ChangeKind.CREATED, file_type=types.FileType.REGULAR)
    )
    assert msg.path == path.decode("utf-8", errors="backslashreplace")
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        assert msg.raw_path == path
    else:
        assert msg.raw_path == b""


@given(REQUESTS)
def test_validate_request_round_trips_exactly(req: types.ValidateRequest) -> None:
    assert (
        conv.validate_request_from_proto(over_the_wire(conv.validate_request_to_proto(req))) == req
    )


@given(st.builds(types.Finding, rule_id=TEXT, verdict=st.sampled_from(types.Verdict),
                 severity=st.sampled_from(types.Severity), message=TEXT,
                 source=st.sampled_from(types.FindingSource)))  # fmt: skip
def test_finding_defaults_round_trip(f: types.Finding) -> None:
    assert conv.finding_from_proto(conv.finding_to_proto(f)) == f


# --- specific mappings --------------------------------------------------------------


def test_non_utf8_path_on_the_wire() -> None:
    c = types.FileChange(
        path=b"/tmp/caf\xe9/\xff\xfe.txt",
        kind=types.ChangeKind.DELETED,
        file_type=types.FileType.REGULAR,
    )
    msg = conv.change_to_proto(c)
    assert msg.path == "/tmp/caf\\xe9/\\xff\\xfe.txt"
    assert msg.raw_path == b"/tmp/caf\xe9/\xff\xfe.txt"
    assert conv.change_from_proto(msg).path == c.path


def test_literal_backslash_path_is_not_mistaken_for_an_escape() -> None:
    # Valid UTF-8 that looks like an escape: no raw_path, and it reads back as itself.
    c = types.FileChange(
        path=b"/tmp/\\xff", kind=types.ChangeKind.CREATED, file_type=types.FileType.REGULAR
    )
    msg = conv.change_to_proto(c)
    assert msg.path == "/tmp/\\xff"
    assert msg.raw_path == b""
    assert conv.change_from_proto(msg).path == b"/tmp/\\xff"


def test_non_utf8_symlink_target_is_escaped_lossily() -> None:
    # The API has no raw twin for symlink_target: the escape comes back as text.
    c = types.FileChange(
        path=b"/l",
        kind=types.ChangeKind.CREATED,
        file_type=types.FileType.SYMLINK,
        symlink_target=b"/x\xff",
    )
    msg = conv.change_to_proto(c)
    assert msg.symlink_target == "/x\\xff"
    assert conv.change_from_proto(msg).symlink_target == b"/x\\xff"


# FileChange's fields that are unset (None) or a number, 0 included.
OPTIONAL_CHANGE_FIELDS = (
    "size_before",
    "size_after",
    "mode_before",
    "mode_after",
    "uid_after",
    "gid_after",
)


def test_unset_optionals_are_none_and_zero_is_not_unset() -> None:
    c = types.FileChange(
        path=b"/a", kind=types.ChangeKind.DELETED, file_type=types.FileType.REGULAR
    )
    msg = conv.change_to_proto(c)
    for name in OPTIONAL_CHANGE_FIELDS:
        assert not msg.HasField(name)
    zeros = dataclasses.replace(
        c, size_before=0, size_after=0, mode_before=0, mode_after=0, uid_after=0, gid_after=0
    )
    msg = over_the_wire(conv.change_to_proto(zeros))
    for name in OPTIONAL_CHANGE_FIELDS:
        assert msg.HasField(name)
    assert conv.change_from_proto(msg) == zeros


def test_file_type_none_is_unspecified() -> None:
    c = types.FileChange(
        path=b"/a",
        kind=types.ChangeKind.CREATED,
        file_type=types.FileType.REGULAR,
        previous_file_type=types.FileType.NONE,
    )
    msg = conv.change_to_proto(c)
    assert msg.previous_file_type == pb.FILE_TYPE_UNSPECIFIED
    assert msg.file_type == pb.FILE_TYPE_REGULAR
    assert conv.change_from_proto(pb.FileChange(path="/a")).file_type is types.FileType.NONE


@pytest.mark.parametrize(
    ("inside", "outside", "prefix", "renamed"),
    [
        (types.Verdict, pb.Verdict, "VERDICT_", {}),
        (types.Severity, pb.Severity, "SEVERITY_", {}),
        (types.FindingSource, pb.FindingSource, "FINDING_SOURCE_", {}),
        (types.ChangeKind, pb.ChangeKind, "CHANGE_KIND_", {}),
        (types.FileType, pb.FileType, "FILE_TYPE_", {"NONE": "UNSPECIFIED"}),
        (types.Termination, pb.Termination, "TERMINATION_", {}),
        (types.CgroupVersion, pb.CgroupVersion, "CGROUP_VERSION_", {"NONE": "UNSPECIFIED"}),
    ],
)
def test_enums_match_the_api_by_value(
    inside: type[Any], outside: Any, prefix: str, renamed: dict[str, str]
) -> None:
    for member in inside:
        assert outside.Name(member.value) == prefix + renamed.get(member.name, member.name)


def test_unknown_enum_values_fall_back_conservatively() -> None:
    msg = pb.ValidateResponse(
        verdict=pb.VERDICT_UNSPECIFIED,
        termination=pb.TERMINATION_UNSPECIFIED,
        findings=[pb.Finding(rule_id="r")],
        changes=[pb.FileChange(path="/a", kind=pb.CHANGE_KIND_UNSPECIFIED)],
    )
    v = conv.validation_from_proto(msg)
    assert v.verdict is types.Verdict.DENY  # the API: unset means deny
    assert v.findings[0].verdict is types.Verdict.DENY
    assert v.findings[0].severity is types.Severity.CRITICAL
    assert v.changes[0].kind is types.ChangeKind.MODIFIED
    # A value from a newer daemon (not in the enum at all) is read, not rejected.
    future = pb.ValidateResponse()
    future.ParseFromString(
        pb.ValidateResponse(verdict=pb.VERDICT_ALLOW)
        .SerializeToString()
        .replace(b"\x10\x01", b"\x10\x07")
    )
    assert future.verdict == 7
    assert conv.validation_from_proto(future).verdict is types.Verdict.DENY


def test_request_from_proto_keeps_shape_only() -> None:
    msg = pb.ValidateRequest(command="", cwd="relative", env={"b": "2", "a": "1"})
    req = conv.validate_request_from_proto(msg)
    assert req == types.ValidateRequest(command="", cwd="relative", env=(("a", "1"), ("b", "2")))
    assert req.timeout_s is None and req.uid is None and req.gid is None


def test_request_timeout_zero_and_negative_are_kept() -> None:
    zero = pb.ValidateRequest(timeout=duration_pb2.Duration())
    assert conv.validate_request_from_proto(zero).timeout_s == 0.0
    negative = pb.ValidateRequest(timeout=duration_pb2.Duration(seconds=-1, nanos=-500_000_000))
    assert conv.validate_request_from_proto(over_the_wire(negative)).timeout_s == -1.5
    back = conv.validate_request_to_proto(types.ValidateRequest("c", "/", (), timeout_s=-1.5))
    assert (back.timeout.seconds, back.timeout.nanos) == (-1, -500_000_000)


def test_request_uid_zero_is_set() -> None:
    msg = over_the_wire(conv.validate_request_to_proto(types.ValidateRequest("c", "/", (), uid=0)))
    assert msg.HasField("uid") and not msg.HasField("gid")
    req = conv.validate_request_from_proto(msg)
    assert req.uid == 0 and req.gid is None


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (types.ValidateRequest("c", "/", (), timeout_s=math.nan), "INVALID_TIMEOUT"),
        (types.ValidateRequest("c", "/", (), timeout_s=math.inf), "INVALID_TIMEOUT"),
        (types.ValidateRequest("c", "/", (), timeout_s=1e12), "INVALID_TIMEOUT"),
        (types.ValidateRequest("c", "/", (), uid=-1), "INVALID_ARGUMENT"),
        (types.ValidateRequest("c", "/", (), gid=2**32), "INVALID_ARGUMENT"),
        (types.ValidateRequest("c\udcff", "/", ()), "INVALID_ENCODING"),
        (types.ValidateRequest("c", "/", (("K", "\udcff"),)), "INVALID_ENCODING"),
    ],
)
def test_request_to_proto_rejects_what_the_wire_cannot_carry(
    req: types.ValidateRequest, reason: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        conv.validate_request_to_proto(req)
    assert info.value.reason == reason


def test_capabilities_round_trip() -> None:
    caps = types.Capabilities(
        daemon_version="0.1.0",
        kernel_release="6.1.0-test",
        namespaces=("mnt", "pid", "net"),
        overlayfs=True,
        cgroup_version=types.CgroupVersion.V1,
        cgroup_controllers=("memory", "pids"),
        seccomp=True,
        seccomp_user_notification=False,
        limits=types.Limits(
            default_timeout_s=12.5,
            max_timeout_s=60.0,
            memory_bytes=3 * 1024**3,
            pids=77,
            scratch_bytes=1,
            output_bytes=2,
            command_bytes=3,
            concurrent_validations=4,
            changes=5,
        ),
        allow_self_approval=True,
    )
    msg = over_the_wire(conv.capabilities_to_proto(caps))
    assert (
        msg.limits.default_timeout.seconds == 12 and msg.limits.default_timeout.nanos == 5 * 10**8
    )
    assert list(msg.namespaces) == ["mnt", "pid", "net"]
    assert msg.allow_self_approval
    assert conv.capabilities_from_proto(msg) == caps


def test_limits_not_in_the_api_keep_their_defaults() -> None:
    inside = types.Limits(diff_file_bytes=1, diff_total_bytes=2, env_bytes=3)
    back = conv.limits_from_proto(conv.limits_to_proto(inside))
    assert back == dataclasses.replace(
        inside,
        diff_file_bytes=types.Limits.diff_file_bytes,
        diff_total_bytes=types.Limits.diff_total_bytes,
        env_bytes=types.Limits.env_bytes,
    )


# --- status -------------------------------------------------------------------------

ERRORS = [
    (InvalidRequest("no dir /tmp/café ✓", reason="INVALID_CWD"), grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied("uid needs root"), grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted("too many"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("shutting down", reason="SHUTTING_DOWN"), grpc.StatusCode.UNAVAILABLE),
    (Cancelled("caller left"), grpc.StatusCode.CANCELLED),
    (SandboxError("overlay mount failed", reason="OVERLAY_FAILED"), grpc.StatusCode.INTERNAL),
    (AirlockError("something else"), grpc.StatusCode.UNKNOWN),
]


@pytest.mark.parametrize(("err", "code"), ERRORS)
def test_to_rpc_status_carries_code_message_and_error_info(
    err: AirlockError, code: grpc.StatusCode
) -> None:
    assert status_code_of(err) is code
    status = to_rpc_status(err)
    assert status.code is code
    assert status.details == err.message
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    assert rich.code == code.value[0] and rich.message == err.message
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert (info.reason, info.domain) == (err.reason, DOMAIN)


def test_subclass_of_a_mapped_error_keeps_its_parents_code() -> None:
    class NoCwd(InvalidRequest):
        pass

    assert status_code_of(NoCwd("x")) is grpc.StatusCode.INVALID_ARGUMENT


class _Aborting(pb_grpc.SandboxServiceServicer):
    """A stand-in daemon that fails every call the way the real one will."""

    def __init__(self) -> None:
        self.error: AirlockError | Exception = AirlockError("unset")
        self.release = threading.Event()

    def Validate(self, request: pb.ValidateRequest, context: Any) -> pb.ValidateResponse:
        if request.command == "block":
            self.release.wait(30)
            return pb.ValidateResponse()
        if isinstance(self.error, AirlockError):
            context.abort_with_status(to_rpc_status(self.error))
        raise self.error

    def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Any
    ) -> pb.GetCapabilitiesResponse:
        raise NotImplementedError


@pytest.fixture
def aborting(tmp_path: Any) -> Iterator[tuple[_Aborting, str]]:
    servicer = _Aborting()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    socket = os.path.join(tmp_path, "airlock.sock")
    server.add_insecure_port("unix:" + socket)
    server.start()
    try:
        yield servicer, socket
    finally:
        servicer.release.set()
        server.stop(None).wait()


@pytest.mark.parametrize(("err", "code"), ERRORS)
def test_errors_cross_grpc_as_the_same_class(
    aborting: tuple[_Aborting, str], err: AirlockError, code: grpc.StatusCode
) -> None:
    servicer, socket = aborting
    servicer.error = err
    with Client(socket) as client, pytest.raises(AirlockError) as info:
        client.validate("true", cwd="/")
    got = info.value
    assert type(got) is type(err)
    assert (got.message, got.reason) == (err.message, err.reason)
    assert status_code_of(got) is code
    assert got.__cause__ is None and got.__suppress_context__


def test_unexpected_server_exception_is_unknown(aborting: tuple[_Aborting, str]) -> None:
    servicer, socket = aborting
    servicer.error = RuntimeError("boom")
    with Client(socket) as client, pytest.raises(AirlockError) as info:
        client.validate("true", cwd="/")
    assert type(info.value) is AirlockError
    assert info.value.reason == "UNKNOWN"


def test_deadline_is_reported_without_borrowing_a_server_reason(
    aborting: tuple[_Aborting, str],
) -> None:
    _, socket = aborting
    with Client(socket, timeout=0.2) as client, pytest.raises(AirlockError) as info:
        client.validate("block", cwd="/")
    assert type(info.value) is AirlockError
    assert info.value.reason == "DEADLINE_EXCEEDED"


def test_unreachable_daemon_is_unavailable_and_names_the_socket(tmp_path: Any) -> None:
    socket = os.path.join(tmp_path, "nobody-home.sock")
    with Client(socket) as client, pytest.raises(Unavailable) as info:
        client.capabilities()
    assert info.value.reason == "UNAVAILABLE"
    assert socket in info.value.message
    assert "No such file or directory" in info.value.message


class _BareRpcError(grpc.RpcError):  # type: ignore[misc]
    """A failed call as gRPC hands it over, with no Airlock details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.INTERNAL, SandboxError),
        (grpc.StatusCode.UNIMPLEMENTED, AirlockError),
        (grpc.StatusCode.CANCELLED, Cancelled),
    ],
)
def test_status_without_error_info_takes_the_code_name_as_reason(
    code: grpc.StatusCode, cls: type[AirlockError]
) -> None:
    # e.g. gRPC's own "Received message larger than max": not TOO_MANY_VALIDATIONS.
    err = from_rpc_error(_BareRpcError(code, "said gRPC"))
    assert type(err) is cls
    assert (err.message, err.reason) == ("said gRPC", code.name)


def test_foreign_error_info_domain_is_ignored() -> None:
    status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="m")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="X", domain="example.com"))

    class WithDetails(_BareRpcError):
        def trailing_metadata(self) -> Any:
            return (("grpc-status-details-bin", status.SerializeToString()),)

    err = from_rpc_error(WithDetails(grpc.StatusCode.INTERNAL, "m"))
    assert err.reason == "INTERNAL"


@given(
    st.builds(
        types.PolicyInfo,
        version=TEXT,
        directory=TEXT,
        files=st.lists(TEXT, max_size=3).map(tuple),
        rule_count=UINT32,
        loaded_at=st.integers(0, 2**40).map(lambda ns: ns / 1_000_000_000),
        last_reload_error=TEXT,
        last_reload_at=st.integers(0, 2**40).map(lambda ns: ns / 1_000_000_000),
        last_reload_refused=st.booleans(),
        last_reload_version=TEXT,
        rules_added=st.lists(TEXT, max_size=3).map(tuple),
        rules_removed=st.lists(TEXT, max_size=3).map(tuple),
        files_added=st.lists(TEXT, max_size=3).map(tuple),
        files_removed=st.lists(TEXT, max_size=3).map(tuple),
    )
)
def test_policy_info_round_trip(info: types.PolicyInfo) -> None:
    assert conv.policy_from_proto(conv.policy_to_proto(info)) == info


# --- audit events -------------------------------------------------------------------


def test_events_convert_to_the_api_and_back_losslessly() -> None:
    """What the client rebuilds re-encodes to the stored bytes: an export can be re-verified."""
    samples = [audit_event(i) for i in range(20)] + [
        audit_event(
            0,
            caller=Caller(uid=5, pid=0, gid=-1, exe=""),
            verdict=None,
            approval=Approval(False, Authorization.SESSION_GRANTED, "session s-1"),
            outcome=Outcome(exit_code=-9, applied_paths=("/a\\xff", "/b"), error="APPLY_CONFLICT"),
            command="printf '\\x1b[31m' \u2028 caf\u00e9",
        )
    ]
    for n, e in enumerate(samples, start=1):
        stored = StoredEvent(seq=n, prev_hash="0" * 64, hash=f"{n:064x}", event=e)
        msg = conv.audit_event_to_proto(stored)
        back = conv.audit_event_from_proto(type(msg).FromString(msg.SerializeToString()))
        assert back == stored and encode_event(back.event) == encode_event(e)
    for result in (
        VerifyResult(events=0, head=None),
        VerifyResult(events=7, head=Anchor(7, "c" * 64)),
        VerifyResult(
            events=2,
            head=Anchor(2, "d" * 64),
            problem=VerifyProblem(ProblemKind.REORDERED, 3, "moved"),
        ),
        VerifyResult(events=0, head=None, problem=VerifyProblem(ProblemKind.EDITED, 1, "edited")),
    ):
        assert conv.verify_result_from_proto(conv.verify_result_to_proto(result)) == result


@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
        st.integers(-(10**9), 10**9).map(lambda n: n / 1024),  # 1/1024 s = 976,562.5 ns: ties
        st.integers(-(10**15), 10**15).map(lambda n: n / 10**9),
    )
)
def test_durations_are_the_nearest_nanosecond_ties_to_even(seconds: float) -> None:
    want = round(Fraction(seconds) * 10**9)
    assert conv._nearest_nanoseconds(seconds) == want
    d = conv._duration_to_proto(seconds)
    assert d.seconds * 10**9 + d.nanos == want


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_duration_that_is_no_number_is_refused(bad: float) -> None:
    with pytest.raises((ValueError, OverflowError)):
        conv._duration_to_proto(bad)


# --- Execute's process batches ----------------------------------------------------------


def _exec_events(processes: list[types.ProcessInfo]) -> list[types.ExecEvent]:
    started = types.ExecStarted(
        execution_id="x",
        verdict=types.Verdict.ALLOW,
        authorization="POLICY_ALLOWED",
        findings=(),
        uid=0,
        gid=0,
        policy_version="p",
    )
    output = types.ExecOutput(1, 0.5, b"out\n")
    finished = types.ExecFinished(
        termination=types.Termination.EXITED,
        exit_code=0,
        signal=0,
        wall_s=1.0,
        resource_usage=types.ResourceUsage(),
        stdout_truncated=False,
        stderr_truncated=False,
        stdout_bytes=4,
        stderr_bytes=0,
        warm=True,
    )
    return [started, output, *processes, finished]


def test_process_batches_carry_the_same_events_bounded_in_bytes() -> None:
    """With process_batches, the processes go in ProcessBatch messages of at most
    PROCESS_BATCH_BYTES each (large argvs split them), and read back as the very events that
    go one by one without it."""
    big = [
        types.ProcessInfo(pid=i + 2, ppid=1, argv=(b"cc", b"x" * 4000, str(i).encode()))
        for i in range(700)
    ]
    small = [types.ProcessInfo(pid=i + 2, ppid=1, argv=(b"true",), uid=0) for i in range(5)]
    for processes in (big, small, []):
        events = _exec_events(processes)
        one_by_one = [over_the_wire(m) for m in conv.exec_events_to_proto(events)]
        batched = [
            over_the_wire(m) for m in conv.exec_events_to_proto(events, process_batches=True)
        ]
        assert [m.WhichOneof("event") for m in one_by_one].count("process") == len(processes)
        assert "process_batch" not in [m.WhichOneof("event") for m in one_by_one]
        batches = [m for m in batched if m.WhichOneof("event") == "process_batch"]
        assert "process" not in [m.WhichOneof("event") for m in batched]
        assert all(m.ByteSize() <= conv.PROCESS_BATCH_BYTES + 64 for m in batches)
        assert len(batches) == (0 if not processes else 1 if processes is small else 3)
        back = [e for m in batched for e in conv.exec_events_from_proto(m)]
        assert back == [e for m in one_by_one for e in conv.exec_events_from_proto(m)]
        assert back == events


def test_the_typed_client_asks_for_process_batches() -> None:
    req = types.ExecuteRequest(command="true", cwd="/tmp", env=())
    assert conv.execute_request_to_proto(req).process_batches
