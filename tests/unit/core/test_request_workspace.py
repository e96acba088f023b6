"""The working directory: resolved once, as its user; never a kernel tree; a system directory is
never a workspace; one answer for a directory that is missing and one that cannot be entered.

``airlock.core.request.check`` on real paths, no daemon and no root: the security issue's
classes D (a symlink to a kernel tree), G (a system directory as the workspace) and I (an
existence oracle). Run as root, the caller that cannot search is uid 65534 (the check takes
its file-system rights on this thread); run as another user, it is that user and a directory
of mode 0. The same attacks through a real daemon, as real users: tests/daemon/
test_security_workspace.py.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock._errors import InvalidRequest
from airlock.core.request import SHARED_PARENTS, SYSTEM_TREES, CheckedRequest, check
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.cgroup import CgroupHost, CgroupSpec
from airlock.sandbox.diff import CallerFiles, DiffOptions, _Walker
from airlock.sandbox.plan import Bind, HostMount, SandboxSettings, build_template
from airlock.types import CgroupVersion, ExecuteRequest, Limits, PeerCred, ValidateRequest

LIMITS = Limits()
ME = os.geteuid()
ROOT = PeerCred(pid=os.getpid(), uid=0, gid=0)
NOBODY = 65534
# Who cannot search a directory of mode 0700 owned by root, or of mode 0 owned by itself.
OUTSIDER = (
    PeerCred(pid=os.getpid(), uid=NOBODY, gid=NOBODY)
    if ME == 0
    else PeerCred(pid=os.getpid(), uid=ME, gid=os.getegid(), groups=tuple(os.getgroups()))
)
# Who may run as root here (the daemon is root; a test that is not root can only be itself).
CALLER = ROOT if ME == 0 else OUTSIDER
REQUESTS = {"validate": ValidateRequest, "execute": ExecuteRequest}


def checked(kind: str, cwd: str | Path, peer: PeerCred = CALLER) -> CheckedRequest:
    return check(REQUESTS[kind]("true", str(cwd), ()), peer, LIMITS)


def refusal(kind: str, cwd: str | Path, peer: PeerCred = CALLER) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        checked(kind, cwd, peer)
    return info.value


@pytest.fixture
def tree(public_tmp: Path) -> Iterator[Path]:
    """A directory anyone may traverse, with links to kernel trees and to system directories."""
    base = public_tmp / "t"
    base.mkdir()
    base.chmod(0o755)
    (base / "ws").mkdir()
    (base / "ws").chmod(0o755)
    for name, target in (
        ("psys", "/proc/sys"),
        ("proc", "/proc"),
        ("dev", "/dev"),
        ("etc", "/etc"),
        ("root", "/"),
        ("usr", "/usr"),
        ("link", "ws"),
        ("chain", "link"),
    ):
        (base / name).symlink_to(target)
    yield base


# --- D: a symbolic link to a kernel tree ------------------------------------------------------


@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize(
    ("link", "resolved"),
    [("psys", "/proc/sys"), ("dev", "/dev"), ("proc/sys/kernel", "/proc/sys/kernel")],
)
def test_a_link_to_a_kernel_tree_is_refused_as_it_resolves(
    tree: Path, kind: str, link: str, resolved: str
) -> None:
    for peer in dict.fromkeys((CALLER, OUTSIDER)):
        error = refusal(kind, tree / link, peer)
        assert error.reason == "INVALID_CWD", error
        assert f"{tree / link} is {resolved}, which is on a kernel file system" in error.message


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_the_request_carries_the_resolved_directory_and_its_identity(tree: Path, kind: str) -> None:
    st = os.stat(tree / "ws")
    for cwd in (tree / "ws", tree / "link", tree / "chain", f"/{tree}/./link/../chain"):
        req = checked(kind, cwd)
        assert req.cwd == req.workspace == str(tree / "ws"), cwd
        assert req.cwd_identity == (st.st_dev, st.st_ino)


def test_the_caller_s_rights_are_given_back_after_the_look_up(tree: Path) -> None:
    """The look-up takes the caller's fsuid, fsgid and groups on this thread, and gives them
    back whatever it found."""
    groups = sorted(os.getgroups())
    checked("validate", tree / "ws", OUTSIDER)
    with pytest.raises(InvalidRequest):
        checked("validate", tree / "missing", OUTSIDER)
    assert sc.setfsuid(0xFFFFFFFF) == ME and sc.setfsgid(0xFFFFFFFF) == os.getegid()
    assert sorted(os.getgroups()) == groups


# --- G: a system directory is never a workspace -----------------------------------------------


SYSTEM_CWDS = ["/etc", "/", "/usr", "/usr/share", "/var", "/home", "/var/lib"]


@pytest.mark.parametrize("cwd", SYSTEM_CWDS)
def test_execute_refuses_a_system_directory_and_says_what_to_use(cwd: str) -> None:
    if not os.path.isdir(cwd):
        pytest.skip(f"{cwd} does not exist here")
    error = refusal("execute", cwd)
    assert error.reason == "INVALID_CWD", error
    assert f"Execute cannot run in {cwd}: " in error.message
    assert "system directory" in error.message or "holds the system's" in error.message
    assert "Execute makes its working directory writable" in error.message
    assert "run it in a project directory (in your home" in error.message


@pytest.mark.parametrize("cwd", SYSTEM_CWDS)
def test_a_dry_run_in_a_system_directory_has_no_workspace(cwd: str) -> None:
    if not os.path.isdir(cwd):
        pytest.skip(f"{cwd} does not exist here")
    req = checked("validate", cwd)
    assert (req.cwd, req.workspace) == (cwd, "")


@pytest.mark.parametrize("link", ["etc", "root", "usr"])
def test_a_link_to_a_system_directory_is_one(tree: Path, link: str) -> None:
    target = os.path.realpath(tree / link)
    error = refusal("execute", tree / link)
    assert error.reason == "INVALID_CWD" and f"Execute cannot run in {target}: " in error.message
    req = checked("validate", tree / link)
    assert (req.cwd, req.workspace) == (target, "")


@pytest.mark.parametrize("cwd", ["/tmp", "/var/tmp"])
def test_the_temp_directories_are_workspaces(cwd: str) -> None:
    """A decision (docs/policy-reference.md): their changes are temp-scope anyway, and the
    caller has only its own rights over other users' files there."""
    if not os.path.isdir(cwd) or os.path.islink(cwd):
        pytest.skip(f"{cwd} is not a plain directory here")
    for kind in REQUESTS:
        assert checked(kind, cwd).workspace == cwd


def test_the_lists_are_absolute_normal_and_disjoint() -> None:
    for path in (*SYSTEM_TREES, *SHARED_PARENTS):
        assert path.startswith("/") and posixpath.normpath(path) == path, path
    assert not set(SYSTEM_TREES) & set(SHARED_PARENTS)
    assert "/tmp" not in SYSTEM_TREES + SHARED_PARENTS  # a workspace, on purpose


def test_a_dry_run_without_a_workspace_puts_no_change_in_it() -> None:
    walker = _Walker(DiffOptions(workspace=b""), CallerFiles(None))
    assert not any(walker._in_workspace(p) for p in (b"/", b"/etc", b"/etc/x", b"/tmp/x", b""))
    walker = _Walker(DiffOptions(workspace=b"/"), CallerFiles(None))
    assert walker._in_workspace(b"/etc/x")  # unlike "/" as a workspace, which was everything


def test_execute_binds_exactly_the_checked_directory() -> None:
    """The plan's read-write bind of the workspace carries the identity the check found."""
    template = build_template(
        settings=SandboxSettings(scratch_dir="/run/airlock/scratch", hidden_paths=()),
        scratch_bytes=1 << 20,
        cgroup=CgroupSpec(
            host=CgroupHost(CgroupVersion.V2, ("memory",), (("unified", "/sys/fs/cgroup"),)),
            group="g",
            name="ex",
            memory_bytes=1 << 30,
            pids=64,
        ),
        host_mounts=(HostMount("/", "ext4"),),
        writable="/srv/ws",
        writable_identity=(7, 42),
    )
    [bind] = [op for op in template.host_setup if isinstance(op, Bind) and not op.readonly]
    assert (bind.source, bind.identity) == ("/srv/ws", (7, 42))


# --- I: one answer for missing and not accessible ---------------------------------------------


@pytest.fixture
def closed(public_tmp: Path) -> Iterator[Path]:
    """A directory OUTSIDER may not search: 0700 root's when run as root, else mode 0."""
    d = public_tmp / "closed"
    d.mkdir()
    d.chmod(0o700 if ME == 0 else 0)
    yield d
    d.chmod(0o700)


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_missing_and_unreachable_give_the_same_bytes(closed: Path, kind: str) -> None:
    probe = closed / "x"
    missing = refusal(kind, probe, OUTSIDER)
    closed.chmod(0o700)
    probe.mkdir()
    closed.chmod(0o700 if ME == 0 else 0)
    present = refusal(kind, probe, OUTSIDER)
    assert (missing.reason, missing.message) == (present.reason, present.message)
    assert present.reason == "CWD_NOT_ACCESSIBLE"
    assert f"uid {OUTSIDER.uid} cannot enter {probe}: it does not exist" in present.message
    # The directory itself, which exists, and a file where a directory is asked for: the same.
    assert refusal(kind, closed, OUTSIDER).message == present.message.replace(
        str(probe), str(closed)
    )
    closed.chmod(0o700)
    (closed / "x" / "file").touch()
    closed.chmod(0o755)
    file_error = refusal(kind, closed / "x" / "file", OUTSIDER)
    assert file_error.reason == "CWD_NOT_ACCESSIBLE"
    assert file_error.message == present.message.replace(str(probe), str(closed / "x" / "file"))


def test_a_root_caller_gets_the_same_answer_for_a_missing_directory(tmp_path: Path) -> None:
    error = refusal("validate", tmp_path / "missing")
    assert error.reason == "CWD_NOT_ACCESSIBLE"
    assert f"cannot enter {tmp_path / 'missing'}: it does not exist" in error.message
