"""The warm pool: sandboxes prepared ahead, each used once; cold start when none fits."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from airlock.client import Client
from airlock.types import ChangeKind, Verdict
from tests.helpers import NEUTRAL_POLICY, SANDBOX_ARGS, running_daemon

# These tests are about the sandbox and the daemon: every command must reach the dry run.
DAEMON_ARGS = NEUTRAL_POLICY


def test_cold_start_when_the_pool_is_off(public_tmp: Path) -> None:
    with (
        running_daemon(public_tmp, *SANDBOX_ARGS, "--warm-pool", "0") as d,
        d.client() as c,
    ):
        for _ in range(2):
            v = c.validate("echo hi > f; cat f", cwd="/tmp")
            assert v.stdout == b"hi\n" and not v.timings.warm
            assert v.timings.sandbox_setup_s > 0
            assert [ch.path for ch in v.changes] == [b"/tmp/f"]


def wait_warm(c: Client, timeout: float = 10) -> None:
    """Validate until a request is served warm (the pool fills in the background)."""
    deadline = time.monotonic() + timeout
    while not c.validate("true", cwd="/tmp").timings.warm:
        assert time.monotonic() < deadline, "the pool never served a warm sandbox"
        time.sleep(0.05)


def test_warm_sandboxes_are_used_once(public_tmp: Path) -> None:
    with (
        running_daemon(public_tmp, *SANDBOX_ARGS, "--warm-pool", "2") as d,
        d.client() as c,
    ):
        wait_warm(c)
        first = c.validate("echo one > /tmp/leak; ls /tmp/leak", cwd="/tmp")
        assert first.timings.warm and first.timings.sandbox_setup_s == 0
        assert first.stdout == b"/tmp/leak\n"
        # Whatever sandbox serves the next requests, none has seen the first one's changes.
        for _ in range(4):
            v = c.validate("cat /tmp/leak 2>&1 || echo clean", cwd="/tmp")
            assert v.stdout.endswith(b"clean\n"), v.stdout
        assert not os.path.exists("/tmp/leak")


def test_warm_sandbox_runs_as_the_requested_user(public_tmp: Path) -> None:
    with running_daemon(public_tmp, *SANDBOX_ARGS) as d, d.client() as c:
        wait_warm(c)
        v = c.validate("id -u; grep CapEff /proc/self/status", cwd="/tmp", uid=65534)
        assert v.timings.warm
        assert v.stdout.decode().split()[:3] == ["65534", "CapEff:", "0000000000000000"]


def test_new_host_mount_retires_the_pool(public_tmp: Path) -> None:
    """A mount made on the host after the pool was built is seen by the next dry run."""
    mnt = public_tmp / "late-mount"
    mnt.mkdir()
    with running_daemon(public_tmp, *SANDBOX_ARGS) as d, d.client() as c:
        wait_warm(c)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "late", str(mnt)], check=True)
        try:
            (mnt / "inside.txt").write_text("from the new mount\n")
            v = c.validate(f"cat {mnt}/inside.txt; echo more >> {mnt}/inside.txt", cwd="/home")
            assert v.stdout == b"from the new mount\n"
            changes = {ch.path: ch.kind for ch in v.changes}
            assert changes == {str(mnt / "inside.txt").encode(): ChangeKind.MODIFIED}
            assert v.verdict is Verdict.ASK
            assert (mnt / "inside.txt").read_text() == "from the new mount\n"
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def _holders(daemon_pid: int, needle: str) -> list[int]:
    """Processes below the daemon whose mount table lists ``needle`` (a mount source)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/mountinfo") as f:
                if needle not in f.read().split():
                    continue
        except OSError:
            continue
        if _below(int(entry), daemon_pid):
            found.append(int(entry))
    return found


def _below(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def test_an_unmounted_host_disk_is_released_while_sandboxes_are_warm(public_tmp: Path) -> None:
    """Warm sandboxes hold a copy of every host mount: an unmounted loop disk stayed busy
    (its loop device could not be freed) until they expired (22 s in the soak). A change of
    the mount table now retires the pool at once. --warm-idle 600: expiry cannot explain it."""
    image, point = public_tmp / "disk.img", public_tmp / "disk"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mount", loop, str(point)], check=True)
        mounted = True
        (point / "data.txt").write_text("on the disk\n")
        with (
            running_daemon(public_tmp / "d", *SANDBOX_ARGS, "--warm-idle", "600") as d,
            d.client() as c,
        ):
            wait_warm(c)
            v = c.validate(f"cat {point}/data.txt", cwd="/home")
            assert v.stdout == b"on the disk\n"
            # The pool refilled: its sandboxes hold the disk (what the fix is about).
            deadline = time.monotonic() + 30
            while not _holders(d.proc.pid, loop):
                assert time.monotonic() < deadline, "no warm sandbox holds the disk"
                time.sleep(0.1)
            subprocess.run(["umount", str(point)], check=True)
            mounted = False
            # The sandboxes let go of it: no process of the daemon's has it mounted, and the
            # loop device is free (its backing file gone) once detached. The guard is a hang
            # guard, far below the 600 s idle time.
            deadline = time.monotonic() + 20
            while _holders(d.proc.pid, loop):
                assert time.monotonic() < deadline, "warm sandboxes still hold the unmounted disk"
                time.sleep(0.05)
            subprocess.run(["losetup", "--detach", loop], check=True)
            backing = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
            while backing.exists():
                assert time.monotonic() < deadline, f"{loop} is still busy"
                time.sleep(0.05)
            # And the pool comes back, from the new mount table.
            wait_warm(c, timeout=30)
            v = c.validate(f"ls {point}", cwd="/home")
            assert v.stdout == b"" and v.timings.warm
    finally:
        if mounted:
            subprocess.run(["umount", str(point)], check=False)
        subprocess.run(["losetup", "--detach", loop], check=False, capture_output=True)


def _supervisors(daemon_pid: int) -> set[int]:
    """The spawner's children now (every supervisor, warm or busy)."""
    import psutil

    out: set[int] = set()
    for child in psutil.Process(daemon_pid).children():
        if "airlock.sandbox.spawner" in " ".join(child.cmdline()):
            out |= {p.pid for p in child.children()}
    return out


def test_supervisors_are_reused_and_every_sandbox_is_new(public_tmp: Path) -> None:
    """A supervisor that served a request builds the next sandbox itself (no new process per
    dry run), and nothing of one run reaches the next: files, hostname, user, environment."""
    with running_daemon(public_tmp, *SANDBOX_ARGS, "--warm-pool", "2") as d, d.client() as c:
        wait_warm(c)
        seen: set[int] = set()
        for i in range(24):
            uid = 65534 if i % 2 else 0
            v = c.validate(
                f"ls /tmp; hostname; id -u; echo ${{MARK:-unset}}; echo {i} > /tmp/run{i}",
                cwd="/tmp",
                uid=uid,
                env={"PATH": "/usr/bin:/bin"} if i % 3 else {"PATH": "/usr/bin:/bin", "MARK": "x"},
            )
            lines = v.stdout.decode().split("\n")
            assert f"run{i - 1}" not in lines[:-4], v.stdout  # no earlier run's file
            mark = "unset" if i % 3 else "x"
            assert lines[-4:-1] == ["airlock", str(uid), mark], v.stdout
            assert [ch.path for ch in v.changes] == [f"/tmp/run{i}".encode()]
            seen |= _supervisors(d.proc.pid)
        # One process per dry run before reuse: 24 runs and the pool's 2 would be ~26.
        assert len(seen) <= 8, seen


def test_concurrent_clients_keep_their_supervisors(public_tmp: Path) -> None:
    """Six clients at once: the supervisors that come back stay warm (as many as were busy at
    once), instead of the pool retiring all but twice its size and forking new ones."""
    import threading

    clients, runs = 6, 15
    with running_daemon(public_tmp, *SANDBOX_ARGS, "--warm-pool", "2") as d, d.client() as c:
        wait_warm(c)
        seen: set[int] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.update(_supervisors(d.proc.pid))
                time.sleep(0.005)

        def client(i: int, out: list[int]) -> None:
            with d.client() as ci:
                for k in range(runs):
                    v = ci.validate(f"echo {i}-{k} > /tmp/mark", cwd="/tmp")
                    out.append(len(v.changes))

        def round_() -> list[int]:
            outs: list[list[int]] = [[] for _ in range(clients)]
            threads = [threading.Thread(target=client, args=(i, outs[i])) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [n for o in outs for n in o]

        assert round_() == [1] * clients * runs  # the burst that grows the pool
        before = _supervisors(d.proc.pid)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert round_() == [1] * clients * runs
        finally:
            done.set()
            watcher.join()
        # Retiring those that came back beyond twice the pool's size forked a new supervisor
        # every two or three runs (34-35 of these 90); kept, the second burst forks 1-3 (7 once,
        # with the whole suite running).
        assert len(seen - before) <= 2 * clients, (len(before), len(seen - before))
