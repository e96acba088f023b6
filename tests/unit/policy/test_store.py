"""The policy store's reloads: at rest, whole, and never dropping what the operator did not
accept (issue 15, item 3). Real files in a temporary directory, the real loader."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from airlock.policy.store import ACCEPT_FILE, Acceptance, PolicyStore
from airlock.types import Verdict

RULE = """\
  - id: {id}
    title: No {argv0}
    description: A test rule.
    decision: deny
    severity: high
    match:
      argv0: [{argv0}]
    tests:
      match: ["{argv0} x"]
      not_match: ["echo hi"]
"""


def rules_file(*names: str) -> str:
    return "version: 1\nrules:\n" + "".join(RULE.format(id=f"t.{n}", argv0=n) for n in names)


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Distinct mtimes even on coarse clocks: the store compares sizes, mtimes and bytes.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    write(d / "system.yaml", rules_file("reboot", "insmod"))
    write(d / "vcs.yaml", rules_file("gitpush"))
    return d


def store(d: Path, **kw: object) -> PolicyStore:
    return PolicyStore(d, settle_s=0.05, settle_max_s=2.0, **kw)  # type: ignore[arg-type]


def denies(s: PolicyStore, rule_id: str) -> bool:
    return any(r.id == rule_id and r.decision is Verdict.DENY for r in s.bundle.rules)


def test_an_added_rule_is_taken_and_reported(policy_dir: Path) -> None:
    s = store(policy_dir)
    write(policy_dir / "vcs.yaml", rules_file("gitpush", "npmpublish"))
    assert s.reload("test")
    info = s.info()
    assert not info.last_reload_refused and info.last_reload_error == ""
    assert info.rules_added == ("t.npmpublish",) and info.rules_removed == ()
    assert info.last_reload_version == info.version == s.bundle.version


def test_a_deleted_file_is_refused_and_the_old_bundle_kept(policy_dir: Path) -> None:
    s = store(policy_dir)
    before = s.bundle.version
    (policy_dir / "system.yaml").unlink()
    assert not s.reload("test")
    assert s.bundle.version == before and denies(s, "t.reboot") and denies(s, "t.insmod")
    info = s.info()
    assert info.last_reload_refused
    assert info.files_removed == ("system.yaml",)
    assert info.rules_removed == ("t.insmod", "t.reboot")
    assert ACCEPT_FILE in info.last_reload_error and info.last_reload_version != before
    assert info.version == before


def test_a_file_cut_short_is_refused(policy_dir: Path) -> None:
    """A half-written save that is still valid YAML: fewer rules, refused."""
    s = store(policy_dir)
    full = rules_file("reboot", "insmod")
    write(policy_dir / "system.yaml", full[: full.index("  - id: t.insmod")])
    assert not s.reload("test")
    assert denies(s, "t.insmod")
    assert s.info().rules_removed == ("t.insmod",) and s.info().files_removed == ()


def test_a_file_cut_mid_rule_is_rejected(policy_dir: Path) -> None:
    s = store(policy_dir)
    full = rules_file("reboot", "insmod")
    write(policy_dir / "system.yaml", full[: full.index("severity", full.index("t.insmod"))])
    assert not s.reload("test")
    assert denies(s, "t.insmod") and s.info().last_reload_refused


def test_an_empty_file_is_refused(policy_dir: Path) -> None:
    s = store(policy_dir)
    write(policy_dir / "system.yaml", "")
    assert not s.reload("test")
    assert denies(s, "t.reboot") and s.info().last_reload_refused


def test_the_operator_accepts_exactly_one_bundle(policy_dir: Path) -> None:
    seen: list[Acceptance] = []
    s = store(policy_dir, on_accept=seen.append)
    old = s.bundle.version
    (policy_dir / "vcs.yaml").unlink()
    assert not s.reload("test")
    refused = s.info().last_reload_version

    # An acceptance of another bundle accepts nothing.
    write(policy_dir / ACCEPT_FILE, "0" * 64 + "\n")
    assert not s.reload("test") and s.bundle.version == old
    # Too short a prefix neither.
    write(policy_dir / ACCEPT_FILE, refused[:6] + "\n")
    assert not s.reload("test") and s.bundle.version == old

    write(policy_dir / ACCEPT_FILE, f"{refused}\ngit rules move to the team bundle\n")
    assert s.reload("test")
    assert s.bundle.version == refused and not denies(s, "t.gitpush")
    info = s.info()
    assert not info.last_reload_refused
    assert info.files_removed == ("vcs.yaml",) and info.rules_removed == ("t.gitpush",)
    assert not (policy_dir / ACCEPT_FILE).exists()  # good once
    [acc] = seen
    assert (acc.old_version, acc.new_version) == (old, refused)
    assert acc.uid == os.getuid() and acc.note == "git rules move to the team bundle"
    assert acc.change.rules_removed == ("t.gitpush",)


def test_an_acceptance_that_cannot_be_recorded_is_a_refusal(policy_dir: Path) -> None:
    def broken(_: Acceptance) -> None:
        raise OSError("audit log unavailable")

    s = store(policy_dir, on_accept=broken)
    (policy_dir / "vcs.yaml").unlink()
    assert not s.reload("test")
    write(policy_dir / ACCEPT_FILE, s.info().last_reload_version)
    assert not s.reload("test")
    assert denies(s, "t.gitpush") and "cannot be recorded" in s.info().last_reload_error
    assert (policy_dir / ACCEPT_FILE).exists()


def test_files_still_changing_are_refused(policy_dir: Path) -> None:
    s = store(policy_dir)
    s.settle_max_s = 0.5
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write(policy_dir / "vcs.yaml", rules_file("gitpush") + f"# save {i}\n")
            time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert not s.reload("test")
    finally:
        stop.set()
        t.join()
    info = s.info()
    assert info.last_reload_refused and "still changing" in info.last_reload_error


def test_a_slow_save_is_waited_out(policy_dir: Path) -> None:
    """A save written in pieces: the store loads only the finished file."""
    s = store(policy_dir)
    s.settle_s = 0.5
    full = rules_file("gitpush", "npmpublish")
    pieces = [full[: len(full) * k // 5] for k in range(1, 6)]
    write(policy_dir / "vcs.yaml", pieces[0])

    def writer() -> None:
        for piece in pieces[1:]:
            time.sleep(0.05)
            write(policy_dir / "vcs.yaml", piece)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert s.reload("test")
    finally:
        t.join()
    info = s.info()
    assert not info.last_reload_refused and info.rules_added == ("t.npmpublish",)
    assert denies(s, "t.gitpush")


def test_an_unchanged_reload_clears_the_last_change(policy_dir: Path) -> None:
    s = store(policy_dir)
    write(policy_dir / "vcs.yaml", rules_file("gitpush", "npmpublish"))
    assert s.reload("test") and s.info().rules_added
    assert s.reload("again")
    info = s.info()
    assert info.rules_added == () and not info.last_reload_refused


def test_the_watcher_reloads_on_request_and_on_the_acceptance_file(policy_dir: Path) -> None:
    s = store(policy_dir)
    stop, asked = threading.Event(), threading.Event()
    t = s.watch(stop, interval=0.05, requested=asked)
    try:
        (policy_dir / "vcs.yaml").unlink()
        deadline = time.monotonic() + 10
        while not s.info().last_reload_refused:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        write(policy_dir / ACCEPT_FILE, s.info().last_reload_version)
        while not s.info().files_removed or s.info().last_reload_refused:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not denies(s, "t.gitpush")
        # Asked (the daemon's main thread does it on SIGHUP): a reload, nothing changed.
        before = s.info().last_reload_at
        asked.set()
        while s.info().last_reload_at == before:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert s.info().rules_removed == () and not s.info().last_reload_refused
    finally:
        stop.set()
        t.join(timeout=5)
    assert not t.is_alive()


def test_start_waits_for_a_file_being_written(policy_dir: Path) -> None:
    full = rules_file("gitpush", "npmpublish")
    pieces = [full[: len(full) * k // 10] for k in range(1, 11)]
    write(policy_dir / "vcs.yaml", pieces[0])

    def writer() -> None:
        for piece in pieces[1:]:
            time.sleep(0.03)
            write(policy_dir / "vcs.yaml", piece)

    t = threading.Thread(target=writer)
    t.start()
    try:
        s = PolicyStore(policy_dir, settle_s=0.3, settle_max_s=5.0)
    finally:
        t.join()
    assert denies(s, "t.npmpublish") and denies(s, "t.gitpush")


def test_start_refuses_files_that_never_settle(policy_dir: Path) -> None:
    from airlock.policy.loader import PolicyError

    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write(policy_dir / "vcs.yaml", rules_file("gitpush") + f"# save {i}\n")
            time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        with pytest.raises(PolicyError, match="kept changing"):
            PolicyStore(policy_dir, settle_s=0.05, settle_max_s=0.5)
    finally:
        stop.set()
        t.join()
