"""Cgroups: memory and pid limits for one sandbox, on cgroup v2 or v1.

``detect`` reads the mount table once (in the daemon) and says which cgroup
interface the host offers; a :class:`CgroupSpec` is inert data in the sandbox
plan; :class:`Cgroup` is the live group made from it in the helper process::

    <root>/<group>/<name>      group: one per daemon (e.g. "airlock-1a2b3c4d")
                               name:  one per sandbox (e.g. "sb-<hex id>")

On cgroup v2 there is one directory (in the unified hierarchy); on v1 there is
one per hierarchy we use (memory, pids and, for CPU time, cpuacct), and every
operation is applied to each of them.

Costs, per sandbox: v2 is 2 mkdir + 4 writes to create, 1 write to attach,
1 write (``cgroup.kill``) + 1 read + 1 rmdir to remove. v1 is the same per
hierarchy (3 here). Killing without ``cgroup.kill`` (v1, or v2 before Linux
5.14) reads ``cgroup.procs`` until it is empty and signals each process through
a pidfd that is checked to still be in the group, so a recycled pid can never
make us kill a process outside it.

Statistics, and what they mean:

* ``peak_memory_bytes``: v2 ``memory.peak`` (Linux 5.19+; before that
  ``memory.current``, the usage *now*, a lower bound); v1
  ``memory.max_usage_in_bytes``.
* ``oom_kills``: v2 ``memory.events`` ``oom_kill``; v1 ``memory.oom_control``
  ``oom_kill`` (Linux 4.13+). Older v1 kernels have no counter: there we report 1
  when ``memory.failcnt`` (or ``memory.memsw.failcnt``) is non-zero, a heuristic:
  the limit was hit, which usually but not always ends in an OOM kill (the
  kernel may have reclaimed enough page cache instead).
* ``pids_limit_hit``: ``pids.events`` ``max`` > 0 (v2 and v1): a fork or clone
  failed with EAGAIN because of ``pids.max``.
* ``cpu_time_s``: v2 ``cpu.stat`` ``usage_usec`` (a core file, present without
  the cpu controller); v1 ``cpuacct.usage`` (ns) when cpuacct is mounted, else 0.

With :attr:`CgroupVersion.NONE` every method of :class:`Cgroup` is a no-op and
the statistics are zero: the daemon then reports limits as not enforced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

from airlock._errors import SandboxError
from airlock.types import CgroupVersion

__all__ = [
    "Cgroup",
    "CgroupHost",
    "CgroupSpec",
    "CgroupStats",
    "detect",
    "remove_group",
    "sweep",
]

# Controllers we may report, in this order. "cpu" means "CPU time is measured".
_WANTED = ("memory", "pids", "cpu")
_UNIFIED = "unified"
# The v1 hierarchies we create directories in, by the controller that names them.
_V1_HIERARCHIES = ("memory", "pids", "cpuacct")

_KILL_TIMEOUT_S = 5.0
_RMDIR_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CgroupHost:
    """What :func:`detect` found; immutable and picklable."""

    version: CgroupVersion
    # The controllers we use that are available: a subset of ("memory", "pids", "cpu").
    controllers: tuple[str, ...] = ()
    # (controller or "unified", mount path) pairs we use. v2: (("unified", path),);
    # v1: ("memory", path), ("pids", path) and ("cpuacct", path) if mounted.
    roots: tuple[tuple[str, str], ...] = ()


_NO_CGROUPS = CgroupHost(CgroupVersion.NONE)


@dataclass(frozen=True)
class CgroupSpec:
    """One sandbox's cgroup: inert data, part of the immutable sandbox plan."""

    host: CgroupHost
    group: str  # daemon-wide parent name, e.g. "airlock-1a2b3c4d"
    name: str  # this sandbox, e.g. "sb-<hex id>"
    memory_bytes: int
    pids: int

    def __post_init__(self) -> None:
        _check_component("group", self.group)
        _check_component("name", self.name)
        if self.memory_bytes <= 0:
            raise ValueError(f"cgroup memory_bytes must be positive, not {self.memory_bytes}")
        if self.pids <= 0:
            raise ValueError(f"cgroup pids must be positive, not {self.pids}")


@dataclass(frozen=True)
class CgroupStats:
    peak_memory_bytes: int = 0
    oom_kills: int = 0
    pids_limit_hit: bool = False
    cpu_time_s: float = 0.0


# --- Detection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    path: str
    fstype: str
    read_only: bool
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \NNN.
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and set(digits) <= set("01234567"):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _cgroup_mounts(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            _Mount(
                path=_unescape(fields[4]),
                fstype=fstype,
                read_only="ro" in fields[5].split(","),
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return mounts


def _read_controllers(mount_path: str) -> set[str]:
    try:
        return set(_read(os.path.join(mount_path, "cgroup.controllers")).split())
    except SandboxError:
        return set()


def detect(mountinfo: str = "/proc/self/mountinfo") -> CgroupHost:
    """Which cgroup interface the host offers, from its mount table.

    v2 if a writable cgroup2 mount lists memory and pids in its ``cgroup.controllers``
    (a mount on /sys/fs/cgroup is tried first, then the others in mount order); else v1 if
    writable memory and pids v1 hierarchies are mounted; else NONE. The controller files
    are read below the mount points named in ``mountinfo``.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return _NO_CGROUPS
    mounts = [m for m in _cgroup_mounts(text) if not m.read_only]

    unified = [m for m in mounts if m.fstype == "cgroup2"]
    unified.sort(key=lambda m: m.path != "/sys/fs/cgroup")  # stable: keeps mount order otherwise
    for m in unified:
        available = _read_controllers(m.path)
        if {"memory", "pids"} <= available:
            # cpu.stat (usage_usec) is a core file: CPU time is measured with or without
            # the cpu controller.
            return CgroupHost(CgroupVersion.V2, _WANTED, ((_UNIFIED, m.path),))

    v1: dict[str, str] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for controller in _V1_HIERARCHIES:
            if controller in m.super_options and controller not in v1:
                v1[controller] = m.path
    if "memory" in v1 and "pids" in v1:
        controllers = ("memory", "pids", "cpu") if "cpuacct" in v1 else ("memory", "pids")
        roots = tuple((c, v1[c]) for c in _V1_HIERARCHIES if c in v1)
        return CgroupHost(CgroupVersion.V1, controllers, roots)
    return _NO_CGROUPS


# --- The live cgroup ------------------------------------------------------------------------


class Cgroup:
    """A live cgroup made from a :class:`CgroupSpec` (see :meth:`create`)."""

    __slots__ = ("_dirs", "spec")

    def __init__(self, spec: CgroupSpec, dirs: tuple[tuple[str, str], ...]) -> None:
        # Use create(); this only binds a spec to its directories, which may not exist.
        self.spec = spec
        self._dirs = dirs  # (root key, directory), one per root

    @classmethod
    def _of(cls, host: CgroupHost, group: str, name: str) -> Cgroup:
        """The (maybe existing) cgroup ``group/name``: for clean-up, limits unknown."""
        spec = CgroupSpec(host, group, name, 1, 1)
        return cls(spec, tuple((k, os.path.join(r, group, name)) for k, r in host.roots))

    @property
    def paths(self) -> tuple[str, ...]:
        """The cgroup's directories, one per hierarchy (none with version NONE)."""
        return _unique(d for _, d in self._dirs)

    def _dir(self, key: str) -> str | None:
        for k, d in self._dirs:
            if k == key:
                return d
        return None

    @classmethod
    def create(cls, spec: CgroupSpec) -> Cgroup:
        """Make the cgroup and set its limits; raise :class:`SandboxError` if that fails.

        The parent ``group`` is made if needed. A child that already exists is an error
        (sandbox names are unique: a leftover must be swept, never shared). On failure,
        the directories made for the child are removed again.
        """
        host = spec.host
        if host.version == CgroupVersion.NONE:
            return cls(spec, ())
        cg = cls(spec, tuple((k, os.path.join(r, spec.group, spec.name)) for k, r in host.roots))
        made: list[str] = []
        try:
            for root in _unique(r for _, r in host.roots):
                parent = os.path.join(root, spec.group)
                _mkdir(parent, exist_ok=True)
                if host.version == CgroupVersion.V2:
                    _enable_controllers(root, parent)
                child = os.path.join(parent, spec.name)
                _mkdir(child, exist_ok=False)
                made.append(child)
            cg._write_limits()
        except BaseException:
            for child in reversed(made):
                with contextlib.suppress(SandboxError):
                    _rmdir(child)
            raise
        return cg

    def _write_limits(self) -> None:
        spec = self.spec
        if spec.host.version == CgroupVersion.V2:
            d = self._dirs[0][1]
            _write(os.path.join(d, "memory.max"), str(spec.memory_bytes))
            swap = os.path.join(d, "memory.swap.max")  # absent without swap accounting
            if os.path.exists(swap):
                _write(swap, "0")
            _write(os.path.join(d, "pids.max"), str(spec.pids))
            return
        mem, pids = self._dir("memory"), self._dir("pids")
        assert mem is not None and pids is not None
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(spec.memory_bytes))
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")  # absent without swap accounting
        if os.path.exists(memsw):
            # Must stay >= memory.limit_in_bytes, which was just set: so memory + swap = memory.
            _write(memsw, str(spec.memory_bytes))
        _write(os.path.join(pids, "pids.max"), str(spec.pids))

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup, in every hierarchy."""
        for d in self.paths:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def stats(self) -> CgroupStats:
        """Peak memory, OOM kills, whether pids.max was hit and CPU time (module doc)."""
        version = self.spec.host.version
        if version == CgroupVersion.NONE:
            return CgroupStats()
        if version == CgroupVersion.V2:
            d = self._dirs[0][1]
            peak = _read_int_opt(os.path.join(d, "memory.peak"))
            if peak is None:
                peak = _read_int(os.path.join(d, "memory.current"))
            usec = _read_keyed(os.path.join(d, "cpu.stat")).get("usage_usec", 0)
            return CgroupStats(
                peak_memory_bytes=peak,
                oom_kills=_read_keyed(os.path.join(d, "memory.events")).get("oom_kill", 0),
                pids_limit_hit=_read_keyed(os.path.join(d, "pids.events")).get("max", 0) > 0,
                cpu_time_s=usec / 1e6,
            )
        mem, pids, cpuacct = self._dir("memory"), self._dir("pids"), self._dir("cpuacct")
        assert mem is not None and pids is not None
        oom = _read_keyed(os.path.join(mem, "memory.oom_control")).get("oom_kill")
        if oom is None:  # Linux < 4.13: no counter; the limit was hit (module doc)
            failcnt = _read_int_opt(os.path.join(mem, "memory.failcnt")) or 0
            memsw = _read_int_opt(os.path.join(mem, "memory.memsw.failcnt")) or 0
            oom = 1 if failcnt or memsw else 0
        ns = 0 if cpuacct is None else _read_int(os.path.join(cpuacct, "cpuacct.usage"))
        return CgroupStats(
            peak_memory_bytes=_read_int(os.path.join(mem, "memory.max_usage_in_bytes")),
            oom_kills=oom,
            pids_limit_hit=_read_keyed(os.path.join(pids, "pids.events")).get("max", 0) > 0,
            cpu_time_s=ns / 1e9,
        )

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty.

        v2 writes ``cgroup.kill`` (Linux 5.14+; this includes nested cgroups) and waits
        for ``cgroup.events`` to say ``populated 0``. Otherwise it reads ``cgroup.procs``
        and kills until that is empty. Raises :class:`SandboxError` if processes remain
        after a few seconds. A cgroup that does not exist (any more) is empty.
        """
        version = self.spec.host.version
        if version == CgroupVersion.NONE:
            return
        if version == CgroupVersion.V2:
            d = self._dirs[0][1]
            kill_file = os.path.join(d, "cgroup.kill")
            if os.path.exists(kill_file):
                _write(kill_file, "1")
                _wait_unpopulated(d)
                return
        _kill_procs(self.paths)

    def remove(self) -> None:
        """:meth:`kill`, then remove the cgroup's directories. Idempotent.

        Nested cgroups that the sandbox may have made are killed and removed too.
        """
        if self.spec.host.version == CgroupVersion.NONE:
            return
        self.kill()
        for d in self.paths:
            _remove_tree(d)


# --- Daemon-wide clean-up -------------------------------------------------------------------


def sweep(host: CgroupHost, group: str) -> int:
    """Kill and remove every cgroup left under ``group`` (by a daemon that crashed).

    Returns how many sandboxes' cgroups were removed; the parent ``group`` stays.
    Tries every one before raising :class:`SandboxError` for those that could not be removed.
    """
    _check_component("group", group)
    names: list[str] = []
    for root in _unique(r for _, r in host.roots):
        try:
            entries = list(os.scandir(os.path.join(root, group)))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _error("cannot list", os.path.join(root, group), e) from e
        names += [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    removed, failures = 0, []
    for name in _unique(sorted(names)):
        try:
            Cgroup._of(host, group, name).remove()
            removed += 1
        except SandboxError as e:
            failures.append(e.message)
    if failures:
        raise SandboxError("cgroup sweep failed: " + "; ".join(failures))
    return removed


def remove_group(host: CgroupHost, group: str) -> None:
    """:func:`sweep`, then remove the parent ``group`` itself (on clean daemon shutdown)."""
    sweep(host, group)
    for root in _unique(r for _, r in host.roots):
        _rmdir(os.path.join(root, group))


# --- Helpers --------------------------------------------------------------------------------


def _check_component(what: str, value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"cgroup {what} must be one path component, not {value!r}")


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _error(what: str, path: str, e: OSError) -> SandboxError:
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    return SandboxError(f"cgroup: {what} {path}: {code} ({e.strerror})")


def _mkdir(path: str, *, exist_ok: bool) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError as e:
        if not exist_ok:
            raise _error("cannot create (already exists)", path, e) from e
    except OSError as e:
        raise _error("cannot create", path, e) from e


def _write(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _error(f"cannot open for writing {value!r}:", path, e) from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise _error(f"cannot write {value!r} to", path, e) from e
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _error("cannot open", path, e) from e
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    except OSError as e:
        raise _error("cannot read", path, e) from e
    finally:
        os.close(fd)


def _read_int(path: str) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError:
        raise SandboxError(f"cgroup: {path} holds {text!r}, not a number") from None


def _read_int_opt(path: str) -> int | None:
    if not os.path.exists(path):
        return None
    return _read_int(path)


def _read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file ("key value" lines); {} if it does not exist."""
    if not os.path.exists(path):
        return {}
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _enable_controllers(root: str, parent: str) -> None:
    """v2: let ``parent``'s children use memory and pids (idempotent, one write)."""
    control = os.path.join(parent, "cgroup.subtree_control")
    try:
        _write(control, "+memory +pids")
    except SandboxError:
        # ENOENT: the root does not pass the controllers down yet. The root cgroup may hold
        # processes and still enable controllers for its children, so do that, then retry.
        if {"memory", "pids"} <= _read_controllers(parent):
            raise
        _write(os.path.join(root, "cgroup.subtree_control"), "+memory +pids")
        _write(control, "+memory +pids")


def _procs(d: str) -> set[int]:
    try:
        text = _read(os.path.join(d, "cgroup.procs"))
    except SandboxError:
        if not os.path.isdir(d):
            return set()
        raise
    return {int(p) for p in text.split()}


def _kill_once(pids: set[int], dirs: tuple[str, ...]) -> None:
    """SIGKILL those of ``pids`` that are still in ``dirs``; a pid may have been recycled.

    Each pid is first pinned with a pidfd, then the group is read again: a pid still in it
    now, after the pidfd was opened, belongs to our process, and that is the pinned one
    unless it has exited, in which case the signal does nothing.
    """
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise _error("cannot pidfd_open", f"pid {pid} of", e) from e
                fds[pid] = -1  # Linux < 5.3: no pidfds, fall back to kill(2)
        still: set[int] = set()
        for d in dirs:
            still |= _procs(d)
        for pid, fd in fds.items():
            if pid not in still:
                continue
            try:
                if fd < 0:
                    os.kill(pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)


def _kill_procs(dirs: tuple[str, ...]) -> None:
    """Kill every process in ``dirs`` until they are empty, for at most a few seconds."""
    deadline = time.monotonic() + _KILL_TIMEOUT_S
    pause = 0.0005
    while True:
        pids: set[int] = set()
        for d in dirs:
            pids |= _procs(d)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise SandboxError(
                f"cgroup: processes {sorted(pids)} still in {', '.join(dirs)} "
                f"after {_KILL_TIMEOUT_S:g} s of SIGKILL",
            )
        _kill_once(pids, dirs)
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _wait_unpopulated(d: str) -> None:
    """v2: wait until nothing runs in ``d`` or below, by polling ``cgroup.events``."""
    events = os.path.join(d, "cgroup.events")
    try:
        fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _error("cannot open", events, e) from e
    try:
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while True:
            text = os.pread(fd, 4096, 0).decode("ascii", "replace")
            if "populated 0" in text:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(
                    f"cgroup: {d} still populated {_KILL_TIMEOUT_S:g} s after cgroup.kill",
                )
            # cgroup.events raises POLLPRI when it changes; the timeout only bounds the wait.
            poller.poll(min(left, 0.05) * 1000)
    finally:
        os.close(fd)


def _rmdir(path: str) -> None:
    """Remove one cgroup directory, retrying briefly while the kernel still holds it busy."""
    deadline = time.monotonic() + _RMDIR_TIMEOUT_S
    pause = 0.0005
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error("cannot remove", path, e) from e
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _remove_tree(path: str) -> None:
    """Remove a cgroup directory; first kill and remove nested cgroups, deepest first."""
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise _error("cannot remove", path, e) from e
    try:
        subdirs = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    except OSError as e:
        raise _error("cannot list", path, e) from e
    for sub in subdirs:
        _kill_procs((sub,))
        _remove_tree(sub)
    _rmdir(path)
