"""The daemon's life: set up in order, serve, drain on SIGTERM, clean up.

Start-up order matters: the sandbox helper is exec'd before the gRPC server
creates its threads (see ``airlock.sandbox.spawner``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airlock._errors import AirlockError
from airlock._version import __version__
from airlock.audit import AuditLog
from airlock.core.config import DaemonConfig
from airlock.core.engine import Engine
from airlock.core.service import Service
from airlock.core.state import StateStore
from airlock.core.workflow import Workflow
from airlock.daemon._peer import ConnectionLimits, PeerProxy
from airlock.daemon.service import SandboxService, handler, refusals
from airlock.policy.loader import PolicyError
from airlock.policy.store import PolicyStore, default_policy_dir
from airlock.sandbox import cgroup
from airlock.sandbox.probe import probe
from airlock.sandbox.spawner import Spawner
from airlock.types import Capabilities
from airlock.v1 import sandbox_pb2 as pb

__all__ = ["serve"]

_log = logging.getLogger("airlock.daemon")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SandboxService"].full_name


def _private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def serve(config: DaemonConfig, *, ready: threading.Event | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    # 1. State directory, owned by this daemon alone.
    _private_dir(config.state_dir)
    _private_dir(config.scratch_dir)
    private = _private_dir(os.path.join(config.state_dir, "private"))
    lock = open(os.path.join(private, "daemon.lock"), "w")  # noqa: SIM115 - held for life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log.error("another daemon uses this state directory", extra={"dir": config.state_dir})
        return 1

    # 2. The policy: an invalid bundle stops the daemon here (fail closed).
    try:
        policy = PolicyStore(config.policy_dir or default_policy_dir())
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
    spawner = Spawner(pool=config.warm_pool)
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
    # Validations, approvals and kept changes survive a restart; an apply a crash cut
    # short is flagged, never retried.
    state = StateStore.in_state_dir(
        config.state_dir,
        quota_bytes=config.keep_changes_quota_bytes,
        uid_quota_bytes=config.keep_changes_uid_quota_bytes,
    )
    workflow = Workflow(state, config.changesets_dir)
    workflow.recover()
    workers = config.limits.concurrent_validations + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"))
    app = Service(engine, workflow, audit, policy, capabilities)
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
        audit.close()
        return 1
    server.start()
    refuser.start()
    proxy.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    # 6. Serve until told to stop; reload the policy on SIGHUP and when its files change.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    policy.watch(stop)
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
    while not stop.is_set():
        if reload_requested.wait(timeout=0.5):
            reload_requested.clear()
            policy.reload("SIGHUP")

    # 7. Drain: refuse new callers, let calls in flight finish, then clean up.
    _log.info("draining")
    health_servicer.enter_graceful_shutdown()
    proxy.stop_accepting()
    refuser.stop(grace=None)
    server.stop(grace=config.limits.max_timeout_s + 30).wait()
    proxy.close()
    spawner.stop()
    cgroup.remove_group(cgroups, config.cgroup_group)
    state.close()
    for path in (internal, refused):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _close_audit(audit)
    lock.close()
    _log.info("stopped")
    return 0


def _close_audit(audit: AuditLog) -> None:
    """Close the log (every call has ended), leaving its head in the daemon's log."""
    try:
        head = audit.head()
    except AirlockError as exc:
        _log.error("cannot read the audit log's head", extra={"error": str(exc)})
        head = None
    audit.close()
    _log.info("audit log closed", extra={"path": audit.path, "head": str(head or "")})
