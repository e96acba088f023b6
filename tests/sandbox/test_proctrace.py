"""Process tree capture (airlock.sandbox.proctrace) on the real kernel.

Each test runs a small harness shaped like the sandbox: a forked supervisor
opens the connector, unshares a pid namespace and forks pid 1; pid 1 mounts a
fresh /proc in its own mount namespace and forks the command process, which
waits until the supervisor's tracer is subscribed, becomes uid 65534, installs
the filter and execs ``bash -c SCRIPT``. The supervisor polls the tracer and
pid 1's status pipe, like ``contain.run``, and sends the records back pickled.
Every run also checks that nothing leaked: no process left in the sandbox's
pid namespace, no descriptor left open in the supervisor or in pytest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import mnt, proctrace, user
from airlock.sandbox.proctrace import ProcessRecord
from tests.helpers.fork import in_child

# Root (as all of tests/sandbox): pid and mount namespaces, seccomp listener, netlink proc
# connector.

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534
# A harness guard against a wedged run, never an assertion on timing.
SAFETY_S = 60.0
EXECVE_NR = {"x86_64": 59, "aarch64": 221}.get(platform.machine(), -1)

Records = tuple[ProcessRecord, ...]


@dataclass(frozen=True)
class Options:
    cwd: str
    uid: int = NOBODY
    connector: bool = True
    # False: pid 1 reports the command's status and then waits to be killed.
    init_exits: bool = True
    # Checked after each batch of events; True makes the supervisor kill pid 1.
    kill_when: Callable[[Records], bool] | None = None
    timeout: bool = False  # call note_timeout() before that kill
    # Called with the sandbox's pid namespace before each handle().
    before_handle: Callable[[str], None] | None = None
    max_processes: int = proctrace.MAX_PROCESSES


@dataclass(frozen=True)
class Trace:
    records: Records
    status: int | None
    dropped: int
    events_lost: bool
    notifications: int
    fds_leaked: list[str] = field(default_factory=list)
    pid_ns: str = ""
    safety_kill: bool = False
    killed: bool = False
    setup_error: str = ""

    def one(self, *argv: bytes) -> ProcessRecord:
        found = [r for r in self.records if r.argv == argv]
        assert len(found) == 1, f"{argv}: {found}"
        return found[0]

    @property
    def root(self) -> ProcessRecord:
        roots = [r for r in self.records if r.pid == 2]
        assert len(roots) == 1, self.records
        return roots[0]


def _fds() -> dict[str, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[name] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _in_namespace(pid_ns: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") == pid_ns:
                    found.append(int(name))
    return found


def _command(script: str, opts: Options, go_r: int, cmd_fd: int, error_w: int) -> None:
    try:
        if os.read(go_r, 1) != b"g":
            os._exit(126)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        user.become(opts.uid, opts.uid, ())
        os.chdir(opts.cwd)
        proctrace.install(cmd_fd)
        os.execve("/bin/bash", ["bash", "-c", script], {"PATH": PATH, "LC_ALL": "C"})
    except BaseException as exc:
        os.write(error_w, f"{type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(127)


def _init(script: str, opts: Options, go_r: int, status_w: int, cmd_fd: int, error_w: int) -> None:
    try:
        sc.set_parent_death_signal(signal.SIGKILL)
        sc.unshare(sc.CLONE_NEWNS)  # this /proc shows the sandbox's pids; gone with us
        mnt.make_private()
        sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        child = os.fork()
        if child == 0:
            _command(script, opts, go_r, cmd_fd, error_w)
        for fd in (cmd_fd, go_r, error_w):
            os.close(fd)
        while True:
            pid, status = os.wait()
            if pid == child:
                break
        os.write(status_w, struct.pack("=i", status))
        while not opts.init_exits:
            signal.pause()  # until the supervisor kills us
    finally:
        os._exit(0)


def _supervise(script: str, opts: Options) -> Trace:
    sc.set_parent_death_signal(signal.SIGKILL)
    before = _fds()
    conn = proctrace.open_connector() if opts.connector else None
    sup, cmd = proctrace.channel()
    sc.unshare(sc.CLONE_NEWPID)
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    error_r, error_w = os.pipe()  # the command's set-up error; EOF once it has exec'd
    init = os.fork()
    if init == 0:
        sup.close()
        for fd in (go_w, status_r, error_r):
            os.close(fd)
        _init(script, opts, go_r, status_w, cmd.detach(), error_w)
    cmd.close()
    for fd in (go_r, status_w, error_w):
        os.close(fd)
    pid_ns = os.readlink(f"/proc/{init}/ns/pid")
    tracer = proctrace.ProcessTracer(conn, sup, init, max_processes=opts.max_processes)
    os.write(go_w, b"g")
    os.close(go_w)
    poller = select.poll()
    poller.register(status_r, select.POLLIN)
    poller.register(tracer.fileno(), select.POLLIN)
    report = b""
    killed = safety = False
    deadline = time.monotonic() + SAFETY_S
    open_status = True
    while open_status:
        if time.monotonic() > deadline and not killed:
            safety = killed = True
            os.kill(init, signal.SIGKILL)
        for fd, _ev in poller.poll(1000):
            if fd == tracer.fileno():
                if opts.before_handle is not None:
                    opts.before_handle(pid_ns)
                tracer.handle()
            else:
                chunk = os.read(status_r, 64)
                report += chunk
                if not chunk:
                    poller.unregister(status_r)
                    open_status = False
        if not killed and opts.kill_when is not None and opts.kill_when(tracer.records()):
            if opts.timeout:
                tracer.note_timeout()
            os.kill(init, signal.SIGKILL)
            killed = True
    os.waitpid(init, 0)
    tracer.finish()
    records = tracer.records()
    tracer.close()
    os.close(status_r)
    setup_error = os.read(error_r, 4096).decode(errors="replace")  # every writer is gone
    os.close(error_r)
    after = _fds()
    leaked = [f"{fd} -> {target}" for fd, target in after.items() if before.get(fd) != target]
    return Trace(
        records=records,
        status=struct.unpack("=i", report[:4])[0] if len(report) >= 4 else None,
        dropped=tracer.dropped,
        events_lost=tracer.events_lost,
        notifications=tracer.notifications,
        fds_leaked=leaked,
        pid_ns=pid_ns,
        safety_kill=safety,
        killed=killed,
        setup_error=setup_error,
    )


def run_traced(script: str, opts: Options) -> Trace:
    """Run ``script`` in the harness; check that nothing leaked."""
    before = _fds()

    def supervise() -> object:
        try:
            return _supervise(script, opts)
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"

    trace = in_child(supervise)
    assert isinstance(trace, Trace), trace
    assert not trace.setup_error, trace.setup_error
    assert not trace.safety_kill, "the harness had to kill a wedged sandbox"
    assert not trace.fds_leaked, trace.fds_leaked
    assert _in_namespace(trace.pid_ns) == [], "processes outlived the sandbox"
    assert _fds() == before
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    return trace


@pytest.fixture
def cwd(public_tmp: Path) -> Iterator[str]:
    """A working directory uid 65534 can enter and write."""
    work = public_tmp / "work dir"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    yield str(work)


def _live(trace: Trace) -> None:
    for r in trace.records:
        assert r.started_s is not None and r.ended_s is not None, r
        assert r.started_s <= r.ended_s, r
        assert (r.exit_code is None) != (r.signal is None), r


# --- What a process tree looks like ---------------------------------------------------------


def test_short_lived_processes_all_appear(cwd: str) -> None:
    script = "for i in $(seq 50); do /bin/true; done"
    t = run_traced(script, Options(cwd=cwd))
    _live(t)
    root = t.root
    assert root.ppid == 1
    assert root.argv == (b"bash", b"-c", script.encode())
    assert root.executables == (b"/bin/bash",)
    assert root.exit_code == 0 and os.waitstatus_to_exitcode(t.status or 0) == 0
    trues = [r for r in t.records if r.argv == (b"/bin/true",)]
    assert len(trues) == 50
    assert len({r.pid for r in trues}) == 50
    for r in trues:
        assert r.ppid == root.pid and r.host_ppid == root.host_pid
        assert r.exit_code == 0 and r.signal is None
        assert r.uid == NOBODY and r.cwd == os.fsencode(cwd)
        assert r.executables == (b"/bin/true",) and r.exec_count == 1
        assert not r.outlived_command and not r.killed_by_timeout
    # The loop runs them one after another: the kernel's timestamps say so too.
    for a, b in itertools.pairwise(trues):
        assert a.ended_s is not None and b.started_s is not None
        assert a.ended_s <= b.started_s
    seq = t.one(b"seq", b"50")
    assert seq.ppid == root.pid and seq.executables[-1].endswith(b"/seq")
    assert len(t.records) == 52 and t.dropped == 0 and not t.events_lost


def test_pipeline_and_subshells(cwd: str) -> None:
    script = "printf 'b\\na\\n' | sort | wc -l; (exit 7)"
    t = run_traced(script, Options(cwd=cwd))
    _live(t)
    root = t.root
    sort, wc = t.one(b"sort"), t.one(b"wc", b"-l")
    for r in (sort, wc):
        assert r.ppid == root.pid and r.exit_code == 0 and r.exec_count == 1
    # printf is a builtin: its pipeline member and the (exit 7) subshell are forks of bash
    # that never exec; they carry bash's argv.
    forks = [r for r in t.records if r.exec_count == 0]
    assert len(forks) == 2
    assert all(r.argv == root.argv and r.ppid == root.pid for r in forks)
    assert sorted(r.exit_code or 0 for r in forks) == [0, 7]


def test_exit_codes_and_signals(cwd: str) -> None:
    script = "sh -c 'exit 3'; sh -c 'kill -TERM $$'; sh -c 'kill -KILL $$'; exit 5"
    t = run_traced(script, Options(cwd=cwd))
    _live(t)
    assert t.one(b"sh", b"-c", b"exit 3").exit_code == 3
    term = t.one(b"sh", b"-c", b"kill -TERM $$")
    assert term.signal == signal.SIGTERM and term.exit_code is None and not term.core_dumped
    assert t.one(b"sh", b"-c", b"kill -KILL $$").signal == signal.SIGKILL
    assert t.root.exit_code == 5
    assert t.status is not None and os.waitstatus_to_exitcode(t.status) == 5


def test_argv_is_exact_bytes(cwd: str) -> None:
    script = "/bin/echo 'a b' $'\\xff\\xfe' '' \"$(printf 'x%.0s' 1 2 3)\""
    t = run_traced(script, Options(cwd=cwd))
    echo = t.one(b"/bin/echo", b"a b", b"\xff\xfe", b"", b"xxx")
    assert not echo.argv_truncated


def test_argv_is_bounded(cwd: str) -> None:
    script = "/bin/true $(head -c 6000 /dev/zero | tr '\\0' y) more; /bin/true $(seq 3000); exit"
    t = run_traced(script, Options(cwd=cwd))
    long = [r for r in t.records if r.executables == (b"/bin/true",)]
    assert len(long) == 2
    for r in long:
        assert r.argv_truncated
        assert r.argv[0] == b"/bin/true"
        assert sum(len(a) + 1 for a in r.argv) <= proctrace.MAX_ARGV_BYTES
    assert long[0].argv[1].startswith(b"yyyy") and len(long[0].argv) == 2
    assert long[1].argv[1:4] == (b"1", b"2", b"3")


def test_cwd_uid_and_exec_chains(cwd: str) -> None:
    os.mkdir(os.path.join(cwd, "sub"))
    script = "cd sub && /bin/pwd; cd / && env X=1 /bin/true; exec /bin/sh -c 'exit 4'"
    t = run_traced(script, Options(cwd=cwd))
    pwd = t.one(b"/bin/pwd")
    assert pwd.cwd == os.fsencode(os.path.join(cwd, "sub")) and pwd.uid == NOBODY
    chained = t.one(b"/bin/true")
    assert chained.cwd == b"/"
    # env exec'd /bin/true in the same process: both programs are kept, the PATH lookup
    # attempts that failed are not.
    assert chained.executables == (b"/usr/bin/env", b"/bin/true")
    assert chained.exec_count == 2
    # The shell itself exec'd: still one process, the command's.
    root = t.root
    assert root.argv == (b"/bin/sh", b"-c", b"exit 4") and root.exit_code == 4
    assert root.executables == (b"/bin/bash", b"/bin/sh") and root.uid == NOBODY


def test_runs_as_root_too(cwd: str) -> None:
    t = run_traced("/bin/true", Options(cwd="/", uid=0))
    assert t.root.uid == 0 and t.root.cwd == b"/" and t.root.argv == (b"/bin/true",)


def test_a_fork_that_never_execs_is_read_at_its_fork(cwd: str) -> None:
    """A child that never execs is read at its fork event (/proc): its namespace pid, cwd
    and uid; its argv is its parent's."""
    os.mkdir(os.path.join(cwd, "sub"))
    # Subshells are forks of bash that never exec; the inner one is a fork of a fork.
    t = run_traced("(exit 3); cd sub; ( (exit 5); exit 4 )", Options(cwd=cwd))
    forks = {r.exit_code: r for r in t.records if r.exec_count == 0}
    assert sorted(forks) == [3, 4, 5], t.records
    assert all(r.uid == NOBODY for r in forks.values())
    assert forks[5].ppid == forks[4].pid and forks[4].ppid == forks[3].ppid == t.root.pid
    pids = [r.pid for r in forks.values()]
    assert None not in pids and len(set(pids)) == 3 and t.root.pid not in pids
    assert forks[3].cwd == os.fsencode(cwd)
    assert forks[4].cwd == forks[5].cwd == os.fsencode(os.path.join(cwd, "sub"))


# --- Daemons, timeouts and teardown ---------------------------------------------------------


def _has(argv: tuple[bytes, ...]) -> Callable[[Records], bool]:
    def check(records: Records) -> bool:
        return any(r.argv == argv for r in records)

    return check


def test_double_forked_daemon_outlives_the_command(cwd: str) -> None:
    # A subshell forks a background setsid, which forks sleep and exits: sleep is orphaned
    # twice over and re-parented to pid 1. Pid 1 then waits; the harness kills it.
    script = "(setsid -f sleep 1001 &); exit 0"

    def daemon_up(records: Records) -> bool:
        root = [r for r in records if r.pid == 2]
        return _has((b"sleep", b"1001"))(records) and bool(root) and root[0].ended_s is not None

    t = run_traced(script, Options(cwd=cwd, init_exits=False, kill_when=daemon_up))
    assert t.killed
    _live(t)
    root = t.root
    sleep = t.one(b"sleep", b"1001")
    setsid = [r for r in t.records if r.executables and r.executables[0].endswith(b"/setsid")]
    assert len(setsid) == 1
    # The parent at fork time, not the reaper: setsid, whose parent is the subshell.
    assert sleep.ppid == setsid[0].pid and sleep.host_ppid == setsid[0].host_pid
    assert setsid[0].ppid not in (1, root.pid) and setsid[0].exit_code == 0
    assert sleep.executables[-1].endswith(b"/sleep")
    assert sleep.signal == signal.SIGKILL and sleep.outlived_command
    assert not sleep.killed_by_timeout
    assert root.exit_code == 0 and not root.outlived_command
    assert root.ended_s is not None and sleep.ended_s is not None
    assert root.ended_s < sleep.ended_s


def test_timeout_kill_marks_every_survivor(cwd: str) -> None:
    script = "sleep 1002 & sleep 1003; echo never"
    both = Options(
        cwd=cwd,
        init_exits=False,
        kill_when=lambda rs: _has((b"sleep", b"1002"))(rs) and _has((b"sleep", b"1003"))(rs),
        timeout=True,
    )
    t = run_traced(script, both)
    assert t.killed and t.status is None  # the command never finished
    _live(t)
    for r in (t.root, t.one(b"sleep", b"1002"), t.one(b"sleep", b"1003")):
        assert r.signal == signal.SIGKILL and r.killed_by_timeout, r
        # The command did not exit on its own: killed together, nothing outlived it.
        assert not r.outlived_command, r
    assert len(t.records) == 3


def test_init_exit_kills_a_background_process(cwd: str) -> None:
    # As in contain: pid 1 exits once the command has; the kernel kills what is left.
    script = 'sleep 1004 & until read -r c < /proc/$!/comm && [ "$c" = sleep ]; do :; done'
    t = run_traced(script, Options(cwd=cwd))
    _live(t)
    sleep = t.one(b"sleep", b"1004")
    assert sleep.ppid == t.root.pid
    assert sleep.signal == signal.SIGKILL and sleep.outlived_command
    assert not sleep.killed_by_timeout
    assert t.root.exit_code == 0


# --- Bounds and robustness ------------------------------------------------------------------


def test_process_count_is_bounded(cwd: str) -> None:
    t = run_traced("for i in $(seq 50); do /bin/true; done", Options(cwd=cwd, max_processes=20))
    assert len(t.records) == 20
    assert t.dropped == 32  # bash, the $(...) subshell and 50 /bin/true, less the 20 kept


def test_exec_killed_while_waiting_for_the_supervisor(cwd: str) -> None:
    # Before each handle(), kill any process of the sandbox but the shell that is stopped in
    # execve waiting for us: its notification vanishes, or its id is no longer valid. Each
    # victim spins in builtins first, so the supervisor is idle again when its execve stops
    # it; one that slips through (exec'd during a handle()) just sleeps a moment.
    def kill_waiting_execs(pid_ns: str) -> None:
        for pid in _in_namespace(pid_ns):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/syscall") as f:
                    nr = f.read().split()[0]
                with open(f"/proc/{pid}/status") as f:
                    ns_pid = next(ln for ln in f if ln.startswith("NSpid:")).split()[-1]
                if nr == str(EXECVE_NR) and ns_pid not in ("1", "2"):
                    os.kill(pid, signal.SIGKILL)

    spin = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done"
    script = f"for n in 1 2 3; do ({spin}; exec /bin/sleep 0.$n) & wait $!; done; exit 0"
    t = run_traced(script, Options(cwd=cwd, before_handle=kill_waiting_execs))
    _live(t)
    assert t.root.exit_code == 0  # the shell went on after each victim died
    victims = [r for r in t.records if r.pid != 2]
    assert len(victims) == 3
    killed = [r for r in victims if r.signal == signal.SIGKILL]
    assert killed, "no exec was caught waiting for the supervisor"
    for r in killed:
        # Killed before its exec went ahead: still a copy of bash.
        assert r.exec_count == 0 and r.argv == t.root.argv
    for r in victims:
        assert r in killed or (r.exit_code == 0 and r.executables == (b"/bin/sleep",))


def test_the_sandbox_holds_no_tracing_descriptor(cwd: str) -> None:
    out = os.path.join(cwd, "fds")
    script = f"for f in /proc/$$/fd/*; do readlink $f; done > '{out}'; /bin/true"
    t = run_traced(script, Options(cwd=cwd))
    assert t.one(b"/bin/true").exit_code == 0
    with open(out) as f:
        targets = f.read().split()
    assert targets, "the listing is empty"
    assert not [x for x in targets if "seccomp" in x or x.startswith("socket:")], targets


def test_without_the_connector_execs_are_still_recorded(cwd: str) -> None:
    t = run_traced("for i in 1 2 3; do /bin/true $i; done", Options(cwd=cwd, connector=False))
    trues = [r for r in t.records if r.executables == (b"/bin/true",)]
    assert [r.argv for r in trues] == [(b"/bin/true", str(i).encode()) for i in (1, 2, 3)]
    assert all(r.ppid == t.root.pid and r.exit_code is None and r.ended_s is None for r in trues)


def test_threads_are_not_processes(cwd: str) -> None:
    # Threads come and go without ending their process's record; an exec from a thread that
    # is not the leader still belongs to the process (the kernel gives it the leader's pid).
    threads = (
        "import sys, threading\n"
        "ts = [threading.Thread(target=lambda: None) for _ in range(3)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "sys.exit(3)\n"
    )
    exec_from_thread = (
        "import os, threading\n"
        "t = threading.Thread(target=lambda: os.execv('/bin/true', ['/bin/true', 'from-thread']))\n"
        "t.start(); t.join()\n"
    )
    script = f'/usr/bin/python3 -c "{threads}"; /usr/bin/python3 -c "{exec_from_thread}"; exit 0'
    t = run_traced(script, Options(cwd=cwd))
    _live(t)
    assert len(t.records) == 3  # bash and two pythons
    first = t.one(b"/usr/bin/python3", b"-c", threads.encode())
    assert first.exit_code == 3
    second = t.one(b"/bin/true", b"from-thread")
    assert second.executables == (b"/usr/bin/python3", b"/bin/true") and second.exit_code == 0
    assert second.ppid == t.root.pid
