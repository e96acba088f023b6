"""The engine: check a request, resolve who runs it, plan, dry-run, judge.

It knows nothing of gRPC: the daemon converts protobuf to ``airlock.types``
(:mod:`airlock.api.convert`), calls the application (:mod:`airlock.core`), and maps
:mod:`airlock._errors` to status codes (:mod:`airlock.api.status`).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import posixpath
import pwd
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from airlock import _errors
from airlock._errors import (
    AirlockError,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    SandboxError,
)
from airlock.audit.model import Authorization
from airlock.core.config import DaemonConfig
from airlock.policy import builtin, shell
from airlock.policy.model import Analysis
from airlock.policy.store import PolicyStore
from airlock.policy.summary import denied_summary, policy_sentence, read_only_summary, summarize
from airlock.sandbox import mnt, reads, seccomp
from airlock.sandbox.cgroup import CgroupHost, CgroupSpec
from airlock.sandbox.contain import OutputChunk, SandboxResult
from airlock.sandbox.diff import DiffOptions
from airlock.sandbox.netcap import NetworkAttempt
from airlock.sandbox.plan import (
    KERNEL_TREES,
    ApplyPlan,
    ApplyReply,
    HostMount,
    SandboxPlan,
    SandboxSettings,
    SandboxTemplate,
    build_run,
    build_template,
)
from airlock.sandbox.proctrace import ProcessRecord
from airlock.sandbox.spawner import Spawner
from airlock.types import (
    ApplyOutcome,
    DryRunSkip,
    Effects,
    ExecFinished,
    ExecOutput,
    ExecStarted,
    ExecuteRequest,
    Limits,
    NetworkAttemptInfo,
    PeerCred,
    ProcessInfo,
    ResourceUsage,
    SensitiveReadInfo,
    StaticSummary,
    Termination,
    Timings,
    ValidateRequest,
    Validation,
    Verdict,
)

__all__ = ["Engine", "Identity", "check_request"]

_MAX_PATH = 4096


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]


def _fail(field_name: str, why: str, reason: str = "INVALID_ARGUMENT") -> InvalidRequest:
    return InvalidRequest(f"{field_name}: {why}", reason=reason)


def check_request(req: ValidateRequest, limits: Limits) -> tuple[str, float]:
    """Reject malformed input with a message naming the field; return (cwd, timeout)."""
    command = req.command
    if not command.strip():
        raise _fail("command", "must not be empty", "INVALID_COMMAND")
    if "\0" in command:
        raise _fail("command", "contains a NUL byte", "INVALID_COMMAND")
    size = len(command.encode("utf-8", errors="surrogatepass"))
    if size > limits.command_bytes:
        raise _fail(
            "command", f"is {size} bytes; the limit is {limits.command_bytes}", "COMMAND_TOO_LARGE"
        )

    cwd = req.cwd
    if not cwd:
        raise _fail("cwd", "is required (an absolute path of an existing directory)", "INVALID_CWD")
    if "\0" in cwd or len(cwd) > _MAX_PATH:
        raise _fail("cwd", "is not a valid path", "INVALID_CWD")
    if not cwd.startswith("/"):
        raise _fail("cwd", f"must be an absolute path, got {cwd!r}", "INVALID_CWD")
    cwd = posixpath.normpath(cwd)
    if cwd.startswith("//"):
        cwd = "/" + cwd.lstrip("/")
    if any(cwd == k or cwd.startswith(k + "/") for k in KERNEL_TREES):
        raise _fail("cwd", f"{cwd} is on a kernel file system, not a workspace", "INVALID_CWD")
    if not os.path.exists(cwd):
        raise _fail("cwd", f"{cwd} does not exist", "INVALID_CWD")
    if not os.path.isdir(cwd):
        raise _fail("cwd", f"{cwd} is not a directory", "INVALID_CWD")

    env_size = 0
    for key, value in req.env:
        if not key:
            raise _fail("env", "has an empty variable name", "INVALID_ENV")
        if "=" in key or "\0" in key:
            raise _fail("env", f"variable name {key!r} contains '=' or a NUL byte", "INVALID_ENV")
        if "\0" in value:
            raise _fail("env", f"the value of {key} contains a NUL byte", "INVALID_ENV")
        env_size += len(key.encode()) + len(value.encode()) + 2
    if env_size > limits.env_bytes:
        raise _fail("env", f"is {env_size} bytes; the limit is {limits.env_bytes}", "INVALID_ENV")

    timeout = req.timeout_s
    if timeout is None or timeout == 0:
        timeout = limits.default_timeout_s
    elif timeout < 0:
        raise _fail("timeout", f"must not be negative, got {timeout:g} s", "INVALID_TIMEOUT")
    elif timeout > limits.max_timeout_s:
        raise _fail(
            "timeout",
            f"{timeout:g} s is above the daemon's maximum of {limits.max_timeout_s:g} s",
            "INVALID_TIMEOUT",
        )
    return cwd, timeout


def _caller_groups(peer: PeerCred) -> tuple[int, ...]:
    """The caller process's own supplementary groups: never more than it has."""
    try:
        with open(f"/proc/{peer.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(sorted({int(g) for g in line.split()[1:]} | {peer.gid}))
    except (OSError, ValueError):
        pass
    return (peer.gid,)


def resolve_identity(req: ValidateRequest, peer: PeerCred) -> Identity:
    """Run as the caller; only a root caller may name another uid or gid."""
    if peer.uid != 0:
        if req.uid is not None and req.uid != peer.uid:
            raise PermissionDenied(
                f"uid: only root may run commands as another user (you are uid {peer.uid})",
                reason="UID_NOT_ALLOWED",
            )
        if req.gid is not None and req.gid != peer.gid:
            raise PermissionDenied(
                f"gid: only root may run commands as another group (you are gid {peer.gid})",
                reason="UID_NOT_ALLOWED",
            )
        return Identity(peer.uid, peer.gid, _caller_groups(peer))
    if req.uid is None:
        gid = peer.gid if req.gid is None else req.gid
        return Identity(peer.uid, gid, _caller_groups(peer) if gid == peer.gid else (gid,))
    try:
        entry = pwd.getpwuid(req.uid)
    except KeyError:
        raise _fail("uid", f"no user has id {req.uid}", "UNKNOWN_USER") from None
    gid = entry.pw_gid if req.gid is None else req.gid
    if req.gid is not None:
        try:
            grp.getgrgid(req.gid)
        except KeyError:
            raise _fail("gid", f"no group has id {req.gid}", "UNKNOWN_GROUP") from None
    return Identity(req.uid, gid, tuple(sorted(set(os.getgrouplist(entry.pw_name, gid)))))


class Engine:
    """Turns a request into a validation. Thread-safe; one instance per daemon."""

    def __init__(
        self,
        config: DaemonConfig,
        spawner: Spawner,
        cgroup_host: CgroupHost,
        policy: PolicyStore,
        *,
        proc_connector: bool = True,
    ) -> None:
        self.config = config
        self._proc_connector = proc_connector
        self._policy = policy
        self._spawner = spawner
        self._cgroups = cgroup_host
        self._settings = SandboxSettings(
            scratch_dir=config.scratch_dir, hidden_paths=(config.state_dir,)
        )
        self._lock = threading.Lock()
        self._template: tuple[tuple[HostMount, ...], SandboxTemplate, bytes] | None = None

    def _build_template(
        self, mounts: tuple[HostMount, ...], *, name: str, writable: str = ""
    ) -> SandboxTemplate:
        """A template from this daemon's settings: a dry run's, or (``writable``) Execute's."""
        limits = self.config.limits
        return build_template(
            settings=self._settings,
            scratch_bytes=limits.scratch_bytes,
            cgroup=CgroupSpec(
                host=self._cgroups,
                group=self.config.cgroup_group,
                name=name,
                memory_bytes=limits.memory_bytes,
                pids=limits.pids,
            ),
            host_mounts=mounts,
            trace_processes=self.config.trace_processes,
            # Execute has no network at all; a dry run's is a recording sinkhole.
            capture_network=self.config.capture_network and not writable,
            proc_connector=self._proc_connector,
            seccomp_program=seccomp.deny_program(),
            writable=writable,
        )

    def template(self) -> tuple[SandboxTemplate, bytes]:
        """The template for the host as it is now; rebuilt only when its mounts change."""
        mounts = mnt.host_mounts()
        with self._lock:
            if self._template is None or self._template[0] != mounts:
                template = self._build_template(mounts, name="sb")
                self._template = (mounts, template, template.key)
            return self._template[1], self._template[2]

    def plan(
        self, req: ValidateRequest, cwd: str, timeout: float, who: Identity, validation_id: str
    ) -> SandboxPlan:
        """The plan of one dry run for a checked request."""
        limits = self.config.limits
        template, key = self.template()
        run = build_run(
            sandbox_id=validation_id,
            command=req.command,
            cwd=cwd,
            env=req.env,
            uid=who.uid,
            gid=who.gid,
            groups=who.groups,
            timeout_s=timeout,
            output_bytes=limits.output_bytes,
            diff_options=DiffOptions(
                workspace=os.fsencode(cwd),
                max_changes=limits.changes,
                diff_file_bytes=limits.diff_file_bytes,
                diff_total_bytes=limits.diff_total_bytes,
                exclude=(os.fsencode(self.config.state_dir),),
            ),
            settings=self._settings,
            sensitive_globs=self._sensitive_globs() if self.config.capture_reads else (),
            home=_home_of(who.uid),
        )
        if self.config.keep_changes:
            run = dataclasses.replace(
                run,
                keep_changes_dir=posixpath.join(self.config.changesets_dir, validation_id),
                keep_changes_max=self.config.keep_changes_max,
            )
        return SandboxPlan(template=template, run=run, template_key=key)

    def validate(
        self,
        req: ValidateRequest,
        peer: PeerCred,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
        validation_id: str | None = None,
    ) -> Validation:
        """Judge ``req`` for ``peer``: the static pass, then (unless it settles it) the dry run.

        ``on_cancel`` registers the dry run's tear-down callback with the caller.
        """
        t0 = time.monotonic()
        validation_id = validation_id or uuid.uuid4().hex
        cwd, timeout = check_request(req, self.config.limits)
        who = resolve_identity(req, peer)

        # 1. The static pass: parse, model, rules. One bundle judges the whole validation.
        bundle = self._policy.bundle
        analysis = shell.analyze(req.command)
        static = bundle.evaluate(analysis)
        summary_static = _static_summary(analysis)
        t_static = time.monotonic()

        def settled(skip: DryRunSkip, verdict: Verdict, summary: str) -> Validation:
            return Validation(
                validation_id=validation_id,
                verdict=verdict,
                summary=summary,
                findings=static.findings,
                sandboxed=False,
                termination=Termination.EXITED,
                exit_code=-1,
                timings=Timings(static_analysis_s=t_static - t0, total_s=time.monotonic() - t0),
                uid=who.uid,
                gid=who.gid,
                dry_run_skip=skip,
                static=summary_static,
                policy_version=bundle.version,
            )

        # 2. A static deny needs no dry run (running `rm -rf /` to watch it is waste),
        #    unless the caller asks for one; a read-only line the policy allows needs none.
        if static.verdict is Verdict.DENY and not req.force_dry_run:
            return settled(DryRunSkip.STATIC_DENY, Verdict.DENY, denied_summary(static.findings))
        if static.allowed_read_only:
            return settled(
                DryRunSkip.READ_ONLY, Verdict.ALLOW, read_only_summary(summary_static.command_names)
            )

        # 3. The dry run.
        plan = self.plan(req, cwd, timeout, who, validation_id)
        t_plan = time.monotonic()
        run = self._spawner.submit(plan)
        if on_cancel is not None:
            on_cancel(run.cancel)
        result: SandboxResult = run.result()
        t_sandbox = time.monotonic()
        if result.error:
            if result.error_kind == "cwd":
                raise InvalidRequest(
                    f"cwd: uid {plan.run.uid} cannot enter {plan.run.cwd}: {result.error}",
                    reason="CWD_NOT_ACCESSIBLE",
                )
            raise SandboxError(f"the sandbox could not be set up: {result.error}")
        assert result.diff is not None and result.cgroup is not None
        changes, truncated = result.diff.changes, result.diff.truncated
        processes = tuple(_process_info(r) for r in result.processes)
        # The read recorder knows host pids and, when the process was still alive, its argv;
        # the process tree knows every process's sandbox pid and exact argv.
        by_host_pid = {r.host_pid: r for r in result.processes}
        sensitive = tuple(
            SensitiveReadInfo(
                path=r.path,
                pid=by_host_pid[r.pid].pid if r.pid in by_host_pid else None,
                argv=by_host_pid[r.pid].argv if r.pid in by_host_pid else r.argv,
                count=r.count,
            )
            for r in result.sensitive_reads
        )

        network = tuple(_network_info(a) for a in result.network_attempts)

        # 4. The verdict: the strictest of the static pass and the policy's effect rules
        #    (a policy with none gets the built-in ones: changes outside the workspace and
        #    sensitive reads ask); an unfinished or truncated dry run always asks.
        if bundle.effect_rules:
            effects = Effects(
                workspace=plan.run.cwd,
                home=plan.run.home,
                changes=changes,
                processes=processes,
                network=network,
                sensitive_reads=sensitive,
            )
            _v, incomplete = builtin.judge((), result.termination, truncated, ())
            dynamic_findings = (*bundle.judge_effects(effects), *incomplete)
        else:
            _v, dynamic_findings = builtin.judge(changes, result.termination, truncated, sensitive)
        dynamic_verdict = max((f.verdict for f in dynamic_findings), default=Verdict.ALLOW)
        verdict = max(static.verdict or Verdict.ALLOW, dynamic_verdict)
        findings = tuple(
            sorted(
                (*static.findings, *dynamic_findings),
                key=lambda f: (-f.verdict, -f.severity, f.span, f.rule_id),
            )
        )
        summary = summarize(
            changes=changes,
            changes_truncated=truncated,
            termination=result.termination,
            exit_code=result.exit_code,
            signal=result.signal,
            timeout_s=plan.run.timeout_s,
            workspace=plan.run.cwd,
            processes=processes,
            sensitive_reads=sensitive,
            network=network,
            network_lost=result.network_attempts_lost,
        ) + policy_sentence(verdict, findings)
        stats = result.cgroup
        return Validation(
            validation_id=validation_id,
            verdict=verdict,
            summary=summary,
            findings=findings,
            sandboxed=True,
            termination=result.termination,
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=result.stdout,
            stdout_truncated=result.stdout_truncated,
            stderr=result.stderr,
            stderr_truncated=result.stderr_truncated,
            changes=changes,
            changes_truncated=truncated,
            timings=Timings(
                static_analysis_s=t_plan - t0,
                sandbox_s=t_sandbox - t_plan,
                diff_s=result.diff_s,
                total_s=time.monotonic() - t0,
                sandbox_setup_s=result.setup_s,
                command_s=result.command_s,
                warm=result.warm,
            ),
            resource_usage=ResourceUsage(
                peak_memory_bytes=stats.peak_memory_bytes,
                cpu_time_s=stats.cpu_time_s,
                memory_limit_hit=stats.oom_kills > 0,
                pids_limit_hit=stats.pids_limit_hit,
                scratch_bytes_used=result.diff.scratch_bytes,
            ),
            uid=plan.run.uid,
            gid=plan.run.gid,
            static=summary_static,
            policy_version=bundle.version,
            processes=processes,
            processes_truncated=result.processes_truncated,
            sensitive_reads=sensitive,
            sensitive_reads_incomplete=result.sensitive_reads_incomplete,
            network_attempts=network,
            network_attempts_lost=result.network_attempts_lost,
            changes_digest=result.changeset_digest,
            changes_not_kept=result.changeset_error
            or ("" if self.config.keep_changes else "the daemon does not keep changes"),
            changeset_dir=plan.run.keep_changes_dir if result.changeset_digest else "",
            changeset_bytes=result.changeset_bytes,
        )

    # --- Execute ------------------------------------------------------------------------------

    def authorize_execute(
        self,
        req: ExecuteRequest,
        peer: PeerCred,
        authorize: Callable[..., Authorization | None] | None,
        execution_id: str,
    ) -> tuple[ExecStarted, str, float, Identity]:
        """The static pass decides whether ``req`` may run; returns its Started event.

        DENY raises PermissionDenied (POLICY_DENIED, findings in the message). ASK needs an
        approval: ``authorize`` (the state store's) checks the request's token or session
        grant; without one, FailedPrecondition (APPROVAL_REQUIRED) carries the summary the
        user must see.
        """
        cwd, timeout = check_request(req.as_validate(), self.config.limits)
        who = resolve_identity(req.as_validate(), peer)
        bundle = self._policy.bundle
        analysis = shell.analyze(req.command)
        static = bundle.evaluate(analysis)
        verdict = static.verdict or Verdict.ALLOW
        if verdict is Verdict.DENY:
            raise PermissionDenied(
                "the policy denies this command: "
                + "; ".join(f"{f.rule_id}: {f.message}" for f in static.findings[:5]),
                reason="POLICY_DENIED",
            )
        if verdict is Verdict.ASK:
            how = None
            if authorize is not None:
                how = authorize(
                    req.approval_token or None,
                    command=req.command,
                    cwd=cwd,
                    policy_version=bundle.version,
                    session_id=req.session_id,
                    uid=who.uid,
                )
            if how is None:
                raise FailedPrecondition(
                    "the policy asks before this command runs: "
                    + policy_sentence(Verdict.ASK, static.findings).strip()
                    + " Validate it, have it approved (Approve), and pass the token.",
                    reason="APPROVAL_REQUIRED",
                )
            authorization = how
        elif static.allowed_read_only:
            authorization = Authorization.AUTO_APPROVED
        else:
            authorization = Authorization.POLICY_ALLOWED
        started = ExecStarted(
            execution_id=execution_id,
            verdict=verdict,
            authorization=authorization.name,
            findings=static.findings,
            uid=who.uid,
            gid=who.gid,
            policy_version=bundle.version,
        )
        return started, cwd, timeout, who

    def execute_plan(
        self, req: ExecuteRequest, cwd: str, timeout: float, who: Identity, execution_id: str
    ) -> SandboxPlan:
        """The plan of one Execute: the host read-only but for ``cwd``, no network."""
        limits = self.config.limits
        template = self._build_template(mnt.host_mounts(), name="ex", writable=cwd)
        run = build_run(
            sandbox_id=execution_id,
            command=req.command,
            cwd=cwd,
            env=req.env,
            uid=who.uid,
            gid=who.gid,
            groups=who.groups,
            timeout_s=timeout,
            output_bytes=limits.execute_output_bytes,
            diff_options=DiffOptions(workspace=os.fsencode(cwd)),
            settings=self._settings,
        )
        return SandboxPlan(template=template, run=run, template_key=template.key)

    def execute(
        self,
        plan: SandboxPlan,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> Iterator[ExecOutput | ProcessInfo | ExecFinished]:
        """Run an authorized plan; yield its output as it comes, then processes, then the end."""
        t0 = time.monotonic()
        run = self._spawner.submit(plan, pooled="extra")
        if on_cancel is not None:
            on_cancel(run.cancel)
        out_bytes = [0, 0, 0]
        result: SandboxResult | None = None
        for message in run.messages():
            if isinstance(message, OutputChunk):
                out_bytes[message.stream] += len(message.data)
                yield ExecOutput(message.stream, message.time_s, message.data)
            else:
                result = message
        assert result is not None
        if result.error:
            if result.error_kind == "cwd":
                raise InvalidRequest(
                    f"cwd: uid {plan.run.uid} cannot enter {plan.run.cwd}: {result.error}",
                    reason="CWD_NOT_ACCESSIBLE",
                )
            raise SandboxError(f"the sandbox could not be set up: {result.error}")
        for record in result.processes:
            yield _process_info(record)
        stats = result.cgroup
        assert stats is not None
        yield ExecFinished(
            termination=result.termination,
            exit_code=result.exit_code,
            signal=result.signal,
            wall_s=time.monotonic() - t0,
            resource_usage=ResourceUsage(
                peak_memory_bytes=stats.peak_memory_bytes,
                cpu_time_s=stats.cpu_time_s,
                memory_limit_hit=stats.oom_kills > 0,
                pids_limit_hit=stats.pids_limit_hit,
            ),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            stdout_bytes=out_bytes[1],
            stderr_bytes=out_bytes[2],
            warm=result.warm,
        )

    # --- Apply ---------------------------------------------------------------------------------

    def _sensitive_globs(self) -> tuple[str, ...]:
        """The policy's ``sensitive_paths``; the built-in list when it names none."""
        return self._policy.bundle.sensitive_globs or reads.DEFAULT_SENSITIVE_GLOBS

    def apply_changeset(self, changeset_dir: str, uid: int, gid: int) -> ApplyOutcome:
        """Write a kept changeset to the host as ``uid``/``gid`` (a fresh supervisor does it).

        Raises what Apply raised: Conflict (nothing written), PermissionDenied, ...; a
        commit that stopped part way raises an AirlockError with ``partial`` set.
        """
        groups = _groups_of(uid, gid)
        run = self._spawner.submit(ApplyPlan(changeset_dir, uid, gid, groups), pooled=False)
        reply: ApplyReply = run.result()
        if reply.error_class:
            cls = getattr(_errors, reply.error_class, AirlockError)
            if not (isinstance(cls, type) and issubclass(cls, AirlockError)):
                cls = AirlockError
            if cls is _errors.Conflict:
                raise _errors.Conflict(reply.message, paths=reply.paths, reason=reply.reason)
            raise cls(reply.message, reason=reply.reason or None)
        result = reply.result
        if not result.complete:
            error = AirlockError(
                f"Apply stopped part way at {b', '.join(result.failed).decode(errors='replace')}"
                f": {result.error}; applied {len(result.applied)} path(s), not applied "
                f"{len(result.not_applied)}",
                reason="APPLY_INCOMPLETE",
            )
            error.partial = result.applied  # type: ignore[attr-defined]
            raise error
        return ApplyOutcome(
            validation_id="",
            applied_paths=tuple(result.applied),
            bytes_written=result.bytes_written,
            duration_s=result.duration_s,
        )


def _groups_of(uid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups of ``uid`` (as the dry run used them), with ``gid``."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return (gid,)
    return tuple(sorted(set(os.getgrouplist(name, gid))))


def _home_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return ""


def _process_info(r: ProcessRecord) -> ProcessInfo:
    return ProcessInfo(
        pid=r.pid,
        ppid=r.ppid,
        argv=r.argv,
        executables=r.executables,
        cwd=r.cwd or b"",
        uid=r.uid,
        started_s=r.started_s,
        ended_s=r.ended_s,
        exit_code=r.exit_code,
        signal=r.signal,
        outlived_command=r.outlived_command,
        killed_by_timeout=r.killed_by_timeout,
        argv_truncated=r.argv_truncated,
    )


def _network_info(a: NetworkAttempt) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(
        protocol=a.protocol,
        address=a.address,
        port=a.port,
        dns_name=a.dns_name,
        dns_type=a.dns_type,
        payload_prefix=a.payload_prefix,
        sni=a.sni,
        http_method=a.http_method,
        http_host=a.http_host,
        http_path=a.http_path,
        bytes_sent=a.bytes_sent,
        time_s=a.time,
    )


_MAX_NAMES = 64


def _static_summary(analysis: Analysis) -> StaticSummary:
    c = analysis.classification
    return StaticSummary(
        command_count=len(analysis.commands),
        command_names=tuple(cmd.name for cmd in analysis.commands[:_MAX_NAMES]),
        action=c.action,
        risk=c.risk,
        scope=c.scope,
        read_only=analysis.read_only,
    )
