"""Request limits at their exact boundaries, and dry runs a limit cut short, through a real
daemon (issue 15, items 8 and 7).

Whatever the request check accepts must run (no E2BIG, no "template too large", no
INTERNAL); one byte more is INVALID_ARGUMENT naming the field. The limits are the kernel's
own: MAX_ARG_STRLEN for bash's ``-c`` argument and each ``NAME=value`` (131,072 bytes with
the NUL), PATH_MAX for the working directory (4,096 bytes with the NUL).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock import InvalidRequest
from airlock.client import Client
from airlock.core.request import MAX_ARG_STRLEN, MAX_CWD_BYTES
from airlock.types import ExecFinished, ExecOutput, Termination, Validation, Verdict
from tests.helpers import NEUTRAL_POLICY, TEST_LIMITS, Daemon, public_dir, running_daemon

DAEMON_ARGS = NEUTRAL_POLICY

MAX_COMMAND = MAX_ARG_STRLEN - 1  # 131,071
MAX_ENV_TOTAL = 256 * 1024  # the daemon's default env_bytes: NAME=value and a NUL each


def command_of(size: int) -> str:
    """A command of exactly ``size`` bytes that writes a file (so it is dry-run) and says so."""
    head = "echo ran > out.txt; echo ok #"
    return head + "x" * (size - len(head))


@pytest.fixture
def deep_cwd(tmp_path: Path) -> Iterator[Path]:
    """A directory 1,000 levels below a /tmp workspace (Execute makes its /tmp private and
    recreates the path to the workspace in it, one directory per level)."""
    os.chmod(tmp_path, 0o755)
    path = str(tmp_path / "deep")
    os.mkdir(path)
    for _ in range(1000):
        path += "/d"
        os.mkdir(path)
    yield Path(path)
    # Python's rmtree recurses once per level: rm does not.
    subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)


def test_capabilities_report_the_command_limit(client: Client) -> None:
    assert client.capabilities().limits.command_bytes == MAX_COMMAND == 131_071


def test_command_of_exactly_the_limit_runs(client: Client, workspace: Path) -> None:
    command = command_of(MAX_COMMAND)
    assert len(command.encode()) == 131_071
    v = client.validate(command, cwd=str(workspace))
    assert v.sandboxed and v.exit_code == 0 and v.stdout == b"ok\n", v.summary
    assert [c.path for c in v.changes] == [os.fsencode(workspace / "out.txt")]
    events = list(client.execute(command, cwd=str(workspace)))
    end = events[-1]
    assert isinstance(end, ExecFinished) and end.exit_code == 0
    assert (workspace / "out.txt").read_text() == "ran\n"


def test_command_one_byte_over_is_invalid_argument(client: Client, workspace: Path) -> None:
    command = command_of(MAX_COMMAND + 1)
    with pytest.raises(InvalidRequest) as info:
        client.validate(command, cwd=str(workspace))
    assert info.value.reason == "COMMAND_TOO_LARGE"
    assert "131072 bytes; the limit is 131071" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        list(client.execute(command, cwd=str(workspace)))
    assert info.value.reason == "COMMAND_TOO_LARGE"
    assert not (workspace / "out.txt").exists()
    # A multi-byte character counts as its UTF-8 bytes.
    with pytest.raises(InvalidRequest):
        client.validate(command_of(MAX_COMMAND - 1) + "é", cwd=str(workspace))


def test_one_variable_of_exactly_the_kernel_limit_runs(client: Client, workspace: Path) -> None:
    value = "v" * (MAX_ARG_STRLEN - 1 - len("BIG="))  # BIG=value is 131,071 bytes
    v = client.validate(
        "echo ${#BIG} > len.txt; echo ${#BIG}", cwd=str(workspace), env={"BIG": value}
    )
    assert v.sandboxed and v.exit_code == 0, v.summary
    assert v.stdout == b"131067\n"
    with pytest.raises(InvalidRequest) as info:
        client.validate("echo > f", cwd=str(workspace), env={"BIG": value + "v"})
    assert info.value.reason == "INVALID_ENV" and "BIG=" in info.value.message
    # An env value over 128 KiB is refused up front, never an INTERNAL E2BIG.
    with pytest.raises(InvalidRequest) as info:
        list(client.execute("true", cwd=str(workspace), env={"A": "a" * (128 * 1024 + 1)}))
    assert info.value.reason == "INVALID_ENV"


def test_environment_of_exactly_the_total_limit_runs(client: Client, workspace: Path) -> None:
    # NAME=value plus a NUL each, 256 KiB in all.
    a = "a" * (MAX_ARG_STRLEN - 1 - len("A="))
    b = "b" * (MAX_ARG_STRLEN - 10 - len("B=") - 1)
    env = {"A": a, "B": b, "C": "c" * 7}
    assert sum(len(k) + len(v) + 2 for k, v in env.items()) == MAX_ENV_TOTAL
    v = client.validate("echo $(( ${#A} + ${#B} )) > n; cat n", cwd=str(workspace), env=env)
    assert v.exit_code == 0 and v.stdout == str(len(a) + len(b)).encode() + b"\n", v.summary
    with pytest.raises(InvalidRequest) as info:
        client.validate("echo > f", cwd=str(workspace), env={**env, "C": "c" * 8})
    assert info.value.reason == "INVALID_ENV"
    assert f"is {MAX_ENV_TOTAL + 1} bytes; the limit is {MAX_ENV_TOTAL}" in info.value.message


def test_execute_in_a_cwd_1000_levels_deep_runs(client: Client, deep_cwd: Path) -> None:
    assert len(str(deep_cwd).encode()) <= MAX_CWD_BYTES
    events = list(client.execute("pwd; echo here > f", cwd=str(deep_cwd)))
    end = events[-1]
    assert isinstance(end, ExecFinished), events
    assert (end.termination, end.exit_code) == (Termination.EXITED, 0)
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    assert out == os.fsencode(deep_cwd) + b"\n"
    assert (deep_cwd / "f").read_text() == "here\n"
    # A dry run there runs too; its diff walks 256 levels (sandbox/diff.py), so a change
    # deeper is not reported and the verdict says so: it asks, never allows.
    v = client.validate("echo there > g", cwd=str(deep_cwd))
    assert v.sandboxed and v.exit_code == 0 and v.changes_truncated, v.summary
    assert v.verdict is Verdict.ASK


def make_path(base: str, size: int) -> str:
    """A directory path of exactly ``size`` bytes below ``base`` (made, with its parents).

    The last directory is made relative to its parent: mkdir takes no path of PATH_MAX bytes.
    """
    path = base
    while len(path) + 1 + 255 < size:
        path += "/" + "n" * 255
        if not os.path.isdir(path):
            os.mkdir(path)
    parent, last = path, "m" * (size - len(path) - 1)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir(last, dir_fd=fd)
    finally:
        os.close(fd)
    return f"{parent}/{last}"


def test_cwd_of_exactly_the_path_limit(client: Client, daemon: Daemon, tmp_path: Path) -> None:
    """Validate takes a cwd of 4,093 bytes (PATH_MAX less its NUL and the "/." the resolver
    adds) and runs there; 4,094 bytes is INVALID_CWD. Execute mounts the workspace below its
    sandbox's root (STATE/scratch/root), so its limit is that much shorter, and exact too."""
    os.chmod(tmp_path, 0o755)
    base = str(tmp_path / "long")
    os.mkdir(base)
    try:
        path = make_path(base, MAX_CWD_BYTES)
        assert len(path.encode()) == MAX_CWD_BYTES == 4093
        v = client.validate("echo in > g", cwd=path)
        assert v.sandboxed and v.exit_code == 0, v.summary
        over = make_path(base, MAX_CWD_BYTES + 1)
        with pytest.raises(InvalidRequest) as info:
            client.validate("echo in > g", cwd=over)
        assert info.value.reason == "INVALID_CWD"
        assert "4094 bytes; the limit is 4093" in info.value.message
        root = f"{daemon.state_dir}/scratch/root"
        limit = 4095 - len(root)
        ex = make_path(base, limit)
        events = list(client.execute("echo in > f; pwd", cwd=ex))
        end = events[-1]
        assert isinstance(end, ExecFinished) and end.exit_code == 0, events
        assert os.path.exists(ex + "/f")
        ex_over = make_path(base, limit + 1)
        with pytest.raises(InvalidRequest) as info:
            list(client.execute("echo in > f", cwd=ex_over))
        assert info.value.reason == "INVALID_CWD"
        assert f"{limit + 1} bytes; the limit is {limit}" in info.value.message
    finally:
        subprocess.run(["rm", "-rf", base], check=True)


# --- A dry run cut short by a limit asks (issue 15, item 7) ----------------------------------

PY = "/usr/bin/python3"
# Allocates (and touches) SIZE MiB, then appends to ~/.bashrc: the policy denies the append.
ALLOC_THEN_BASHRC = (
    PY + " -c 'import os\n"
    "x = bytearray({size} << 20)\n"
    'open(os.path.expanduser("~/.bashrc"), "a").write("echo pwned\\n")\''
)


@pytest.fixture(scope="module")
def policy_client() -> Iterator[Client]:
    """A daemon with the default policy and the test limits (memory 256 MiB, 64 pids)."""
    with public_dir() as base, running_daemon(base, *TEST_LIMITS) as d, d.client() as c:
        yield c


def incomplete(v: Validation) -> str:
    found = [f.message for f in v.findings if f.rule_id == "builtin.incomplete-dry-run"]
    return found[0] if found else ""


def test_small_allocation_then_bashrc_is_judged_by_the_policy(
    policy_client: Client, workspace: Path
) -> None:
    v = policy_client.validate(ALLOC_THEN_BASHRC.format(size=1), cwd=str(workspace))
    assert v.sandboxed and v.exit_code == 0, v.summary
    assert v.verdict is Verdict.DENY, v.summary
    assert not incomplete(v) and not v.resource_usage.memory_limit_hit


def test_out_of_memory_before_bashrc_asks(policy_client: Client, workspace: Path) -> None:
    v = policy_client.validate(ALLOC_THEN_BASHRC.format(size=512), cwd=str(workspace))
    assert v.sandboxed and v.resource_usage.memory_limit_hit, v.summary
    assert v.termination is Termination.OUT_OF_MEMORY
    assert not v.changes  # killed before the append: the dry run shows nothing to deny
    assert v.verdict in (Verdict.ASK, Verdict.DENY), v.summary
    assert "memory limit" in incomplete(v)


def test_past_the_pids_limit_asks(policy_client: Client, workspace: Path) -> None:
    forks = (
        PY + " -c 'import os, time\n"
        "for _ in range(100):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n'"
    )
    v = policy_client.validate(forks, cwd=str(workspace))
    assert v.sandboxed and v.resource_usage.pids_limit_hit, v.summary
    assert v.verdict is not Verdict.ALLOW
    assert "process limit" in incomplete(v)


def test_output_cut_at_the_limit_asks(policy_client: Client, workspace: Path) -> None:
    v = policy_client.validate("head -c 200000 /dev/zero; echo x > f", cwd=str(workspace))
    assert v.sandboxed and v.stdout_truncated and v.exit_code == 0, v.summary
    assert v.verdict is Verdict.ASK and "standard output" in incomplete(v)


def test_a_process_left_running_past_the_grace_asks(policy_client: Client, workspace: Path) -> None:
    """A delayed payload: the command exits at once, a job it left behind writes later. The
    dry run ends with the command, so the write is never seen; on the host it would happen.
    The verdict asks (it used to allow: "Changed no files")."""
    (workspace / "setup.sh").write_text(
        "echo configuring\n( sleep 1; echo 'alias sudo=evil' >> marker ) >/dev/null 2>&1 &\n"
    )
    v = policy_client.validate("sh setup.sh", cwd=str(workspace))
    assert v.sandboxed and v.exit_code == 0 and v.stdout == b"configuring\n", v.summary
    assert v.verdict is Verdict.ASK, v.summary
    assert "left processes running" in incomplete(v), v.findings
    assert not v.changes  # the write never happened in the dry run
    assert not (workspace / "marker").exists()


def test_a_job_that_ends_within_the_grace_is_seen(policy_client: Client, workspace: Path) -> None:
    """What a short background job does is part of the dry run, and is no reason to ask."""
    v = policy_client.validate(
        "( sleep 0.05; echo hi > late.txt ) >/dev/null 2>&1 & echo started", cwd=str(workspace)
    )
    assert v.sandboxed and v.stdout == b"started\n", v.summary
    assert not incomplete(v), v.findings
    assert [c.path for c in v.changes] == [os.fsencode(workspace / "late.txt")], v.changes
