"""The application's invariants, with fakes: no gRPC, no sandbox, no root.

``airlock.core.service.Service`` with a fake engine (verdicts by command, no sandbox), a fake
audit log that records the order of calls and can be told to fail, and the real workflow on a
real state store in a temporary directory. Pinned here:

* every decision is in the audit log before the method returns it (or yields it);
* an audit failure means no answer: the error (``AUDIT_UNAVAILABLE``) propagates instead;
* Execute takes a sandbox slot before it spends a ONCE token (no slot: the token stays good);
* a slot is released on every path, exceptions and abandoned streams included;
* only root lists or verifies the audit log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from airlock._errors import (
    AirlockError,
    Conflict,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SandboxError,
    Unavailable,
)
from airlock.audit import (
    AuditError,
    AuditEvent,
    AuditFilter,
    Authorization,
    RpcKind,
    StoredEvent,
    VerifyResult,
)
from airlock.core.config import Approvers
from airlock.core.engine import StaticDecision
from airlock.core.request import CheckedRequest
from airlock.core.service import Service
from airlock.core.state import StateStore
from airlock.core.workflow import Workflow
from airlock.types import (
    ApplyOutcome,
    ApprovalScope,
    Capabilities,
    CgroupVersion,
    ExecFinished,
    ExecOutput,
    ExecStarted,
    ExecuteRequest,
    Limits,
    PeerCred,
    PolicyInfo,
    ResourceUsage,
    Termination,
    ValidateRequest,
    Validation,
    Verdict,
)

ROOT = PeerCred(pid=os.getpid(), uid=0, gid=0)
USER = PeerCred(pid=os.getpid(), uid=1000, gid=1000)
# Validations here are ROOT's; their own uid may not approve them: an approver does.
APPROVER = PeerCred(pid=os.getpid(), uid=4242, gid=4242)
POLICY_VERSION = "p1"

# The fake engine's verdict of a command is its first word.
VERDICTS = {"allow": Verdict.ALLOW, "ask": Verdict.ASK, "deny": Verdict.DENY}


# --- Fakes ------------------------------------------------------------------------------------


class Journal(list[str]):
    """What happened, in order, across the fakes."""


class FakeAudit:
    """An audit log in memory; ``fail_at`` = n makes the n-th append (from 1) fail, and after."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.events: list[AuditEvent] = []
        self.durable: list[bool] = []  # per event: whether its append waited for the fsync
        self.fail_at: int | None = None

    def append(self, event: AuditEvent, *, durable: bool = True) -> StoredEvent:
        if self.fail_at is not None and len(self.events) + 1 >= self.fail_at:
            raise AuditError("the disk is full (a fake)", reason="AUDIT_LOG_FAILED")
        self.events.append(event)
        self.durable.append(durable)
        self.journal.append(
            f"audit {event.kind.name} {event.verdict.name if event.verdict else ''}"
        )
        seq = len(self.events)
        return StoredEvent(seq=seq, prev_hash="0" * 64, hash=f"{seq:064x}", event=event)

    def list(
        self, audit_filter: AuditFilter | None, page_size: int, page_token: str | None
    ) -> tuple[list[StoredEvent], str | None]:
        self.journal.append(f"audit list {page_size}")
        stored = [
            StoredEvent(seq=n, prev_hash="0" * 64, hash=f"{n:064x}", event=e)
            for n, e in enumerate(self.events, start=1)
        ]
        return stored[:page_size], None

    def verify(self, anchor: object = None) -> VerifyResult:
        self.journal.append("audit verify")
        return VerifyResult(events=len(self.events), head=None)

    def kinds(self) -> list[RpcKind]:
        return [e.kind for e in self.events]


@dataclass
class FakeEngine:
    """Verdicts by a command's first word; Execute prints the command, then finishes."""

    journal: Journal
    workflow: Workflow | None = None
    fail_validate: bool = False
    fail_plan: bool = False
    fail_execute: bool = False
    apply_error: AirlockError | None = None
    cancels: list[Callable[[], None]] = field(default_factory=list)
    protected_paths: tuple[str, ...] = ()  # Engine's: what an Execute's cwd must not contain
    execute_cwd_bytes: int = 4093  # Engine's: the longest cwd Execute takes

    def validate(
        self, req: CheckedRequest, validation_id: str, on_cancel: Any = None
    ) -> Validation:
        self.journal.append(f"engine validate {req.command}")
        if on_cancel is not None:
            on_cancel(lambda: None)
        if self.fail_validate:
            raise SandboxError("the sandbox could not be set up (a fake)")
        changes = ""
        if self.workflow is not None and "changes" in req.command:  # kept for Apply
            changes = self.workflow.changeset_dir(validation_id)
            os.makedirs(changes)
        return Validation(
            validation_id=validation_id,
            verdict=VERDICTS[req.command.split()[0]],
            summary=f"ran {req.command}",
            uid=req.uid,
            gid=req.gid,
            policy_version=POLICY_VERSION,
            changes_digest="a" * 64 if changes else "",
            changeset_dir=changes,
            changeset_bytes=10 if changes else 0,
        )

    def static_decision(self, req: CheckedRequest) -> StaticDecision:
        self.journal.append(f"engine decide {req.command}")
        return StaticDecision(
            verdict=VERDICTS[req.command.split()[0]],
            findings=(),
            policy_version=POLICY_VERSION,
            read_only=False,
        )

    def execute_plan(self, req: CheckedRequest, execution_id: str) -> CheckedRequest:
        if self.fail_plan:
            raise SandboxError("no template (a fake)")
        return req

    def execute(
        self, plan: CheckedRequest, on_cancel: Any = None
    ) -> Iterator[ExecOutput | ExecFinished]:
        self.journal.append(f"engine execute {plan.command}")
        yield ExecOutput(1, 0.0, plan.command.encode())
        if self.fail_execute:
            raise SandboxError("the supervisor died (a fake)")
        yield ExecFinished(
            termination=Termination.EXITED,
            exit_code=0,
            signal=0,
            wall_s=0.01,
            resource_usage=ResourceUsage(),
        )

    def apply_changeset(
        self, changeset_dir: str, uid: int, gid: int, approved_special: tuple[bytes, ...] = ()
    ) -> ApplyOutcome:
        self.journal.append("engine apply")
        if self.apply_error is not None:
            raise self.apply_error
        return ApplyOutcome(validation_id="", applied_paths=(b"/ws/new.txt",), bytes_written=3)


class FakePolicy:
    def info(self) -> PolicyInfo:
        return PolicyInfo(
            version=POLICY_VERSION, directory="/p", files=(), rule_count=0, loaded_at=0
        )


@dataclass
class App:
    service: Service
    engine: FakeEngine
    audit: FakeAudit
    workflow: Workflow
    journal: Journal
    cwd: str

    def validate(self, command: str, peer: PeerCred = ROOT, **kw: Any) -> Validation:
        return self.service.validate(ValidateRequest(command, self.cwd, (), **kw), peer)

    def execute(self, command: str, peer: PeerCred = ROOT, **kw: Any) -> Iterator[Any]:
        return self.service.execute(ExecuteRequest(command, self.cwd, (), **kw), peer)

    def run(self, command: str, **kw: Any) -> list[Any]:
        return list(self.execute(command, **kw))


def make_app(tmp_path: Path, slots: int = 4) -> App:
    journal = Journal()
    state = StateStore(tmp_path / "state.db")
    workflow = Workflow(state, str(tmp_path / "changesets"), Approvers(uids=(0, APPROVER.uid)))
    engine = FakeEngine(journal, workflow)
    audit = FakeAudit(journal)
    capabilities = Capabilities(
        daemon_version="test",
        kernel_release="",
        namespaces=(),
        overlayfs=False,
        cgroup_version=CgroupVersion.NONE,
        cgroup_controllers=(),
        seccomp=False,
        seccomp_user_notification=False,
        limits=Limits(concurrent_validations=slots),
    )
    service = Service(engine, workflow, audit, FakePolicy(), capabilities)  # type: ignore[arg-type]
    ws = tmp_path / "ws"
    ws.mkdir()
    return App(service, engine, audit, workflow, journal, str(ws))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    made = make_app(tmp_path)
    yield made
    made.workflow.state.close()


def assert_unavailable(info: pytest.ExceptionInfo[Unavailable]) -> None:
    assert info.value.reason == "AUDIT_UNAVAILABLE"


# --- Validate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["allow", "ask", "deny"])
def test_every_verdict_is_audited_before_it_is_returned(app: App, command: str) -> None:
    v = app.validate(command)
    assert v.verdict is VERDICTS[command]
    assert app.journal == [f"engine validate {command}", f"audit VALIDATE {command.upper()}"]
    [event] = app.audit.events
    assert (event.validation_id, event.verdict, event.cwd) == (v.validation_id, v.verdict, app.cwd)


@pytest.mark.parametrize("command", ["allow", "ask", "deny"])
def test_a_verdict_the_log_cannot_take_is_not_returned(app: App, command: str) -> None:
    app.audit.fail_at = 1
    with pytest.raises(Unavailable) as info:
        app.validate(command)
    assert_unavailable(info)


def test_a_refused_request_is_not_a_decision(app: App) -> None:
    with pytest.raises(InvalidRequest):
        app.service.validate(ValidateRequest("allow", "/no/such/dir", ()), ROOT)
    assert app.audit.events == [] and app.journal == []


def test_the_request_is_checked_once_and_spelled_alike_everywhere(app: App) -> None:
    os.mkdir(os.path.join(app.cwd, "x"))
    spelled = f"/{app.cwd}/./x/.."  # //tmp/.../ws/./x/..
    v = app.service.validate(ValidateRequest("ask", spelled, (("B", "2"),)), ROOT)
    record = app.workflow.state.get(v.validation_id)
    [event] = app.audit.events
    assert record.cwd == event.cwd == app.cwd
    assert record.env_sha256 == event.env_sha256 != ""
    grant = app.service.approve(v.validation_id, ApprovalScope.ONCE, APPROVER)
    events = app.run("ask", approval_token=grant.approval_token)
    assert events[0].authorization == "USER_VERIFIED"


# --- Execute ----------------------------------------------------------------------------------


def test_execute_audits_its_start_before_it_runs_and_its_end_before_it_ends(app: App) -> None:
    events = app.execute("allow")
    started = next(events)
    assert isinstance(started, ExecStarted) and started.authorization == "POLICY_ALLOWED"
    assert app.journal == ["engine decide allow", "audit EXECUTE ALLOW"]  # nothing ran yet
    assert app.audit.events[0].outcome.exit_code is None
    rest = list(events)
    assert isinstance(rest[-1], ExecFinished)
    assert app.journal[-2:] == ["engine execute allow", "audit EXECUTE ALLOW"]
    assert app.audit.events[1].outcome.exit_code == 0
    assert app.audit.kinds() == [RpcKind.EXECUTE, RpcKind.EXECUTE]
    # The decision waits for the fsync before the command runs; the outcome is written
    # before ExecFinished, durable with the next fsynced commit (decisions §47).
    assert app.audit.durable == [True, False]


def test_every_decision_but_an_execute_outcome_waits_for_the_fsync(app: App) -> None:
    v = app.service.validate(ValidateRequest("ask", app.cwd, ()), ROOT)
    app.service.approve(v.validation_id, ApprovalScope.ONCE, APPROVER)
    list(app.execute("allow"))
    assert len(app.audit.events) == 4
    assert app.audit.durable == [True, True, True, False]


def test_execute_does_not_start_what_the_log_cannot_take(app: App) -> None:
    app.audit.fail_at = 1
    with pytest.raises(Unavailable) as info:
        next(app.execute("allow"))
    assert_unavailable(info)
    assert "engine execute allow" not in app.journal


def test_execute_never_yields_an_end_that_is_not_in_the_log(app: App) -> None:
    app.audit.fail_at = 2
    stream = app.execute("allow")
    got = [next(stream), next(stream)]  # Started, then the output chunk
    assert isinstance(got[0], ExecStarted) and isinstance(got[1], ExecOutput)
    with pytest.raises(Unavailable) as info:
        next(stream)  # ExecFinished is never handed out
    assert_unavailable(info)


@pytest.mark.parametrize(
    ("command", "error", "reason", "verdict"),
    [
        ("deny", PermissionDenied, "POLICY_DENIED", Verdict.DENY),
        ("ask", FailedPrecondition, "APPROVAL_REQUIRED", Verdict.ASK),
    ],
)
def test_an_execute_refusal_is_audited_before_it_is_raised(
    app: App, command: str, error: type[AirlockError], reason: str, verdict: Verdict
) -> None:
    with pytest.raises(error) as info:
        app.run(command)
    assert info.value.reason == reason
    [event] = app.audit.events
    assert (event.kind, event.verdict, event.outcome.error) == (RpcKind.EXECUTE, verdict, reason)
    assert f"engine execute {command}" not in app.journal
    app.audit.fail_at = 2
    with pytest.raises(Unavailable) as failed:
        app.run(command)
    assert_unavailable(failed)


def test_a_slot_is_taken_before_a_once_token_is_spent(tmp_path: Path) -> None:
    app = make_app(tmp_path, slots=1)
    v = app.validate("ask")
    token = app.service.approve(v.validation_id, ApprovalScope.ONCE, APPROVER).approval_token
    busy = app.execute("allow")
    next(busy)  # holds the daemon's only sandbox
    with pytest.raises(ResourceExhausted):
        app.run("ask", approval_token=token)
    busy.close()
    events = app.run("ask", approval_token=token)  # the token was not used up
    assert events[0].authorization == "USER_VERIFIED"
    with pytest.raises(FailedPrecondition) as again:
        app.run("ask", approval_token=token)
    assert again.value.reason == "APPROVAL_USED"
    app.workflow.state.close()


# --- Slots ------------------------------------------------------------------------------------


def _engine_fails(app: App) -> None:
    app.engine.fail_validate = True
    with pytest.raises(SandboxError):
        app.validate("allow")


def _invalid_request(app: App) -> None:
    with pytest.raises(InvalidRequest):
        app.service.validate(ValidateRequest("allow", "relative", ()), ROOT)


def _validate_audit_fails(app: App) -> None:
    app.audit.fail_at = 1
    with pytest.raises(Unavailable):
        app.validate("allow")


def _validate_ok(app: App) -> None:
    app.validate("allow")


def _execute_refused(app: App) -> None:
    with pytest.raises(PermissionDenied):
        app.run("deny")


def _execute_wrong_token(app: App) -> None:
    with pytest.raises(PermissionDenied):
        app.run("ask", approval_token="not-a-token")


def _execute_plan_fails(app: App) -> None:
    app.engine.fail_plan = True
    with pytest.raises(SandboxError):
        app.run("allow")


def _execute_audit_fails(app: App) -> None:
    app.audit.fail_at = 1
    with pytest.raises(Unavailable):
        app.run("allow")


def _execute_fails_mid_stream(app: App) -> None:
    app.engine.fail_execute = True
    with pytest.raises(SandboxError):
        app.run("allow")


def _execute_abandoned(app: App) -> None:
    stream = app.execute("allow")
    next(stream)
    stream.close()  # the client went away after ExecStarted


def _execute_ok(app: App) -> None:
    app.run("allow")


@pytest.mark.parametrize(
    "path",
    [
        _engine_fails,
        _invalid_request,
        _validate_audit_fails,
        _validate_ok,
        _execute_refused,
        _execute_wrong_token,
        _execute_plan_fails,
        _execute_audit_fails,
        _execute_fails_mid_stream,
        _execute_abandoned,
        _execute_ok,
    ],
)
def test_the_slot_is_released_on_every_path(tmp_path: Path, path: Callable[[App], None]) -> None:
    app = make_app(tmp_path, slots=1)
    path(app)
    path(app)  # twice: a slot kept by the first call would refuse the second
    app.audit.fail_at = None
    app.engine.fail_validate = app.engine.fail_plan = app.engine.fail_execute = False
    assert app.validate("allow").verdict is Verdict.ALLOW
    app.workflow.state.close()


# --- Approve, Apply, Discard ------------------------------------------------------------------


def test_approve_is_audited_before_it_returns(app: App) -> None:
    v = app.validate("ask", session_id="s1")
    grant = app.service.approve(v.validation_id, ApprovalScope.SESSION, APPROVER)
    assert grant.approval_token
    event = app.audit.events[-1]
    assert (event.kind, event.validation_id) == (RpcKind.APPROVE, v.validation_id)
    assert event.approval is not None
    assert event.approval.authorization is Authorization.SESSION_GRANTED


def test_the_askers_own_uid_may_not_approve_and_the_approver_is_audited(app: App) -> None:
    v = app.validate("ask")
    for who in (ROOT, PeerCred(pid=os.getpid(), uid=0, gid=5, groups=(4242,))):
        with pytest.raises(PermissionDenied) as refused:
            app.service.approve(v.validation_id, ApprovalScope.ONCE, who)
        assert refused.value.reason == "SELF_APPROVAL_NOT_ALLOWED"
    with pytest.raises(PermissionDenied) as refused:
        app.service.approve(v.validation_id, ApprovalScope.ONCE, USER)  # not an approver
    assert refused.value.reason == "NOT_AN_APPROVER"
    # Each refusal is evidence (an agent approving its own ask?): audited, approved False.
    refusals = app.audit.events[1:]
    assert [(e.kind, e.outcome.error) for e in refusals] == [
        (RpcKind.APPROVE, "SELF_APPROVAL_NOT_ALLOWED"),
        (RpcKind.APPROVE, "SELF_APPROVAL_NOT_ALLOWED"),
        (RpcKind.APPROVE, "NOT_AN_APPROVER"),
    ]
    assert all(e.approval is not None and not e.approval.approved for e in refusals)
    app.service.approve(v.validation_id, ApprovalScope.ONCE, APPROVER)
    event = app.audit.events[-1]
    assert event.approval is not None and event.approval.approver is not None
    who = event.approval.approver
    assert (who.uid, who.gid, who.asked_by_uid, who.asked_by_gid) == (4242, 4242, 0, 0)
    assert (who.basis, who.authenticated_by) == ("approver", "peer-credentials")
    assert event.caller.uid == 4242


def test_allow_self_approval_lets_the_askers_uid_approve_and_says_so(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    assert not app.service.capabilities().allow_self_approval
    app.workflow.approvers = Approvers(allow_self_approval=True)
    assert app.service.capabilities().allow_self_approval  # the CLI offers the approval
    v = app.validate("ask")
    app.service.approve(v.validation_id, ApprovalScope.ONCE, ROOT)
    who = app.audit.events[-1].approval.approver  # type: ignore[union-attr]
    assert who is not None and who.basis.startswith("self-approval") and who.uid == 0


def test_an_approval_the_log_cannot_take_is_not_returned(app: App) -> None:
    v = app.validate("ask")
    app.audit.fail_at = 2
    with pytest.raises(Unavailable) as info:
        app.service.approve(v.validation_id, ApprovalScope.ONCE, APPROVER)
    assert_unavailable(info)


def test_apply_is_audited_before_it_returns_and_a_replay_adds_nothing(app: App) -> None:
    v = app.validate("allow with changes")
    out = app.service.apply(v.validation_id, ROOT)
    assert out.applied_paths == (b"/ws/new.txt",) and not out.replayed
    event = app.audit.events[-1]
    assert (event.kind, event.validation_id) == (RpcKind.APPLY, v.validation_id)
    assert event.outcome.applied_paths == ("/ws/new.txt",) and event.outcome.error == ""
    again = app.service.apply(v.validation_id, ROOT)
    # Two Apply events: its start, before anything is written, and its outcome.
    assert again.replayed and app.audit.kinds() == [RpcKind.VALIDATE, RpcKind.APPLY, RpcKind.APPLY]
    started = app.audit.events[1]
    assert started.effects.startswith("starting:") and started.outcome.applied_paths == ()


def test_an_apply_the_log_cannot_take_is_not_returned(app: App) -> None:
    v = app.validate("allow with changes")
    app.audit.fail_at = 2
    with pytest.raises(Unavailable) as info:
        app.service.apply(v.validation_id, ROOT)
    assert_unavailable(info)


@pytest.mark.parametrize(
    ("command", "error", "reason"),
    [
        ("allow with changes", Conflict("the host changed (a fake)"), "APPLY_CONFLICT"),
        ("ask with changes", None, "APPROVAL_REQUIRED"),
    ],
)
def test_a_refused_apply_of_a_real_validation_is_audited(
    app: App, command: str, error: AirlockError | None, reason: str
) -> None:
    v = app.validate(command)
    app.engine.apply_error = error
    with pytest.raises(AirlockError) as info:
        app.service.apply(v.validation_id, ROOT)
    assert info.value.reason == reason
    event = app.audit.events[-1]
    assert (event.kind, event.validation_id, event.outcome.error) == (
        RpcKind.APPLY,
        v.validation_id,
        reason,
    )
    app.audit.fail_at = len(app.audit.events) + 1
    with pytest.raises(Unavailable) as failed:  # a refusal the log cannot take: no answer
        app.service.apply(v.validation_id, ROOT)
    assert_unavailable(failed)


def test_an_apply_of_no_validation_is_not_audited(app: App) -> None:
    with pytest.raises(NotFound):
        app.service.apply("0" * 32, ROOT)
    assert app.audit.events == []


def test_discard_is_audited_before_it_returns(app: App) -> None:
    v = app.validate("ask")
    app.service.discard(v.validation_id, ROOT)
    event = app.audit.events[-1]
    assert (event.kind, event.validation_id) == (RpcKind.DISCARD, v.validation_id)
    app.audit.fail_at = len(app.audit.events) + 1
    with pytest.raises(Unavailable) as info:
        app.service.discard(v.validation_id, ROOT)
    assert_unavailable(info)


# --- The audit log ----------------------------------------------------------------------------


def test_only_root_lists_or_verifies_the_audit_log(app: App) -> None:
    app.validate("allow")
    for call in (
        lambda peer: app.service.list_audit_events(peer, AuditFilter(), 0, None),
        lambda peer: app.service.verify_audit_log(peer),
    ):
        with pytest.raises(PermissionDenied) as info:
            call(USER)
        assert info.value.reason == "AUDIT_NOT_ALLOWED"
    assert not any(entry.startswith(("audit list", "audit verify")) for entry in app.journal)
    page, token = app.service.list_audit_events(ROOT, AuditFilter(), 0, None)
    assert len(page) == 1 and token is None
    assert "audit list 100" in app.journal  # 0: the default page size
    assert app.service.verify_audit_log(ROOT).ok
