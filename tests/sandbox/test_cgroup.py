"""Cgroup limits on this host's real cgroups (root; detection from mount tables is in
tests/unit/sandbox/test_cgroup.py).

They need a cgroup hierarchy with memory and pids (v1 or v2, whichever the host has); they make
their cgroups under a unique "airlock-test-<hex>" group and always remove it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airlock._errors import SandboxError
from airlock.sandbox.cgroup import (
    Cgroup,
    CgroupHost,
    CgroupSpec,
    detect,
    remove_group,
    sweep,
)
from airlock.types import CgroupVersion

MiB = 1024 * 1024

# --- Real cgroups ----------------------------------------------------------------------------


def _real_host() -> CgroupHost:
    host = detect()
    if host.version == CgroupVersion.NONE:
        pytest.skip("no cgroup hierarchy with memory and pids is mounted writable")
    return host


def _procs(path: str) -> set[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return {int(p) for p in f.read().split()}


def _force_remove(path: str) -> None:
    """Test clean-up that does not trust the code under test: kill, then rmdir bottom-up."""
    if not os.path.isdir(path):
        return
    for dirpath, _, _ in os.walk(path, topdown=False):
        for _ in range(500):
            try:
                pids = _procs(dirpath)
            except FileNotFoundError:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            time.sleep(0.01)


@pytest.fixture
def cleanup() -> Iterator[Callable[[str], None]]:
    """Register cgroup directories to remove (with everything in them) after the test."""
    dirs: list[str] = []
    yield dirs.append
    for d in dirs:
        _force_remove(d)
    left = [d for d in dirs if os.path.exists(d)]
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def host() -> CgroupHost:
    return _real_host()


@pytest.fixture
def group(host: CgroupHost, cleanup: Callable[[str], None]) -> str:
    name = f"airlock-test-{secrets.token_hex(4)}"
    for _, root in host.roots:
        cleanup(os.path.join(root, name))
    return name


@contextlib.contextmanager
def _child(code: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Python child that waits for one byte on stdin (the go-ahead) before running ``code``."""
    prog = "import sys\nsys.stdin.buffer.read(1)\n" + textwrap.dedent(code)
    p = subprocess.Popen(
        [sys.executable, "-I", "-c", prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _go(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.flush()


def _readline(p: subprocess.Popen[bytes]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().decode().strip()


def _spec(host: CgroupHost, group: str, name: str = "sb-1", pids: int = 20) -> CgroupSpec:
    return CgroupSpec(host, group, name, 64 * MiB, pids)


def _wait_exited(pid: int) -> bool:
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], 30)[0])
    finally:
        os.close(fd)


def test_real_detect_names_mounted_hierarchies() -> None:
    host = _real_host()
    marker = {CgroupVersion.V1: "memory.limit_in_bytes", CgroupVersion.V2: "cgroup.controllers"}
    for key, root in host.roots:
        assert os.path.isdir(root)
        if key in ("memory", "unified"):
            assert os.path.exists(os.path.join(root, marker[host.version]))


def test_create_writes_limits_and_remove_leaves_nothing(host: CgroupHost, group: str) -> None:
    cg = Cgroup.create(_spec(host, group))
    assert len(cg.paths) == len({r for _, r in host.roots})
    for path in cg.paths:
        assert os.path.isdir(path)
    if host.version == CgroupVersion.V2:
        (path,) = cg.paths
        assert Path(path, "memory.max").read_text().strip() == str(64 * MiB)
        assert Path(path, "pids.max").read_text().strip() == "20"
    else:
        mem = dict(host.roots)["memory"]
        pids = dict(host.roots)["pids"]
        limit = Path(mem, group, "sb-1", "memory.limit_in_bytes").read_text()
        assert limit.strip() == str(64 * MiB)
        assert Path(pids, group, "sb-1", "pids.max").read_text().strip() == "20"
    with pytest.raises(SandboxError, match=r"already exists.*EEXIST"):
        Cgroup.create(_spec(host, group))  # a name is never shared
    assert all(os.path.isdir(p) for p in cg.paths)  # ... and the failure did not remove it
    cg.remove()
    for path in cg.paths:
        assert not os.path.exists(path)
    cg.remove()  # idempotent
    for _, root in host.roots:
        assert os.path.isdir(os.path.join(root, group))  # the parent stays


def test_memory_limit_oom_kills_and_stats_show_it(host: CgroupHost, group: str) -> None:
    cg = Cgroup.create(_spec(host, group))
    try:
        with _child("b = b'x' * (16 << 20)\nprint(len(b))\n") as small:
            cg.attach(small.pid)
            _go(small)
            assert small.wait() == 0  # under the limit: fine
        assert cg.stats().oom_kills == 0
        with _child("b = b'x' * (200 << 20)\nprint('survived', flush=True)\n") as big:
            cg.attach(big.pid)
            assert big.pid in set().union(*(_procs(p) for p in cg.paths))
            _go(big)
            assert big.wait() == -signal.SIGKILL
            assert _readline(big) == ""
        stats = cg.stats()
        assert stats.oom_kills >= 1
        assert 16 * MiB < stats.peak_memory_bytes <= 64 * MiB
    finally:
        cg.remove()


def test_pids_limit_makes_fork_fail_with_eagain(host: CgroupHost, group: str) -> None:
    code = """
        import os
        r, w = os.pipe()
        n = 0
        try:
            for _ in range(100):
                if os.fork() == 0:
                    os.close(w)
                    os.read(r, 1)
                    os._exit(0)
                n += 1
        except OSError as e:
            print(e.errno, n, flush=True)
        sys.stdin.buffer.read(1)
    """
    cg = Cgroup.create(_spec(host, group, pids=20))
    try:
        with _child(code) as p:
            cg.attach(p.pid)
            assert cg.stats().pids_limit_hit is False
            _go(p)
            assert _readline(p) == f"{errno.EAGAIN} 19"  # 20 tasks: the child and 19 forks
            assert cg.stats().pids_limit_hit is True
            assert len(set().union(*(_procs(path) for path in cg.paths))) == 20
            cg.kill()
            assert p.wait() == -signal.SIGKILL
            for path in cg.paths:
                assert _procs(path) == set()
    finally:
        cg.remove()


def test_kill_reaches_a_setsid_orphaned_grandchild(host: CgroupHost, group: str) -> None:
    code = """
        import os, signal
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                while True:
                    signal.pause()
            os._exit(0)
        os.close(w)
        os.wait()  # the middle process is gone: the grandchild is an orphan
        print(os.read(r, 32).decode(), flush=True)
        signal.pause()
    """
    cg = Cgroup.create(_spec(host, group))
    try:
        with _child(code) as p:
            cg.attach(p.pid)
            _go(p)
            grandchild = int(_readline(p))
            assert os.getsid(grandchild) != os.getsid(p.pid)  # its own session, orphaned
            for path in cg.paths:
                assert _procs(path) == {p.pid, grandchild}
            pidfd = os.pidfd_open(grandchild)
            try:
                cg.kill()
                assert select.select([pidfd], [], [], 30)[0], "grandchild survived kill()"
            finally:
                os.close(pidfd)
            assert p.wait() == -signal.SIGKILL
            for path in cg.paths:
                assert _procs(path) == set()
            cg.kill()  # nothing left: a no-op
    finally:
        cg.remove()


def test_stats_count_cpu_time(host: CgroupHost, group: str) -> None:
    cg = Cgroup.create(_spec(host, group))
    try:
        with _child("print(sum(i * i for i in range(3_000_000)))\n") as p:
            cg.attach(p.pid)
            _go(p)
            assert p.wait() == 0
        cpu = cg.stats().cpu_time_s
        if "cpu" in host.controllers:
            assert cpu > 0.0
        else:
            assert cpu == 0.0
    finally:
        cg.remove()


def test_remove_kills_processes_and_nested_cgroups(host: CgroupHost, group: str) -> None:
    cg = Cgroup.create(_spec(host, group))
    with _child("import signal\nsignal.pause()\n") as p, _child("x = 1\n") as q:
        cg.attach(p.pid)
        # A nested cgroup, as a sandbox could make; a process in it, in every hierarchy.
        for path in cg.paths:
            os.mkdir(os.path.join(path, "nested"))
            Path(path, "nested", "cgroup.procs").write_text(str(q.pid))
        cg.remove()
        assert p.wait() == -signal.SIGKILL
        assert q.wait() == -signal.SIGKILL
    for path in cg.paths:
        assert not os.path.exists(path)


_CRASHING_DAEMON = """
import os, subprocess, sys
from airlock.sandbox.cgroup import Cgroup, CgroupSpec, detect
host = detect()
for name in ("sb-a", "sb-b"):
    cg = Cgroup.create(CgroupSpec(host, sys.argv[1], name, 64 << 20, 20))
    child = subprocess.Popen(
        ["sleep", "1000"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cg.attach(child.pid)
    print(child.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_sweep_removes_what_a_crashed_daemon_left(host: CgroupHost, group: str) -> None:
    daemon = subprocess.run(
        [sys.executable, "-c", _CRASHING_DAEMON, group], capture_output=True, check=False
    )
    assert daemon.returncode == -signal.SIGKILL, daemon.stderr.decode()
    orphans = [int(pid) for pid in daemon.stdout.split()]
    assert len(orphans) == 2
    pidfds = [os.pidfd_open(pid) for pid in orphans]
    try:
        for _, root in host.roots:
            assert {"sb-a", "sb-b"} <= set(os.listdir(os.path.join(root, group)))
        assert sweep(host, group) == 2
        for fd in pidfds:
            assert select.select([fd], [], [], 30)[0], "a leftover process survived sweep()"
    finally:
        for fd in pidfds:
            os.close(fd)
    for _, root in host.roots:
        parent = os.path.join(root, group)
        assert os.path.isdir(parent)  # the parent stays
        assert not [e for e in os.scandir(parent) if e.is_dir()]
    assert sweep(host, group) == 0

    Cgroup.create(_spec(host, group, "sb-c"))
    remove_group(host, group)
    for _, root in host.roots:
        assert not os.path.exists(os.path.join(root, group))
    remove_group(host, group)  # idempotent


def _writable_cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2" and "rw" in fields[5].split(","):
                return fields[4]
    return None


def test_v2_kill_and_remove_on_a_unified_hierarchy_without_controllers(
    cleanup: Callable[[str], None],
) -> None:
    # Hybrid hosts (like v1 machines with an empty cgroup2 mount) still have cgroup.kill,
    # cgroup.events and cgroup.procs in their unified hierarchy: the v2 kill/remove path runs
    # here for real; only memory.max & co. are missing, so create() must fail closed.
    root = _writable_cgroup2_mount()
    if root is None:
        pytest.skip("no writable cgroup2 mount")
    if {"memory", "pids"} <= set(Path(root, "cgroup.controllers").read_text().split()):
        pytest.skip("this cgroup2 mount has memory and pids: the generic tests cover it")
    group = f"airlock-test-{secrets.token_hex(4)}"
    cleanup(os.path.join(root, group))
    host = CgroupHost(CgroupVersion.V2, ("memory", "pids", "cpu"), (("unified", root),))
    spec = CgroupSpec(host, group, "sb-1", 64 * MiB, 20)

    with pytest.raises(SandboxError, match=r"cgroup\.subtree_control.*ENOENT"):
        Cgroup.create(spec)
    assert not os.path.exists(os.path.join(root, group, "sb-1"))

    path = os.path.join(root, group, "sb-1")
    os.mkdir(path)
    cg = Cgroup(spec, (("unified", path),))
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        pytest.skip("kernel before 5.14: no cgroup.kill")
    code = """
        import os, signal
        if os.fork() == 0:
            os.setsid()
            print(os.getpid(), flush=True)
            signal.pause()
        signal.pause()
    """
    with _child(code) as p:
        cg.attach(p.pid)
        _go(p)
        grandchild = int(_readline(p))
        assert _procs(path) == {p.pid, grandchild}
        assert "populated 1" in Path(path, "cgroup.events").read_text()
        cg.remove()
        assert _wait_exited(grandchild)
        assert p.wait() == -signal.SIGKILL
    assert not os.path.exists(path)
    assert sweep(host, group) == 0
    remove_group(host, group)
    assert not os.path.exists(os.path.join(root, group))
