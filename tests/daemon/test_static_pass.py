"""The static pass in the daemon: verdict merge, skipped dry runs, GetPolicy and reloads."""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from airlock.client import Client
from airlock.types import ChangeKind, DryRunSkip, FindingSource, Verdict
from airlock.v1 import sandbox_pb2 as pb
from tests.helpers import Daemon, running_daemon


def test_static_deny_skips_the_dry_run(client: Client, workspace: Path) -> None:
    command = "echo start; sudo rm -rf --no-preserve-root /"
    v = client.validate(command, cwd=str(workspace))
    assert v.verdict is Verdict.DENY
    assert not v.sandboxed and v.dry_run_skip is DryRunSkip.STATIC_DENY
    assert v.stdout == b"" and v.changes == ()
    deny = [f for f in v.findings if f.verdict is Verdict.DENY]
    assert deny and all(f.source is FindingSource.STATIC for f in deny)
    top = deny[0]
    assert command.encode()[top.span[0] : top.span[1]].decode() == top.subcommand
    assert "rm" in top.subcommand
    assert v.summary.startswith("Not run: the static pass denies it.")
    assert top.rule_id in v.summary
    assert v.policy_version and v.static.command_count >= 2


def test_force_dry_run_runs_a_denied_command_in_the_sandbox(
    client: Client, workspace: Path
) -> None:
    before = sorted(os.listdir("/etc"))
    v = client.validate("rm -rf /etc", cwd=str(workspace), force_dry_run=True)
    assert v.verdict is Verdict.DENY and v.sandboxed
    assert v.dry_run_skip is DryRunSkip.NONE
    # Root without capabilities cannot remove files other users own (postgres's, ...), so
    # /etc itself may survive; what could be deleted, was, in the sandbox only.
    deleted = [c for c in v.changes if c.path.startswith(b"/etc/")]
    assert len(deleted) > 10 and all(c.kind is ChangeKind.DELETED for c in deleted)
    assert sorted(os.listdir("/etc")) == before  # the host is untouched


def test_read_only_fast_path(client: Client, workspace: Path) -> None:
    v = client.validate("ls -la | grep -c . && git status --short 2>/dev/null", cwd=str(workspace))
    assert v.verdict is Verdict.ALLOW
    assert not v.sandboxed and v.dry_run_skip is DryRunSkip.READ_ONLY
    assert v.static.read_only and v.static.command_names[:2] == ("ls", "grep")
    assert "Not run: read-only" in v.summary


def test_writing_redirect_is_not_read_only(client: Client, workspace: Path) -> None:
    v = client.validate("ls -la > listing.txt", cwd=str(workspace))
    assert v.sandboxed and not v.static.read_only
    assert [c.path for c in v.changes] == [str(workspace / "listing.txt").encode()]


def test_static_ask_merges_with_the_dry_run(client: Client, workspace: Path) -> None:
    # (Not `git reset --hard`: the dry run's lost-work check now decides that one.)
    v = client.validate("kill 999999 2>/dev/null; echo done", cwd=str(workspace))
    assert v.sandboxed and v.stdout == b"done\n"
    assert v.verdict is Verdict.ASK
    assert any(f.source is FindingSource.STATIC and f.verdict is Verdict.ASK for f in v.findings)
    assert "Policy asks:" in v.summary


def test_dynamic_finding_raises_a_statically_silent_command(
    client: Client, workspace: Path
) -> None:
    """What static analysis cannot see, the dry run does."""
    v = client.validate(
        "python3 -c \"open('/etc/airlock-static-test', 'w').write('x')\"", cwd=str(workspace)
    )
    # The static pass only asks about `python3 -c` at most; writing /etc is what denies.
    assert all(f.verdict < Verdict.DENY for f in v.findings if f.source is FindingSource.STATIC)
    assert v.sandboxed and v.verdict is Verdict.DENY
    assert any(
        f.source is FindingSource.DYNAMIC and f.rule_id == "effect.system-write" for f in v.findings
    )


def test_parse_error_fails_closed(client: Client, workspace: Path) -> None:
    v = client.validate("echo 'unterminated", cwd=str(workspace))
    assert v.verdict in (Verdict.ASK, Verdict.DENY)
    assert any(f.rule_id == "parse.error" for f in v.findings)


def test_get_policy(daemon: Daemon, client: Client) -> None:
    info = _policy_info(daemon.socket)
    assert info.rule_count > 50 and len(info.version) == 64
    assert info.directory.endswith("airlock/policy/default") and info.files
    assert info.last_reload_error == ""
    assert client.validate("true", cwd="/tmp").policy_version == info.version


def _policy_info(socket: str) -> pb.GetPolicyResponse:
    with grpc.insecure_channel("unix:" + socket) as channel:
        call = channel.unary_unary(
            "/airlock.v1.SandboxService/GetPolicy",
            request_serializer=pb.GetPolicyRequest.SerializeToString,
            response_deserializer=pb.GetPolicyResponse.FromString,
        )
        return call(pb.GetPolicyRequest(), timeout=10)  # type: ignore[no-any-return]


RULE = """\
version: 1
rules:
  - id: test.no-cowsay
    title: No cowsay
    description: A test rule.
    decision: {decision}
    severity: low
    match:
      argv0: [cowsay]
    tests:
      match: ["cowsay hi"]
      not_match: ["echo hi"]
"""


def _wait_for(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_policy_reloads_on_change_and_rejects_a_bad_bundle(public_tmp: Path) -> None:
    policy = public_tmp / "policy"
    policy.mkdir()
    (policy / "rules.yaml").write_text(RULE.format(decision="ask"))
    with running_daemon(public_tmp, "--policy-dir", str(policy)) as d, d.client() as c:
        first = _policy_info(d.socket)
        assert first.rule_count == 1
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.ASK

        # A file change: the whole bundle is validated, then swapped in.
        (policy / "rules.yaml").write_text(RULE.format(decision="deny"))
        _wait_for(lambda: _policy_info(d.socket).version != first.version)
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.DENY

        # A bad bundle (its inline test fails) is rejected; the previous one stays.
        good = _policy_info(d.socket)
        bad = RULE.format(decision="deny").replace(
            'not_match: ["echo hi"]', 'not_match: ["cowsay x"]'
        )
        (policy / "rules.yaml").write_text(bad)
        _wait_for(lambda: _policy_info(d.socket).last_reload_error != "")
        info = _policy_info(d.socket)
        assert info.version == good.version and "inline test" in info.last_reload_error
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.DENY

        # SIGHUP reloads on demand.
        (policy / "rules.yaml").write_text(RULE.format(decision="ask"))
        d.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: _policy_info(d.socket).last_reload_error == "")
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.ASK
    assert "policy reload rejected" in d.log()


def test_the_daemon_checks_the_schema_in_a_child(public_tmp: Path) -> None:
    """jsonschema (7 MiB with its validators) is never imported by the daemon: its policy is
    checked against the schema in a short-lived child, at start and at each reload."""
    policy = public_tmp / "policy"
    policy.mkdir()
    (policy / "rules.yaml").write_text(RULE.format(decision="deny"))
    with running_daemon(public_tmp, "--policy-dir", str(policy)) as d, d.client() as c:
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.DENY
        (policy / "rules.yaml").write_text(RULE.format(decision="maybe"))  # the schema refuses
        d.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "'maybe' is not one of" in _policy_info(d.socket).last_reload_error)
        assert c.validate("cowsay hi", cwd="/tmp").verdict is Verdict.DENY  # the old policy
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    # jsonschema's references library is built on rpds, a compiled module: mapped if imported.
    assert "rpds" not in maps and "_yaml" in maps  # (a compiled module it does import)


def test_invalid_policy_at_start_stops_the_daemon(public_tmp: Path) -> None:
    policy = public_tmp / "policy"
    policy.mkdir()
    (policy / "rules.yaml").write_text(
        textwrap.dedent("""\
        version: 1
        rules:
          - id: broken
            title: x
            decision: maybe
    """)
    )
    with (
        pytest.raises(RuntimeError, match="the policy is invalid"),
        running_daemon(public_tmp, "--policy-dir", str(policy)),
    ):
        pass
    shutil.rmtree(policy)
