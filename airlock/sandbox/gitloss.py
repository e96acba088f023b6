"""Lost work: what a dry run would destroy in a git repository that exists nowhere else.

Changes inside the workspace are allowed by design, but some of them throw away work
that is in no commit and no other file: ``git reset --hard`` or ``git checkout -- .`` on
a dirty tree, ``rm -rf ./*`` over untracked files, ``git branch -D`` of an unmerged
branch, ``git stash clear``. The dry run can tell which, by comparing each repository the
run touched *before* (the host directory: the overlay's unchanged lower layer) and *after*
(the sandbox's merged view, below the scratch root), once the command has ended and while
the upper layers still exist.

What counts as lost (:class:`airlock.types.LostKind`):

* UNCOMMITTED: a tracked file whose content before differed from the index or HEAD, and
  which after is deleted, or holds the index's or HEAD's content again (reverted). An edit
  of a dirty file to some third content is an edit, not a loss.
* UNTRACKED: an untracked file git does not ignore, deleted.
* IGNORED: an ignored file (or directory, ``--directory``) deleted: the policy decides
  which count (the shipped one: ``.env`` files); build output does not.
* COMMITS: commits reachable before from a branch, tag, HEAD or the stash's ref and from
  none of them after. The reflog does not count as safe: it expires, and ``git gc`` prunes
  what only it holds.
* STASH: stash entries gone after, unless the run applied them (``git stash pop``: every
  path the entry changed holds the entry's content after).

Content that is kept is not lost: a file's old content found after in the index, in a
tree of a ref the run moved or created (``git stash``, ``git commit``), or as the new
content of a changed file (``mv``).

**No git program runs outside the sandbox's rules with the command's configuration**: the
check runs in a child of the (single-threaded) supervisor, as the caller (uid, gid,
groups, no capabilities, no_new_privs), and calls only plumbing that reads
(``ls-files``, ``ls-tree``, ``for-each-ref``, ``rev-parse``, ``rev-list``, ``diff-tree``),
with no system or global configuration, no optional locks, fsmonitor and the untracked
cache off. None of these runs a filter, hook, pager or fsmonitor, which a repository's
configuration (the after view's is the command's to write) could name. File content is
hashed here, without filters; the index's stat data first says whether a file is clean,
so a clean LFS file is not hashed. Bounds: a wall-clock deadline for the whole check, a cap
on each git's output, on the paths examined and on the bytes hashed. A check that cannot
finish reports UNCHECKED, and only for a repository whose run deleted or modified files
or changed something under ``.git`` (a run that only created files can lose nothing).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import select
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from airlock.sandbox import _digest, _wire, user
from airlock.sandbox import _syscalls as sc
from airlock.types import ChangeKind, FileChange, FileType, LostKind, LostWork

if TYPE_CHECKING:
    # Imported where it is used: subprocess imports threading, whose after-fork hook would
    # run in every process the spawner forks (spawner.py, "No threading").
    import subprocess

__all__ = ["Helper", "Limits", "RepoPlan", "check", "find_repos", "judge_repo"]


@dataclass(frozen=True)
class Limits:
    """The bounds of one check."""

    timeout_s: float = 5.0
    output_bytes: int = 16 * 1024 * 1024  # per git command
    hash_bytes: int = 256 * 1024 * 1024  # file content hashed, all repositories together
    max_repos: int = 8
    max_paths: int = 4096  # candidate paths per repository (past it: the whole repository)
    max_items: int = 1000  # lost files reported per repository (the rest are counted)
    max_tips: int = 16  # moved or new ref tips whose trees count as keeping content


@dataclass(frozen=True)
class RepoPlan:
    """One repository to check: its work tree, the paths the run deleted or modified in it
    (relative, bytes), whether it changed anything under the git directory."""

    worktree: bytes
    gone: tuple[bytes, ...]  # deleted, or a directory replaced: everything below is gone
    modified: tuple[bytes, ...]  # regular files and links with new content
    git_changed: bool


class _Unchecked(Exception):
    pass


_GIT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_LITERAL_PATHSPECS": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "HOME": "/nonexistent",
}
_GIT_OPTS = (
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.untrackedCache=false",
    "-c",
    "safe.directory=*",
    "-c",
    "core.quotePath=false",
)


# --------------------------------------------------------------------------- planning


def find_repos(
    changes: Sequence[FileChange], is_repo: Callable[[bytes], bool], max_repos: int
) -> tuple[list[RepoPlan], bool]:
    """The repositories the run's changes are in (the workspace's, and any other: a static
    rule that gives way to this check must not leave ``git -C /tmp/x reset --hard``
    unchecked); whether there were too many.

    ``is_repo(dir)`` says whether ``dir`` (a host path) holds a ``.git``; every ancestor of
    a changed path is asked at most once. Only changes that can lose something count:
    deletions and modifications (a created file replaced nothing), and any change under
    a ``.git`` directory (refs, index, stash)."""
    known: dict[bytes, bytes | None] = {}

    def repo_of(path: bytes) -> bytes | None:
        d = os.path.dirname(path)
        seen: list[bytes] = []
        found: bytes | None = None
        while True:
            if d in known:
                found = known[d]
                break
            seen.append(d)
            if os.path.basename(d) != b".git" and is_repo(d):
                found = d
                break
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for s in seen:
            known[s] = found
        return found

    plans: dict[bytes, tuple[list[bytes], list[bytes], list[bool]]] = {}
    for c in changes:
        if c.kind is ChangeKind.CREATED and b"/.git/" not in c.path + b"/":
            continue
        root = repo_of(c.path)
        if root is None:
            continue
        rel = c.path[len(root) + 1 :]
        entry = plans.setdefault(root, ([], [], [False]))
        if rel == b".git" or rel.startswith(b".git/"):
            entry[2][0] = True
            continue
        if c.kind is ChangeKind.DELETED or (
            c.kind is ChangeKind.MODIFIED and c.previous_file_type is FileType.DIRECTORY
        ):
            entry[0].append(rel)
        elif c.kind is ChangeKind.MODIFIED:
            entry[1].append(rel)
    out = [
        RepoPlan(root, tuple(g), tuple(m), flag[0])
        for root, (g, m, flag) in sorted(plans.items())
        if g or m or flag[0]
    ]
    return out[:max_repos], len(out) > max_repos


# --------------------------------------------------------------------------- running git


class _Git:
    def __init__(self, gitdir: bytes, worktree: bytes, limits: Limits, deadline: float) -> None:
        self.gitdir = gitdir
        self.worktree = worktree
        self.limits = limits
        self.deadline = deadline

    def run(self, *args: str | bytes, stdin: bytes = b"", ok: tuple[int, ...] = (0,)) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Unchecked("the check ran out of time")
        argv: list[str | bytes] = [
            "git",
            *_GIT_OPTS,
            b"--git-dir=" + self.gitdir,
            b"--work-tree=" + self.worktree,
            *args,
        ]
        import subprocess

        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=_GIT_ENV,
                cwd=self.worktree if os.path.isdir(self.worktree) else "/",
            )
        except OSError as exc:
            raise _Unchecked(f"git could not run: {exc.strerror}") from exc
        out, code = _communicate(proc, stdin, self.limits.output_bytes, self.deadline)
        if code not in ok:
            raise _Unchecked(f"git {os.fsdecode(args[0])} failed (exit {code})")
        return out


def _communicate(
    proc: subprocess.Popen[bytes], stdin: bytes, limit: int, deadline: float
) -> tuple[bytes, int]:
    """Feed ``stdin``, read stdout up to ``limit`` bytes before ``deadline``; the exit code."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with contextlib.suppress(BrokenPipeError):
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        chunks: list[bytes] = []
        size = 0
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Unchecked("the check ran out of time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _Unchecked("git's output went past the check's bound (a repository too big)")
            chunks.append(chunk)
        left = max(0.0, deadline - time.monotonic())
        import subprocess

        try:
            code = proc.wait(left)
        except subprocess.TimeoutExpired as exc:
            raise _Unchecked("the check ran out of time") from exc
        return b"".join(chunks), code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# --------------------------------------------------------------------------- reading state


@dataclass(frozen=True)
class _IndexEntry:
    mode: int
    oid: bytes
    stat: tuple[int, int, int, int, int] | None  # mtime s, mtime ns, size, ino, ctime s


_DEBUG = re.compile(
    rb"\A  ctime: (\d+):(\d+)\n  mtime: (\d+):(\d+)\n  dev: \d+\tino: (\d+)\n"
    rb"  uid: \d+\tgid: \d+\n  size: (\d+)\tflags: [0-9a-f]+\n"
)


def _index(git: _Git, specs: Sequence[bytes]) -> dict[bytes, _IndexEntry]:
    """Stage-0 index entries (with their stat data) under ``specs`` (all when empty)."""
    out = git.run("ls-files", "-s", "--debug", "-z", "--", *specs)
    entries: dict[bytes, _IndexEntry] = {}
    rest = out
    while rest:
        header, sep, rest = rest.partition(b"\0")
        if not sep:
            break
        m = _DEBUG.match(rest)
        st = None
        if m is not None:
            ctime_s, _cns, mtime_s, mtime_ns, ino, size = (int(x) for x in m.groups())
            st = (mtime_s, mtime_ns, size, ino, ctime_s)
            rest = rest[m.end() :]
        meta, _tab, path = header.partition(b"\t")
        fields = meta.split()
        if len(fields) == 3 and fields[2] == b"0":
            entries[path] = _IndexEntry(int(fields[0], 8), fields[1], st)
    return entries


def _tree(git: _Git, rev: str | bytes, specs: Sequence[bytes] = ()) -> dict[bytes, bytes]:
    """path -> blob id of ``rev``'s tree (recursively), under ``specs``."""
    out = git.run("ls-tree", "-r", "-z", "--full-tree", rev, "--", *specs)
    blobs: dict[bytes, bytes] = {}
    for rec in out.split(b"\0"):
        meta, _tab, path = rec.partition(b"\t")
        fields = meta.split()
        if len(fields) == 3 and fields[1] == b"blob":
            blobs[path] = fields[2]
    return blobs


def _others(git: _Git, specs: Sequence[bytes], ignored: bool) -> list[bytes]:
    args = ["ls-files", "-o", "--exclude-standard", "-z"]
    if ignored:
        args += ["-i", "--directory"]
    out = git.run(*args, "--", *specs)
    return [p for p in out.split(b"\0") if p]


def _refs(git: _Git) -> dict[bytes, bytes]:
    """refname -> object id, HEAD included (when it names a commit)."""
    out = git.run("for-each-ref", "--format=%(objectname) %(refname)")
    refs = {}
    for line in out.splitlines():
        oid, _sp, name = line.partition(b" ")
        refs[name] = oid
    head = git.run("rev-parse", "-q", "--verify", "HEAD^{commit}", ok=(0, 1)).strip()
    if head:
        refs[b"HEAD"] = head
    return refs


def _stash_entries(gitdir: bytes) -> list[bytes]:
    """The stash's entries (commit ids, newest first), read from its reflog file."""
    common = gitdir
    with contextlib.suppress(OSError), open(os.path.join(gitdir, b"commondir"), "rb") as f:
        common = os.path.join(gitdir, f.read().strip())
    try:
        with open(os.path.join(common, b"logs", b"refs", b"stash"), "rb") as f:
            data = f.read(4 * 1024 * 1024)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _Unchecked(f"cannot read the stash: {exc.strerror}") from exc
    entries = [line.split(b" ", 2)[1] for line in data.splitlines() if line.count(b" ") >= 2]
    return entries[::-1]


def _gitdir(worktree: bytes, prefix: bytes) -> bytes | None:
    """The git directory of the work tree at ``prefix + worktree`` (a ``.git`` directory or
    a ``.git`` file's ``gitdir:``, mapped below ``prefix``); None if there is none."""
    dotgit = prefix + worktree + b"/.git"
    try:
        st = os.lstat(dotgit)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return dotgit
    if not stat.S_ISREG(st.st_mode):
        return None
    with open(dotgit, "rb") as f:
        line = f.read(4096).strip()
    if not line.startswith(b"gitdir:"):
        return None
    target = line[len(b"gitdir:") :].strip()
    if target.startswith(b"/"):
        return prefix + os.path.normpath(target)
    return prefix + os.path.normpath(os.path.join(worktree, target))


# --------------------------------------------------------------------------- hashing


class _Hasher:
    def __init__(self, budget: int, sha256_repo: bool) -> None:
        self.left = budget
        self.algo = "sha256" if sha256_repo else "sha1"

    def blob(self, path: bytes) -> tuple[bytes, str] | None:
        """(git blob id, sha256 hex of the content) of the entry at ``path``; None if it is
        missing or neither a file nor a link. Raises _Unchecked past the budget."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path)
            return self._ids(data), _digest.sha256(data).hexdigest()
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > self.left:
            raise _Unchecked("more file content than the check hashes")
        self.left -= st.st_size
        h = _digest.new(self.algo)
        h256 = _digest.sha256()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _Unchecked(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
        h.update(b"blob %d\0" % st.st_size)
        size = 0
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if size > st.st_size:
                    break
                h.update(chunk)
                h256.update(chunk)
        if size != st.st_size:
            raise _Unchecked(f"{os.fsdecode(path)} changed while it was read")
        return h.hexdigest().encode(), h256.hexdigest()

    def _ids(self, data: bytes) -> bytes:
        h = _digest.new(self.algo)
        h.update(b"blob %d\0" % len(data))
        h.update(data)
        return h.hexdigest().encode()


def _clean_by_stat(path: bytes, e: _IndexEntry, index_mtime: float) -> bool:
    """Whether the index's stat data says the file at ``path`` is as staged (git's own test:
    same mtime, size, inode and ctime, and not racily clean)."""
    if e.stat is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mtime_s, mtime_ns, size, ino, ctime_s = e.stat
    if (st.st_mtime_ns // 1_000_000_000, st.st_mtime_ns % 1_000_000_000) != (mtime_s, mtime_ns):
        return False
    if st.st_size != size or st.st_ino != ino or int(st.st_ctime) != ctime_s:
        return False
    return st.st_mtime < index_mtime


# --------------------------------------------------------------------------- judging


def _under(path: bytes, tops: Sequence[bytes]) -> bool:
    return any(path == t or path.startswith(t + b"/") for t in tops)


def judge_repo(
    plan: RepoPlan,
    merged_prefix: bytes,
    kept_sha256: frozenset[str],
    limits: Limits,
    deadline: float,
    hasher: _Hasher | None = None,
) -> list[LostWork]:
    """The work ``plan``'s repository loses: its host directory before, the same path below
    ``merged_prefix`` after. ``kept_sha256``: the content of every file the run created or
    modified (a file moved elsewhere is not lost). Raises _Unchecked."""
    root = plan.worktree
    gitdir_b = _gitdir(root, b"")
    if gitdir_b is None:
        return []
    before = _Git(gitdir_b, root, limits, deadline)
    if hasher is None:
        fmt = before.run("rev-parse", "--show-object-format", ok=(0, 128)).strip()
        hasher = _Hasher(limits.hash_bytes, fmt == b"sha256")
    gitdir_a = _gitdir(root, merged_prefix)
    after = _Git(gitdir_a, merged_prefix + root, limits, deadline) if gitdir_a else None

    specs: list[bytes] = list(plan.gone) + list(plan.modified)
    if len(specs) > limits.max_paths:
        specs = []  # the whole repository
    out: list[LostWork] = []

    refs_b = _refs(before)
    stash_b = _stash_entries(gitdir_b)
    refs_a = _refs(after) if after is not None else {}
    stash_a = _stash_entries(gitdir_a) if gitdir_a is not None else []

    # What the run kept: the after index, the trees of refs it moved or made, the stash
    # entries it made (their index and untracked parents too). Read only once a loss is
    # in sight: an edit of a clean file never needs it.
    kept_cache: list[set[bytes]] = []

    def kept_blobs() -> set[bytes]:
        if kept_cache:
            return kept_cache[0]
        blobs: set[bytes] = set()
        if after is not None:
            blobs.update(e.oid for e in _index(after, ()).values())
            old = set(refs_b.values()) | set(stash_b)
            new = [oid for oid in dict.fromkeys([*refs_a.values(), *stash_a]) if oid not in old]
            for tip in new[: limits.max_tips]:
                blobs.update(_tree(after, tip).values())
                if tip in stash_a:
                    for parent in (b"^2", b"^3"):
                        with contextlib.suppress(_Unchecked):
                            blobs.update(_tree(after, tip + parent).values())
        kept_cache.append(blobs)
        return blobs

    # Kept by a blob id the after repository names: lost after all if it lacks the object
    # (an index or tree the command wrote can name content git never stored).
    pending: list[tuple[bytes, LostWork]] = []

    def kept(ids: tuple[bytes, str], loss: LostWork) -> bool:
        if ids[1] and ids[1] in kept_sha256:
            return True  # the content of a file the run created or changed (the diff read it)
        if ids[0] in kept_blobs():
            pending.append((ids[0], loss))
            return True
        return False

    files: list[LostWork] = []
    if plan.gone or plan.modified:
        index_b = _index(before, specs)
        head_b = _tree(before, "HEAD", specs) if b"HEAD" in refs_b else {}
        try:
            index_mtime = os.stat(gitdir_b + b"/index").st_mtime
        except OSError:
            index_mtime = 0.0
        gone, modified = plan.gone, plan.modified
        for rel, e in sorted(index_b.items()):
            if e.mode == 0o160000 or not (_under(rel, gone) or rel in modified):
                continue
            host = root + b"/" + rel
            if _clean_by_stat(host, e, index_mtime):
                wt = e.oid
                if e.oid == head_b.get(rel):
                    continue  # clean: committed as it is
                ids: tuple[bytes, str] | None = (wt, "")
            else:
                ids = hasher.blob(host)
                if ids is None:
                    continue  # missing before (already deleted): nothing to lose here
                wt = ids[0]
            if wt == e.oid and e.oid == head_b.get(rel):
                continue  # clean
            now = hasher.blob(merged_prefix + host)
            if now is not None:
                if now[0] == wt:
                    continue  # unchanged
                if now[0] not in (e.oid, head_b.get(rel)):
                    continue  # edited to new content: an edit, not a loss
            assert ids is not None
            loss = LostWork(LostKind.UNCOMMITTED, root, host)
            if not kept(ids, loss):
                files.append(loss)
        # Untracked and ignored files can only be lost by a deletion.
        for rel in _others(before, specs, ignored=False) if gone else ():
            if not _under(rel.rstrip(b"/"), gone):
                continue
            host = root + b"/" + rel
            if os.path.lexists(merged_prefix + host):
                continue
            ids = hasher.blob(host)
            loss = LostWork(LostKind.UNTRACKED, root, host)
            if ids is None or not kept(ids, loss):
                files.append(loss)
        for rel in _others(before, specs, ignored=True) if gone else ():
            if not _under(rel.rstrip(b"/"), gone) and not any(g.startswith(rel) for g in gone):
                continue
            host = root + b"/" + rel
            if os.path.lexists(merged_prefix + host.rstrip(b"/")):
                continue
            files.append(LostWork(LostKind.IGNORED, root, host))
    if pending and after is not None:
        asked = b"".join(b"%s\n" % oid for oid, _loss in pending)
        answer = after.run("cat-file", "--batch-check=%(objectname) %(objecttype)", stdin=asked)
        present = {
            line.split(b" ", 1)[0] for line in answer.splitlines() if line.endswith(b" blob")
        }
        files += [loss for oid, loss in pending if oid not in present]
        files.sort(key=lambda w: (w.kind, w.path))
    if len(files) > limits.max_items:
        # The first ones by name; the rest counted, one entry (no path) per kind.
        extra: dict[LostKind, int] = {}
        for w in files[limits.max_items :]:
            extra[w.kind] = extra.get(w.kind, 0) + 1
        files = files[: limits.max_items]
        files += [LostWork(kind, root, count=n) for kind, n in extra.items()]
    out += files

    # Commits: reachable before from a ref (the stash entries aside: those are STASH) and
    # from no ref after.
    stash_set = set(stash_b)
    tips_b = {oid for name, oid in refs_b.items() if name != b"refs/stash" and oid not in stash_set}
    if tips_b - set(refs_a.values()):  # every old tip still a ref: nothing unreachable
        counter = after if after is not None else before
        exclude = set(refs_a.values()) | set(stash_a) if after is not None else set()
        if after is not None:
            # A ref after may name an object the after repository lacks (it would fail).
            exclude = {o for o in exclude if o}
        lines = b"".join(b"%s\n" % t for t in sorted(tips_b))
        lines += b"".join(b"^%s\n" % t for t in sorted(exclude))
        counted = counter.run("rev-list", "--count", "--stdin", stdin=lines).strip()
        n = int(counted or b"0")
        if n:
            out.append(LostWork(LostKind.COMMITS, root, count=n))

    dropped = [s for s in stash_b if s not in set(stash_a)]
    lost_stash = 0
    for entry in dropped:
        if after is None or not _stash_applied(after, entry, merged_prefix + root, hasher):
            lost_stash += 1
    if lost_stash:
        out.append(LostWork(LostKind.STASH, root, count=lost_stash))
    return out


def _stash_applied(git: _Git, entry: bytes, merged_root: bytes, hasher: _Hasher) -> bool:
    """Whether every path the stash entry changed holds the entry's content after."""
    out = git.run("diff-tree", "-r", "-z", "--no-renames", entry + b"^1", entry, ok=(0, 128))
    parts = out.split(b"\0")
    i = 0
    seen = 0
    while i + 1 < len(parts):
        meta, path = parts[i], parts[i + 1]
        i += 2
        fields = meta.split()
        if len(fields) < 5:
            return False
        seen += 1
        if seen > 4096:
            return False
        now = hasher.blob(merged_root + b"/" + path)
        if fields[4] == b"D":
            if now is not None:
                return False
        elif now is None or now[0] != fields[3]:
            return False
    return seen > 0


def check(
    plans: Sequence[RepoPlan],
    merged_prefix: bytes,
    kept_sha256: frozenset[str],
    limits: Limits,
    too_many: bool = False,
) -> tuple[LostWork, ...]:
    """Every repository's lost work; UNCHECKED for one the check could not finish."""
    deadline = time.monotonic() + limits.timeout_s
    out: list[LostWork] = []
    for plan in plans:
        try:
            out += judge_repo(plan, merged_prefix, kept_sha256, limits, deadline)
        except (_Unchecked, OSError, ValueError) as exc:
            out.append(LostWork(LostKind.UNCHECKED, plan.worktree, detail=str(exc)))
    if too_many:
        out.append(
            LostWork(
                LostKind.UNCHECKED,
                b"",
                detail=f"the run changed more than {limits.max_repos} repositories",
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- the supervisor's side


def _is_repo(d: bytes) -> bool:
    return os.path.lexists(d + b"/.git")


def check_run(
    changes: Sequence[FileChange],
    merged_prefix: bytes,
    uid: int,
    gid: int,
    groups: tuple[int, ...],
    limits: Limits = Limits(),
) -> tuple[LostWork, ...]:
    """The lost work of a run, asked by the supervisor once the command has ended: () at
    once when no change can lose any (no repository touched: no process is forked), else
    a :class:`Helper`'s answer, or UNCHECKED."""
    plans, too_many = find_repos(changes, _is_repo, limits.max_repos)
    if not plans:
        return ()
    try:
        helper = Helper()
    except OSError as exc:
        return (_unchecked(f"the check for lost work could not start: {exc.strerror or exc}"),)
    return helper.check(changes, plans, too_many, merged_prefix, uid, gid, groups, limits)


class Helper:
    """The process that checks for lost work, forked by the supervisor after the command.

    Forked only when the run touched a repository (:func:`check_run`): most dry runs touch
    none, and a fork of the supervisor (a ~22 MB Python process) cost ~650 page faults, its
    own and the supervisor's, ~3 ms of CPU per dry run (docs/performance.md). By then the
    sandbox's pid namespace, the one the supervisor unshared for its children, takes no new
    process (its init has exited: fork fails with ENOMEM), so the supervisor first makes its
    own pid namespace (the host's) the one of its children again (``setns``; a process may
    always enter its own). The helper
    shares the supervisor's mount namespace (the merged view is below the scratch root
    there) and network namespace, closes every descriptor it inherited, dies with the
    supervisor (parent-death signal) and waits, as root, for one job: then it becomes the
    caller (uid, gid, groups, no capabilities, no_new_privs), checks, answers and exits. Its
    git processes are its own process group, killed with it at the deadline."""

    def __init__(self) -> None:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(own, sc.CLONE_NEWPID)  # children in the host's pid namespace again
        finally:
            os.close(own)
        job_r, self.job_w = os.pipe2(os.O_CLOEXEC)
        self.result_r, result_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = sc.fork()
        if pid == 0:  # the helper: never returns
            try:
                sc.set_parent_death_signal(signal.SIGKILL)
                if os.getppid() == parent:
                    os.setpgid(0, 0)
                    for name in os.listdir("/proc/self/fd"):
                        fd = int(name)
                        if fd > 2 and fd not in (job_r, result_w):
                            with contextlib.suppress(OSError):
                                os.close(fd)
                    _serve(job_r, result_w)
            finally:
                os._exit(0)
        os.close(job_r)
        os.close(result_w)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self.pid = pid

    def check(
        self,
        changes: Sequence[FileChange],
        plans: Sequence[RepoPlan],
        too_many: bool,
        merged_prefix: bytes,
        uid: int,
        gid: int,
        groups: tuple[int, ...],
        limits: Limits = Limits(),
    ) -> tuple[LostWork, ...]:
        """The helper's answer on ``plans`` (:func:`find_repos` of ``changes``), or
        UNCHECKED past the deadline. Closes the helper."""
        try:
            kept = frozenset(
                c.sha256_after
                for c in changes
                if c.sha256_after and c.kind in (ChangeKind.CREATED, ChangeKind.MODIFIED)
            )
            job = (tuple(plans), merged_prefix, tuple(kept), uid, gid, groups, limits, too_many)
            try:
                _write_all(self.job_w, _wire.dumps(job))
            except OSError:
                return (_unchecked("the check for lost work could not start"),)
            os.close(self.job_w)
            self.job_w = -1
            return self._answer(time.monotonic() + limits.timeout_s + 1.0)
        finally:
            self.close()

    def _answer(self, deadline: float) -> tuple[LostWork, ...]:
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return (_unchecked("the check for lost work ran out of time"),)
            ready, _, _ = select.select([self.result_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.result_r, 1 << 16)
            if not chunk:
                break
            data += chunk
            if len(data) > 64 * 1024 * 1024:
                return (_unchecked("the check for lost work answered too much"),)
        try:
            result = _wire.loads(bytes(data))
        except Exception:
            return (_unchecked("the check for lost work failed"),)
        if not isinstance(result, tuple) or not all(isinstance(x, LostWork) for x in result):
            return (_unchecked("the check for lost work failed"),)
        return result

    def close(self) -> None:
        """Kill the helper and its git processes (if still there) and reap it."""
        for fd in (self.job_w, self.result_r):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.job_w = self.result_r = -1
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def _unchecked(why: str) -> LostWork:
    return LostWork(LostKind.UNCHECKED, b"", detail=why)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _serve(job_r: int, result_w: int) -> None:
    """The helper's one job: become the caller, check, answer."""
    try:
        job = _wire.read_fd(job_r)
    except (OSError, EOFError, ValueError):
        return  # the sandbox was closed without a check
    plans, merged_prefix, kept, uid, gid, groups, limits, too_many = job
    try:
        # Imported now, as root: not at the top (the spawner must not import it: spawner.py,
        # "No threading"), nor as the caller, who may not read the interpreter's library.
        import subprocess  # noqa: F401

        user.become(uid, gid, groups)
        result = check(plans, merged_prefix, frozenset(kept), limits, too_many)
    except Exception as exc:
        result = (_unchecked(f"the check for lost work failed: {exc}"),)
    with contextlib.suppress(OSError):
        _write_all(result_w, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
