"""The file-system changes a command made, read from overlayfs upper layers.

After the command has ended, :func:`compute_changes` walks each overlay's upper
directory and compares every entry with the unmodified lower directory. The
overlays are mounted with ``redirect_dir=off,index=off,metacopy=off,xino=off``,
so an upper layer is plain: a whiteout (a character device 0:0) marks a deleted
entry, the ``trusted.overlay.opaque`` xattr marks a directory that hides the
lower below it (and the whole subtree below it), and every other entry holds its
full new content.

What is reported:

* an upper entry with no lower entry: CREATED; of another type than the lower
  entry: MODIFIED (a directory replaced by a file also gets ``entries_deleted``);
  a regular file with other content, a link with another target, a device with
  another number: MODIFIED; else other permission bits or owner: METADATA_CHANGED;
  else nothing (``touch`` alone, or a directory copied up for a change below it).
* a whiteout, or a lower entry missing below an opaque directory: DELETED, with
  ``entries_deleted`` for a directory (its descendants are not listed).
* the root of a layer, when its mode or owner differ from the lower root's: so the
  sandbox must create each upper directory with the lower root's mode and owner.

With each change: for an entry of type OTHER, what it is (``other_type``: a device, FIFO or
socket); for a regular file after the change, its file capabilities (the
``security.capability`` attribute, as text; a ``security.*`` attribute needs no permission to
read); for a non-directory with more than one name in the upper layer (a hard link), how
many (``links``) and another of them (``linked_to``). Overlayfs copies a file up before a hard
link is made to it, so ``ln /etc/shadow x`` leaves both names in the upper layer, linked
(the copy-up itself is no change); a copy-up never keeps the host's links, so ``links`` > 1
means the command made the link. What makes such a change *special* is
:mod:`airlock._special`'s to say.

Everything is read relative to directory descriptors opened with ``O_NOFOLLOW``,
so no symbolic link in the upper or in the (live, host) lower is ever followed
and path length is not limited by ``PATH_MAX``. Each layer is walked in the byte
order of its paths, so the ``max_changes`` cut and the total diff budget are
spent on the first paths in the result's order. A subtree deeper than
``_MAX_DEPTH`` directories is not walked and marks the result truncated. Counting
the entries of deleted directories stops at ``_MAX_COUNT`` entries per result
(later counts are then lower bounds) and does not cross into other mounts. An
entry that vanishes during the walk is skipped; one that cannot be read is
reported with what is known (a file whose content cannot be compared counts as
MODIFIED).

**Content is read with the caller's rights.** The walk itself (listing directories,
``lstat``, link targets, opaque marks) is root's: it must see every change. But every
file whose content leaves the sandbox (a diff, a hash, a comparison of old and new) is
opened through :class:`CallerFiles`, as the dry run's user would open it: with its uid,
gid and supplementary groups, resolving the whole path from the layer's root (search
permission on every directory, the file's mode bits and ACLs), following no link. Root
reads everything a command could not: the lower (host) file behind a replaced one, and
the root-owned copies overlayfs makes when a command renames, links or changes the
metadata of a file it may not read. What the caller may not open is reported with
``unreadable`` set and nothing of that content: no diff, and no ``sha256_after`` if the
new content is the unreadable one. Equal content cannot be told from changed content
then either (that would answer "is this my guess?"), so such a file counts as MODIFIED.
A root caller (uid 0) reads as root, as before.

This runs in the small root helper process: stdlib only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import errno
import os
import stat
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

from airlock._errors import SandboxError
from airlock._special import CAPABILITY_XATTR, describe_capabilities, other_type
from airlock.sandbox import _digest, _gcpause
from airlock.sandbox import _syscalls as sc
from airlock.types import ChangeKind, FileChange, FileType, OtherType

__all__ = [
    "Caller",
    "CallerFiles",
    "DiffOptions",
    "DiffResult",
    "Layer",
    "compute_changes",
    "diff_result_from_rows",
]


@dataclass(frozen=True)
class Layer:
    """One overlay: where it appears on the host, its upper and its lower directory."""

    host_path: bytes
    upper: bytes
    lower: bytes


@dataclass(frozen=True)
class DiffOptions:
    """The bounds of one diff and how to classify its paths."""

    workspace: bytes  # b"": none (the cwd is a system directory), no change is in it
    max_changes: int = 10_000
    diff_file_bytes: int = 64 * 1024
    diff_total_bytes: int = 1024 * 1024
    exclude: tuple[bytes, ...] = ()
    # Up to how many changes the walk keeps the new files' content it read for the changeset
    # saved after it (DiffResult.contents; the daemon's keep-changes-max, 0 when it keeps
    # none); past that many, it keeps none: no changeset will be saved.
    content_for: int = 10_000


@dataclass(frozen=True)
class DiffResult:
    """The changes, sorted by path bytes; whether some were left out; the scratch used.

    ``contents`` is the content of new regular files the walk read whole (those below the
    diff limit, up to ``_KEEP_CONTENT_BYTES`` in all; none past
    :attr:`DiffOptions.content_for` changes), by path: the changeset saved right after the
    diff copies it from here instead of opening each file again. It stays in the
    supervisor: it is not part of equality, nor of the pickle sent to the daemon.
    """

    changes: tuple[FileChange, ...]
    truncated: bool
    scratch_bytes: int
    contents: Mapping[bytes, bytes] = field(default_factory=dict, compare=False, repr=False)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled (supervisor to daemon) as one tuple of field values per change: about half
        # the bytes and time of pickling each change with its field names.
        rows = tuple(map(_change_row, self.changes))
        return (diff_result_from_rows, (rows, self.truncated, self.scratch_bytes))


def diff_result_from_rows(
    rows: tuple[tuple[object, ...], ...], truncated: bool, scratch_bytes: int
) -> DiffResult:
    """The :class:`DiffResult` that :meth:`DiffResult.__reduce__` took apart."""
    changes = [_build(_row_fields(row)) for row in rows]
    return DiffResult(tuple(changes), truncated, scratch_bytes)


@dataclass(frozen=True)
class Caller:
    """Whose rights content is read with: the dry run's uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_OPAQUE_XATTR = b"trusted.overlay.opaque"
# Content with a NUL byte this near its start is binary. Looked for with ``find``: ``b"\0" in
# data`` first tries the NUL as an integer, which raises and clears a TypeError (~0.3 us).
_TEXT_PROBE = 8 * 1024
_CHUNK = 1024 * 1024
# How many lower entries all deleted directories of one result may count together.
_MAX_COUNT = 1_000_000
# How deep a walk goes; each level holds up to two open directory descriptors.
_MAX_DEPTH = 256
# How many names of one hard-linked file are kept to pick ``linked_to`` from.
_MAX_LINK_NAMES = 8
# List a lower directory instead of an lstat per upper entry from this many upper
# entries on, unless the lower directory is larger than this many bytes per entry.
_LIST_LOWER_MIN = 64
_LIST_LOWER_BYTES = 256
# How many files of a directory are opened together as the caller (see CallerFiles).
_OPEN_AHEAD = 64
# How much of the new files' content one diff keeps for the changeset (DiffResult.contents).
_KEEP_CONTENT_BYTES = 8 * 1024 * 1024

# Enum members as module constants: reading ``ChangeKind.CREATED`` costs ~75 ns each time.
_CREATED = ChangeKind.CREATED
_MODIFIED = ChangeKind.MODIFIED
_DELETED = ChangeKind.DELETED
_METADATA_CHANGED = ChangeKind.METADATA_CHANGED
_NONE = FileType.NONE
_REGULAR = FileType.REGULAR
_DIRECTORY = FileType.DIRECTORY
_SYMLINK = FileType.SYMLINK
_OTHER = FileType.OTHER
_NO_OTHER = OtherType.NONE
_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})
_TYPES = {stat.S_IFREG: _REGULAR, stat.S_IFDIR: _DIRECTORY, stat.S_IFLNK: _SYMLINK}

# The tags of a directory's work items; each item is (sort key, tag, name, upper stat).
_ENTRY = 0  # an upper entry: classify it
_DESCEND = 1  # an upper directory: walk below it (sort key is name + b"/")
_GONE = 2  # a lower entry hidden by an opaque directory: deleted

_Item = tuple[bytes, int, str, os.stat_result | None]

# How the caller's opens resolve a path: below the layer's root, no link, no other mount.
_RESOLVE = (
    sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS | sc.RESOLVE_NO_XDEV
)
_AT_FDCWD = -100
_UNCHANGED_ID = 0xFFFFFFFF  # setfsuid(-1) changes nothing and returns the current fsuid


class CallerFiles:
    """Opens files for reading with the caller's file-system rights; all else stays root's.

    Use as a context manager around the work: entering sets this thread's supplementary
    groups and file-system gid to the caller's (root's own work is unaffected: its
    capabilities override them, and it creates no file meanwhile); leaving restores
    them. :meth:`open` switches the thread's file-system uid to the caller's for the one
    ``openat2`` call, which drops root's file-system capabilities: the kernel resolves
    the path from a layer's root directory (opened as root) and checks search permission
    on every directory below it and read permission on the file, with the caller's
    groups and ACLs; it follows no link and crosses no mount. Reading the descriptor
    needs no further permission. Every switch is verified (each call returns the fsuid
    it replaced): if one did not happen, :class:`airlock.SandboxError` is raised rather
    than anything read as root.

    For a root caller (uid 0), or none, :attr:`active` is False: the caller of this
    class opens files as before and nothing is switched. Credentials are per thread:
    use an instance from one thread.
    """

    def __init__(self, caller: Caller | None) -> None:
        self.active = caller is not None and caller.uid != 0
        self.uid = caller.uid if caller is not None else 0
        self.gid = caller.gid if caller is not None else 0
        self.groups = caller.groups if caller is not None else ()
        self._how = sc.OpenHow(_FILE_FLAGS, 0, _RESOLVE)
        self._within_how = sc.OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE)
        self._dir_how = sc.OpenHow(
            os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
            0,
            sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS,
        )
        self._saved: tuple[int, list[int]] | None = None
        self._reachable: dict[bytes, bool] = {}

    def __enter__(self) -> CallerFiles:
        if not self.active:
            return self
        if os.geteuid() != 0 or sc.securebits() & sc.SECBIT_NO_SETUID_FIXUP:
            raise _switch_failed()
        if sc.setfsuid(_UNCHANGED_ID) != 0:
            raise _switch_failed()
        groups = os.getgroups()
        sc.setgroups_thread(self.groups)
        self._saved = (sc.setfsgid(self.gid), groups)
        if sc.setfsgid(self.gid) != self.gid:
            self._restore()
            raise _switch_failed()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        fsgid, groups = self._saved
        self._saved = None
        sc.setfsuid(0)
        sc.setfsgid(fsgid)
        sc.setgroups_thread(groups)

    def open(self, root_fd: int, rel: bytes) -> int:
        """Open ``rel`` below the directory ``root_fd`` for reading, as the caller.

        ``rel`` is relative and has no ``.`` or ``..``. Raises ``OSError`` if the
        caller may not (or it is gone, a link, not below ``root_fd``, ...).
        """
        result = self._open_as_caller(root_fd, (rel,), self._how)[0]
        if isinstance(result, OSError):
            raise result
        return result

    def open_each(self, root_fd: int, rels: Sequence[bytes]) -> list[int | OSError]:
        """:meth:`open` each of ``rels``: a descriptor or the error, one fsuid switch for all."""
        return self._open_as_caller(root_fd, rels, self._how)

    def open_many(
        self, root_fd: int, dir_rel: bytes, names: Sequence[bytes]
    ) -> list[int | OSError]:
        """:meth:`open` each of ``names`` in the directory ``dir_rel`` below ``root_fd``.

        Each result is a descriptor or the error. One switch of the fsuid serves them all
        (a switch costs more than an open: the kernel copies the credentials): the
        directory is resolved as the caller (search permission on the directories above
        it), then each name is opened in it as the caller (search permission on it, read
        permission on the file).
        """
        return self._open_as_caller(root_fd, names, self._how, dir_rel or b".")

    def reachable(self, path: bytes) -> bool:
        """Whether the caller may search every directory above ``path`` (absolute, on the host).

        A layer's root is a mount point: the directories above it lie in other layers,
        and the caller's path to anything in this one passes through them.
        """
        if not self.active:
            return True
        known = self._reachable.get(path)
        if known is None:
            result = self._open_as_caller(_AT_FDCWD, (path,), self._dir_how)[0]
            known = not isinstance(result, OSError)
            if not isinstance(result, OSError):
                os.close(result)
            self._reachable[path] = known
        return known

    def _open_as_caller(
        self, dir_fd: int, paths: Sequence[bytes], how: sc.OpenHow, within: bytes = b""
    ) -> list[int | OSError]:
        """Open ``paths`` with the caller's fsuid, below ``dir_fd`` (and ``within`` it).

        Without ``within``, each path is resolved by ``openat2`` with ``how``. With it,
        ``within`` is, and each path is one name opened in it without following a link.
        """
        if self._saved is None:
            raise SandboxError("CallerFiles used outside its context", reason="DIFF_FAILED")
        results: list[int | OSError] = []
        parent = -1
        before = sc.setfsuid(self.uid)
        try:
            if within:
                try:
                    parent = sc.openat2(dir_fd, within, self._within_how)
                except OSError as exc:
                    results = [exc] * len(paths)
            if parent >= 0:
                for name in paths:
                    try:
                        results.append(os.open(name, _FILE_FLAGS, dir_fd=parent))
                    except OSError as exc:
                        results.append(exc)
            elif not within:
                for path in paths:
                    try:
                        results.append(sc.openat2(dir_fd, path, how))
                    except OSError as exc:
                        results.append(exc)
        finally:
            during = sc.setfsuid(0)
            _close(parent if parent >= 0 else None)
            if before != 0 or during != self.uid:
                for result in results:
                    if not isinstance(result, OSError):
                        os.close(result)
                raise _switch_failed()
        return results


def _switch_failed() -> SandboxError:
    return SandboxError(
        "cannot take the caller's file-system rights to read the changes", reason="DIFF_FAILED"
    )


def compute_changes(
    layers: Sequence[Layer], options: DiffOptions, caller: Caller | None = None
) -> DiffResult:
    """Walk the upper layers and return the changes they hold, sorted by path bytes.

    Content is read with ``caller``'s rights (see :class:`CallerFiles`); None reads
    as root. Raises :class:`airlock.SandboxError` if an upper directory cannot be
    opened, or the caller's rights cannot be taken.
    """
    # Thousands of new objects and no reference cycles: the cyclic collector would
    # only slow the walk down (by ~5 % for 10,000 changes).
    with _gcpause.paused(), CallerFiles(caller) as files:
        walker = _Walker(options, files)
        for layer in sorted(layers, key=attrgetter("host_path")):
            walker.walk(layer)
    changes = sorted(walker.linked(walker.changes), key=attrgetter("path"))
    return DiffResult(tuple(changes), walker.truncated, walker.scratch_bytes, walker.contents)


def _norm(path: bytes) -> bytes:
    return path.rstrip(b"/") or b"/"


def _ftype(mode: int) -> FileType:
    return _TYPES.get(stat.S_IFMT(mode), _OTHER)


def _meta_differs(new: os.stat_result, old: os.stat_result) -> bool:
    return (
        stat.S_IMODE(new.st_mode) != stat.S_IMODE(old.st_mode)
        or new.st_uid != old.st_uid
        or new.st_gid != old.st_gid
    )


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_dir(name: str | bytes, dir_fd: int | None) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None


def _open_regular(name: str, dir_fd: int) -> int | None:
    """Open a regular file without following a link; None if it is gone or not regular."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    return _if_regular(fd)


def _if_regular(fd: int) -> int | None:
    """``fd`` if it is a regular file; else None, and ``fd`` is closed."""
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _lstat(name: str, dir_fd: int | None) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _readlink(name: str, dir_fd: int | None) -> bytes | None:
    if dir_fd is None:
        return None
    try:
        return os.fsencode(os.readlink(name, dir_fd=dir_fd))
    except OSError:
        return None


def _read_exact(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.read(fd, min(size, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_small(fd: int, size: int, limit: int) -> bytes | None:
    """The whole content of the regular file ``fd`` (closed here) of about ``size`` bytes.

    None if it is over ``limit`` bytes or cannot be read.
    """
    try:
        data = _read_exact(fd, min(size, limit) + 1)
        if len(data) > limit:
            return None
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


# What reading an upper file found: its SHA-256 (hex); its content if at most the
# diff limit; the lower's content if it was compared, equal and small; whether the
# lower was compared and is byte for byte equal.
_Read = tuple[str, bytes | None, bytes | None, bool]


def _read_upper(fd: int, size: int, keep: int, lfd: int | None) -> _Read | None:
    """Hash the upper file ``fd``, keep it if small, and compare it with ``lfd`` if given.

    ``lfd`` is the lower file, open, when it is a regular file of the same size. Both
    are closed here. Returns None if the upper file cannot be read. A short read is
    taken as the end of the file (true of regular files), which saves a read per file.
    The upper is not ``fstat``-ed after opening: it no longer changes once the command
    ended, it was just seen as a regular file, and ``O_NONBLOCK`` keeps even a
    swapped-in FIFO from blocking.
    """
    if lfd is None and size < keep:
        # The common case, a small new file: one read.
        try:
            data = os.read(fd, size + 1)
            if len(data) > size:  # it grew since it was seen: read it in full below
                os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            os.close(fd)
            return None
        if len(data) <= size:
            os.close(fd)
            return _digest.sha256(data).hexdigest(), data, None, False
    digest = _digest.sha256()
    parts: list[bytes] | None = []
    old_parts: list[bytes] | None = [] if lfd is not None else None
    same = lfd is not None
    total = 0
    want = min(size + 1, _CHUNK)
    try:
        while True:
            chunk = os.read(fd, want)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
            if parts is not None:
                if total <= keep:
                    parts.append(chunk)
                else:
                    parts = old_parts = None
            if same and lfd is not None:
                other = _read_exact(lfd, len(chunk))
                if other != chunk:
                    same = False
                    old_parts = None
                elif old_parts is not None:
                    old_parts.append(other)
            if len(chunk) < want:
                break
            want = _CHUNK
        if same and lfd is not None and os.read(lfd, 1):
            same = False
    except OSError:
        return None
    finally:
        os.close(fd)
        _close(lfd)
    content = b"".join(parts) if parts is not None else None
    old = b"".join(old_parts) if old_parts is not None and same else None
    return digest.hexdigest(), content, old, same


def _text(data: bytes) -> str | None:
    """The content as text, or None if it is binary (a NUL near the start, or not UTF-8)."""
    if data.find(b"\0", 0, _TEXT_PROBE) != -1:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(text: str) -> list[str]:
    """Split at newlines only (not at the other characters str.splitlines knows)."""
    lines = [line + "\n" for line in text.split("\n")]
    if lines[-1] == "\n":
        lines.pop()
    else:
        lines[-1] = lines[-1][:-1]
    return lines


_NO_NEWLINE = "\n\\ No newline at end of file\n"


def _unified(old: str | None, new: str, path: bytes) -> str:
    """A unified diff; a line without a final newline is followed by the usual marker.

    ``old`` None means the file is new: the diff is from ``/dev/null``.
    """
    name = path.decode("utf-8", "backslashreplace")
    if old is None:
        # The text difflib gives for an empty old side, built directly: much faster.
        if not new:
            return ""
        body = "+" + new.replace("\n", "\n+")
        if new.endswith("\n"):
            count = new.count("\n")
            body = body[:-1]
        else:
            count = new.count("\n") + 1
            body += _NO_NEWLINE
        lines = "" if count == 1 else f",{count}"
        return f"--- /dev/null\n+++ b{name}\n@@ -0,0 +1{lines} @@\n{body}"
    out = list(
        difflib.unified_diff(_lines(old), _lines(new), f"a{name}", f"b{name}", lineterm="\n")
    )
    for i, line in enumerate(out):
        if not line.endswith("\n"):
            out[i] = line + _NO_NEWLINE
    return "".join(out)


def _cut(text: str, limit: int) -> tuple[str, int, bool]:
    """Cut a diff at a line boundary to at most ``limit`` UTF-8 bytes.

    Returns the text, its size in bytes and whether it was cut.
    """
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size <= limit:
        return text, size, False
    data = text.encode("utf-8")
    end = data.rfind(b"\n", 0, limit) + 1
    if end > 0 and data.startswith(b"\\", end):
        # Keep a last line and its "No newline" marker together.
        end = data.rfind(b"\n", 0, end - 1) + 1
    if data.count(b"\n", 0, end) <= 3:  # the headers and a hunk header alone say nothing
        return "", 0, True
    return data[:end].decode("utf-8"), end, True


class _Frame:
    """One directory being walked: its descriptors and its remaining work items."""

    __slots__ = (
        "depth",
        "items",
        "lfd",
        "lower_names",
        "opaque",
        "opened",
        "prefix",
        "regular",
        "report",
        "ufd",
        "unopened",
    )

    def __init__(
        self,
        ufd: int,
        lfd: int | None,
        opaque: bool,
        report: bool,
        prefix: bytes,
        depth: int,
    ) -> None:
        self.ufd = ufd
        self.lfd = lfd
        self.opaque = opaque
        self.report = report
        self.prefix = prefix
        self.depth = depth
        self.items: Iterator[_Item] = iter(())
        # The lower directory's names, when listing them was cheaper than one lstat each.
        self.lower_names: set[str] | None = None
        # Opening as the caller (CallerFiles): the regular files' names in walk order, None
        # where the walk descends; the index of the first not opened yet; those opened
        # ahead (a descriptor or why not), not yet used.
        self.regular: list[str | None] = []
        self.unopened = 0
        self.opened: dict[str, int | OSError] = {}

    def close(self) -> None:
        _close(self.ufd)
        _close(self.lfd)
        self.drop_opened()

    def drop_opened(self) -> None:
        for result in self.opened.values():
            if not isinstance(result, OSError):
                _close(result)
        self.opened = {}


class _Walker:
    def __init__(self, options: DiffOptions, files: CallerFiles) -> None:
        self.files = files
        # The layer being walked: its upper and lower roots, how many leading bytes of a
        # path name the layer's root, and whether the caller may reach that root at all.
        self.upper_root = -1
        self.lower_root: int | None = None
        self.cut = 0
        self.reachable = True
        self.max_changes = options.max_changes
        self.file_cap = options.diff_file_bytes
        self.budget = options.diff_total_bytes
        # No workspace (b"": cwd is a system directory): no path is in it (none holds a NUL).
        workspace = _norm(options.workspace) if options.workspace else b"\0"
        self.workspace = workspace
        self.workspace_prefix = b"/" if workspace == b"/" else workspace + b"/"
        self.exclude = frozenset(_norm(path) for path in options.exclude)
        self.changes: list[FileChange] = []
        self.truncated = False
        self.collecting = True
        self.scratch_bytes = 0
        self.count_budget = _MAX_COUNT
        self._linked: set[tuple[int, int]] = set()
        # Hard links in the upper layers: each multiply-linked file's (st_dev, st_ino) by path,
        # and its first names (``linked_to`` of the changes, filled in by :meth:`linked`).
        self._inode_of: dict[bytes, tuple[int, int]] = {}
        self._names: dict[tuple[int, int], list[bytes]] = {}
        # New files' content as read (DiffResult.contents), and how many more bytes may be kept.
        self.contents: dict[bytes, bytes] = {}
        self.content_room = _KEEP_CONTENT_BYTES if options.content_for > 0 else 0
        self.content_for = options.content_for

    # -- bookkeeping -------------------------------------------------------------

    def _scratch(self, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in self._linked:
                return
            self._linked.add(key)
        self.scratch_bytes += st.st_blocks * 512

    def _link_name(self, path: bytes, inode: tuple[int, int]) -> None:
        self._inode_of[path] = inode
        names = self._names.setdefault(inode, [])
        if len(names) < _MAX_LINK_NAMES:
            names.append(path)

    def linked(self, changes: list[FileChange]) -> list[FileChange]:
        """``changes`` with ``linked_to`` set on each multiply-linked file: another of its
        names, one outside the workspace when the walk saw one."""
        if not self._names:
            return changes
        out = []
        for c in changes:
            inode = self._inode_of.get(c.path) if c.links > 1 else None
            if inode is not None:
                others = [n for n in self._names[inode] if n != c.path]
                outside = [n for n in others if not self._in_workspace(n)]
                if others:
                    c = dataclasses.replace(c, linked_to=(outside or others)[0])
            out.append(c)
        return out

    def _in_workspace(self, path: bytes) -> bool:
        return path == self.workspace or path.startswith(self.workspace_prefix)

    def _excluded(self, path: bytes) -> bool:
        return any(path == ex or path.startswith(ex.rstrip(b"/") + b"/") for ex in self.exclude)

    def _add(self, change: FileChange) -> None:
        if len(self.changes) >= self.max_changes:
            self._add_over()
            return
        self.changes.append(change)

    def _add_over(self) -> None:
        """One change more than ``max_changes`` exists: stop collecting."""
        self.truncated = True
        self.collecting = False

    # -- the walk ----------------------------------------------------------------

    def walk(self, layer: Layer) -> None:
        host = _norm(layer.host_path)
        ufd: int | None = None
        try:
            ufd = os.open(layer.upper, _ROOT_FLAGS)
            ust = os.fstat(ufd)
        except OSError as exc:
            _close(ufd)
            raise SandboxError(
                f"cannot read the overlay upper layer {layer.upper!r}: {exc}",
                reason="DIFF_FAILED",
            ) from exc
        self._scratch(ust)
        report = self.collecting and not self._excluded(host)
        lfd: int | None = None
        if report:
            try:
                lfd = os.open(layer.lower, _ROOT_FLAGS)
            except OSError:
                lfd = None
        if lfd is not None:
            try:
                lst: os.stat_result | None = os.fstat(lfd)
            except OSError:
                lst = None
            if lst is not None and _meta_differs(ust, lst):
                self._add(self._dir_change(host, _METADATA_CHANGED, ust, lst))
        prefix = host if host.endswith(b"/") else host + b"/"
        self.upper_root, self.lower_root, self.cut = ufd, lfd, len(prefix)
        self.reachable = self.files.reachable(host)
        frame = _Frame(ufd, lfd, False, report, prefix, 0)
        stack = [frame]
        try:
            self._fill(frame)
            while stack:
                frame = stack[-1]
                prefix = frame.prefix
                for key, tag, name, st in frame.items:
                    report = frame.report and self.collecting
                    if tag == _DESCEND:
                        child = self._descend(frame, key[:-1], name, report)
                        if child is not None:
                            stack.append(child)
                            break  # walk the child first; this frame resumes after it
                    elif not report:
                        continue
                    elif tag == _ENTRY and st is not None:
                        self._entry(frame, prefix + key, name, st)
                    elif tag == _GONE and frame.lfd is not None:
                        lower = _lstat(name, frame.lfd)
                        if lower is not None:
                            self._deleted(frame.lfd, prefix + key, name, lower)
                else:
                    stack.pop().close()
        finally:
            for frame in stack:
                frame.close()

    def _fill(self, frame: _Frame) -> None:
        """List a directory's upper (and, when opaque, lower) entries as sorted work items."""
        items: list[_Item] = []
        report = frame.report and self.collecting
        try:
            with os.scandir(frame.ufd) as it:
                entries = list(it)
        except OSError:
            entries = []
        scratch = 0
        linked = self._linked
        s_isdir = stat.S_ISDIR
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            name = entry.name
            is_dir = s_isdir(st.st_mode)
            if st.st_nlink == 1 or is_dir:
                scratch += st.st_blocks * 512
            else:
                inode = (st.st_dev, st.st_ino)
                if inode not in linked:  # count a hard-linked file once
                    linked.add(inode)
                    scratch += st.st_blocks * 512
                if report:
                    self._link_name(frame.prefix + os.fsencode(name), inode)
            if not report:
                if is_dir:
                    items.append((b"/", _DESCEND, name, None))
                continue
            key = name.encode(_FS_ENCODING, _FS_ERRORS)  # os.fsencode, without a call
            items.append((key, _ENTRY, name, st))
            if is_dir:
                items.append((key + b"/", _DESCEND, name, None))
        self.scratch_bytes += scratch
        lfd = frame.lfd
        if report and lfd is not None and (frame.opaque or _list_lower(lfd, len(entries))):
            try:
                lower = os.listdir(lfd)
            except OSError:
                lower = None
            if lower is not None:
                frame.lower_names = set(lower)
                if frame.opaque:
                    upper = {entry.name for entry in entries}
                    items.extend(
                        (os.fsencode(name), _GONE, name, None)
                        for name in lower
                        if name not in upper
                    )
        if report:
            items.sort(key=itemgetter(0))
            if self.files.active:
                s_isreg = stat.S_ISREG
                frame.regular = [
                    None if tag == _DESCEND else name
                    for _key, tag, name, st in items
                    if tag == _DESCEND or (st is not None and s_isreg(st.st_mode))
                ]
        frame.items = iter(items)

    def _descend(self, parent: _Frame, key: bytes, name: str, report: bool) -> _Frame | None:
        if parent.depth + 1 > _MAX_DEPTH:
            self.truncated = True
            return None
        try:
            ufd = os.open(name, _DIR_FLAGS, dir_fd=parent.ufd)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.truncated = True
            return None
        path = parent.prefix + key
        if report and self.exclude and self._excluded(path):
            report = False
        lfd: int | None = None
        opaque = False
        if report:
            opaque = parent.opaque or _is_opaque(ufd)
            if parent.lfd is not None:
                lfd = _open_dir(name, parent.lfd)
        frame = _Frame(ufd, lfd, opaque, report, path + b"/", parent.depth + 1)
        try:
            self._fill(frame)
        except BaseException:
            frame.close()
            raise
        return frame

    # -- classification ----------------------------------------------------------

    def _entry(self, frame: _Frame, path: bytes, name: str, st: os.stat_result) -> None:
        if self.exclude and path in self.exclude:
            return
        mode = st.st_mode
        lfd = frame.lfd
        fmt = mode & 0o170000  # stat.S_IFMT(mode), without a call
        if fmt == stat.S_IFCHR and st.st_rdev == 0:  # a whiteout
            lower = _lstat(name, lfd)
            if lower is not None and lfd is not None:
                self._deleted(lfd, path, name, lower)
            return
        names = frame.lower_names
        lower = _lstat(name, lfd) if names is None or name in names else None
        ftype = _TYPES.get(fmt, _OTHER)  # _ftype(mode)
        if ftype is _REGULAR:
            if lower is not None or not self._created_small(frame, path, name, st):
                self._regular(frame, path, name, st, lower)
            return
        if lower is None:
            kind = _CREATED
        elif _differs(frame, name, st, lower):
            kind = _MODIFIED
        elif _meta_differs(st, lower):
            kind = _METADATA_CHANGED
        else:
            return
        if ftype is _DIRECTORY:
            change = self._dir_change(path, kind, st, lower)
        else:
            change = FileChange(
                path=path,
                kind=kind,
                file_type=ftype,
                previous_file_type=_ftype(lower.st_mode) if lower is not None else _NONE,
                in_workspace=self._in_workspace(path),
                size_before=lower.st_size if lower is not None else None,
                size_after=st.st_size,
                mode_before=stat.S_IMODE(lower.st_mode) if lower is not None else None,
                mode_after=stat.S_IMODE(mode),
                uid_after=st.st_uid,
                gid_after=st.st_gid,
                symlink_target=(_readlink(name, frame.ufd) or b"") if ftype is _SYMLINK else b"",
                entries_deleted=self._replaced_dir(lfd, name, lower),
                other_type=other_type(mode) if ftype is _OTHER else _NO_OTHER,
                links=st.st_nlink if st.st_nlink > 1 else 0,
            )
        self._add(change)

    def _dir_change(
        self, path: bytes, kind: ChangeKind, st: os.stat_result, lower: os.stat_result | None
    ) -> FileChange:
        return FileChange(
            path=path,
            kind=kind,
            file_type=_DIRECTORY,
            previous_file_type=_ftype(lower.st_mode) if lower is not None else _NONE,
            in_workspace=self._in_workspace(path),
            size_before=lower.st_size if lower is not None else None,
            size_after=st.st_size,
            mode_before=stat.S_IMODE(lower.st_mode) if lower is not None else None,
            mode_after=stat.S_IMODE(st.st_mode),
            uid_after=st.st_uid,
            gid_after=st.st_gid,
        )

    def _replaced_dir(self, lfd: int | None, name: str, lower: os.stat_result | None) -> int:
        """How many entries a lower directory replaced by a non-directory held."""
        if lower is None or lfd is None or not stat.S_ISDIR(lower.st_mode):
            return 0
        return self._count_below(lfd, name)

    def _created_small(self, frame: _Frame, path: bytes, name: str, st: os.stat_result) -> bool:
        """Report a new regular file below the diff limit, the bulk of a typical diff.

        The same result as :meth:`_regular`, in one lean function: a diff of many new
        files spends most of its time here. Returns False, having done nothing, when
        the general path must handle the file (too large, unreadable, or it grew).
        """
        size = st.st_size
        if size >= self.file_cap:
            return False
        try:
            if self.files.active:
                fd = self._open_upper(frame, path, name)
            else:
                fd = _os_open(name, _FILE_FLAGS, dir_fd=frame.ufd)
        except OSError:
            return False
        try:
            data = _os_read(fd, size + 1)
            caps = _capabilities(fd)
        except OSError:
            return False
        finally:
            _os_close(fd)
        if len(data) > size:
            return False
        changes = self.changes
        if len(changes) >= self.max_changes:
            self._add_over()
            return True
        fields = _CREATED_TEMPLATE.copy()  # then only what differs from it
        if data.find(b"\0", 0, _TEXT_PROBE) != -1:
            fields["binary"] = True
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                fields["binary"] = True
            else:
                if not text:
                    pass
                elif self.budget <= 0:
                    fields["diff_truncated"] = True
                else:
                    diff = _unified(None, text, path)
                    limit = self.file_cap if self.file_cap < self.budget else self.budget
                    used = len(diff)
                    if used > limit or not diff.isascii():
                        diff, used, truncated = _cut(diff, limit)
                        if truncated:
                            fields["diff_truncated"] = True
                    fields["unified_diff"] = diff
                    self.budget -= used
        fields["path"] = path
        if path.startswith(self.workspace_prefix) or path == self.workspace:
            fields["in_workspace"] = True
        fields["size_after"] = size
        fields["sha256_after"] = _digest.sha256(data).hexdigest()
        fields["mode_after"] = st.st_mode & 0o7777
        fields["uid_after"] = st.st_uid
        fields["gid_after"] = st.st_gid
        if caps:
            fields["capabilities"] = caps
        if st.st_nlink > 1:
            fields["links"] = st.st_nlink
        if _FAST_CHANGE:
            change: FileChange = _object_new(FileChange)
            _object_setattr(change, "__dict__", fields)
        else:
            change = FileChange(**fields)  # type: ignore[arg-type]
        changes.append(change)
        if size <= self.content_room:
            if len(changes) > self.content_for:
                self.contents, self.content_room = {}, 0  # too many to be kept: keep none
            else:
                self.contents[path] = data
                self.content_room -= size
        return True

    def _regular(
        self,
        frame: _Frame,
        path: bytes,
        name: str,
        st: os.stat_result,
        lower: os.stat_result | None,
    ) -> None:
        lfd = frame.lfd
        size = st.st_size
        cap = self.file_cap
        old_size = lower.st_size if lower is not None and stat.S_ISREG(lower.st_mode) else None
        # Whether the caller may not read the new content, or the old it is compared with.
        denied = False
        read: _Read | None = None
        try:
            fd: int | None = self._open_upper(frame, path, name)
        except OSError:
            fd = None
            denied = self.files.active
            caps = _capabilities_at(frame.ufd, name)  # metadata, read as root
        if fd is not None:
            caps = _capabilities(fd)
            old_fd = None
            if old_size == size and lfd is not None:
                old_fd, denied = self._open_lower(frame, path, name)
            read = _read_upper(fd, size, cap, old_fd)
        if read is None:
            if _lstat(name, frame.ufd) is None:
                return  # vanished
            read = ("", None, None, False)  # unreadable: report what is known
        sha256, content, old_content, same = read
        if lower is None:
            kind = _CREATED
        elif not same:
            kind = _MODIFIED  # also when the caller may not compare them
        elif _meta_differs(st, lower):
            kind = _METADATA_CHANGED
        else:
            return
        diff = ""
        binary = False
        truncated = False
        if kind is not _METADATA_CHANGED and not denied:
            if size > cap or (old_size is not None and old_size > cap):
                truncated = True
            elif content is not None:
                old = old_content
                if old is None and old_size is not None and lfd is not None:
                    old_fd, denied = self._open_lower(frame, path, name)
                    if old_fd is not None:
                        old = _read_small(old_fd, old_size, cap)
                if not denied:
                    diff, binary, truncated = self._diff(path, content, old, old_size is None)
        self._add(
            _file_change(
                path=path,
                kind=kind,
                file_type=_REGULAR,
                previous_file_type=_ftype(lower.st_mode) if lower is not None else _NONE,
                in_workspace=self._in_workspace(path),
                size_before=lower.st_size if lower is not None else None,
                size_after=size,
                sha256_after=sha256,
                mode_before=stat.S_IMODE(lower.st_mode) if lower is not None else None,
                mode_after=stat.S_IMODE(st.st_mode),
                uid_after=st.st_uid,
                gid_after=st.st_gid,
                unified_diff=diff,
                binary=binary,
                diff_truncated=truncated,
                entries_deleted=self._replaced_dir(lfd, name, lower),
                unreadable=denied,
                capabilities=caps,
                links=st.st_nlink if st.st_nlink > 1 else 0,
            )
        )

    def _open_upper(self, frame: _Frame, path: bytes, name: str) -> int:
        """Open an upper file for reading as the caller would; raises ``OSError``.

        As the caller, the directory's next regular files (up to where the walk
        descends) are opened together, with one switch of the file-system uid.
        """
        if not self.files.active:
            return os.open(name, _FILE_FLAGS, dir_fd=frame.ufd)
        if not self.reachable:
            raise PermissionError(errno.EACCES, "the caller cannot reach this layer")
        result = frame.opened.pop(name, None)
        if result is None:
            self._open_ahead(frame, name)
            result = frame.opened.pop(name, None)
        if result is None:
            return self.files.open(self.upper_root, path[self.cut :])
        if isinstance(result, OSError):
            raise result
        return result

    def _open_ahead(self, frame: _Frame, name: str) -> None:
        """Open, as the caller, the frame's regular files from ``name`` on (a batch)."""
        names = frame.regular
        start = frame.unopened
        while start < len(names) and names[start] != name:
            start += 1
        if start == len(names):
            return
        end = start + 1
        limit = min(len(names), start + _OPEN_AHEAD)
        while end < limit and names[end] is not None:
            end += 1
        frame.unopened = end
        batch = [n for n in names[start:end] if n is not None]
        within = frame.prefix[self.cut :].rstrip(b"/")
        encoded = [n.encode(_FS_ENCODING, _FS_ERRORS) for n in batch]
        frame.drop_opened()  # left over: excluded, or past the change limit
        opened = self.files.open_many(self.upper_root, within, encoded)
        frame.opened = dict(zip(batch, opened, strict=True))

    def _open_lower(self, frame: _Frame, path: bytes, name: str) -> tuple[int | None, bool]:
        """Open a lower regular file as the caller would: (descriptor or None, denied).

        ``denied`` is True when the caller may not open it; None without it means the
        file is gone or not a regular file.
        """
        if not self.files.active:
            return (_open_regular(name, frame.lfd) if frame.lfd is not None else None), False
        if not self.reachable or self.lower_root is None:
            return None, True
        try:
            fd = self.files.open(self.lower_root, path[self.cut :])
        except FileNotFoundError:
            return None, False
        except OSError:
            return None, True
        return _if_regular(fd), False

    def _diff(
        self, path: bytes, new: bytes, old: bytes | None, from_nothing: bool
    ) -> tuple[str, bool, bool]:
        """(diff, binary, diff_truncated) for a regular file's new and old content."""
        if new.find(b"\0", 0, _TEXT_PROBE) != -1:
            return "", True, False
        try:
            new_text = new.decode("utf-8")
        except UnicodeDecodeError:
            return "", True, False
        old_text: str | None = None
        if not from_nothing:
            if old is None:  # the old side could not be read
                return "", False, True
            old_text = _text(old)
            if old_text is None:
                return "", True, False
        if not new_text and old_text is None:
            return "", False, False  # a new empty file: nothing to show
        if self.budget <= 0:
            return "", False, True
        text = _unified(old_text, new_text, path)
        limit = min(self.file_cap, self.budget)
        size = len(text)
        if size > limit or not text.isascii():
            text, size, truncated = _cut(text, limit)
        else:
            truncated = False
        self.budget -= size
        return text, False, truncated

    def _deleted(self, lfd: int, path: bytes, name: str, lower: os.stat_result) -> None:
        if self.exclude and path in self.exclude:
            return
        ftype = _ftype(lower.st_mode)
        count = self._count_below(lfd, name) if ftype is _DIRECTORY else 0
        self._add(
            FileChange(
                path=path,
                kind=_DELETED,
                file_type=ftype,
                previous_file_type=ftype,
                in_workspace=self._in_workspace(path),
                size_before=lower.st_size,
                mode_before=stat.S_IMODE(lower.st_mode),
                entries_deleted=count,
                other_type=other_type(lower.st_mode) if ftype is _OTHER else _NO_OTHER,
            )
        )

    def _count_below(self, parent_fd: int, name: str) -> int:
        """Count the entries beneath a lower directory, within the shared count budget.

        Stays on the directory's own file system; the count is a lower bound once
        the budget or the depth limit is reached.
        """
        fd = _open_dir(name, parent_fd)
        if fd is None:
            return 0
        try:
            dev = os.fstat(fd).st_dev
        except OSError:
            os.close(fd)
            return 0
        count = 0
        stack: list[tuple[int, list[str]]] = []
        pending: int | None = fd
        try:
            while True:
                if pending is not None:
                    subdirs: list[str] = []
                    try:
                        with os.scandir(pending) as it:
                            for entry in it:
                                if self.count_budget <= 0:
                                    break
                                self.count_budget -= 1
                                count += 1
                                if entry.is_dir(follow_symlinks=False):
                                    subdirs.append(entry.name)
                    except OSError:
                        pass
                    stack.append((pending, subdirs))
                    pending = None
                if not stack:
                    break
                top, subdirs = stack[-1]
                if not subdirs or self.count_budget <= 0:
                    os.close(stack.pop()[0])
                    continue
                child = _open_dir(subdirs.pop(), top)
                if child is None:
                    continue
                if len(stack) >= _MAX_DEPTH or os.fstat(child).st_dev != dev:
                    os.close(child)
                    continue
                pending = child
        except OSError:
            pass
        finally:
            _close(pending)
            for open_fd, _ in stack:
                _close(open_fd)
        return count


def _differs(frame: _Frame, name: str, st: os.stat_result, lower: os.stat_result) -> bool:
    """Whether a non-regular entry changed beyond its metadata: type, target or device."""
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(lower.st_mode):
        return True
    if stat.S_ISLNK(st.st_mode):
        return _readlink(name, frame.ufd) != _readlink(name, frame.lfd)
    return not stat.S_ISDIR(st.st_mode) and st.st_rdev != lower.st_rdev


def _file_change(
    *,
    path: bytes,
    kind: ChangeKind,
    file_type: FileType,
    previous_file_type: FileType,
    in_workspace: bool,
    size_before: int | None,
    size_after: int | None,
    sha256_after: str,
    mode_before: int | None,
    mode_after: int | None,
    uid_after: int | None,
    gid_after: int | None,
    unified_diff: str,
    binary: bool,
    diff_truncated: bool,
    entries_deleted: int,
    unreadable: bool,
    symlink_target: bytes = b"",
    other_type: OtherType = OtherType.NONE,
    capabilities: str = "",
    links: int = 0,
    linked_to: bytes = b"",
) -> FileChange:
    """A :class:`FileChange` with every field given (see :func:`_build`)."""
    return _build(
        {
            "path": path,
            "kind": kind,
            "file_type": file_type,
            "previous_file_type": previous_file_type,
            "in_workspace": in_workspace,
            "size_before": size_before,
            "size_after": size_after,
            "sha256_after": sha256_after,
            "mode_before": mode_before,
            "mode_after": mode_after,
            "uid_after": uid_after,
            "gid_after": gid_after,
            "symlink_target": symlink_target,
            "unified_diff": unified_diff,
            "binary": binary,
            "diff_truncated": diff_truncated,
            "entries_deleted": entries_deleted,
            "unreadable": unreadable,
            "other_type": other_type,
            "capabilities": capabilities,
            "links": links,
            "linked_to": linked_to,
        }
    )


def _created_fields(
    path: bytes,
    in_workspace: bool,
    size: int,
    sha256: str,
    st: os.stat_result,
    diff: str,
    binary: bool,
    truncated: bool,
    capabilities: str,
) -> dict[str, object]:
    """The fields of a new regular file's change; positional, for the hot path."""
    return {
        "path": path,
        "kind": _CREATED,
        "file_type": _REGULAR,
        "previous_file_type": _NONE,
        "in_workspace": in_workspace,
        "size_before": None,
        "size_after": size,
        "sha256_after": sha256,
        "mode_before": None,
        "mode_after": st.st_mode & 0o7777,
        "uid_after": st.st_uid,
        "gid_after": st.st_gid,
        "symlink_target": b"",
        "unified_diff": diff,
        "binary": binary,
        "diff_truncated": truncated,
        "entries_deleted": 0,
        "unreadable": False,
        "other_type": _NO_OTHER,
        "capabilities": capabilities,
        "links": st.st_nlink if st.st_nlink > 1 else 0,
        "linked_to": b"",
    }


# A new regular file's change before what :meth:`_Walker._created_small` fills in: the
# fields of one that is empty, has one name, no capabilities and no diff, in the order of
# FileChange's fields. Copying it and setting the few that differ costs half of building
# the whole dictionary.
_CREATED_TEMPLATE = _created_fields(
    b"", False, 0, "", os.stat_result((0,) * 10), "", False, False, ""
)


def _build(fields: dict[str, object]) -> FileChange:
    """A :class:`FileChange` from all its fields, about three times as fast as its ``__init__``.

    The frozen dataclass's ``__init__`` sets each of its 17 fields through
    ``object.__setattr__`` (~2.5 us); installing the instance dictionary at once gives
    an equal object. Used only when that is known to be equivalent: no slots, no
    ``__post_init__``, and every builder names exactly the dataclass's fields (all
    checked at import; otherwise the plain constructor runs).
    """
    if _FAST_CHANGE:
        change: FileChange = _object_new(FileChange)
        _object_setattr(change, "__dict__", fields)
        return change
    return FileChange(**fields)  # type: ignore[arg-type]


def _fast_change_ok() -> bool:
    if hasattr(FileChange, "__slots__") or hasattr(FileChange, "__post_init__"):
        return False
    names = {field.name for field in dataclasses.fields(FileChange)}
    sample = os.stat_result((0,) * 10)
    created = _created_fields(b"", False, 0, "", sample, "", False, False, "")
    code = _file_change.__code__
    keywords = set(code.co_varnames[: code.co_kwonlyargcount])
    return set(created) == names and keywords == names


_object_new = object.__new__
_object_setattr = object.__setattr__
_FAST_CHANGE = _fast_change_ok()
_os_open, _os_read, _os_close = os.open, os.read, os.close
# FileChange's field names in order, and a change's values in that order.
_CHANGE_FIELDS = tuple(field.name for field in dataclasses.fields(FileChange))
_change_values = attrgetter(*_CHANGE_FIELDS)
# The enum fields, by position: a row carries their values, not the members. How a member
# pickles differs between Python releases (3.11.2: ``getattr(Class, name)``, which the
# restricted unpickler refuses; 3.11.7: ``Class(value)``); a plain value pickles the same.
_ENUM_AT = tuple(
    (i, kind)
    for i, kind in enumerate(typing.get_type_hints(FileChange)[n] for n in _CHANGE_FIELDS)
    if isinstance(kind, type) and issubclass(kind, enum.Enum)
)


# How a row carries an enum member, and each enum field's members by value: ``int`` and a
# dict lookup cost a fraction of ``member.value`` and ``Kind(value)`` (~0.2 and ~0.5 us).
_ENUM_VALUE: typing.Callable[[typing.Any], object] = (
    int if all(issubclass(kind, enum.IntEnum) for _i, kind in _ENUM_AT) else attrgetter("value")
)
_ENUM_MEMBERS = tuple(
    (_CHANGE_FIELDS[i], {member.value: member for member in kind}) for i, kind in _ENUM_AT
)


def _change_row(change: FileChange) -> tuple[object, ...]:
    row = list(_change_values(change))
    for i, _kind in _ENUM_AT:
        row[i] = _ENUM_VALUE(row[i])
    return tuple(row)


def _row_fields_any(row: tuple[object, ...]) -> dict[str, object]:
    """A row's fields by name, the enum values made members again (an unknown value, or a row
    of another length than FileChange's fields, raises ValueError)."""
    fields = dict(zip(_CHANGE_FIELDS, row, strict=True))
    for name, members in _ENUM_MEMBERS:
        try:
            fields[name] = members[fields[name]]
        except (KeyError, TypeError):
            raise ValueError(f"{fields[name]!r} is not a valid {name}") from None
    return fields


_KINDS = {member.value: member for member in ChangeKind}
_FILE_TYPES = {member.value: member for member in FileType}
_OTHER_TYPES = {member.value: member for member in OtherType}


def _row_fields_now(row: tuple[object, ...]) -> dict[str, object]:
    """:func:`_row_fields_any` written out for today's FileChange: 40 % faster (a daemon
    unpickles one per change). Used only when it gives the same (checked at import)."""
    (path, kind, ftype, before, ws, sb, sa, sha, mb, ma, ua, ga, target, diff, binary, cut,
     deleted, unreadable, other, caps, links, linked) = row  # fmt: skip
    try:
        return {
            "path": path,
            "kind": _KINDS[kind],  # type: ignore[index]
            "file_type": _FILE_TYPES[ftype],  # type: ignore[index]
            "previous_file_type": _FILE_TYPES[before],  # type: ignore[index]
            "in_workspace": ws,
            "size_before": sb,
            "size_after": sa,
            "sha256_after": sha,
            "mode_before": mb,
            "mode_after": ma,
            "uid_after": ua,
            "gid_after": ga,
            "symlink_target": target,
            "unified_diff": diff,
            "binary": binary,
            "diff_truncated": cut,
            "entries_deleted": deleted,
            "unreadable": unreadable,
            "other_type": _OTHER_TYPES[other],  # type: ignore[index]
            "capabilities": caps,
            "links": links,
            "linked_to": linked,
        }
    except (KeyError, TypeError):
        return _row_fields_any(row)  # raises ValueError, naming the value


def _row_fields_now_ok() -> bool:
    """Whether :func:`_row_fields_now` names FileChange's fields, in order, and converts the
    same enum fields as :func:`_row_fields_any`."""
    # A distinct value in every field: the enums of four different values, the others each
    # a tuple of its position.
    change = FileChange(b"/x", ChangeKind.DELETED, FileType.REGULAR, FileType.DIRECTORY)
    enum_at = {i for i, _kind in _ENUM_AT}
    row = _change_row(dataclasses.replace(change, other_type=OtherType.SOCKET))
    sample = tuple(value if i in enum_at else (i,) for i, value in enumerate(row))
    fields, expected = _row_fields_now(sample), _row_fields_any(sample)
    return [(k, type(v), v) for k, v in fields.items()] == [
        (k, type(v), v) for k, v in expected.items()
    ]


_row_fields = _row_fields_now if _row_fields_now_ok() else _row_fields_any


def _list_lower(lfd: int, upper_count: int) -> bool:
    """Whether listing a lower directory is likely cheaper than an lstat per upper entry.

    Most new names are not in the lower, and a failed lstat costs as much as listing
    several names; a directory's size in bytes roughly bounds its number of entries.
    """
    if upper_count < _LIST_LOWER_MIN:
        return False
    try:
        size = os.fstat(lfd).st_size
    except OSError:
        return False
    return size <= upper_count * _LIST_LOWER_BYTES


def _capabilities(fd: int) -> str:
    """The file capabilities of the open file ``fd`` as text; "" if it has none.

    ``security.*`` attributes need no permission to read: a descriptor opened with the
    caller's rights reads them as well as root's. One that cannot be read for another
    reason is reported as such (fail closed), not as none.
    """
    try:
        # Listing first: nearly free when there is none (a failed getxattr raises, which
        # costs a quarter of a small new file's whole diff).
        if CAPABILITY_XATTR not in os.listxattr(fd):
            return ""
        raw = os.getxattr(fd, CAPABILITY_XATTR)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return ""
        return f"unreadable file capabilities ({exc.strerror})"
    return describe_capabilities(raw)


def _capabilities_at(dir_fd: int, name: str) -> str:
    """:func:`_capabilities` of a regular file the caller may not open (opened as root)."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return ""  # gone (or no longer a file: a FIFO swapped in opens non-blocking)
    try:
        return _capabilities(fd)
    finally:
        os.close(fd)


def _is_opaque(fd: int) -> bool:
    """Whether an upper directory hides its lower (ENODATA or ENOTSUP: it does not)."""
    try:
        return os.getxattr(fd, _OPAQUE_XATTR) == b"y"
    except OSError:
        return False
