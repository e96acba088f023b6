"""The engine: plan, dry-run and judge a checked request; run one for real.

It takes a :class:`~airlock.core.request.CheckedRequest` (checked once, by
:mod:`airlock.core.request`) and knows nothing of gRPC, of the workflow or of the audit
log: :mod:`airlock.core.service` calls it, once per RPC, between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import pwd
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date

from airlock import _errors
from airlock._errors import SandboxError
from airlock.core.config import DaemonConfig
from airlock.core.request import MAX_CWD_BYTES, CheckedRequest, cwd_not_accessible
from airlock.policy import builtin
from airlock.policy.effects import (
    LOST_WORK_CHECKED_TAG,
    judges_work_lost,
    unfinished_findings,
)
from airlock.policy.loader import PolicyBundle
from airlock.policy.model import Analysis
from airlock.policy.rules import PathContext, StaticVerdict, today_utc
from airlock.policy.store import PolicyStore
from airlock.policy.summary import denied_summary, policy_sentence, read_only_summary, summarize
from airlock.policy.worklost import builtin_findings as builtin_work_lost
from airlock.sandbox import _wire, mnt, reads, seccomp, workdir
from airlock.sandbox import apply as apply_journal
from airlock.sandbox.apply import Recovery
from airlock.sandbox.cgroup import CgroupHost, CgroupSpec
from airlock.sandbox.contain import OutputChunk, SandboxResult
from airlock.sandbox.diff import DiffOptions
from airlock.sandbox.netcap import NetworkAttempt
from airlock.sandbox.plan import (
    ApplyPlan,
    ApplyReply,
    HostMount,
    RunSpec,
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
    Finding,
    FindingSource,
    LostKind,
    LostWork,
    NetworkAttemptInfo,
    ProcessInfo,
    ResourceUsage,
    SensitiveReadInfo,
    StaticSummary,
    Termination,
    Timings,
    Validation,
    Verdict,
)

__all__ = ["Engine", "StaticDecision"]

_PATH_MAX = 4096
# Execute templates remembered (one per recent workspace, mounts and grants).
_EXECUTE_TEMPLATES = 8
# The largest template the spawner's control socket takes (spawner._MAX_CONTROL, less room).
_WARM_TEMPLATE_BYTES = 192 * 1024


@dataclass(frozen=True)
class StaticDecision:
    """The static pass's verdict on a command line: all that an Execute is judged on."""

    verdict: Verdict
    findings: tuple[Finding, ...]
    policy_version: str
    # A read-only line the policy allows (AUTO_APPROVED rather than POLICY_ALLOWED).
    read_only: bool


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
            scratch_dir=config.scratch_dir,
            hidden_paths=(config.state_dir,),
            protected_paths=self.protected_paths,
        )
        self._lock = threading.Lock()
        self._template: tuple[tuple[HostMount, ...], SandboxTemplate, bytes] | None = None
        self._static_memo = StaticMemo(policy.bundle)
        # Execute's template per host mounts, workspace (path and identity) and grants.
        self._execute_template = functools.lru_cache(maxsize=_EXECUTE_TEMPLATES)(
            self._build_execute_template
        )
        # Whether a template is small enough to be kept warm, by its key: the same few
        # templates come back (pickling one to measure it cost ~0.1 ms per Execute).
        self._fits: dict[bytes, bool] = {}

    @property
    def protected_paths(self) -> tuple[str, ...]:
        """What no sandbox may reach read-write: the daemon's socket and its state directory.

        An Execute whose cwd contains one is refused (``core.request.check``); the
        supervisor checks again as it binds the workspace (``sandbox.mnt``).
        """
        return (self.config.socket_path, self.config.state_dir)

    @property
    def execute_cwd_bytes(self) -> int:
        """The longest cwd Execute takes: its sandbox mounts the workspace at the same path
        below its root (``SCRATCH/root``), and a mount point is one path of PATH_MAX bytes."""
        root = os.fsencode(self.config.scratch_dir + "/root")
        return min(MAX_CWD_BYTES, _PATH_MAX - 1 - len(root))

    def _build_template(
        self,
        mounts: tuple[HostMount, ...],
        *,
        name: str,
        writable: str = "",
        writable_identity: tuple[int, int] | None = None,
        extra_writable: tuple[tuple[str, tuple[int, int]], ...] = (),
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
            # A recording sinkhole; egress grants forward through it (dry run: fetch-only;
            # Execute: the execute grants, anything else refused at once).
            capture_network=self.config.capture_network,
            proc_connector=self._proc_connector,
            seccomp_program=seccomp.deny_program(),
            writable=writable,
            writable_identity=writable_identity,
            extra_writable=extra_writable,
            # A dry run's read recorder is marked with the sandbox, ahead of the request.
            watch_reads=self.config.capture_reads,
        )

    def _static_pass(
        self, bundle: PolicyBundle, req: CheckedRequest
    ) -> tuple[StaticVerdict, StaticSummary]:
        """The static verdict and summary of ``req``'s command under ``bundle``, its paths
        matched as what they name from ``req.cwd`` for the caller (``PathContext.of``),
        remembered for recent lines (:class:`StaticMemo`: per bundle, cwd, home, UTC day)."""
        memo = self._static_memo
        if memo.bundle is not bundle:  # the policy was reloaded: nothing carries over
            memo = self._static_memo = StaticMemo(bundle)
        return memo.judge(req.command, PathContext.of(req.cwd, _home_of(req.uid)))

    def template(self) -> tuple[SandboxTemplate, bytes]:
        """The template for the host as it is now; rebuilt only when its mounts change."""
        mounts = mnt.host_mounts()
        with self._lock:
            if self._template is None or self._template[0] != mounts:
                template = self._build_template(mounts, name="sb")
                self._template = (mounts, template, template.key)
            return self._template[1], self._template[2]

    def plan(self, req: CheckedRequest, validation_id: str) -> SandboxPlan:
        """The plan of one dry run for a checked request."""
        limits = self.config.limits
        template, key = self.template()
        run = self._run(
            req,
            validation_id,
            limits.output_bytes,
            DiffOptions(
                # "" when cwd is a system directory: then no change is in the workspace.
                workspace=os.fsencode(req.workspace),
                max_changes=limits.changes,
                diff_file_bytes=limits.diff_file_bytes,
                diff_total_bytes=limits.diff_total_bytes,
                exclude=(os.fsencode(self.config.state_dir),),
                # New files' content is kept for the changeset only if one can be saved.
                content_for=self.config.keep_changes_max if self.config.keep_changes else 0,
            ),
            sensitive_globs=self._sensitive_globs() if self.config.capture_reads else (),
            home=_home_of(req.uid),
        )
        if self.config.keep_changes:
            run = dataclasses.replace(
                run,
                keep_changes_dir=posixpath.join(self.config.changesets_dir, validation_id),
                keep_changes_max=self.config.keep_changes_max,
                # No run keeps more than its user may hold in all.
                keep_changes_bytes=min(
                    run.keep_changes_bytes, self.config.keep_changes_uid_quota_bytes
                ),
            )
        egress = self._policy.bundle.egress_dry_run
        if egress.enabled and self.config.capture_network and run.sensitive_globs:
            # Forwarding needs the read recorder: after a sensitive read nothing is forwarded.
            run = dataclasses.replace(run, egress=egress, test_resolve=self.config.test_resolve)
        return SandboxPlan(template=template, run=run, template_key=key)

    def validate(
        self,
        req: CheckedRequest,
        validation_id: str,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> Validation:
        """Judge ``req``: the static pass, then (unless it settles it) the dry run.

        ``on_cancel`` registers the dry run's tear-down callback with the caller.
        """
        t0 = time.monotonic()

        # 1. The static pass: parse, model, rules. One bundle judges the whole validation.
        bundle = self._policy.bundle
        static, summary_static = self._static_pass(bundle, req)
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
                uid=req.uid,
                gid=req.gid,
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
        plan = self.plan(req, validation_id)
        t_plan = time.monotonic()
        run = self._spawner.submit(plan)
        if on_cancel is not None:
            on_cancel(run.cancel)
        result: SandboxResult = run.result()
        t_sandbox = time.monotonic()
        if result.error:
            if result.error_kind == "cwd":  # checked as the caller, then changed: one answer
                raise cwd_not_accessible(req.cwd, plan.run.uid)
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
        #    sensitive reads ask); an unfinished or truncated dry run always asks: one a limit
        #    stopped (memory, pids, time), cancelled, whose output or changes were cut, or
        #    that left processes running past the grace (sandbox.contain.OUTLIVE_GRACE_MS).
        incomplete = unfinished_findings(
            termination=result.termination,
            changes_truncated=truncated,
            memory_limit_hit=result.cgroup.oom_kills > 0,
            pids_limit_hit=result.cgroup.pids_limit_hit,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            left_running=result.left_running,
        )
        if bundle.effect_rules:
            effects = Effects(
                workspace=req.workspace,
                home=plan.run.home,
                changes=changes,
                processes=processes,
                network=network,
                sensitive_reads=sensitive,
                granted=granted_paths(bundle.writable_paths, plan.run.home),
                work_lost=result.work_lost,
                uid=plan.run.uid,
            )
            dynamic_findings = (*bundle.judge_effects(effects), *incomplete)
        else:
            _v, found = builtin.judge(changes, Termination.EXITED, False, sensitive)
            lost = builtin_work_lost(result.work_lost, req.workspace)
            dynamic_findings = (*found, *lost, *incomplete)
        dynamic_verdict = max((f.verdict for f in dynamic_findings), default=Verdict.ALLOW)
        static_findings, static_verdict = _lost_work_checked(
            bundle, static.findings, static.verdict, result.work_lost, incomplete
        )
        verdict = max(static_verdict or Verdict.ALLOW, dynamic_verdict)
        findings = tuple(
            sorted(
                (*static_findings, *dynamic_findings),
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
            workspace=req.workspace,
            processes=processes,
            sensitive_reads=sensitive,
            network=network,
            network_lost=result.network_attempts_lost,
            egress=plan.run.egress is not None,
            work_lost=result.work_lost,
        ) + policy_sentence(verdict, findings)
        if not req.workspace:
            summary = (
                f"The working directory {req.cwd} is a system directory, not a workspace: "
                f"every change counts as outside the workspace. {summary}"
            )
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

    def static_decision(self, req: CheckedRequest) -> StaticDecision:
        """The static pass alone: whether ``req`` may run for real, is asked about, or denied."""
        bundle = self._policy.bundle
        static, _summary = self._static_pass(bundle, req)
        return StaticDecision(
            verdict=static.verdict or Verdict.ALLOW,
            findings=static.findings,
            policy_version=bundle.version,
            read_only=static.allowed_read_only,
        )

    def execute_plan(self, req: CheckedRequest, execution_id: str) -> SandboxPlan:
        """The plan of one Execute: the host read-only but for the workspace; the network
        is what the policy's execute grants allow, every attempt recorded."""
        limits = self.config.limits
        # The workspace is bound only if it is still the directory the request check found.
        template, key = self._execute_template(
            mnt.host_mounts(), req.cwd, req.cwd_identity, self.granted_directories(req)
        )
        run = self._run(
            req,
            execution_id,
            limits.execute_output_bytes,
            DiffOptions(workspace=os.fsencode(req.cwd)),
        )
        egress = self._policy.bundle.egress_execute
        if egress.enabled and self.config.capture_network:
            run = dataclasses.replace(run, egress=egress, test_resolve=self.config.test_resolve)
        return SandboxPlan(template=template, run=run, template_key=key)

    def _template_fits(self, plan: SandboxPlan) -> bool:
        """Whether ``plan``'s template is small enough to announce to the helper (kept warm)."""
        key = plan.template_key
        fits = self._fits.get(key) if key else None
        if fits is None:
            fits = len(_wire.dumps(plan.template)) <= _WARM_TEMPLATE_BYTES
            if key:
                with self._lock:
                    if len(self._fits) >= 4 * _EXECUTE_TEMPLATES:
                        self._fits.clear()
                    self._fits[key] = fits
        return fits

    def _build_execute_template(
        self,
        mounts: tuple[HostMount, ...],
        cwd: str,
        identity: tuple[int, int],
        granted: tuple[tuple[str, tuple[int, int]], ...],
    ) -> tuple[SandboxTemplate, bytes]:
        """Execute's template and its key for these mounts, workspace and grants: the only
        inputs that vary (the rest is this daemon's settings). ``_execute_template`` remembers
        the last few, as the dry run's template is remembered for the mounts: building one and
        its key (a pickle and a hash) per request was measurable (docs/decisions.md §43)."""
        template = self._build_template(
            mounts, name="ex", writable=cwd, writable_identity=identity, extra_writable=granted
        )
        return template, template.key

    def granted_directories(self, req: CheckedRequest) -> tuple[tuple[str, tuple[int, int]], ...]:
        """The policy's filesystem grants Execute binds read-write for ``req``: each resolved
        as the caller (the identity the supervisor binds), and kept only if it exists, is a
        directory the caller can search, is reached without a symbolic link below the home
        (a link there, which a command could have made, would point the grant elsewhere:
        ``~/.npm -> ~/.ssh``), is not on a kernel file system and holds neither the daemon's
        socket nor its state. The others stay read-only."""
        home = _home_of(req.uid)
        granted = granted_paths(self._policy.bundle.writable_paths, home)
        real_home = os.path.realpath(home).rstrip("/") if granted else ""
        if not real_home:
            return ()
        out: list[tuple[str, tuple[int, int]]] = []
        for path in granted:
            expected = real_home + path[len(home.rstrip("/")) :]
            try:
                with workdir.resolve(path, req.uid, req.gid, req.groups) as found:
                    if (
                        found.path != expected
                        or found.kernel_fs
                        or mnt.workspace_conflict(found.fd, self.protected_paths)
                    ):
                        continue
                    out.append((found.path, found.identity))
            except workdir.NotAccessible:
                continue
        return tuple(out)

    def _run(
        self,
        req: CheckedRequest,
        sandbox_id: str,
        output_bytes: int,
        diff_options: DiffOptions,
        *,
        sensitive_globs: tuple[str, ...] = (),
        home: str = "",
    ) -> RunSpec:
        """What one sandbox runs for ``req``: its command, as its identity, in its workspace."""
        return build_run(
            sandbox_id=sandbox_id,
            command=req.command,
            cwd=req.cwd,
            env=req.env,
            uid=req.uid,
            gid=req.gid,
            groups=req.groups,
            timeout_s=req.timeout_s,
            output_bytes=output_bytes,
            diff_options=diff_options,
            settings=self._settings,
            sensitive_globs=sensitive_globs,
            home=home,
        )

    def execute(
        self,
        plan: SandboxPlan,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> Iterator[ExecOutput | NetworkAttemptInfo | ProcessInfo | ExecFinished]:
        """Run an authorized plan; yield its output and network attempts as they come, then
        processes, then the end."""
        t0 = time.monotonic()
        # A template too large to announce to the helper (a workspace deep below /tmp: the
        # private /tmp gets one mkdir per level) is not kept warm: it goes with the plan.
        fits = self._template_fits(plan)
        run = self._spawner.submit(plan, pooled="extra" if fits else False)
        if on_cancel is not None:
            on_cancel(run.cancel)
        out_bytes = [0, 0, 0]
        result: SandboxResult | None = None
        for message in run.messages():
            if isinstance(message, OutputChunk):
                out_bytes[message.stream] += len(message.data)
                yield ExecOutput(message.stream, message.time_s, message.data)
            elif isinstance(message, NetworkAttempt):
                yield _network_info(message)
            else:
                result = message
        assert result is not None
        if result.error:
            if result.error_kind == "cwd":
                raise cwd_not_accessible(plan.run.cwd, plan.run.uid)
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
            network_attempts=tuple(_network_info(a) for a in result.network_attempts),
            network_attempts_lost=result.network_attempts_lost,
        )

    # --- Apply ---------------------------------------------------------------------------------

    def _sensitive_globs(self) -> tuple[str, ...]:
        """The policy's ``sensitive_paths``; the built-in list when it names none."""
        return self._policy.bundle.sensitive_globs or reads.DEFAULT_SENSITIVE_GLOBS

    def apply_changeset(
        self,
        changeset_dir: str,
        uid: int,
        gid: int,
        approved_special: tuple[bytes, ...] = (),
    ) -> ApplyOutcome:
        """Write a kept changeset to the host as ``uid``/``gid`` (a fresh supervisor does it).

        ``approved_special``: the paths whose special files the approval names (Apply
        refuses any other). Raises what Apply raised: Conflict (nothing written),
        PermissionDenied, ...; a commit that stopped part way raises ApplyIncomplete (its
        ``partial`` was written).
        """
        groups = _groups_of(uid, gid)
        # The journal first: a crash from here on leaves what recovery needs to find the
        # apply's temporary entries (recover_changeset).
        token = apply_journal.write_journal(changeset_dir, approved_special)
        plan = ApplyPlan(
            changeset_dir, uid, gid, groups, approved_special=approved_special, token=token
        )
        run = self._spawner.submit(plan, pooled=False)
        reply: ApplyReply = run.result()
        if reply.error is not None:
            raise _errors.error_from_data(reply.error)
        result = reply.result
        if not result.complete:
            raise _errors.ApplyIncomplete(
                f"Apply stopped part way at {b', '.join(result.failed).decode(errors='replace')}"
                f": {result.error}; applied {len(result.applied)} path(s), not applied "
                f"{len(result.not_applied)}",
                partial=tuple(result.applied),
            )
        return ApplyOutcome(
            validation_id="",
            applied_paths=tuple(result.applied),
            bytes_written=result.bytes_written,
            duration_s=result.duration_s,
        )

    def recover_changeset(self, changeset_dir: str, uid: int, gid: int) -> Recovery | None:
        """At start-up: roll an apply of ``changeset_dir`` a crash interrupted forward or back,
        as ``uid``/``gid`` (``sandbox/apply.py`` recover); None if it had not started writing
        (no journal). Raises what opening the changeset raises."""
        journal = apply_journal.read_journal(changeset_dir)
        if journal is None:
            return None
        token, approved = journal
        plan = ApplyPlan(
            changeset_dir,
            uid,
            gid,
            _groups_of(uid, gid),
            approved_special=approved,
            token=token,
            recover=True,
        )
        reply: ApplyReply = self._spawner.submit(plan, pooled=False).result()
        if reply.error is not None:
            raise _errors.error_from_data(reply.error)
        result: Recovery = reply.result
        return result


def _lost_work_checked(
    bundle: PolicyBundle,
    findings: tuple[Finding, ...],
    verdict: Verdict | None,
    work_lost: tuple[LostWork, ...],
    incomplete: tuple[Finding, ...],
) -> tuple[tuple[Finding, ...], Verdict | None]:
    """The static findings and verdict once the dry run checked for lost work: a static rule
    tagged ``dry-run-checks-lost-work`` (``git reset --hard``) is there for when no dry run
    can tell (Execute); after a finished dry run that checked, and under a policy whose
    effect rules judge lost work (or the built-in one), its finding stays as information
    (ALLOW) and the dry run decides: a clean tree loses nothing."""
    tagged = {r.id for r in bundle.rules if LOST_WORK_CHECKED_TAG in r.tags}
    if (
        not tagged
        or incomplete
        or any(w.kind is LostKind.UNCHECKED for w in work_lost)
        or not any(f.rule_id in tagged and f.source is FindingSource.STATIC for f in findings)
        or (bundle.effect_rules and not judges_work_lost(bundle.effect_rules))
    ):
        return findings, verdict
    lifted = tuple(
        dataclasses.replace(
            f,
            verdict=Verdict.ALLOW,
            message=f"{f.message} (the dry run checked: it decides)",
        )
        if f.rule_id in tagged and f.source is FindingSource.STATIC
        else f
        for f in findings
    )
    return lifted, max((f.verdict for f in lifted), default=None)


def granted_paths(paths: tuple[str, ...], home: str) -> tuple[str, ...]:
    """The policy's filesystem grants (``~/DIR``) for a caller whose home is ``home``; none
    without a usable home (empty or "/": every path would be below it)."""
    home = home.rstrip("/")
    return tuple(home + p[1:] for p in paths) if home else ()


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
        forwarded=a.forwarded,
        grant=a.grant,
        refusal=a.refusal,
        refusal_detail=a.refusal_detail,
        bytes_received=a.bytes_received,
        upstream_address=a.upstream_address,
    )


_MAX_NAMES = 64

# The static pass of a line is a pure function of the line, the policy bundle, where it runs (the
# cwd and the caller's home its relative paths resolve against) and the UTC day (rule
# exceptions expire by date): agents run the same lines again and again (`git status`,
# a test command), and a line's analysis and rules cost 0.2-0.3 ms hot, ~0.7 ms in a daemon
# whose caches other processes have just used. Bounded: the most recent lines up to this many,
# each at most this long (a longer line is judged every time).
STATIC_MEMO_LINES = 256
STATIC_MEMO_MAX_CHARS = 2048


class StaticMemo:
    """The static verdicts of recent lines under one policy bundle. Thread-safe.

    A verdict is remembered only when the analysis is whole: a line with a parse finding
    (unparseable, too deep, too large, or stopped by the parse deadline, which depends on
    how busy the host was) is judged again each time. The results are immutable (frozen
    dataclasses of tuples), so every caller gets the same objects.
    """

    def __init__(
        self,
        bundle: PolicyBundle,
        *,
        lines: int = STATIC_MEMO_LINES,
        max_chars: int = STATIC_MEMO_MAX_CHARS,
    ) -> None:
        self.bundle = bundle
        self._lines = lines
        self._max_chars = max_chars
        self._lock = threading.Lock()
        self._entries: OrderedDict[
            tuple[str, PathContext | None, date], tuple[StaticVerdict, StaticSummary]
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def judge(
        self, command: str, context: PathContext | None = None
    ) -> tuple[StaticVerdict, StaticSummary]:
        """The static verdict and summary of ``command`` run where ``context`` says (its
        paths resolved from there: the same line in another cwd, or for another home, is
        another entry)."""
        day = today_utc()
        key = (command, context, day)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        analysis = self.bundle.analyze(command)  # with the bundle's command catalog
        judged = (
            self.bundle.evaluate(analysis, today=day, context=context),
            _static_summary(analysis),
        )
        if len(command) <= self._max_chars and not any(
            f.rule_id.startswith(_PARSE_FINDINGS) for f in analysis.findings
        ):
            with self._lock:
                self._entries[key] = judged
                self._entries.move_to_end(key)
                while len(self._entries) > self._lines:
                    self._entries.popitem(last=False)
        return judged


_PARSE_FINDINGS = "parse."


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
