"""Changesets on real overlays: save what a dry run changed, apply it to the host.

Each dry run forks a child that enters a private mount namespace, mounts a tmpfs and an
overlay whose lower is a host directory (under tmp_path), runs a scenario in the merged
view (as root, or as uid 65534 in a grandchild), takes a byte-level snapshot of the
merged tree, computes the diff and saves the changeset. The mounts die with the child.
The parent then applies the changeset to the lower directory, the "host", and compares
the host's snapshot with the merged one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import stat
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airlock._errors import (
    AirlockError,
    Conflict,
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
)
from airlock.sandbox import _syscalls as sc
from airlock.sandbox import mnt
from airlock.sandbox.apply import ApplyResult, apply, open_changeset
from airlock.sandbox.changeset import Manifest, load, save
from airlock.sandbox.diff import DiffOptions, Layer, compute_changes
from airlock.types import ChangeKind, FileChange
from tests.helpers import mount_table

NOBODY = 65534
OVERLAY_OPTIONS = "redirect_dir=off,index=off,metacopy=off,xino=off"
Snapshot = dict[bytes, tuple[Any, ...]]


@pytest.fixture(autouse=True)
def no_mounts_left() -> Iterator[None]:
    before = mount_table()
    yield
    assert mount_table() == before, "a test left mounts behind"


# --- Helpers -----------------------------------------------------------------------------------


def snapshot(root: Path | bytes) -> Snapshot:
    """Every entry below ``root``: type, permission bits, owner, content hash, link target."""
    base = os.fsencode(root)
    out: Snapshot = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
            out[rel] = ("file", mode, owner, len(data), hashlib.sha256(data).hexdigest())
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", owner, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode, owner)
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), os.path.join(rel, name))
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode), mode, owner, st.st_rdev)

    visit(base, b".")
    return out


def write(path: Path | bytes, data: bytes | str, mode: int = 0o644) -> None:
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(raw, mode)


def populate(host: Path) -> None:
    """The host tree every scenario starts from."""
    write(host / "a.txt", "alpha\n")
    write(host / "b.txt", "beta\n")
    write(host / "run.sh", "#!/bin/sh\necho hi\n")
    write(host / "z.txt", "zulu\n")
    os.symlink("a.txt", host / "link")
    write(host / "dir" / "x", "x\n")
    write(host / "dir" / "sub" / "y", "y\n")
    write(host / "dir" / "sub" / "z", "z\n", 0o600)
    write(host / "file_to_dir", "f\n")
    write(host / "dir_to_file" / "inner", "i\n")
    write(os.path.join(os.fsencode(host), b"caf\xe9"), "latin-1 name\n")
    write(host / "big.bin", os.urandom(3 * 1024 * 1024))


@dataclass
class DryRun:
    dest: Path
    merged: Snapshot
    changes: tuple[FileChange, ...]
    manifest: Manifest | None
    error: AirlockError | None
    dest_exists: bool


def dry_run(
    tmp_path: Path,
    host: Path,
    scenario: Callable[[Path], None],
    *,
    as_uid: int | None = None,
    quota: int = 1 << 30,
    max_changes: int = 10_000,
    scratch_base: Path | None = None,
) -> DryRun:
    """Run ``scenario`` on an overlay over ``host`` in a child; save the changes to a changeset."""
    scratch = (scratch_base or tmp_path) / "scratch"
    scratch.mkdir()
    dest = tmp_path / "changeset"
    out, err = tmp_path / "dry-run.pkl", tmp_path / "dry-run.err"
    pid = os.fork()
    if pid == 0:  # the child: its own mount namespace, gone when it exits
        code = 1
        try:
            _dry_run_child(host, scratch, scenario, as_uid, quota, max_changes, dest, out)
            code = 0
        except BaseException:
            err.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"the dry run failed:\n{err.read_text() if err.exists() else status}")
    data = pickle.loads(out.read_bytes())
    return DryRun(dest=dest, **data)


def _dry_run_child(
    host: Path,
    scratch: Path,
    scenario: Callable[[Path], None],
    as_uid: int | None,
    quota: int,
    max_changes: int,
    dest: Path,
    out: Path,
) -> None:
    sc.unshare(sc.CLONE_NEWNS)
    mnt.make_private()
    sc.mount("tmpfs", str(scratch), "tmpfs", 0, "size=256m,mode=755")
    upper, work, merged = scratch / "u", scratch / "w", scratch / "m"
    for d in (upper, work, merged):
        d.mkdir()
    st = os.lstat(host)
    os.chmod(upper, stat.S_IMODE(st.st_mode))  # the upper root starts out like the lower root
    os.chown(upper, st.st_uid, st.st_gid)
    data = f"lowerdir={host},upperdir={upper},workdir={work},{OVERLAY_OPTIONS}"
    sc.mount("overlay", str(merged), "overlay", 0, data)
    os.umask(0o022)
    if as_uid is None:
        scenario(merged)
    else:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setresgid(as_uid, as_uid, as_uid)
                os.setresuid(as_uid, as_uid, as_uid)
                scenario(merged)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the scenario failed"
    merged_snapshot = snapshot(merged)
    host_b = os.fsencode(host)
    layer = Layer(host_path=host_b, upper=os.fsencode(upper), lower=host_b)
    diff = compute_changes([layer], DiffOptions(workspace=host_b, max_changes=max_changes))
    manifest: Manifest | None = None
    error: AirlockError | None = None
    try:
        manifest = save([layer], diff, str(dest), quota_bytes=quota)
    except AirlockError as exc:
        error = exc
    result = {
        "merged": merged_snapshot,
        "changes": diff.changes,
        "manifest": manifest,
        "error": error,
        "dest_exists": os.path.lexists(dest),
    }
    out.write_bytes(pickle.dumps(result))


def apply_as(uid: int, dest: Path) -> ApplyResult | AirlockError:
    """Open the changeset as root, drop to ``uid`` (gid the same, no groups), apply it.

    The outcome comes back over a pipe: the child may not write anywhere else then.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            changeset = open_changeset(str(dest))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            try:
                outcome: object = apply(changeset)
            except AirlockError as exc:
                outcome = exc
            code = 0
        except BaseException:
            outcome = traceback.format_exc()
        finally:
            with os.fdopen(write_end, "wb") as f:
                f.write(pickle.dumps(outcome))
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    outcome = pickle.loads(data)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"apply failed:\n{outcome}")
    assert isinstance(outcome, ApplyResult | AirlockError)
    return outcome


def no_temporaries(root: Path) -> bool:
    return not any(b".airlock-" in path for path in snapshot(root))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    path = tmp_path / "host"
    path.mkdir()
    populate(path)
    return path


# --- Every kind of change -----------------------------------------------------------------------


def _create(m: Path) -> None:
    write(m / "new.txt", "brand new\n")
    write(m / "script", "#!/bin/sh\n", 0o750)


def _modify(m: Path) -> None:
    with open(m / "a.txt", "a") as f:
        f.write("more\n")
    write(m / "big.bin", os.urandom(3 * 1024 * 1024))  # same size, other content


def _delete_file(m: Path) -> None:
    os.unlink(m / "b.txt")
    os.unlink(m / "link")


def _delete_tree(m: Path) -> None:
    shutil.rmtree(m / "dir")


def _chmod(m: Path) -> None:
    os.chmod(m / "run.sh", 0o755)
    os.chmod(m / "dir" / "sub", 0o700)
    os.chmod(m / "z.txt", 0o4755)


def _chmod_root(m: Path) -> None:
    os.chmod(m, 0o750)  # the mount point itself: the diff reports the layer's root


def _symlinks(m: Path) -> None:
    os.symlink("a.txt", m / "rel-link")
    os.symlink("/nonexistent/target", m / "dangling")
    os.unlink(m / "link")
    os.symlink("b.txt", m / "link")  # replaced: another target
    os.unlink(m / "z.txt")
    os.symlink("a.txt", m / "z.txt")  # a file replaced by a link


def _file_to_dir(m: Path) -> None:
    os.unlink(m / "file_to_dir")
    write(m / "file_to_dir" / "child", "now a directory\n")


def _dir_to_file(m: Path) -> None:
    shutil.rmtree(m / "dir_to_file")
    write(m / "dir_to_file", "now a file\n")
    shutil.rmtree(m / "dir" / "sub")
    os.symlink("../a.txt", m / "dir" / "sub")  # a directory replaced by a link


def _nested(m: Path) -> None:
    write(m / "n1" / "n2" / "n3" / "n4" / "leaf.txt", "deep\n")
    write(m / "n1" / "top.txt", "top\n")
    os.chmod(m / "n1" / "n2", 0o750)
    write(m / "ro" / "inside.txt", "read-only directory\n")
    os.chmod(m / "ro", 0o555)  # Apply must write inside before it takes the final mode


def _non_utf8(m: Path) -> None:
    raw = os.fsencode(m)
    write(os.path.join(raw, b"\xff\xfe.bin"), b"\x00\x01 binary name\n")
    with open(os.path.join(raw, b"caf\xe9"), "ab") as f:
        f.write(b"appended\n")
    write(os.path.join(raw, b"d\x80ir", b"f\xe9"), "inside\n")
    os.symlink(b"\xff\xfe.bin", os.path.join(raw, b"l\xfe"))


def _empty(m: Path) -> None:
    write(m / "empty", b"")
    write(m / "a.txt", b"")


def _large(m: Path) -> None:
    write(m / "large.bin", os.urandom(10 * 1024 * 1024))


def _opaque(m: Path) -> None:
    shutil.rmtree(m / "dir")
    write(m / "dir" / "x", "x again, other content\n")
    write(m / "dir" / "new", "new\n")


def _fifo(m: Path) -> None:
    os.mkfifo(m / "pipe", 0o640)


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "create": _create,
    "modify": _modify,
    "delete_file": _delete_file,
    "delete_tree": _delete_tree,
    "chmod": _chmod,
    "chmod_root": _chmod_root,
    "symlinks": _symlinks,
    "file_to_dir": _file_to_dir,
    "dir_to_file": _dir_to_file,
    "nested": _nested,
    "non_utf8": _non_utf8,
    "empty": _empty,
    "large": _large,
    "opaque": _opaque,
    "fifo": _fifo,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_apply_leaves_the_host_as_the_dry_run_saw_it(tmp_path: Path, host: Path, name: str) -> None:
    run = dry_run(tmp_path, host, SCENARIOS[name])
    assert run.error is None and run.manifest is not None
    assert run.changes, "the scenario changed nothing"
    before = snapshot(host)
    assert before != run.merged
    # Approving every path lets Apply write the setuid file and the FIFO of two scenarios.
    result = apply(str(run.dest), approved=[c.path for c in run.changes])
    assert result.complete, result
    assert snapshot(host) == run.merged
    assert sorted(result.applied) == sorted(c.path for c in run.changes)
    kinds = [c.kind for c in run.changes]
    assert result.created == kinds.count(ChangeKind.CREATED)
    assert result.modified == kinds.count(ChangeKind.MODIFIED)
    assert result.deleted == kinds.count(ChangeKind.DELETED)
    assert result.metadata_changed == kinds.count(ChangeKind.METADATA_CHANGED)
    assert result.bytes_written == sum(
        c.size_after or 0
        for c in run.changes
        if c.kind in (ChangeKind.CREATED, ChangeKind.MODIFIED) and c.file_type.name == "REGULAR"
    )


def test_every_change_at_once_and_apply_again_conflicts(tmp_path: Path, host: Path) -> None:
    def everything(m: Path) -> None:
        for step in (_create, _modify, _chmod, _symlinks, _file_to_dir, _nested, _non_utf8):
            step(m)
        for step in (_large, _fifo, _dir_to_file):
            step(m)
        os.unlink(m / "b.txt")

    run = dry_run(tmp_path, host, everything)
    assert run.manifest is not None
    result = apply(str(run.dest), approved=[c.path for c in run.changes])
    assert result.complete, result
    applied = snapshot(host)
    assert applied == run.merged
    # The changeset was made against the old host: applying it twice must not write anything.
    with pytest.raises(Conflict) as info:
        apply(str(run.dest))
    assert info.value.reason == "APPLY_CONFLICT"
    assert snapshot(host) == applied


def test_manifest_round_trips_and_binds_the_content(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _non_utf8)
    assert run.manifest is not None
    loaded = load(str(run.dest))
    assert loaded == run.manifest
    assert loaded.digest == run.manifest.digest
    assert loaded.digest == hashlib.sha256((run.dest / "manifest.json").read_bytes()).hexdigest()
    assert b"\xff\xfe.bin" in {c.path.rsplit(b"/", 1)[1] for c in loaded.changes}
    assert stat.S_IMODE(os.stat(run.dest).st_mode) == 0o700
    # Only the content of created and modified regular files is kept.
    written = [c for c in loaded.changes if c.writes_content]
    assert (run.dest / "content").stat().st_size == sum(c.after.size for c in written)
    before = snapshot(host)

    # Tampered content: refused before anything is written.
    content = run.dest / "content"
    data = bytearray(content.read_bytes())
    data[0] ^= 1
    content.write_bytes(bytes(data))
    with pytest.raises(InvalidRequest) as info:
        apply(str(run.dest))
    assert info.value.reason == "CHANGESET_CORRUPT"
    assert snapshot(host) == before

    # A manifest that is not canonical, or that walks out of its paths, is not read.
    manifest = run.dest / "manifest.json"
    raw = manifest.read_bytes()
    manifest.write_bytes(raw + b" ")
    with pytest.raises(InvalidRequest) as info:
        load(str(run.dest))
    assert info.value.reason == "CHANGESET_INVALID"
    obj = json.loads(raw)
    obj["changes"][0]["path"] = "/etc/../etc/passwd"
    manifest.write_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(InvalidRequest, match="normalized"):
        load(str(run.dest))
    assert snapshot(host) == before


# --- Conflicts: nothing written -----------------------------------------------------------------


def _expect_conflict(run: DryRun, host: Path, *paths: Path | bytes) -> None:
    before = snapshot(host)
    with pytest.raises(Conflict) as info:
        apply(str(run.dest))
    assert info.value.reason == "APPLY_CONFLICT"
    assert set(info.value.paths) == {os.fsencode(p) for p in paths}
    assert snapshot(host) == before, "a conflicting Apply wrote something"


def test_host_file_modified_after_the_dry_run(tmp_path: Path, host: Path) -> None:
    def scenario(m: Path) -> None:
        _modify(m)
        write(m / "c.txt", "a creation that must not happen either\n")

    run = dry_run(tmp_path, host, scenario)
    write(host / "a.txt", "ALPHA\n")  # same size, same mode: only the hash tells
    _expect_conflict(run, host, host / "a.txt")
    assert not (host / "c.txt").exists()


def test_created_file_now_exists(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _create)
    write(host / "new.txt", "brand new\n")  # even with the same content
    _expect_conflict(run, host, host / "new.txt")


def test_deleted_file_changed(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _delete_file)
    write(host / "b.txt", "BETA\n")
    os.unlink(host / "link")
    os.symlink("z.txt", host / "link")
    _expect_conflict(run, host, host / "b.txt", host / "link")


def test_deleted_tree_changed_below(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _delete_tree)
    write(host / "dir" / "sub" / "late", "written after the dry run\n")
    _expect_conflict(run, host, host / "dir")
    os.unlink(host / "dir" / "sub" / "late")
    os.chmod(host / "dir" / "sub" / "z", 0o644)  # a mode deep below changes the digest too
    _expect_conflict(run, host, host / "dir")


def test_metadata_changed_on_the_host(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _chmod)
    os.chmod(host / "run.sh", 0o700)
    _expect_conflict(run, host, host / "run.sh")


def test_parent_replaced_by_a_symlink(tmp_path: Path, host: Path) -> None:
    def scenario(m: Path) -> None:
        write(m / "dir" / "sub" / "y", "y, changed\n")
        write(m / "dir" / "sub" / "planted", "new\n")

    run = dry_run(tmp_path, host, scenario)
    elsewhere = tmp_path / "elsewhere"
    os.rename(host / "dir" / "sub", elsewhere)  # same content, reached through a link now
    os.symlink(elsewhere, host / "dir" / "sub")
    outside = snapshot(elsewhere)
    _expect_conflict(run, host, host / "dir" / "sub" / "y", host / "dir" / "sub" / "planted")
    assert snapshot(elsewhere) == outside


def test_created_file_in_a_directory_that_is_gone(tmp_path: Path, host: Path) -> None:
    def scenario(m: Path) -> None:
        write(m / "dir" / "new", "new\n")

    run = dry_run(tmp_path, host, scenario)
    shutil.rmtree(host / "dir")
    _expect_conflict(run, host, host / "dir" / "new")


# --- Limits and refusals ------------------------------------------------------------------------


def test_quota_exceeded(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _large, quota=1024 * 1024)
    assert isinstance(run.error, ResourceExhausted)
    assert run.error.reason == "CHANGESET_QUOTA"
    assert not run.dest_exists


def test_truncated_diff_refused(tmp_path: Path, host: Path) -> None:
    run = dry_run(tmp_path, host, _create, max_changes=1)
    assert isinstance(run.error, InvalidRequest)
    assert run.error.reason == "CHANGES_TRUNCATED"
    assert not run.dest_exists


def test_device_node_refused(tmp_path: Path, host: Path) -> None:
    def scenario(m: Path) -> None:
        os.mknod(m / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))

    run = dry_run(tmp_path, host, scenario)
    assert isinstance(run.error, InvalidRequest)
    assert run.error.reason == "CHANGESET_UNSUPPORTED"
    assert not run.dest_exists


# --- As another user ----------------------------------------------------------------------------


def _user_host(base: Path) -> Path:
    user_host = base / "host"
    user_host.mkdir()
    populate(user_host)
    for top, dirs, files in os.walk(user_host):
        for name in [*dirs, *files]:
            os.chown(os.path.join(top, name), NOBODY, NOBODY, follow_symlinks=False)
    os.chown(user_host, NOBODY, NOBODY)
    return user_host


def _as_user(m: Path) -> None:
    _create(m)
    _modify(m)
    _delete_tree(m)
    _nested(m)
    _symlinks(m)
    os.chmod(m / "run.sh", 0o700)


def test_apply_as_a_user(tmp_path: Path, public_tmp: Path) -> None:
    user_host = _user_host(public_tmp)
    run = dry_run(tmp_path, user_host, _as_user, as_uid=NOBODY, scratch_base=public_tmp)
    assert run.manifest is not None
    result = apply_as(NOBODY, run.dest)
    assert isinstance(result, ApplyResult) and result.complete, result
    assert snapshot(user_host) == run.merged


def test_user_cannot_write_the_directory(tmp_path: Path, public_tmp: Path) -> None:
    user_host = _user_host(public_tmp)
    run = dry_run(tmp_path, user_host, _as_user, as_uid=NOBODY, scratch_base=public_tmp)
    os.chmod(user_host, 0o555)  # not a conflict (the parent's mode is not recorded): a refusal
    before = snapshot(user_host)
    result = apply_as(NOBODY, run.dest)
    assert isinstance(result, PermissionDenied), result
    assert result.reason == "APPLY_PERMISSION"
    assert snapshot(user_host) == before


def test_user_cannot_apply_root_owned_changes(tmp_path: Path, public_tmp: Path) -> None:
    root_host = public_tmp / "host"
    root_host.mkdir()
    populate(root_host)
    run = dry_run(tmp_path, root_host, _create, scratch_base=public_tmp)
    before = snapshot(root_host)
    result = apply_as(NOBODY, run.dest)
    assert isinstance(result, PermissionDenied), result
    assert result.reason in ("APPLY_PERMISSION", "APPLY_OWNERSHIP")
    assert snapshot(root_host) == before


# --- Failures part way --------------------------------------------------------------------------


def test_failure_while_preparing_is_undone(
    tmp_path: Path, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scenario(m: Path) -> None:
        _file_to_dir(m)  # the old file is set aside, then must come back
        write(m / "b_new" / "f", "new\n")
        _modify(m)
        os.symlink("a.txt", m / "zlink")  # prepared last: fails

    run = dry_run(tmp_path, host, scenario)
    before = snapshot(host)
    real_symlink = os.symlink

    def no_space(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if b".airlock-" in os.fsencode(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_symlink(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", no_space)
    with pytest.raises(ResourceExhausted) as info:
        apply(str(run.dest))
    assert info.value.reason == "APPLY_NO_SPACE"
    assert snapshot(host) == before


def test_host_changes_during_the_commit(
    tmp_path: Path, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scenario(m: Path) -> None:
        write(m / "a_new.txt", "first\n")
        write(m / "z.txt", "zulu, changed\n")
        write(m / "zz_new.txt", "last\n")

    run = dry_run(tmp_path, host, scenario)
    real_rename = sc.renameat2
    calls = []

    def rename_and_race(*args: Any) -> None:
        real_rename(*args)
        if not calls:  # right after a_new.txt is in place, another writer changes z.txt
            write(host / "z.txt", "concurrent writer\n")
        calls.append(args)

    monkeypatch.setattr(sc, "renameat2", rename_and_race)
    result = apply(str(run.dest))
    assert not result.complete
    assert result.applied == (os.fsencode(host / "a_new.txt"),)
    assert result.failed == (os.fsencode(host / "z.txt"),)
    assert result.not_applied == (os.fsencode(host / "zz_new.txt"),)
    assert "changed on the host during Apply" in result.error
    assert (host / "z.txt").read_text() == "concurrent writer\n"
    assert (host / "a_new.txt").read_text() == "first\n"
    assert not (host / "zz_new.txt").exists()
    assert no_temporaries(host) and not result.leftovers
