"""The daemon's life: set up in order, serve, drain on SIGTERM, clean up.

Start-up order matters: the sandbox helper is exec'd before the gRPC server
creates its threads (see ``airlock.sandbox.spawner``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airlock._errors import AirlockError, ResourceExhausted
from airlock._version import __version__
from airlock.api.status import to_rpc_status
from airlock.audit import Anchor, AuditLog
from airlock.core._audit import HeadKeeper
from airlock.core.config import DaemonConfig
from airlock.core.engine import Engine
from airlock.core.pending import MAX_WATCHES
from airlock.core.service import Service
from airlock.core.state import StateStore
from airlock.core.workflow import Workflow
from airlock.daemon._memory import Trimmer, limit_arenas
from airlock.daemon._peer import ConnectionLimits, PeerProxy
from airlock.daemon._signals import Signals
from airlock.daemon.service import SandboxService, handler, refusals
from airlock.policy.loader import PolicyError, check_in_child
from airlock.policy.store import PolicyStore, default_policy_dir
from airlock.sandbox import cgroup
from airlock.sandbox.probe import probe
from airlock.sandbox.spawner import Spawner
from airlock.types import Capabilities
from airlock.v1 import sandbox_pb2 as pb

__all__ = ["serve"]

_log = logging.getLogger("airlock.daemon")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SandboxService"].full_name


# Calls answered at once from memory: never limited, so never refused or queued behind work.
# WatchPendingValidations limits itself (MAX_WATCHES) and has threads of its own.
_UNLIMITED = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        f"/{SERVICE_NAME}/GetCapabilities",
        f"/{SERVICE_NAME}/GetPolicy",
        f"/{SERVICE_NAME}/WatchPendingValidations",
    }
)
# Streams that stay open as long as their client likes: a health watch, reflection.
_STREAMS = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")
_STREAM_SLOTS = 4
_SPARE_THREADS = 4  # threads no limited call can take: probes and refusals run on them


class _Admission(grpc.ServerInterceptor):  # type: ignore[misc]
    """Keeps threads free for health and reflection (issue 15): every other call holds one
    of ``work_slots`` (streams one of ``_STREAM_SLOTS``) while it runs, and a call that finds
    none is refused at once (RESOURCE_EXHAUSTED). The pool has more threads than the slots,
    so a stalled call (an audit log locked by another process) can hold a slot, never the
    threads a health check needs. ``on_end`` runs when an admitted call ends (the daemon's
    :class:`~airlock.daemon._memory.Trimmer`)."""

    def __init__(self, work_slots: int, on_end: Callable[[], None] = lambda: None) -> None:
        self._work = (threading.BoundedSemaphore(work_slots), work_slots, "calls")
        self._streams = (threading.BoundedSemaphore(_STREAM_SLOTS), _STREAM_SLOTS, "streams")
        self._on_end = on_end

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method in _UNLIMITED:
            return handler
        slots = self._streams if method.startswith(_STREAMS) else self._work
        return _limited(handler, *slots, self._on_end)


def _limited(
    handler: grpc.RpcMethodHandler,
    slots: threading.BoundedSemaphore,
    count: int,
    what: str,
    on_end: Callable[[], None],
) -> grpc.RpcMethodHandler:
    """``handler`` holding one of ``slots`` while it runs; refused at once if none is free.
    ``on_end`` runs after a call that was admitted."""

    def admit(context: grpc.ServicerContext) -> None:
        if not slots.acquire(blocking=False):
            error = ResourceExhausted(
                f"the daemon is serving its maximum of {count} {what} at once; retry later"
            )
            context.abort_with_status(to_rpc_status(error))

    def unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            admit(context)
            try:
                return behavior(request, context)
            finally:
                slots.release()
                on_end()

        return call

    def stream(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            admit(context)
            try:
                yield from behavior(request, context)
            finally:
                slots.release()
                on_end()

        return call

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **codec)


def _os_error(exc: OSError) -> str:
    """An OS error in one line: what, and which file."""
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def _private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def serve(config: DaemonConfig, *, ready: threading.Event | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    # 0. Fewer malloc arenas, set before any thread exists (issue 16; daemon/_memory.py).
    limit_arenas()
    # 1. State directory, owned by this daemon alone. One that cannot be written (a
    # read-only file system) stops the daemon here, with one line that says so.
    try:
        _private_dir(config.state_dir)
        _private_dir(config.scratch_dir)
        private = _private_dir(os.path.join(config.state_dir, "private"))
        lock = open(os.path.join(private, "daemon.lock"), "w")  # noqa: SIM115 - held for life
    except OSError as exc:
        _log.error(
            "the state directory cannot be used; not starting",
            extra={"state_dir": config.state_dir, "error": _os_error(exc)},
        )
        return 1
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log.error("another daemon uses this state directory", extra={"dir": config.state_dir})
        return 1

    # 2. The policy: an invalid bundle stops the daemon here (fail closed).
    try:
        # Checked against the schema in a child process: jsonschema stays out of the daemon.
        policy = PolicyStore(config.policy_dir or default_policy_dir(), schema=check_in_child)
    except PolicyError as exc:
        _log.error("the policy is invalid; not starting", extra={"error": str(exc)})
        return 1

    # 2b. The audit log: a daemon that cannot record its decisions must not make any.
    try:
        audit = AuditLog.in_state_dir(config.state_dir)
        head = audit.head()
    except (AirlockError, OSError) as exc:
        _log.error(
            "the audit log cannot be opened; not starting",
            extra={
                "state_dir": config.state_dir,
                "reason": getattr(exc, "reason", "OS_ERROR"),
                "error": str(exc),
            },
        )
        return 1
    # The head at start and at stop, in the daemon's log: anchors for `airlock audit verify`.
    _log.info("audit log open", extra={"path": audit.path, "head": str(head or "")})

    # 2c. The state store, which also keeps the log's last head: a log that no longer reaches
    # it was cut short or replaced, and the daemon refuses it (unless --new-audit-log).
    # Validations, approvals and kept changes survive a restart; an apply a crash cut
    # short is settled at start-up (Service.recover, below), or flagged for a person.
    try:
        state = StateStore.in_state_dir(
            config.state_dir,
            quota_bytes=config.keep_changes_quota_bytes,
            uid_quota_bytes=config.keep_changes_uid_quota_bytes,
        )
    except AirlockError as exc:
        _log.error(
            "the state store cannot be opened; not starting",
            extra={"state_dir": config.state_dir, "reason": exc.reason, "error": exc.message},
        )
        audit.close()
        return 1
    ok, recorded = _check_audit_head(audit, state, head, new_log=config.new_audit_log)
    if not ok:
        state.close()
        audit.close()
        return 1

    # 3. Cgroups: find them, and sweep what a crashed daemon with this state dir left.
    cgroups = cgroup.detect()
    swept = cgroup.sweep(cgroups, config.cgroup_group)
    support = probe(cgroups)
    capabilities = Capabilities(
        daemon_version=__version__,
        kernel_release=support.kernel_release,
        namespaces=support.namespaces,
        overlayfs=support.overlayfs,
        cgroup_version=cgroups.version,
        cgroup_controllers=cgroups.controllers,
        seccomp=support.seccomp,
        seccomp_user_notification=support.seccomp_user_notification,
        limits=config.limits,
    )

    # 4. The sandbox helper, exec'd before any gRPC thread exists.
    spawner = Spawner(pool=config.warm_pool, idle_s=config.warm_idle_s)
    spawner.start()

    # 5. The gRPC server on a root-only internal socket, fronted by the identity relay.
    internal = os.path.join(private, "grpc.sock")
    # Connections past their uid's limit are relayed to a second, tiny server that answers
    # every call RESOURCE_EXHAUSTED with the reason: they never reach the real one.
    refused = os.path.join(private, "refused.sock")
    for path in (internal, refused):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    proxy = PeerProxy(
        config.socket_path,
        internal,
        refused_path=refused,
        mode=config.socket_mode,
        gid=config.socket_gid,
        limits=ConnectionLimits(
            max_connections=config.max_connections,
            per_uid=config.max_connections_per_uid,
            root_reserve=config.max_connections // 8,
            first_request_s=config.first_request_timeout_s,
        ),
    )
    engine = Engine(config, spawner, cgroups, policy, proc_connector=support.proc_connector)
    workflow = Workflow(state, config.changesets_dir, config.approvers)
    # Watches of pending validations each hold a thread for minutes: they get their own.
    workers = config.limits.concurrent_validations + 8
    threads = workers + MAX_WATCHES + _STREAM_SLOTS + _SPARE_THREADS
    # What a large answer freed goes back to the system once the daemon is quiet (issue 16).
    trimmer = Trimmer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        interceptors=(_Admission(workers, on_end=trimmer.poke),),
    )
    app = Service(engine, workflow, audit, policy, capabilities)
    # Applies a crash cut short: rolled forward or back on the host, audited (or flagged).
    app.recover()
    policy.on_accept = app.policy_accepted  # an accepted removal is audited, or refused
    server.add_generic_rpc_handlers((handler(SandboxService(app, proxy)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port("unix:" + internal)
    refuser = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="refuse"))
    refuser.add_generic_rpc_handlers((refusals(proxy),))
    refuser.add_insecure_port("unix:" + refused)
    try:
        proxy.bind()
    except OSError as exc:
        _log.error("cannot listen", extra={"socket": config.socket_path, "error": str(exc)})
        spawner.stop()
        state.close()
        audit.close()
        return 1
    keeper = HeadKeeper(audit, state)
    keeper.start(recorded)  # a thread: only now that the sandbox helper runs
    trimmer.start()  # trims what start-up freed (the policy's load), then a thread
    server.start()
    refuser.start()
    proxy.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    # 6. Serve until told to stop; reload the policy on SIGHUP and when its files change.
    # The handlers only count; this thread reads a wake-up pipe and never waits on a reload
    # (the policy watcher runs them), so no signal storm can wedge it (issue 15).
    signals = Signals.install()
    stop = threading.Event()
    reload_requested = threading.Event()
    policy.watch(stop, requested=reload_requested)
    # Expired changes and old state rows go on a timer, not on the next Validate (issue 15).
    workflow.start_pruning()
    _log.info(
        "serving",
        extra={
            "socket": config.socket_path,
            "state_dir": config.state_dir,
            "version": __version__,
            "cgroup": cgroups.version.name.lower(),
            "swept_cgroups": swept,
            "spawner_pid": spawner.pid,
            "policy": policy.info().version,
            "policy_dir": str(policy.directory),
        },
    )
    if ready is not None:
        ready.set()
    while not signals.stopping:
        signals.wait(0.5)
        if signals.take_reload():
            reload_requested.set()  # from the main thread, never from a handler
    stop.set()

    # 7. Drain: refuse new callers, let calls in flight finish, then clean up.
    _log.info("draining")
    app.close()  # end the watches of pending validations: they would hold the drain
    health_servicer.enter_graceful_shutdown()
    proxy.stop_accepting()
    refuser.stop(grace=None)
    server.stop(grace=config.limits.max_timeout_s + 30).wait()
    # Every step runs even if one before it failed (a read-only state directory: EROFS);
    # each failure is one line in the log, and the exit status is then 1.
    failed = [
        not _stop_step("stop the connection relay", proxy.close),
        not _stop_step("stop giving memory back", trimmer.stop),
        not _stop_step("stop the sandbox helper", spawner.stop),
        not _stop_step(
            "remove the daemon's cgroups",
            lambda: cgroup.remove_group(cgroups, config.cgroup_group),
        ),
        not _stop_step("record the audit log's head in the state store", keeper.stop),
        not _stop_step("stop pruning", workflow.stop_pruning),
        not _stop_step("close the state store", state.close),
        *(
            not _stop_step(f"remove {p}", functools.partial(_unlink, p))
            for p in (internal, refused)
        ),
        not _close_audit(audit),
        not _stop_step("release the state directory", lock.close),
    ]
    _log.info("stopped", extra={"clean": not any(failed)})
    return 1 if any(failed) else 0


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _stop_step(what: str, action: Callable[[], object]) -> bool:
    """Run one step of the shutdown; a failure is one line in the log (False), never a crash."""
    try:
        action()
    except OSError as exc:
        _log.error(f"could not {what} while stopping", extra={"error": _os_error(exc)})
        return False
    except AirlockError as exc:
        _log.error(
            f"could not {what} while stopping",
            extra={"reason": exc.reason, "error": exc.message},
        )
        return False
    return True


def _check_audit_head(
    audit: AuditLog, state: StateStore, head: Anchor | None, *, new_log: bool
) -> tuple[bool, Anchor | None]:
    """Check the log against the head the state store recorded, then record the log's head.

    Returns (True, the head now recorded), or (False, None) after one line in the log: the
    log does not reach the recorded head (it was emptied, cut short, or replaced) and
    ``new_log`` was not asked, or the check itself failed.
    """
    try:
        recorded = state.audit_head()
        problem = None
        if recorded is not None:
            problem = audit.check_continues(recorded, "the head recorded in the state store")
        if problem is not None and not new_log:
            _log.error(
                "the audit log does not reach the head this daemon recorded; not starting",
                extra={
                    "path": audit.path,
                    "recorded_head": str(recorded),
                    "head": str(head or ""),
                    "problem": problem.kind.name,
                    "error": f"{problem.detail}. To start a new log deliberately, keep the "
                    "old one as evidence and start airlockd once with --new-audit-log "
                    "(see README, 'A new audit log')",
                },
            )
            return False, None
        if problem is not None:
            _log.warning(
                "starting a new audit log (--new-audit-log): it does not reach the head "
                "recorded before",
                extra={
                    "path": audit.path,
                    "recorded_head": str(recorded),
                    "head": str(head or ""),
                    "problem": problem.kind.name,
                },
            )
        if head != recorded:
            state.record_audit_head(head)
    except AirlockError as exc:
        _log.error(
            "the audit log's head cannot be checked; not starting",
            extra={"path": audit.path, "reason": exc.reason, "error": exc.message},
        )
        return False, None
    return True, head


def _close_audit(audit: AuditLog) -> bool:
    """Close the log (every call has ended), leaving its head in the daemon's log."""
    ok = True
    try:
        head = audit.head()
    except AirlockError as exc:
        _log.error("cannot read the audit log's head", extra={"error": str(exc)})
        head, ok = None, False
    audit.close()
    _log.info("audit log closed", extra={"path": audit.path, "head": str(head or "")})
    return ok
