"""Contain: build a sandbox from a template, run one command in it, report, tear down.

Three processes take part in one dry run::

    supervisor (forked by the spawner; root; new mnt/net/ipc/uts namespaces; owns the scratch tmpfs)
     └── init   (pid 1 of a new pid namespace; its own copy of the mount namespace; pivots into the
         │       overlay root; reaps orphans; its death kills every process in the sandbox)
         └── command (joins the cgroup, waits for the run spec, then runs bash -c COMMAND as the
                      caller's uid/gid with no capabilities and no_new_privs)

Init and the command are the small exec'd program ``airlock-sandbox-init`` (sandbox/init.py),
not forks of the supervisor's Python image.

``prepare`` does everything a template decides, up to a command process that
waits for its :class:`RunSpec`; ``run`` hands it the spec and watches it. The
spawner keeps a few prepared sandboxes warm so that a request pays only for
``run``; a cold request does both. Either way a sandbox serves one command.

The supervisor never enters the sandbox's root, so after the command's whole
process tree is gone it still sees the overlay's upper layers and computes the
diff; then it exits and the kernel frees every mount with its namespace. No
mount is ever made in the host's mount namespace, so nothing can leak there,
even if the daemon is killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from airlock import _errors
from airlock.egress import EgressPolicy
from airlock.sandbox import (
    _digest,
    _wire,
    changeset,
    gitloss,
    init,
    mnt,
    net,
    netcap,
    proctrace,
    reads,
    user,
)
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.apply import apply, open_changeset, recover
from airlock.sandbox.cgroup import Cgroup, CgroupStats
from airlock.sandbox.diff import Caller, DiffResult, compute_changes
from airlock.sandbox.plan import (
    ApplyPlan,
    ApplyReply,
    Bind,
    PlanOnWire,
    RunSpec,
    SandboxPlan,
    SandboxTemplate,
)
from airlock.sandbox.upstream import Upstream
from airlock.types import LostWork, Termination

__all__ = [
    "OutputChunk",
    "Prepared",
    "SandboxResult",
    "prepare",
    "run",
    "serve_cold",
    "serve_request",
    "serve_warm",
]

_READ_CHUNK = 65536
# After the command ends, how long stray output may keep its pipes open (it cannot: the pid
# namespace is gone; this only bounds a kernel that is slow to tear it down).
_DRAIN_S = 5.0
# How long, in a dry run, the processes a command leaves running (`cmd &`, a daemon it starts)
# may go on after it exited, so that what they do is part of what the dry run shows. Those still
# running then are killed with the sandbox, and the verdict asks (policy.effects
# unfinished_findings): what they would have done next, on the host, was not seen.
OUTLIVE_GRACE_MS = 250


@dataclass(frozen=True)
class SandboxResult:
    """What the supervisor reports back for one plan."""

    termination: Termination = Termination.EXITED
    exit_code: int = -1
    signal: int = 0
    stdout: bytes = b""
    stdout_truncated: bool = False
    stderr: bytes = b""
    stderr_truncated: bool = False
    diff: DiffResult | None = None
    cgroup: CgroupStats | None = None
    setup_s: float = 0.0
    command_s: float = 0.0
    diff_s: float = 0.0
    # Whether the sandbox was prepared before the request arrived.
    warm: bool = False
    # Every process the command started (empty when process tracing is off).
    processes: tuple[proctrace.ProcessRecord, ...] = ()
    processes_truncated: bool = False
    # Opens of sensitive files (host pids); incomplete if the kernel's queue overflowed.
    sensitive_reads: tuple[reads.SensitiveRead, ...] = ()
    sensitive_reads_incomplete: bool = False
    # Every DNS query, TCP connection and UDP datagram the command tried to send out; how many
    # more were not recorded (past the bound, or dropped by the kernel in a flood).
    network_attempts: tuple[netcap.NetworkAttempt, ...] = ()
    network_attempts_lost: int = 0
    # The changes kept for Apply (RunSpec.keep_changes_dir): the manifest's digest and the
    # bytes kept; or why they could not be kept.
    changeset_digest: str = ""
    changeset_bytes: int = 0
    changeset_error: str = ""
    # Work the run would destroy in a git repository (sandbox/gitloss.py).
    work_lost: tuple[LostWork, ...] = ()
    # A dry run: processes the command left running were still running OUTLIVE_GRACE_MS after
    # it exited, and were killed: what they would have done next was not seen.
    left_running: bool = False
    # Set when the sandbox could not be set up: nothing (or not the command) ran.
    error: str = ""
    # "cwd" when the caller cannot enter the working directory, else "setup".
    error_kind: str = ""


@dataclass(frozen=True)
class OutputChunk:
    """Execute: a piece of the command's output, sent as soon as it was read."""

    stream: int  # 1 stdout, 2 stderr
    time_s: float  # since the command started
    data: bytes


@dataclass
class Prepared:
    """A sandbox built from a template, its command process waiting for a run spec."""

    key: bytes
    template: SandboxTemplate
    cgroup: Cgroup
    init_pid: int
    mount_ns: int
    spec_w: int
    out_r: int
    err_r: int
    status_r: int
    setup_s: float
    connector: socket.socket | None = None
    trace_channel: socket.socket | None = None
    recorder: reads.ReadRecorder | None = None
    network: netcap.NetworkRecorder | None = None
    # The host's network namespace (opened before unsharing), for egress's upstream side.
    host_net: int = -1

    def close(self) -> None:
        """Kill what is left and remove the cgroup; the namespaces go with the supervisor."""
        for sock in (self.connector, self.trace_channel):
            if sock is not None:
                sock.close()
        if self.network is not None:
            self.network.close()
        if self.host_net >= 0:
            with contextlib.suppress(OSError):
                os.close(self.host_net)
            self.host_net = -1
        if self.recorder is not None:
            self.recorder.close()
        for fd in (self.spec_w, self.out_r, self.err_r, self.status_r, self.mount_ns):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
            self.init_pid = 0
        self.cgroup.remove()


class _Capture:
    """One output stream, kept up to a limit and drained past it.

    With ``emit`` (Execute), chunks are handed on as they come instead of kept.
    """

    def __init__(
        self,
        limit: int,
        stream: int,
        emit: Callable[[OutputChunk | netcap.NetworkAttempt], None] | None,
    ) -> None:
        self.limit = limit
        self.stream = stream
        self.emit = emit
        self.data = bytearray()
        self.seen = 0
        self.truncated = False

    def feed(self, chunk: bytes, time_s: float) -> None:
        room = self.limit - self.seen
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.seen += len(chunk)
        if not chunk:
            return
        if self.emit is not None:
            self.emit(OutputChunk(self.stream, time_s, chunk))
        else:
            self.data += chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- The supervisor ---------------------------------------------------------------------------


def _in_root(root: str, path: str) -> str | None:
    """``path`` as the sandbox will see it under ``root``: every symbolic link but the last
    component's resolved inside ``root`` (``/var/run`` -> ``/run``); None if it leads nowhere."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    for _ in range(40):  # symbolic links followed at most, as the kernel's limit
        if not parts:
            return root + "/" + "/".join(done)
        part = parts.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        if part == "." or not parts:
            if part != ".":
                done.append(part)
            continue
        here = root + "/" + "/".join([*done, part])
        try:
            link = os.readlink(here)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return None
            done.append(part)
            continue
        if link.startswith("/"):
            done = []
        parts = [p for p in link.split("/") if p] + parts
    return None


def _host_sockets(template: SandboxTemplate, network: netcap.NetworkRecorder) -> None:
    """Bind a listening socket of the recorder over each of a dry run's
    ``template.host_sockets`` that is a socket on the host, with its owner and mode, where the
    sandbox shows a file: a connect is then recorded instead of refused (through the overlay a
    host socket refuses every connect; a socket the host bind-mounts shows as the file beneath)."""
    root = template.scratch_dir + "/root"
    seen: set[str] = set()
    for i, path in enumerate(template.host_sockets):
        try:
            st = os.stat(path)  # the host's view: this mount namespace is still its copy
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue  # most of the list, on most hosts: no path resolution for those
        target = _in_root(root, path)
        if target is None or target in seen:
            continue
        try:
            shown = os.lstat(target)
        except OSError:
            continue
        # Not over a directory, nor a symbolic link (mount(2) would follow it out of the root).
        if stat.S_IFMT(shown.st_mode) in (stat.S_IFDIR, stat.S_IFLNK):
            continue
        seen.add(target)
        stand_in = f"{template.scratch_dir}/host-socket-{i}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(stand_in)
            os.chown(stand_in, st.st_uid, st.st_gid)
            os.chmod(stand_in, stat.S_IMODE(st.st_mode))
            listener.listen(64)
            mnt.execute_step(Bind(stand_in, target, readonly=False))
        except BaseException:
            listener.close()
            raise
        network.add_host_socket(listener, target[len(root) :])


def prepare(template: SandboxTemplate, key: bytes) -> Prepared:
    """Build a sandbox from ``template``: the checklist. Call in a fresh (forked) process."""
    t0 = time.monotonic()
    # 1. A cgroup of its own for limits and accounting, created outside the sandbox.
    unique = f"{template.cgroup.name}-{os.getpid()}-{_digest.token_hex(3)}"
    cgroup = Cgroup.create(dataclasses.replace(template.cgroup, name=unique))
    connector: socket.socket | None = None
    trace_sup: socket.socket | None = None
    trace_cmd: socket.socket | None = None
    network: netcap.NetworkRecorder | None = None
    recorder: reads.ReadRecorder | None = None
    host_net = -1
    pid = 0
    try:
        # 1b. Process tracing: the proc connector lives in the initial network namespace, so
        #     its socket is opened before unsharing; the channel carries the seccomp listener.
        if template.trace_processes:
            if template.proc_connector:
                connector = proctrace.open_connector()
            trace_sup, trace_cmd = proctrace.channel()
        # 1c. With network capture, a handle on the host's network namespace: the egress
        #     relay's upstream side opens its connections there (sandbox/upstream.py).
        if template.capture_network:
            host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        # 2. New mount, network, IPC and UTS namespaces; the pid namespace comes at step 6.
        sc.unshare(template.namespaces & ~sc.CLONE_NEWPID)
        # 3. Nothing mounted from here on propagates to the host.
        mnt.make_private()
        # 4. Scratch tmpfs, overlays over every data mount (Execute: read-only ones, then the
        #    workspace bound read-write, refused if it holds a protected path), /dev, /sys,
        #    hidden paths.
        for op in template.host_setup:
            mnt.execute_step(op, template.protected)
        # 5. Hostname and a network with only loopback. With network capture, every
        #    destination is routed to the supervisor's recording sinkhole instead.
        sc.sethostname(template.hostname)
        net.loopback_up()
        if template.capture_network:
            network = netcap.install()
            # 5a. A dry run: the recorder's stand-ins over the host sockets the sandbox shows.
            _host_sockets(template, network)
        # (A dry run's lost-work checker is forked after the command, and only when the run
        #  touched a repository: sandbox/gitloss.py.)
        # 6. Init (pid 1: /proc, pivot_root) and the command process, which joins the cgroup
        #    and waits for its run spec.
        #    The pid namespace only now: the first process forked after it is its pid 1, and
        #    the set-up above may run helpers (nft), which must not take that place.
        sc.unshare(template.namespaces & sc.CLONE_NEWPID)
        procs = [
            os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
            for d in cgroup.paths
        ]
        spec_r, spec_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        fds = init.InitFds(
            spec_r, status_w, out_w, err_w, tuple(procs), trace_cmd.fileno() if trace_cmd else -1
        )
        grace_ms = 0 if template.writable else OUTLIVE_GRACE_MS  # Execute: run for real
        argv = init.arguments(
            template.init_setup, template.seccomp_program, fds.trace >= 0, grace_ms
        )
        pid = init.spawn(argv, fds)
        for fd in (spec_r, out_w, err_w, status_w, *procs):
            os.close(fd)
        if trace_cmd is not None:
            trace_cmd.close()
        # 7. Wait until init is set up, then hold its mount namespace: when init exits, the
        #    namespace (and its ~30 mounts) is then torn down after the result has been sent,
        #    not on the request's path.
        ready = os.read(status_r, 1)
        if ready != b"R":
            report = ready + os.read(status_r, 4096)
            raise OSError(f"sandbox init failed: {_status(report, None)[3]}")
        mount_ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        # 8. A dry run's read recorder: its fanotify group, marked on every overlay. Nothing
        #    runs in the sandbox until the request, which brings the globs (run).
        if template.watch_reads:
            recorder = reads.ReadRecorder(reads.overlay_mounts(template.host_setup))
    except BaseException:
        for sock in (connector, trace_sup, trace_cmd):
            if sock is not None:
                sock.close()
        if recorder is not None:
            recorder.close()
        if network is not None:
            network.close()
        if host_net >= 0:
            os.close(host_net)
        if pid > 0:  # init was forked: it (and with it the sandbox) must not outlive us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        cgroup.remove()
        raise
    return Prepared(
        key=key,
        template=template,
        cgroup=cgroup,
        init_pid=pid,
        mount_ns=mount_ns,
        spec_w=spec_w,
        out_r=out_r,
        err_r=err_r,
        status_r=status_r,
        setup_s=time.monotonic() - t0,
        connector=connector,
        trace_channel=trace_sup,
        recorder=recorder,
        network=network,
        host_net=host_net,
    )


def _status(
    status_msg: bytes, forced: Termination | None
) -> tuple[Termination, int, int, str, str]:
    """(termination, exit code, signal, error, error kind) from init's report."""
    if status_msg[:1] == b"S" and len(status_msg) >= 5:
        code = os.waitstatus_to_exitcode(struct.unpack("=i", status_msg[1:5])[0])
        if forced is not None:
            return forced, -1, int(signal.SIGKILL), "", ""
        if code >= 0:
            return Termination.EXITED, code, 0, "", ""
        return Termination.SIGNALED, -1, -code, "", ""
    if status_msg[:1] == b"E":
        kind, _, text = status_msg[1:].partition(b"\0")
        return Termination.EXITED, -1, 0, text.decode(errors="replace"), kind.decode()
    if forced is not None:
        return forced, -1, int(signal.SIGKILL), "", ""
    return Termination.EXITED, -1, 0, "the sandbox's init died without a report", "setup"


def _read_sensitive(recorder: reads.ReadRecorder) -> bool:
    """Take in everything the read recorder has queued: has the run opened a sensitive file?

    Fail closed: a queue that overflowed may have lost one."""
    while recorder.handle():
        pass
    return bool(recorder.reads()) or recorder.overflowed or recorder.dropped > 0


def run(
    prepared: Prepared,
    spec: RunSpec,
    cancel_fd: int,
    emit: Callable[[OutputChunk | netcap.NetworkAttempt], None] | None = None,
) -> SandboxResult:
    """Hand ``spec`` to the waiting command; watch output, deadline and cancellation.

    ``cancel_fd`` becomes readable (data or EOF) when the caller gives up; the
    whole process tree is then killed. With ``emit`` (Execute), output goes there
    as it is read instead of into the result, and so does each network attempt as it
    completes (it is in the result too). The caller must ``prepared.close()`` after.
    """
    started = time.monotonic()
    stdout = _Capture(spec.output_bytes, 1, emit)
    stderr = _Capture(spec.output_bytes, 2, emit)
    status_msg = bytearray()
    forced: Termination | None = None
    tracer: proctrace.ProcessTracer | None = None
    if prepared.trace_channel is not None:
        # Before the spec: the spec releases the command, whose exec the tracer must answer.
        tracer = proctrace.ProcessTracer(
            prepared.connector, prepared.trace_channel, prepared.init_pid, origin=started
        )
        prepared.connector = prepared.trace_channel = None  # the tracer owns them now
    recorder: reads.ReadRecorder | None = None
    if spec.sensitive_globs:
        # The globs are per request (their "~" is the caller's home): set before the spec
        # releases the command. A template without ``watch_reads`` gets its recorder now.
        if prepared.recorder is None:
            prepared.recorder = reads.ReadRecorder(
                reads.overlay_mounts(prepared.template.host_setup)
            )
        recorder = prepared.recorder
        recorder.expect(spec.sensitive_globs, spec.home)
    network = prepared.network
    if network is not None:
        network.origin = started  # attempt times count from the command's start
        if prepared.template.writable:
            # Execute: what the policy grants is forwarded as is (no fetch-only, no taint),
            # anything else is refused at once; each attempt is streamed as it completes.
            execute_egress = spec.egress or EgressPolicy()
            network.configure(
                execute_egress,
                Upstream(
                    prepared.host_net,
                    execute_egress,
                    resolve=dict(spec.test_resolve),
                    connect_timeout_s=network.limits.connect_timeout_s,
                )
                if execute_egress.enabled
                else None,
                fetch_only=False,
            )
        elif spec.egress is not None and spec.egress.enabled and recorder is not None:
            # Forward what the policy grants; the read recorder says when the run is tainted.
            network.configure(
                spec.egress,
                Upstream(
                    prepared.host_net,
                    spec.egress,
                    resolve=dict(spec.test_resolve),
                    connect_timeout_s=network.limits.connect_timeout_s,
                ),
                tainted=functools.partial(_read_sensitive, recorder),
            )
    with contextlib.suppress(BrokenPipeError):  # the command died in set-up: init says why
        _write_all(prepared.spec_w, init.encode_spec(spec))
    os.close(prepared.spec_w)
    prepared.spec_w = -1
    out_r, err_r, status_r = prepared.out_r, prepared.err_r, prepared.status_r
    streams = {out_r: stdout, err_r: stderr}
    deadline = started + spec.timeout_s
    poller = select.poll()
    for fd in (out_r, err_r, status_r, cancel_fd):
        poller.register(fd, select.POLLIN)
    if tracer is not None:
        poller.register(tracer.fileno(), select.POLLIN)
    if recorder is not None:
        poller.register(recorder.fileno(), select.POLLIN)
    if network is not None:
        poller.register(network.fileno(), select.POLLIN)
    open_fds = {out_r, err_r, status_r}
    while open_fds:
        now = time.monotonic()
        if forced is None and now >= deadline:
            forced = Termination.TIMED_OUT
            if tracer is not None:
                tracer.note_timeout()
            os.kill(prepared.init_pid, signal.SIGKILL)
            deadline = now + _DRAIN_S
        elif forced is not None and now >= deadline:
            break
        wait_s = max(0.0, deadline - now)
        if network is not None:
            # An open sinkhole connection must be closed at its read deadline.
            network_s = network.timeout()
            if network_s is not None:
                wait_s = min(wait_s, network_s)
        ready = poller.poll(wait_s * 1000)
        if network is not None and not ready:
            network.handle()
        if network is not None and emit is not None:
            for attempt in network.take_done():
                try:
                    emit(attempt)
                except OSError:  # the caller is gone: the next output's send says so
                    break
        for fd, _events in ready:
            if network is not None and fd == network.fileno():
                network.handle()
                continue
            if tracer is not None and fd == tracer.fileno():
                tracer.handle()
                continue
            if recorder is not None and fd == recorder.fileno():
                recorder.handle()
                continue
            if fd == cancel_fd:
                if forced is None:
                    forced = Termination.CANCELLED
                    if tracer is not None:
                        tracer.note_timeout()
                    os.kill(prepared.init_pid, signal.SIGKILL)
                    deadline = time.monotonic() + _DRAIN_S
                poller.unregister(cancel_fd)
                continue
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == status_r:
                status_msg += chunk
            else:
                try:
                    streams[fd].feed(chunk, time.monotonic() - started)
                except OSError:  # the caller is gone (Execute): as good as a cancellation
                    emit = None
                    stdout.emit = stderr.emit = None
                    if forced is None:
                        forced = Termination.CANCELLED
                        os.kill(prepared.init_pid, signal.SIGKILL)
                        deadline = time.monotonic() + _DRAIN_S
    with contextlib.suppress(ProcessLookupError):
        os.kill(prepared.init_pid, signal.SIGKILL)
    os.waitpid(prepared.init_pid, 0)  # returns once every process of the pid namespace is gone
    prepared.init_pid = 0
    command_s = time.monotonic() - started
    processes: tuple[proctrace.ProcessRecord, ...] = ()
    processes_truncated = False
    if tracer is not None:
        try:
            tracer.finish()
            processes, processes_truncated = tracer.records(), tracer.truncated
        finally:
            tracer.close()
    sensitive: tuple[reads.SensitiveRead, ...] = ()
    sensitive_incomplete = False
    if recorder is not None:
        # Closing a fanotify group waits for an SRCU grace period (10-20 ms): it is closed by
        # Prepared.close(), after the result has been sent, not here.
        while recorder.handle():  # everything queued before the last process died
            pass
        sensitive = recorder.reads()
        sensitive_incomplete = recorder.overflowed or recorder.dropped > 0
    attempts: tuple[netcap.NetworkAttempt, ...] = ()
    attempts_lost = 0
    if network is not None:
        attempts = network.finish()  # what is still queued; closes the sinkhole
        attempts_lost = network.dropped + network.lost

    termination, exit_code, signum, error, error_kind = _status(bytes(status_msg), forced)
    # init's report ends with 1 when processes the command left were still running at the end
    # of the grace (the C file's header).
    left_running = forced is None and status_msg[:1] == b"S" and status_msg[5:6] == b"\x01"
    stats = prepared.cgroup.stats()
    if stats.oom_kills and termination in (Termination.SIGNALED, Termination.EXITED):
        termination = Termination.OUT_OF_MEMORY
    if error:
        return SandboxResult(error=error, error_kind=error_kind, stderr=bytes(stderr.data))
    # The diff of the upper layers, read from outside the sandbox's root (Execute has none).
    t_diff = time.monotonic()
    caller = Caller(spec.uid, spec.gid, tuple(spec.groups))
    if prepared.template.writable:
        diff = DiffResult(changes=(), truncated=False, scratch_bytes=0)
    else:
        # Content leaves the sandbox only as the caller could have read it.
        diff = compute_changes(prepared.template.layers, spec.diff, caller)
    changeset_digest, changeset_bytes, changeset_error = "", 0, ""
    if spec.keep_changes_dir and len(diff.changes) > spec.keep_changes_max:
        changeset_error = (
            f"{len(diff.changes)} changes are more than the {spec.keep_changes_max} a dry run "
            "keeps for Apply; run the command with Execute instead"
        )
    elif spec.keep_changes_dir and diff.changes:
        # Kept while the sandbox's upper layers still exist; Apply writes exactly this.
        try:
            manifest = changeset.save(
                prepared.template.layers,
                diff,
                spec.keep_changes_dir,
                quota_bytes=spec.keep_changes_bytes,
                caller=caller,
            )
            changeset_digest, changeset_bytes = manifest.digest, manifest.content_bytes
        except (_errors.AirlockError, OSError) as exc:
            changeset_error = str(exc)
    # Work the run would destroy in a git repository: before (the host) against after (the
    # merged view), while the upper layers exist; costs nothing unless a repository was touched.
    work_lost: tuple[LostWork, ...] = ()
    if not prepared.template.writable:
        work_lost = gitloss.check_run(
            diff.changes,
            os.fsencode(prepared.template.scratch_dir + "/root"),
            spec.uid,
            spec.gid,
            tuple(spec.groups),
        )
    return SandboxResult(
        termination=termination,
        exit_code=exit_code,
        signal=signum,
        stdout=bytes(stdout.data),
        stdout_truncated=stdout.truncated,
        stderr=bytes(stderr.data),
        stderr_truncated=stderr.truncated,
        diff=diff,
        cgroup=stats,
        command_s=command_s,
        diff_s=time.monotonic() - t_diff,
        processes=processes,
        processes_truncated=processes_truncated,
        sensitive_reads=sensitive,
        sensitive_reads_incomplete=sensitive_incomplete,
        network_attempts=attempts,
        network_attempts_lost=attempts_lost,
        changeset_digest=changeset_digest,
        changeset_bytes=changeset_bytes,
        changeset_error=changeset_error,
        work_lost=work_lost,
        left_running=left_running,
    )


def _apply(plan: ApplyPlan) -> ApplyReply:
    """Open the changeset as root, become its user (unless root), write it to the host
    (or, ``plan.recover``, roll an interrupted apply forward or back).

    It dies with the spawner, which dies with the daemon: an apply never outlives the
    daemon that records it. The parent-death signal is set after the change of user (which
    clears it), then the parent checked: one that died before that is caught too.
    """
    parent = os.getppid()
    try:
        with open_changeset(plan.changeset_dir) as changeset:
            if plan.uid != 0:
                user.become(plan.uid, plan.gid, plan.groups)
            sc.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # the spawner (so the daemon) is gone: write nothing
            if plan.recover:
                return ApplyReply(
                    result=recover(changeset, plan.token, approved=plan.approved_special)
                )
            return ApplyReply(
                result=apply(changeset, approved=plan.approved_special, token=plan.token)
            )
    except Exception as exc:  # an AirlockError as it is, anything else as an AirlockError
        return ApplyReply(error=_errors.error_to_data(exc))


def serve_request(
    sock: socket.socket, prepared: Prepared | None
) -> tuple[SandboxTemplate, bytes] | None:
    """Read a plan from ``sock``, run it (in ``prepared`` if it fits), send the result back.

    Returns the template (and its key) of the sandbox it ran, which it has torn down; None if
    it ran none."""
    try:
        plan: SandboxPlan | PlanOnWire | ApplyPlan = _wire.recv(sock)
    except (OSError, EOFError):
        if prepared is not None:
            prepared.close()
        return None  # the daemon went away before sending a plan
    if isinstance(plan, ApplyPlan):
        if prepared is not None:
            prepared.close()
        with contextlib.suppress(OSError):
            _wire.send(sock, _apply(plan))
        return None
    warm = prepared is not None and prepared.key == plan.template_key
    try:
        if not warm:
            if prepared is not None:
                prepared.close()  # built from an older template: throw it away
            template = plan.template
            if isinstance(template, bytes):  # PlanOnWire: unpickled only when it is needed
                template = _wire.loads(template[_wire.HEADER_BYTES :])
            prepared = prepare(template, plan.template_key)
        assert prepared is not None
        emit = None
        if prepared.template.writable:  # Execute: stream the output as it comes

            def emit(chunk: OutputChunk | netcap.NetworkAttempt) -> None:
                _wire.send(sock, chunk)

        result = run(prepared, plan.run, sock.fileno(), emit)
        result = dataclasses.replace(result, warm=warm, setup_s=0.0 if warm else prepared.setup_s)
    except Exception as exc:
        result = SandboxResult(error=f"{type(exc).__name__}: {exc}", error_kind="setup")
    with contextlib.suppress(OSError):
        _wire.send(sock, result)  # the result goes out before the clean-up
    if prepared is None:
        return None
    prepared.close()
    return prepared.template, prepared.key


# --- Reuse: one supervisor, one sandbox at a time, several in turn -----------------------------
#
# A supervisor that has torn its sandbox down builds the next one of the same template instead
# of exiting: no fork of the spawner's image, no copy-on-write faults on pages it already owns,
# no exit of a ~25 MB process per dry run (docs/decisions.md §38). Each sandbox is still new
# (namespaces, mounts, cgroup, init) and serves one request; between two, the supervisor goes
# back into the host's namespaces and is reused only if it holds exactly the descriptors it
# started with: anything a run left open ends the process instead of reaching the next one.

# Sandboxes one supervisor builds at most, and how much its resident memory may grow past what
# it was when it started (a diff of thousands of files leaves malloc holding ~20 MB: such a
# supervisor exits rather than keep it while it waits).
REUSE_RUNS = 256
REUSE_GROWTH_BYTES = 8 * 1024 * 1024
_HOST_NAMESPACES = (
    ("mnt", sc.CLONE_NEWNS),
    ("net", sc.CLONE_NEWNET),
    ("ipc", sc.CLONE_NEWIPC),
    ("uts", sc.CLONE_NEWUTS),
    ("pid", sc.CLONE_NEWPID),  # for children: each sandbox unshares a new one again
)


def _open_fds() -> dict[str, str]:
    """Every open descriptor and what it is (``socket:[inode]``, a path, ...), but the one that
    lists them."""
    out = {}
    listing = f"/proc/{os.getpid()}/fd"
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed by now
            target = os.readlink(f"/proc/self/fd/{name}")
            if target != listing:
                out[name] = target
    return out


def _log_warning(msg: str, left_open: list[str]) -> None:
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "level": "warning",
        "msg": msg,
        "left_open": left_open,
    }
    with contextlib.suppress(OSError, ValueError):
        os.write(2, (json.dumps(line) + "\n").encode())


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Host:
    """The host's namespaces a supervisor started in, and the descriptors it started with."""

    def __init__(self, transient: tuple[int, ...] = ()) -> None:
        self.namespaces = [
            (os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), kind)
            for name, kind in _HOST_NAMESPACES
        ]
        # ``transient``: open now, closed before the first check (a cold request's socket).
        self.baseline = _open_fds()
        for fd in transient:
            self.baseline.pop(str(fd), None)
        self.runs = 0
        self.rss = _rss_bytes()

    def again(self) -> bool:
        """After a sandbox was torn down: may this process build another? If so, it is back in
        the host's namespaces."""
        self.runs += 1
        if self.runs >= REUSE_RUNS:
            return False
        now = _open_fds()
        if now != self.baseline:
            # A run left something open (a bug to fix): this process ends rather than carry it
            # into the next sandbox. Said once, in the daemon's log format, with what it was.
            left = sorted(target for fd, target in now.items() if self.baseline.get(fd) != target)
            _log_warning("a supervisor is not reused: a run left descriptors open", left[:8])
            return False
        if _rss_bytes() - self.rss > REUSE_GROWTH_BYTES:
            return False
        for fd, kind in self.namespaces:
            sc.setns(fd, kind)
        return True


def _serve_reused(host: _Host, template: SandboxTemplate, key: bytes, pool: socket.socket) -> None:
    """Build a sandbox of ``template``, tell the spawner ("W"), serve a request; again."""
    while True:
        prepared = prepare(template, key)
        try:
            pool.send(b"W")
        except OSError:
            prepared.close()
            return
        if not _serve_next(pool, prepared) or not host.again():
            return


def _serve_next(pool: socket.socket, prepared: Prepared) -> bool:
    """Wait for a request socket from the spawner and serve it in ``prepared``; False if the
    spawner retired the sandbox instead (new template, idle, or shutdown)."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(pool, 1, 1)
    except OSError:
        msg, fds = b"", []
    if not msg or not fds:
        for fd in fds:
            os.close(fd)
        prepared.close()
        return False
    request = socket.socket(fileno=fds[0])
    try:
        serve_request(request, prepared)
    finally:
        request.close()
    return True


def serve_warm(template: SandboxTemplate, key: bytes, pool: socket.socket) -> None:
    """A warm sandbox: prepare now, then wait for a request socket from the spawner; then
    more of them in turn while this process may be reused."""
    host = _Host()
    prepared = prepare(template, key)
    if _serve_next(pool, prepared) and host.again():
        _serve_reused(host, template, key, pool)


def serve_cold(request_fd: int, pool: socket.socket) -> None:
    """A request no warm sandbox was ready for: build one for it; then serve as a warm one."""
    host = _Host(transient=(request_fd,))
    request = socket.socket(fileno=request_fd)
    try:
        served = serve_request(request, None)
    finally:
        request.close()
    if served is not None and host.again():
        _serve_reused(host, served[0], served[1], pool)
