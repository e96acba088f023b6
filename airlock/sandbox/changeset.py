"""Changesets: a dry run's file changes, kept so that Apply writes exactly what was reviewed.

:func:`save` runs in the supervisor (root, in the sandbox's private mount namespace,
where each overlay's lower is the live host directory) right after
:func:`airlock.sandbox.diff.compute_changes`. For every change of the diff it records
the host's state *before* (read from the lower) and the dry run's state *after* (read
from the upper), and copies the new content of created and modified regular files. It
stores nothing else: a path the diff does not list is never written by Apply.
:func:`airlock.apply.apply` later checks the before states against the host and
writes the after states.

On disk, ``dest`` (created 0700) holds two files:

``content``
    The new content of every created or modified regular file, one after the
    other; each change names its ``offset`` and ``size`` in it.
``manifest.json``
    Canonical JSON (sorted keys, no spaces, ASCII): its SHA-256 is
    :attr:`Manifest.digest`, what an approval binds to. Format, version 1::

        {"format": "airlock.changeset", "version": 1,
         "created_ns": <time.time_ns() when saving began>,
         "content_bytes": <size of the content file>,
         "changes": [{"path": P, "kind": K, "before": S, "after": S}, ...]}

    ``P`` is the host path: its bytes decoded as UTF-8 with ``surrogateescape``
    (JSON escapes the lone surrogates), so any byte string round-trips. ``K`` is a
    :class:`~airlock.types.ChangeKind` name. Changes are sorted by path components
    (parents before children). Each state ``S`` is ``{"type": T}`` with ``T`` a
    :class:`~airlock.types.FileType` name; ``NONE`` (absent) has no other key.
    Present entries add ``mode`` (permission bits), ``uid`` and ``gid``, and:

    * a regular file: ``size``; ``sha256`` of its content when the change replaces
      or deletes it (before) or writes it (after); ``offset`` in ``content`` (after,
      when the change writes content; metadata-only changes carry none);
    * a symbolic link: ``target`` (encoded like ``P``);
    * ``OTHER``: ``fmt`` (the ``S_IFMT`` bits) and ``rdev``; only FIFOs and sockets
      can be an after state;
    * a regular file written with file capabilities (after): ``caps``, the raw
      ``security.capability`` value in hex (Apply sets it only when the approval names
      the path, see :mod:`airlock._special`);
    * a directory the change deletes or replaces (before): ``tree``, the
      ``sha256`` and ``entries`` count of :func:`tree_digest`;
    * every before state: ``ino``, ``mtime_ns`` and ``ctime_ns``, the identity
      Apply falls back to for a file it may not read.

Directory deletions are verified with a digest of the whole subtree (every entry's
relative path, type, permission bits, owner, inode number; for non-directories also
size, mtime, ctime and link target or device), at most ``max_tree_entries``
entries per changeset: past that, :func:`save` refuses. A subtree that holds a mount
point is refused too (Apply never crosses file systems).

Content is read with the caller's rights (:class:`~airlock.sandbox.diff.CallerFiles`):
the new content copied for Apply, and the old content hashed to verify it later. A new
regular file the diff read whole (``DiffResult.contents``: it reads as the caller too, after
the command ended, when the upper layer no longer changes) is copied from that read, not
opened again. A changeset is all or nothing, so a change whose content the caller may not
read (the diff marks it ``unreadable``; or the file it replaces or deletes) keeps the whole
dry run from being kept (``CHANGES_UNREADABLE``): Apply can never write, nor the manifest's
digest reflect, content the caller could not have read itself.

Refusals: a truncated diff (``CHANGES_TRUNCATED``: a partial changeset must never be
applied); content the caller may not read (``CHANGES_UNREADABLE``); more than
``quota_bytes`` of content plus manifest (``CHANGESET_QUOTA``);
a device node, or a change to ``/`` itself (``CHANGESET_UNSUPPORTED``); a lower that
no longer matches the diff (:class:`~airlock.Conflict`: the host changed during the
dry run). A refused or failed save removes ``dest``.

Nothing is fsync'ed: a crash leaves a changeset that fails verification (manifest
syntax or digest, content hashes), never one that applies other content. Every
path is opened relative to directory descriptors with ``O_NOFOLLOW``, so no
symbolic link in the upper or the (live) lower is ever followed.

Stdlib only: this runs in the small root helper process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

from airlock._errors import (
    AirlockError,
    Conflict,
    InvalidRequest,
    ResourceExhausted,
    SandboxError,
)
from airlock._special import CAPABILITY_XATTR
from airlock.sandbox import _digest, _gcpause
from airlock.sandbox.diff import Caller, CallerFiles, DiffResult, Layer
from airlock.types import ChangeKind, FileChange, FileType

__all__ = [
    "CONTENT_NAME",
    "FORMAT",
    "MANIFEST_NAME",
    "VERSION",
    "ChangeRecord",
    "DirCursor",
    "EntryState",
    "Manifest",
    "Tree",
    "TreeScan",
    "components",
    "load",
    "read_manifest",
    "save",
    "tree_digest",
]

FORMAT = "airlock.changeset"
VERSION = 1
MANIFEST_NAME = "manifest.json"
CONTENT_NAME = "content"
MAX_TREE_ENTRIES = 1_000_000
# Deeper subtrees are refused: each level of a walk holds one open directory.
MAX_DEPTH = 256
# A manifest larger than this is not read (10,000 changes take a few MiB).
_MAX_MANIFEST = 256 * 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TYPES = {stat.S_IFREG: FileType.REGULAR, stat.S_IFDIR: FileType.DIRECTORY}
_TYPES[stat.S_IFLNK] = FileType.SYMLINK
# The special files Apply can create without privilege.
APPLICABLE_OTHER = frozenset({stat.S_IFIFO, stat.S_IFSOCK})


def file_type(mode: int) -> FileType:
    """The :class:`FileType` of an ``st_mode``."""
    return _TYPES.get(stat.S_IFMT(mode), FileType.OTHER)


def components(path: bytes) -> tuple[bytes, ...]:
    """An absolute path's components: the sort key that puts parents before children."""
    return tuple(filter(None, path.split(b"/")))


# --- The manifest ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tree:
    """The digest of a directory's whole subtree (see :func:`tree_digest`)."""

    sha256: str
    entries: int


@dataclass(frozen=True, slots=True)
class EntryState:
    """One path's state: the host's before the change, or the dry run's after it.

    ``file_type`` NONE means absent (every other field is then unused). Which of the
    optional fields are set is described in the module docstring.
    """

    file_type: FileType
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: bytes = b""
    fmt: int = 0
    rdev: int = 0
    tree: Tree | None = None
    offset: int | None = None
    ino: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    caps: bytes = b""  # the ``security.capability`` value a written file gets

    @property
    def exists(self) -> bool:
        return self.file_type is not FileType.NONE


_ABSENT = EntryState(FileType.NONE)


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One change: its host path, its kind, the host's state before and the dry run's after."""

    path: bytes
    kind: ChangeKind
    before: EntryState
    after: EntryState

    @property
    def writes_content(self) -> bool:
        """Whether Apply writes new content (from the ``content`` file) at this path."""
        return self.after.file_type is FileType.REGULAR and self.after.offset is not None


@dataclass(frozen=True)
class Manifest:
    """A changeset's manifest: every change, with its before and after states."""

    changes: tuple[ChangeRecord, ...]
    content_bytes: int
    created_ns: int
    version: int = VERSION

    def to_json(self) -> bytes:
        """The canonical JSON bytes (what :attr:`digest` hashes)."""
        return self._canonical

    @functools.cached_property
    def _canonical(self) -> bytes:
        # Encoded once: saving writes these bytes and then hashes them for the digest.
        return _manifest_text(self)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical manifest: what an approval binds to.

        The manifest holds the content's hashes, so this covers the content too.
        """
        return _digest.sha256(self.to_json()).hexdigest()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


_TYPE_NAMES = {ftype: ftype.name for ftype in FileType}
_KIND_NAMES = {kind: kind.name for kind in ChangeKind}


def _state_json(state: EntryState) -> dict[str, object]:
    ftype = state.file_type
    if ftype is FileType.NONE:
        return {"type": "NONE"}
    out: dict[str, object] = {
        "type": _TYPE_NAMES[ftype],
        "mode": state.mode,
        "uid": state.uid,
        "gid": state.gid,
    }
    if ftype is FileType.REGULAR:
        out["size"] = state.size
    if state.sha256:
        out["sha256"] = state.sha256
    if ftype is FileType.SYMLINK:
        out["target"] = _text(state.target)
    elif ftype is FileType.OTHER:
        out["fmt"] = state.fmt
        out["rdev"] = state.rdev
    if state.tree is not None:
        out["tree"] = {"sha256": state.tree.sha256, "entries": state.tree.entries}
    if state.offset is not None:
        out["offset"] = state.offset
    if state.ino:
        out["ino"] = state.ino
        out["mtime_ns"] = state.mtime_ns
        out["ctime_ns"] = state.ctime_ns
    if state.caps:
        out["caps"] = state.caps.hex()
    return out


def _manifest_json(manifest: Manifest) -> dict[str, object]:
    state_json, kind_names = _state_json, _KIND_NAMES
    return {
        "format": FORMAT,
        "version": manifest.version,
        "created_ns": manifest.created_ns,
        "content_bytes": manifest.content_bytes,
        "changes": [
            {
                "path": change.path.decode("utf-8", "surrogateescape"),
                "kind": kind_names[change.kind],
                "before": state_json(change.before),
                "after": state_json(change.after),
            }
            for change in manifest.changes
        ],
    }


# The canonical JSON written directly, without the intermediate dictionaries and the sorting
# of their keys: a fifth of the time of json.dumps for a changeset of thousands of new files.
# The same bytes as ``_dumps(_manifest_json(manifest))`` (tests/unit/sandbox/test_changeset.py
# compares them): keys in sorted order, numbers as ``int`` prints them (every number here is
# an ``int``), strings through the encoder json.dumps uses (``ensure_ascii``).
_TYPE_TEXTS = {ftype: f'"type":"{ftype.name}"' for ftype in FileType}
_KIND_TEXTS = {kind: f'"kind":"{kind.name}"' for kind in ChangeKind}


def _state_text(state: EntryState) -> str:
    ftype = state.file_type
    if ftype is FileType.NONE:
        return '{"type":"NONE"}'
    sha256, offset = state.sha256, state.offset
    if (
        ftype is FileType.REGULAR
        and offset is not None
        and sha256
        and not state.ino
        and not state.caps
        and state.tree is None
    ):  # new content, the after state of most changes
        return (
            f'{{"gid":{state.gid},"mode":{state.mode},"offset":{offset},'
            f'"sha256":{_json_str(sha256)},"size":{state.size},"type":"REGULAR",'
            f'"uid":{state.uid}}}'
        )
    ino, other = state.ino, ftype is FileType.OTHER
    out = []
    if state.caps:
        out.append(f'"caps":{_json_str(state.caps.hex())}')
    if ino:
        out.append(f'"ctime_ns":{state.ctime_ns}')
    if other:
        out.append(f'"fmt":{state.fmt}')
    out.append(f'"gid":{state.gid}')
    if ino:
        out.append(f'"ino":{ino}')
    out.append(f'"mode":{state.mode}')
    if ino:
        out.append(f'"mtime_ns":{state.mtime_ns}')
    if offset is not None:
        out.append(f'"offset":{offset}')
    if other:
        out.append(f'"rdev":{state.rdev}')
    if sha256:
        out.append(f'"sha256":{_json_str(sha256)}')
    if ftype is FileType.REGULAR:
        out.append(f'"size":{state.size}')
    if ftype is FileType.SYMLINK:
        out.append(f'"target":{_json_str(_text(state.target))}')
    tree = state.tree
    if tree is not None:
        out.append(f'"tree":{{"entries":{tree.entries},"sha256":{_json_str(tree.sha256)}}}')
    out.append(_TYPE_TEXTS[ftype])
    out.append(f'"uid":{state.uid}')
    return "{" + ",".join(out) + "}"


def _manifest_text(manifest: Manifest) -> bytes:
    """The canonical JSON of ``manifest``: ``_dumps(_manifest_json(manifest))``, faster."""
    state, kinds = _state_text, _KIND_TEXTS
    body = ",".join(
        [
            f'{{"after":{state(c.after)},"before":{state(c.before)},{kinds[c.kind]},'
            f'"path":{_json_str(c.path.decode("utf-8", "surrogateescape"))}}}'
            for c in manifest.changes
        ]
    )
    # The other keys sort after "changes": json.dumps writes them.
    rest = _dumps(
        {
            "format": FORMAT,
            "version": manifest.version,
            "created_ns": manifest.created_ns,
            "content_bytes": manifest.content_bytes,
        }
    )
    return b'{"changes":[' + body.encode("ascii") + b"]," + rest[1:]


def _bad(what: str) -> InvalidRequest:
    return InvalidRequest(f"the changeset is not valid: {what}", reason="CHANGESET_INVALID")


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is not int or value < 0:
        raise _bad(f"{key} must be a non-negative integer")
    return value


def _str(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string")
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object")
    return value


def _state_from(obj: object) -> EntryState:
    data = _dict(obj, "a state")
    try:
        ftype = FileType[_str(data, "type")]
    except KeyError:
        raise _bad("unknown file type") from None
    if ftype is FileType.NONE:
        return _ABSENT
    tree = None
    if "tree" in data:
        tree_data = _dict(data["tree"], "tree")
        tree = Tree(_str(tree_data, "sha256"), _int(tree_data, "entries"))
    offset = _int(data, "offset") if "offset" in data else None
    try:
        target = _raw(_str(data, "target", ""))
    except UnicodeEncodeError:
        raise _bad("a link target is not encoded as the format says") from None
    try:
        caps = bytes.fromhex(_str(data, "caps", ""))
    except ValueError:
        raise _bad("file capabilities are not hex") from None
    return EntryState(
        file_type=ftype,
        mode=_int(data, "mode"),
        uid=_int(data, "uid"),
        gid=_int(data, "gid"),
        size=_int(data, "size", 0),
        sha256=_str(data, "sha256", ""),
        target=target,
        fmt=_int(data, "fmt", 0),
        rdev=_int(data, "rdev", 0),
        tree=tree,
        offset=offset,
        ino=_int(data, "ino", 0),
        mtime_ns=_int(data, "mtime_ns", 0),
        ctime_ns=_int(data, "ctime_ns", 0),
        caps=caps,
    )


def _manifest_from(raw: bytes) -> Manifest:
    try:
        data = _dict(json.loads(raw), "the manifest")
    except (ValueError, RecursionError):
        raise _bad("the manifest is not JSON") from None
    if data.get("format") != FORMAT:
        raise _bad("not an Airlock changeset manifest")
    if data.get("version") != VERSION:
        raise _bad(f"unsupported manifest version {data.get('version')!r}")
    changes = data.get("changes")
    if not isinstance(changes, list):
        raise _bad("changes must be a list")
    records = []
    for item in changes:
        entry = _dict(item, "a change")
        try:
            kind = ChangeKind[_str(entry, "kind")]
            path = _raw(_str(entry, "path"))
        except KeyError:
            raise _bad("unknown change kind") from None
        except UnicodeEncodeError:
            raise _bad("a path is not encoded as the format says") from None
        records.append(
            ChangeRecord(
                path, kind, _state_from(entry.get("before")), _state_from(entry.get("after"))
            )
        )
    manifest = Manifest(
        changes=tuple(records),
        content_bytes=_int(data, "content_bytes"),
        created_ns=_int(data, "created_ns"),
    )
    if manifest.to_json() != raw:
        # Also catches unknown keys, and keys a state of its type does not have.
        raise _bad("the manifest is not in canonical form")
    _check(manifest)
    return manifest


def _check(manifest: Manifest) -> None:
    """The rules every manifest obeys; :func:`airlock.apply.apply` relies on them."""
    seen: dict[tuple[bytes, ...], ChangeRecord] = {}
    previous: tuple[bytes, ...] = ()
    last_parent: tuple[bytes, ...] | None = None
    last_ancestor: ChangeRecord | None = None
    fullmatch = _SHA256.fullmatch
    none, regular, directory, other = (
        FileType.NONE,
        FileType.REGULAR,
        FileType.DIRECTORY,
        FileType.OTHER,
    )
    created, modified, deleted, metadata_changed = (
        ChangeKind.CREATED,
        ChangeKind.MODIFIED,
        ChangeKind.DELETED,
        ChangeKind.METADATA_CHANGED,
    )
    for change in manifest.changes:
        path = change.path
        parts = path.split(b"/")
        comps = tuple(parts[1:])
        # Absolute, no NUL, at least one component, and none of them empty, "." or "..".
        if (
            parts[0]
            or path.find(b"\0") != -1  # (faster than "in": no TypeError made and cleared)
            or not comps
            or b"" in comps
            or b"." in comps
            or b".." in comps
        ):
            raise _bad(f"the path {path!r} is not a normalized absolute path")
        if comps <= previous:
            raise _bad("changes are not sorted by path, or a path repeats")
        previous = comps
        before, after, kind = change.before, change.after, change.kind
        btype, atype = before.file_type, after.file_type
        if kind is created:
            ok = btype is none and atype is not none
        elif kind is deleted:
            ok = btype is not none and atype is none
        elif kind is metadata_changed:
            ok = btype is not none and atype is btype
        else:  # MODIFIED: new content, target or device, or another type
            same_dir = btype is atype is directory
            ok = btype is not none and atype is not none and not same_dir
        if not ok:
            raise _bad(f"{kind.name} does not fit the states of {path!r}")
        for state in (before, after):
            if state is _ABSENT:
                continue  # nothing set
            if state.mode > 0o7777 or state.uid >= 1 << 32 or state.gid >= 1 << 32:
                raise _bad(f"a mode or owner of {path!r} is out of range")
            if state.sha256 and not fullmatch(state.sha256):
                raise _bad(f"a hash of {path!r} is malformed")
            if state.tree is not None and not fullmatch(state.tree.sha256):
                raise _bad(f"the tree digest of {path!r} is malformed")
        replaces = kind is modified or kind is deleted
        if replaces and btype is regular and not before.sha256:
            raise _bad(f"the replaced content of {path!r} has no hash")
        needs_tree = replaces and atype is not directory
        if needs_tree and btype is directory and before.tree is None:
            raise _bad(f"the removed directory {path!r} has no tree digest")
        offset = after.offset
        writes = atype is regular and kind is not metadata_changed
        if writes != (offset is not None):
            raise _bad(f"the content of {path!r} is missing or not expected")
        if offset is not None:
            if not after.sha256:  # (a hash that is there was checked above)
                raise _bad(f"the new content of {path!r} has no hash")
            if offset + after.size > manifest.content_bytes:
                raise _bad(f"the new content of {path!r} lies outside the content file")
        if atype is other and after.fmt not in APPLICABLE_OTHER:
            raise _bad(f"{path!r} would be a device node")
        if before.caps or (after.caps and offset is None):
            raise _bad(f"file capabilities of {path!r} are recorded where none are written")
        # The nearest listed ancestor must be a directory afterwards; below a directory the
        # changeset creates, nothing can exist before. A change in the same directory as the
        # one before it has the same nearest listed ancestor (that one is not an ancestor).
        parent_comps = comps[:-1]
        if parent_comps == last_parent:
            parent = last_ancestor
        else:
            parent = None
            for depth in range(len(comps) - 1, 0, -1):
                parent = seen.get(comps[:depth])
                if parent is not None:
                    break
            last_parent, last_ancestor = parent_comps, parent
        if parent is not None:
            if parent.after.file_type is not directory:
                raise _bad(f"{path!r} lies below a path that is not a directory afterwards")
            if parent.before.file_type is not directory and btype is not none:
                raise _bad(f"{path!r} lies below a new directory but existed before")
        seen[comps] = change


def read_manifest(dir_fd: int) -> Manifest:
    """Read and check the manifest of the changeset directory open as ``dir_fd``.

    Raises :class:`airlock.InvalidRequest` (``CHANGESET_INVALID``) if it is
    malformed, not canonical, or breaks a rule Apply relies on.
    """
    try:
        fd = os.open(MANIFEST_NAME, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _bad(f"cannot open its manifest: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_MANIFEST:
            raise _bad("the manifest is too large")
        raw = _read_exact(fd, size + 1)
    finally:
        os.close(fd)
    return _manifest_from(raw)


def load(dest: str) -> Manifest:
    """Read and check the manifest of the changeset saved in ``dest``."""
    try:
        dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _bad(f"cannot open {dest!r}: {exc.strerror}") from None
    try:
        return read_manifest(dir_fd)
    finally:
        os.close(dir_fd)


# --- Walking without following links ----------------------------------------------------------


class DirCursor:
    """Opens directories by path components below a root, never following a symbolic link.

    Keeps the chain of the last path open, so walking paths in component order opens
    each directory once. A directory the caller may search but not read is opened
    ``O_PATH`` (usable as a ``dir_fd``, not for listing or fsync). After a failed
    :meth:`open`, :attr:`reached` is how many components could be opened.
    """

    def __init__(self, root_fd: int) -> None:
        self._fds = [root_fd]  # owned
        self._names: list[bytes] = []
        self.reached = 0

    def open(self, comps: Sequence[bytes]) -> int:
        names, fds = self._names, self._fds
        common = 0
        limit = min(len(names), len(comps))
        while common < limit and names[common] == comps[common]:
            common += 1
        while len(names) > common:
            names.pop()
            os.close(fds.pop())
        self.reached = common
        for name in comps[common:]:
            fd = open_dir(name, fds[-1])
            names.append(name)
            fds.append(fd)
            self.reached = len(names)
            self.opened(tuple(names), fd)
        return fds[-1]

    def opened(self, comps: tuple[bytes, ...], fd: int) -> None:
        """Called for every directory newly opened; subclasses check identities here."""

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._names = []


def open_dir(name: bytes, dir_fd: int) -> int:
    """Open a directory entry that must be a directory and not a link (else ENOTDIR/ELOOP)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, _PATH_DIR_FLAGS, dir_fd=dir_fd)


def lstat_at(name: bytes, dir_fd: int) -> os.stat_result | None:
    """``lstat`` relative to a directory; None if the entry does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
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


def hash_file(name: bytes, dir_fd: int, expect: os.stat_result) -> str | None:
    """SHA-256 of a regular file's content; None if it is no longer the inode ``expect``."""
    return _hash_fd(os.open(name, _FILE_FLAGS, dir_fd=dir_fd), expect)


def _hash_fd(fd: int, expect: os.stat_result) -> str | None:
    """:func:`hash_file` of the file open as ``fd``, which is closed here."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (
            expect.st_dev,
            expect.st_ino,
        ):
            return None
        digest = _digest.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TreeScan:
    """A subtree's digest and what stood in the way of deleting it.

    ``problems`` holds (relative path, what) pairs: ``"mount"`` (another file system
    below), ``"deep"`` (deeper than :data:`MAX_DEPTH`), ``"limit"`` (more entries
    than allowed; the digest is then partial), ``"unreadable"``, and with
    ``check_removable`` also ``"not writable"`` and ``"sticky"``.
    """

    tree: Tree
    problems: tuple[tuple[bytes, str], ...]


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _entry_line(rel: bytes, st: os.stat_result, target: bytes) -> bytes:
    mode = st.st_mode
    fields = [f"{stat.S_IFMT(mode):o}:{stat.S_IMODE(mode):o}:{st.st_uid}:{st.st_gid}:{st.st_ino}"]
    if not stat.S_ISDIR(mode):
        fields.append(f":{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_rdev}")
    return _field(rel) + _field("".join(fields).encode()) + _field(target)


def tree_digest(
    dir_fd: int,
    name: bytes,
    *,
    max_entries: int = MAX_TREE_ENTRIES,
    check_removable: bool = False,
) -> TreeScan:
    """Digest the subtree of the directory ``name`` (relative to ``dir_fd``), without links.

    Every entry (the directory itself included) contributes its relative path, type,
    permission bits, owner and inode number, and for a non-directory also its size,
    mtime, ctime, device number and link target: any change in the subtree, even a
    same-size rewrite, changes the digest. Entries are visited in byte order of their
    names, depth first. Other file systems are not entered. With ``check_removable``,
    each directory is also checked for what deleting its entries takes (write and
    search permission, the sticky bit) for the calling process.
    """
    digest = _digest.sha256()
    problems: list[tuple[bytes, str]] = []
    euid = os.geteuid()
    try:
        root = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        return TreeScan(Tree(digest.hexdigest(), 0), ((b"", "unreadable"),))
    count = 0
    stack: list[tuple[int, bytes, list[tuple[bytes, os.stat_result]]]] = []
    try:
        root_st = os.fstat(root)
        dev = root_st.st_dev
        digest.update(_entry_line(b"", root_st, b""))
        pending: tuple[int, bytes, os.stat_result] | None = (root, b"", root_st)
        while True:
            if pending is not None:
                fd, rel, dir_st = pending
                pending = None
                entries: list[tuple[bytes, os.stat_result]] = []
                try:
                    with os.scandir(fd) as it:
                        for entry in it:
                            entries.append(
                                (os.fsencode(entry.name), entry.stat(follow_symlinks=False))
                            )
                except PermissionError:
                    problems.append((rel, "unreadable"))
                entries.sort(key=lambda item: item[0], reverse=True)  # popped from the end
                if check_removable:
                    _check_removable(fd, rel, dir_st, entries, euid, problems)
                stack.append((fd, rel, entries))
            if not stack:
                break
            fd, rel, entries = stack[-1]
            if not entries:
                os.close(fd)
                stack.pop()
                continue
            if count >= max_entries:
                problems.append((rel, "limit"))
                break
            child, st = entries.pop()
            count += 1
            child_rel = rel + b"/" + child if rel else child
            target = b""
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(child, dir_fd=fd)
            digest.update(_entry_line(child_rel, st, target))
            if not stat.S_ISDIR(st.st_mode):
                continue
            if st.st_dev != dev:
                problems.append((child_rel, "mount"))
            elif len(stack) >= MAX_DEPTH:
                problems.append((child_rel, "deep"))
            else:
                try:
                    pending = (os.open(child, _DIR_FLAGS, dir_fd=fd), child_rel, st)
                except PermissionError:
                    problems.append((child_rel, "unreadable"))
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return TreeScan(Tree(digest.hexdigest(), count), tuple(problems))


def _check_removable(
    fd: int,
    rel: bytes,
    dir_st: os.stat_result,
    entries: list[tuple[bytes, os.stat_result]],
    euid: int,
    problems: list[tuple[bytes, str]],
) -> None:
    if not os.access(b".", os.W_OK | os.X_OK, dir_fd=fd):
        problems.append((rel, "not writable"))
    elif dir_st.st_mode & stat.S_ISVTX and euid not in (0, dir_st.st_uid):
        for child, st in entries:
            if st.st_uid != euid:
                problems.append((rel + b"/" + child if rel else child, "sticky"))


# --- Saving -------------------------------------------------------------------------------------


def save(
    layers: Sequence[Layer],
    diff: DiffResult,
    dest: str,
    *,
    quota_bytes: int,
    max_tree_entries: int = MAX_TREE_ENTRIES,
    caller: Caller | None = None,
) -> Manifest:
    """Save what Apply needs to write ``diff``'s changes to the host into ``dest``.

    ``dest`` must not exist; its parent must. Content is read with ``caller``'s rights
    (None: as root). See the module docstring for what is saved and refused. Raises
    :class:`airlock.InvalidRequest`, :class:`airlock.ResourceExhausted`,
    :class:`airlock.Conflict` or :class:`airlock.SandboxError`; ``dest`` is then gone.
    """
    if diff.truncated:
        raise InvalidRequest(
            "the dry run's change list is incomplete: it cannot be kept for Apply",
            reason="CHANGES_TRUNCATED",
        )
    unreadable = [change.path for change in diff.changes if change.unreadable]
    if unreadable:
        raise _unreadable(unreadable)
    try:
        os.mkdir(dest, 0o700)
    except OSError as exc:
        raise SandboxError(
            f"cannot create the changeset directory {dest!r}: {exc.strerror}",
            reason="CHANGESET_FAILED",
        ) from exc
    saver: _Saver | None = None
    # Thousands of new objects (states, records, the manifest's JSON) and no reference
    # cycles: in the supervisor's large heap the cyclic collector would only slow this down.
    with _gcpause.paused():
        try:
            os.chmod(dest, 0o700)  # whatever the umask
            saver = _Saver(layers, quota_bytes, max_tree_entries, CallerFiles(caller))
            return saver.save(diff.changes, dest, diff.contents)
        except AirlockError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"no space left to keep the changes: {exc}", reason="CHANGESET_QUOTA"
                ) from exc
            raise SandboxError(
                f"cannot save the changes: {exc}", reason="CHANGESET_FAILED"
            ) from exc
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            if saver is not None:
                saver.close()


def _unreadable(paths: Sequence[bytes]) -> InvalidRequest:
    shown = ", ".join(path.decode(errors="backslashreplace") for path in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return InvalidRequest(
        f"the caller may not read the content of {shown}{more}: changes that hold content the "
        "caller could not read are not kept for Apply",
        reason="CHANGES_UNREADABLE",
    )


class _LayerFds:
    """One overlay's upper and lower, open, with a cursor on each (which owns its root)."""

    def __init__(self, layer: Layer) -> None:
        host = layer.host_path.rstrip(b"/")
        self.prefix = host + b"/"
        self.host = host or b"/"
        self.upper_root = os.open(layer.upper, _DIR_FLAGS & ~os.O_NOFOLLOW)
        self.upper = DirCursor(self.upper_root)
        try:
            self.lower_root = os.open(layer.lower, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except BaseException:
            self.upper.close()
            raise
        self.lower = DirCursor(self.lower_root)

    def close(self) -> None:
        self.upper.close()
        self.lower.close()


class _Saver:
    def __init__(
        self,
        layers: Sequence[Layer],
        quota_bytes: int,
        max_tree_entries: int,
        files: CallerFiles,
    ) -> None:
        self.layers: list[_LayerFds] = []
        self.quota = quota_bytes
        self.tree_budget = max_tree_entries
        self.files = files
        self.content_fd = -1
        self.content_bytes = 0
        self.copy_range = True
        self.conflicts: list[tuple[bytes, str]] = []
        # Changes whose content (new, or old to verify) the caller may not read.
        self.unreadable: list[bytes] = []
        # As the caller, new content is opened ahead, a batch at a time (one switch of the
        # file-system uid for all): the changes that write content, in order; how many of
        # them were opened; those opened and not yet copied (a descriptor or why not).
        self.writing: list[bytes] = []
        self.opened_to = 0
        self.ahead: dict[bytes, int | OSError] = {}
        # How many changes each directory holds (by host path); the names of the lower
        # directories listed instead of an lstat per change (see _lower_lstat); the lower
        # directories found missing (below a directory the command created).
        self.per_dir: dict[bytes, int] = {}
        # New content the diff read (DiffResult.contents), and what of it waits to be written
        # to the content file (in order: written before anything is copied after it).
        self.contents: Mapping[bytes, bytes] = {}
        self.from_diff: dict[bytes, bytes] = {}
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.lower_names: dict[bytes, frozenset[bytes] | None] = {}
        self.no_lower: set[tuple[int, tuple[bytes, ...]]] = set()
        # The directory of the last change recorded (its host path) and what _record found
        # for it: its layer, its components below the layer's root, its lower (open, or
        # None). Changes come in component order, so the next ones in the same directory
        # find the same, and the lower cursor still holds that directory open.
        self.last_dir: bytes | None = None
        self.last_found: tuple[_LayerFds, tuple[bytes, ...], int | None] | None = None
        try:
            # Longest host path first: a path belongs to the innermost mount that holds it.
            for layer in sorted(layers, key=lambda lay: len(lay.host_path), reverse=True):
                self.layers.append(_LayerFds(layer))
            self.roots = frozenset(layer.host for layer in self.layers)
        except OSError as exc:
            self.close()
            raise SandboxError(
                f"cannot open an overlay layer: {exc}", reason="CHANGESET_FAILED"
            ) from exc

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self.layers = []
        if self.content_fd >= 0:
            os.close(self.content_fd)
            self.content_fd = -1

    def _layer(self, path: bytes) -> tuple[_LayerFds, tuple[bytes, ...]]:
        for layer in self.layers:
            if path.startswith(layer.prefix) or path == layer.host:
                return layer, components(path[len(layer.host) :])
        raise SandboxError(f"{path!r} lies in no overlay", reason="CHANGESET_FAILED")

    def save(
        self,
        changes: Sequence[FileChange],
        dest: str,
        contents: Mapping[bytes, bytes] | None = None,
    ) -> Manifest:
        created_ns = time.time_ns()
        self.contents = contents or {}
        dir_fd = os.open(dest, _DIR_FLAGS)
        try:
            self.content_fd = os.open(
                CONTENT_NAME,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            # The content file was created above and the manifest is below, outside the
            # caller's file-system gid and groups.
            ordered = sorted(changes, key=lambda c: components(c.path))
            per_dir = self.per_dir
            for c in ordered:
                parent = c.path.rpartition(b"/")[0]
                per_dir[parent] = per_dir.get(parent, 0) + 1
            for c in ordered:
                if c.file_type is FileType.REGULAR and c.kind in _WRITES:
                    data = self._read_content(c) if self.contents else None
                    if data is None:
                        self.writing.append(c.path)
                    else:
                        self.from_diff[c.path] = data
            with self.files:
                try:
                    records = [self._record(change) for change in ordered]
                finally:
                    self._drop_ahead()
            self._flush()
            if self.unreadable:
                raise _unreadable(self.unreadable)
            if self.conflicts:
                raise Conflict(
                    "the host changed during the dry run: "
                    + "; ".join(f"{p.decode(errors='replace')} {why}" for p, why in self.conflicts),
                    paths=tuple(p for p, _ in self.conflicts),
                )
            manifest = Manifest(tuple(records), self.content_bytes, created_ns)
            _check(manifest)  # what Apply will insist on
            raw = manifest.to_json()
            self._charge(len(raw))
            fd = os.open(
                MANIFEST_NAME,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            return manifest
        finally:
            os.close(dir_fd)

    def _charge(self, size: int) -> None:
        self.quota -= size
        if self.quota < 0:
            raise ResourceExhausted(
                "the changes are larger than the space allowed for keeping them",
                reason="CHANGESET_QUOTA",
            )

    def _record(self, change: FileChange) -> ChangeRecord:
        path = change.path
        if path == b"/":
            raise InvalidRequest(
                "a change to / itself cannot be applied", reason="CHANGESET_UNSUPPORTED"
            )
        head, _, name = path.rpartition(b"/")
        found = self.last_found
        if head == self.last_dir and name and found is not None and path not in self.roots:
            # The same directory as the change before, and not a layer's root (which lies
            # in its own layer): what the general path below finds for it.
            layer, parent, lower_fd = found
            comps = (*parent, name)
        else:
            layer, comps = self._layer(path)
            if not comps:
                self.last_dir = None
                return self._root(change, layer)
            parent, name = comps[:-1], comps[-1]
            key = (id(layer), parent)
            lower_fd = None
            if key not in self.no_lower:
                try:
                    lower_fd = layer.lower.open(parent)
                except (FileNotFoundError, NotADirectoryError):
                    self.no_lower.add(key)  # below a directory the command created
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    self.no_lower.add(key)
            self.last_dir, self.last_found = head, (layer, parent, lower_fd)
        rel = b"/".join(comps)
        before = self._before(change, lower_fd, name, layer, rel)
        data = self.from_diff.get(path)
        if data is not None:
            after = self._after_read(change, data)
        else:
            after = self._after(change, layer.upper.open(parent), name, layer, rel)
        return ChangeRecord(path, change.kind, before, after)

    def _open_content(self, dir_fd: int, name: bytes, root_fd: int, host: bytes, rel: bytes) -> int:
        """Open a file whose content is kept or hashed, as the caller would; raises OSError.

        ``dir_fd``/``name`` is the entry as the cursor reached it (opened as is for a
        root caller); ``root_fd``/``rel`` the same entry from the layer's root (``host``),
        resolved with the caller's rights.
        """
        if not self.files.active:
            return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        if not self.files.reachable(host):
            raise PermissionError(errno.EACCES, "the caller cannot reach this layer")
        return self.files.open(root_fd, rel)

    def _root(self, change: FileChange, layer: _LayerFds) -> ChangeRecord:
        """A layer's root (a mount point): the diff reports only its mode or owner changing."""
        if change.kind is not ChangeKind.METADATA_CHANGED:
            raise SandboxError(f"unexpected change to {change.path!r}", reason="CHANGESET_FAILED")
        lower, upper = os.fstat(layer.lower.open(())), os.fstat(layer.upper.open(()))
        before = EntryState(
            FileType.DIRECTORY,
            mode=stat.S_IMODE(lower.st_mode),
            uid=lower.st_uid,
            gid=lower.st_gid,
            ino=lower.st_ino,
            mtime_ns=lower.st_mtime_ns,
            ctime_ns=lower.st_ctime_ns,
        )
        if change.mode_before is not None and before.mode != change.mode_before:
            self._mismatch(change.path, "had its mode changed")
        after = EntryState(
            FileType.DIRECTORY,
            mode=stat.S_IMODE(upper.st_mode),
            uid=upper.st_uid,
            gid=upper.st_gid,
        )
        return ChangeRecord(change.path, change.kind, before, after)

    def _mismatch(self, path: bytes, why: str) -> EntryState:
        self.conflicts.append((path, why))
        return _ABSENT

    def _before(
        self, change: FileChange, dir_fd: int | None, name: bytes, layer: _LayerFds, rel: bytes
    ) -> EntryState:
        st = self._lower_lstat(change.path, dir_fd, name) if dir_fd is not None else None
        path, kind = change.path, change.kind
        ftype = file_type(st.st_mode) if st is not None else FileType.NONE
        if ftype is not change.previous_file_type:
            return self._mismatch(path, f"was a {ftype.name.lower()}")
        if st is None or dir_fd is None:
            return _ABSENT
        mode = stat.S_IMODE(st.st_mode)
        if change.mode_before is not None and mode != change.mode_before:
            return self._mismatch(path, "had its mode changed")
        sized = ftype is not FileType.DIRECTORY and change.size_before is not None
        if sized and st.st_size != change.size_before:
            return self._mismatch(path, "changed size")
        replaced = kind in (ChangeKind.MODIFIED, ChangeKind.DELETED)
        sha256 = ""
        if ftype is FileType.REGULAR and replaced:
            try:
                fd = self._open_content(dir_fd, name, layer.lower_root, layer.host, rel)
            except OSError:
                if not self.files.active:
                    raise
                self.unreadable.append(path)
                return _ABSENT
            sha256 = _hash_fd(fd, st) or ""
            if not sha256:
                return self._mismatch(path, "was replaced")
        target = os.readlink(name, dir_fd=dir_fd) if ftype is FileType.SYMLINK else b""
        tree = None
        removed = kind is ChangeKind.DELETED or change.file_type is not FileType.DIRECTORY
        if ftype is FileType.DIRECTORY and replaced and removed:
            tree = self._tree(path, dir_fd, name)
        return EntryState(
            file_type=ftype,
            mode=mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if ftype is FileType.REGULAR else 0,
            sha256=sha256,
            target=target,
            fmt=stat.S_IFMT(st.st_mode) if ftype is FileType.OTHER else 0,
            rdev=st.st_rdev if ftype is FileType.OTHER else 0,
            tree=tree,
            ino=st.st_ino,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def _lower_lstat(self, path: bytes, dir_fd: int, name: bytes) -> os.stat_result | None:
        """:func:`lstat_at` of a lower entry; a name missing from its directory's listing is
        absent without an lstat. A directory is listed, once, when it holds enough of the
        changes (most of them new names, each a failed lstat) and is not much larger."""
        parent_path = path.rpartition(b"/")[0]
        count = self.per_dir.get(parent_path, 0)
        if count < _LIST_LOWER_MIN:
            return lstat_at(name, dir_fd)
        if parent_path in self.lower_names:
            names = self.lower_names[parent_path]
        else:
            names = None
            with contextlib.suppress(OSError):
                if os.fstat(dir_fd).st_size <= count * _LIST_LOWER_BYTES:
                    names = frozenset(map(os.fsencode, os.listdir(dir_fd)))
            self.lower_names[parent_path] = names
        if names is not None and name not in names:
            return None
        return lstat_at(name, dir_fd)

    def _tree(self, path: bytes, dir_fd: int, name: bytes) -> Tree:
        scan = tree_digest(dir_fd, name, max_entries=self.tree_budget)
        self.tree_budget -= scan.tree.entries
        for rel, what in scan.problems:
            where = path + b"/" + rel if rel else path
            if what == "limit":
                raise ResourceExhausted(
                    f"the deleted directory {path!r} holds too many entries to verify later",
                    reason="CHANGESET_TREE_LIMIT",
                )
            raise InvalidRequest(
                f"the deleted directory {path!r} cannot be verified: {where!r} is {what}",
                reason="CHANGESET_UNSUPPORTED",
            )
        return scan.tree

    def _read_content(self, change: FileChange) -> bytes | None:
        """The new content of ``change`` as the diff read it, when that is all Apply needs.

        Only for a new regular file without file capabilities that the diff read whole
        (with the caller's rights, after the command had ended: the upper layer no longer
        changes), and whose change has every field the after state takes.
        """
        data = self.contents.get(change.path)
        if (
            data is None
            or change.kind is not ChangeKind.CREATED
            or change.file_type is not FileType.REGULAR
            or change.capabilities
            or len(data) != change.size_after
            or change.mode_after is None
            or change.uid_after is None
            or change.gid_after is None
            or not _SHA256.fullmatch(change.sha256_after)
        ):
            return None
        return data

    def _after_read(self, change: FileChange, data: bytes) -> EntryState:
        """:meth:`_after` of a new file whose content the diff read (:meth:`_read_content`):
        the same state, without a second lstat, open and copy of the file."""
        offset = self.content_bytes
        self._charge(len(data))
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= _CHUNK:
            self._flush()
        self.content_bytes += len(data)
        # Positional (file_type, mode, uid, gid, size, sha256, target, fmt, rdev, tree,
        # offset): a quarter faster than by keyword, for every new file.
        return EntryState(
            FileType.REGULAR,
            change.mode_after or 0,
            change.uid_after or 0,
            change.gid_after or 0,
            len(data),
            change.sha256_after,
            b"",
            0,
            0,
            None,
            offset,
        )

    def _after(
        self, change: FileChange, dir_fd: int, name: bytes, layer: _LayerFds, rel: bytes
    ) -> EntryState:
        if change.kind is ChangeKind.DELETED:
            return _ABSENT
        path = change.path
        st = lstat_at(name, dir_fd)
        if st is None or file_type(st.st_mode) is not change.file_type:
            raise SandboxError(f"the upper layer lost {path!r}", reason="CHANGESET_FAILED")
        mode = stat.S_IMODE(st.st_mode)
        if change.mode_after is not None and mode != change.mode_after:
            raise SandboxError(f"the upper layer changed {path!r}", reason="CHANGESET_FAILED")
        ftype = change.file_type
        if ftype is FileType.SYMLINK:
            target = os.readlink(name, dir_fd=dir_fd)
            return EntryState(ftype, mode=mode, uid=st.st_uid, gid=st.st_gid, target=target)
        if ftype is FileType.OTHER:
            fmt = stat.S_IFMT(st.st_mode)
            if fmt not in APPLICABLE_OTHER:
                raise InvalidRequest(
                    f"{path!r} would be a device node, which Apply cannot create",
                    reason="CHANGESET_UNSUPPORTED",
                )
            return EntryState(ftype, mode=mode, uid=st.st_uid, gid=st.st_gid, fmt=fmt)
        if ftype is not FileType.REGULAR:
            return EntryState(ftype, mode=mode, uid=st.st_uid, gid=st.st_gid)
        if change.kind is ChangeKind.METADATA_CHANGED:
            return EntryState(ftype, mode=mode, uid=st.st_uid, gid=st.st_gid, size=st.st_size)
        sha256 = change.sha256_after
        if not _SHA256.fullmatch(sha256) or st.st_size != change.size_after:
            raise SandboxError(
                f"the new content of {path!r} could not be read", reason="CHANGESET_FAILED"
            )
        try:
            src = self._open_new(dir_fd, name, layer, rel, path)
        except OSError:
            if not self.files.active:
                raise
            self.unreadable.append(path)
            return EntryState(ftype, mode=mode, uid=st.st_uid, gid=st.st_gid)
        offset = self.content_bytes
        try:
            caps = _file_capabilities(src, path)
            self._charge(st.st_size)
            self._copy(src, st.st_size, path)
        finally:
            os.close(src)
        self.content_bytes += st.st_size
        return EntryState(
            ftype,
            mode=mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            sha256=sha256,
            offset=offset,
            caps=caps,
        )

    def _open_new(self, dir_fd: int, name: bytes, layer: _LayerFds, rel: bytes, path: bytes) -> int:
        """Open the new content of ``path`` for copying (:meth:`_open_content`), batched."""
        if not self.files.active:
            return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        result = self.ahead.pop(path, None)
        if result is None:
            self._open_ahead(path, layer)
            result = self.ahead.pop(path, None)
        if result is None:
            return self._open_content(dir_fd, name, layer.upper_root, layer.host, rel)
        if isinstance(result, OSError):
            raise result
        return result

    def _open_ahead(self, path: bytes, layer: _LayerFds) -> None:
        """Open, as the caller, the new content of ``path`` and the next ones in its layer."""
        start = self.opened_to
        while start < len(self.writing) and self.writing[start] != path:
            start += 1
        if start == len(self.writing):
            return
        batch = [path]
        end = start + 1
        while end < len(self.writing) and len(batch) < _OPEN_AHEAD:
            following = self.writing[end]
            if self._layer(following)[0] is not layer:
                break
            batch.append(following)
            end += 1
        self.opened_to = end
        self._drop_ahead()
        if self.files.reachable(layer.host):
            rels = [b"/".join(self._layer(p)[1]) for p in batch]
            opened = self.files.open_each(layer.upper_root, rels)
        else:
            opened = [PermissionError(errno.EACCES, "the caller cannot reach this layer")]
            opened *= len(batch)
        self.ahead = dict(zip(batch, opened, strict=True))

    def _drop_ahead(self) -> None:
        for result in self.ahead.values():
            if not isinstance(result, OSError):
                os.close(result)
        self.ahead = {}

    def _flush(self) -> None:
        """Write the content that waits (see :meth:`_after`) to the content file."""
        if not self.pending:
            return
        view = memoryview(b"".join(self.pending))
        self.pending, self.pending_bytes = [], 0
        while view:
            view = view[os.write(self.content_fd, view) :]

    def _copy(self, src: int, size: int, path: bytes) -> None:
        """Append ``size`` bytes of the upper file ``src`` to the content file, in the kernel."""
        self._flush()  # what comes before it in the file
        left = size
        while left > 0:
            if self.copy_range:
                try:
                    done = os.copy_file_range(src, self.content_fd, left)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    self.copy_range = False  # across file systems: sendfile instead
                    continue
            else:
                done = os.sendfile(self.content_fd, src, None, left)
            if done <= 0:
                raise SandboxError(f"the new content of {path!r} shrank", reason="CHANGESET_FAILED")
            left -= done


_WRITES = (ChangeKind.CREATED, ChangeKind.MODIFIED)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def _file_capabilities(fd: int, path: bytes) -> bytes:
    """The raw ``security.capability`` of the open upper file ``fd``; b"" if it has none."""
    try:
        # Listing first: nearly free when there is none (a failed getxattr raises, which
        # costs more than the listing).
        if CAPABILITY_XATTR not in os.listxattr(fd):
            return b""
        return os.getxattr(fd, CAPABILITY_XATTR)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return b""
        raise SandboxError(
            f"cannot read the file capabilities of {path!r}: {exc.strerror}",
            reason="CHANGESET_FAILED",
        ) from exc


# How many new files are opened together as the caller.
_OPEN_AHEAD = 64
# List a lower directory instead of an lstat per change from this many changes in it on,
# unless it is larger than this many bytes per change (as in the diff).
_LIST_LOWER_MIN = 64
_LIST_LOWER_BYTES = 256
