"""Connections to a host Unix socket (docker.sock and the like), end to end: a real daemon.

Through the sandbox's overlay a host socket refuses every connect, so a dry run of
``docker stop web`` left no trace. In a dry run a listener of the recorder is now bound over
each well-known host socket (``plan.HOST_SOCKETS``) that exists: the connect is recorded with
the socket's path and the first bytes sent (refusal ``host-service``), the shipped
``effect.network`` asks, the summary names the path, and the host's service sees nothing.
Execute is unchanged: the path is not bound there and the connect is refused.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.api import convert
from airlock.client import Client
from airlock.egress import HOST_SERVICE
from airlock.sandbox.plan import HOST_SOCKETS
from airlock.types import ExecFinished, ExecOutput, FindingSource, NetProtocol, Verdict
from tests.helpers import NEUTRAL_POLICY, TEST_LIMITS, public_dir, running_daemon

PY = sys.executable
EXEC_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SOCK = "/run/podman/podman.sock"
assert SOCK in HOST_SOCKETS
REQUEST = b"POST /v4.0.0/libpod/containers/web/stop HTTP/1.1\r\nHost: d\r\n\r\n"
CLIENT = (
    "import socket\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n"
    f"    s.connect({SOCK!r})\n"
    f"    s.sendall({REQUEST!r})\n"
    "    print('got', s.recv(10))\n"
    "except OSError as e:\n"
    "    print('error', e.errno)\n"
)


@pytest.fixture(scope="module", params=["socket", "bind-mounted"])
def host_socket(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[bytes]]:
    """A real listener at SOCK on the host (only if nothing is there), recording what reaches
    it: the socket itself, or (as a CI job's bind-mounted docker.sock) a socket elsewhere bound
    over an empty file there. Everything made for it is removed afterwards."""
    directory = os.path.dirname(SOCK)
    if os.path.lexists(SOCK):
        pytest.skip(f"{SOCK} exists on this host")
    mounted = request.param == "bind-mounted"
    made = not os.path.exists(directory)
    if made:
        os.mkdir(directory, 0o755)
    srv = socket.socket(socket.AF_UNIX)
    got: list[bytes] = []
    stop = threading.Event()
    bound = False
    try:
        if mounted:
            real = str(tmp_path_factory.mktemp("sock") / "podman.sock")
            Path(SOCK).touch()
            srv.bind(real)
            os.chmod(real, 0o666)
            subprocess.run(["mount", "--bind", real, SOCK], check=True)
            bound = True
        else:
            srv.bind(SOCK)
            os.chmod(SOCK, 0o666)
        srv.listen(8)
        srv.settimeout(0.2)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with conn:
                    conn.settimeout(1)
                    with contextlib.suppress(OSError):
                        got.append(conn.recv(100) or b"<connected>")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            yield got
        finally:
            stop.set()
            t.join()
    finally:
        srv.close()
        if bound:
            subprocess.run(["umount", SOCK], check=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCK)
        if made:
            os.rmdir(directory)


def probe(got: list[bytes]) -> None:
    """The host's listener works: a connection from the host reaches it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(SOCK)
        s.sendall(b"probe")
    for _ in range(50):
        if got:
            break
        threading.Event().wait(0.05)


@pytest.fixture(scope="module")
def dry(host_socket: list[bytes]) -> Iterator[Client]:
    with public_dir() as base, running_daemon(base, *TEST_LIMITS) as d, d.client() as c:
        yield c


@pytest.fixture(scope="module")
def neutral(host_socket: list[bytes]) -> Iterator[Client]:
    with (
        public_dir() as base,
        running_daemon(base, *TEST_LIMITS, *NEUTRAL_POLICY) as d,
        d.client() as c,
    ):
        yield c


def test_a_connect_to_a_host_socket_is_recorded_with_its_path_and_asks(
    dry: Client, host_socket: list[bytes], workspace: Path
) -> None:
    (workspace / "job.py").write_text(CLIENT)
    v = dry.validate(f"{PY} job.py", cwd=str(workspace))
    probe(host_socket)
    assert host_socket == [b"probe"]  # the dry run's request never reached the host
    host_socket.clear()
    assert v.exit_code == 0, v.stderr
    assert v.stdout in (b"got b''\n", b"error 104\n"), v.stdout  # closed: no answer
    assert [
        (a.protocol, a.address, a.port, a.refusal, a.http_method, a.http_path)
        for a in v.network_attempts
    ] == [
        (
            NetProtocol.UNIX,
            SOCK,
            0,
            HOST_SERVICE,
            "POST",
            "/v4.0.0/libpod/containers/web/stop",
        )
    ]
    assert v.network_attempts[0].payload_prefix == REQUEST
    assert v.verdict is Verdict.ASK
    dynamic = {f.rule_id: f.verdict for f in v.findings if f.source is FindingSource.DYNAMIC}
    assert dynamic["effect.network"] is Verdict.ASK
    assert f"Tried to reach a service on this machine: {SOCK} " in v.summary
    back = convert.validation_from_proto(convert.validation_to_proto(v))
    assert back.network_attempts == v.network_attempts


def test_a_dry_run_that_does_not_touch_it_records_nothing(
    dry: Client, host_socket: list[bytes], workspace: Path
) -> None:
    code = f"import os, stat\nprint(stat.S_ISSOCK(os.stat({SOCK!r}).st_mode))\n"
    (workspace / "job.py").write_text(code)
    v = dry.validate(f"{PY} job.py", cwd=str(workspace))
    assert v.stdout == b"True\n", v.stderr  # the sandbox shows a socket there
    assert v.network_attempts == ()
    assert v.verdict is Verdict.ALLOW, v.findings
    assert host_socket == []


def test_execute_is_unchanged_the_connect_is_refused(
    neutral: Client, host_socket: list[bytes], workspace: Path
) -> None:
    (workspace / "job.py").write_text(CLIENT)
    events = list(neutral.execute(f"{EXEC_PY} job.py", cwd=str(workspace)))
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    end = events[-1]
    assert isinstance(end, ExecFinished) and end.exit_code == 0, events
    # Refused: ECONNREFUSED through the overlay; EROFS at the read-only file beneath a mount.
    assert out in (b"error 111\n", b"error 30\n")
    assert end.network_attempts == ()
    probe(host_socket)
    assert host_socket == [b"probe"]
    host_socket.clear()
