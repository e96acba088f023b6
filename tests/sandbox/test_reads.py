"""Sensitive-read capture (airlock.sandbox.reads) on the real kernel.

The harness is a forked child (a stand-in for the supervisor) that unshares its
mount namespace, makes ``/`` rprivate, mounts a tmpfs and an overlay on it whose
lower layers are a fake tree (home with .ssh/.aws/.mozilla, a project with
.env, an etc/shadow) over the host's ``/`` (for bash and cat), and starts the
recorder on that overlay. A grandchild runs ``bash -c SCRIPT``: either through
the harness's own view of the overlay, or, like the real command, in a copy of
the mount namespace pivoted into the overlay. Each ``cat`` opens its file and
then blocks on a pipe the harness holds, so its /proc entry still exists when
the event is handled; bash tells the harness every cat's pid. The mounts vanish
with the child; the fake tree lives on its tmpfs.
"""

from __future__ import annotations

import os
import pickle
import select
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import reads
from airlock.sandbox.reads import ReadRecorder, SensitiveRead

# Root (as all of tests/sandbox): mount namespaces and fanotify.
HOME = "/home/airlock-reads-test"
# A harness guard against a wedged run, never an assertion on timing.
SAFETY_S = 60.0

FAKE_FILES = {
    f"{HOME}/.ssh/id_ed25519": 0o600,
    f"{HOME}/.ssh/config": 0o644,
    f"{HOME}/.aws/credentials": 0o600,
    f"{HOME}/.mozilla/firefox/abc.default/logins.json": 0o600,
    f"{HOME}/.mozilla/firefox/abc.default/prefs.js": 0o644,
    f"{HOME}/notes.txt": 0o644,
    f"{HOME}/.sshrc": 0o644,
    "/srv/project/.env": 0o644,
    "/srv/project/.environment": 0o644,
    "/srv/project/README": 0o644,
    "/etc/shadow": 0o600,
}
# Opened by a cat each (cat FILE - : it then blocks reading the harness's pipe).
SENSITIVE = [
    f"{HOME}/.ssh/id_ed25519",
    f"{HOME}/.aws/credentials",
    f"{HOME}/.mozilla/firefox/abc.default/logins.json",
    "/srv/project/.env",
    "/etc/shadow",
    f"{HOME}/.kube/config",  # created by the script: exists only in the upper layer
]
HARMLESS = [
    f"{HOME}/notes.txt",
    f"{HOME}/.sshrc",
    f"{HOME}/.mozilla/firefox/abc.default/prefs.js",
    "/srv/project/.environment",
    "/srv/project/README",
]

SCRIPT = r"""
set -e
mkdir -p "$R$HOME_/.kube"
echo kubeconfig > "$R$HOME_/.kube/config"       # bash opens it (for writing): recorded too
for f in "$@"; do
    cat "$R$f" - <&5 >/dev/null 4>&- &
    echo "$! $f" >&4
done
exec 4>&-
# A failed attempt: uid 65534 cannot open the 0600 shadow (fanotify never hears of it).
cd "$R/etc" && setpriv --reuid=65534 --regid=65534 --clear-groups cat shadow 2>/dev/null || true
cd "$R$HOME_/.ssh" && setpriv --reuid=65534 --regid=65534 --clear-groups cat id_ed25519 \
    2>/dev/null || true
wait
"""


@dataclass(frozen=True)
class Outcome:
    reads: tuple[SensitiveRead, ...]
    cat_pids: dict[str, int]
    bash_pid: int
    status: int
    overflowed: bool
    dropped: int
    events: int
    merged: bytes = b""
    error: str = ""


def _populate(lower: Path) -> None:
    for path, mode in FAKE_FILES.items():
        target = lower / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"secret of {path}\n")
        target.chmod(mode)


def _command(merged: str, pivot: bool, pids_w: int, go_r: int) -> None:
    """The grandchild: optionally pivot into the overlay, then exec bash. Never returns."""
    try:
        os.dup2(pids_w, 4, inheritable=True)
        os.dup2(go_r, 5, inheritable=True)
        root = ""
        if pivot:
            sc.unshare(sc.CLONE_NEWNS)  # like init: a copy of the harness's mounts
            os.chdir(merged)
            os.makedirs("old-root", exist_ok=True)
            sc.pivot_root(".", "old-root")
            os.chdir("/")
            sc.umount2("/old-root", sc.MNT_DETACH)
        else:
            root = merged
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "R": root, "HOME_": HOME}
        argv = ["bash", "-c", SCRIPT, "bash", *SENSITIVE, *HARMLESS]
        os.execve("/bin/bash", argv, env)
    finally:
        os._exit(127)


def _pids(text: bytes) -> Iterator[tuple[str, int]]:
    """(file, pid of the cat that opened it) from bash's "PID FILE" lines."""
    for line in text.decode().splitlines():
        pid, path = line.split(" ", 1)
        yield path, int(pid)


def _harness(tmp: Path, pivot: bool, max_reads: int, late: bool = False) -> Outcome:
    """Runs in the forked child (root, own mount namespace). ``late``: the recorder is made
    without globs (a warm sandbox's, before its request) and given them just before the
    command starts."""
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    scratch = tmp / "scratch"
    scratch.mkdir()
    sc.mount("tmpfs", str(scratch), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=700,size=16m")
    # On the tmpfs: a lower layer inside the "/" layer's file system would overlap it (ELOOP).
    lower = scratch / "lower"
    _populate(lower)
    for name in ("upper", "work", "merged"):
        (scratch / name).mkdir()
    merged = str(scratch / "merged")
    options = "redirect_dir=off,index=off,metacopy=off,xino=off"
    data = f"lowerdir={lower}:/,upperdir={scratch}/upper,workdir={scratch}/work,{options}"
    sc.mount("overlay", merged, "overlay", 0, data)
    if late:
        recorder = ReadRecorder([(merged, "/")], max_reads=max_reads)
        with open(f"{merged}/etc/shadow", "rb"):  # before the globs: not recorded
            pass
        recorder.handle()
        recorder.expect(reads.DEFAULT_SENSITIVE_GLOBS, HOME)
    else:
        recorder = ReadRecorder(
            [(merged, "/")], reads.DEFAULT_SENSITIVE_GLOBS, HOME, max_reads=max_reads
        )
    pids_r, pids_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _command(merged, pivot, pids_w, go_r)
    os.close(pids_w)
    os.close(go_r)
    pids_text = b""
    deadline = time.monotonic() + SAFETY_S
    poller = select.poll()
    poller.register(recorder.fileno(), select.POLLIN)
    poller.register(pids_r, select.POLLIN)
    pids_open = True
    # Wait until every cat has said its pid and its open has been recorded, then let them go.
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            if fd == pids_r:
                chunk = os.read(pids_r, 4096)
                pids_text += chunk
                if not chunk:
                    poller.unregister(pids_r)
                    pids_open = False
            else:
                recorder.handle()
        if not pids_open:
            cats = dict(_pids(pids_text))
            want = {(p.encode(), cats[p]) for p in SENSITIVE}
            if want <= {(r.path, r.pid) for r in recorder.reads()} or recorder.dropped:
                break
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    while recorder.handle():
        pass
    os.close(pids_r)
    cat_pids = dict(_pids(pids_text))
    outcome = Outcome(
        reads=recorder.reads(),
        cat_pids=cat_pids,
        bash_pid=pid,
        status=status,
        overflowed=recorder.overflowed,
        dropped=recorder.dropped,
        events=recorder.events,
        merged=merged.encode(),
    )
    recorder.close()
    return outcome


def run(tmp: Path, *, pivot: bool, max_reads: int = reads.MAX_READS, late: bool = False) -> Outcome:
    result_r, result_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(result_r)
        try:
            sent = _harness(tmp, pivot, max_reads, late)
        except BaseException as exc:
            sent = Outcome((), {}, 0, -1, False, 0, 0, error=f"{type(exc).__name__}: {exc}")
        with os.fdopen(result_w, "wb") as f:
            pickle.dump(sent, f)
        os._exit(0)
    os.close(result_w)
    with os.fdopen(result_r, "rb") as f:
        data = f.read()
    os.waitpid(child, 0)
    outcome: Outcome = pickle.loads(data)
    assert not outcome.error, outcome.error
    return outcome


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    fds = set(os.listdir("/proc/self/fd"))
    yield tmp_path
    assert set(os.listdir("/proc/self/fd")) == fds, "the test leaked descriptors"


@pytest.mark.parametrize(
    ("pivot", "late"),
    [(False, False), (True, False), (True, True)],
    ids=["supervisor-view", "pivoted-copy", "globs-after-marks"],
)
def test_exactly_the_sensitive_opens_are_recorded(tmp: Path, pivot: bool, late: bool) -> None:
    out = run(tmp, pivot=pivot, late=late)
    assert os.waitstatus_to_exitcode(out.status) == 0
    assert sorted(out.cat_pids) == sorted(SENSITIVE + HARMLESS)
    assert not out.overflowed
    assert out.dropped == 0
    got = {(r.path, r.pid) for r in out.reads}
    want = {(p.encode(), out.cat_pids[p]) for p in SENSITIVE}
    # bash itself opened ~/.kube/config to write it.
    want.add((f"{HOME}/.kube/config".encode(), out.bash_pid))
    assert got == want
    for r in out.reads:
        assert r.count == 1
        if r.pid == out.bash_pid:
            assert r.exe.endswith(b"/bash")
            continue
        # Each cat was still blocked on the pipe when its open was handled.
        assert r.exe.endswith(b"/cat"), r
        assert len(r.argv) == 3 and r.argv[0] == b"cat" and r.argv[2] == b"-", r
        assert r.argv[1] == (r.path if pivot else out.merged + r.path)


def test_failed_opens_and_lookalikes_are_not_recorded(tmp: Path) -> None:
    out = run(tmp, pivot=True)
    paths = [r.path for r in out.reads]
    # The uid-65534 attempts on shadow and id_ed25519 failed (EACCES) and fanotify never
    # hears of a failed open: one record per path, but ~/.kube/config (bash and cat).
    want = Counter(p.encode() for p in SENSITIVE)
    want[f"{HOME}/.kube/config".encode()] += 1
    assert Counter(paths) == want
    shadow = [r for r in out.reads if r.path == b"/etc/shadow"]
    assert [r.pid for r in shadow] == [out.cat_pids["/etc/shadow"]]
    for harmless in HARMLESS:
        assert harmless.encode() not in paths
    assert out.events > len(out.reads)  # the harmless opens were seen, and not kept


def test_the_record_is_bounded(tmp: Path) -> None:
    out = run(tmp, pivot=False, max_reads=3)
    assert len(out.reads) == 3
    assert out.dropped == len(SENSITIVE) + 1 - 3
