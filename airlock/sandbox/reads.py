"""Reads: which sensitive files (keys, credentials, ``.env``, ``/etc/shadow``) the command opened.

One fanotify group (``FAN_CLASS_NOTIF``, ``FAN_OPEN``) owned by the supervisor,
with a ``FAN_MARK_FILESYSTEM`` mark on the superblock of every overlay of the
sandbox. A superblock mark, not a mount mark: the command runs in init's *copy*
of the supervisor's mount namespace (pivoted into the overlay root), and a copy
of a mount is another mount, which a ``FAN_MARK_MOUNT`` on the supervisor's
mount would never hear of. The overlays' superblocks are private to the
sandbox, so the group hears the sandbox's opens and nothing of the host's.

Each event carries the pid of the opener (in the supervisor's pid namespace)
and a descriptor of the opened file; ``readlink(/proc/self/fd/N)`` names it.
An open made inside the pivoted sandbox reads as the sandbox's path, which is
the host's path (every overlay sits where its host mount is); an open made
through the supervisor's own view reads as ``<overlay mountpoint>/<rest>`` and
is mapped back with the ``mounts`` pairs. Files that exist only in the upper
layer (created by the command) count like any other.

What it cannot see: opens that fail (``EACCES`` on ``/etc/shadow``, ``ENOENT``)
never reach fanotify; nor do opens on file systems that are not overlays of the
sandbox (``/dev``, ``/proc``, ``/sys``, bind-mounted single files). Exe and argv
are read from ``/proc/PID`` when the event is handled, so they are empty if the
process has already exited (join with proctrace's records by pid for an exact
argv). When the kernel's queue (16384 events) overflows, events are lost and
:attr:`ReadRecorder.overflowed` says so: treat the record as incomplete.

Wiring (see docs/decisions.md, "Sensitive-read capture")::

    supervisor: after host_setup (a warm sandbox: at the end of prepare):
                rec = ReadRecorder(overlay_mounts(template.host_setup))
                with the request, before the command runs: rec.expect(globs, home)
                poll loop: rec.fileno() readable -> rec.handle()
                after waitpid(init): while rec.handle(): pass
                                     rec.reads(); rec.overflowed; rec.dropped; rec.close()
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from airlock._globs import glob_regex
from airlock.sandbox import _syscalls as sc

__all__ = [
    "DEFAULT_SENSITIVE_GLOBS",
    "MAX_READS",
    "GlobMatcher",
    "ReadRecorder",
    "SensitiveRead",
    "compile_globs",
    "overlay_mounts",
    "precompile",
]

# Pattern syntax (matched against the host's path): ``~`` at the start is the
# home directory; ``*`` and ``?`` stay within one path component; ``**`` spans
# any number of components; a pattern that starts with neither ``/`` nor ``~``
# matches at any depth (``.env`` is any file named .env).
DEFAULT_SENSITIVE_GLOBS: tuple[str, ...] = (
    "~/.ssh/**",
    "~/.aws/**",
    "~/.config/gcloud/**",
    "~/.azure/**",
    "~/.netrc",
    "~/.git-credentials",
    "~/.docker/config.json",
    "~/.kube/config",
    "~/.gnupg/**",
    "~/.mozilla/firefox/*/logins.json",
    "~/.mozilla/firefox/*/key4.db",
    "~/.mozilla/firefox/*/cookies.sqlite",
    "~/.config/google-chrome/*/Login Data",
    "~/.config/google-chrome/*/Cookies",
    "~/.config/chromium/*/Login Data",
    "~/.config/chromium/*/Cookies",
    ".env",
    ".env.*",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
)

MAX_READS = 256
_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_METADATA_VERSION = 3
# Every event in a read gets a descriptor at once: keep a read's worth of them well under
# RLIMIT_NOFILE (an event whose descriptor cannot be installed is lost).
_READ_BYTES = 128 * _METADATA.size
_READS_PER_HANDLE = 64
_DELETED = b" (deleted)"
_ARGV_BYTES = 4096


@dataclass(frozen=True)
class SensitiveRead:
    """A sensitive file one process opened (deduplicated by path and pid)."""

    path: bytes  # as the host sees it
    pid: int  # in the supervisor's pid namespace
    exe: bytes  # readlink /proc/PID/exe when first handled; b"" if the process was gone
    argv: tuple[bytes, ...]  # /proc/PID/cmdline (bounded), () if gone
    time: float  # CLOCK_MONOTONIC when the first such open was handled (not when it happened)
    count: int  # opens of this path by this pid


def _glob_regex(pattern: str, home: str) -> bytes:
    if pattern.startswith("~"):
        pattern = home.rstrip("/") + pattern[1:]
    anywhere = not pattern.startswith("/")
    out = [b"(?:.*/)?" if anywhere else b""]
    out.append(glob_regex(os.fsencode(pattern)))
    return b"".join(out)


def compile_globs(globs: Iterable[str], home: str) -> re.Pattern[bytes]:
    """One regular expression that fully matches the host paths ``globs`` name."""
    parts = [b"(?:" + _glob_regex(g, home) + b")" for g in globs]
    if not parts:
        return re.compile(b"(?!)")
    return re.compile(b"|".join(parts), re.DOTALL)


def _alternatives(parts: list[bytes]) -> re.Pattern[bytes]:
    if not parts:
        return re.compile(b"(?!)")
    return re.compile(b"|".join(b"(?:" + p + b")" for p in parts), re.DOTALL)


@functools.lru_cache(maxsize=8)
def _split(globs: tuple[str, ...]) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """``globs`` compiled without a home: (the globs without "~", the "~" globs' rest after
    the "~"). Compiling is most of a read recorder's set-up (~1-3 ms for the default
    policy's globs): done once per process, and before the fork by the spawner
    (:func:`precompile`), so that a supervisor inherits it."""
    fixed = [_glob_regex(g, "") for g in globs if not g.startswith("~")]
    rest = [glob_regex(os.fsencode(g[1:])) for g in globs if g.startswith("~")]
    return _alternatives(fixed), _alternatives(rest)


def precompile(globs: Iterable[str]) -> None:
    """Compile ``globs`` now (any home), so that processes forked after inherit it."""
    _split(tuple(globs))


class GlobMatcher:
    """What ``compile_globs(globs, home).fullmatch`` says, from a home-independent compiled form.

    A "~" glob's regex is the home, literally, followed by the regex of the rest; so a path
    matches it exactly when it starts with the home and the rest matches. That holds when
    the home (without trailing "/") is absolute and has no glob character; for any other
    home the globs are compiled with it, as before.
    """

    def __init__(self, globs: Iterable[str], home: str) -> None:
        globs = tuple(globs)
        self._home = os.fsencode(home.rstrip("/"))
        self._whole: re.Pattern[bytes] | None = None
        if not self._home.startswith(b"/") or b"*" in self._home or b"?" in self._home:
            self._whole = compile_globs(globs, home)
        else:
            self._fixed, self._rest = _split(globs)

    def fullmatch(self, path: bytes) -> bool:
        if self._whole is not None:
            return self._whole.fullmatch(path) is not None
        if self._fixed.fullmatch(path) is not None:
            return True
        home = self._home
        return path.startswith(home) and self._rest.fullmatch(path, len(home)) is not None


def overlay_mounts(ops: Iterable[object]) -> tuple[tuple[str, str], ...]:
    """(mountpoint as the supervisor sees it, host path) for each ``Overlay`` of a plan."""
    from airlock.sandbox.plan import Overlay

    return tuple((op.target, op.lower) for op in ops if isinstance(op, Overlay))


def _read_proc(pid: int) -> tuple[bytes, tuple[bytes, ...]]:
    exe = b""
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe".encode())
    argv: tuple[bytes, ...] = ()
    with contextlib.suppress(OSError):
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, _ARGV_BYTES)
        finally:
            os.close(fd)
        argv = tuple(raw.rstrip(b"\0").split(b"\0")) if raw else ()
    return exe, argv


def _mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    return -1


class ReadRecorder:
    """Records opens of sensitive files on the sandbox's overlays. Needs CAP_SYS_ADMIN.

    ``mounts`` are (mountpoint as the supervisor sees it, host path) pairs, one per
    overlay. :meth:`handle` never blocks and does a bounded amount of work.
    """

    def __init__(
        self,
        mounts: Sequence[tuple[str, str]],
        globs: tuple[str, ...] = (),
        home: str = "",
        *,
        max_reads: int = MAX_READS,
    ) -> None:
        # None: no globs yet (a warm sandbox's recorder, marked before the request: expect()).
        self._match: GlobMatcher | None = None
        if globs:
            self.expect(globs, home)
        self._max = max_reads
        self._records: dict[tuple[bytes, int], SensitiveRead] = {}
        self.dropped = 0  # sensitive opens not recorded because the record was full
        self.overflowed = False  # the kernel's queue overflowed: events were lost
        self.events = 0  # events handled (any file)
        # Longest mountpoint first, so nested overlays map to the innermost.
        pairs = sorted(
            ((os.fsencode(m).rstrip(b"/"), os.fsencode(h).rstrip(b"/")) for m, h in mounts),
            key=lambda p: -len(p[0]),
        )
        self._mounts = pairs
        self._fd = sc.fanotify_init(
            sc.FAN_CLOEXEC | sc.FAN_NONBLOCK | sc.FAN_CLASS_NOTIF,
            os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC,
        )
        try:
            self._mount_ids: dict[int, tuple[bytes, bytes]] = {}
            for mountpoint, host in pairs:
                sc.fanotify_mark(
                    self._fd, sc.FAN_MARK_ADD | sc.FAN_MARK_FILESYSTEM, sc.FAN_OPEN, mountpoint
                )
                fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    self._mount_ids[_mount_id(fd)] = (mountpoint, host)
                finally:
                    os.close(fd)
        except BaseException:
            os.close(self._fd)
            raise

    def expect(self, globs: tuple[str, ...], home: str) -> None:
        """What is sensitive for this request: ``globs``, "~" being ``home``. Set before the
        command runs; until then (and without globs) no open is recorded."""
        self._match = GlobMatcher(globs, home) if globs else None

    def fileno(self) -> int:
        return self._fd

    def _host_path(self, path: bytes, fd: int) -> bytes:
        if path.endswith(_DELETED):
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_nlink == 0:
                    path = path[: -len(_DELETED)]
        for mountpoint, _host in self._mounts:
            if path == mountpoint or path.startswith(mountpoint + b"/"):
                # Looks like the supervisor's view: it is one only if the file was opened
                # through one of the supervisor's own mounts (not a same-named sandbox path).
                found = self._mount_ids.get(_mount_id(fd))
                if found is not None:
                    mp, host = found
                    if path == mp or path.startswith(mp + b"/"):
                        return (host + path[len(mp) :]) or b"/"
                break
        return path

    def _event(self, pid: int, fd: int) -> None:
        self.events += 1
        try:
            path = self._host_path(os.readlink(f"/proc/self/fd/{fd}".encode()), fd)
        except OSError:
            return
        if self._match is None or not self._match.fullmatch(path):
            return
        key = (path, pid)
        old = self._records.get(key)
        if old is not None:
            self._records[key] = SensitiveRead(
                old.path, old.pid, old.exe, old.argv, old.time, old.count + 1
            )
        elif len(self._records) >= self._max:
            self.dropped += 1
        else:
            exe, argv = _read_proc(pid)
            self._records[key] = SensitiveRead(path, pid, exe, argv, time.monotonic(), 1)

    def handle(self) -> bool:
        """Read and record what the kernel has queued, up to a bound.

        Returns True if events may remain (call again; after the command has exited,
        call until False: every event is queued by then).
        """
        for _ in range(_READS_PER_HANDLE):
            try:
                buf = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.overflowed = True  # that event is lost; report the record incomplete
                    continue
                raise
            offset = 0
            while offset + _METADATA.size <= len(buf):
                length, version, _r, _ml, mask, fd, pid = _METADATA.unpack_from(buf, offset)
                if length < _METADATA.size or version != _METADATA_VERSION:
                    raise OSError(errno.EPROTO, f"fanotify: unexpected event version {version}")
                offset += length
                if mask & sc.FAN_Q_OVERFLOW:
                    self.overflowed = True
                if fd < 0:
                    continue
                try:
                    self._event(pid, fd)
                finally:
                    os.close(fd)
        return True

    def reads(self) -> tuple[SensitiveRead, ...]:
        """What was recorded, in the order first seen."""
        return tuple(self._records.values())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
