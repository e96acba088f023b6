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

from airlock._version import __version__
from airlock.daemon._peer import PeerProxy
from airlock.daemon.service import SandboxService, handler
from airlock.engine import DaemonConfig, Engine
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
    with contextlib.suppress(FileNotFoundError):
        os.unlink(internal)
    proxy = PeerProxy(config.socket_path, internal, mode=config.socket_mode, gid=config.socket_gid)
    engine = Engine(config, spawner, cgroups, policy, proc_connector=support.proc_connector)
    workers = config.limits.concurrent_validations + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"))
    service = SandboxService(engine, proxy, capabilities, policy)
    server.add_generic_rpc_handlers((handler(service),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port("unix:" + internal)
    try:
        proxy.bind()
    except OSError as exc:
        _log.error("cannot listen", extra={"socket": config.socket_path, "error": str(exc)})
        spawner.stop()
        return 1
    server.start()
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
    server.stop(grace=config.limits.max_timeout_s + 30).wait()
    proxy.close()
    spawner.stop()
    cgroup.remove_group(cgroups, config.cgroup_group)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(internal)
    lock.close()
    _log.info("stopped")
    return 0
