"""Validate end to end: a real daemon, real namespaces, real overlayfs, real cgroups."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from airlock import Cancelled, InvalidRequest, PermissionDenied
from airlock.client import Client
from airlock.types import ChangeKind, FileType, Termination, Verdict
from tests.helpers import NEUTRAL_POLICY, Daemon, run_client_as

# These tests are about the sandbox and the daemon: every command must reach the dry run.
DAEMON_ARGS = NEUTRAL_POLICY


def tree_digest(root: Path) -> str:
    """A checksum of every path, type, mode, owner, symlink target and content under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


def by_path(changes: tuple, base: Path) -> dict[str, object]:
    prefix = str(base) + "/"
    return {
        c.path.decode()[len(prefix) :]: c for c in changes if c.path.decode().startswith(prefix)
    }


def test_tour_example(client: Client, workspace: Path) -> None:
    (workspace / "old.log").write_text("old\n")
    v = client.validate("echo hi > notes.txt; rm -f old.log", cwd=str(workspace))
    assert v.verdict is Verdict.ALLOW
    assert v.termination is Termination.EXITED and v.exit_code == 0
    changes = by_path(v.changes, workspace)
    assert set(changes) == {"notes.txt", "old.log"}
    assert changes["notes.txt"].kind is ChangeKind.CREATED
    assert changes["notes.txt"].sha256_after == hashlib.sha256(b"hi\n").hexdigest()
    assert "+hi" in changes["notes.txt"].unified_diff
    assert changes["old.log"].kind is ChangeKind.DELETED
    assert changes["old.log"].size_before == 4
    assert "created 1 file (notes.txt)" in v.summary and "deleted 1 file (old.log)" in v.summary
    # The host never changed.
    assert not (workspace / "notes.txt").exists()
    assert (workspace / "old.log").read_text() == "old\n"
    assert v.validation_id and v.timings.total_s > 0 and v.sandboxed


def test_every_change_kind_exactly_as_made(client: Client, workspace: Path, tmp_path: Path) -> None:
    ws = workspace
    (ws / "modify.txt").write_text("one\ntwo\n")
    (ws / "delete.txt").write_text("bye\n")
    (ws / "chmod.sh").write_text("#!/bin/sh\n")
    (ws / "touch.txt").write_text("same\n")
    (ws / "gone").mkdir()
    (ws / "gone" / "a").write_text("a")
    (ws / "gone" / "b").write_text("b")
    (ws / "replaced").mkdir()
    (ws / "replaced" / "old").write_text("old")
    (ws / "link").symlink_to("modify.txt")
    (ws / "bin.dat").write_bytes(b"\0\1\2")
    os.chmod(ws / "chmod.sh", 0o644)
    outside = tmp_path / "outside"
    outside.mkdir()
    before_ws, before_out = tree_digest(ws), tree_digest(outside)

    command = "; ".join(
        [
            "set -e",
            "echo new > created.txt",
            "mkdir -p newdir/sub && echo x > newdir/sub/f",
            "echo three >> modify.txt",
            "rm delete.txt",
            "chmod 755 chmod.sh",
            "touch touch.txt",
            "rm -rf gone",
            "rm -rf replaced && mkdir replaced && echo new > replaced/new",
            "ln -sfn created.txt link",
            "printf '\\0\\7' > bin.dat",
            "mkfifo fifo",
            f"echo out > {outside}/written.txt",
        ]
    )
    v = client.validate(command, cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    c = by_path(v.changes, ws)
    expected = {
        "created.txt": (ChangeKind.CREATED, FileType.REGULAR),
        "newdir": (ChangeKind.CREATED, FileType.DIRECTORY),
        "newdir/sub": (ChangeKind.CREATED, FileType.DIRECTORY),
        "newdir/sub/f": (ChangeKind.CREATED, FileType.REGULAR),
        "modify.txt": (ChangeKind.MODIFIED, FileType.REGULAR),
        "delete.txt": (ChangeKind.DELETED, FileType.REGULAR),
        "chmod.sh": (ChangeKind.METADATA_CHANGED, FileType.REGULAR),
        "gone": (ChangeKind.DELETED, FileType.DIRECTORY),
        "replaced/old": (ChangeKind.DELETED, FileType.REGULAR),
        "replaced/new": (ChangeKind.CREATED, FileType.REGULAR),
        "link": (ChangeKind.MODIFIED, FileType.SYMLINK),
        "bin.dat": (ChangeKind.MODIFIED, FileType.REGULAR),
        "fifo": (ChangeKind.CREATED, FileType.OTHER),
    }
    got = {p: (ch.kind, ch.file_type) for p, ch in c.items()}
    assert got == expected, got
    assert "touch.txt" not in c  # an mtime-only change is not a change
    assert c["modify.txt"].size_before == 8 and c["modify.txt"].size_after == 14
    assert "+three" in c["modify.txt"].unified_diff
    assert (c["chmod.sh"].mode_before, c["chmod.sh"].mode_after) == (0o644, 0o755)
    assert c["gone"].entries_deleted == 2
    assert c["link"].symlink_target == b"created.txt"
    assert c["bin.dat"].binary and not c["bin.dat"].unified_diff
    assert all(ch.in_workspace for ch in c.values())
    out = [ch for ch in v.changes if ch.path == str(outside / "written.txt").encode()]
    assert len(out) == 1 and not out[0].in_workspace
    assert v.verdict is Verdict.ASK  # a change outside the workspace asks
    assert [f.rule_id for f in v.findings] == ["builtin.change-outside-workspace"]
    paths = [ch.path for ch in v.changes]
    assert paths == sorted(paths)
    # The host is byte-identical afterwards.
    assert tree_digest(ws) == before_ws and tree_digest(outside) == before_out


def test_changes_outside_workspace_anywhere_are_captured(client: Client, workspace: Path) -> None:
    v = client.validate(
        "echo x > /etc/airlock-test-file; mkdir -p /root/.airlock-test; rm -f /etc/hostname",
        cwd=str(workspace),
    )
    paths = {ch.path: ch.kind for ch in v.changes}
    assert paths[b"/etc/airlock-test-file"] is ChangeKind.CREATED
    assert paths[b"/root/.airlock-test"] is ChangeKind.CREATED
    assert paths[b"/etc/hostname"] is ChangeKind.DELETED
    assert v.verdict is Verdict.ASK
    assert not os.path.exists("/etc/airlock-test-file") and os.path.exists("/etc/hostname")


def test_no_sandbox_noise_in_diff(client: Client, workspace: Path) -> None:
    v = client.validate("ls /proc /dev /sys >/dev/null; echo hi > /dev/null", cwd=str(workspace))
    assert v.exit_code == 0 and v.changes == ()
    assert v.summary.endswith("Changed no files.")


def test_sandbox_environment(client: Client, workspace: Path) -> None:
    v = client.validate(
        "hostname; echo pids=$(ls /proc | grep -c '^[0-9]'); ls /dev | tr '\\n' ' '; echo;"
        "touch /sys/x 2>&1 | grep -c 'Read-only'; cat; echo stdin-done;"
        "echo \"env=$(env | sort | tr '\\n' ' ')\"",
        cwd=str(workspace),
        env={"GREETING": "hello"},
    )
    lines = v.stdout.decode().splitlines()
    assert lines[0] == "airlock"
    assert int(lines[1].split("=")[1]) <= 5  # only the sandbox's own processes are visible
    devs = set(lines[2].split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm"} <= devs
    assert not {"sda", "vda", "mem", "kmsg"} & devs
    assert lines[3] == "1"  # /sys is read-only
    assert lines[4] == "stdin-done"  # stdin is empty
    env = dict(kv.split("=", 1) for kv in lines[5].removeprefix("env=").split())
    assert env["GREETING"] == "hello"
    assert env["PATH"].startswith("/usr/local/sbin")
    assert not any(k.startswith("AIRLOCK") for k in env)  # never the daemon's environment


def test_network_is_loopback_only_and_host_listeners_get_nothing(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(0.5)
    port = tcp.getsockname()[1]
    unix_path = str(tmp_path / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    unix.settimeout(0.5)
    try:
        probe = (
            f"import socket\n"
            f"targets = ((socket.AF_INET, ('127.0.0.1', {port})),\n"
            f"           (socket.AF_UNIX, {unix_path!r}))\n"
            f"for fam, addr in targets:\n"
            f"    s = socket.socket(fam)\n"
            f"    try:\n"
            f"        s.connect(addr); s.sendall(b'leak'); print('connected')\n"
            f"    except OSError as e:\n"
            f"        print('refused', e.errno)\n"
        )
        v = client.validate(
            f'ip -brief link 2>/dev/null || cat /proc/net/dev; python3 -c "{probe}"',
            cwd=str(workspace),
        )
        out = v.stdout.decode()
        assert out.count("refused") == 2 and "connected" not in out, out
        for listener in (tcp, unix):
            with pytest.raises(TimeoutError):
                listener.accept()
        assert "eth" not in out and "ens" not in out  # only loopback exists
    finally:
        tcp.close()
        unix.close()


def test_timeout_kills_detached_grandchildren(client: Client, workspace: Path) -> None:
    marker = f"{time.time_ns() % 1000}.{os.getpid()}"
    v = client.validate(
        f"setsid sh -c 'sleep 1{marker}' & nohup sleep 2{marker} >/dev/null 2>&1 &"
        f" echo started; sleep 3{marker}",
        cwd=str(workspace),
        timeout=1,
    )
    assert v.termination is Termination.TIMED_OUT
    assert v.stdout == b"started\n"
    assert v.verdict is Verdict.ASK  # an unfinished dry run cannot be trusted to be complete
    assert "Timed out after 1 s" in v.summary
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert left == "", f"processes outlived the sandbox: {left}"


def test_daemonized_process_dies_when_command_exits(client: Client, workspace: Path) -> None:
    marker = f"4{time.time_ns() % 1000}.{os.getpid()}"
    v = client.validate(
        f"setsid sleep {marker} >/dev/null 2>&1 < /dev/null & exit 3", cwd=str(workspace)
    )
    assert v.termination is Termination.EXITED and v.exit_code == 3
    assert subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout == b""


def test_signal_termination(client: Client, workspace: Path) -> None:
    v = client.validate("kill -SEGV $$", cwd=str(workspace))
    assert v.termination is Termination.SIGNALED and v.signal == 11 and v.exit_code == -1


def test_output_is_capped(client: Client, workspace: Path) -> None:
    v = client.validate("head -c 200000 /dev/zero; head -c 10 /dev/zero >&2", cwd=str(workspace))
    assert len(v.stdout) == 64 * 1024 and v.stdout_truncated
    assert v.stderr == b"\0" * 10 and not v.stderr_truncated
    assert v.exit_code == 0  # the command was drained, not blocked or killed


def test_scratch_space_is_bounded(client: Client, workspace: Path) -> None:
    v = client.validate("head -c 100M /dev/zero > big; echo rc=$?", cwd=str(workspace))
    assert b"No space left on device" in v.stderr
    assert b"rc=1" in v.stdout
    assert not (workspace / "big").exists()


def test_fork_bomb_is_contained(client: Client, workspace: Path) -> None:
    v = client.validate("bomb() { bomb | bomb & }; bomb; sleep 2", cwd=str(workspace), timeout=4)
    assert v.resource_usage.pids_limit_hit
    assert client.validate("echo alive", cwd=str(workspace)).stdout == b"alive\n"


def test_memory_hog_is_killed(client: Client, workspace: Path) -> None:
    v = client.validate(
        f"{sys.executable} -c 'b = bytearray(600 * 1024 * 1024); print(len(b))'",
        cwd=str(workspace),
        timeout=20,
    )
    assert v.termination is Termination.OUT_OF_MEMORY, (v.termination, v.stderr)
    assert v.resource_usage.memory_limit_hit
    assert client.validate("echo alive", cwd=str(workspace)).stdout == b"alive\n"


def test_non_root_caller_runs_as_itself(daemon: Daemon, public_tmp: Path) -> None:
    tmp_path = public_tmp
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    ws = tmp_path / "nobody-ws"
    ws.mkdir()
    os.chown(ws, 65534, 65534)
    proc = run_client_as(
        f"with Client({daemon.socket!r}) as c:\n"
        f"    v = c.validate('id -u; cat {secret}; touch mine', cwd={str(ws)!r})\n"
        "    out = {'stdout': v.stdout.decode(), 'stderr': v.stderr.decode(), 'uid': v.uid,\n"
        "           'owner': [ch.uid_after for ch in v.changes]}\n"
        "    try:\n"
        "        c.validate('id -u', cwd='/', uid=0)\n"
        "    except AirlockError as e:\n"
        "        out['escalate'] = type(e).__name__\n"
        "print(json.dumps(out))\n"
    )
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["stdout"].splitlines() == ["65534"]
    assert "Permission denied" in out["stderr"]
    assert out["uid"] == 65534 and out["owner"] == [65534]
    assert out["escalate"] == "PermissionDenied"


def test_root_caller_may_choose_uid(client: Client, workspace: Path) -> None:
    v = client.validate("id -u; id -g", cwd="/tmp", uid=65534)
    assert v.stdout.split() == [b"65534", b"65534"] and v.uid == 65534
    # The chosen user gets no more access than it has: pytest's tmp root is 0700 root.
    with pytest.raises(InvalidRequest) as info:
        client.validate("true", cwd=str(workspace), uid=65534)
    assert info.value.reason == "CWD_NOT_ACCESSIBLE"


def test_no_capabilities_and_no_new_privs(client: Client, workspace: Path) -> None:
    v = client.validate(
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status", cwd=str(workspace)
    )
    fields = dict(line.split(":\t") for line in v.stdout.decode().splitlines())
    assert fields == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1"}


BAD_INPUTS = [
    ({"command": ""}, "command"),
    ({"command": "   "}, "command"),
    ({"command": "echo a\0b"}, "command"),
    ({"command": "x" * (128 * 1024 + 1)}, "command"),
    ({"cwd": "relative/dir"}, "cwd"),
    ({"cwd": "/no/such/dir/anywhere"}, "cwd"),
    ({"cwd": "/etc/hostname"}, "cwd"),
    ({"cwd": "/proc"}, "cwd"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"env": {"A\0B": "x"}}, "env"),
    ({"env": {"": "x"}}, "env"),
    ({"env": {"A": "x\0y"}}, "env"),
    ({"timeout": -1.0}, "timeout"),
    ({"timeout": 10_000.0}, "timeout"),
    ({"uid": 4_000_000}, "uid"),
]


@pytest.mark.parametrize(("override", "field"), BAD_INPUTS)
def test_bad_input_is_rejected_clearly(
    client: Client, workspace: Path, override: dict, field: str
) -> None:
    args = {"command": "echo ok > f", "cwd": str(workspace), **override}
    command = args.pop("command")
    with pytest.raises(InvalidRequest) as info:
        client.validate(command, **args)
    assert info.value.message.startswith(f"{field}:"), info.value.message
    assert "Traceback" not in info.value.message
    assert info.value.reason != "INVALID_ARGUMENT" or field in ("uid",)
    assert client.validate("echo ok", cwd=str(workspace)).stdout == b"ok\n"  # still serving


def test_cancel_kills_the_sandbox(daemon: Daemon, workspace: Path) -> None:
    marker = f"5{time.time_ns() % 1000}.{os.getpid()}"
    with Client(daemon.socket, timeout=1.0) as c, pytest.raises(Exception) as info:
        c.validate(f"sleep {marker}", cwd=str(workspace))
    assert "deadline" in str(info.value).lower() or isinstance(info.value, Cancelled)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout == b"":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the cancelled command's processes are still running")


def test_concurrent_validations(client: Client, workspace: Path) -> None:
    results: list[bytes] = []

    def run(i: int) -> None:
        results.append(client.validate(f"echo {i} > f{i}; cat f{i}", cwd=str(workspace)).stdout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"{i}\n".encode() for i in range(8))


def test_identity_cannot_be_forged_on_the_internal_socket(daemon: Daemon) -> None:
    internal = os.path.join(daemon.state_dir, "private", "grpc.sock")
    assert stat.S_IMODE(os.stat(os.path.dirname(internal)).st_mode) == 0o700
    from airlock.client._client import Client as RawClient

    with RawClient(internal) as c, pytest.raises(PermissionDenied):
        c.validate("true", cwd="/")


def test_process_tree_is_recorded(client: Client, workspace: Path) -> None:
    """Every process appears: short-lived ones, a detached daemon, exit codes and signals."""
    v = client.validate(
        "for i in 1 2 3; do /bin/true; done; sh -c 'exit 3'; (setsid sleep 30 &); "
        # wait (on the sandbox's own /proc) until the detached child has exec'd sleep
        "until pgrep -x sleep >/dev/null; do :; done; "
        "sh -c 'kill -TERM $$'; echo done",
        cwd=str(workspace),
        timeout=20,
    )
    assert v.stdout == b"done\n" and not v.processes_truncated
    argvs = [p.argv for p in v.processes]
    assert argvs.count((b"/bin/true",)) == 3
    by_argv = {p.argv: p for p in v.processes}
    assert by_argv[(b"sh", b"-c", b"exit 3")].exit_code == 3
    killed = by_argv[(b"sh", b"-c", b"kill -TERM $$")]
    assert killed.signal == 15 and killed.exit_code is None
    daemon = by_argv[(b"sleep", b"30")]
    assert daemon.outlived_command and daemon.signal == 9  # the sandbox killed it at the end
    root = v.processes[0]
    assert root.argv[:2] == (b"/bin/bash", b"-c") and root.ppid == 1
    assert all(p.uid == 0 for p in v.processes)
    assert all(p.cwd == str(workspace).encode() for p in v.processes if p.argv == (b"/bin/true",))
    starts = [p.started_s for p in v.processes]
    assert all(s is not None for s in starts) and starts == sorted(starts)  # type: ignore[type-var]


def test_process_tree_marks_processes_killed_by_the_timeout(
    client: Client, workspace: Path
) -> None:
    v = client.validate("sleep 30 & sleep 31", cwd=str(workspace), timeout=1)
    assert v.termination is Termination.TIMED_OUT
    sleeps = [p for p in v.processes if p.argv and p.argv[0] == b"sleep"]
    assert len(sleeps) == 2 and all(p.killed_by_timeout for p in sleeps)


def test_command_starts_with_default_signal_dispositions(client: Client, workspace: Path) -> None:
    """Nothing the daemon or its helper ignores may leak into the command."""
    v = client.validate(
        "grep -E '^(SigIgn|SigBlk)' /proc/self/status; sh -c 'kill -TERM $$; echo survived'; "
        "echo rc=$?; timeout -s TERM 0.2 sleep 5; echo timeout_rc=$?",
        cwd=str(workspace),
    )
    out = v.stdout.decode()
    fields = dict(line.split(":\t") for line in out.splitlines() if line.startswith("Sig"))
    # Signals 32 and 33 are glibc's own (NPTL): its sigaction refuses them, so a disposition
    # inherited for them cannot be reset from Python; glibc programs install their own.
    glibc_reserved = (1 << 31) | (1 << 32)
    assert int(fields["SigIgn"], 16) & ~glibc_reserved == 0, fields
    assert int(fields["SigBlk"], 16) == 0, fields
    assert "survived" not in out and "rc=143" in out and "timeout_rc=124" in out


def test_sensitive_reads_are_recorded(client: Client, workspace: Path) -> None:
    (workspace / ".env").write_text("TOKEN=x\n")
    (workspace / "notes.txt").write_text("plain\n")
    v = client.validate(
        # ~/.aws/credentials is created in the sandbox only (root's home is /root here)
        "mkdir -p ~/.aws && echo k > ~/.aws/credentials; cat ~/.aws/credentials .env notes.txt "
        "/etc/shadow > /dev/null",
        cwd=str(workspace),
    )
    paths = {r.path for r in v.sensitive_reads}
    assert {b"/root/.aws/credentials", str(workspace / ".env").encode(), b"/etc/shadow"} <= paths
    assert str(workspace / "notes.txt").encode() not in paths
    cat = next(r for r in v.sensitive_reads if r.path == b"/etc/shadow")
    assert cat.argv and cat.argv[0] == b"cat" and cat.pid and cat.pid > 1
    assert v.verdict is Verdict.ASK
    assert "builtin.sensitive-read" in [f.rule_id for f in v.findings]
    assert "Read /etc/shadow" in v.summary or "/etc/shadow" in v.summary
    assert (
        not os.path.exists("/root/.aws/credentials")
        or os.path.getsize("/root/.aws/credentials") != 2
    )  # the host's file (if any) was not written by the sandbox


def test_summary_names_the_programs_not_the_shell(client: Client, workspace: Path) -> None:
    (workspace / "old.log").write_text("x\n")
    v = client.validate("echo hi > notes.txt; rm -f old.log", cwd=str(workspace))
    assert "Ran 1 program (rm)." in v.summary, v.summary
