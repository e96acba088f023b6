"""compute_changes on real overlays.

Each test builds a lower tree in tmp_path, then runs a child process in a private mount
namespace (``unshare --mount --propagation private``) that mounts a tmpfs and an overlay
on it, runs shell commands in the overlay, calls ``compute_changes`` on the upper layer
and pickles the result back. The mounts vanish with the child; every test checks that
the mount table is unchanged afterwards.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock.sandbox.diff import DiffOptions, DiffResult
from airlock.types import ChangeKind, FileChange, FileType, OtherType
from tests.helpers import mount_table

C, M, D, META = (
    ChangeKind.CREATED,
    ChangeKind.MODIFIED,
    ChangeKind.DELETED,
    ChangeKind.METADATA_CHANGED,
)
REG, DIR, LNK, OTHER, NONE = (
    FileType.REGULAR,
    FileType.DIRECTORY,
    FileType.SYMLINK,
    FileType.OTHER,
    FileType.NONE,
)

# The child: mounts, runs the script, diffs, pickles. Its mounts die with it.
CHILD = textwrap.dedent(
    """
    import os, pickle, stat, subprocess, sys
    from airlock.sandbox.diff import Layer, compute_changes

    with open(sys.argv[1], "rb") as f:
        spec = pickle.load(f)
    scratch = spec["scratch"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", scratch], check=True)
    layers, env = [], dict(os.environ)
    for i, (host, lower) in enumerate(spec["layers"]):
        env[f"L{i}"] = lower
    if spec["setup"]:
        subprocess.run(["sh", "-ec", spec["setup"]], env=env, check=True, stdout=sys.stderr)
    for i, (host, lower) in enumerate(spec["layers"]):
        upper, work, merged = (f"{scratch}/{d}{i}" for d in ("u", "w", "m"))
        for d in (upper, work, merged):
            os.mkdir(d)
        st = os.lstat(lower)  # the upper root starts out like the lower root
        os.chmod(upper, stat.S_IMODE(st.st_mode))
        os.chown(upper, st.st_uid, st.st_gid)
        opts = "redirect_dir=off,index=off,metacopy=off,xino=off"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper},workdir={work},{opts}", merged],
            check=True,
        )
        layers.append(Layer(host.encode(), upper.encode(), lower.encode()))
        env[f"M{i}"] = merged
    env["PY"] = sys.executable
    subprocess.run(["sh", "-ec", "umask 022\\n" + spec["script"]], cwd=env["M0"], env=env,
                   check=True, stdout=sys.stderr)
    results = [compute_changes(layers, options) for options in spec["options"]]
    du = [int(subprocess.run(["du", "-s", "-B1", l.upper], check=True, capture_output=True)
              .stdout.split()[0]) for l in layers]
    sizes = {}
    for i, layer in enumerate(layers):
        for top, dirs, files in os.walk(layer.upper):
            for name in dirs + files:
                path = os.path.join(top, name)
                rel = os.fsdecode(os.path.relpath(path, layer.upper))
                try:
                    sizes[(i, rel)] = os.lstat(path).st_size
                except OSError:  # deeper than PATH_MAX
                    pass
    with open(spec["out"], "wb") as f:
        pickle.dump({"results": results, "du": du, "sizes": sizes}, f)
    """
)


@pytest.fixture(autouse=True)
def no_mounts_left() -> Iterator[None]:
    before = mount_table()
    yield
    assert mount_table() == before, "a test left mounts behind"


def run_overlay(
    tmp_path: Path,
    script: str,
    *options: DiffOptions,
    layers: tuple[tuple[str, Path], ...] | None = None,
    setup: str = "",
) -> dict[str, Any]:
    """Mount overlays on the given lowers, run ``script`` in the first, diff with each option.

    ``setup`` runs in the child's mount namespace before the overlays are mounted, with
    $L0, $L1... naming the lowers.
    """
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec = {
        "scratch": str(scratch),
        "layers": [(host, str(lower)) for host, lower in layers or (("/ws-root", tmp_path / "L"),)],
        "script": script,
        "setup": setup,
        "options": list(options),
        "out": str(tmp_path / "out.pkl"),
    }
    spec_path = str(tmp_path / "spec.pkl")
    Path(spec_path).write_bytes(pickle.dumps(spec))
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(child), spec_path],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out: dict[str, Any] = pickle.loads((tmp_path / "out.pkl").read_bytes())
    return out


def write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chmod(path, mode)


def mkdir(path: Path, mode: int = 0o755) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def created_diff(path: str, text: str) -> str:
    """What difflib says for a new text file (the module builds this text itself)."""
    lines = text.splitlines(keepends=True)
    out = list(difflib.unified_diff([], lines, "/dev/null", "b" + path, lineterm="\n"))
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n\\ No newline at end of file\n"
    return "".join(out)


def new_file(path: bytes, content: bytes | str, **kw: Any) -> FileChange:
    data = content.encode() if isinstance(content, str) else content
    fields: dict[str, Any] = {
        "path": path,
        "kind": C,
        "file_type": REG,
        "size_after": len(data),
        "sha256_after": sha(data),
        "mode_after": 0o644,
        "uid_after": 0,
        "gid_after": 0,
        "in_workspace": True,
    }
    if isinstance(content, str) and "unified_diff" not in kw:
        fields["unified_diff"] = created_diff(path.decode(errors="backslashreplace"), content)
    fields.update(kw)
    return FileChange(**fields)


def changed_file(
    path: bytes, before: bytes | str, after: bytes | str, kind: ChangeKind = M, **kw: Any
) -> FileChange:
    """A regular file, 0644 and root's, rewritten from ``before`` to ``after`` (or, as META,
    its content kept and its mode or owner changed: ``kw``)."""
    old = before.encode() if isinstance(before, str) else before
    new = after.encode() if isinstance(after, str) else after
    fields: dict[str, Any] = {
        "path": path,
        "kind": kind,
        "file_type": REG,
        "previous_file_type": REG,
        "in_workspace": True,
        "size_before": len(old),
        "size_after": len(new),
        "sha256_after": sha(new),
        "mode_before": 0o644,
        "mode_after": 0o644,
        "uid_after": 0,
        "gid_after": 0,
    }
    fields.update(kw)
    return FileChange(**fields)


def deleted_file(path: bytes, size_before: int, **kw: Any) -> FileChange:
    """A regular file of 0644 deleted (another type with ``kw``)."""
    fields: dict[str, Any] = {
        "path": path,
        "kind": D,
        "file_type": REG,
        "previous_file_type": REG,
        "in_workspace": True,
        "size_before": size_before,
        "mode_before": 0o644,
    }
    fields.update(kw)
    return FileChange(**fields)


def test_every_kind_of_change(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    mkdir(lower)
    write(lower / "keep.txt", "unchanged\n")
    write(lower / "touched.txt", "same\n")
    write(lower / "modify.txt", "one\ntwo\nthree\n")
    write(lower / "append.txt", "a\n")
    write(lower / "delete.txt", "bye\n")
    write(lower / "chmod.txt", "c\n")
    write(lower / "chown.txt", "o\n")
    write(lower / "image.bin", b"\x89PNG\x00\x01")
    (lower / "link").symlink_to("keep.txt")
    write(lower / "file2dir", "f\n")
    write(lower / "dir2file" / "a", "a\n")
    write(lower / "dir2file" / "b" / "c", "c\n")
    write(lower / "rmdir" / "x", "x\n")
    write(lower / "rmdir" / "sub" / "y", "y\n")
    write(lower / "rmdir" / "sub" / "z", "z\n")
    write(lower / "opaque" / "old1", "1\n")
    write(lower / "opaque" / "old2", "2\n")
    write(lower / "opaque" / "keepname", "before\n")
    write(lower / "opaque" / "deep" / "d1", "d1\n")
    for d in ("dir2file", "dir2file/b", "rmdir", "rmdir/sub", "opaque", "opaque/deep"):
        os.chmod(lower / d, 0o755)
    before = {p: os.lstat(lower / p) for p in ("rmdir", "dir2file", "link")}

    script = r"""
        touch touched.txt
        printf 'one\nTWO\nthree\n' > modify.txt
        echo b >> append.txt
        rm delete.txt
        rm -rf rmdir
        rm -rf opaque; mkdir opaque; echo after > opaque/keepname; echo new > opaque/new
        mkdir opaque/deep
        chmod 600 chmod.txt
        chown 1234:5678 chown.txt
        ln -sfn modify.txt link
        ln -s /etc/passwd newlink
        rm file2dir; mkdir file2dir; echo inner > file2dir/inner
        rm -rf dir2file; printf 'x\n' > dir2file
        printf '\000\001\002' > new.bin
        printf '\211PNG\000\002' > image.bin
        echo hi > "$(printf 'caf\351.txt')"
        head -c 3000 /dev/zero | tr '\0' a > big.txt
        mkfifo fifo
        mkdir newdir; printf 'n1\n' > newdir/n1
        printf 'no newline\nat the end' > nonl.txt
    """
    out = run_overlay(tmp_path, script, DiffOptions(workspace=b"/ws-root", diff_file_bytes=2048))
    result: DiffResult = out["results"][0]
    sizes = out["sizes"]

    def dir_size(rel: str) -> int:
        size: int = sizes[(0, rel)]
        return size

    expected = [
        changed_file(
            b"/ws-root/append.txt",
            "a\n",
            "a\nb\n",
            unified_diff="--- a/ws-root/append.txt\n+++ b/ws-root/append.txt\n"
            "@@ -1 +1,2 @@\n a\n+b\n",
        ),
        new_file(b"/ws-root/big.txt", b"a" * 3000, diff_truncated=True),
        new_file(b"/ws-root/caf\xe9.txt", "hi\n"),
        changed_file(b"/ws-root/chmod.txt", "c\n", "c\n", META, mode_after=0o600),
        changed_file(b"/ws-root/chown.txt", "o\n", "o\n", META, uid_after=1234, gid_after=5678),
        deleted_file(b"/ws-root/delete.txt", 4),
        FileChange(
            path=b"/ws-root/dir2file",
            kind=M,
            file_type=REG,
            previous_file_type=DIR,
            in_workspace=True,
            size_before=before["dir2file"].st_size,
            size_after=2,
            sha256_after=sha("x\n"),
            mode_before=0o755,
            mode_after=0o644,
            uid_after=0,
            gid_after=0,
            unified_diff=created_diff("/ws-root/dir2file", "x\n"),
            entries_deleted=3,
        ),
        FileChange(
            path=b"/ws-root/fifo",
            kind=C,
            file_type=OTHER,
            in_workspace=True,
            size_after=0,
            mode_after=0o644,
            uid_after=0,
            gid_after=0,
            other_type=OtherType.FIFO,
        ),
        FileChange(
            path=b"/ws-root/file2dir",
            kind=M,
            file_type=DIR,
            previous_file_type=REG,
            in_workspace=True,
            size_before=2,
            size_after=dir_size("file2dir"),
            mode_before=0o644,
            mode_after=0o755,
            uid_after=0,
            gid_after=0,
        ),
        new_file(b"/ws-root/file2dir/inner", "inner\n"),
        changed_file(b"/ws-root/image.bin", b"\x89PNG\x00\x01", b"\x89PNG\x00\x02", binary=True),
        FileChange(
            path=b"/ws-root/link",
            kind=M,
            file_type=LNK,
            previous_file_type=LNK,
            in_workspace=True,
            size_before=len("keep.txt"),
            size_after=len("modify.txt"),
            mode_before=stat.S_IMODE(before["link"].st_mode),
            mode_after=0o777,
            uid_after=0,
            gid_after=0,
            symlink_target=b"modify.txt",
        ),
        changed_file(
            b"/ws-root/modify.txt",
            "one\ntwo\nthree\n",
            "one\nTWO\nthree\n",
            unified_diff="--- a/ws-root/modify.txt\n+++ b/ws-root/modify.txt\n"
            "@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n",
        ),
        new_file(b"/ws-root/new.bin", b"\x00\x01\x02", binary=True),
        FileChange(
            path=b"/ws-root/newdir",
            kind=C,
            file_type=DIR,
            in_workspace=True,
            size_after=dir_size("newdir"),
            mode_after=0o755,
            uid_after=0,
            gid_after=0,
        ),
        new_file(b"/ws-root/newdir/n1", "n1\n"),
        FileChange(
            path=b"/ws-root/newlink",
            kind=C,
            file_type=LNK,
            in_workspace=True,
            size_after=len("/etc/passwd"),
            mode_after=0o777,
            uid_after=0,
            gid_after=0,
            symlink_target=b"/etc/passwd",
        ),
        new_file(
            b"/ws-root/nonl.txt",
            "no newline\nat the end",
            unified_diff="--- /dev/null\n+++ b/ws-root/nonl.txt\n@@ -0,0 +1,2 @@\n"
            "+no newline\n+at the end\n\\ No newline at end of file\n",
        ),
        deleted_file(b"/ws-root/opaque/deep/d1", 3),
        changed_file(
            b"/ws-root/opaque/keepname",
            "before\n",
            "after\n",
            unified_diff="--- a/ws-root/opaque/keepname\n+++ b/ws-root/opaque/keepname\n"
            "@@ -1 +1 @@\n-before\n+after\n",
        ),
        new_file(b"/ws-root/opaque/new", "new\n"),
        deleted_file(b"/ws-root/opaque/old1", 2),
        deleted_file(b"/ws-root/opaque/old2", 2),
        deleted_file(
            b"/ws-root/rmdir",
            before["rmdir"].st_size,
            file_type=DIR,
            previous_file_type=DIR,
            mode_before=0o755,
            entries_deleted=4,
        ),
    ]
    paths = [c.path for c in result.changes]
    assert paths == [c.path for c in expected]
    assert paths == sorted(paths)
    for got, want in zip(result.changes, expected, strict=True):
        assert got == want, got.path
    assert not result.truncated
    assert result.scratch_bytes == out["du"][0]


def test_max_changes_truncates_but_counts_all_scratch(tmp_path: Path) -> None:
    mkdir(tmp_path / "L")
    script = "mkdir many; for i in $(seq 10 34); do echo $i > many/f$i; done"
    exact, short = (
        DiffOptions(workspace=b"/", max_changes=26),
        DiffOptions(workspace=b"/", max_changes=10),
    )
    out = run_overlay(tmp_path, script, exact, short)
    full, cut = out["results"]
    assert not full.truncated
    assert len(full.changes) == 26  # the directory and its 25 files
    assert cut.truncated
    # The walk goes in path order, so the first ten in that order are kept.
    assert [c.path for c in cut.changes] == [c.path for c in full.changes[:10]]
    assert cut.changes == full.changes[:10]
    assert full.scratch_bytes == cut.scratch_bytes == out["du"][0]
    assert all(c.in_workspace for c in full.changes)


def test_workspace_and_exclude(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    mkdir(lower / "proj")
    mkdir(lower / "project2")
    mkdir(lower / "tmp")
    write(lower / "tmp" / "old", "old\n")
    write(lower / "proj" / "old", "old\n")
    write(lower / "project2" / "m", "m\n")
    script = """
        echo a > proj/a
        head -c 50000 /dev/urandom > proj/big; ln proj/big proj/big-link
        echo n > proj/noise.log
        echo b > project2/b
        echo changed > project2/m
        rm proj/old
        echo c > top
        mkdir tmp/cache; head -c 100000 /dev/urandom > tmp/cache/blob; rm tmp/old
    """
    options = DiffOptions(
        workspace=b"/ws-root/proj/",  # a trailing slash does not matter
        exclude=(b"/ws-root/tmp", b"/ws-root/proj/noise.log"),
    )
    out = run_overlay(tmp_path, script, options)
    result = out["results"][0]
    got = {c.path: (c.kind, c.in_workspace) for c in result.changes}
    assert got == {
        b"/ws-root/proj/a": (C, True),
        b"/ws-root/proj/big": (C, True),
        b"/ws-root/proj/big-link": (C, True),
        b"/ws-root/proj/old": (D, True),
        b"/ws-root/project2/m": (M, False),
        b"/ws-root/project2/b": (C, False),  # a name that starts like the workspace
        b"/ws-root/top": (C, False),
    }
    # Excluded paths are not reported, yet their scratch space counts; a file with two
    # names counts once, as du counts it.
    assert result.scratch_bytes == out["du"][0]
    assert 150_000 <= result.scratch_bytes < 200_000


def test_diff_budgets(tmp_path: Path) -> None:
    ten = "".join(f"line-{i:04d}\n" for i in range(10))  # 10 lines of 10 bytes
    fifteen = "".join(f"row-{i:05d}\n" for i in range(15))  # 150 bytes
    write(tmp_path / "L" / "a.txt", ten)
    os.chmod(tmp_path / "L", 0o755)
    (tmp_path / "ten").write_text(ten)
    (tmp_path / "fifteen").write_text(fifteen)
    script = f"""
        sed -i s/line-0000/LINE-0000/ a.txt
        cp {tmp_path}/ten b.txt; cp {tmp_path}/ten c.txt
        printf '\\000x' > d.bin
        : > e.txt
        cp {tmp_path}/fifteen g.txt
        cat {tmp_path}/fifteen {tmp_path}/fifteen {tmp_path}/fifteen > h.txt
    """
    total = DiffOptions(workspace=b"/", diff_file_bytes=200, diff_total_bytes=250)
    per_file = DiffOptions(workspace=b"/", diff_file_bytes=200)
    out = run_overlay(tmp_path, script, total, per_file)
    by_total = {c.path.rsplit(b"/", 1)[1]: c for c in out["results"][0].changes}
    by_file = {c.path.rsplit(b"/", 1)[1]: c for c in out["results"][1].changes}

    diff_a = (
        "--- a/ws-root/a.txt\n+++ b/ws-root/a.txt\n@@ -1,4 +1,4 @@\n"
        "-line-0000\n+LINE-0000\n line-0001\n line-0002\n line-0003\n"
    )
    assert len(diff_a) == 111
    a = by_total[b"a.txt"]
    assert (a.kind, a.unified_diff, a.diff_truncated) == (M, diff_a, False)
    full_b = created_diff("/ws-root/b.txt", ten)
    assert len(full_b) == 161  # 51 bytes of headers, 10 lines of 11
    # 250 - 111 = 139 bytes of budget are left for b.txt: the headers and 8 whole lines.
    b = by_total[b"b.txt"]
    assert b.diff_truncated
    assert b.unified_diff == full_b[: 51 + 8 * 11]
    c = by_total[b"c.txt"]
    assert (c.unified_diff, c.diff_truncated, c.binary) == ("", True, False)
    d = by_total[b"d.bin"]
    assert (d.unified_diff, d.diff_truncated, d.binary) == ("", False, True)
    e = by_total[b"e.txt"]
    assert (e.unified_diff, e.diff_truncated, e.binary, e.size_after) == ("", False, False, 0)
    assert e.sha256_after == sha(b"")

    # g.txt is under the 200-byte file limit, its diff is not: cut at a line boundary.
    g = by_file[b"g.txt"]
    assert g.diff_truncated
    assert g.unified_diff == created_diff("/ws-root/g.txt", fifteen)[: 51 + 13 * 11]
    assert g.unified_diff.endswith("row-00012\n")
    # h.txt (450 bytes) is over the file limit: no diff at all, but its hash.
    h = by_file[b"h.txt"]
    assert (h.unified_diff, h.diff_truncated, h.binary) == ("", True, False)
    assert h.sha256_after == sha(fifteen * 3)
    assert by_file[b"a.txt"].unified_diff == diff_a
    assert by_file[b"b.txt"].unified_diff == full_b


def test_layers_map_to_host_paths(tmp_path: Path) -> None:
    root_lower, home_lower = tmp_path / "root", tmp_path / "home"
    mkdir(root_lower)
    mkdir(home_lower / "user")
    write(home_lower / "user" / "rc", "x=1\n")
    script = """
        echo r > newroot.txt
        echo 'x=2' > "$M1/user/rc"
        chmod 700 "$M1"
    """
    out = run_overlay(
        tmp_path,
        script,
        DiffOptions(workspace=b"/home/user"),
        layers=(("/", root_lower), ("/home/", home_lower)),
    )
    result = out["results"][0]
    assert [(c.path, c.kind, c.in_workspace) for c in result.changes] == [
        (b"/home", META, False),  # the mount point itself was chmod-ed
        (b"/home/user/rc", M, True),
        (b"/newroot.txt", C, False),
    ]
    home = result.changes[0]
    assert (home.file_type, home.mode_before, home.mode_after) == (DIR, 0o755, 0o700)
    assert result.changes[1].unified_diff == (
        "--- a/home/user/rc\n+++ b/home/user/rc\n@@ -1 +1 @@\n-x=1\n+x=2\n"
    )
    assert result.scratch_bytes == sum(out["du"])


def test_symlinks_in_the_lower_are_not_followed(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    mkdir(lower / "tree")
    (lower / "tree" / "escape").symlink_to("/")  # would count the whole host if followed
    write(lower / "tree" / "f", "f\n")
    (lower / "etc-link").symlink_to("/etc")
    (lower / "passwd-link").symlink_to("/etc/passwd")
    script = """
        rm -rf tree
        rm etc-link
        rm passwd-link; echo mine > passwd-link
    """
    out = run_overlay(tmp_path, script, DiffOptions(workspace=b"/ws-root"))
    got = {c.path: c for c in out["results"][0].changes}
    assert set(got) == {b"/ws-root/tree", b"/ws-root/etc-link", b"/ws-root/passwd-link"}
    assert (got[b"/ws-root/tree"].kind, got[b"/ws-root/tree"].entries_deleted) == (D, 2)
    link = got[b"/ws-root/etc-link"]
    assert (link.kind, link.file_type, link.entries_deleted) == (D, LNK, 0)
    replaced = got[b"/ws-root/passwd-link"]
    assert (replaced.kind, replaced.file_type, replaced.previous_file_type) == (M, REG, LNK)
    assert replaced.size_before == len("/etc/passwd")
    # The diff is from nothing: the old side was a link, not /etc/passwd's content.
    assert replaced.unified_diff == created_diff("/ws-root/passwd-link", "mine\n")


def test_paths_longer_than_path_max_and_the_depth_limit(tmp_path: Path) -> None:
    mkdir(tmp_path / "L")
    name = "d" * 40
    # Relative chdir: a shell's cd fails once $PWD would be longer than PATH_MAX.
    deep_tree = (
        f"import os; [(os.mkdir('{name}'), os.chdir('{name}')) for _ in range(150)]; "
        "open('leaf', 'w').write('deep\\n')"
    )
    too_deep = (
        "import os; os.chdir('too-deep'); [(os.mkdir('x'), os.chdir('x')) for _ in range(300)]"
    )
    script = f'"$PY" -c "{deep_tree}"; mkdir too-deep; "$PY" -c "{too_deep}"'
    out = run_overlay(tmp_path, script, DiffOptions(workspace=b"/ws-root"))
    result = out["results"][0]
    deep = b"/ws-root/" + b"/".join([name.encode()] * 150) + b"/leaf"
    assert len(deep) > 4096
    leaf = next(c for c in result.changes if c.path.endswith(b"/leaf"))
    assert leaf.path == deep
    assert leaf.sha256_after == sha("deep\n")
    # Below the walk's depth limit the list is incomplete, and says so.
    assert result.truncated
    assert b"/ws-root/too-deep/x" in {c.path for c in result.changes}


def test_deleted_directory_count_stays_on_its_file_system(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    write(lower / "gone" / "a", "a\n")
    mkdir(lower / "gone" / "mnt")
    os.chmod(lower, 0o755)
    # A mount below the lower (in the child's namespace only): the overlay does not see
    # into it, so its three files are not part of what was deleted.
    setup = 'mount -t tmpfs tmpfs "$L0/gone/mnt"; cd "$L0/gone/mnt"; touch 1 2 3'
    out = run_overlay(tmp_path, "rm -rf gone", DiffOptions(workspace=b"/"), setup=setup)
    (gone,) = out["results"][0].changes
    assert (gone.path, gone.kind, gone.entries_deleted) == (b"/ws-root/gone", D, 2)


def test_binary_detection(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    write(lower / "nul-new.txt", "text\n")
    write(lower / "nul-old.txt", "a\x00b\n")
    write(lower / "latin1-old.txt", b"caf\xe9\n")
    os.chmod(lower, 0o755)
    late_nul = "x" * 8200 + "\x00\n"  # valid UTF-8, and no NUL in the first 8 KiB
    (tmp_path / "late").write_text(late_nul)
    script = f"""
        printf 'te\\000t\\n' > nul-new.txt
        printf 'a b\\n' > nul-old.txt
        printf 'cafe\\n' > latin1-old.txt
        cp {tmp_path}/late late-nul.txt
    """
    out = run_overlay(tmp_path, script, DiffOptions(workspace=b"/"))
    got = {c.path.rsplit(b"/", 1)[1]: c for c in out["results"][0].changes}
    for name in (b"nul-new.txt", b"nul-old.txt", b"latin1-old.txt"):
        change = got[name]
        assert (change.kind, change.binary, change.unified_diff) == (M, True, ""), name
        assert not change.diff_truncated
    late = got[b"late-nul.txt"]
    assert (late.binary, late.unified_diff) == (
        False,
        created_diff("/ws-root/late-nul.txt", late_nul),
    )


def test_devices_fifos_and_a_cut_before_the_no_newline_marker(tmp_path: Path) -> None:
    lower = tmp_path / "L"
    mkdir(lower)
    os.mkfifo(lower / "pipe", 0o644)
    os.mkfifo(lower / "quiet-pipe", 0o644)
    os.mknod(lower / "dev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(lower / "dev", 0o644)  # mknod obeys the umask
    body = "".join(f"line-{i:04d}\n" for i in range(13)) + "tail"
    (tmp_path / "body").write_text(body)
    script = f"""
        rm dev; mknod dev c 1 5; chmod 644 dev
        rm pipe; mknod pipe c 1 3; chmod 644 pipe
        chmod 600 quiet-pipe
        cp {tmp_path}/body k.txt
    """
    out = run_overlay(tmp_path, script, DiffOptions(workspace=b"/", diff_file_bytes=200))
    got = {c.path.rsplit(b"/", 1)[1]: c for c in out["results"][0].changes}
    assert set(got) == {b"dev", b"pipe", b"quiet-pipe", b"k.txt"}
    dev, pipe, quiet = got[b"dev"], got[b"pipe"], got[b"quiet-pipe"]
    assert (dev.kind, dev.file_type, dev.previous_file_type) == (M, OTHER, OTHER)  # rdev
    assert (pipe.kind, pipe.file_type, pipe.previous_file_type) == (M, OTHER, OTHER)  # type
    assert (quiet.kind, quiet.mode_before, quiet.mode_after) == (META, 0o644, 0o600)
    # The diff is 228 bytes: 51 of headers, 13 lines of 11, "+tail" and the marker line.
    # Cut to 200 bytes, the last line goes too, as it is not whole without its marker.
    k = got[b"k.txt"]
    full = created_diff("/ws-root/k.txt", body)
    assert len(full) == 228
    assert (k.unified_diff, k.diff_truncated) == (full[: 51 + 13 * 11], True)


def test_a_hard_link_to_a_lower_file_names_its_other_name(tmp_path: Path) -> None:
    """``ln`` in an overlay copies the lower file up and links the copy: both names are in the
    upper layer, linked. The new name is reported CREATED with ``links`` and ``linked_to`` (the
    name outside the workspace); the copy-up alone is no change. A file copied up for another
    reason keeps one name (a copy-up breaks the host's links), so ``links`` stays 0."""
    lower = tmp_path / "L"
    write(lower / "etc" / "shadow", "root:*:1::::::\n", 0o640)
    os.chown(lower / "etc" / "shadow", 0, 42)
    mkdir(lower / "ws")
    write(lower / "ws" / "mine", "mine\n")
    write(lower / "ws" / "host-a", "linked on the host\n")
    os.link(lower / "ws" / "host-a", lower / "ws" / "host-b")
    got = run_overlay(
        tmp_path,
        """
        ln etc/shadow ws/x
        ln ws/mine ws/mine2
        echo new > ws/new && ln ws/new ws/new2
        echo more >> ws/host-a
        """,
        DiffOptions(workspace=b"/ws-root/ws"),
    )["results"][0]
    changes = {c.path: c for c in got.changes}
    assert set(changes) == {
        b"/ws-root/ws/x",
        b"/ws-root/ws/mine2",
        b"/ws-root/ws/new",
        b"/ws-root/ws/new2",
        b"/ws-root/ws/host-a",
    }
    x = changes[b"/ws-root/ws/x"]
    assert (x.kind, x.uid_after, x.gid_after, x.mode_after) == (C, 0, 42, 0o640)
    assert (x.links, x.linked_to) == (2, b"/ws-root/etc/shadow")
    mine2 = changes[b"/ws-root/ws/mine2"]
    assert (mine2.kind, mine2.links, mine2.linked_to) == (C, 2, b"/ws-root/ws/mine")
    assert changes[b"/ws-root/ws/new"].linked_to == b"/ws-root/ws/new2"
    assert changes[b"/ws-root/ws/new2"].linked_to == b"/ws-root/ws/new"
    host_a = changes[b"/ws-root/ws/host-a"]
    assert (host_a.kind, host_a.links, host_a.linked_to) == (M, 0, b"")
