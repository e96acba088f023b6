"""Apply: write a saved changeset to the host, exactly, or nothing if the host changed.

:func:`apply` runs with the current process's credentials. The spawner's child that
calls it first opens the changeset (:func:`open_changeset`: the changeset directory
is root's, 0700) and then drops to the requesting user's uid and gids, so the kernel
enforces that the user may write every path; this module defends on its own too.
Every path is walked from ``/`` one component at a time with
``O_DIRECTORY | O_NOFOLLOW``: a symbolic link where a directory is expected is a
conflict, never followed, so a link swapped into a parent after the dry run (say
``workspace/dir -> /etc``) cannot redirect a write. The identity (device, inode) of
every directory seen in the check is verified again whenever a later step opens it.

The steps:

1. **Check** (nothing written). The manifest is checked when loaded; each new
   content is checked against its SHA-256. Every target must be in its recorded
   *before* state: absent for a creation (below a directory the changeset creates,
   nothing is looked at); else the same type, permission bits, owner, and content
   hash (regular file), link target, device or subtree digest (a directory being
   deleted or replaced). A file the process may not read is compared by inode,
   size, mtime and ctime instead, unless its ctime was too close to the save to
   trust. Then what writing takes: write and search permission on each parent
   (and the sticky bit's rule), the subtree of a directory being deleted, the
   ownership of each new entry (see below). Any mismatch raises
   :class:`airlock.Conflict` naming every conflicting path; a missing permission
   raises :class:`airlock.PermissionDenied` (``APPLY_PERMISSION`` or
   ``APPLY_OWNERSHIP``).
2. **Prepare** (undone on failure). In component order (parents first): new
   directories are made (mode 0700 for now; an entry being replaced by a directory
   is first renamed aside); each new regular file is written to a temporary file
   in its directory (``O_EXCL``, owner and mode applied), each new symbolic link,
   FIFO or socket made under a temporary name. The new content is then made
   durable: ``fsync`` of each file when there are a few, else one ``syncfs`` per
   file system (a thousand fsyncs would cost more than the rest of Apply). If
   anything fails, every step is undone and the error raised (a conflict found
   here is a :class:`~airlock.Conflict` too).
3. **Commit**. In component order, each target is checked once more against what
   the check saw (inode, size, times: this narrows the race with other writers),
   then: a temporary entry is renamed over its target (``RENAME_NOREPLACE`` when
   the target must be absent); metadata changes get ``chown`` (root only) and
   ``chmod``; deleted files are unlinked; a deleted or replaced directory is
   renamed aside. Then, children first: directories renamed aside are removed
   (never crossing into another file system), directories get their final mode,
   and every directory touched is fsync'ed.

**Special files** (:mod:`airlock._special`): Apply never makes a file setuid or setgid (a
new one, new content, or a mode change that adds the bit), never writes file capabilities
(``security.capability``), and never writes a device node (a changeset cannot even hold
one: ``CHANGESET_UNSUPPORTED``), unless the caller passes the path in ``approved``: the
daemon passes the paths the validation's approval names (Approve's ``special_paths``). Any
other such file (:data:`~airlock._special.PRIVILEGED`) is refused in the check, before
anything is written (``FailedPrecondition``, ``APPLY_SPECIAL_FILES``, naming each path and
what it is). This holds whatever the policy's verdict was: a policy that forgets its effect
rule for such files does not make Apply write them. FIFOs and sockets are special files
too, but not privileged: Apply creates them with or without an approval. An approved file
gets its capabilities after its owner and mode (the kernel drops them on ``chown``);
setting them needs root.

A failure during the commit stops it: what was not committed yet is undone, and
:class:`ApplyResult` reports ``failed`` (the path), ``error``, what was
``applied`` and ``not_applied``, and any ``leftovers`` (temporary names that
could not be removed). ``ApplyResult.complete`` is False then: a half-applied
changeset is never silent. Errors before the commit raise and leave the host as
it was.

Crash recovery: the daemon writes a journal (:func:`write_journal`: the token that names
every temporary entry, ``.airlock-TOKEN-N`` and ``.airlock-TOKEN-N-old``, and the approved
special paths) into the changeset directory before it starts an apply, and the process
that runs it dies with the daemon. At the next start, :func:`recover` (same user) removes
every temporary entry of that token, then rolls forward (if any change was committed:
the changeset has the new content but only hashes of the old, so a committed change cannot
be undone) or back (nothing committed: the directories prepare made are removed and those
set aside put back), and names each path's state: after, before, or neither.

Ownership: the after uid/gid are the dry run's, i.e. the requesting user's own
(or, for a file edited in place, its owner's). As root, every written entry is
chowned to them. As another user, new entries get the kernel's choice (the
process's uid; its gid or the setgid parent's), and a gid the user may set is
applied; an after uid other than the process's cannot be produced, so Apply
refuses (``APPLY_OWNERSHIP``) rather than write a file with another owner than
reviewed. Not reproduced: timestamps, extended attributes other than file capabilities,
ACLs (the diff does not report them), and hard links (each path gets its own file, as in
the dry run's view, where overlayfs copied each one up separately).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType

from airlock._errors import (
    AirlockError,
    Conflict,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    Reason,
    ResourceExhausted,
)
from airlock._special import CAPABILITY_XATTR, PRIVILEGED, Special, other_type, specials
from airlock.sandbox import _digest
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.changeset import (
    CONTENT_NAME,
    MAX_DEPTH,
    ChangeRecord,
    DirCursor,
    EntryState,
    Manifest,
    components,
    file_type,
    hash_file,
    lstat_at,
    read_manifest,
    tree_digest,
)
from airlock.types import ChangeKind, FileType

__all__ = [
    "JOURNAL_NAME",
    "ApplyResult",
    "Changeset",
    "Recovery",
    "apply",
    "open_changeset",
    "read_journal",
    "record_specials",
    "recover",
    "write_journal",
]

# New content up to this size is kept in memory between its check and its write.
_KEEP_ONE = 1024 * 1024
_KEEP_TOTAL = 64 * 1024 * 1024
# Up to this many new files are fsync'ed one by one; more get one syncfs per file system.
_FSYNC_EACH = 16
# A file whose ctime was this close to the save may have changed unseen in the same tick.
_RACY_NS = 2_000_000_000
_CHUNK = 1024 * 1024
_TEMP = b".airlock-"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_DIRECTORY = FileType.DIRECTORY
_REGULAR = FileType.REGULAR
_SYMLINK = FileType.SYMLINK


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply` did. ``complete`` is False if it stopped part way (see ``error``)."""

    applied: tuple[bytes, ...]
    created: int = 0
    modified: int = 0
    deleted: int = 0
    metadata_changed: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    # Set when the commit stopped: the path that failed and why.
    failed: tuple[bytes, ...] = ()
    error: str = ""
    not_applied: tuple[bytes, ...] = ()
    # Temporary or set-aside entries that could not be removed (host paths).
    leftovers: tuple[bytes, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.failed and not self.error and not self.not_applied


class Changeset:
    """A saved changeset opened for Apply: its checked manifest and its content file.

    Open it before dropping privileges: the descriptors stay readable afterwards.
    """

    def __init__(self, manifest: Manifest, content_fd: int) -> None:
        self.manifest = manifest
        self.content_fd = content_fd

    def close(self) -> None:
        if self.content_fd >= 0:
            os.close(self.content_fd)
            self.content_fd = -1

    def __enter__(self) -> Changeset:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_changeset(changeset_dir: str) -> Changeset:
    """Open a changeset saved by :func:`airlock.sandbox.changeset.save` and check its manifest.

    Raises :class:`airlock.InvalidRequest` (``CHANGESET_INVALID``, ``CHANGESET_CORRUPT``).
    """
    try:
        dir_fd = os.open(changeset_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidRequest(
            f"cannot open the changeset {changeset_dir!r}: {exc.strerror}",
            reason=Reason.CHANGESET_INVALID,
        ) from None
    try:
        manifest = read_manifest(dir_fd)
        try:
            content_fd = os.open(
                CONTENT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            raise InvalidRequest(
                f"cannot open the changeset's content: {exc.strerror}",
                reason=Reason.CHANGESET_INVALID,
            ) from None
    finally:
        os.close(dir_fd)
    st = os.fstat(content_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != manifest.content_bytes:
        os.close(content_fd)
        raise InvalidRequest(
            "the changeset's content does not have the size its manifest says",
            reason=Reason.CHANGESET_CORRUPT,
        )
    return Changeset(manifest, content_fd)


def apply(
    changeset: str | Changeset, *, approved: Collection[bytes] = (), token: bytes = b""
) -> ApplyResult:
    """Write a changeset (a directory, or one already open) to the host: see the module doc.

    ``approved``: the paths whose privileged files (setuid, setgid, file capabilities,
    device nodes) may be written; any other privileged file refuses the whole changeset
    (FIFOs and sockets need no approval).
    Raises :class:`airlock.Conflict`, :class:`airlock.PermissionDenied`,
    :class:`airlock.FailedPrecondition` (``APPLY_SPECIAL_FILES``),
    :class:`airlock.InvalidRequest`, :class:`airlock.ResourceExhausted`
    (``APPLY_NO_SPACE``) or :class:`airlock.AirlockError` (``APPLY_FAILED``) with the
    host unchanged; returns an incomplete :class:`ApplyResult` if the commit stopped.
    ``token``: the journal's (:func:`write_journal`): it names every temporary entry, so
    that :func:`recover` finds them after a crash; random if not given.
    """
    if isinstance(changeset, str):
        with open_changeset(changeset) as opened:
            return _Applier(opened, approved, token=token).run()
    return _Applier(changeset, approved, token=token).run()


def record_specials(rec: ChangeRecord) -> frozenset[Special]:
    """How a change of a manifest is special (:func:`airlock._special.specials`)."""
    after = rec.after
    return specials(
        kind=rec.kind,
        file_type=after.file_type,
        other=other_type(after.fmt),
        mode_before=rec.before.mode if rec.before.exists else None,
        mode_after=after.mode if after.exists else None,
        capabilities=bool(after.caps),
    )


# --- The journal and recovery -------------------------------------------------------------------

JOURNAL_NAME = "apply-journal.json"


def write_journal(changeset_dir: str, approved: Collection[bytes]) -> bytes:
    """Before an apply starts: record, durably, the token that names its temporary entries
    and the special paths it may write, in the (root's) changeset directory. Returns the
    token to pass to :func:`apply`. A crash after this leaves what :func:`recover` needs.
    """
    token = _digest.token_hex(6).encode()
    body = json.dumps(
        {
            "token": token.decode(),
            "approved": [p.decode("utf-8", "surrogateescape") for p in approved],
        }
    ).encode()
    path = os.path.join(changeset_dir, JOURNAL_NAME)
    temp = path + ".new"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    dfd = os.open(changeset_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return token


def read_journal(changeset_dir: str) -> tuple[bytes, tuple[bytes, ...]] | None:
    """The (token, approved special paths) :func:`write_journal` recorded; None if it never
    ran (then the apply never started: nothing was written)."""
    try:
        with open(os.path.join(changeset_dir, JOURNAL_NAME), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"the apply journal of {changeset_dir!r} cannot be read: {exc}",
            reason=Reason.CHANGESET_CORRUPT,
        ) from None
    token = str(data.get("token", "")).encode()
    if not token.isalnum():
        raise InvalidRequest("the apply journal has no token", reason=Reason.CHANGESET_CORRUPT)
    approved = tuple(p.encode("utf-8", "surrogateescape") for p in data.get("approved", ()))
    return token, approved


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` found and did, path by path.

    ``direction``: ``"forward"`` (some changes were committed: the rest were written, so
    every path is as the changeset says), ``"back"`` (none were: what the apply had
    prepared was removed, so every path is as before it), or ``"stuck"`` (some path is
    in neither state: the host changed, or a step failed; see ``neither`` and ``error``).
    """

    direction: str
    after: tuple[bytes, ...]  # paths now in their after state
    before: tuple[bytes, ...]  # paths now in their before state
    neither: tuple[tuple[bytes, str], ...]  # paths in neither state, and what they are
    removed: tuple[bytes, ...]  # temporary and set-aside entries removed (host paths)
    written: tuple[bytes, ...] = ()  # paths recovery itself wrote (rolling forward)
    error: str = ""

    @property
    def consistent(self) -> bool:
        return self.direction in ("forward", "back") and not self.neither and not self.error


def recover(changeset: Changeset, token: bytes, *, approved: Collection[bytes] = ()) -> Recovery:
    """After a crash during :func:`apply` with ``token``: roll it forward or back.

    Run with the rights :func:`apply` had (the validation's user). Every temporary entry
    the apply may have made (``.airlock-TOKEN-N``) is removed. If any change had been
    committed (a target is in its after state and is not a directory the prepare step
    makes), the apply is rolled forward: directories set aside are removed or put back,
    the changes still in their before state are applied (checked like any apply), and
    directories get their final mode. Else it is rolled back: the directories prepare
    made are removed and those set aside put back. Then each path is classified again:
    before, after, or neither (named, with what it is).
    """
    return _Applier(changeset, approved, token=token).recover()


# --- Internals ----------------------------------------------------------------------------------


class _Op:
    """One change's progress through the steps."""

    __slots__ = (
        "aside",
        "comps",
        "data",
        "done",
        "made_dir",
        "name",
        "parent",
        "rec",
        "seen",
        "tag",
        "temp",
        "virtual",
        "visited",
    )

    def __init__(self, index: int, rec: ChangeRecord, token: bytes) -> None:
        self.rec = rec
        self.comps = components(rec.path)
        self.parent = self.comps[:-1]
        self.name = self.comps[-1]
        self.tag = _TEMP + token + b"-" + str(index).encode()
        self.virtual = False  # below a directory this changeset creates
        self.seen: os.stat_result | None = None  # the target as the check saw it
        self.data: bytes | None = None  # the new content, when kept in memory
        self.temp: bytes | None = None  # the new entry's temporary name
        self.aside: bytes | None = None  # the old entry's name once renamed aside
        self.made_dir = False
        self.visited = False  # the commit reached it
        self.done = False  # fully applied


class _Moved(Exception):
    """A directory on the way is no longer the one the check saw."""

    def __init__(self, comps: tuple[bytes, ...]) -> None:
        super().__init__(f"{_show(comps)} was replaced")
        self.comps = comps


class _Stale(Exception):
    """A target changed since the check."""


class _Ownership(Exception):
    """The after owner or mode cannot be given by this process."""


def _show(comps: tuple[bytes, ...]) -> str:
    return (b"/" + b"/".join(comps)).decode(errors="backslashreplace")


def _path(comps: tuple[bytes, ...], name: bytes | None = None) -> bytes:
    return b"/" + b"/".join(comps if name is None else (*comps, name))


class _HostCursor(DirCursor):
    """A cursor from ``/`` that remembers (or, once known, verifies) each directory's identity."""

    def __init__(self, ids: dict[tuple[bytes, ...], tuple[int, int]]) -> None:
        super().__init__(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        self.ids = ids

    def opened(self, comps: tuple[bytes, ...], fd: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        known = self.ids.setdefault(comps, key)
        if known != key:
            raise _Moved(comps)


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    """Whether an entry is as it was: identity and metadata; size and times unless a directory.

    A directory's times change as Apply writes into it; its entries are checked one by one.
    """
    if a is None or b is None:
        return a is b
    if (a.st_dev, a.st_ino, a.st_mode, a.st_uid, a.st_gid) != (
        b.st_dev,
        b.st_ino,
        b.st_mode,
        b.st_uid,
        b.st_gid,
    ):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _is_path_fd(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _error(exc: BaseException, path: bytes) -> AirlockError:
    """The Airlock error for a failure while writing ``path`` (nothing was left changed)."""
    where = path.decode(errors="backslashreplace")
    if isinstance(exc, _Moved):
        return Conflict(f"{exc} since the check (at {where})", paths=(path,))
    if isinstance(exc, _Stale):
        return Conflict(f"{where} changed on the host during Apply", paths=(path,))
    if isinstance(exc, _Ownership):
        return PermissionDenied(f"{where}: {exc}", reason=Reason.APPLY_OWNERSHIP)
    if isinstance(exc, OSError):
        text = f"{where}: {exc.strerror or exc}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return PermissionDenied(text, reason=Reason.APPLY_PERMISSION)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhausted(text, reason=Reason.APPLY_NO_SPACE)
        if exc.errno == errno.EEXIST:
            return Conflict(f"{where} appeared on the host during Apply", paths=(path,))
        return AirlockError(text, reason=Reason.APPLY_FAILED)
    return AirlockError(f"{where}: {exc}", reason=Reason.APPLY_FAILED)


def _listing(items: list[tuple[bytes, str]]) -> str:
    shown = "; ".join(f"{p.decode(errors='backslashreplace')} {why}" for p, why in items[:10])
    more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
    return shown + more


class _Applier:
    def __init__(
        self,
        changeset: Changeset,
        approved: Collection[bytes] = (),
        *,
        token: bytes = b"",
        only: Collection[int] | None = None,
    ) -> None:
        self.content_fd = changeset.content_fd
        self.manifest = changeset.manifest
        self.approved = frozenset(approved)
        token = token or _digest.token_hex(6).encode()
        self.ops = [
            _Op(i, rec, token)
            for i, rec in enumerate(self.manifest.changes)
            if only is None or i in only
        ]
        self.euid = os.geteuid()
        self.root = self.euid == 0
        self.groups = {os.getegid(), *os.getgroups()}
        self.ids: dict[tuple[bytes, ...], tuple[int, int]] = {}
        self.writes = sum(op.rec.writes_content for op in self.ops)
        self.sync_fds: dict[int, int] = {}
        self.touched: set[tuple[bytes, ...]] = set()
        self.started = time.monotonic()

    def run(self) -> ApplyResult:
        self.check()
        failure = self.prepare()
        if failure is not None:
            return failure
        return self.commit()

    # -- 1. check ------------------------------------------------------------------------------

    def check(self) -> None:
        conflicts: list[tuple[bytes, str]] = []
        denied: list[tuple[bytes, str, str]] = []
        creates = {
            op.comps
            for op in self.ops
            if op.rec.after.file_type is _DIRECTORY and op.rec.before.file_type is not _DIRECTORY
        }
        kept = 0
        writable: dict[tuple[bytes, ...], tuple[bool, os.stat_result]] = {}
        cursor = _HostCursor(self.ids)
        try:
            for op in self.ops:
                rec = op.rec
                if rec.writes_content:
                    kept += self._verify_content(op, kept)
                op.virtual = any(
                    op.comps[:depth] in creates for depth in range(1, len(op.parent) + 1)
                )
                if op.virtual:
                    continue  # the manifest guarantees nothing existed there before
                try:
                    pfd = cursor.open(op.parent)
                    st = lstat_at(op.name, pfd)
                except OSError as exc:
                    where = _show(op.parent[: cursor.reached + 1])
                    if exc.errno == errno.EACCES:
                        denied.append((rec.path, f"cannot search {where}", Reason.APPLY_PERMISSION))
                    elif exc.errno == errno.ENOENT:
                        conflicts.append((rec.path, f"{where} no longer exists"))
                    else:
                        conflicts.append((rec.path, f"{where} is no longer a directory"))
                    continue
                except _Moved as exc:
                    conflicts.append((rec.path, f"lies below {_show(exc.comps)}, now replaced"))
                    continue
                try:
                    why = self._differs(op, st, pfd, denied)
                except PermissionError as exc:
                    denied.append((rec.path, f"cannot be checked: {exc}", Reason.APPLY_PERMISSION))
                    continue
                except OSError as exc:  # it changed while being looked at
                    why = f"changed while being checked ({exc.strerror})"
                if why:
                    conflicts.append((rec.path, why))
                    continue
                op.seen = st
                if op.parent not in writable:
                    ok = os.access(b".", os.W_OK | os.X_OK, dir_fd=pfd)
                    writable[op.parent] = (ok, os.fstat(pfd))
                self._check_access(op, st, writable[op.parent], denied)
        finally:
            cursor.close()
        if conflicts:
            raise Conflict(
                "the host changed since the dry run, nothing was written: " + _listing(conflicts),
                paths=tuple(path for path, _ in conflicts),
            )
        if denied:
            reasons = {reason for _, _, reason in denied}
            worst = Reason.APPLY_PERMISSION
            if worst not in reasons:
                worst = Reason.APPLY_OWNERSHIP
            raise PermissionDenied(
                "nothing was written: " + _listing([(p, why) for p, why, _ in denied]),
                reason=worst,
            )
        self._check_specials()

    def _check_specials(self) -> None:
        """Refuse every privileged file (setuid, setgid, capabilities, device) that the
        approval does not name: the defence that holds whatever the policy said."""
        refused = [
            (op.rec.path, "would be " + " and ".join(sorted(found)))
            for op in self.ops
            if (found := record_specials(op.rec) & PRIVILEGED) and op.rec.path not in self.approved
        ]
        if refused:
            raise FailedPrecondition(
                "nothing was written: Apply makes setuid or setgid files, files with "
                "capabilities and device nodes only when the approval names them: "
                + _listing(refused)
                + " (approve the validation naming these paths, if you mean it)",
                reason=Reason.APPLY_SPECIAL_FILES,
            )
        if not self.root:
            capable = [op.rec.path for op in self.ops if op.rec.after.caps]
            if capable:
                raise PermissionDenied(
                    "nothing was written: only root can give files capabilities: "
                    + _listing([(p, "has file capabilities") for p in capable]),
                    reason=Reason.APPLY_PERMISSION,
                )

    def _verify_content(self, op: _Op, kept: int) -> int:
        """Check a new content against its hash; keep it in memory if small. Returns bytes kept."""
        after = op.rec.after
        offset, left = after.offset or 0, after.size
        keep = left <= _KEEP_ONE and kept + left <= _KEEP_TOTAL
        digest = _digest.sha256()
        parts: list[bytes] = []
        while left > 0:
            chunk = os.pread(self.content_fd, min(left, _CHUNK), offset)
            if not chunk:
                break
            digest.update(chunk)
            if keep:
                parts.append(chunk)
            offset += len(chunk)
            left -= len(chunk)
        if left or digest.hexdigest() != after.sha256:
            raise InvalidRequest(
                f"the saved content of {op.rec.path!r} does not match its hash",
                reason=Reason.CHANGESET_CORRUPT,
            )
        if not keep:
            return 0
        op.data = b"".join(parts)
        return after.size

    def _differs(
        self,
        op: _Op,
        st: os.stat_result | None,
        pfd: int,
        denied: list[tuple[bytes, str, str]],
    ) -> str:
        """Why the host's entry is not in the recorded before state; empty if it is."""
        before = op.rec.before
        if not before.exists:
            return "" if st is None else "exists now"
        if st is None:
            return "no longer exists"
        ftype = file_type(st.st_mode)
        if ftype is not before.file_type:
            return f"is now a {ftype.name.lower()}"
        if ftype is FileType.OTHER and (stat.S_IFMT(st.st_mode), st.st_rdev) != (
            before.fmt,
            before.rdev,
        ):
            return "was replaced"
        if stat.S_IMODE(st.st_mode) != before.mode:
            return "had its mode changed"
        if (st.st_uid, st.st_gid) != (before.uid, before.gid):
            return "changed owner"
        if ftype is _REGULAR and before.sha256:
            if st.st_size != before.size:
                return "changed content"
            try:
                digest = hash_file(op.name, pfd, st)
            except PermissionError:
                return "" if self._trusted(before, st) else "cannot be read to verify its content"
            if digest != before.sha256:
                return "changed content"
        if ftype is _SYMLINK and os.readlink(op.name, dir_fd=pfd) != before.target:
            return "points elsewhere now"
        if ftype is _DIRECTORY and before.tree is not None:
            scan = tree_digest(
                pfd, op.name, max_entries=before.tree.entries + 1, check_removable=True
            )
            blocked = False
            for rel, what in scan.problems:
                where = (op.rec.path + b"/" + rel if rel else op.rec.path).decode(
                    errors="backslashreplace"
                )
                if what in ("unreadable", "not writable", "sticky"):
                    denied.append(
                        (op.rec.path, f"cannot remove {where}: {what}", Reason.APPLY_PERMISSION)
                    )
                    blocked = blocked or what == "unreadable"
            if not blocked and scan.tree != before.tree:
                return "changed below"
        return ""

    def _trusted(self, before: EntryState, st: os.stat_result) -> bool:
        """Whether an unreadable file is surely unchanged: same inode, size and times, not racy."""
        same = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            before.ino,
            before.size,
            before.mtime_ns,
            before.ctime_ns,
        )
        return same and before.ctime_ns < self.manifest.created_ns - _RACY_NS

    def _check_access(
        self,
        op: _Op,
        st: os.stat_result | None,
        parent: tuple[bool, os.stat_result],
        denied: list[tuple[bytes, str, str]],
    ) -> None:
        rec = op.rec
        after = rec.after
        writable, parent_st = parent
        if rec.kind is not ChangeKind.METADATA_CHANGED:
            if not writable:
                denied.append(
                    (rec.path, f"cannot write {_show(op.parent)}", Reason.APPLY_PERMISSION)
                )
            elif (
                st is not None
                and parent_st.st_mode & stat.S_ISVTX
                and self.euid not in (0, st.st_uid, parent_st.st_uid)
            ):
                denied.append(
                    (rec.path, "is another user's in a sticky directory", Reason.APPLY_PERMISSION)
                )
            if after.exists and not self.root and after.uid != self.euid:
                denied.append(
                    (rec.path, f"would be owned by uid {after.uid}", Reason.APPLY_OWNERSHIP)
                )
            return
        if self.root or st is None:
            return
        if st.st_uid != self.euid:
            denied.append((rec.path, f"is owned by uid {st.st_uid}", Reason.APPLY_PERMISSION))
        elif after.uid != st.st_uid:
            denied.append((rec.path, f"would be owned by uid {after.uid}", Reason.APPLY_OWNERSHIP))
        elif after.gid != st.st_gid and after.gid not in self.groups:
            denied.append((rec.path, f"would be in group {after.gid}", Reason.APPLY_OWNERSHIP))

    # -- 2. prepare ----------------------------------------------------------------------------

    def prepare(self) -> ApplyResult | None:
        """Make new directories and temporary entries, durably; undo all and raise on failure.

        Returns a result only if undoing failed too (the host is then not as it was).
        """
        cursor = _HostCursor(self.ids)
        op: _Op | None = None
        try:
            for op in self.ops:
                rec = op.rec
                if rec.kind in (ChangeKind.DELETED, ChangeKind.METADATA_CHANGED):
                    continue
                pfd = cursor.open(op.parent)
                kind = rec.after.file_type
                if kind is _DIRECTORY:
                    if rec.before.exists:
                        self._recheck(op, pfd)
                        self._set_aside(op, pfd)
                    self._mkdir(op, pfd)
                elif kind is _REGULAR:
                    self._write_temp(op, pfd)
                else:
                    self._make_temp(op, pfd)
            op = None
            for fd in self.sync_fds.values():
                sc.syncfs(fd)
        except Exception as exc:
            path = op.rec.path if op is not None else b"/"
            leftovers = self._undo_all(self.ops)
            if not leftovers:
                raise _error(exc, path) from exc
            return self._result(failed=path, error=str(_error(exc, path)), leftovers=leftovers)
        except BaseException:
            self._undo_all(self.ops)
            raise
        finally:
            cursor.close()
            for fd in self.sync_fds.values():
                os.close(fd)
            self.sync_fds.clear()
        return None

    def _recheck(self, op: _Op, pfd: int) -> None:
        if not _same(lstat_at(op.name, pfd), op.seen):
            raise _Stale(op.rec.path)

    def _set_aside(self, op: _Op, pfd: int) -> None:
        aside = op.tag + b"-old"
        sc.renameat2(pfd, op.name, pfd, aside, sc.RENAME_NOREPLACE)
        op.aside = aside
        self.touched.add(op.parent)

    def _mkdir(self, op: _Op, pfd: int) -> None:
        os.mkdir(op.name, 0o700, dir_fd=pfd)
        op.made_dir = True
        self.touched.add(op.parent)
        st = os.stat(op.name, dir_fd=pfd, follow_symlinks=False)
        self.ids[op.comps] = (st.st_dev, st.st_ino)
        self._own(op.name, pfd, st, op.rec.after)
        os.chmod(op.name, 0o700, dir_fd=pfd, follow_symlinks=False)  # the final mode comes last

    def _own(self, name: bytes, pfd: int, st: os.stat_result, after: EntryState) -> None:
        self._chown(
            st, after, lambda uid, gid: os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        )

    def _chown(
        self, st: os.stat_result, after: EntryState, chown: Callable[[int, int], None]
    ) -> None:
        """Give an entry the after owner: any as root, else only a group the process may set."""
        uid = after.uid if st.st_uid != after.uid else -1
        gid = after.gid if st.st_gid != after.gid else -1
        if uid == gid == -1:
            return
        if uid != -1 and not self.root:
            raise _Ownership(f"cannot give it to uid {after.uid}")
        try:
            chown(uid, gid)
        except PermissionError:
            raise _Ownership(f"cannot give it to uid {after.uid}, gid {after.gid}") from None

    def _write_temp(self, op: _Op, pfd: int) -> None:
        after = op.rec.after
        temp = op.tag
        fd = os.open(temp, _NEW_FILE, 0o600, dir_fd=pfd)
        op.temp = temp
        try:
            if op.data is not None:
                _write_all(fd, op.data)
                op.data = None
            else:
                self._copy(fd, after.offset or 0, after.size)
            self._chown(os.fstat(fd), after, lambda uid, gid: os.fchown(fd, uid, gid))
            os.fchmod(fd, after.mode)
            special = after.mode & (stat.S_ISUID | stat.S_ISGID) and not self.root
            if special and stat.S_IMODE(os.fstat(fd).st_mode) != after.mode:
                raise _Ownership(f"cannot give it mode {after.mode:o}")  # the kernel drops setgid
            if after.caps:  # approved (_check_specials); after chown, which drops them
                os.setxattr(fd, CAPABILITY_XATTR, after.caps)
            if self.writes <= _FSYNC_EACH:
                os.fsync(fd)
            else:
                dev = os.fstat(fd).st_dev
                if dev not in self.sync_fds:
                    self.sync_fds[dev] = os.dup(fd)
        finally:
            os.close(fd)

    def _copy(self, fd: int, offset: int, size: int) -> None:
        """Copy new content from the content file, in the kernel where it can."""
        src = self.content_fd
        ranged = True
        while size > 0:
            if ranged:
                try:
                    done = os.copy_file_range(src, fd, size, offset)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    ranged = False
                    continue
            else:
                done = os.sendfile(fd, src, offset, size)
            if done <= 0:
                raise OSError(errno.EIO, "the changeset's content ended early")
            offset += done
            size -= done

    def _make_temp(self, op: _Op, pfd: int) -> None:
        """A new symbolic link, FIFO or socket, under a temporary name."""
        after = op.rec.after
        temp = op.tag
        if after.file_type is _SYMLINK:
            os.symlink(after.target, temp, dir_fd=pfd)
        else:
            os.mknod(temp, after.fmt | 0o600, 0, dir_fd=pfd)
        op.temp = temp
        self._own(temp, pfd, os.stat(temp, dir_fd=pfd, follow_symlinks=False), after)
        if after.file_type is not _SYMLINK:
            os.chmod(temp, after.mode, dir_fd=pfd, follow_symlinks=False)

    def _undo_all(self, ops: list[_Op]) -> tuple[bytes, ...]:
        """Undo what prepare did for ``ops``, children first; returns what could not be."""
        leftovers: list[bytes] = []
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for op in reversed(ops):
                if op.temp is None and op.aside is None and not op.made_dir:
                    continue
                try:
                    pfd = cursor.open(op.parent)
                except OSError:
                    leftovers += [_path(op.parent, n) for n in (op.temp, op.aside) if n]
                    continue
                self._undo(op, pfd, leftovers)
        finally:
            cursor.close()
        return tuple(leftovers)

    def _undo(self, op: _Op, pfd: int, leftovers: list[bytes]) -> None:
        if op.temp is not None:
            try:
                os.unlink(op.temp, dir_fd=pfd)
                op.temp = None
            except OSError:
                leftovers.append(_path(op.parent, op.temp))
        if op.made_dir:
            try:
                os.rmdir(op.name, dir_fd=pfd)
                op.made_dir = False
            except OSError:
                leftovers.append(op.rec.path)
                return
        if op.aside is not None:
            try:
                sc.renameat2(pfd, op.aside, pfd, op.name, sc.RENAME_NOREPLACE)
                op.aside = None
            except OSError:
                leftovers.append(_path(op.parent, op.aside))

    # -- 3. commit -----------------------------------------------------------------------------

    def commit(self) -> ApplyResult:
        failed: bytes | None = None
        error = ""
        cursor = _HostCursor(self.ids)
        try:
            for op in self.ops:
                try:
                    self._commit(op, cursor)
                except Exception as exc:
                    failed = op.rec.path
                    error = str(_error(exc, failed))
                    break
        finally:
            cursor.close()
        leftovers, finish_error = self._finish()
        if finish_error and not error:
            error = finish_error
        return self._result(failed=failed, error=error, leftovers=leftovers)

    def _commit(self, op: _Op, cursor: _HostCursor) -> None:
        rec = op.rec
        op.visited = True
        if rec.after.file_type is _DIRECTORY:
            return  # made in prepare, or a metadata change: both finished children first
        pfd = cursor.open(op.parent)
        if rec.kind is ChangeKind.METADATA_CHANGED:
            self._recheck(op, pfd)
            self._set_metadata(op, pfd)
        elif rec.kind is ChangeKind.DELETED:
            self._recheck(op, pfd)
            if rec.before.file_type is _DIRECTORY:
                self._set_aside(op, pfd)
            else:
                os.unlink(op.name, dir_fd=pfd)
        else:
            if rec.before.exists:
                self._recheck(op, pfd)
            if rec.before.file_type is _DIRECTORY:
                self._set_aside(op, pfd)
            try:
                self._place(op, pfd)
            except OSError:
                if op.aside is not None:  # put the old directory back
                    with contextlib.suppress(OSError):
                        sc.renameat2(pfd, op.aside, pfd, op.name, sc.RENAME_NOREPLACE)
                        op.aside = None
                raise
        op.done = True
        self.touched.add(op.parent)

    def _place(self, op: _Op, pfd: int) -> None:
        """Rename the temporary entry over its target; never over one that should be absent."""
        assert op.temp is not None
        if op.rec.before.exists and op.aside is None:
            os.rename(op.temp, op.name, src_dir_fd=pfd, dst_dir_fd=pfd)
        else:
            try:
                sc.renameat2(pfd, op.temp, pfd, op.name, sc.RENAME_NOREPLACE)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the file system lacks the flag
                    raise
                if lstat_at(op.name, pfd) is not None:
                    raise FileExistsError(errno.EEXIST, "exists", op.name) from None
                os.rename(op.temp, op.name, src_dir_fd=pfd, dst_dir_fd=pfd)
        op.temp = None

    def _set_metadata(self, op: _Op, pfd: int) -> None:
        after = op.rec.after
        st = lstat_at(op.name, pfd)
        if st is None:
            raise _Stale(op.rec.path)
        self._own(op.name, pfd, st, after)
        if after.file_type is not _SYMLINK:
            os.chmod(op.name, after.mode, dir_fd=pfd, follow_symlinks=False)

    def _finish(self) -> tuple[tuple[bytes, ...], str]:
        """Children first: remove what was set aside, give directories their final mode, and
        undo what prepare made for changes the commit did not reach; then fsync directories.
        """
        leftovers: list[bytes] = []
        errors: list[str] = []
        cursor = _HostCursor(self.ids)
        try:
            for op in reversed(self.ops):
                rec = op.rec
                is_dir = rec.after.file_type is _DIRECTORY
                committed = op.done or (op.visited and is_dir)
                try:
                    if not committed:
                        if op.temp is not None or op.aside is not None or op.made_dir:
                            self._undo(op, cursor.open(op.parent), leftovers)
                        continue
                    if op.aside is None and not is_dir:
                        continue
                    pfd = cursor.open(op.parent)
                    self._remove_aside(op, pfd, leftovers)
                    if is_dir:
                        if rec.kind is ChangeKind.METADATA_CHANGED:
                            self._recheck(op, pfd)
                        self._set_metadata(op, pfd)
                        op.done = True
                        self.touched.add(op.parent)
                except Exception as exc:
                    errors.append(str(_error(exc, rec.path)))
            for comps in sorted(self.touched):
                try:
                    fd = cursor.open(comps)
                    if not _is_path_fd(fd):
                        os.fsync(fd)
                except PermissionError:
                    pass  # a final mode that shuts this process out: nothing to sync with
                except (OSError, _Moved) as exc:
                    errors.append(f"cannot sync {_show(comps)}: {exc}")
        finally:
            cursor.close()
        return tuple(leftovers), "; ".join(errors)

    def _remove_aside(self, op: _Op, pfd: int, leftovers: list[bytes]) -> None:
        if op.aside is None:
            return
        try:
            if op.rec.before.file_type is _DIRECTORY:
                _remove_tree(pfd, op.aside)
            else:
                os.unlink(op.aside, dir_fd=pfd)
            op.aside = None
        except OSError:
            leftovers.append(_path(op.parent, op.aside))
            raise

    def _result(
        self, *, failed: bytes | None, error: str, leftovers: tuple[bytes, ...]
    ) -> ApplyResult:
        counts = dict.fromkeys(ChangeKind, 0)
        written = 0
        for op in self.ops:
            if op.done:
                counts[op.rec.kind] += 1
                if op.rec.writes_content:
                    written += op.rec.after.size
        return ApplyResult(
            applied=tuple(op.rec.path for op in self.ops if op.done),
            created=counts[ChangeKind.CREATED],
            modified=counts[ChangeKind.MODIFIED],
            deleted=counts[ChangeKind.DELETED],
            metadata_changed=counts[ChangeKind.METADATA_CHANGED],
            bytes_written=written,
            duration_s=time.monotonic() - self.started,
            failed=(failed,) if failed is not None else (),
            error=error,
            not_applied=tuple(
                op.rec.path for op in self.ops if not op.done and op.rec.path != failed
            ),
            leftovers=leftovers,
        )

    # -- recovery (after a crash) --------------------------------------------------------------

    def recover(self) -> Recovery:
        removed = self._remove_temps()
        states = self._states()
        committed = any(
            states[i][0] == "after" and op.rec.after.file_type is not _DIRECTORY
            for i, op in enumerate(self.ops)
        )
        written: tuple[bytes, ...] = ()
        error = ""
        try:
            if committed:
                written, error = self._forward(states, removed)
            else:
                self._back(states, removed)
        except (OSError, _Moved) as exc:
            error = f"recovery stopped: {exc}"
        states = self._states()
        after = tuple(op.rec.path for i, op in enumerate(self.ops) if states[i][0] == "after")
        before = tuple(op.rec.path for i, op in enumerate(self.ops) if states[i][0] == "before")
        neither = tuple(
            (op.rec.path, states[i][1] or states[i][0])
            for i, op in enumerate(self.ops)
            if states[i][0] not in ("after", "before")
        )
        whole = len(after) == len(self.ops) if committed else len(before) == len(self.ops)
        direction = ("forward" if committed else "back") if whole and not error else "stuck"
        return Recovery(
            direction=direction,
            after=after,
            before=before,
            neither=neither,
            removed=tuple(removed),
            written=written,
            error=error,
        )

    def _remove_temps(self) -> list[bytes]:
        """Unlink every temporary entry (``TAG``) the apply may have made; the removed."""
        removed: list[bytes] = []
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for op in self.ops:
                try:
                    pfd = cursor.open(op.parent)
                    st = lstat_at(op.tag, pfd)
                    if st is not None and not stat.S_ISDIR(st.st_mode):
                        os.unlink(op.tag, dir_fd=pfd)
                        removed.append(_path(op.parent, op.tag))
                except OSError:
                    continue  # its directory is gone or shut: nothing of ours is in it
        finally:
            cursor.close()
        return removed

    def _states(self) -> list[tuple[str, str]]:
        """Each op's target: ("after" | "made" | "before" | "neither", what it is)."""
        found: list[tuple[str, str]] = []
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for op in self.ops:
                found.append(self._state(op, cursor))
        finally:
            cursor.close()
        return found

    def _state(self, op: _Op, cursor: DirCursor) -> tuple[str, str]:
        rec = op.rec
        try:
            pfd = cursor.open(op.parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not rec.before.exists:
                return "before", ""  # its parent (made by the apply) is gone: so is it
            return "neither", f"its directory cannot be opened ({exc.strerror})"
        try:
            st = lstat_at(op.name, pfd)
            if self._is_after(op, st, pfd):
                return "after", ""
            if (
                st is not None
                and stat.S_ISDIR(st.st_mode)
                and rec.after.file_type is _DIRECTORY
                and rec.kind is not ChangeKind.METADATA_CHANGED
                and stat.S_IMODE(st.st_mode) == 0o700
                and (st.st_uid, st.st_gid) == (rec.after.uid, rec.after.gid)
            ):
                return "made", "a directory the apply made, its final mode not yet set"
            why = self._differs(op, st, pfd, [])
        except OSError as exc:
            return "neither", f"cannot be examined ({exc.strerror})"
        return ("before", "") if not why else ("neither", why)

    def _is_after(self, op: _Op, st: os.stat_result | None, pfd: int) -> bool:
        after = op.rec.after
        if not after.exists:
            return st is None
        if st is None:
            return False
        ftype = file_type(st.st_mode)
        if ftype is not after.file_type or (st.st_uid, st.st_gid) != (after.uid, after.gid):
            return False
        if ftype is not _SYMLINK and stat.S_IMODE(st.st_mode) != after.mode:
            return False
        if ftype is _REGULAR and op.rec.writes_content:
            return st.st_size == after.size and hash_file(op.name, pfd, st) == after.sha256
        if ftype is _SYMLINK:
            return os.readlink(op.name, dir_fd=pfd) == after.target
        if ftype is FileType.OTHER:
            return stat.S_IFMT(st.st_mode) == after.fmt
        return True

    def _asides(self, cursor: DirCursor) -> list[tuple[_Op, int, bool]]:
        """The ops whose old entry is set aside (``TAG-old``): (op, parent fd, is a dir)."""
        found = []
        for op in reversed(self.ops):
            try:
                pfd = cursor.open(op.parent)
            except OSError:
                continue
            st = lstat_at(op.tag + b"-old", pfd)
            if st is not None:
                found.append((op, pfd, stat.S_ISDIR(st.st_mode)))
        return found

    def _forward(
        self, states: list[tuple[str, str]], removed: list[bytes]
    ) -> tuple[tuple[bytes, ...], str]:
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for op, pfd, is_dir in self._asides(cursor):
                aside = op.tag + b"-old"
                if lstat_at(op.name, pfd) is not None or op.rec.kind is ChangeKind.DELETED:
                    if is_dir:
                        _remove_tree(pfd, aside)  # committed (or replaced): the old one goes
                    else:
                        os.unlink(aside, dir_fd=pfd)
                    removed.append(_path(op.parent, aside))
                else:  # set aside, the new one not yet in place: put the old one back
                    sc.renameat2(pfd, aside, pfd, op.name, sc.RENAME_NOREPLACE)
        finally:
            cursor.close()
        states = self._states()
        left = {i for i, (state, _) in enumerate(states) if state == "before"}
        written: tuple[bytes, ...] = ()
        error = ""
        if left:
            changeset = Changeset(self.manifest, self.content_fd)
            token = self.ops[0].tag[len(_TEMP) :].split(b"-")[0]
            try:
                result = _Applier(changeset, self.approved, token=token, only=left).run()
                written = result.applied
                error = result.error
            except AirlockError as exc:
                error = str(exc)
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for i in reversed(range(len(self.ops))):  # children first: final modes last
                op = self.ops[i]
                if states[i][0] == "made":
                    self._set_metadata(op, cursor.open(op.parent))
        finally:
            cursor.close()
        os.sync()
        return written, error

    def _back(self, states: list[tuple[str, str]], removed: list[bytes]) -> None:
        cursor = DirCursor(os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            for i in reversed(range(len(self.ops))):  # children first
                op = self.ops[i]
                if states[i][0] != "made":
                    continue
                with contextlib.suppress(OSError):  # not empty: someone wrote there; neither
                    os.rmdir(op.name, dir_fd=cursor.open(op.parent))
                    removed.append(op.rec.path)
            for op, pfd, _is_dir in self._asides(cursor):
                sc.renameat2(pfd, op.tag + b"-old", pfd, op.name, sc.RENAME_NOREPLACE)
        finally:
            cursor.close()
        os.sync()


def _remove_tree(parent_fd: int, name: bytes) -> None:
    """Remove a directory and everything below it, never following a link or leaving its
    file system; raises OSError if anything cannot be removed."""
    root = os.open(name, _DIR, dir_fd=parent_fd)
    dev = os.fstat(root).st_dev
    # Each frame: a directory's descriptor, its name in its parent, its subdirectories left.
    stack: list[tuple[int, bytes, list[bytes]]] = []
    try:
        stack.append((root, name, []))
        stack[-1][2].extend(_clear(root))
        while stack:
            fd, own, subdirs = stack[-1]
            if subdirs:
                child = subdirs.pop()
                child_fd = os.open(child, _DIR, dir_fd=fd)
                stack.append((child_fd, child, []))
                if os.fstat(child_fd).st_dev != dev or len(stack) > MAX_DEPTH:
                    raise OSError(errno.EXDEV, "another file system, or too deep", child)
                stack[-1][2].extend(_clear(child_fd))
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(own, dir_fd=stack[-1][0] if stack else parent_fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _clear(fd: int) -> list[bytes]:
    """Unlink every non-directory in a directory; return its subdirectories' names."""
    subdirs: list[bytes] = []
    with os.scandir(fd) as it:
        for entry in it:
            child = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(child)
            else:
                os.unlink(child, dir_fd=fd)
    return subdirs
