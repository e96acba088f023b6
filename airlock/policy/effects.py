"""Effect rules: policy rules judged over what a dry run did.

A static rule (:mod:`airlock.policy.rules`) looks at the command line before
anything runs; an *effect rule* looks at :class:`airlock.types.Effects`, what the
dry run actually did: the files it changed, the processes it started, the
network attempts it made and the sensitive files it opened. The YAML shape is
documented in docs/policy-reference.md ("Effect rules"); the loader
(:mod:`airlock.policy.loader`) validates the YAML and calls
:class:`EffectCompiler` to turn an ``effect:`` mapping into an
:class:`EffectMatcher`.

Pure code: no I/O, no clock, no shared mutable state; a compiled rule may be
used by many threads at once. Judging is built to be cheap for large runs: the
changes are sorted once per call, and a path glob with a literal prefix (``/etc/``,
``~/.ssh/``) finds its candidates by binary search instead of testing every path.

Two glob dialects, on purpose:

* **path globs** (``files.paths``, ``sensitive_reads.paths``, the bundle's
  ``sensitive_paths``): the syntax of the dry run's file-open recorder
  (:mod:`airlock.sandbox.reads`), so that one pattern means the same thing to
  the recorder and to the rules: ``*`` and ``?`` stay within one path component,
  ``**`` spans components, a leading ``~`` is the caller's home, and a pattern
  starting with neither ``/`` nor ``~`` matches at any depth;
* **word globs** (``programs.argv0``, ``programs.args``, ``network.hosts``):
  fnmatch, as in static rules (``*`` matches anything).
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
import operator
import os
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import Any, NamedTuple

from airlock._globs import glob_regex
from airlock._special import Special, change_specials
from airlock.policy import worklost
from airlock.policy.rules import Compiler, Globs, JsonPath, Layer
from airlock.types import (
    ChangeKind,
    Effects,
    FileChange,
    FileType,
    Finding,
    FindingSource,
    LostKind,
    LostWork,
    NetProtocol,
    NetworkAttemptInfo,
    OtherType,
    ProcessInfo,
    SensitiveReadInfo,
    Severity,
    Termination,
    Verdict,
)

__all__ = [
    "KINDS",
    "LISTED",
    "LOST_WORK_CHECKED_TAG",
    "PROTOCOLS",
    "SCOPES",
    "SPECIALS",
    "TEMP_DIRS",
    "TEST_HOME",
    "TEST_TYPES",
    "TEST_WORKSPACE",
    "ChangeScope",
    "EffectCompiler",
    "EffectMatcher",
    "EffectRule",
    "EffectTest",
    "PathGlobs",
    "change_scope",
    "check_effect_test",
    "judge_effects",
    "judges_work_lost",
    "path_glob_problem",
    "synthetic_effects",
    "unfinished_findings",
]

LISTED = 3  # evidence items named in a finding's message; the rest are counted
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/user")
TEST_WORKSPACE = "/workspace"  # inline tests: relative paths are inside it
TEST_HOME = "/home/user"  # inline tests: ~ is this
TEST_UID = 1000  # inline tests: the uid the command runs as (a file's owner: caller)
TEST_OTHER_UID = 1001  # inline tests: a file's owner: other

_TEMP_PREFIXES = tuple(os.fsencode(d) + b"/" for d in TEMP_DIRS)
_ARGV_CHARS = 100  # a program's argv is cut to this many characters in a message

Report = Callable[[JsonPath, str, str, int | None], None]


class ChangeScope(enum.IntEnum):
    """Where a changed path is; every path has exactly one scope, tested in this order."""

    WORKSPACE = 1  # FileChange.in_workspace: the request's cwd and below
    HOME = 2  # below the caller's home (not for an empty home or "/")
    TEMP = 3  # below /tmp, /var/tmp, /dev/shm or /run/user (the directories themselves: SYSTEM)
    SYSTEM = 4  # everything else
    # A directory the policy's writable_paths grant (a package cache) or below; tested right
    # after WORKSPACE.
    GRANTED = 5


KINDS: Mapping[str, ChangeKind] = {
    "created": ChangeKind.CREATED,
    "modified": ChangeKind.MODIFIED,
    "deleted": ChangeKind.DELETED,
    "metadata": ChangeKind.METADATA_CHANGED,
}
SCOPES: Mapping[str, ChangeScope] = {s.name.lower(): s for s in ChangeScope}
SPECIALS: Mapping[str, Special] = {s.value: s for s in Special}
# The entry types an inline test's changed path may have: (file type, what an OTHER is).
TEST_TYPES: Mapping[str, tuple[FileType, OtherType]] = {
    "regular": (FileType.REGULAR, OtherType.NONE),
    "directory": (FileType.DIRECTORY, OtherType.NONE),
    "symlink": (FileType.SYMLINK, OtherType.NONE),
    "char_device": (FileType.OTHER, OtherType.CHAR_DEVICE),
    "block_device": (FileType.OTHER, OtherType.BLOCK_DEVICE),
    "fifo": (FileType.OTHER, OtherType.FIFO),
    "socket": (FileType.OTHER, OtherType.SOCKET),
}
PROTOCOLS: Mapping[str, NetProtocol] = {p.name.lower(): p for p in NetProtocol}
_KIND_TEXT = {
    ChangeKind.CREATED: "created",
    ChangeKind.MODIFIED: "modified",
    ChangeKind.DELETED: "deleted",
    ChangeKind.METADATA_CHANGED: "metadata changed",
}


def _home_scope_prefix(home: str) -> bytes | None:
    """The prefix of home-scope paths; None without a usable home.

    A home of "/" would put every path in the home scope and so hide system
    changes: it counts as no home (fail closed)."""
    stripped = home.rstrip("/")
    return os.fsencode(stripped) + b"/" if stripped else None


def change_scope(change: FileChange, home: str, granted: tuple[str, ...] = ()) -> ChangeScope:
    """The scope of one change, for a caller whose home directory is ``home`` and whose
    filesystem grants are ``granted`` (absolute paths)."""
    return _scope(change, _home_scope_prefix(home), _granted_prefixes(granted))


def _granted_prefixes(granted: tuple[str, ...]) -> tuple[bytes, ...]:
    """Each grant as ``b"DIR/"``; a grant of "/" or "" counts as none (fail closed)."""
    return tuple(os.fsencode(g.rstrip("/")) + b"/" for g in granted if g.rstrip("/"))


def _scope(
    change: FileChange, home_prefix: bytes | None, granted: tuple[bytes, ...] = ()
) -> ChangeScope:
    if change.in_workspace:
        return ChangeScope.WORKSPACE
    path = change.path
    if granted and (path + b"/").startswith(granted):
        return ChangeScope.GRANTED
    if home_prefix is not None and path.startswith(home_prefix):
        return ChangeScope.HOME
    if path.startswith(_TEMP_PREFIXES):
        return ChangeScope.TEMP
    return ChangeScope.SYSTEM


# --------------------------------------------------------------------------- path globs

_ABS, _HOME, _ANYWHERE = 0, 1, 2
_FEW = 16  # a glob's prefix run longer than this is searched by its literal part instead
_WILD = re.compile(rb"[*?]")


def path_glob_problem(pattern: str) -> tuple[str, str] | None:
    """(message, hint) when ``pattern`` is not a valid path glob; None when it is.

    The recorder's syntax has no character classes and no ``~user``; a trailing
    ``/`` or a ``.``/``..`` component can never match a reported path. Rejecting
    them beats a glob that silently never matches."""
    if "[" in pattern:
        return (
            f"path glob {pattern!r}: [classes] are not supported",
            "path globs know *, ? and **; list each name instead",
        )
    if pattern.startswith("~") and pattern != "~" and not pattern.startswith("~/"):
        return (
            f"path glob {pattern!r}: ~ must stand alone or before /",
            "~ is the home of the user the command runs as; ~user is not supported",
        )
    if pattern != "/" and pattern.endswith("/"):
        return (
            f"path glob {pattern!r} ends with /",
            f"changed paths have no trailing /: write {pattern.rstrip('/') or '/'} for the "
            f"directory itself, {pattern}** for everything below it",
        )
    parts = pattern.split("/")
    if any(p in (".", "..") for p in parts) or "//" in pattern:
        return (
            f"path glob {pattern!r} has an empty, . or .. component",
            "reported paths are normalised: write the path without them",
        )
    return None


@dataclass(frozen=True)
class _PathGlob:
    label: str  # what the policy wrote: the pattern, or "$list"
    pattern: str
    anchor: int  # _ABS, _HOME or _ANYWHERE
    literal: bytes  # _ABS/_HOME: the literal prefix (after ~ for _HOME)
    rest: re.Pattern[bytes] | None  # _ABS/_HOME: the remainder; None: literal is all of it
    full: re.Pattern[bytes] | None  # _ANYWHERE: the whole pattern
    # The longest literal run of the pattern (_ABS/_HOME: of the part after the prefix),
    # which every matching path contains (with a NUL after it when it ends the pattern:
    # the paths are searched NUL-joined).
    needle: bytes = b""


def _compile_path_glob(label: str, pattern: str) -> _PathGlob:
    if pattern == "~" or pattern.startswith("~/"):
        anchor, body = _HOME, pattern[1:]
    elif pattern.startswith("/"):
        anchor, body = _ABS, pattern
    else:
        anchor, body = _ANYWHERE, pattern
    raw = os.fsencode(body)
    if anchor == _ANYWHERE:
        full = re.compile(b"(?:.*/)?" + glob_regex(raw), re.DOTALL)
        return _PathGlob(label, pattern, anchor, b"", None, full, _needle(raw))
    m = _WILD.search(raw)
    if m is None:
        return _PathGlob(label, pattern, anchor, raw, None, None)
    literal, wild = raw[: m.start()], raw[m.start() :]
    rest = re.compile(glob_regex(wild), re.DOTALL)
    return _PathGlob(label, pattern, anchor, literal, rest, None, _needle(wild))


def _needle(raw: bytes) -> bytes:
    """The longest literal run of a glob (plus a NUL when it ends the glob)."""
    runs = _WILD.split(raw)
    longest = max(range(len(runs)), key=lambda j: len(runs[j]))
    needle = runs[longest]
    return needle + b"\0" if needle and longest == len(runs) - 1 else needle


def _prefix_end(paths: list[bytes], prefix: bytes, lo: int) -> int:
    """The end of the run of sorted ``paths`` from ``lo`` that start with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return len(paths)
    upper = stripped[:-1] + bytes([stripped[-1] + 1])  # the first string after the prefix
    return bisect.bisect_left(paths, upper, lo)


class PathGlobs:
    """Compiled path globs; ``entries`` are (label, patterns) pairs as from Compiler.entries.

    The patterns must be valid (:func:`path_glob_problem`): the compiler checks them."""

    __slots__ = ("_indexed", "_scan", "globs")

    def __init__(self, entries: Iterable[tuple[str, Sequence[str]]]) -> None:
        self.globs = tuple(
            _compile_path_glob(label, p) for label, pats in entries for p in dict.fromkeys(pats)
        )
        # Globs with a literal to look for; the rest (``*``, ``**/*``) test every path.
        self._indexed = tuple(g for g in self.globs if g.anchor != _ANYWHERE or g.needle)
        self._scan = tuple(g for g in self.globs if g.anchor == _ANYWHERE and not g.needle)

    @classmethod
    def of(cls, patterns: Iterable[str]) -> PathGlobs:
        return cls((p, (p,)) for p in patterns)

    @staticmethod
    def _one(g: _PathGlob, path: bytes, tilde: bytes | None) -> bool:
        if g.anchor == _ANYWHERE:
            assert g.full is not None
            return g.full.fullmatch(path) is not None
        if g.anchor == _HOME:
            if tilde is None:
                return False
            prefix = tilde + g.literal
        else:
            prefix = g.literal
        if g.rest is None:
            return path == prefix
        return path.startswith(prefix) and g.rest.fullmatch(path, len(prefix)) is not None

    def match(self, path: bytes, tilde: bytes | None) -> bool:
        """Whether ``path`` matches; ``tilde`` is what ``~`` stands for (None: no home)."""
        return any(self._one(g, path, tilde) for g in self.globs)

    def matching(self, run: _Run) -> list[int]:
        """The indices (into ``run.changes``) of the changed paths that match, sorted."""
        paths = run.paths
        n = len(paths)
        found: set[int] = set()
        tilde = run.tilde
        for g in self._indexed:
            if g.anchor == _ANYWHERE:
                assert g.full is not None
                full = g.full
                found.update(i for i in run.containing(g.needle) if full.fullmatch(paths[i]))
                continue
            if g.anchor == _HOME:
                if tilde is None:
                    continue
                prefix = tilde + g.literal
            else:
                prefix = g.literal
            lo = bisect.bisect_left(paths, prefix)
            rest = g.rest
            if rest is None:
                while lo < n and paths[lo] == prefix:
                    found.add(lo)
                    lo += 1
                continue
            hi = _prefix_end(paths, prefix, lo)
            start = len(prefix)
            candidates: Iterable[int] = range(lo, hi)
            if hi - lo > _FEW and g.needle:
                # A short prefix (/home/*/.bashrc): search the literal part instead.
                candidates = (i for i in run.containing(g.needle) if lo <= i < hi)
            found.update(i for i in candidates if rest.fullmatch(paths[i], start) is not None)
        if self._scan:
            scan = self._scan
            found.update(
                i
                for i, p in enumerate(paths)
                if any(g.full is not None and g.full.fullmatch(p) for g in scan)
            )
        return sorted(found)


# --------------------------------------------------------------------------- one judgement


class _Run:
    """Per-call state over one Effects: sorted changes and lazily built indexes."""

    __slots__ = (
        "_changes",
        "_ends",
        "_joined",
        "_outside",
        "_paths",
        "_procs",
        "effects",
        "granted",
        "home_prefix",
        "home_str",
        "tilde",
    )

    def __init__(self, effects: Effects) -> None:
        self.effects = effects
        home = effects.home
        stripped = home.rstrip("/")
        # What ~ stands for in path globs, exactly as the recorder substitutes it.
        self.tilde: bytes | None = os.fsencode(stripped) if home else None
        self.home_prefix = _home_scope_prefix(home)
        self.granted = _granted_prefixes(effects.granted)
        self.home_str = stripped or None
        self._changes: list[FileChange] | None = None
        self._paths: list[bytes] = []
        self._outside: list[int] | None = None
        self._joined = b""
        self._ends: list[int] = []
        self._procs: list[_Proc] | None = None

    def processes(self) -> list[_Proc]:
        if self._procs is None:
            self._procs = [_proc(p, self.home_str) for p in self.effects.processes]
        return self._procs

    @property
    def changes(self) -> list[FileChange]:
        """The changes sorted by path (bytes order)."""
        if self._changes is None:
            changes = list(self.effects.changes)
            paths = [c.path for c in changes]
            # The diff reports each overlay in path order: often there is nothing to sort.
            if not all(map(operator.le, paths, islice(paths, 1, None))):
                changes.sort(key=_PATH)
                paths = [c.path for c in changes]
            self._changes, self._paths = changes, paths
        return self._changes

    @property
    def paths(self) -> list[bytes]:
        _ = self.changes
        return self._paths

    def outside(self) -> list[int]:
        """Indices of the changes outside the workspace."""
        if self._outside is None:
            self._outside = [i for i, c in enumerate(self.changes) if not c.in_workspace]
        return self._outside

    def containing(self, needle: bytes) -> list[int]:
        """Indices of the changed paths that contain ``needle`` (a NUL in it: the path's end).

        One C-speed search of the NUL-joined paths, so a glob such as ``*.pem`` costs
        about as much as its matches, not a regex call per path."""
        paths = self.paths
        if not self._ends and paths:
            self._joined = b"\0".join(paths) + b"\0"
            # Just past each path's NUL: the running sum of len(path) + 1, at C speed.
            self._ends = list(accumulate(map((1).__add__, map(len, paths))))
        joined, ends = self._joined, self._ends
        out: list[int] = []
        k = joined.find(needle)
        while k >= 0:
            i = bisect.bisect_right(ends, k)
            out.append(i)
            k = joined.find(needle, ends[i])  # one hit per path is enough
        return out

    def scope(self, change: FileChange) -> ChangeScope:
        return _scope(change, self.home_prefix, self.granted)


_PATH = operator.attrgetter("path")


class _Proc(NamedTuple):
    """One process as the program conditions see it (decoded once per judgement)."""

    files: tuple[str, ...]  # argv[0] and the files it executed
    names: tuple[str, ...]  # their basenames
    args: tuple[str, ...]  # argv[1:], plus a ~ form of each argument under the home
    text: str  # for messages


def _proc(p: ProcessInfo, home: str | None) -> _Proc:
    files = tuple(dict.fromkeys(os.fsdecode(x) for x in (p.argv[:1] + p.executables)))
    args = [os.fsdecode(a) for a in p.argv[1:]]
    if home is not None:
        args += ["~" + a[len(home) :] for a in args if a == home or a.startswith(home + "/")]
    names = tuple(dict.fromkeys(f.rsplit("/", 1)[-1] for f in files))
    return _Proc(files, names, tuple(args), _argv_text(p))


class _Evidence(NamedTuple):
    """What made one key hold: how many distinct items, and the first few, as text."""

    total: int
    shown: tuple[str, ...]

    def text(self) -> str:
        listed = ", ".join(self.shown)
        more = self.total - len(self.shown)
        return f"{listed} and {more} more" if more > 0 else listed


def _evidence(items: Sequence[str]) -> _Evidence:
    return _Evidence(len(items), tuple(items[:LISTED]))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _change_text(c: FileChange) -> str:
    kind = _KIND_TEXT.get(c.kind, "changed")
    if c.kind is ChangeKind.DELETED and c.entries_deleted:
        kind += f", {c.entries_deleted} entries below"
    specials = change_specials(c)
    if specials:
        kind += ", " + ", ".join(s.value for s in Special if s in specials)
        if Special.CAPABILITIES in specials:
            kind += f" {c.capabilities}"
    if c.links > 1:
        kind += f", hard link to {_text(c.linked_to)}" if c.linked_to else ", hard link"
        if c.uid_after is not None:
            kind += f", owner uid {c.uid_after}"
    return f"{_text(c.path)} ({kind})"


def _argv_text(p: ProcessInfo) -> str:
    words = [os.fsdecode(a) for a in p.argv] or [os.fsdecode(e) for e in p.executables[:1]]
    text = shlex.join(words) if words else "?"
    return text if len(text) <= _ARGV_CHARS else text[: _ARGV_CHARS - 1] + "…"


def _http_host(value: str) -> str:
    """The Host header without its port (and without the brackets of an IPv6 literal)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    host, sep, port = value.rpartition(":")
    return host if sep and port.isdigit() else value


def _names(a: NetworkAttemptInfo) -> tuple[str, ...]:
    """The attempt's distinct destination names, lower case, without a trailing dot."""
    out: list[str] = []
    for n in (a.dns_name, a.sni, _http_host(a.http_host)):
        n = n.rstrip(".").lower()
        if n and n not in out:
            out.append(n)
    return tuple(out)


def _attempt_text(a: NetworkAttemptInfo) -> str:
    proto = a.protocol.name.lower()
    if a.protocol is NetProtocol.DNS:
        return f"dns {a.dns_name or '?'}"
    names = _names(a)
    host = names[0] if names else (f"[{a.address}]" if ":" in a.address else a.address)
    state = " (forwarded)" if a.forwarded and not a.refusal else ""
    if a.refusal and a.refusal != "no-grant":  # without a grant every attempt is refused
        state = f" ({'cut' if a.forwarded else 'refused'}: {a.refusal})"
    return f"{proto} {host}:{a.port}{state}"


# --------------------------------------------------------------------------- conditions


class _Cond:
    """One key of an effect mapping; ``rank`` orders evaluation (cheap keys first)."""

    key = ""
    rank = 0

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        """The evidence when the key holds; None when it does not."""
        raise NotImplementedError


class _Links(NamedTuple):
    """The ``files`` keys about hard links and owners (None: the key is not given)."""

    hard_link: bool | None  # the file has more than one name after the change
    owner: str | None  # "caller" or "other": who the file belongs to after the change
    link_scopes: frozenset[ChangeScope] | None  # where another of its names lies

    def holds(self, run: _Run, c: FileChange) -> bool:
        if self.hard_link is not None and (c.links > 1) != self.hard_link:
            return False
        if self.owner is not None:
            uid = run.effects.uid
            mine = uid is not None and c.uid_after is not None and c.uid_after == uid
            if mine != (self.owner == "caller"):  # unknown counts as another user's
                return False
        if self.link_scopes is not None:
            if c.links <= 1 or not c.linked_to:
                return False
            ws = os.fsencode(run.effects.workspace.rstrip("/"))
            other = c.linked_to
            inside = bool(ws) and (other == ws or other.startswith(ws + b"/"))
            name = FileChange(path=other, kind=c.kind, file_type=c.file_type, in_workspace=inside)
            if run.scope(name) not in self.link_scopes:
                return False
        return True


class _Files(_Cond):
    key = "files"
    rank = 3

    def __init__(
        self,
        paths: PathGlobs | None,
        not_paths: PathGlobs | None,
        kinds: frozenset[ChangeKind] | None,
        scopes: frozenset[ChangeScope] | None,
        specials: frozenset[Special] | None = None,
        links: _Links | None = None,
    ) -> None:
        self.paths = paths
        self.not_paths = not_paths
        self.kinds = kinds
        self.scopes = scopes
        self.specials = specials
        self.links = links

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        if not run.effects.changes:
            return None
        changes = run.changes
        indices: Iterable[int]
        if self.paths is not None:
            indices = self.paths.matching(run)
        elif self.scopes is not None and ChangeScope.WORKSPACE not in self.scopes:
            indices = run.outside()
        else:
            indices = range(len(changes))
        kinds, scopes, not_paths, tilde = self.kinds, self.scopes, self.not_paths, run.tilde
        specials, links = self.specials, self.links
        hits: list[FileChange] = []
        for i in indices:
            c = changes[i]
            if kinds is not None and c.kind not in kinds:
                continue
            if scopes is not None and run.scope(c) not in scopes:
                continue
            if specials is not None and not change_specials(c) & specials:
                continue
            if links is not None and not links.holds(run, c):
                continue
            if not_paths is not None and not_paths.match(c.path, tilde):
                continue
            hits.append(c)
        if not hits:
            return None
        return [_Evidence(len(hits), tuple(_change_text(c) for c in hits[:LISTED]))]


class _Programs(_Cond):
    key = "programs"
    rank = 2

    def __init__(self, by_name: Globs | None, by_path: Globs | None, args: Globs | None) -> None:
        self.by_name = by_name
        self.by_path = by_path
        self.args = args

    def _argv0(self, p: _Proc) -> bool:
        if self.by_name is None and self.by_path is None:
            return True
        if self.by_path is not None and any(self.by_path.match(f) for f in p.files):
            return True
        return self.by_name is not None and any(self.by_name.match(n) for n in p.names)

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        items: dict[str, None] = {}
        args = self.args
        for p in run.processes():
            if self._argv0(p) and (args is None or any(args.match(a) for a in p.args)):
                items[p.text] = None
        return [_evidence(list(items))] if items else None


def _blocked(a: NetworkAttemptInfo) -> bool:
    """Refused or cut, or (with nothing saying otherwise) not let through: every attempt but a
    forwarded connection that was not cut and a DNS lookup of a granted name."""
    return bool(a.refusal) or not (a.forwarded or a.grant)


class _EgressKeys(NamedTuple):
    """The egress keys of a ``network`` condition: what became of the attempt."""

    forwarded: bool | None
    blocked: bool | None
    grants: Globs | None
    refusals: frozenset[str] | None

    def holds(self, a: NetworkAttemptInfo) -> bool:
        if self.forwarded is not None and a.forwarded is not self.forwarded:
            return False
        if self.blocked is not None and _blocked(a) is not self.blocked:
            return False
        if self.grants is not None and not (a.grant and self.grants.match(a.grant)):
            return False
        return self.refusals is None or a.refusal in self.refusals


@dataclass(frozen=True)
class CredentialBinding:
    """A policy's ``credential_destinations`` entry: files of a credential and the services
    it is for (npm's configuration and its registry, ~/.aws and the AWS endpoints, ...)."""

    name: str
    paths: PathGlobs
    hosts: Globs
    ports: tuple[tuple[int, int], ...] = ()
    # Services reached by address (a local database on 127.0.0.1:5432), for attempts that
    # carry no name.
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def reaches(self, a: NetworkAttemptInfo) -> bool:
        """Whether the connection ``a`` goes to one of the services, on one of the ports."""
        if self.ports and not any(lo <= a.port <= hi for lo, hi in self.ports):
            return False
        if any(self.hosts.match(n) for n in _names(a)):
            return True
        if not self.addresses:
            return False
        try:
            ip = ipaddress.ip_address(a.address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.addresses)


def _credential_destination(
    run: _Run, bindings: tuple[CredentialBinding, ...], a: NetworkAttemptInfo
) -> bool:
    """Whether ``a`` goes to a service bound to *every* sensitive file the run read: a
    credential used by its own tool. A run that read nothing, or a file no binding names,
    has no such destination (one unbound read keeps every attempt suspicious). A DNS
    lookup counts only for a name the run then connected to, as such a service: a lookup
    alone can carry data out in the name (``KEY.attacker.example``)."""
    reads = run.effects.sensitive_reads
    if not reads or not bindings:
        return False
    candidates = [a]
    if a.protocol is NetProtocol.DNS:
        name = a.dns_name.rstrip(".").lower()
        candidates = [
            t
            for t in run.effects.network
            if t.protocol is NetProtocol.TCP and t.dns_name.rstrip(".").lower() == name
        ]
    for r in reads:
        bound = [b for b in bindings if b.paths.match(r.path, run.tilde)]
        if not any(b.reaches(c) for b in bound for c in candidates):
            return False
    return bool(candidates)


class _Network(_Cond):
    key = "network"
    rank = 1

    def __init__(
        self,
        hosts: Globs | None,
        not_hosts: Globs | None,
        addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
        ports: tuple[tuple[int, int], ...],
        protocols: frozenset[NetProtocol] | None,
        egress: _EgressKeys | None = None,
        credential_destination: bool | None = None,
        bindings: tuple[CredentialBinding, ...] = (),
    ) -> None:
        self.hosts = hosts
        self.not_hosts = not_hosts
        self.addresses = addresses
        self.ports = ports
        self.protocols = protocols
        self.egress = egress
        self.credential_destination = credential_destination
        self.bindings = bindings

    def _address(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.addresses)

    def _holds(self, a: NetworkAttemptInfo) -> bool:
        if self.protocols is not None and a.protocol not in self.protocols:
            return False
        if self.egress is not None and not self.egress.holds(a):
            return False
        if self.ports and not any(lo <= a.port <= hi for lo, hi in self.ports):
            return False
        if self.hosts is not None or self.not_hosts is not None:
            names = _names(a)
            if self.hosts is not None and not any(self.hosts.match(n) for n in names):
                return False
            # Left out only when every name is excepted: one innocent name (a forged SNI)
            # must not hide the others.
            if self.not_hosts is not None and names and all(self.not_hosts.match(n) for n in names):
                return False
        return not self.addresses or self._address(a.address)

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        items: dict[str, None] = {}
        wanted = self.credential_destination
        for a in run.effects.network:
            if self._holds(a) and (
                wanted is None or _credential_destination(run, self.bindings, a) is wanted
            ):
                items[_attempt_text(a)] = None
        return [_evidence(list(items))] if items else None


class _Reads(_Cond):
    key = "sensitive_reads"
    rank = 0

    def __init__(self, paths: PathGlobs | None, not_paths: PathGlobs | None) -> None:
        self.paths = paths
        self.not_paths = not_paths

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        reads = run.effects.sensitive_reads
        if not reads:
            return None
        tilde = run.tilde
        found = {
            r.path
            for r in reads
            if (self.paths is None or self.paths.match(r.path, tilde))
            and (self.not_paths is None or not self.not_paths.match(r.path, tilde))
        }
        if not found:
            return None
        return [_evidence([f"{_text(p)} (read)" for p in sorted(found)])]


class _WorkLost(_Cond):
    """Work the run would destroy in a git repository (Effects.work_lost)."""

    key = "work_lost"
    rank = 0

    def __init__(
        self,
        kinds: frozenset[LostKind] | None,
        paths: PathGlobs | None,
        not_paths: PathGlobs | None,
    ) -> None:
        self.kinds = kinds
        self.paths = paths
        self.not_paths = not_paths

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        items = run.effects.work_lost
        if not items:
            return None
        tilde = run.tilde
        hits = []
        for w in items:
            if self.kinds is not None and w.kind not in self.kinds:
                continue
            path = w.path.rstrip(b"/")
            if self.paths is not None and not (path and self.paths.match(path, tilde)):
                continue
            if self.not_paths is not None and path and self.not_paths.match(path, tilde):
                continue
            hits.append(w)
        if not hits:
            return None
        return [_evidence(worklost.phrases(hits, run.effects.workspace))]


class _AnyOf(_Cond):
    key = "any_of"
    rank = 4

    def __init__(self, options: tuple[EffectMatcher, ...]) -> None:
        self.options = options

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        for o in self.options:
            found = o.evidence(run)
            if found is not None:
                return found
        return None


class EffectMatcher:
    """A compiled ``effect`` mapping: every key must hold (each for effects of its kind)."""

    __slots__ = ("_order", "conds")

    def __init__(self, conds: Sequence[_Cond]) -> None:
        self.conds = tuple(conds)
        self._order = tuple(sorted(range(len(self.conds)), key=lambda i: self.conds[i].rank))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.conds)

    def evidence(self, run: _Run) -> list[_Evidence] | None:
        """The evidence of every key, in the written order; None when some key does not hold."""
        found: list[list[_Evidence]] = [[] for _ in self.conds]
        for i in self._order:
            e = self.conds[i].evidence(run)
            if e is None:
                return None
            found[i] = e
        return [e for es in found for e in es]

    def failing(self, run: _Run) -> list[str]:
        """The keys that do not hold (for test failure reports)."""
        return [c.key for c in self.conds if c.evidence(run) is None]


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class EffectTest:
    """One inline test of an effect rule: ``effects`` must (or must not) make it fire."""

    effects: Effects
    text: str  # the entry as written, for reports
    expect_fire: bool
    file: str = ""
    line: int = 0
    column: int = 0

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class EffectRule:
    """One compiled effect rule."""

    id: str
    title: str
    description: str
    decision: Verdict
    severity: Severity
    matcher: EffectMatcher = field(repr=False, compare=False)
    layer: Layer = Layer.PROJECT
    file: str = ""
    line: int = 0
    references: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tests: tuple[EffectTest, ...] = ()

    def _finding(self, evidence: Sequence[_Evidence]) -> Finding:
        detail = "; ".join(e.text() for e in evidence)
        return Finding(
            rule_id=self.id,
            verdict=self.decision,
            severity=self.severity,
            message=f"{self.title}: {detail}" if detail else self.title,
            source=FindingSource.DYNAMIC,
        )

    def finding(self, effects: Effects) -> Finding | None:
        """This rule alone on ``effects``: its finding, or None when it does not fire."""
        found = self.matcher.evidence(_Run(effects))
        return None if found is None else self._finding(found)


def _sort_key(f: Finding) -> tuple[int, int, str]:
    return (-f.verdict, -f.severity, f.rule_id)


def judge_effects(rules: Iterable[EffectRule], effects: Effects) -> tuple[Finding, ...]:
    """One finding per rule that fires on ``effects``, strictest first (then by rule id)."""
    run = _Run(effects)
    findings: list[Finding] = []
    for rule in rules:
        found = rule.matcher.evidence(run)
        if found is not None:
            findings.append(rule._finding(found))
    findings.sort(key=_sort_key)
    return tuple(findings)


def judges_work_lost(rules: Iterable[EffectRule]) -> bool:
    """Whether some rule that asks or denies has a ``work_lost`` key (in ``any_of`` too):
    only then may a dry run's lost-work check stand in for a static rule
    (``LOST_WORK_CHECKED_TAG``)."""

    def has(m: EffectMatcher) -> bool:
        return any(
            c.key == "work_lost" or (isinstance(c, _AnyOf) and any(has(o) for o in c.options))
            for c in m.conds
        )

    return any(r.decision > Verdict.ALLOW and has(r.matcher) for r in rules)


# A static rule with this tag asks or denies only where no dry run checked for lost work
# (Execute, a dry run that did not finish or could not check): see core/engine.py.
LOST_WORK_CHECKED_TAG = "dry-run-checks-lost-work"


def _effects_summary(e: Effects) -> str:
    parts = []
    for singular, plural, items in (
        ("change", "changes", [_change_text(c) for c in e.changes]),
        ("process", "processes", [_argv_text(p) for p in e.processes]),
        ("network attempt", "network attempts", [_attempt_text(a) for a in e.network]),
        ("sensitive read", "sensitive reads", [_text(r.path) for r in e.sensitive_reads]),
        ("lost work", "lost work", worklost.phrases(e.work_lost, e.workspace)),
    ):
        if items:
            noun = singular if len(items) == 1 else plural
            parts.append(f"{len(items)} {noun} ({_evidence(items).text()})")
    return ", ".join(parts) or "nothing"


def check_effect_test(rule: EffectRule, test: EffectTest) -> str:
    """'' when ``rule`` behaves as ``test`` expects; else what happened instead."""
    run = _Run(test.effects)
    found = rule.matcher.evidence(run)
    if (found is not None) == test.expect_fire:
        return ""
    if found is not None:
        return f"it fired ({rule._finding(found).message})"
    failing = ", ".join(rule.matcher.failing(run))
    return f"it did not fire: {failing} did not hold; the effects: {_effects_summary(test.effects)}"


# --------------------------------------------------------------------------- synthetic effects


def _test_path(path: str) -> str:
    if path == "~" or path.startswith("~/"):
        path = TEST_HOME + path[1:]
    elif not path.startswith("/"):
        path = f"{TEST_WORKSPACE}/{path}"
    return posixpath.normpath(path)


def _in_workspace(path: str) -> bool:
    return path == TEST_WORKSPACE or path.startswith(TEST_WORKSPACE + "/")


def synthetic_effects(raw: Mapping[str, Any], path: JsonPath, report: Report) -> Effects:
    """The Effects an inline test entry (schema-valid) describes, in the fake workspace
    ``/workspace`` with the fake home ``/home/user``; bad addresses go to ``report``."""
    changes: list[FileChange] = []
    for f in raw.get("files", ()):
        p = _test_path(f["path"])
        kind = KINDS[f.get("kind", "modified")]
        deleted = kind is ChangeKind.DELETED
        file_type, other = TEST_TYPES[f.get("type", "regular")]
        previous = FileType.REGULAR
        if kind is ChangeKind.CREATED:
            previous = FileType.NONE
        elif kind in (ChangeKind.METADATA_CHANGED, ChangeKind.DELETED):
            previous = file_type
        changes.append(
            FileChange(
                path=os.fsencode(p),
                kind=kind,
                file_type=FileType.NONE if deleted else file_type,
                previous_file_type=previous,
                in_workspace=_in_workspace(p),
                mode_before=int(f["mode_before"], 8) if "mode_before" in f else None,
                mode_after=int(f["mode"], 8) if "mode" in f and not deleted else None,
                other_type=other,
                capabilities=f.get("capabilities", "") if not deleted else "",
                uid_after=(
                    None if deleted else TEST_OTHER_UID if f.get("owner") == "other" else TEST_UID
                ),
                links=(
                    0
                    if deleted or file_type is FileType.DIRECTORY
                    else max(f.get("links", 1), 2 if "linked_to" in f else 1)
                ),
                linked_to=os.fsencode(_test_path(f["linked_to"])) if "linked_to" in f else b"",
            )
        )
    processes = tuple(
        ProcessInfo(
            pid=None,
            ppid=None,
            argv=tuple(os.fsencode(a) for a in p["argv"]),
            executables=(os.fsencode(p["executable"]),) if "executable" in p else (),
        )
        for p in raw.get("programs", ())
    )
    network: list[NetworkAttemptInfo] = []
    for i, a in enumerate(raw.get("network", ())):
        protocol = PROTOCOLS[a.get("protocol", "tcp")]
        dns = protocol is NetProtocol.DNS
        address = a.get("address", "127.0.0.53" if dns else "192.0.2.1")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            report(
                (*path, "network", i, "address"),
                f"invalid IP address {address!r}",
                "write an IPv4 or IPv6 address; names go in dns_name, sni or http_host",
                None,
            )
        network.append(
            NetworkAttemptInfo(
                protocol=protocol,
                address=address,
                port=a.get("port", 443 if protocol is NetProtocol.TCP else 53),
                dns_name=a.get("dns_name", ""),
                dns_type="A" if dns else "",
                sni=a.get("sni", ""),
                http_host=a.get("http_host", ""),
                forwarded=a.get("forwarded", False),
                grant=a.get("grant", ""),
                refusal=a.get(
                    "refusal",
                    "" if a.get("forwarded") or a.get("grant") else "no-grant",
                ),
            )
        )
    reads = tuple(
        SensitiveReadInfo(path=os.fsencode(_test_path(p)), pid=None)
        for p in raw.get("sensitive_reads", ())
    )
    lost = tuple(
        LostWork(
            worklost.LOST_KINDS[w["kind"]],
            os.fsencode(TEST_WORKSPACE),
            os.fsencode(_test_path(w["path"])) if "path" in w else b"",
            w.get("count", 1),
        )
        for w in raw.get("work_lost", ())
    )
    return Effects(
        workspace=TEST_WORKSPACE,
        home=TEST_HOME,
        changes=tuple(changes),
        processes=processes,
        network=tuple(network),
        sensitive_reads=reads,
        work_lost=lost,
        uid=TEST_UID,
    )


# --------------------------------------------------------------------------- compiling


class EffectCompiler:
    """Compiles ``effect`` mappings (already schema-valid) into :class:`EffectMatcher`.

    Lists come from ``compiler`` (the static rules' compiler, so that ``$name``
    works and counts as used the same way); problems go to ``report`` with the JSON
    path of the offending value. A list item that is not a valid path glob is
    reported once, where the list defines it.
    """

    def __init__(self, compiler: Compiler, report: Report) -> None:
        self.compiler = compiler
        self.report = report
        self._reported: set[JsonPath] = set()
        # The bundle's credential_destinations (``bind``), compiled before any effect rule.
        self.bindings: tuple[CredentialBinding, ...] = ()

    def bind(self, entries: Sequence[Mapping[str, Any]], path: JsonPath) -> None:
        """Add a file's ``credential_destinations`` entries to :attr:`bindings`."""
        out = list(self.bindings)
        for i, raw in enumerate(entries):
            epath: JsonPath = (*path, i)
            out.append(
                CredentialBinding(
                    raw["name"],
                    self.path_globs(raw["paths"], (*epath, "paths")),
                    self._hosts(raw.get("hosts", ()), (*epath, "hosts")),
                    tuple(self._ports(raw.get("ports", ()), (*epath, "ports"))),
                    tuple(self._networks(raw.get("addresses", ()), (*epath, "addresses"))),
                )
            )
        self.bindings = tuple(out)

    def _problem(self, path: JsonPath, message: str, hint: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            self.report(path, message, hint, None)

    def path_patterns(
        self, patterns: Sequence[str], path: JsonPath
    ) -> list[tuple[str, tuple[str, ...]]]:
        """(label, patterns) pairs with lists resolved; invalid path globs are reported."""
        entries = self.compiler.entries(patterns, path)
        ok: list[tuple[str, tuple[str, ...]]] = []
        for i, pat in enumerate(patterns):
            if not pat.startswith("$"):
                problem = path_glob_problem(pat)
                if problem is not None:
                    self._problem((*path, i), *problem)
        for label, pats in entries:
            if label.startswith("$"):
                defined = self.compiler.lists.get(label[1:])
                if defined is not None:
                    for j, item in enumerate(defined[1]):
                        problem = path_glob_problem(item)
                        if problem is not None:
                            message, hint = problem
                            self._problem(
                                (*defined[0], j),
                                f"{message} (list {label[1:]!r} is used as path globs "
                                "by an effect rule or sensitive_paths)",
                                hint,
                            )
            ok.append((label, tuple(pats)))
        return ok

    def path_globs(self, patterns: Sequence[str], path: JsonPath) -> PathGlobs:
        return PathGlobs(self.path_patterns(patterns, path))

    def effect(self, raw: Mapping[str, Any], path: JsonPath) -> EffectMatcher:
        conds: list[_Cond] = []
        for key, value in raw.items():
            cond = self._cond(key, value, (*path, key))
            if cond is not None:
                conds.append(cond)
        return EffectMatcher(conds)

    def _any_alone(self, value: Mapping[str, Any], path: JsonPath) -> bool:
        """True for ``{any: true}``; reports ``any`` next to other keys."""
        if "any" not in value:
            return False
        if len(value) > 1:
            self.report(
                (*path, "any"),
                "`any: true` stands alone",
                "with other keys, leave `any` out: the keys already say which effects count",
                None,
            )
        return True

    def _cond(self, key: str, value: Any, path: JsonPath) -> _Cond | None:
        if key == "any_of":
            return _AnyOf(tuple(self.effect(m, (*path, i)) for i, m in enumerate(value)))
        if key == "files":
            if self._any_alone(value, path):
                return _Files(None, None, None, None)
            specials = value.get("special")
            links = None
            if {"hard_link", "owner", "link_scope"} & value.keys():
                links = _Links(
                    value.get("hard_link"),
                    value.get("owner"),
                    (
                        frozenset(SCOPES[s] for s in value["link_scope"])
                        if "link_scope" in value
                        else None
                    ),
                )
            return _Files(
                self.path_globs(value["paths"], (*path, "paths")) if "paths" in value else None,
                (
                    self.path_globs(value["not_paths"], (*path, "not_paths"))
                    if "not_paths" in value
                    else None
                ),
                frozenset(KINDS[k] for k in value["kinds"]) if "kinds" in value else None,
                frozenset(SCOPES[s] for s in value["scope"]) if "scope" in value else None,
                frozenset(SPECIALS[s] for s in specials) if specials is not None else None,
                links,
            )
        if key == "sensitive_reads":
            if self._any_alone(value, path):
                return _Reads(None, None)
            return _Reads(
                self.path_globs(value["paths"], (*path, "paths")) if "paths" in value else None,
                (
                    self.path_globs(value["not_paths"], (*path, "not_paths"))
                    if "not_paths" in value
                    else None
                ),
            )
        if key == "work_lost":
            if self._any_alone(value, path):
                return _WorkLost(None, None, None)
            return _WorkLost(
                (
                    frozenset(worklost.LOST_KINDS[k] for k in value["kinds"])
                    if "kinds" in value
                    else None
                ),
                self.path_globs(value["paths"], (*path, "paths")) if "paths" in value else None,
                (
                    self.path_globs(value["not_paths"], (*path, "not_paths"))
                    if "not_paths" in value
                    else None
                ),
            )
        if key == "programs":
            if self._any_alone(value, path):
                return _Programs(None, None, None)
            by_name: Globs | None = None
            by_path: Globs | None = None
            if "argv0" in value:
                entries = self.compiler.entries(value["argv0"], (*path, "argv0"))
                names = [(lab, tuple(p for p in ps if "/" not in p)) for lab, ps in entries]
                full = [(lab, tuple(p for p in ps if "/" in p)) for lab, ps in entries]
                names = [(lab, ps) for lab, ps in names if ps]
                full = [(lab, ps) for lab, ps in full if ps]
                by_name = Globs(names) if names else None
                by_path = Globs(full) if full else None
                if by_name is None and by_path is None:  # only empty lists: match nothing
                    by_name = Globs(())
            args = None
            if "args" in value:
                args = self.compiler.globs(value["args"], (*path, "args"), home=False)
            return _Programs(by_name, by_path, args)
        if key == "network":
            if self._any_alone(value, path):
                return _Network(None, None, (), (), None)
            return _Network(
                self._hosts(value["hosts"], (*path, "hosts")) if "hosts" in value else None,
                (
                    self._hosts(value["not_hosts"], (*path, "not_hosts"))
                    if "not_hosts" in value
                    else None
                ),
                tuple(self._networks(value.get("addresses", ()), (*path, "addresses"))),
                tuple(self._ports(value.get("ports", ()), (*path, "ports"))),
                (
                    frozenset(PROTOCOLS[p] for p in value["protocols"])
                    if "protocols" in value
                    else None
                ),
                self._egress_keys(value, path),
                value.get("credential_destination"),
                self.bindings,
            )
        self.report(path, f"unknown effect key {key!r}", "", None)  # the schema prevents this
        return None

    def _egress_keys(self, value: Mapping[str, Any], path: JsonPath) -> _EgressKeys | None:
        if not {"forwarded", "blocked", "grants", "refusals"} & value.keys():
            return None
        return _EgressKeys(
            value.get("forwarded"),
            value.get("blocked"),
            (
                self.compiler.globs(value["grants"], (*path, "grants"), home=False)
                if "grants" in value
                else None
            ),
            frozenset(value["refusals"]) if "refusals" in value else None,
        )

    def _hosts(self, patterns: Sequence[str], path: JsonPath) -> Globs:
        entries = self.compiler.entries(patterns, path)
        return Globs((lab, tuple(p.rstrip(".").lower() for p in ps)) for lab, ps in entries)

    def _networks(
        self, values: Sequence[str], path: JsonPath
    ) -> Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        for i, text in enumerate(values):
            try:
                yield ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                hint = "write a network as ADDRESS/PREFIX (e.g. 10.0.0.0/8) or a single address"
                if "host bits set" in str(e):
                    hint = "bits are set beyond the prefix: write the network's first address"
                self.report((*path, i), f"invalid network {text!r}: {e}", hint, None)

    def _ports(self, values: Sequence[int | str], path: JsonPath) -> Iterable[tuple[int, int]]:
        for i, value in enumerate(values):
            if isinstance(value, int):
                yield (value, value)  # the schema bounds it
                continue
            m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", value.strip())
            lo = int(m.group(1)) if m else -1
            hi = int(m.group(2) or m.group(1)) if m else -1
            if m is None or not (0 <= lo <= hi <= 65535):
                self.report(
                    (*path, i),
                    f"invalid port or port range {value!r}",
                    'write a port number (0-65535) or an inclusive range like "8000-8999" '
                    "with the lower bound first",
                    None,
                )
                continue
            yield (lo, hi)


# --- A dry run that did not finish -----------------------------------------------------------

INCOMPLETE_RULE = "builtin.incomplete-dry-run"


def unfinished_findings(
    *,
    termination: Termination,
    changes_truncated: bool = False,
    memory_limit_hit: bool = False,
    pids_limit_hit: bool = False,
    stdout_truncated: bool = False,
    stderr_truncated: bool = False,
    left_running: bool = False,
) -> tuple[Finding, ...]:
    """The ASK finding of a dry run that was cut short, naming why; () if it finished.

    A run stopped by a limit (out of memory, the pids limit, the timeout), cancelled, or
    whose output or changes were cut, may have stopped before the effect that matters (an
    allocation that fails before ``>> ~/.bashrc``): what it shows is not all the command
    does, so no verdict may rest on it alone. So may one that left processes running past the
    grace (``left_running``: ``(sleep 1; echo x >> ~/.bashrc) &``): on the host they go on
    after the command has exited, and the sandbox, which ends with the command, stopped them.
    This holds whatever the policy's rules say.
    """
    why = []
    if termination is Termination.TIMED_OUT:
        why.append("it ran out of time")
    if termination is Termination.CANCELLED:
        why.append("it was cancelled")
    if memory_limit_hit or termination is Termination.OUT_OF_MEMORY:
        why.append("it hit the memory limit (a process was killed out of memory)")
    if pids_limit_hit:
        why.append("it hit the process limit (a fork failed)")
    if changes_truncated:
        why.append("more changes were made than are reported")
    if left_running:
        why.append(
            "it left processes running, which were stopped when the dry run ended, so what "
            "they would have done next was not seen"
        )
    if stdout_truncated or stderr_truncated:
        cut = [("standard output", stdout_truncated), ("standard error", stderr_truncated)]
        which = " and ".join(name for name, was_cut in cut if was_cut)
        why.append(f"its {which} went past the limit and was cut")
    if not why:
        return ()
    return (
        Finding(
            rule_id=INCOMPLETE_RULE,
            verdict=Verdict.ASK,
            severity=Severity.LOW,
            message="The verdict is not certain: the dry run did not finish as the command "
            "would: " + "; ".join(why) + ".",
            source=FindingSource.BUILTIN,
        ),
    )
