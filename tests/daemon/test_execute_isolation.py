"""The sandboxes' file systems on the real kernel: no host Unix socket answers in them.

A read-only bind does not stop connect(2): a host socket seen through one still answers, so
Execute once reached every listener under /run, airlockd's own socket included (and with it
Validate, Approve and Apply as the caller). Both sandboxes now show the host's directories
only through overlays, whose inodes are not the ones the host's sockets are bound to
(ECONNREFUSED), and never bind a socket the host mounts on its own; only the workspace's own
tree is bound, and a workspace holding the daemon's socket or state is refused. The plans are
pinned in tests/unit/sandbox/test_plan.py; this module checks what the kernel makes of them.

Sockets live under /run here, not /tmp: Execute's /tmp is private, so a socket under /tmp
would be out of reach for the wrong reason. Host layouts this machine does not have (a socket
bind-mounted like a CI job's docker.sock, a file system left out with data mounts on it like
an autofs map, a mount below the workspace, a procfs moved on top of a tmpfs, a mount point
that is not UTF-8) are made in a private mount namespace that a daemon of their own runs in:
the host's mount table never sees them, and they go with that daemon.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airlock import InvalidRequest
from airlock.client import Client
from airlock.sandbox import _syscalls as sc
from airlock.sandbox import mnt
from airlock.sandbox.plan import Bind
from airlock.types import ExecEvent, ExecFinished, ExecOutput
from tests.helpers import AIRLOCKD, SANDBOX_ARGS, Daemon, running_daemon
from tests.helpers.fork import in_mount_namespace

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def connect_script(path: str) -> str:
    """A command that tries to connect to the Unix socket at ``path`` and says what happened."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r}); print('connected')\n"
        "except OSError as e:\n"
        "    print('failed', e.errno)\n"
    )
    return f"{PY} -c {shlex.quote(code)}"


def execute(client: Client, command: str, cwd: str | Path) -> tuple[bytes, bytes, int]:
    events: list[ExecEvent] = list(client.execute(command, cwd=str(cwd)))
    end = events[-1]
    assert isinstance(end, ExecFinished), events

    def out(stream: int) -> bytes:
        return b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == stream)

    return out(1), out(2), end.exit_code


def dry_run(client: Client, command: str, cwd: str | Path) -> tuple[bytes, bytes, int]:
    v = client.validate(command, cwd=str(cwd))
    return v.stdout, v.stderr, v.exit_code


RUNS: dict[str, Callable[[Client, str, str | Path], tuple[bytes, bytes, int]]] = {
    "execute": execute,
    "dry-run": dry_run,
}


def run_dir(prefix: str) -> Path:
    """A fresh directory under /run (Execute's /tmp is private), others may traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/run"))
    os.chmod(path, 0o755)
    return path


class Listener:
    """A Unix socket listening on the host that anyone may connect to (mode 0777)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def connections(self) -> int:
        """How many connections wait to be accepted (each is accepted and closed)."""
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    base = run_dir("airlock-test-listen-")
    lst = Listener(base / "listener.sock")
    try:
        assert lst.connections() == 0
        probe = socket.socket(socket.AF_UNIX)  # the listener works, from the host
        probe.connect(str(lst.path))
        probe.close()
        assert lst.connections() == 1
        yield lst
    finally:
        lst.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def run_daemon() -> Iterator[Daemon]:
    """A daemon whose socket and state directory are under /run, where Execute sees them."""
    base = run_dir("airlock-test-")
    try:
        with running_daemon(base, *SANDBOX_ARGS) as d:
            yield d
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def run_client(run_daemon: Daemon) -> Iterator[Client]:
    with run_daemon.client() as c:
        yield c


# --- Host sockets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_host_unix_socket_refuses_the_sandbox(
    run_client: Client, listener: Listener, workspace: Path, kind: str
) -> None:
    listener.connections()  # none of another test's
    check = f"test -S {listener.path} && echo visible; " + connect_script(str(listener.path))
    out, err, code = RUNS[kind](run_client, check, workspace)
    assert (out, code) == (b"visible\nfailed 111\n", 0), err  # ECONNREFUSED
    assert listener.connections() == 0, f"the host's listener was reached from a {kind}"


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_daemons_own_socket_refuses_the_sandbox(
    run_daemon: Daemon, run_client: Client, workspace: Path, kind: str
) -> None:
    check = f"test -S {run_daemon.socket} && echo visible; " + connect_script(run_daemon.socket)
    out, err, code = RUNS[kind](run_client, check, workspace)
    assert (out, code) == (b"visible\nfailed 111\n", 0), err


def test_a_cwd_holding_the_daemons_socket_or_state_is_refused(
    run_daemon: Daemon, run_client: Client, public_tmp: Path
) -> None:
    base = Path(run_daemon.socket).parent
    alias = public_tmp / "alias"
    alias.symlink_to(base)
    state = Path(run_daemon.state_dir)
    for cwd in (base, alias, state, state / "scratch"):
        with pytest.raises(InvalidRequest) as info:
            execute(run_client, "touch airlock-should-not-exist", cwd)
        assert info.value.reason == "INVALID_CWD", info.value
        assert "daemon's socket" in info.value.message
        assert str(run_daemon.socket) in info.value.message or str(state) in info.value.message
    assert not (base / "airlock-should-not-exist").exists()
    # A dry run there is fine: nothing of the host is bound into it, the socket refuses.
    out, err, _ = dry_run(run_client, connect_script(run_daemon.socket), base)
    assert out == b"failed 111\n", err
    # And a workspace that holds neither runs as before.
    out, _, code = execute(run_client, "echo ran", public_tmp)
    assert (out, code) == (b"ran\n", 0)


# --- The supervisor's own check -------------------------------------------------------------------


def test_the_supervisor_refuses_to_bind_a_workspace_holding_a_protected_path(
    public_tmp: Path,
) -> None:
    """The request check can be outrun (a path swapped for a symlink between the check and a
    warm sandbox's bind): the supervisor checks the directory it binds, by descriptor."""
    ws = public_tmp / "ws"
    (ws / "run" / "airlock").mkdir(parents=True)
    sock = ws / "run" / "airlock" / "airlock.sock"
    sock.touch()
    (public_tmp / "link").symlink_to(ws / "run")
    target = public_tmp / "target"
    target.mkdir()
    elsewhere = public_tmp / "elsewhere"
    elsewhere.mkdir()
    protected = (str(sock), str(public_tmp / "state"))

    def bind(source: Path) -> object:
        mnt.execute_step(Bind(str(source), str(target), readonly=False), protected)
        return sorted(os.listdir(target))

    for source in (ws, ws / "run", public_tmp / "link", ws / "run" / "airlock"):
        result = in_mount_namespace(functools.partial(bind, source))
        assert isinstance(result, OSError) and result.errno == errno.EPERM, (source, result)
        assert f"it contains {sock}" in str(result)

    def aliased() -> object:  # another bind mount of the protected directory
        sc.mount(str(ws / "run"), str(elsewhere), None, sc.MS_BIND)
        return bind(elsewhere)

    result = in_mount_namespace(aliased)
    assert isinstance(result, OSError) and result.errno == errno.EPERM, result
    (public_tmp / "state" / "inner").mkdir(parents=True)
    result = in_mount_namespace(lambda: bind(public_tmp / "state" / "inner"))
    assert isinstance(result, OSError) and "is inside" in str(result), result
    (ws / "src").mkdir()
    (ws / "src" / "file").touch()
    assert in_mount_namespace(lambda: bind(ws / "src")) == ["file"]
    assert not os.listdir(target), "the test bound something in the host's namespace"


# --- Host layouts, in a daemon's own mount namespace ----------------------------------------------

_LAUNCH = """\
import os, sys
from airlock.sandbox import _syscalls as sc
base = sys.argv[1]
sc.unshare(sc.CLONE_NEWNS)
sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
mount = sc.mount
exec(sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


@contextlib.contextmanager
def daemon_in_namespace(base: Path, setup: str) -> Iterator[Daemon]:
    """airlockd in a private mount namespace, after ``setup`` (Python with ``base``, ``sc``
    and ``mount``) made its mounts there."""
    sock, state = str(base / "airlock.sock"), str(base / "state")
    log_path = base / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(base), setup, AIRLOCKD, "--config", os.devnull,
             "--socket", sock, "--state-dir", state, *SANDBOX_ARGS],
            stdout=log,
            stderr=log,
        )  # fmt: skip
    daemon = Daemon(sock, state, proc, log_path)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"airlockd did not come up:\n{daemon.log()}")
            time.sleep(0.05)
        with Client(sock, timeout=2) as c:
            while True:
                with contextlib.suppress(Exception):
                    if c.health():
                        break
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.05)
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, f"airlockd exited with {code}:\n{daemon.log()}"


@pytest.fixture
def host_base() -> Iterator[Path]:
    base = run_dir("airlock-test-ns-")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_bind_mounted_host_socket_is_not_in_any_sandbox(
    host_base: Path, listener: Listener, workspace: Path
) -> None:
    """Like /var/run/docker.sock in a CI job: a socket bind-mounted onto a file."""
    listener.connections()  # none of another test's
    target = host_base / "docker.sock"
    target.touch()
    setup = f"mount({str(listener.path)!r}, {str(target)!r}, None, sc.MS_BIND)"
    with daemon_in_namespace(host_base, setup) as d, d.client() as c:
        for kind, run in RUNS.items():
            check = f"test -e {target} && echo there; {connect_script(str(target))}"
            out, err, code = run(c, check, workspace)
            # What the sandbox sees there is the file beneath (EROFS on Execute's read-only
            # overlay, where connect(2) wants write access to a file; ECONNREFUSED in a dry run).
            assert out.startswith(b"there\nfailed ") and code == 0, (kind, out, err)
    assert listener.connections() == 0


def test_data_mounts_on_a_left_out_file_system_get_a_stand_in(
    host_base: Path, workspace: Path
) -> None:
    """Like NFS homes under an autofs map (bpffs plays the left-out file system here)."""
    auto = host_base / "auto"
    auto.mkdir()
    setup = (
        f"mount('bpf', {str(auto)!r}, 'bpf')\n"
        f"os.mkdir({str(auto / 'alice')!r})\n"
        f"mount('tmpfs', {str(auto / 'alice')!r}, 'tmpfs', 0, 'mode=755')\n"
        f"open({str(auto / 'alice' / 'f')!r}, 'w').write('in the home\\n')\n"
    )
    check = f"cat {auto}/alice/f; ls -A {auto}; touch {auto}/new 2>/dev/null || echo read-only"
    with daemon_in_namespace(host_base, setup) as d, d.client() as c:
        for kind, run in RUNS.items():
            out, err, code = run(c, check, workspace)
            assert (out, code) == (b"in the home\nalice\nread-only\n", 0), (kind, err)


def test_execute_shows_and_writes_the_mounts_below_its_workspace(host_base: Path) -> None:
    ws = host_base / "ws"
    (ws / "sub").mkdir(parents=True)
    setup = (
        f"mount('tmpfs', {str(ws / 'sub')!r}, 'tmpfs', 0, 'mode=755')\n"
        f"open({str(ws / 'sub' / 'marker')!r}, 'w').write('below\\n')\n"
    )
    with daemon_in_namespace(host_base, setup) as d, d.client() as c:
        out, err, code = dry_run(c, "cat sub/marker; echo x > sub/dry", ws)
        assert (out, code) == (b"below\n", 0), err
        out, err, code = execute(c, "cat sub/marker; echo real > sub/new; touch /etc/no", ws)
        assert out == b"below\n" and b"Read-only file system" in err, err
        out, err, code = execute(c, "cat sub/new; ls sub", ws)  # for real, in the sub-mount
        assert (out, code) == (b"real\nmarker\nnew\n", 0), err
    assert not (ws / "sub" / "new").exists()  # it was the namespace's tmpfs, not the host's dir


def test_a_procfs_moved_on_top_is_left_out(host_base: Path, workspace: Path) -> None:
    """After ``mount --move`` onto a busy mount point the top mount is listed first."""
    jail, spare = host_base / "jail" / "proc", host_base / "spare"
    jail.mkdir(parents=True)
    spare.mkdir()
    setup = (  # the procfs first, so that its line comes before the tmpfs's
        f"mount('proc', {str(spare)!r}, 'proc')\n"
        f"mount('tmpfs', {str(jail)!r}, 'tmpfs')\n"
        f"open({str(jail / 'tmpfs-file')!r}, 'w').close()\n"
        f"mount({str(spare)!r}, {str(jail)!r}, None, 8192)\n"  # MS_MOVE
    )
    with daemon_in_namespace(host_base, setup) as d, d.client() as c:
        for kind, run in RUNS.items():
            out, err, code = run(c, f"ls -A {jail}; echo end", workspace)
            assert (out, code) == (b"end\n", 0), (kind, err)  # neither the procfs nor the tmpfs


def test_a_mount_point_that_is_not_utf8(host_base: Path, workspace: Path) -> None:
    raw = os.fsencode(str(host_base)) + b"/M\xfcll"
    os.mkdir(raw)
    setup = (
        f"mount('tmpfs', {raw!r}, 'tmpfs')\nopen({raw + b'/f'!r}, 'w').write('latin-1 label\\n')\n"
    )
    with daemon_in_namespace(host_base, setup) as d, d.client() as c:
        for kind, run in RUNS.items():
            out, err, code = run(c, f"cat {host_base}/M*ll/f", workspace)
            assert (out, code) == (b"latin-1 label\n", 0), (kind, err)
