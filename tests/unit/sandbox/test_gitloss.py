"""The lost-work comparison (airlock/sandbox/gitloss.py) on real git repositories.

Each case makes a repository, copies it below a "merged" prefix (the sandbox's view after
the command), runs the command in the copy, lists the changes as the dry run's diff would
(deleted, modified, created paths) and asks the check what was lost. The host copy (the
"before") is never changed, as in a dry run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from airlock.sandbox import gitloss
from airlock.types import ChangeKind, FileChange, FileType, LostKind, LostWork

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def sh(cwd: Path, script: str) -> None:
    subprocess.run(["bash", "-euc", script], cwd=cwd, env=_ENV, check=True, capture_output=True)


def _entries(root: Path) -> dict[bytes, tuple[FileType, bytes]]:
    out: dict[bytes, tuple[FileType, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.fsencode(p.relative_to(root))
            if p.is_symlink():
                out[rel] = (FileType.SYMLINK, os.fsencode(os.readlink(p)))
            elif p.is_dir():
                out[rel] = (FileType.DIRECTORY, b"")
            else:
                out[rel] = (FileType.REGULAR, p.read_bytes())
    return out


def changes_between(before: Path, after: Path) -> list[FileChange]:
    """The diff as the dry run reports it: a deleted directory once, its entries not."""
    b, a = _entries(before), _entries(after)
    out: list[FileChange] = []
    host = os.fsencode(before)
    for rel in sorted(set(b) | set(a)):
        parent_gone = any(rel.startswith(p + b"/") for p in b if p not in a)
        if parent_gone:
            continue
        path = host + b"/" + rel
        if rel not in a:
            out.append(FileChange(path, ChangeKind.DELETED, FileType.NONE, b[rel][0], True))
        elif rel not in b:
            sha = hashlib.sha256(a[rel][1]).hexdigest() if a[rel][0] is FileType.REGULAR else ""
            out.append(
                FileChange(
                    path, ChangeKind.CREATED, a[rel][0], FileType.NONE, True, sha256_after=sha
                )
            )
        elif a[rel] != b[rel]:
            sha = hashlib.sha256(a[rel][1]).hexdigest() if a[rel][0] is FileType.REGULAR else ""
            out.append(
                FileChange(path, ChangeKind.MODIFIED, a[rel][0], b[rel][0], True, sha256_after=sha)
            )
    return out


def lost(tmp_path: Path, setup: str, command: str) -> tuple[LostWork, ...]:
    repo = tmp_path / "ws"
    repo.mkdir(parents=True)
    sh(repo, "git init -q -b main . && " + setup)
    merged = tmp_path / "merged"
    copy = merged / repo.relative_to("/")
    shutil.copytree(repo, copy, symlinks=True)
    sh(copy, command)
    changes = changes_between(repo, copy)
    plans, too_many = gitloss.find_repos(changes, gitloss._is_repo, 8)
    return gitloss.check(
        plans,
        os.fsencode(merged),
        frozenset(c.sha256_after for c in changes if c.sha256_after),
        gitloss.Limits(),
        too_many,
    )


def kinds(found: tuple[LostWork, ...]) -> dict[LostKind, list[str]]:
    out: dict[LostKind, list[str]] = {}
    for w in found:
        out.setdefault(w.kind, []).append(
            os.path.basename(w.path.rstrip(b"/")).decode() if w.path else str(w.count)
        )
    return out


COMMITTED = (
    "echo one > README.md && mkdir src && echo x > src/a.py && git add -A && git commit -qm1"
)


def test_reset_hard_on_a_clean_tree_loses_nothing(tmp_path: Path) -> None:
    assert lost(tmp_path, COMMITTED, "git reset -q --hard") == ()


def test_reset_hard_on_a_dirty_tree_names_the_file(tmp_path: Path) -> None:
    found = lost(tmp_path, COMMITTED + " && echo mine >> README.md", "git reset -q --hard")
    assert kinds(found) == {LostKind.UNCOMMITTED: ["README.md"]}


def test_reset_hard_drops_staged_content(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo staged > new.txt && git add new.txt"
    assert kinds(lost(tmp_path, setup, "git reset -q --hard")) == {
        LostKind.UNCOMMITTED: ["new.txt"]
    }


def test_checkout_dot_discards_modifications(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo mine >> src/a.py"
    assert kinds(lost(tmp_path, setup, "git checkout -- .")) == {LostKind.UNCOMMITTED: ["a.py"]}


def test_an_edit_of_a_dirty_file_is_not_a_loss(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo mine >> README.md"
    assert lost(tmp_path, setup, "echo more >> README.md") == ()


def test_stash_keeps_the_changes(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo mine >> README.md"
    assert lost(tmp_path, setup, "git stash -q") == ()


def test_rm_star_counts_untracked_files_not_clean_tracked_ones(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo u1 > notes.txt && echo u2 > src/scratch.py && echo u3 > todo"
    found = kinds(lost(tmp_path, setup, "rm -rf ./*"))
    assert sorted(found[LostKind.UNTRACKED]) == ["notes.txt", "scratch.py", "todo"]
    assert set(found) == {LostKind.UNTRACKED}


def test_deleting_clean_tracked_files_loses_nothing(tmp_path: Path) -> None:
    assert lost(tmp_path, COMMITTED, "rm -rf src README.md") == ()


def test_moving_an_untracked_file_loses_nothing(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo u1 > notes.txt"
    assert lost(tmp_path, setup, "mv notes.txt kept.txt") == ()


def test_ignored_files_are_reported_as_ignored(tmp_path: Path) -> None:
    setup = (
        "printf '.env\\nbuild/\\n' > .gitignore && git add -A && git commit -qm1"
        " && echo SECRET=1 > .env && mkdir build && echo o > build/out.o"
    )
    found = kinds(lost(tmp_path, setup, "rm -rf build .env"))
    assert sorted(found[LostKind.IGNORED]) == [".env", "build"]
    assert set(found) == {LostKind.IGNORED}


def test_branch_delete_of_unmerged_commits(tmp_path: Path) -> None:
    setup = (
        COMMITTED + " && git checkout -qb feature && echo f > f && git add f && git commit -qm f"
        " && echo g > g && git add g && git commit -qm g && git checkout -q main"
    )
    assert kinds(lost(tmp_path, setup, "git branch -q -D feature")) == {LostKind.COMMITS: ["2"]}


def test_branch_delete_of_a_merged_branch_loses_nothing(tmp_path: Path) -> None:
    setup = COMMITTED + " && git branch feature"
    assert lost(tmp_path, setup, "git branch -q -D feature") == ()


def test_new_commit_loses_nothing(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo mine >> README.md"
    assert lost(tmp_path, setup, "git commit -qam two") == ()


def test_stash_clear_drops_entries(tmp_path: Path) -> None:
    setup = (
        COMMITTED + " && echo a >> README.md && git stash -q && echo b >> src/a.py && git stash -q"
    )
    assert kinds(lost(tmp_path, setup, "git stash clear")) == {LostKind.STASH: ["2"]}


def test_stash_pop_applies_the_entry(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo a >> README.md && git stash -q"
    assert lost(tmp_path, setup, "git stash pop -q") == ()


def test_removing_the_git_directory_drops_history(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo two >> README.md && git commit -qam2"
    assert kinds(lost(tmp_path, setup, "rm -rf .git")) == {LostKind.COMMITS: ["2"]}


def test_a_run_that_only_creates_files_is_not_checked(tmp_path: Path) -> None:
    changes = [FileChange(b"/w/r/new.txt", ChangeKind.CREATED, FileType.REGULAR, in_workspace=True)]
    assert gitloss.find_repos(changes, lambda d: d == b"/w/r", 8) == ([], False)


def test_repositories_are_found_once_per_directory(tmp_path: Path) -> None:
    asked: list[bytes] = []

    def is_repo(d: bytes) -> bool:
        asked.append(d)
        return d == b"/w/r"

    changes = [
        FileChange(b"/w/r/a/b/%d" % i, ChangeKind.DELETED, FileType.NONE, in_workspace=True)
        for i in range(50)
    ] + [
        FileChange(
            b"/w/r/.git/refs/heads/x", ChangeKind.CREATED, FileType.REGULAR, in_workspace=True
        )
    ]
    plans, too_many = gitloss.find_repos(changes, is_repo, 8)
    assert not too_many
    assert [(p.worktree, len(p.gone), p.git_changed) for p in plans] == [(b"/w/r", 50, True)]
    assert len(asked) == len(set(asked)) <= 5


def test_a_timeout_is_unchecked(tmp_path: Path) -> None:
    repo = tmp_path / "ws"
    repo.mkdir()
    sh(repo, "git init -q . && " + COMMITTED)
    plan = gitloss.RepoPlan(os.fsencode(repo), (b"README.md",), (), False)
    [w] = gitloss.check(
        [plan], os.fsencode(tmp_path / "m"), frozenset(), gitloss.Limits(timeout_s=0.0)
    )
    assert w.kind is LostKind.UNCHECKED and "time" in w.detail


def test_a_repository_outside_the_workspace_is_checked_too() -> None:
    changes = [FileChange(b"/tmp/x/README.md", ChangeKind.MODIFIED, FileType.REGULAR)]
    plans, _ = gitloss.find_repos(changes, lambda d: d == b"/tmp/x", 8)
    assert [(p.worktree, p.modified) for p in plans] == [(b"/tmp/x", (b"README.md",))]


def test_too_many_repositories_are_unchecked() -> None:
    changes = [
        FileChange(b"/w/r%d/f" % i, ChangeKind.DELETED, FileType.NONE, in_workspace=True)
        for i in range(3)
    ]
    plans, too_many = gitloss.find_repos(changes, lambda d: d.startswith(b"/w/r"), 2)
    assert len(plans) == 2 and too_many
    [w] = gitloss.check([], b"/m", frozenset(), gitloss.Limits(max_repos=2), too_many)
    assert w.kind is LostKind.UNCHECKED and "more than 2 repositories" in w.detail


def test_content_the_index_names_counts_only_if_git_stored_it(tmp_path: Path) -> None:
    setup = COMMITTED + " && echo mine >> README.md"
    revert = "git add README.md && git show HEAD:README.md > README.md"
    assert lost(tmp_path / "a", setup, revert) == ()  # staged: the index keeps it
    forged = revert + ' && b=$(git rev-parse :README.md) && rm -f ".git/objects/${b:0:2}/${b:2}"'
    assert kinds(lost(tmp_path / "b", setup, forged)) == {LostKind.UNCOMMITTED: ["README.md"]}
