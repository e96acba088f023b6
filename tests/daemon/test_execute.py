"""Execute end to end: a real daemon runs commands for real, isolated, and streams events."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airlock import Cancelled, FailedPrecondition, PermissionDenied
from airlock.api import convert
from airlock.client import Client
from airlock.types import (
    ExecEvent,
    ExecFinished,
    ExecOutput,
    ExecStarted,
    NetProtocol,
    ProcessInfo,
    Termination,
)
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc
from tests.helpers import NEUTRAL_POLICY, Daemon

from .test_daemon import wait_for_process

DAEMON_ARGS = NEUTRAL_POLICY
# The system's interpreter: Execute's /tmp is private, so a venv under /tmp (a CI clone) is not
# visible to the command.
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run(client: Client, command: str, cwd: Path, **kw: object) -> list[ExecEvent]:
    return list(client.execute(command, cwd=str(cwd), **kw))  # type: ignore[arg-type]


def output(events: list[ExecEvent], stream: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == stream)


def finished(events: list[ExecEvent]) -> ExecFinished:
    assert isinstance(events[-1], ExecFinished)
    return events[-1]


def test_events_arrive_in_order_and_complete(client: Client, workspace: Path) -> None:
    events = run(
        client,
        "for i in $(seq 1 3000); do echo out $i; echo err $i >&2; done; exit 7",
        workspace,
    )
    assert isinstance(events[0], ExecStarted) and events[0].authorization == "POLICY_ALLOWED"
    end = finished(events)
    assert (end.termination, end.exit_code) == (Termination.EXITED, 7)
    out, err = output(events, 1), output(events, 2)
    assert out == b"".join(b"out %d\n" % i for i in range(1, 3001))
    assert err == b"".join(b"err %d\n" % i for i in range(1, 3001))
    assert (end.stdout_bytes, end.stderr_bytes) == (len(out), len(err))
    # Output chunks are in the order they were read, with times that never go back.
    times = [e.time_s for e in events if isinstance(e, ExecOutput)]
    assert times == sorted(times)
    kinds = [type(e) for e in events]
    last_output = max(i for i, k in enumerate(kinds) if k is ExecOutput)
    assert all(k is ProcessInfo for k in kinds[last_output + 1 : -1])
    assert any(isinstance(e, ProcessInfo) and e.argv[:1] == (b"seq",) for e in events)
    assert end.resource_usage.cpu_time_s > 0 and end.wall_s > 0


def test_processes_come_in_batches_when_asked_and_one_by_one_otherwise(
    daemon: Daemon, client: Client, workspace: Path
) -> None:
    """ExecuteRequest.process_batches: the processes in ProcessBatch messages (one here), the
    same processes in the same order as the Process messages a request without it gets; the
    typed client asks for batches and yields the same events either way."""
    line = "for i in $(seq 1 20); do /bin/true; done"
    kinds: dict[bool, list[str]] = {}
    processes: dict[bool, list[tuple[bytes, ...]]] = {}
    with grpc.insecure_channel("unix:" + daemon.socket) as channel:
        stub = pb_grpc.SandboxServiceStub(channel)
        for batches in (False, True):
            request = pb.ExecuteRequest(command=line, cwd=str(workspace), process_batches=batches)
            messages = list(stub.Execute(request, timeout=60))
            kinds[batches] = [m.WhichOneof("event") for m in messages]
            processes[batches] = [
                tuple(e.argv)
                for m in messages
                for e in convert.exec_events_from_proto(m)
                if isinstance(e, ProcessInfo)
            ]
    assert len(processes[False]) == 22  # bash, seq and 20 of /bin/true
    assert kinds[False] == ["started"] + ["process"] * 22 + ["finished"]
    assert kinds[True] == ["started", "process_batch", "finished"]
    assert processes[True] == processes[False]
    assert processes[False].count((b"/bin/true",)) == 20
    typed = [e for e in run(client, line, workspace) if isinstance(e, ProcessInfo)]
    assert [e.argv for e in typed] == processes[False]


def test_output_streams_while_the_command_runs(client: Client, workspace: Path) -> None:
    marker = f"1.{time.time_ns() % 10**6:06d}"
    stream = client.execute(f"echo first; sleep {marker}; echo second", cwd=str(workspace))
    seen: list[bytes] = []
    for e in stream:
        if isinstance(e, ExecOutput):
            seen.append(e.data)
            if e.data == b"first\n":
                # The sleep is still running: the first line came before the command ended.
                # (Under load bash may not have exec'd the sleep yet: look for a while.)
                found = b""
                for _ in range(50):
                    found = subprocess.run(
                        ["pgrep", "-f", f"^sleep {marker}"], capture_output=True
                    ).stdout
                    if found:
                        break
                    time.sleep(0.02)
                assert found
    assert seen == [b"first\n", b"second\n"]


def test_only_the_workspace_is_writable(client: Client, workspace: Path, tmp_path: Path) -> None:
    # tmp_path is under /tmp, which Execute replaces with a private, empty tmpfs: a write
    # there succeeds in the sandbox and never reaches the host.
    outside = tmp_path / "outside.txt"
    events = run(
        client,
        f"echo kept > result.txt; echo private > {outside} && cat {outside};"
        " touch /etc/airlock-nope || echo refused-etc;"
        " touch /usr/local/airlock-nope || echo refused-usr;"
        " ls ..; echo scratch > /tmp/scratch && cat /tmp/scratch",
        workspace,
    )
    out, err = output(events, 1), output(events, 2)
    assert (workspace / "result.txt").read_text() == "kept\n"  # for real, on the host
    assert out.startswith(b"private\nrefused-etc\nrefused-usr\n"), (out, err)
    assert err.count(b"Read-only file system") == 2
    assert b"outside.txt" in out  # `ls ..` sees only the private tmp's view ...
    assert not outside.exists() and not Path("/etc/airlock-nope").exists()  # ... not the host
    assert out.endswith(b"scratch\n") and not Path("/tmp/scratch").exists()


def test_runs_without_privileges_under_seccomp(client: Client, public_tmp: Path) -> None:
    # uid 65534 must be able to enter its cwd on the host (pytest's tmp root is 0700 root's).
    events = run(
        client,
        "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status;"
        " unshare -U true 2>/dev/null || echo unshare-refused",
        public_tmp,
        uid=65534,
    )
    lines = output(events, 1).decode().split("\n")
    assert lines[0] == "65534"
    status = dict(line.split(":\t") for line in lines[1:4])
    assert status == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    assert "unshare-refused" in lines


def test_no_network_but_what_is_granted(client: Client, workspace: Path) -> None:
    """The neutral policy grants nothing: the sandbox's own loopback refuses, every other
    destination is the recorder's, which records the attempt and resets it at once; the
    host's loopback is another namespace (tests/daemon/test_execute_egress.py: grants)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        code = (
            "import socket\n"
            f"for host in ('127.0.0.1', '203.0.113.7'):\n"
            "    try:\n"
            f"        s = socket.create_connection((host, {port}), timeout=2)\n"
            "        s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
            "        print('got', s.recv(9))\n"
            "    except OSError as e:\n"
            "        print('failed', e.errno)\n"
        )
        events = run(client, f"{PY} -c {shlex.quote(code)}", workspace)
        out = output(events, 1).decode().split("\n")
        assert out[:2] == ["failed 111", "failed 104"], output(events, 2)  # refused, reset
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    local, attempt = [a for a in finished(events).network_attempts if a.protocol is NetProtocol.TCP]
    # The refused loopback connection is recorded as an attempt to reach a host service.
    assert (local.address, local.port, local.refusal) == ("127.0.0.1", port, "host-service")
    assert (attempt.address, attempt.port, attempt.forwarded) == ("203.0.113.7", port, False)
    assert (attempt.refusal, attempt.http_method) == ("no-grant", "GET")


def test_timeout_and_memory_limit(client: Client, workspace: Path) -> None:
    end = finished(run(client, "sleep 30 & sleep 30", workspace, timeout=1))
    assert end.termination is Termination.TIMED_OUT
    hog = f"{PY} -c 'x = bytearray(600 * 1024 * 1024); print(len(x))'"
    end = finished(run(client, hog, workspace))
    assert end.termination is Termination.OUT_OF_MEMORY and end.resource_usage.memory_limit_hit


def test_cancel_kills_the_whole_tree(client: Client, workspace: Path) -> None:
    marker = f"{time.time_ns() % 10**6}.25"
    stream = client.execute(
        f"setsid sleep {marker} & nohup sleep {marker} & echo started; wait", cwd=str(workspace)
    )
    got: list[ExecEvent] = []
    error: list[BaseException] = []

    def consume() -> None:
        try:
            for e in stream:
                got.append(e)
        except Cancelled as exc:
            error.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    wait_for_process(f"^sleep {marker}")
    stream.cancel()
    t.join(timeout=30)
    assert error and isinstance(error[0], Cancelled)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", f"^sleep {marker}"], capture_output=True).stdout:
        assert time.monotonic() < deadline, "the command's processes outlived the cancel"
        time.sleep(0.05)
    assert client.validate("echo alive", cwd=str(workspace)).stdout == b"alive\n"


# --- The static pass decides first (the default policy) ---------------------------------------


@pytest.fixture(scope="module")
def policy_daemon() -> Iterator[Client]:
    from tests.helpers import TEST_LIMITS, public_dir, running_daemon

    # Root asks and approves here: allow-self-approval (test_approvals.py has the rule).
    args = (*TEST_LIMITS, "--allow-self-approval")
    with public_dir() as base, running_daemon(base, *args) as d, d.client() as c:
        yield c


def test_a_denied_command_is_refused_before_anything_runs(
    policy_daemon: Client, workspace: Path
) -> None:
    with pytest.raises(PermissionDenied) as info:
        run(policy_daemon, "rm -rf / --no-preserve-root", workspace)
    assert info.value.reason == "POLICY_DENIED" and "fs." in info.value.message


def test_an_asked_command_needs_an_approval_bound_to_it(
    policy_daemon: Client, workspace: Path
) -> None:
    command = "sudo -n true || echo ran-after-approval"
    with pytest.raises(FailedPrecondition) as info:
        run(policy_daemon, command, workspace)
    assert info.value.reason == "APPROVAL_REQUIRED" and "Policy asks" in info.value.message
    v = policy_daemon.validate(command, cwd=str(workspace))
    grant = policy_daemon.approve(v.validation_id)
    # The token is bound to the command: another one is refused.
    with pytest.raises(PermissionDenied) as wrong:
        run(policy_daemon, "sudo -n id", workspace, approval_token=grant.approval_token)
    assert wrong.value.reason == "APPROVAL_MISMATCH"
    events = run(policy_daemon, command, workspace, approval_token=grant.approval_token)
    assert isinstance(events[0], ExecStarted) and events[0].authorization == "USER_VERIFIED"
    assert b"ran-after-approval" in output(events, 1)
    with pytest.raises(FailedPrecondition) as again:  # ONCE means once
        run(policy_daemon, command, workspace, approval_token=grant.approval_token)
    assert again.value.reason == "APPROVAL_USED"


def test_a_session_approval_covers_the_same_command_in_the_session(
    policy_daemon: Client, workspace: Path
) -> None:
    command = "sudo -n true || echo session-ok"
    session = f"agent-{os.getpid()}-{time.time_ns()}"
    v = policy_daemon.validate(command, cwd=str(workspace), session_id=session)
    policy_daemon.approve(v.validation_id, session=True)
    for _ in range(2):
        events = run(policy_daemon, command, workspace, session_id=session)
        assert isinstance(events[0], ExecStarted)
        assert events[0].authorization == "SESSION_GRANTED"
    with pytest.raises(FailedPrecondition):  # another session is not covered
        run(policy_daemon, command, workspace, session_id=session + "-other")


def test_cli_run_streams_and_exits_with_the_commands_status(
    daemon: object, workspace: Path
) -> None:
    from tests.helpers import AIRLOCK

    env = {**os.environ, "AIRLOCK_SOCKET": daemon.socket}  # type: ignore[attr-defined]
    done = subprocess.run(
        [AIRLOCK, "run", "--cwd", str(workspace), "--", "echo out; echo err >&2; exit 5"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (5, b"out\n", b"err\n")
    killed = subprocess.run(
        [AIRLOCK, "run", "--cwd", str(workspace), "--", "kill -9 $$"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert killed.returncode == 137 and b"killed by signal 9" in killed.stderr


def test_cli_run_exit_codes_for_deny_and_ask(policy_daemon: Client, workspace: Path) -> None:
    from tests.helpers import AIRLOCK

    env = {**os.environ, "AIRLOCK_SOCKET": policy_daemon.socket_path}
    denied = subprocess.run(
        [AIRLOCK, "run", "--cwd", str(workspace), "--", "rm -rf /"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert denied.returncode == 126 and b"fs.rm-root" in denied.stderr
    asked = subprocess.run(
        [AIRLOCK, "run", "--cwd", str(workspace), "--", "sudo -n true"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert asked.returncode == 125 and b"airlock approve" in asked.stderr
    # The static pass asks, and the dry run it then shows is denied: no approval can let it run,
    # so none is suggested (it was 125 with `airlock approve`, which then failed).
    both = subprocess.run(
        [AIRLOCK, "run", "--cwd", str(workspace), "--", "ln -sf ~/.bashrc rc; echo y >> rc"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert both.returncode == 126, both.stderr
    assert b"cannot be approved" in both.stderr and b"airlock approve" not in both.stderr


def test_a_workspace_in_use_gets_warm_sandboxes(client: Client, workspace: Path) -> None:
    deadline = time.monotonic() + 30
    while not finished(run(client, "true", workspace)).warm:
        assert time.monotonic() < deadline, "no warm sandbox was ever ready for the workspace"
        time.sleep(0.05)
    # A warm sandbox is single-use and isolated like a cold one.
    events = run(client, "echo x > made.txt; touch /etc/nope 2>&1 || true", workspace)
    assert (workspace / "made.txt").read_text() == "x\n"
    assert b"Read-only file system" in output(events, 1)


def test_a_workspace_replaced_between_executes_is_the_new_directory(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    """The same path, another directory (the engine remembers Execute's template per
    workspace path *and* identity): the second run writes into the new one, and the old one,
    moved aside, is left as it was."""
    assert finished(run(client, "echo 1 > a.txt", workspace)).exit_code == 0
    assert finished(run(client, "echo 2 > b.txt", workspace)).exit_code == 0  # same template
    old = tmp_path / "old-ws"
    workspace.rename(old)
    workspace.mkdir()
    end = finished(run(client, "echo 3 > c.txt; ls", workspace))
    assert end.exit_code == 0
    assert sorted(p.name for p in workspace.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in old.iterdir()) == ["a.txt", "b.txt"]
