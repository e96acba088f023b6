"""The daemon's life: health, reflection, capabilities, limits, drain, crash recovery, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from airlock import AirlockError, ResourceExhausted
from airlock.client import Client
from airlock.core.config import DaemonConfig
from airlock.types import CgroupVersion, Termination, Verdict
from tests.helpers import (
    AIRLOCK,
    NEUTRAL_POLICY,
    SANDBOX_ARGS,
    Daemon,
    airlock_cgroups,
    running_daemon,
    start_daemon,
)

# These tests are about the sandbox and the daemon: every command must reach the dry run.
DAEMON_ARGS = NEUTRAL_POLICY


def test_health_and_reflection_with_no_proto_files(daemon: Daemon) -> None:
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "airlock.v1.SandboxService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"airlock.v1.SandboxService", "grpc.health.v1.Health"} <= names


def test_socket_permissions(daemon: Daemon) -> None:
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666  # as configured for tests


def test_capabilities(client: Client) -> None:
    caps = client.capabilities()
    assert {"mnt", "pid", "net", "ipc", "uts"} <= set(caps.namespaces)
    assert caps.overlayfs and caps.seccomp and caps.seccomp_user_notification
    assert caps.cgroup_version in (CgroupVersion.V1, CgroupVersion.V2)
    assert {"memory", "pids"} <= set(caps.cgroup_controllers)
    assert caps.limits.output_bytes == 64 * 1024 and caps.limits.pids == 64
    assert caps.limits.memory_bytes == 256 * 1024**2 and caps.limits.max_timeout_s == 60
    assert caps.daemon_version and caps.kernel_release == os.uname().release


def test_logs_are_json_lines_with_validation_id(daemon: Daemon, client: Client) -> None:
    v = client.validate("true", cwd="/tmp")
    entries = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    mine = [e for e in entries if e.get("validation_id") == v.validation_id]
    assert mine and mine[0]["msg"] == "validated" and mine[0]["verdict"] == "allow"


def wait_for_process(marker: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout:
        assert time.monotonic() < deadline, f"no process matching {marker} appeared"
        time.sleep(0.02)


def test_concurrency_limit_refuses_instead_of_queueing(public_tmp: Path) -> None:
    marker = f"1.5{time.time_ns() % 10**6:06d}"  # a unique, 1.5 s sleep
    with running_daemon(public_tmp, *SANDBOX_ARGS, "--max-concurrent", "1") as d:
        slow: list[object] = []

        def run_slow() -> None:
            with d.client() as c:
                slow.append(c.validate(f"sleep {marker}; echo done", cwd="/tmp", timeout=30))

        t = threading.Thread(target=run_slow)
        t.start()
        try:
            wait_for_process(f"^sleep {marker}")  # the slow one holds the only slot
            with d.client() as c, pytest.raises(ResourceExhausted) as info:
                c.validate("true", cwd="/tmp")
            assert info.value.reason == "TOO_MANY_VALIDATIONS"
        finally:
            t.join()
        assert slow and slow[0].stdout == b"done\n"  # type: ignore[attr-defined]
        with d.client() as c:  # the slot is free again
            assert c.validate("echo ok", cwd="/tmp").stdout == b"ok\n"


def test_sigterm_drains_requests_in_flight(public_tmp: Path) -> None:
    marker = f"1.2{time.time_ns() % 10**6:06d}"  # a unique, 1.2 s sleep
    d = running_daemon(public_tmp, *SANDBOX_ARGS)
    with d as daemon:
        results: list[object] = []

        def run() -> None:
            with daemon.client() as c:
                results.append(c.validate(f"sleep {marker}; echo finished", cwd="/tmp"))

        t = threading.Thread(target=run)
        t.start()
        wait_for_process(f"^sleep {marker}")  # the call is in flight, its command running
        daemon.proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        assert daemon.proc.wait(timeout=30) == 0
        assert results and results[0].stdout == b"finished\n"  # type: ignore[attr-defined]
        assert not os.path.exists(daemon.socket)
    assert "draining" in daemon.log() and "stopped" in daemon.log()


def test_sigterm_delivers_a_large_answer_in_flight(public_tmp: Path) -> None:
    """The answer of a call in flight at SIGTERM reaches its caller whole, however large.

    30,000 created files make an answer of several megabytes, more than the socket buffers of
    the identity relay between the caller and the gRPC server: when the server has finished
    the call, most of it is still in the relay. The relay used to hang up on its callers as
    soon as the server had stopped, cutting such answers (UNAVAILABLE, "GOAWAY received"; about
    one stop in two here). Three rounds."""
    for round_ in range(3):
        marker = f"0.4{time.time_ns() % 10**6:06d}"
        with running_daemon(public_tmp / f"r{round_}", *SANDBOX_ARGS) as daemon:
            results: list[object] = []
            errors: list[BaseException] = []

            def run(
                d: Daemon = daemon,
                line: str = f"sleep {marker}; mkdir many && cd many && seq 30000 | xargs touch; "
                "echo finished",
                out: list[object] = results,
                failed: list[BaseException] = errors,
            ) -> None:
                try:
                    with d.client() as c:
                        out.append(c.validate(line, cwd="/tmp"))
                except BaseException as exc:  # reported below
                    failed.append(exc)

            t = threading.Thread(target=run)
            t.start()
            wait_for_process(f"^sleep {marker}")
            daemon.proc.send_signal(signal.SIGTERM)
            t.join(timeout=60)
            assert daemon.proc.wait(timeout=60) == 0, daemon.log()
            assert not errors, errors
            validation = results[0]
            assert validation.stdout == b"finished\n"  # type: ignore[attr-defined]
            assert len(validation.changes) > 1000  # type: ignore[attr-defined]


def test_sigkill_leaves_nothing_after_restart(public_tmp: Path) -> None:
    """A crashed daemon's sandboxes die with it; the next start sweeps what is left."""
    marker = f"7{time.time_ns() % 1000}.{os.getpid()}"
    d = start_daemon(public_tmp, *SANDBOX_ARGS)
    group = DaemonConfig(state_dir=d.state_dir).cgroup_group
    try:

        def doomed() -> None:
            with d.client() as c, contextlib.suppress(AirlockError):
                c.validate(f"sleep {marker}", cwd="/")  # the daemon dies under it

        t = threading.Thread(target=doomed)
        t.start()
        wait_for_process(f"sleep {marker}")
        d.proc.kill()
        d.proc.wait()
        t.join()
        # The supervisor sees its caller gone and kills the sandbox.
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout:
            assert time.monotonic() < deadline, "the sandbox outlived the daemon"
            time.sleep(0.05)
        # Restart on the same state directory (and the stale socket file).
        with running_daemon(public_tmp, *SANDBOX_ARGS) as again, again.client() as c:
            assert c.validate("echo back", cwd="/").stdout == b"back\n"
    finally:
        d.stop(signal.SIGKILL)
    assert not {c for c in airlock_cgroups() if c.endswith("/" + group)}


def test_a_stop_during_a_dry_run_leaves_no_cgroup_and_no_supervisor(public_tmp: Path) -> None:
    """SIGTERM while a dry run runs: the daemon answers it, then stops. Its supervisor is then
    tearing that sandbox down and building its next one (decisions section 38) while the
    daemon removes its cgroups; the spawner waits for its supervisors before it exits, so
    nothing may outlive the daemon (a supervisor that did recreated the daemon's cgroup
    parent: CI's leak check found one). The race is narrow: this passed on the code before the
    fix here too; tests/unit/sandbox/test_pool.py checks the hang-up itself."""
    for round_ in range(3):
        marker = f"0.3{time.time_ns() % 10**6:06d}"  # a unique, 0.3 s sleep
        d = start_daemon(public_tmp / f"r{round_}", *SANDBOX_ARGS)
        group = DaemonConfig(state_dir=d.state_dir).cgroup_group
        try:
            helpers = psutil.Process(d.proc.pid).children(recursive=True)
            results: list[object] = []

            def run(
                daemon: Daemon = d,
                line: str = f"sleep {marker}; echo done",
                out: list[object] = results,
            ) -> None:
                with daemon.client() as c:
                    out.append(c.validate(line, cwd="/tmp"))

            t = threading.Thread(target=run)
            t.start()
            wait_for_process(f"^sleep {marker}")
            helpers += psutil.Process(d.proc.pid).children(recursive=True)  # the running one
            d.proc.send_signal(signal.SIGTERM)
            t.join(timeout=30)
            assert d.proc.wait(timeout=30) == 0, d.log()
        finally:
            d.stop(signal.SIGKILL)
        assert results and results[0].stdout == b"done\n"  # type: ignore[attr-defined]
        alive = [
            p.pid
            for p in helpers
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.pid != d.proc.pid
        ]
        assert not alive, f"processes of the daemon outlived it: {alive}"
        time.sleep(0.3)  # what a straggler would have done by now
        assert not {c for c in airlock_cgroups() if c.endswith("/" + group)}


def test_second_daemon_on_same_socket_refuses(daemon: Daemon, public_tmp: Path) -> None:
    proc = subprocess.run(
        [
            str(Path(AIRLOCK).with_name("airlockd")),
            "--socket",
            daemon.socket,
            "--state-dir",
            str(public_tmp / "other-state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "already serving" in proc.stderr
    with daemon.client() as c:
        assert c.health()


def test_cli_validate_report_and_json(daemon: Daemon, workspace: Path) -> None:
    (workspace / "old.log").write_text("x\n")
    shown = daemon.cli("validate", "--", "echo hi > notes.txt; rm -f old.log", cwd=str(workspace))
    assert shown.returncode == 0, shown.stderr
    assert (
        "ALLOW" in shown.stdout.upper()
        and "notes.txt" in shown.stdout
        and "old.log" in shown.stdout
    )
    as_json = daemon.cli("validate", "--json", "--cwd", str(workspace), "--", "echo x > /etc/x")
    assert as_json.returncode == 3  # ask
    body = json.loads(as_json.stdout)
    assert body["verdict"] == "VERDICT_ASK"
    assert (
        body["changes"][0]["path"] == "/etc/x"
        and body["changes"][0]["kind"] == "CHANGE_KIND_CREATED"
    )


def test_cli_errors_are_one_line(daemon: Daemon) -> None:
    proc = daemon.cli("validate", "--cwd", "/no/such/dir", "--", "true")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "airlock: error: cwd: uid 0 cannot enter /no/such/dir: it does not exist, is not a "
        "directory, or uid 0 may not search it or a directory above it [CWD_NOT_ACCESSIBLE]"
    ]


def test_cli_capabilities(daemon: Daemon) -> None:
    proc = daemon.cli("capabilities", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["overlayfs"] is True


def test_validation_result_fields(client: Client, workspace: Path) -> None:
    v = client.validate("echo hi; exit 7", cwd=str(workspace))
    assert v.termination is Termination.EXITED and v.exit_code == 7 and v.verdict is Verdict.ALLOW
    t = v.timings
    assert t.total_s >= t.sandbox_s >= t.command_s > 0 and t.sandbox_setup_s >= 0
    assert v.resource_usage.peak_memory_bytes > 0


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x03\xff\xfe\xfd\x12\x04/tmp", b"\xff\xff\xff\xff\xff", b"\x0a\x80"],
    ids=["invalid-utf8", "garbage", "truncated"],
)
def test_undecodable_request_is_invalid_argument(daemon: Daemon, payload: bytes) -> None:
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        call = channel.unary_unary(
            "/airlock.v1.SandboxService/Validate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request: not a valid airlock.v1.ValidateRequest")
    with daemon.client() as c:
        assert c.health()


def test_unknown_fields_are_ignored(daemon: Daemon) -> None:
    from airlock.v1 import sandbox_pb2 as pb

    raw = pb.ValidateRequest(command="echo hi", cwd="/tmp").SerializeToString()
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        call = channel.unary_unary(
            "/airlock.v1.SandboxService/Validate",
            request_serializer=lambda b: b,
            response_deserializer=pb.ValidateResponse.FromString,
        )
        reply = call(raw + b"\xa2\x06\x03abc", timeout=10)  # field 100, never defined
    assert reply.stdout == b"hi\n"
