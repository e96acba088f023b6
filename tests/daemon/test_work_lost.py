"""Lost work in the workspace, judged by the dry run (issue 14, blind spot 3).

A real daemon with the shipped default policy; each test makes a real git repository in
the workspace, validates a command that changes it and checks the verdict, the finding of
effect.work-lost and the summary. The dry run compares the repository before (the host)
and after (the sandbox's view): `git reset --hard` on a clean tree loses nothing and is
allowed (the static ask of vcs.git-reset-hard gives way), on a dirty tree it asks naming
the file. The host repository is never changed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from airlock import FailedPrecondition
from airlock.client import Client
from airlock.types import FindingSource, Validation, Verdict
from tests.helpers.users import run_client_as, temporary_user

_GIT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}
COMMITTED = (
    "git init -q -b main . && echo one > README.md && mkdir src && echo x > src/a.py"
    " && git add -A && git commit -qm1"
)


def sh(cwd: Path, script: str) -> None:
    subprocess.run(["bash", "-euc", script], cwd=cwd, env=_GIT_ENV, check=True, capture_output=True)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        for p in sorted(root.rglob("*"))
    }


def lost_finding(v: Validation) -> str:
    found = [f.message for f in v.findings if f.rule_id == "effect.work-lost"]
    return found[0] if found else ""


def validate(client: Client, workspace: Path, setup: str, command: str) -> Validation:
    sh(workspace, setup)
    before = snapshot(workspace)
    # A git identity: without one git looks the host's name up (a DNS query, which asks).
    v = client.validate(command, cwd=str(workspace), env=_GIT_ENV)
    assert snapshot(workspace) == before  # a dry run: the host repository is as it was
    return v


def test_reset_hard_on_a_clean_tree_is_allowed(client: Client, workspace: Path) -> None:
    v = validate(client, workspace, COMMITTED, "git reset --hard")
    assert v.verdict is Verdict.ALLOW, v.summary
    # The static rule is still reported, as information: the dry run decided.
    static = [f for f in v.findings if f.rule_id == "vcs.git-reset-hard"]
    assert static and static[0].source is FindingSource.STATIC
    assert static[0].verdict is Verdict.ALLOW
    assert not lost_finding(v)
    assert "Loses work" not in v.summary


def test_execute_still_asks_for_reset_hard(client: Client, workspace: Path) -> None:
    """Execute has no dry run: the static rule still decides there."""
    sh(workspace, COMMITTED + " && echo mine >> README.md")
    with pytest.raises(FailedPrecondition) as info:
        list(client.execute("git reset --hard", cwd=str(workspace), env=_GIT_ENV))
    assert info.value.reason == "APPROVAL_REQUIRED"
    assert "vcs.git-reset-hard" in info.value.message
    assert (workspace / "README.md").read_text() == "one\nmine\n"


def test_reset_hard_on_a_dirty_tree_asks_naming_the_file(client: Client, workspace: Path) -> None:
    v = validate(client, workspace, COMMITTED + " && echo mine >> README.md", "git reset --hard")
    assert v.verdict is Verdict.ASK
    assert "discards uncommitted changes to README.md" in lost_finding(v)
    assert "Loses work that exists nowhere else: discards uncommitted changes to README.md" in (
        v.summary
    )


def test_rm_star_with_untracked_files_asks(client: Client, workspace: Path) -> None:
    setup = COMMITTED + " && echo 1 > notes.txt && echo 2 > todo.md && echo 3 > src/scratch.py"
    v = validate(client, workspace, setup, "rm -rf ./*")
    assert v.verdict is Verdict.ASK
    assert "deletes 3 untracked files" in lost_finding(v)
    assert "notes.txt" in lost_finding(v)


def test_deleting_clean_tracked_files_is_allowed(client: Client, workspace: Path) -> None:
    v = validate(client, workspace, COMMITTED, "rm -rf src README.md")
    assert v.verdict is Verdict.ALLOW, v.summary
    assert any(c.path.endswith(b"/README.md") for c in v.changes)
    assert not lost_finding(v)


def test_branch_delete_of_unmerged_commits_asks(client: Client, workspace: Path) -> None:
    setup = (
        COMMITTED + " && git checkout -qb feature && echo f > f && git add f && git commit -qm f"
        " && echo g > g && git add g && git commit -qm g && git checkout -q main"
    )
    v = validate(client, workspace, setup, "git branch -D feature")
    assert v.verdict is Verdict.ASK
    assert "drops 2 commits not on any other branch" in lost_finding(v)


def test_branch_delete_of_a_merged_branch_is_allowed(client: Client, workspace: Path) -> None:
    v = validate(client, workspace, COMMITTED + " && git branch feature", "git branch -D feature")
    assert v.verdict is Verdict.ALLOW, v.summary
    assert any(b"refs/heads/feature" in c.path for c in v.changes)


def test_stash_clear_with_entries_asks(client: Client, workspace: Path) -> None:
    setup = (
        COMMITTED + " && echo a >> README.md && git stash -q && echo b >> README.md && git stash -q"
    )
    v = validate(client, workspace, setup, "git stash clear")
    assert v.verdict is Verdict.ASK
    assert "drops 2 stash entries" in lost_finding(v)


def test_checkout_dot_with_modifications_asks(client: Client, workspace: Path) -> None:
    setup = COMMITTED + " && echo mine >> src/a.py"
    v = validate(client, workspace, setup, "git checkout -- .")
    assert v.verdict is Verdict.ASK
    assert "discards uncommitted changes to src/a.py" in lost_finding(v)


def test_restore_dot_on_a_clean_tree_is_allowed(client: Client, workspace: Path) -> None:
    v = validate(client, workspace, COMMITTED, "git restore . && git status --short")
    assert v.verdict is Verdict.ALLOW, v.summary


def test_the_check_runs_as_the_caller(client: Client, public_tmp: Path) -> None:
    """A non-root caller's repository: the check reads it with the caller's rights."""
    home = public_tmp / "home"
    with temporary_user(home) as (uid, gid):
        repo = home / "repo"
        repo.mkdir()
        sh(repo, COMMITTED + " && echo mine >> README.md && echo u > notes.txt")
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(repo)], check=True)
        before = snapshot(repo)
        proc = run_client_as(
            f"with Client({client.socket_path!r}) as c:\n"
            f"    v = c.validate('git reset -q --hard && rm notes.txt', cwd={str(repo)!r},"
            f" env={_GIT_ENV!r})\n"
            "    print(json.dumps([v.verdict.name, v.uid, v.summary]))\n",
            uid=uid,
        )
        assert proc.returncode == 0, proc.stderr
        verdict, as_uid, summary = json.loads(proc.stdout)
        assert (verdict, as_uid) == ("ASK", uid)
        assert "discards uncommitted changes to README.md" in summary
        assert "deletes 1 untracked file (notes.txt)" in summary
        assert snapshot(repo) == before
