"""Policy reloads in a real daemon (issue 15, items 3 and 4): a reload never fails open, and a
SIGHUP storm neither wedges the daemon nor keeps SIGTERM from stopping it.

Each test runs its own daemon on a copy of the shipped policy in a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from airlock.api import convert
from airlock.audit import AuditFilter, RpcKind
from airlock.client import Client
from airlock.policy.store import ACCEPT_FILE, default_policy_dir
from airlock.types import PolicyInfo, Verdict
from airlock.v1 import sandbox_pb2 as pb
from tests.helpers import Daemon, running_daemon

DANGEROUS = ("sudo reboot", "insmod rootkit.ko", ":(){ :|:& };:")


def policy_info(socket: str) -> PolicyInfo:
    with grpc.insecure_channel("unix:" + socket) as channel:
        call = channel.unary_unary(
            "/airlock.v1.SandboxService/GetPolicy",
            request_serializer=pb.GetPolicyRequest.SerializeToString,
            response_deserializer=pb.GetPolicyResponse.FromString,
        )
        return convert.policy_from_proto(call(pb.GetPolicyRequest(), timeout=10))


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def verdicts(c: Client) -> list[Verdict]:
    return [c.validate(command, cwd="/tmp").verdict for command in DANGEROUS]


@pytest.fixture
def policy_daemon(public_tmp: Path) -> Iterator[tuple[Daemon, Path]]:
    policy = public_tmp / "policy"
    shutil.copytree(default_policy_dir(), policy)
    with running_daemon(public_tmp, "--policy-dir", str(policy)) as d:
        yield d, policy


def test_a_deleted_rule_file_is_refused_and_the_old_bundle_kept(
    policy_daemon: tuple[Daemon, Path],
) -> None:
    d, policy = policy_daemon
    first = policy_info(d.socket)
    with d.client() as c:
        assert verdicts(c) == [Verdict.DENY] * 3
        (policy / "system.yaml").unlink()
        d.proc.send_signal(signal.SIGHUP)  # a reload asked for while the file goes away
        wait_for(lambda: policy_info(d.socket).last_reload_refused)
        info = policy_info(d.socket)
        assert info.version == first.version and info.files == first.files
        assert info.files_removed == ("system.yaml",)
        assert {"sys.power-state", "sys.kernel-modules", "sys.fork-bomb"} <= set(info.rules_removed)
        assert ACCEPT_FILE in info.last_reload_error
        assert info.last_reload_version not in ("", first.version)
        assert verdicts(c) == [Verdict.DENY] * 3
    assert "policy reload REFUSED" in d.log()


def test_a_file_cut_short_is_refused(policy_daemon: tuple[Daemon, Path]) -> None:
    """A half-written save that stays half-written: what it drops is refused."""
    d, policy = policy_daemon
    first = policy_info(d.socket)
    text = (policy / "system.yaml").read_text()
    cut = text.index("  - id: sys.fork-bomb\n")
    lost = tuple(sorted(re.findall(r"^  - id: (\S+)$", text[cut:], re.MULTILINE)))
    (policy / "system.yaml").write_text(text[:cut])
    wait_for(lambda: policy_info(d.socket).last_reload_refused)
    info = policy_info(d.socket)
    assert info.version == first.version
    assert "sys.fork-bomb" in lost and info.rules_removed == lost
    with d.client() as c:
        assert verdicts(c) == [Verdict.DENY] * 3


def test_a_slow_save_is_waited_out(policy_daemon: tuple[Daemon, Path]) -> None:
    """A save written in pieces over a second and a half: no piece is ever loaded (each
    would be rejected or refused), the finished file is."""
    d, policy = policy_daemon
    first = policy_info(d.socket)
    with d.client() as c:
        # Judged (and remembered, core.engine.StaticMemo) under the old bundle: not denied.
        for _ in range(2):
            assert c.validate("cowsay hi", cwd="/tmp").verdict is not Verdict.DENY
    extra = (
        "  - id: test.no-cowsay\n    title: No cowsay\n    description: A test rule.\n"
        "    decision: deny\n    severity: low\n    match:\n      argv0: [cowsay]\n"
        '    tests:\n      match: ["cowsay hi"]\n      not_match: ["echo hi"]\n'
    )
    full = (policy / "system.yaml").read_text() + extra
    path = policy / "system.yaml"
    with open(path, "w") as f:  # truncated, then written a piece at a time, as an editor may
        for k in range(1, 31):
            f.write(full[len(full) * (k - 1) // 30 : len(full) * k // 30])
            f.flush()
            time.sleep(0.05)
    wait_for(lambda: "test.no-cowsay" in policy_info(d.socket).rules_added)
    info = policy_info(d.socket)
    assert not info.last_reload_refused and info.version != first.version
    assert "reload rejected" not in d.log() and "reload REFUSED" not in d.log()
    with d.client() as c:
        assert verdicts(c) == [Verdict.DENY] * 3
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.DENY


def test_an_intended_removal_is_accepted_by_the_operator_and_audited(
    policy_daemon: tuple[Daemon, Path],
) -> None:
    d, policy = policy_daemon
    first = policy_info(d.socket)
    (policy / "vcs-and-publishing.yaml").unlink()
    wait_for(lambda: policy_info(d.socket).last_reload_refused)
    refused = policy_info(d.socket)
    assert refused.version == first.version

    # The operator accepts exactly the bundle on disk; the daemon reloads on its own.
    (policy / ACCEPT_FILE).write_text(
        f"{refused.last_reload_version}\nvcs rules move to the team bundle\n"
    )
    wait_for(lambda: policy_info(d.socket).version == refused.last_reload_version)
    info = policy_info(d.socket)
    assert not info.last_reload_refused and info.last_reload_error == ""
    assert info.files_removed == ("vcs-and-publishing.yaml",)
    assert info.rules_removed == refused.rules_removed and info.rules_removed
    assert not (policy / ACCEPT_FILE).exists()  # good for one bundle, once

    with d.client() as c:
        events = [e.event for e in c.audit_events(AuditFilter())]
        [accepted] = [e for e in events if e.kind is RpcKind.POLICY]
        assert accepted.caller.uid == os.getuid() and accepted.cwd == str(policy)
        assert f"-> {refused.last_reload_version}" in accepted.effects
        assert "vcs-and-publishing.yaml" in accepted.effects
        assert "note: vcs rules move to the team bundle" in accepted.effects
        assert c.verify_audit_log().ok
        assert verdicts(c) == [Verdict.DENY] * 3  # what stays is still in force
    assert "policy removals accepted by the operator" in d.log()


@pytest.mark.soak
def test_a_sighup_storm_neither_wedges_the_daemon_nor_stops_sigterm(public_tmp: Path) -> None:
    """SOAK_SIGHUPS (default 2,000) SIGHUPs in a tight loop, health asked every 100 of them
    and all the while from a second thread; then SIGTERM ends the daemon in its normal
    shutdown (running_daemon asserts exit status 0 within 30 s)."""
    count = int(os.environ.get("SOAK_SIGHUPS", "2000"))
    with running_daemon(public_tmp) as d, d.client() as c:
        answered: list[bool] = []
        storming = threading.Event()
        storming.set()

        def health() -> None:
            with d.client() as c2:
                while storming.is_set():
                    answered.append(c2.health())

        probe = threading.Thread(target=health)
        probe.start()
        slowest = 0.0
        try:
            for i in range(count):
                os.kill(d.proc.pid, signal.SIGHUP)
                if i % 10 == 9:
                    # Pending SIGHUPs merge into one: a breath now and then makes each burst
                    # a separate delivery (the old handler deadlocked ~1 run in 3 this way,
                    # ~1 in 10 with no pause at all).
                    time.sleep(0.001)
                if i % 100 == 99:
                    t0 = time.monotonic()
                    assert c.health(), f"health after {i + 1} SIGHUPs"
                    slowest = max(slowest, time.monotonic() - t0)
        finally:
            storming.clear()
            probe.join(timeout=30)
        assert answered and all(answered)
        # Still serving and judging after the storm, and its reloads coalesced.
        assert c.health()
        assert c.validate("sudo reboot", cwd="/tmp").verdict is Verdict.DENY
        wait_for(lambda: "policy reloaded" in d.log())
        reloads = d.log().count("policy reloaded")
        print(f"{count} SIGHUPs: {reloads} reloads, slowest health {slowest * 1000:.1f} ms")
        assert reloads < count // 10
    assert d.proc.returncode == 0
    assert "stopped" in d.log()
