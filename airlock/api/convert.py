"""The one module that converts between protobuf messages and ``airlock.types``.

Protobuf exists only at the edge (the daemon's servicer and the client); everything
inside sees the frozen dataclasses of :mod:`airlock.types`. Both directions live here
so that every field is mapped in exactly one place.

Conventions:

* Durations become float seconds (``(seconds * 10**9 + nanos) / 10**9``, so the sign
  is preserved); float seconds become the nearest whole nanosecond.
* ``optional`` scalar fields map to ``None`` when unset, and back.
* Enums map by value. A value the inside enum does not have (0 = *unspecified*, or a
  value added by a newer peer) maps to a conservative fallback rather than failing:
  verdict DENY (as the API asks), severity CRITICAL, source BUILTIN, change kind
  MODIFIED, file type OTHER, termination SIGNALED, cgroup version NONE.
* Paths are bytes inside. On the wire ``path`` is their UTF-8 decoding with invalid
  bytes written as ``\\xNN`` and ``raw_path`` holds the exact bytes only when they are
  not valid UTF-8. ``symlink_target`` is decoded the same way, but the API has no raw
  twin for it, so a non-UTF-8 target comes back with its escapes as literal text.

``*_from_proto`` functions check shape only, never values: checking is the engine's job.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from airlock import audit, types
from airlock._errors import InvalidRequest
from airlock.v1 import sandbox_pb2 as pb

__all__ = [
    "capabilities_from_proto",
    "capabilities_to_proto",
    "change_from_proto",
    "change_to_proto",
    "finding_from_proto",
    "finding_to_proto",
    "limits_from_proto",
    "limits_to_proto",
    "validate_request_from_proto",
    "validate_request_to_proto",
    "validation_from_proto",
    "validation_to_proto",
]

_NANOS_PER_SECOND = 1_000_000_000
# The range google.protobuf.Duration allows: +-10,000 years.
_MAX_DURATION_S = 315_576_000_000

_E = TypeVar("_E", bound=enum.IntEnum)


# --- scalars -------------------------------------------------------------------------


def _duration_to_proto(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(_nearest_nanoseconds(seconds))
    return d


def _nearest_nanoseconds(seconds: float) -> int:
    """Exact: the nearest whole nanosecond to the float's true value, ties to even (what
    ``round(Fraction(seconds) * 10**9)`` gives, in integers: 0.8 µs instead of 4.9; a
    validation's answer holds nine durations)."""
    num, den = seconds.as_integer_ratio()  # ValueError for NaN, OverflowError for infinities
    q, r = divmod(num * _NANOS_PER_SECOND, den)  # floor: 0 <= r < den
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    return q


def _duration_from_proto(d: duration_pb2.Duration) -> float:
    # One correctly rounded division: the exact inverse of _duration_to_proto for
    # every float that is the nearest one to a whole number of nanoseconds (up to 2**52
    # ns, about 52 days; beyond, floats are coarser than a nanosecond anyway).
    return (d.seconds * _NANOS_PER_SECOND + d.nanos) / _NANOS_PER_SECOND


def _enum_from_proto(cls: type[_E], value: int, fallback: _E) -> _E:
    try:
        return cls(value)
    except ValueError:
        return fallback


def _decode_path(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _checked_str(field: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} is not valid UTF-8", reason="INVALID_ENCODING") from None
    return value


def _checked_uint32(field: str, value: int) -> int:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise InvalidRequest(f"{field} must be between 0 and 4294967295, not {value}")
    return value


# --- ValidateRequest -------------------------------------------------------------------


def validate_request_to_proto(req: types.ValidateRequest) -> pb.ValidateRequest:
    """Build the wire request.

    Raises :class:`~airlock.InvalidRequest` for values the wire cannot carry at all
    (strings that are not UTF-8, a non-finite timeout, an id outside uint32); every
    other check is left to the daemon.
    """
    msg = pb.ValidateRequest(
        command=_checked_str("command", req.command),
        cwd=_checked_str("cwd", req.cwd),
    )
    for key, value in req.env:
        msg.env[_checked_str("env name", key)] = _checked_str(f"env value of {key}", value)
    if req.timeout_s is not None:
        if not math.isfinite(req.timeout_s) or abs(req.timeout_s) > _MAX_DURATION_S:
            raise InvalidRequest(
                f"timeout must be a finite number of seconds, not {req.timeout_s}",
                reason="INVALID_TIMEOUT",
            )
        msg.timeout.CopyFrom(_duration_to_proto(req.timeout_s))
    if req.uid is not None:
        msg.uid = _checked_uint32("uid", req.uid)
    if req.gid is not None:
        msg.gid = _checked_uint32("gid", req.gid)
    msg.force_dry_run = req.force_dry_run
    msg.session_id = _checked_str("session_id", req.session_id)
    if req.agent is not None:
        msg.agent.CopyFrom(agent_to_proto(req.agent))
    return msg


_AGENT_FIELDS = (
    "agent_name",
    "agent_version",
    "session_id",
    "tool_use_id",
    "tool_description",
    "transcript_path",
    "prompt_excerpt",
)


def agent_to_proto(a: types.AgentContext) -> pb.AgentContext:
    return pb.AgentContext(
        **{name: _checked_str(f"agent.{name}", getattr(a, name)) for name in _AGENT_FIELDS}
    )


def agent_from_proto(msg: pb.AgentContext) -> types.AgentContext | None:
    """The agent context as sent; None when it is empty (unset)."""
    agent = types.AgentContext(**{name: getattr(msg, name) for name in _AGENT_FIELDS})
    return None if agent.is_empty() else agent


def validate_request_from_proto(msg: pb.ValidateRequest) -> types.ValidateRequest:
    """Read the wire request as it is; the engine validates the values."""
    return types.ValidateRequest(
        command=msg.command,
        cwd=msg.cwd,
        env=tuple(sorted(msg.env.items())),
        timeout_s=_duration_from_proto(msg.timeout) if msg.HasField("timeout") else None,
        uid=msg.uid if msg.HasField("uid") else None,
        gid=msg.gid if msg.HasField("gid") else None,
        force_dry_run=msg.force_dry_run,
        session_id=msg.session_id,
        agent=agent_from_proto(msg.agent) if msg.HasField("agent") else None,
    )


# --- Execute ---------------------------------------------------------------------------


def execute_request_to_proto(req: types.ExecuteRequest) -> pb.ExecuteRequest:
    """Build the wire request (the same checks as :func:`validate_request_to_proto`)."""
    v = validate_request_to_proto(req.as_validate())
    return pb.ExecuteRequest(
        command=v.command,
        cwd=v.cwd,
        env=v.env,
        timeout=v.timeout if v.HasField("timeout") else None,
        uid=v.uid if v.HasField("uid") else None,
        gid=v.gid if v.HasField("gid") else None,
        approval_token=_checked_str("approval_token", req.approval_token),
        session_id=_checked_str("session_id", req.session_id),
        agent=agent_to_proto(req.agent) if req.agent is not None else None,
        # This library reads ProcessBatch events (exec_events_from_proto).
        process_batches=True,
    )


def execute_request_from_proto(msg: pb.ExecuteRequest) -> types.ExecuteRequest:
    return types.ExecuteRequest(
        command=msg.command,
        cwd=msg.cwd,
        env=tuple(sorted(msg.env.items())),
        timeout_s=_duration_from_proto(msg.timeout) if msg.HasField("timeout") else None,
        uid=msg.uid if msg.HasField("uid") else None,
        gid=msg.gid if msg.HasField("gid") else None,
        approval_token=msg.approval_token,
        session_id=msg.session_id,
        agent=agent_from_proto(msg.agent) if msg.HasField("agent") else None,
    )


_AUTHORIZATIONS = {
    "USER_VERIFIED": pb.AUTHORIZATION_USER_VERIFIED,
    "SESSION_GRANTED": pb.AUTHORIZATION_SESSION_GRANTED,
    "POLICY_ALLOWED": pb.AUTHORIZATION_POLICY_ALLOWED,
    "AUTO_APPROVED": pb.AUTHORIZATION_AUTO_APPROVED,
}


def exec_event_to_proto(e: types.ExecEvent) -> pb.ExecuteResponse:
    if isinstance(e, types.ExecOutput):
        return pb.ExecuteResponse(
            output=pb.OutputChunk(
                stream=pb.OutputStream.ValueType(e.stream),
                data=e.data,
                time=_duration_to_proto(e.time_s),
            )
        )
    if isinstance(e, types.ProcessInfo):
        return pb.ExecuteResponse(process=_process_to_proto(e))
    if isinstance(e, types.NetworkAttemptInfo):
        return pb.ExecuteResponse(network_attempt=network_attempt_to_proto(e))
    if isinstance(e, types.ExecStarted):
        return pb.ExecuteResponse(
            started=pb.ExecuteStarted(
                execution_id=e.execution_id,
                verdict=pb.Verdict.ValueType(e.verdict.value),
                authorization=_AUTHORIZATIONS.get(e.authorization, pb.AUTHORIZATION_UNSPECIFIED),
                findings=[finding_to_proto(f) for f in e.findings],
                uid=e.uid,
                gid=e.gid,
                policy_version=e.policy_version,
            )
        )
    return pb.ExecuteResponse(
        finished=pb.ExecuteFinished(
            termination=pb.Termination.ValueType(e.termination.value),
            exit_code=e.exit_code,
            signal=e.signal,
            wall_time=_duration_to_proto(e.wall_s),
            resource_usage=_usage_to_proto(e.resource_usage),
            stdout_truncated=e.stdout_truncated,
            stderr_truncated=e.stderr_truncated,
            stdout_bytes=e.stdout_bytes,
            stderr_bytes=e.stderr_bytes,
            warm=e.warm,
            network_attempts=[network_attempt_to_proto(a) for a in e.network_attempts],
            network_attempts_lost=e.network_attempts_lost,
        )
    )


# How many bytes of processes one ProcessBatch holds at most (ExecuteRequest.process_batches).
PROCESS_BATCH_BYTES = 1024 * 1024


def exec_events_to_proto(
    events: Iterable[types.ExecEvent], *, process_batches: bool = False
) -> Iterator[pb.ExecuteResponse]:
    """The responses of an Execute's events, in order. With ``process_batches``, consecutive
    processes go as ProcessBatch events of up to PROCESS_BATCH_BYTES each (one gRPC message per
    batch, not per process); a batch is sent before the next event of another kind."""
    held: list[pb.Process] = []
    size = 0
    for e in events:
        if process_batches and isinstance(e, types.ProcessInfo):
            process = _process_to_proto(e)
            grows = process.ByteSize() + 8  # the field's tag and length
            if held and size + grows > PROCESS_BATCH_BYTES:
                yield pb.ExecuteResponse(process_batch=pb.ProcessBatch(processes=held))
                held, size = [], 0
            held.append(process)
            size += grows
            continue
        if held:
            yield pb.ExecuteResponse(process_batch=pb.ProcessBatch(processes=held))
            held, size = [], 0
        yield exec_event_to_proto(e)
    if held:
        yield pb.ExecuteResponse(process_batch=pb.ProcessBatch(processes=held))


def approve_request_from_proto(msg: pb.ApproveRequest) -> tuple[str, types.ApprovalScope]:
    """The validation id and the scope (which must be set: ONCE or SESSION)."""
    if msg.scope not in (pb.APPROVAL_SCOPE_ONCE, pb.APPROVAL_SCOPE_SESSION):
        raise InvalidRequest(
            "scope: must be APPROVAL_SCOPE_ONCE or APPROVAL_SCOPE_SESSION", reason="INVALID_SCOPE"
        )
    return msg.validation_id, types.ApprovalScope(int(msg.scope))


def approve_special_paths_from_proto(msg: pb.ApproveRequest) -> tuple[bytes, ...]:
    """The special files the approval names (exact host path bytes)."""
    return tuple(msg.special_paths)


def approve_response_from_proto(msg: pb.ApproveResponse) -> types.ApprovalGrant:
    return types.ApprovalGrant(
        approval_token=msg.approval_token,
        approval_id=msg.approval_id,
        expires_at=msg.expire_time.seconds + msg.expire_time.nanos / 1e9,
        approver_uid=msg.approver_uid,
    )


def approve_response_to_proto(g: types.ApprovalGrant) -> pb.ApproveResponse:
    return pb.ApproveResponse(
        approval_token=g.approval_token,
        approval_id=g.approval_id,
        expire_time=_timestamp(g.expires_at),
        approver_uid=g.approver_uid,
    )


def pending_to_proto(p: types.PendingValidation) -> pb.PendingValidation:
    msg = pb.PendingValidation(
        validation_id=p.validation_id,
        command=p.command,
        cwd=p.cwd,
        uid=p.uid,
        gid=p.gid,
        session_id=p.session_id,
        summary=p.summary,
        create_time=_timestamp(p.created_at),
        expire_time=_timestamp(p.expires_at),
    )
    if p.agent is not None:
        msg.agent.CopyFrom(agent_to_proto(p.agent))
    if p.validation is not None:
        msg.dry_run.CopyFrom(validation_to_proto(p.validation))
    return msg


def pending_from_proto(msg: pb.PendingValidation) -> types.PendingValidation:
    return types.PendingValidation(
        validation_id=msg.validation_id,
        command=msg.command,
        cwd=msg.cwd,
        uid=msg.uid,
        gid=msg.gid,
        session_id=msg.session_id,
        summary=msg.summary,
        created_at=msg.create_time.ToNanoseconds() / 1_000_000_000,
        expires_at=msg.expire_time.ToNanoseconds() / 1_000_000_000,
        agent=agent_from_proto(msg.agent) if msg.HasField("agent") else None,
        validation=validation_from_proto(msg.dry_run) if msg.HasField("dry_run") else None,
    )


def apply_response_to_proto(a: types.ApplyOutcome) -> pb.ApplyResponse:
    return pb.ApplyResponse(
        validation_id=a.validation_id,
        applied_paths=[_decode_path(p) for p in a.applied_paths],
        replayed=a.replayed,
        bytes_written=a.bytes_written,
        duration=_duration_to_proto(a.duration_s),
    )


def apply_response_from_proto(msg: pb.ApplyResponse) -> types.ApplyOutcome:
    return types.ApplyOutcome(
        validation_id=msg.validation_id,
        applied_paths=tuple(p.encode() for p in msg.applied_paths),
        replayed=msg.replayed,
        bytes_written=msg.bytes_written,
        duration_s=_duration_from_proto(msg.duration),
    )


def exec_events_from_proto(msg: pb.ExecuteResponse) -> tuple[types.ExecEvent, ...]:
    """The events of one Execute response: each process of a ProcessBatch, else one event."""
    if msg.WhichOneof("event") == "process_batch":
        return tuple(_process_from_proto(p) for p in msg.process_batch.processes)
    return (exec_event_from_proto(msg),)


def exec_event_from_proto(msg: pb.ExecuteResponse) -> types.ExecEvent:
    """The event of one Execute response that holds one (not a ProcessBatch)."""
    kind = msg.WhichOneof("event")
    if kind == "output":
        o = msg.output
        return types.ExecOutput(int(o.stream), _duration_from_proto(o.time), o.data)
    if kind == "process":
        return _process_from_proto(msg.process)
    if kind == "network_attempt":
        return network_attempt_from_proto(msg.network_attempt)
    if kind == "started":
        s = msg.started
        names = {v: k for k, v in _AUTHORIZATIONS.items()}
        return types.ExecStarted(
            execution_id=s.execution_id,
            verdict=_enum_from_proto(types.Verdict, s.verdict, types.Verdict.DENY),
            authorization=names.get(s.authorization, "UNSPECIFIED"),
            findings=tuple(finding_from_proto(f) for f in s.findings),
            uid=s.uid,
            gid=s.gid,
            policy_version=s.policy_version,
        )
    if kind == "finished":
        f = msg.finished
        return types.ExecFinished(
            termination=_enum_from_proto(
                types.Termination, f.termination, types.Termination.EXITED
            ),
            exit_code=f.exit_code,
            signal=f.signal,
            wall_s=_duration_from_proto(f.wall_time),
            resource_usage=_usage_from_proto(f.resource_usage),
            stdout_truncated=f.stdout_truncated,
            stderr_truncated=f.stderr_truncated,
            stdout_bytes=f.stdout_bytes,
            stderr_bytes=f.stderr_bytes,
            warm=f.warm,
            network_attempts=tuple(network_attempt_from_proto(a) for a in f.network_attempts),
            network_attempts_lost=f.network_attempts_lost,
        )
    raise InvalidRequest("an Execute event with no content", reason="MALFORMED_RESPONSE")


# --- Validation ------------------------------------------------------------------------


def finding_to_proto(f: types.Finding) -> pb.Finding:
    return pb.Finding(
        rule_id=f.rule_id,
        verdict=pb.Verdict.ValueType(f.verdict.value),
        severity=pb.Severity.ValueType(f.severity.value),
        message=f.message,
        source=pb.FindingSource.ValueType(f.source.value),
        subcommand=f.subcommand,
        span_start=f.span[0],
        span_end=f.span[1],
    )


def finding_from_proto(msg: pb.Finding) -> types.Finding:
    return types.Finding(
        rule_id=msg.rule_id,
        verdict=_enum_from_proto(types.Verdict, msg.verdict, types.Verdict.DENY),
        severity=_enum_from_proto(types.Severity, msg.severity, types.Severity.CRITICAL),
        message=msg.message,
        source=_enum_from_proto(types.FindingSource, msg.source, types.FindingSource.BUILTIN),
        subcommand=msg.subcommand,
        span=(msg.span_start, msg.span_end),
    )


def _make_change(make: Callable[..., pb.FileChange], c: types.FileChange) -> pb.FileChange:
    """``make(**fields)``: the message of ``c`` (a new one, or one added to a response).

    Enums go as they are (an ``IntEnum`` is its value) and an unset optional as None,
    which the message constructor leaves unset. The fields most changes leave at their
    default (those below the constructor) are set only when they are not: each keyword
    costs the constructor about as much as a test here and a set.
    """
    path = c.path
    msg = make(
        path=path.decode("utf-8", errors="backslashreplace"),
        kind=c.kind,
        file_type=c.file_type,
        in_workspace=c.in_workspace,
        size_before=c.size_before,
        size_after=c.size_after,
        sha256_after=c.sha256_after,
        mode_before=c.mode_before,
        mode_after=c.mode_after,
        uid_after=c.uid_after,
        gid_after=c.gid_after,
        unified_diff=c.unified_diff,
    )
    if c.previous_file_type:
        msg.previous_file_type = pb.FileType.ValueType(c.previous_file_type)
    if c.symlink_target:
        msg.symlink_target = _decode_path(c.symlink_target)
    if c.binary:
        msg.binary = True
    if c.diff_truncated:
        msg.diff_truncated = True
    if c.entries_deleted:
        msg.entries_deleted = c.entries_deleted
    if c.unreadable:
        msg.unreadable = True
    if c.other_type:
        msg.other_type = pb.OtherType.ValueType(c.other_type)
    if c.capabilities:
        msg.capabilities = c.capabilities
    if c.links:
        msg.links = c.links
    if c.linked_to:
        msg.linked_to = _decode_path(c.linked_to)
    if not (path.isascii() or _is_utf8(path)):
        msg.raw_path = path
    return msg


def change_to_proto(c: types.FileChange) -> pb.FileChange:
    return _make_change(pb.FileChange, c)


# Enum values to members: a dict lookup instead of a call of the enum per field.
_CHANGE_KINDS = {m.value: m for m in types.ChangeKind}
_FILE_TYPES = {m.value: m for m in types.FileType}
_OTHER_TYPES = {m.value: m for m in types.OtherType}
_MODIFIED = types.ChangeKind.MODIFIED
_OTHER = types.FileType.OTHER
_NO_OTHER = types.OtherType.NONE


def change_from_proto(msg: pb.FileChange) -> types.FileChange:
    return _new_change(_change_fields(msg))


def _change_fields(msg: pb.FileChange) -> dict[str, object]:
    """The fields of the change ``msg`` by name, in the order of FileChange's (checked at
    import: see :func:`_direct_ok`)."""
    has = msg.HasField
    return {
        "path": msg.raw_path or msg.path.encode("utf-8"),
        "kind": _CHANGE_KINDS.get(msg.kind, _MODIFIED),
        "file_type": _FILE_TYPES.get(msg.file_type, _OTHER),
        "previous_file_type": _FILE_TYPES.get(msg.previous_file_type, _OTHER),
        "in_workspace": msg.in_workspace,
        "size_before": msg.size_before if has("size_before") else None,
        "size_after": msg.size_after if has("size_after") else None,
        "sha256_after": msg.sha256_after,
        "mode_before": msg.mode_before if has("mode_before") else None,
        "mode_after": msg.mode_after if has("mode_after") else None,
        "uid_after": msg.uid_after if has("uid_after") else None,
        "gid_after": msg.gid_after if has("gid_after") else None,
        "symlink_target": msg.symlink_target.encode("utf-8"),
        "unified_diff": msg.unified_diff,
        "binary": msg.binary,
        "diff_truncated": msg.diff_truncated,
        "entries_deleted": msg.entries_deleted,
        "unreadable": msg.unreadable,
        "other_type": _OTHER_TYPES.get(msg.other_type, _NO_OTHER),
        "capabilities": msg.capabilities,
        "links": msg.links,
        "linked_to": msg.linked_to.encode("utf-8"),
    }


def _new_change_direct(fields: dict[str, object]) -> types.FileChange:
    """A :class:`~airlock.types.FileChange` of exactly these fields, made without its
    ``__init__``: the frozen dataclass's sets each of its 22 fields through
    ``object.__setattr__`` (~2 us); installing the instance dictionary at once gives an
    equal object in a fifth of the time (the answer to a dry run of thousands of new files
    holds thousands). Used only when :func:`_direct_ok` finds that equivalent."""
    change: types.FileChange = _object_new(types.FileChange)
    _object_setattr(change, "__dict__", fields)
    return change


def _new_change_init(fields: dict[str, object]) -> types.FileChange:
    return types.FileChange(**fields)  # type: ignore[arg-type]


def _direct_ok() -> bool:
    """Whether :func:`_new_change_direct` makes what ``FileChange(**fields)`` does: no slots,
    no ``__post_init__``, and :func:`change_from_proto` names exactly its fields, in order."""
    cls = types.FileChange
    if hasattr(cls, "__slots__") or hasattr(cls, "__post_init__"):
        return False
    return list(_change_fields(pb.FileChange())) == [f.name for f in dataclasses.fields(cls)]


_object_new = object.__new__
_object_setattr = object.__setattr__
_new_change = _new_change_direct if _direct_ok() else _new_change_init


def _timings_to_proto(t: types.Timings) -> pb.Timings:
    return pb.Timings(
        static_analysis=_duration_to_proto(t.static_analysis_s),
        sandbox=_duration_to_proto(t.sandbox_s),
        diff=_duration_to_proto(t.diff_s),
        total=_duration_to_proto(t.total_s),
        sandbox_setup=_duration_to_proto(t.sandbox_setup_s),
        command=_duration_to_proto(t.command_s),
        warm=t.warm,
    )


def _timings_from_proto(msg: pb.Timings) -> types.Timings:
    return types.Timings(
        static_analysis_s=_duration_from_proto(msg.static_analysis),
        sandbox_s=_duration_from_proto(msg.sandbox),
        diff_s=_duration_from_proto(msg.diff),
        total_s=_duration_from_proto(msg.total),
        sandbox_setup_s=_duration_from_proto(msg.sandbox_setup),
        command_s=_duration_from_proto(msg.command),
        warm=msg.warm,
    )


def _usage_to_proto(u: types.ResourceUsage) -> pb.ResourceUsage:
    return pb.ResourceUsage(
        peak_memory_bytes=u.peak_memory_bytes,
        cpu_time=_duration_to_proto(u.cpu_time_s),
        memory_limit_hit=u.memory_limit_hit,
        pids_limit_hit=u.pids_limit_hit,
        scratch_bytes_used=u.scratch_bytes_used,
    )


def _usage_from_proto(msg: pb.ResourceUsage) -> types.ResourceUsage:
    return types.ResourceUsage(
        peak_memory_bytes=msg.peak_memory_bytes,
        cpu_time_s=_duration_from_proto(msg.cpu_time),
        memory_limit_hit=msg.memory_limit_hit,
        pids_limit_hit=msg.pids_limit_hit,
        scratch_bytes_used=msg.scratch_bytes_used,
    )


def validation_to_proto(v: types.Validation) -> pb.ValidateResponse:
    msg = pb.ValidateResponse(
        validation_id=v.validation_id,
        verdict=pb.Verdict.ValueType(v.verdict.value),
        summary=v.summary,
        findings=[finding_to_proto(f) for f in v.findings],
        sandboxed=v.sandboxed,
        termination=pb.Termination.ValueType(v.termination.value),
        exit_code=v.exit_code,
        signal=v.signal,
        stdout=v.stdout,
        stdout_truncated=v.stdout_truncated,
        stderr=v.stderr,
        stderr_truncated=v.stderr_truncated,
        changes_truncated=v.changes_truncated,
        timings=_timings_to_proto(v.timings),
        resource_usage=_usage_to_proto(v.resource_usage),
        uid=v.uid,
        gid=v.gid,
        dry_run_skip=pb.DryRunSkip.ValueType(v.dry_run_skip.value),
        static_analysis=_static_to_proto(v.static),
        policy_version=v.policy_version,
        processes=[_process_to_proto(p) for p in v.processes],
        processes_truncated=v.processes_truncated,
        sensitive_reads=[
            pb.SensitiveRead(
                path=_decode_path(r.path),
                pid=r.pid or 0,
                argv=[_decode_path(a) for a in r.argv],
                count=r.count,
            )
            for r in v.sensitive_reads
        ],
        sensitive_reads_incomplete=v.sensitive_reads_incomplete,
        network_attempts=[network_attempt_to_proto(a) for a in v.network_attempts],
        network_attempts_lost=v.network_attempts_lost,
        changes_digest=v.changes_digest,
        changes_not_kept=v.changes_not_kept,
    )
    # Each change built in place in the response, not built apart and then copied in.
    add = msg.changes.add
    for c in v.changes:
        _make_change(add, c)
    return msg


def network_attempt_to_proto(a: types.NetworkAttemptInfo) -> pb.NetworkAttempt:
    return pb.NetworkAttempt(
        protocol=pb.NetworkProtocol.ValueType(a.protocol.value),
        address=a.address,
        port=a.port,
        dns_name=a.dns_name,
        dns_type=a.dns_type,
        payload_prefix=a.payload_prefix,
        tls_server_name=a.sni,
        http_method=a.http_method,
        http_host=a.http_host,
        http_path=a.http_path,
        bytes_sent=a.bytes_sent,
        time=_duration_to_proto(a.time_s),
        forwarded=a.forwarded,
        grant=a.grant,
        refusal=a.refusal,
        refusal_detail=a.refusal_detail,
        bytes_received=a.bytes_received,
        upstream_address=a.upstream_address,
    )


def network_attempt_from_proto(msg: pb.NetworkAttempt) -> types.NetworkAttemptInfo:
    return types.NetworkAttemptInfo(
        protocol=_enum_from_proto(types.NetProtocol, msg.protocol, types.NetProtocol.TCP),
        address=msg.address,
        port=msg.port,
        dns_name=msg.dns_name,
        dns_type=msg.dns_type,
        payload_prefix=msg.payload_prefix,
        sni=msg.tls_server_name,
        http_method=msg.http_method,
        http_host=msg.http_host,
        http_path=msg.http_path,
        bytes_sent=msg.bytes_sent,
        time_s=_duration_from_proto(msg.time),
        forwarded=msg.forwarded,
        grant=msg.grant,
        refusal=msg.refusal,
        refusal_detail=msg.refusal_detail,
        bytes_received=msg.bytes_received,
        upstream_address=msg.upstream_address,
    )


def _process_to_proto(p: types.ProcessInfo) -> pb.Process:
    msg = pb.Process(
        pid=p.pid or 0,
        ppid=p.ppid or 0,
        argv=[_decode_path(a) for a in p.argv],
        executables=[_decode_path(e) for e in p.executables],
        cwd=_decode_path(p.cwd),
        outlived_command=p.outlived_command,
        killed_by_timeout=p.killed_by_timeout,
        argv_truncated=p.argv_truncated,
    )
    if p.uid is not None:
        msg.uid = p.uid
    if p.started_s is not None:
        msg.started.CopyFrom(_duration_to_proto(p.started_s))
    if p.ended_s is not None:
        msg.ended.CopyFrom(_duration_to_proto(p.ended_s))
    if p.exit_code is not None:
        msg.exit_code = p.exit_code
    if p.signal is not None:
        msg.signal = p.signal
    return msg


def _process_from_proto(msg: pb.Process) -> types.ProcessInfo:
    # Paths and arguments come back as their UTF-8 text (escapes kept as written).
    return types.ProcessInfo(
        pid=msg.pid or None,
        ppid=msg.ppid or None,
        argv=tuple(a.encode() for a in msg.argv),
        executables=tuple(e.encode() for e in msg.executables),
        cwd=msg.cwd.encode(),
        uid=msg.uid if msg.HasField("uid") else None,
        started_s=_duration_from_proto(msg.started) if msg.HasField("started") else None,
        ended_s=_duration_from_proto(msg.ended) if msg.HasField("ended") else None,
        exit_code=msg.exit_code if msg.HasField("exit_code") else None,
        signal=msg.signal if msg.HasField("signal") else None,
        outlived_command=msg.outlived_command,
        killed_by_timeout=msg.killed_by_timeout,
        argv_truncated=msg.argv_truncated,
    )


def _static_to_proto(s: types.StaticSummary) -> pb.StaticAnalysis:
    return pb.StaticAnalysis(
        command_count=s.command_count,
        command_names=list(s.command_names),
        action=pb.ActionClass.ValueType(s.action.value),
        risk=pb.RiskTier.ValueType(s.risk.value),
        scope=pb.Scope.ValueType(s.scope.value),
        read_only=s.read_only,
    )


def _static_from_proto(msg: pb.StaticAnalysis) -> types.StaticSummary:
    # Unknown or unset classes read as the most cautious value.
    return types.StaticSummary(
        command_count=msg.command_count,
        command_names=tuple(msg.command_names),
        action=_enum_from_proto(types.ActionClass, msg.action, types.ActionClass.ADMIN),
        risk=_enum_from_proto(types.RiskTier, msg.risk, types.RiskTier.SENSITIVE),
        scope=_enum_from_proto(types.Scope, msg.scope, types.Scope.NETWORK),
        read_only=msg.read_only,
    )


def validation_from_proto(msg: pb.ValidateResponse) -> types.Validation:
    return types.Validation(
        validation_id=msg.validation_id,
        # The API: an unset verdict must be treated as a deny.
        verdict=_enum_from_proto(types.Verdict, msg.verdict, types.Verdict.DENY),
        summary=msg.summary,
        findings=tuple(finding_from_proto(f) for f in msg.findings),
        sandboxed=msg.sandboxed,
        termination=_enum_from_proto(
            types.Termination, msg.termination, types.Termination.SIGNALED
        ),
        exit_code=msg.exit_code,
        signal=msg.signal,
        stdout=msg.stdout,
        stdout_truncated=msg.stdout_truncated,
        stderr=msg.stderr,
        stderr_truncated=msg.stderr_truncated,
        changes=tuple(map(change_from_proto, msg.changes)),
        changes_truncated=msg.changes_truncated,
        timings=_timings_from_proto(msg.timings),
        resource_usage=_usage_from_proto(msg.resource_usage),
        uid=msg.uid,
        gid=msg.gid,
        dry_run_skip=_enum_from_proto(types.DryRunSkip, msg.dry_run_skip, types.DryRunSkip.NONE),
        static=_static_from_proto(msg.static_analysis),
        policy_version=msg.policy_version,
        processes=tuple(_process_from_proto(p) for p in msg.processes),
        processes_truncated=msg.processes_truncated,
        sensitive_reads=tuple(
            types.SensitiveReadInfo(
                path=r.path.encode(),
                pid=r.pid or None,
                argv=tuple(a.encode() for a in r.argv),
                count=r.count,
            )
            for r in msg.sensitive_reads
        ),
        sensitive_reads_incomplete=msg.sensitive_reads_incomplete,
        network_attempts=tuple(network_attempt_from_proto(a) for a in msg.network_attempts),
        network_attempts_lost=msg.network_attempts_lost,
        changes_digest=msg.changes_digest,
        changes_not_kept=msg.changes_not_kept,
    )


# --- Policy ----------------------------------------------------------------------------


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1_000_000_000))
    return ts


def policy_to_proto(p: types.PolicyInfo) -> pb.GetPolicyResponse:
    return pb.GetPolicyResponse(
        version=p.version,
        directory=p.directory,
        files=list(p.files),
        rule_count=p.rule_count,
        loaded_at=_timestamp(p.loaded_at),
        last_reload_error=p.last_reload_error,
        last_reload_at=_timestamp(p.last_reload_at),
        last_reload_refused=p.last_reload_refused,
        last_reload_version=p.last_reload_version,
        rules_added=list(p.rules_added),
        rules_removed=list(p.rules_removed),
        files_added=list(p.files_added),
        files_removed=list(p.files_removed),
    )


def policy_from_proto(msg: pb.GetPolicyResponse) -> types.PolicyInfo:
    return types.PolicyInfo(
        version=msg.version,
        directory=msg.directory,
        files=tuple(msg.files),
        rule_count=msg.rule_count,
        loaded_at=msg.loaded_at.ToNanoseconds() / 1_000_000_000,
        last_reload_error=msg.last_reload_error,
        last_reload_at=msg.last_reload_at.ToNanoseconds() / 1_000_000_000,
        last_reload_refused=msg.last_reload_refused,
        last_reload_version=msg.last_reload_version,
        rules_added=tuple(msg.rules_added),
        rules_removed=tuple(msg.rules_removed),
        files_added=tuple(msg.files_added),
        files_removed=tuple(msg.files_removed),
    )


# --- Capabilities ----------------------------------------------------------------------


def limits_to_proto(limits: types.Limits) -> pb.Limits:
    """The limits the API carries; the diff and environment budgets stay inside."""
    return pb.Limits(
        default_timeout=_duration_to_proto(limits.default_timeout_s),
        max_timeout=_duration_to_proto(limits.max_timeout_s),
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        scratch_bytes=limits.scratch_bytes,
        output_bytes=limits.output_bytes,
        command_bytes=limits.command_bytes,
        concurrent_validations=limits.concurrent_validations,
        changes=limits.changes,
    )


def limits_from_proto(msg: pb.Limits) -> types.Limits:
    """Fields the API does not carry keep their defaults from :class:`types.Limits`."""
    return types.Limits(
        default_timeout_s=_duration_from_proto(msg.default_timeout),
        max_timeout_s=_duration_from_proto(msg.max_timeout),
        memory_bytes=msg.memory_bytes,
        pids=msg.pids,
        scratch_bytes=msg.scratch_bytes,
        output_bytes=msg.output_bytes,
        command_bytes=msg.command_bytes,
        concurrent_validations=msg.concurrent_validations,
        changes=msg.changes,
    )


def capabilities_to_proto(c: types.Capabilities) -> pb.GetCapabilitiesResponse:
    return pb.GetCapabilitiesResponse(
        daemon_version=c.daemon_version,
        kernel_release=c.kernel_release,
        namespaces=list(c.namespaces),
        overlayfs=c.overlayfs,
        cgroup_version=pb.CgroupVersion.ValueType(c.cgroup_version.value),
        cgroup_controllers=list(c.cgroup_controllers),
        seccomp=c.seccomp,
        seccomp_user_notification=c.seccomp_user_notification,
        limits=limits_to_proto(c.limits),
        allow_self_approval=c.allow_self_approval,
    )


def capabilities_from_proto(msg: pb.GetCapabilitiesResponse) -> types.Capabilities:
    return types.Capabilities(
        daemon_version=msg.daemon_version,
        kernel_release=msg.kernel_release,
        namespaces=tuple(msg.namespaces),
        overlayfs=msg.overlayfs,
        cgroup_version=_enum_from_proto(
            types.CgroupVersion, msg.cgroup_version, types.CgroupVersion.NONE
        ),
        cgroup_controllers=tuple(msg.cgroup_controllers),
        seccomp=msg.seccomp,
        seccomp_user_notification=msg.seccomp_user_notification,
        limits=limits_from_proto(msg.limits),
        allow_self_approval=msg.allow_self_approval,
    )


# --- Audit log -------------------------------------------------------------------------

_AUDIT_PROBLEMS = {
    audit.ProblemKind.EDITED: pb.AUDIT_PROBLEM_KIND_EDITED,
    audit.ProblemKind.DELETED: pb.AUDIT_PROBLEM_KIND_DELETED,
    audit.ProblemKind.REORDERED: pb.AUDIT_PROBLEM_KIND_REORDERED,
    audit.ProblemKind.TRUNCATED: pb.AUDIT_PROBLEM_KIND_TRUNCATED,
    audit.ProblemKind.REWRITTEN: pb.AUDIT_PROBLEM_KIND_REWRITTEN,
}


def _timestamp_ns(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def audit_list_request_to_proto(
    f: audit.AuditFilter, *, page_size: int = 0, page_token: str | None = None
) -> pb.ListAuditEventsRequest:
    """The wire request of one page of ``AuditLog.list``-style filtering."""
    msg = pb.ListAuditEventsRequest(
        rule_id=_checked_str("rule_id", f.rule_id or ""),
        session_id=_checked_str("session_id", f.session_id or ""),
        page_size=page_size,
        page_token=page_token or "",
        agent_name=_checked_str("agent_name", f.agent_name or ""),
        tool_use_id=_checked_str("tool_use_id", f.tool_use_id or ""),
    )
    if f.since_ns is not None:
        msg.start_time.CopyFrom(_timestamp_ns(f.since_ns))
    if f.until_ns is not None:
        msg.end_time.CopyFrom(_timestamp_ns(f.until_ns))
    if f.verdict is not None:
        msg.verdict = pb.Verdict.ValueType(f.verdict.value)
    if f.uid is not None:
        msg.caller_uid = _checked_uint32("caller_uid", f.uid)
    return msg


def audit_list_request_from_proto(
    msg: pb.ListAuditEventsRequest,
) -> tuple[audit.AuditFilter, int, str | None]:
    """The filter, the page size as sent (0: unset) and the page token (None: first page)."""
    verdict = None
    if msg.verdict != pb.VERDICT_UNSPECIFIED:
        try:
            verdict = types.Verdict(msg.verdict)
        except ValueError:
            raise InvalidRequest(
                f"verdict: unknown value {msg.verdict}", reason="INVALID_VERDICT"
            ) from None
    f = audit.AuditFilter(
        since_ns=msg.start_time.ToNanoseconds() if msg.HasField("start_time") else None,
        until_ns=msg.end_time.ToNanoseconds() if msg.HasField("end_time") else None,
        verdict=verdict,
        rule_id=msg.rule_id or None,
        session_id=msg.session_id or None,
        uid=msg.caller_uid if msg.HasField("caller_uid") else None,
        agent_name=msg.agent_name or None,
        tool_use_id=msg.tool_use_id or None,
    )
    return f, msg.page_size, msg.page_token or None


def audit_event_to_proto(s: audit.StoredEvent) -> pb.AuditEvent:
    """A stored event as the API reports it (lossless: ``audit_event_from_proto`` inverts it)."""
    e = s.event
    msg = pb.AuditEvent(
        seq=s.seq,
        hash=s.hash,
        prev_hash=s.prev_hash,
        time=_timestamp_ns(e.time_ns),
        kind=pb.AuditEventKind.ValueType(e.kind.value),
        caller=pb.AuditCaller(uid=e.caller.uid, pid=e.caller.pid, executable=e.caller.exe),
        command=e.command,
        cwd=e.cwd,
        env_sha256=e.env_sha256,
        findings=[
            pb.AuditFinding(rule_id=f.rule_id, verdict=pb.Verdict.ValueType(f.verdict.value))
            for f in e.findings
        ],
        effects=e.effects,
        outcome=pb.AuditOutcome(applied_paths=list(e.outcome.applied_paths), error=e.outcome.error),
        validation_id=e.validation_id,
        session_id=e.session_id,
    )
    if e.caller.gid >= 0:
        msg.caller.gid = e.caller.gid
    if e.verdict is not None:
        msg.verdict = pb.Verdict.ValueType(e.verdict.value)
    if e.approval is not None:
        msg.approval.CopyFrom(
            pb.AuditApproval(
                approved=e.approval.approved,
                authorization=pb.Authorization.ValueType(e.approval.authorization.value),
                detail=e.approval.detail,
            )
        )
        who = e.approval.approver
        if who is not None:
            msg.approval.approver.CopyFrom(
                pb.AuditApprover(
                    uid=who.uid,
                    gid=who.gid,
                    asked_by_uid=who.asked_by_uid,
                    asked_by_gid=who.asked_by_gid,
                    basis=who.basis,
                    authenticated_by=who.authenticated_by,
                )
            )
    if e.outcome.exit_code is not None:
        msg.outcome.exit_code = e.outcome.exit_code
    if e.agent is not None:
        msg.agent.CopyFrom(agent_to_proto(e.agent))
    return msg


def audit_event_from_proto(msg: pb.AuditEvent) -> audit.StoredEvent:
    """Unknown enum values read as the most consequential: kind EXECUTE, verdict DENY."""
    approval = None
    if msg.HasField("approval"):
        approval = audit.Approval(
            approved=msg.approval.approved,
            authorization=_enum_from_proto(
                audit.Authorization,
                msg.approval.authorization,
                audit.Authorization.USER_VERIFIED,
            ),
            detail=msg.approval.detail,
            approver=(
                audit.Approver(
                    uid=msg.approval.approver.uid,
                    gid=msg.approval.approver.gid,
                    asked_by_uid=msg.approval.approver.asked_by_uid,
                    asked_by_gid=msg.approval.approver.asked_by_gid,
                    basis=msg.approval.approver.basis,
                    authenticated_by=msg.approval.approver.authenticated_by,
                )
                if msg.approval.HasField("approver")
                else None
            ),
        )
    c = msg.caller
    event = audit.AuditEvent(
        kind=_enum_from_proto(audit.RpcKind, msg.kind, audit.RpcKind.EXECUTE),
        caller=audit.Caller(
            uid=c.uid, pid=c.pid, gid=c.gid if c.HasField("gid") else -1, exe=c.executable
        ),
        command=msg.command,
        cwd=msg.cwd,
        env_sha256=msg.env_sha256,
        findings=tuple(
            audit.RuleDecision(
                rule_id=f.rule_id,
                verdict=_enum_from_proto(types.Verdict, f.verdict, types.Verdict.DENY),
            )
            for f in msg.findings
        ),
        effects=msg.effects,
        verdict=(
            _enum_from_proto(types.Verdict, msg.verdict, types.Verdict.DENY)
            if msg.HasField("verdict")
            else None
        ),
        approval=approval,
        outcome=audit.Outcome(
            exit_code=msg.outcome.exit_code if msg.outcome.HasField("exit_code") else None,
            applied_paths=tuple(msg.outcome.applied_paths),
            error=msg.outcome.error,
        ),
        validation_id=msg.validation_id,
        session_id=msg.session_id,
        time_ns=msg.time.ToNanoseconds(),
        agent=agent_from_proto(msg.agent) if msg.HasField("agent") else None,
    )
    return audit.StoredEvent(seq=msg.seq, prev_hash=msg.prev_hash, hash=msg.hash, event=event)


def audit_page_to_proto(
    page: list[audit.StoredEvent], next_page_token: str | None
) -> pb.ListAuditEventsResponse:
    return pb.ListAuditEventsResponse(
        events=[audit_event_to_proto(s) for s in page], next_page_token=next_page_token or ""
    )


def verify_result_to_proto(r: audit.VerifyResult) -> pb.VerifyAuditLogResponse:
    msg = pb.VerifyAuditLogResponse(ok=r.ok, events_checked=r.events)
    if r.head is not None:
        msg.head_seq, msg.head_hash = r.head.seq, r.head.hash
    if r.problem is not None:
        msg.problem.CopyFrom(
            pb.AuditProblem(
                kind=_AUDIT_PROBLEMS.get(r.problem.kind, pb.AUDIT_PROBLEM_KIND_UNSPECIFIED),
                seq=r.problem.seq,
                message=r.problem.detail,
            )
        )
    return msg


def verify_result_from_proto(msg: pb.VerifyAuditLogResponse) -> audit.VerifyResult:
    """A problem of a kind this client does not know reads as EDITED; ``ok`` is kept."""
    problem = None
    if msg.HasField("problem") or not msg.ok:
        problem = audit.VerifyProblem(
            kind=_enum_from_proto(audit.ProblemKind, msg.problem.kind, audit.ProblemKind.EDITED),
            seq=msg.problem.seq,
            detail=msg.problem.message or "the daemon reported the audit log as not intact",
        )
    head = audit.Anchor(seq=msg.head_seq, hash=msg.head_hash) if msg.head_seq else None
    return audit.VerifyResult(events=msg.events_checked, head=head, problem=problem)
