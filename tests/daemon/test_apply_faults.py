"""kill -9 of the daemon in the middle of an Apply of 1,000 files (issue 15, item 6).

Each try validates a command that creates, modifies, deletes and chmods about a thousand
paths, starts its Apply, kills the daemon (alone: its helpers must die with it; or with all
its processes at once, as a group kill does) after a different delay, and restarts it on the
same state directory. Then: every path is in its before state or every path in its after
state, as the recovery the audit log records says; no ``.airlock-*`` temporary entry is left;
the audit log verifies, names the Apply's start and the recovery; and the validation can be
applied (again, or replayed) to reach the after state.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from airlock import FailedPrecondition
from airlock.audit import RpcKind
from airlock.types import Verdict
from tests.helpers import NEUTRAL_POLICY, NOBODY, Daemon, public_dir, start_daemon

pytestmark = pytest.mark.soak

ARGS = (*NEUTRAL_POLICY, "--socket-mode", "0666")

COMMAND = (
    "mkdir -p new/d0 new/d1 new/d2 new/d3 new/d4 new/d5 new/d6 new/d7 new/d8 new/d9;"
    " for i in $(seq 0 699); do echo new $i > new/d$((i % 10))/f$i; done;"
    " for i in $(seq 0 199); do echo changed $i > mod/f$i; done;"
    " rm del/*; rm -r olddir; chmod 600 perm/*; ln -s mod/f0 link"
)


def seed(ws: Path) -> None:
    for name in ("mod", "del", "perm"):
        (ws / name).mkdir()
    for i in range(200):
        (ws / "mod" / f"f{i}").write_text(f"old {i}\n")
    for i in range(50):
        (ws / "del" / f"f{i}").write_text(f"doomed {i}\n")
        (ws / "perm" / f"f{i}").write_text(f"perm {i}\n")
    (ws / "olddir" / "a" / "b").mkdir(parents=True)
    for i in range(20):
        (ws / "olddir" / "a" / f"x{i}").write_text("x")


Snapshot = dict[str, tuple[str, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Every entry below ``root``: (type, permission bits, content hash or link target)."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                found[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return found


def temporaries(root: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(".airlock-")
    ]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children files of each of its threads)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        here = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{here}/task"):
                with open(f"/proc/{here}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def expected_after(ws: Path, tmp: Path) -> Snapshot:
    """The tree the command leaves when run directly on a copy of the seed."""
    copy = tmp / "expected"
    shutil.copytree(ws, copy, symlinks=True)
    subprocess.run(["bash", "-c", COMMAND], cwd=copy, check=True, capture_output=True)
    found = snapshot(copy)
    shutil.rmtree(copy)
    return found


def moment(ws: Path, when: str) -> bool:
    """Whether the Apply reached ``when`` (changes are applied in path order: del/, link,
    mod/, new/, olddir, perm/; prepare makes temporary entries first)."""
    if when == "temp":
        return any(n.startswith(".airlock-") for n in os.listdir(ws / "mod"))
    if when == "commit":  # the first deletion is the commit's first step
        return not (ws / "del" / "f0").exists()
    if when == "late":  # half way through the modifications
        return (ws / "mod" / "f5").read_text().startswith("changed")
    return True


def kill_during_apply(
    base: Path, ws: Path, when: str, delay: float, group: bool, uid: int = 0
) -> tuple[str, Daemon]:
    """Start an Apply, SIGKILL the daemon (``group``: every process of it at once) ``delay`` s
    after it reaches ``when`` (:func:`moment`), restart it; (validation id, the new daemon).
    ``uid``: whose validation it is (the apply and its recovery run as that user)."""
    daemon = start_daemon(base, *ARGS)
    with daemon.client() as c:
        v = c.validate(COMMAND, cwd=str(ws), uid=uid, gid=uid)
    assert v.verdict is Verdict.ALLOW and v.changes_digest, v.summary
    assert len(v.changes) >= 1000, len(v.changes)

    def call() -> None:
        with contextlib.suppress(Exception), daemon.client() as c:
            c.apply(v.validation_id)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 20
    while not moment(ws, when) and caller.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    helpers = descendants(daemon.proc.pid)
    if group:
        for pid in [daemon.proc.pid, *helpers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    else:
        daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    caller.join(timeout=30)
    # The spawner and any apply helper die with the daemon (parent-death signals).
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in helpers if alive(p)], "a helper outlived the daemon"
    return v.validation_id, start_daemon(base, *ARGS)


# (moment, delay after it, group kill, the validation's uid): from before the apply starts to
# late in its commit; as root, and as a user (whose helper changes identity, which clears a
# parent-death signal set before it).
TRIES = [
    ("start", 0.0, False, 0),
    ("start", 0.3, True, 0),
    ("temp", 0.0, False, 0),
    ("temp", 0.05, True, 0),
    ("commit", 0.0, False, 0),
    ("commit", 0.0, True, 0),
    ("late", 0.0, False, 0),
    ("late", 0.01, True, 0),
    ("temp", 0.0, False, NOBODY),
    ("commit", 0.0, False, NOBODY),
]


@pytest.mark.parametrize(("when", "delay", "group", "uid"), TRIES)
def test_kill_9_during_apply_recovers_to_a_named_state(
    tmp_path: Path, when: str, delay: float, group: bool, uid: int
) -> None:
    at_once = delay == 0.0  # killed the moment it reached `when`, not some time after
    delay += random.uniform(0, 0.01)
    with public_dir() as base:
        ws = base / "ws"
        ws.mkdir()
        seed(ws)
        if uid:
            subprocess.run(["chown", "-R", f"{uid}:{uid}", str(ws)], check=True)
        before = snapshot(ws)
        after = expected_after(ws, tmp_path)
        vid, daemon = kill_during_apply(base, ws, when, delay, group, uid)
        try:
            host = snapshot(ws)
            assert not temporaries(ws)
            with daemon.client() as c:
                assert c.verify_audit_log().ok
                events = [s.event for s in c.audit_events() if s.event.validation_id == vid]
                applies = [e for e in events if e.kind is RpcKind.APPLY]
                started = [e for e in applies if e.effects.startswith("starting:")]
                recovered = [e for e in applies if e.effects.startswith("recovered at start-up")]
                finished = [e for e in applies if e.effects.startswith("applied ")]
                if started and not finished:  # cut short after its start was recorded
                    assert len(recovered) == 1, [e.effects for e in applies]
                if recovered:  # recovery says what it did, and the host is so
                    said = recovered[0].effects
                    if "rolled forward" in said:
                        assert host == after
                        assert recovered[0].outcome.error == ""
                    else:  # (or killed between the claim and its audit: nothing written)
                        assert "rolled back" in said or "written nothing" in said, said
                        assert host == before
                    if when == "temp" and at_once:
                        # Killed while it prepared, the helper died with the daemon: it never
                        # reached the commit (one that outlives it writes everything). Some
                        # time after the first temporary file, a fast apply may have begun its
                        # commit: then rolled forward is right, and checked above.
                        assert "rolled back" in said, said
                elif finished:
                    assert host == after
                else:  # killed before the apply began
                    assert host == before and not started
                # Whatever happened, the validation can be brought to its after state.
                out = c.apply(vid)
                assert out.replayed == (host == after and bool(started or recovered))
                assert snapshot(ws) == after
                assert c.verify_audit_log().ok
            assert not temporaries(ws)
        finally:
            code = daemon.stop()
            assert code == 0, daemon.log()


def test_a_path_changed_while_the_daemon_was_down_is_named_and_flagged(tmp_path: Path) -> None:
    """Killed in the commit, then a path still in its before state is changed by someone
    else before the restart: recovery cannot settle the apply. It says so in the audit log,
    naming the path, and the validation is APPLY_INTERRUPTED (for a person), never half
    applied silently nor applied over the new content."""
    with public_dir() as base:
        ws = base / "ws"
        ws.mkdir()
        seed(ws)
        daemon = start_daemon(base, *ARGS)
        with daemon.client() as c:
            v = c.validate(COMMAND, cwd=str(ws))

        def call() -> None:
            with contextlib.suppress(Exception), daemon.client() as c:
                c.apply(v.validation_id)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 20
        while not moment(ws, "commit") and caller.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=10)
        caller.join(timeout=30)
        last = ws / "mod" / "f199"  # the last content change: not committed yet
        if last.read_text().startswith("changed"):
            pytest.skip("the apply reached it before the kill")
        last.write_text("someone else's edit\n")
        daemon = start_daemon(base, *ARGS)
        try:
            assert last.read_text() == "someone else's edit\n"  # never written over
            assert not temporaries(ws)
            with daemon.client() as c:
                assert c.verify_audit_log().ok
                applies = [
                    s.event
                    for s in c.audit_events()
                    if s.event.validation_id == v.validation_id and s.event.kind is RpcKind.APPLY
                ]
                said = applies[-1]
                assert said.effects.startswith("recovered at start-up"), said.effects
                assert "could not settle it" in said.effects
                assert f"{last}: changed content" in said.effects
                assert said.outcome.error == "APPLY_INTERRUPTED"
                with pytest.raises(FailedPrecondition) as info:
                    c.apply(v.validation_id)
                assert info.value.reason == "APPLY_INTERRUPTED"
        finally:
            assert daemon.stop() == 0, daemon.log()
