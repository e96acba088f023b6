"""Attacks on what a dry run may leave for Apply, and on the space kept for it, on real daemons.

* **H. Special files.** A root dry run that makes a setuid copy of /bin/sh (or sets u+s or g+s
  on a file, links a file with capabilities, makes a FIFO or changes a device node) is denied by
  the shipped policy's effect rules (``effect.privileged-file``, ``effect.special-file``), and
  Apply refuses such a file even under a policy that allows everything, unless the approval
  names it (``special_paths``). A setgid *directory* is not special.
* **Overlays and binds are nosuid, nodev.** A device node on a data mount the host mounted
  nodev (or on any data mount) cannot be opened in a dry run or an Execute.
* **F. One uid cannot take everyone's changeset space.** Past a uid's share of the quota, its
  validations still succeed, with their verdicts, and say their changes were not kept; other
  uids keep theirs. Apply of a validation whose changes were not kept fails with
  FAILED_PRECONDITION (``CHANGES_NOT_KEPT``) and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock import FailedPrecondition, InvalidRequest, NotFound
from airlock.client import Client
from airlock.sandbox import _syscalls as sc
from airlock.types import (
    ChangeKind,
    ExecFinished,
    ExecOutput,
    FileType,
    OtherType,
    Validation,
    Verdict,
)
from tests.helpers import (
    NEUTRAL_POLICY,
    NOBODY,
    TEST_LIMITS,
    Daemon,
    public_dir,
    run_client_as,
    running_daemon,
)

# Copies /bin/sh and makes it setuid without a word the static rules know (chmod 4755 asks).
SETUID_SHELL = "cp /bin/sh sh && perl -e 'chmod 04755, \"sh\"'"


@pytest.fixture(scope="module")
def shipped() -> Iterator[Daemon]:
    """A daemon with the shipped default policy."""
    with public_dir() as base, running_daemon(base, *TEST_LIMITS) as d:
        yield d


@pytest.fixture(scope="module")
def neutral() -> Iterator[Daemon]:
    """A daemon whose policy has no opinion at all: a policy that forgot special files."""
    # Its callers approve their own validations: allow-self-approval (test_approvals.py).
    args = (*TEST_LIMITS, *NEUTRAL_POLICY, "--allow-self-approval")
    with public_dir() as base, running_daemon(base, *args) as d:
        yield d


@pytest.fixture
def base() -> Iterator[Path]:
    with public_dir() as path:
        yield path


def workspace(base: Path, name: str = "ws", uid: int = 0) -> Path:
    ws = base / name
    ws.mkdir(mode=0o755, parents=True)
    os.chmod(ws.parent, 0o755)
    os.chown(ws, uid, uid)
    return ws


def by_name(changes: tuple, ws: Path) -> dict:  # type: ignore[type-arg]
    return {os.fsdecode(c.path)[len(str(ws)) + 1 :]: c for c in changes}


def rule_ids(v: object) -> set[str]:
    return {f.rule_id for f in v.findings}  # type: ignore[attr-defined]


# --- H. Setuid and setgid files -----------------------------------------------------------------


def refused_apply(client: Client, command: str, ws: Path) -> tuple[Validation, str]:
    """``command`` validated in ``ws`` (allowed: the policy has no effect rules) and applied:
    refused for its special files. The validation and the refusal's message."""
    v = client.validate(command, cwd=str(ws))
    assert v.verdict is Verdict.ALLOW
    with pytest.raises(FailedPrecondition) as info:
        client.apply(v.validation_id)
    assert info.value.reason == "APPLY_SPECIAL_FILES"
    return v, info.value.message


def test_a_setuid_copy_of_sh_is_denied_and_never_reaches_the_host(
    shipped: Daemon, neutral: Daemon, base: Path
) -> None:
    ws = workspace(base)
    with shipped.client() as client:
        v = client.validate(SETUID_SHELL, cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    sh = by_name(v.changes, ws)["sh"]
    assert (sh.kind, sh.mode_after, sh.uid_after) == (ChangeKind.CREATED, 0o4755, 0)
    assert v.verdict is Verdict.DENY and "effect.privileged-file" in rule_ids(v)
    privileged = next(f for f in v.findings if f.rule_id == "effect.privileged-file")
    assert f"{ws}/sh (created, setuid)" in privileged.message
    # A policy that forgot the rule allows it; Apply still refuses the file, writing nothing.
    with neutral.client() as client:
        v, message = refused_apply(client, SETUID_SHELL, ws)
    assert v.changes_digest
    assert f"{ws}/sh would be setuid" in message
    assert not (ws / "sh").exists()


def test_an_approval_that_names_the_file_lets_apply_write_it(neutral: Daemon, base: Path) -> None:
    ws = workspace(base)
    with neutral.client() as client:
        v = client.validate(SETUID_SHELL + " && mkdir other", cwd=str(ws))
        assert v.verdict is Verdict.ALLOW
        # Naming a path that is not one of its special files is refused (typos show).
        with pytest.raises(InvalidRequest) as bad:
            client.approve(v.validation_id, special_paths=[f"{ws}/other"])
        assert bad.value.reason == "INVALID_SPECIAL_PATH" and f"{ws}/sh (setuid)" in str(bad.value)
        with pytest.raises(FailedPrecondition) as needless:
            client.approve(v.validation_id)  # allowed, and naming nothing: nothing to approve
        assert needless.value.reason == "APPROVAL_NOT_NEEDED"
        client.approve(v.validation_id, special_paths=[f"{ws}/sh"])
        out = client.apply(v.validation_id)
    assert os.fsencode(f"{ws}/sh") in out.applied_paths
    st = os.stat(ws / "sh")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0


def test_chmod_u_s_and_g_s_on_existing_files(shipped: Daemon, neutral: Daemon, base: Path) -> None:
    ws = workspace(base)
    for name in ("tool", "other"):
        shutil.copy("/bin/true", ws / name)
        os.chmod(ws / name, 0o755)
    command = 'perl -e \'chmod 04755, "tool"; chmod 02755, "other"\''
    with shipped.client() as client:
        v = client.validate(command, cwd=str(ws))
    changes = by_name(v.changes, ws)
    assert (changes["tool"].kind, changes["tool"].mode_after) == (
        ChangeKind.METADATA_CHANGED,
        0o4755,
    )
    assert changes["other"].mode_after == 0o2755
    assert v.verdict is Verdict.DENY and "effect.privileged-file" in rule_ids(v)
    with neutral.client() as client:
        _, message = refused_apply(client, command, ws)
    assert "tool would be setuid" in message
    assert "other would be setgid" in message
    assert stat.S_IMODE(os.stat(ws / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(ws / "other").st_mode) == 0o755


def test_a_setgid_directory_is_not_special(shipped: Daemon, base: Path) -> None:
    """Shared project directories are setgid (new entries inherit the group); that raises no
    one's privileges, and mkdir below one inherits it: it is allowed and applied."""
    ws = workspace(base)
    with shipped.client() as client:
        command = "mkdir shared && perl -e 'chmod 02775, \"shared\"' && mkdir shared/sub"
        v = client.validate(command, cwd=str(ws))
        assert v.verdict is Verdict.ALLOW, v.findings
        changes = by_name(v.changes, ws)
        assert changes["shared"].mode_after == 0o2775
        assert changes["shared/sub"].mode_after is not None
        assert changes["shared/sub"].mode_after & stat.S_ISGID  # inherited
        client.apply(v.validation_id)
    assert stat.S_IMODE(os.stat(ws / "shared").st_mode) == 0o2775


# --- H. File capabilities -----------------------------------------------------------------------

# struct vfs_cap_data, revision 2: cap_net_raw (13) permitted, and the effective flag.
NET_RAW_EP = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)


def give_capabilities(path: Path) -> None:
    if shutil.which("setcap"):
        subprocess.run(["setcap", "cap_net_raw+ep", str(path)], check=True)
    else:
        os.setxattr(path, "security.capability", NET_RAW_EP)
    assert os.getxattr(path, "security.capability") == NET_RAW_EP


def test_a_linked_binary_with_capabilities_is_reported_and_denied(
    shipped: Daemon, neutral: Daemon, base: Path
) -> None:
    """A dry run cannot set capabilities (no CAP_SETFCAP), but a link or a rename of a file that
    has them carries them (overlayfs copies the attribute up); the diff reports them."""
    ws = workspace(base)
    capbin = base / "capbin"
    shutil.copy("/bin/true", capbin)
    give_capabilities(capbin)
    command = "ln ../capbin ping"
    with shipped.client() as client:
        v = client.validate(command, cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    ping = by_name(v.changes, ws)["ping"]
    assert (ping.kind, ping.capabilities) == (ChangeKind.CREATED, "cap_net_raw=ep")
    assert v.verdict is Verdict.DENY and "effect.privileged-file" in rule_ids(v)
    with neutral.client() as client:
        v, message = refused_apply(client, command, ws)
        assert "ping would be capabilities" in message
        assert not (ws / "ping").exists()
        # Named in the approval, it is applied as reviewed: capabilities included (root).
        client.approve(v.validation_id, special_paths=[f"{ws}/ping"])
        client.apply(v.validation_id)
    assert os.getxattr(ws / "ping", "security.capability") == NET_RAW_EP
    assert (ws / "ping").read_bytes() == capbin.read_bytes()


def test_a_non_root_user_cannot_apply_capabilities(neutral: Daemon, base: Path) -> None:
    """Only root can give a file capabilities: a user's approved apply is refused whole."""
    ws = workspace(base, uid=NOBODY)
    capbin = ws / "capbin"
    shutil.copy("/bin/true", capbin)
    os.chown(capbin, NOBODY, NOBODY)
    give_capabilities(capbin)  # chown first: it drops capabilities
    body = f"""
with Client({neutral.socket!r}) as c:
    v = c.validate("ln capbin ping", cwd={str(ws)!r})
    ping = [ch for ch in v.changes if ch.path.endswith(b"/ping")][0]
    c.approve(v.validation_id, special_paths=[ping.path])
    try:
        c.apply(v.validation_id)
        print(json.dumps(["applied", ping.capabilities]))
    except AirlockError as e:
        print(json.dumps([e.reason, ping.capabilities]))
"""
    result = run_client_as(body)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["APPLY_PERMISSION", "cap_net_raw=ep"]
    assert not (ws / "ping").exists()


# --- H. Device nodes, FIFOs, sockets ------------------------------------------------------------


def test_a_dry_run_cannot_mknod_a_device(shipped: Daemon, base: Path) -> None:
    ws = workspace(base)
    with shipped.client() as client:
        v = client.validate("mknod null c 1 3; mknod disk b 8 0; echo $?", cwd=str(ws))
    assert v.stdout == b"1\n" and b"Operation not permitted" in v.stderr
    assert not v.changes and v.verdict is Verdict.ALLOW


def test_a_device_node_changed_by_a_dry_run_is_denied_and_not_kept(
    shipped: Daemon, base: Path
) -> None:
    """What a dry run can do to a device node is change the mode of one that exists (overlayfs
    copies it up): a disk made world-writable. Denied, and never kept for Apply."""
    ws = workspace(base)
    os.mknod(ws / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    with shipped.client() as client:
        v = client.validate("chmod 666 disk", cwd=str(ws))
    disk = by_name(v.changes, ws)["disk"]
    assert (disk.kind, disk.file_type, disk.other_type) == (
        ChangeKind.METADATA_CHANGED,
        FileType.OTHER,
        OtherType.BLOCK_DEVICE,
    )
    assert v.verdict is Verdict.DENY and "effect.special-file" in rule_ids(v)
    assert "CHANGESET_UNSUPPORTED" in v.changes_not_kept


def test_fifos_and_sockets_are_reported_not_refused(
    shipped: Daemon, neutral: Daemon, base: Path
) -> None:
    """FIFOs and socket files raise no one's privileges, and tools leave them everywhere: they
    are reported with their type, not judged by the shipped policy, and Apply writes them."""
    ws = workspace(base)
    command = (
        "mkfifo pipe && perl -MSocket -e "
        "'socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die; "
        'bind($s, pack_sockaddr_un("sock")) or die\''
    )
    with shipped.client() as client:
        v = client.validate(command, cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    changes = by_name(v.changes, ws)
    assert changes["pipe"].other_type is OtherType.FIFO
    assert changes["sock"].other_type is OtherType.SOCKET
    assert "effect.special-file" not in rule_ids(v)
    with neutral.client() as client:
        v = client.validate(command, cwd=str(ws))
        client.apply(v.validation_id)
    assert stat.S_ISFIFO(os.lstat(ws / "pipe").st_mode)
    assert stat.S_ISSOCK(os.lstat(ws / "sock").st_mode)


# --- Overlays and binds are nosuid, nodev -------------------------------------------------------


@contextlib.contextmanager
def nodev_mount(where: Path) -> Iterator[Path]:
    """A tmpfs the host mounts nodev at ``where``, holding a world-readable /dev/zero node."""
    where.mkdir()
    sc.mount("tmpfs", str(where), "tmpfs", sc.MS_NODEV | sc.MS_NOSUID, "size=1m,mode=755")
    try:
        os.mknod(where / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        os.chmod(where / "zero", 0o666)
        with pytest.raises(PermissionError):  # the host's own view: nodev
            open(where / "zero", "rb").close()
        yield where / "zero"
    finally:
        sc.umount2(str(where), sc.MNT_DETACH)


def execute(client: Client, command: str, cwd: Path) -> tuple[bytes, bytes, int]:
    events = list(client.execute(command, cwd=str(cwd)))
    end = events[-1]
    assert isinstance(end, ExecFinished), events
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 1)
    err = b"".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == 2)
    return out, err, end.exit_code


def test_device_nodes_on_data_mounts_do_not_open_in_a_sandbox(neutral: Daemon, base: Path) -> None:
    """Inside the workspace, so that Execute shows it too (its /tmp is private): the nodev
    tmpfs is overlaid in a dry run and bound again below the workspace in Execute."""
    ws = workspace(base)
    os.mknod(ws / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # the host allows this one
    os.chmod(ws / "zero", 0o666)
    with nodev_mount(ws / "data") as zero, neutral.client() as client:
        for path in (zero, ws / "zero"):
            command = f"head -c 4 {path} | od -An -tx1"
            v = client.validate(command, cwd=str(ws))
            assert b"00 00 00 00" not in v.stdout and b"Permission denied" in v.stderr, v
            out, err, _ = execute(client, command, ws)
            assert b"00 00 00 00" not in out and b"Permission denied" in err, (out, err)
        # The sandbox's own /dev keeps its nodes.
        v = client.validate("head -c 4 /dev/zero | od -An -tx1", cwd=str(ws))
        assert v.stdout.split() == [b"00"] * 4


def test_every_overlay_and_bind_is_nosuid_nodev(neutral: Daemon, base: Path) -> None:
    ws = workspace(base)
    script = textwrap.dedent(
        """
        while read -r _ _ _ root point opts _; do
          case "$point" in /proc*|/sys*|/dev|/dev/*) continue;; esac
          echo "$point $opts"
        done < /proc/self/mountinfo
        """
    )
    with neutral.client() as client:
        dry = client.validate(script, cwd=str(ws)).stdout
        ex = execute(client, script, ws)[0]
    for listing in (dry, ex):
        lines = listing.decode().splitlines()
        assert any(line.startswith("/ ") for line in lines), lines
        for line in lines:
            _point, opts = line.rsplit(" ", 1)
            assert {"nosuid", "nodev"} <= set(opts.split(",")), line


# --- F. The changeset quota is per uid ----------------------------------------------------------

ASK_POLICY = """\
version: 1
rules:
  - id: test.ask-file
    title: Writes an ask- file
    description: The test's way to get an ASK verdict from a dry run.
    decision: ask
    severity: low
    effect:
      files:
        paths: ["ask-*"]
"""


def test_one_uid_filling_its_share_fails_no_ones_validate(base: Path) -> None:
    """Root fills its share of a 4 MiB quota (25 %: 1 MiB); its next validation still succeeds
    and says its changes were not kept, and uid 65534 keeps and applies its own."""
    root_ws, user_ws = workspace(base / "r"), workspace(base / "u", uid=NOBODY)
    args = ("--keep-changes-quota", "4M", "--keep-changes-share-per-uid", "25")
    write = "head -c 700000 /dev/urandom > {}"
    with running_daemon(base / "d", *TEST_LIMITS, *NEUTRAL_POLICY, *args) as d:
        with d.client() as client:
            first = client.validate(write.format("a.bin"), cwd=str(root_ws))
            assert first.changes_digest and not first.changes_not_kept
            second = client.validate(write.format("b.bin"), cwd=str(root_ws))
            assert second.verdict is Verdict.ALLOW and second.exit_code == 0
            assert not second.changes_digest
            assert "CHANGESET_QUOTA_EXCEEDED" in second.changes_not_kept
            assert "uid 0's share" in second.changes_not_kept
            with pytest.raises(FailedPrecondition) as info:
                client.apply(second.validation_id)
            assert info.value.reason == "CHANGES_NOT_KEPT"
            assert "CHANGESET_QUOTA_EXCEEDED" in info.value.message
        body = f"""
with Client({d.socket!r}) as c:
    v = c.validate({write.format("mine.bin")!r}, cwd={str(user_ws)!r})
    out = c.apply(v.validation_id)
    print(json.dumps([v.verdict.name, bool(v.changes_digest), v.changes_not_kept,
                      [p.decode() for p in out.applied_paths]]))
"""
        result = run_client_as(body)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["ALLOW", True, "", [f"{user_ws}/mine.bin"]]
        assert (user_ws / "mine.bin").stat().st_size == 700000
        assert not (root_ws / "b.bin").exists()
        # The one root kept is still there to apply; the one it could not keep left no files.
        with d.client() as client:
            client.apply(first.validation_id)
        assert (root_ws / "a.bin").stat().st_size == 700000
        assert sorted(os.listdir(Path(d.state_dir) / "changesets")) == []


def test_apply_of_changes_not_kept_says_why(base: Path) -> None:
    """Allowed or approved, a validation whose changes were not kept (here: more than
    --keep-changes-max) has nothing to apply, and Apply says so and why."""
    ws = workspace(base)
    policy = base / "policy"
    policy.mkdir()
    (policy / "ask.yaml").write_text(ASK_POLICY)
    args = ("--keep-changes-max", "1", "--policy-dir", str(policy), "--allow-self-approval")
    with running_daemon(base / "d", *TEST_LIMITS, *args) as d, d.client() as client:
        allowed = client.validate("echo 1 > one; echo 2 > two", cwd=str(ws))
        assert allowed.verdict is Verdict.ALLOW and "more than the 1" in allowed.changes_not_kept
        with pytest.raises(FailedPrecondition) as info:
            client.apply(allowed.validation_id)
        assert info.value.reason == "CHANGES_NOT_KEPT"
        assert "more than the 1" in info.value.message
        asked = client.validate("echo 1 > ask-one; echo 2 > two", cwd=str(ws))
        assert asked.verdict is Verdict.ASK and asked.changes_not_kept
        client.approve(asked.validation_id)  # still worth approving: for Execute
        with pytest.raises(FailedPrecondition) as info:
            client.apply(asked.validation_id)
        assert info.value.reason == "CHANGES_NOT_KEPT"
        # A validation with no changes at all is still not kept: nothing to find.
        with pytest.raises(NotFound):
            client.apply(client.validate("true", cwd=str(ws)).validation_id)
        # Someone else's is still not theirs to hear about.
        result = run_client_as(
            f"with Client({d.socket!r}) as c:\n"
            "    try:\n"
            f"        c.apply({allowed.validation_id!r})\n"
            "    except AirlockError as e:\n"
            "        print(e.reason)\n"
        )
        assert result.stdout.strip() == "NOT_YOUR_VALIDATION", result.stderr
    assert not (ws / "one").exists() and not (ws / "ask-one").exists()


def test_root_is_held_to_its_share_too(base: Path) -> None:
    """The share binds every uid, root included: root's agent cannot starve the others."""
    ws = workspace(base)
    args = ("--keep-changes-quota", "1M", "--keep-changes-share-per-uid", "50")
    daemon = running_daemon(base / "d", *TEST_LIMITS, *NEUTRAL_POLICY, *args)
    with daemon as d, d.client() as client:
        v = client.validate("head -c 600000 /dev/urandom > x", cwd=str(ws))
    # One run keeps at most its uid's share: this one is refused as too large for it.
    assert not v.changes_digest and "CHANGESET_QUOTA" in v.changes_not_kept
