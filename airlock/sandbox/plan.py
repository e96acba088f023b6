"""The sandbox plan: an immutable list of typed setup operations, built before anything runs.

As in bubblewrap, deciding *what* to do is kept apart from doing it. ``build_plan``
is pure: it turns a checked request, the caller's identity and the host's mount
table into a :class:`SandboxPlan`. The privileged code in ``contain`` only
executes plans, step by step, and names the failing step when one fails.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airlock._errors import ErrorData
from airlock.egress import EgressPolicy
from airlock.sandbox import _digest
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.cgroup import CgroupSpec
from airlock.sandbox.diff import DiffOptions, Layer

__all__ = [
    "Bind",
    "Devpts",
    "HostMount",
    "Mkdir",
    "Mknod",
    "MountOp",
    "Overlay",
    "PivotRoot",
    "PlanOnWire",
    "Proc",
    "ReadOnlyRebind",
    "RunSpec",
    "SandboxPlan",
    "SandboxSettings",
    "SandboxTemplate",
    "Symlink",
    "Sysfs",
    "Tmpfs",
    "build_run",
    "build_template",
    "parse_mountinfo",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# File systems that are kernel interfaces, not data: never overlaid, never diffed.
_PSEUDO_FS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "mqueue",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "nsfs",
        "efivarfs",
        "rpc_pipefs",
        "selinuxfs",
    }
)
# Kernel interfaces the sandbox replaces (never overlaid, never a workspace).
KERNEL_TREES = ("/proc", "/sys", "/dev")
# Characters overlayfs treats as separators in lowerdir=; such mount points are skipped.
_OVERLAY_UNSAFE = frozenset(",:\\\n")


# --- Operations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tmpfs:
    target: str
    options: str
    flags: int = sc.MS_NOSUID | sc.MS_NODEV


@dataclass(frozen=True)
class Overlay:
    """An overlayfs over the host directory ``lower``.

    A dry run's has an ``upper`` and a ``work`` directory in the scratch tmpfs, and writes
    land in the upper layer. Execute's has neither and is read-only; overlayfs then wants at
    least two lower layers, so ``base``, an empty directory of the scratch tmpfs, is the
    second. Either way the command sees the overlay's inodes, not the host's: a host Unix
    socket seen through one refuses connections (ECONNREFUSED), a host FIFO is another pipe.
    ``flags``: the mount's flags (``MS_RDONLY`` is added for Execute's); nosuid and nodev
    always, whatever the host mount's, so that no setuid file and no device node of a data
    file system works in a sandbox (its own ``/dev`` is a separate tmpfs).
    """

    target: str
    lower: str
    upper: str = ""
    work: str = ""
    base: str = ""
    flags: int = sc.MS_NOSUID | sc.MS_NODEV


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    readonly: bool = True
    # Execute's workspace: the (st_dev, st_ino) the request check found at ``source`` (a
    # resolved path). The supervisor opens ``source`` following no symbolic link and binds
    # it only if it is still that directory (``mnt.execute``).
    identity: tuple[int, int] | None = None
    # The bind's flags (``MS_RDONLY`` is added when ``readonly``): nosuid and nodev always, as
    # for overlays.
    flags: int = sc.MS_NOSUID | sc.MS_NODEV


@dataclass(frozen=True)
class ReadOnlyRebind:
    """Bind a path onto itself read-only (for example ``/proc/sys``); skipped if absent."""

    target: str


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Mknod:
    path: str
    major: int
    minor: int
    mode: int = 0o666


@dataclass(frozen=True)
class Symlink:
    target: str
    path: str


@dataclass(frozen=True)
class Proc:
    target: str


@dataclass(frozen=True)
class Sysfs:
    target: str


@dataclass(frozen=True)
class Devpts:
    target: str


@dataclass(frozen=True)
class PivotRoot:
    new_root: str


MountOp = Tmpfs | Overlay | Bind | ReadOnlyRebind | Mkdir | Mknod | Symlink | Proc | Sysfs | Devpts
InitOp = Proc | ReadOnlyRebind | PivotRoot


@dataclass(frozen=True)
class HostMount:
    """One entry of the host's mount table that matters to the sandbox."""

    path: str
    fstype: str
    # The mount root's file type (the ``stat.S_IFMT`` bits of its mode): a directory, a
    # bind-mounted file, socket, FIFO or device; 0 when root cannot stat it (a FUSE mount
    # without allow_other).
    file_type: int = stat.S_IFDIR
    # The mount root's permission bits and owner: an overlay's upper root must match them, or
    # the merged root would change (a 1777 /tmp would become 0755) and the diff would say so.
    mode: int = 0o755
    uid: int = 0
    gid: int = 0

    @property
    def is_dir(self) -> bool:
        return self.file_type == stat.S_IFDIR


@dataclass(frozen=True)
class SandboxSettings:
    """Daemon-wide settings a plan is built from (from ``DaemonConfig``)."""

    scratch_dir: str
    hidden_paths: tuple[str, ...]
    hostname: str = "airlock"
    bash: str = "/bin/bash"
    # Host paths no sandbox may reach through a read-write bind: the daemon's socket and its
    # state directory. Execute refuses a workspace that contains one (``mnt.workspace_conflict``)
    # when the request is checked, and the supervisor checks again as it binds it.
    protected_paths: tuple[str, ...] = ()


# Well-known sockets of services on this machine that act on the host when a client connects:
# container engines (docker, containerd, podman, CRI-O, cri-dockerd, k3s), snapd, systemd's
# private bus. Policy-independent data. In a dry run, each that is a socket in the sandbox's
# view (through its overlay, where a connect is refused) gets a listener of the supervisor's
# bound over it (``contain.prepare``), so that a connect is recorded (``netcap``).
HOST_SOCKETS: tuple[str, ...] = (
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/var/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/cri-dockerd.sock",
    "/var/run/cri-dockerd.sock",
    "/run/snapd.socket",
    "/run/systemd/private",
)


@dataclass(frozen=True)
class SandboxTemplate:
    """What every dry run of this daemon shares: namespaces, mounts, limits.

    A warm sandbox is built from a template before any request arrives; the
    request then only supplies a :class:`RunSpec`.
    """

    hostname: str
    namespaces: int
    scratch_dir: str
    scratch_bytes: int
    # Run by the supervisor, in the new mount namespace, before the command's init starts.
    host_setup: tuple[MountOp, ...]
    # Run by the sandbox's pid 1 in its own copy of the mount namespace.
    init_setup: tuple[InitOp, ...]
    layers: tuple[Layer, ...]
    # The cgroup's limits; its name is chosen per sandbox (``CgroupSpec.name`` is a prefix).
    cgroup: CgroupSpec
    # Record every process the command starts (seccomp notification on exec, and the
    # proc connector for forks and exits when ``proc_connector``: see sandbox/proctrace.py).
    trace_processes: bool = True
    proc_connector: bool = True
    # Record every network attempt through a sinkhole in the sandbox's own network namespace
    # (sandbox/netcap.py); without it the namespace has only an unroutable loopback.
    capture_network: bool = True
    # Classic BPF denying the system calls no command needs (sandbox/seccomp.py); empty: none.
    seccomp_program: bytes = b""
    # Execute only: the one host directory the command may change (bound read-write, with the
    # data mounts below it); every other directory mount is a read-only overlay, /tmp and
    # /var/tmp are private and empty. Empty: a dry run, where every directory mount is an
    # overlay whose changes are thrown away.
    writable: str = ""
    # What no read-write bind may contain (``SandboxSettings.protected_paths``).
    protected: tuple[str, ...] = ()
    # A dry run with network capture: the host sockets (``HOST_SOCKETS``) whose connections
    # the recorder takes, each that is a socket when the sandbox is prepared.
    host_sockets: tuple[str, ...] = ()
    # A dry run with read capture: the read recorder's fanotify group and marks are set up
    # with the sandbox (sandbox/reads.py); the request brings the globs.
    watch_reads: bool = False

    @property
    def key(self) -> bytes:
        """Identifies the template: a warm sandbox serves only requests with its key."""
        return _digest.sha256(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@dataclass(frozen=True)
class RunSpec:
    """What one request adds: the command, who runs it, where, for how long."""

    sandbox_id: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    timeout_s: float
    output_bytes: int
    diff: DiffOptions
    # Opens of files matching these globs are recorded (sandbox/reads.py); "~" is ``home``.
    sensitive_globs: tuple[str, ...] = ()
    home: str = ""
    # Where the supervisor saves the changes (contents and the host's state before them) for a
    # later Apply; empty: do not keep them (sandbox/changeset.py).
    keep_changes_dir: str = ""
    keep_changes_bytes: int = 256 * 1024**2
    # Past this many changes they are not kept: saving costs ~40 ms per 1,000 on the
    # request's path, and such runs are better repeated with Execute than reviewed.
    keep_changes_max: int = 2000
    # What the run may reach for real (airlock/egress.py; the policy's egress for the mode):
    # None or a policy without grants, nothing. Forwarding needs the read recorder
    # (``sensitive_globs``) for its taint rule. ``test_resolve``: names the upstream side
    # resolves to these addresses instead of asking the host's resolver (tests only).
    egress: EgressPolicy | None = None
    test_resolve: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class ApplyPlan:
    """Apply: write a kept changeset to the host as its validation's user (sandbox/contain.py)."""

    changeset_dir: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    # The paths whose special files (setuid, setgid, capabilities, FIFOs, sockets) the
    # validation's approval names: Apply writes no other (sandbox/apply.py).
    approved_special: tuple[bytes, ...] = ()
    # Never a warm sandbox's key: an apply always goes to a fresh supervisor.
    template_key: bytes = b""
    # The apply journal's token (sandbox/apply.py write_journal): names its temporary entries.
    token: bytes = b""
    # At start-up: roll an apply a crash interrupted forward or back (sandbox/apply.py recover).
    recover: bool = False


@dataclass(frozen=True)
class ApplyReply:
    """What the apply supervisor sends back: the result, or the error to raise.

    The error travels as data (``airlock._errors.error_to_data``); the daemon raises
    ``error_from_data(error)``.
    """

    result: Any = None  # airlock.sandbox.apply.ApplyResult
    error: ErrorData | None = None


@dataclass(frozen=True)
class SandboxPlan:
    """Everything the privileged code will do for one dry run, decided in advance."""

    template: SandboxTemplate
    run: RunSpec
    template_key: bytes


@dataclass(frozen=True)
class PlanOnWire:
    """A :class:`SandboxPlan` as the spawner's client sends it to a supervisor.

    The template stays a pickle (``_wire.dumps``, made once per template by the daemon):
    a warm sandbox already holds the template of its key and never unpickles it; a cold
    supervisor does."""

    template_key: bytes
    run: RunSpec
    template: bytes


# --- Host mount table -------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \NNN.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Entry:
    """One line of mountinfo: the mount's id, the id of the mount it sits on, where, what."""

    id: int
    parent: int
    path: str
    fstype: str


def _entries(text: str) -> list[_Entry]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields) or not (fields[0] + fields[1]).isdigit():
            continue
        out.append(_Entry(int(fields[0]), int(fields[1]), _unescape(fields[4]), fields[sep + 1]))
    return out


def _depth_order(path: str) -> tuple[int, str]:
    return path.count("/"), path


def _visible(entries: list[_Entry]) -> list[_Entry]:
    """The mount one sees at each mount point, found on the mount tree, parents first.

    mountinfo lists mounts by id, not by stacking (after ``mount --move`` onto a busy mount
    point the top mount comes first), so the order of lines decides nothing. A mount is seen
    if it sits (its parent id) on the mount seen at the nearest mount point above its path,
    or on a mount stacked at its own path that is seen; of a stack, the one nothing sits on
    is on top. A mount whose parent is not in the table is a root (a chroot's, a container's).
    A mount under a mount point that something else now covers is not seen at all.
    """
    ids = {e.id for e in entries}
    by_path: dict[str, list[_Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    seen: dict[str, _Entry] = {}
    for path in sorted(by_path, key=_depth_order):
        here = by_path[path]
        below: _Entry | None = None
        up = path
        while up != "/" and below is None:
            up = posixpath.dirname(up)
            below = seen.get(up)
        starts = [
            e
            for e in here
            if e.parent not in ids
            or e.parent == e.id
            or (below is not None and e.parent == below.id)
        ]
        if not starts:
            continue  # mounted on something that is covered now
        top, climbed = starts[-1], {starts[-1].id}
        while above := [e for e in here if e.parent == top.id and e.id not in climbed]:
            top = above[-1]
            climbed.add(top.id)
        seen[path] = top
    return list(seen.values())


def parse_mountinfo(
    text: str, inspect: Callable[[str], tuple[int, int, int, int]] | None = None
) -> tuple[HostMount, ...]:
    """The mounts of the host one sees, one per mount point (the top of a stack), parents first.

    ``inspect(path)`` returns (file type, mode, uid, gid) of the mount's root (see
    :class:`HostMount`). ``text`` is mountinfo decoded with ``surrogateescape``, so a mount
    point that is not UTF-8 keeps its bytes (``os.fsencode`` gives them back).
    """
    return tuple(
        HostMount(path, fstype, *(inspect(path) if inspect else ()))
        for path, fstype in _visible_mounts(text)
    )


@functools.lru_cache(maxsize=8)
def _visible_mounts(text: str) -> tuple[tuple[str, str], ...]:
    """(mount point, file system type) of each mount seen, for one mountinfo text.

    Remembered: the daemon reads mountinfo for every request (a mount may come or go at any
    time) and the text rarely changes, while parsing it was half of the daemon's own CPU per
    dry run (2 ms of ~3.9 for 21 mounts; more on a host with hundreds). The roots are still
    inspected per call (a mode or owner can change without a mount)."""
    return tuple((e.path, e.fstype) for e in _visible(_entries(text)))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# --- Building ---------------------------------------------------------------------------------


_PRIVATE_TMP = ("/tmp", "/var/tmp")
# The host mounts' root file types the sandbox shows: directories (overlaid), bind-mounted
# files, and mounts root cannot stat (bound read-only, see HostMount.file_type). Never a socket,
# FIFO or device: bound into a sandbox, a host socket (a CI job's /var/run/docker.sock) would
# stay connectable; left out, the sandbox sees the mount point beneath it instead.
_SHOWN_TYPES = frozenset({stat.S_IFDIR, stat.S_IFREG, 0})


def _at(root: str, path: str) -> str:
    """Where the supervisor mounts what the command sees at ``path``."""
    return root if path == "/" else root + path


def _shown(mount: HostMount, scratch: str) -> bool:
    """Whether the sandbox shows this host mount (a data mount; see _SHOWN_TYPES)."""
    return (
        mount.fstype not in _PSEUDO_FS
        and not any(_under(mount.path, k) for k in KERNEL_TREES)
        and not _under(mount.path, scratch)
        and not (_OVERLAY_UNSAFE & set(mount.path))
        and mount.file_type in _SHOWN_TYPES
    )


def _lost_mount_points(
    mounts: list[HostMount], host: dict[str, HostMount], region: str
) -> dict[str, list[str]]:
    """Stand-ins for left-out mounts that shown ones sit on: {stand-in path: directories}.

    A shown mount sits on the mount at the nearest mount point above it. If the sandbox
    leaves that one out (an autofs map under NFS homes, /net), the overlay above shows only
    the empty directory the left-out mount covers, and the mount point is missing (mount(2):
    ENOENT). An empty read-only tmpfs then stands in for the outermost left-out mount, with a
    directory for each mount point below it. Only mount points strictly below ``region``
    count (Execute's workspace: the workspace's bind provides the others; "" for all).
    """
    lost: dict[str, list[str]] = {}
    shown = {m.path for m in mounts}
    for mount in mounts:
        above = [a for a in _ancestors(mount.path, region) if a in host]
        if not above or above[0] in shown:
            continue  # it sits on a shown mount (or on the workspace's bind)
        stand_in = list(itertools.takewhile(lambda a: a not in shown, above))[-1]
        made = lost.setdefault(stand_in, [])
        path = stand_in
        for part in mount.path[len(stand_in.rstrip("/")) + 1 :].split("/"):
            path = f"{path.rstrip('/')}/{part}"
            if path not in made:
                made.append(path)
    return lost


def _ancestors(path: str, region: str) -> list[str]:
    """The directories above ``path``, nearest first, strictly below ``region`` if given."""
    out, up = [], path
    while up != "/":
        up = posixpath.dirname(up)
        if region and (up == region or not _under(up, region)):
            break
        out.append(up)
    return out


def _stand_in_ops(root: str, mount: HostMount, dirs: list[str]) -> list[MountOp]:
    options = f"mode={mount.mode:o},uid={mount.uid},gid={mount.gid},size=16k"
    ops: list[MountOp] = [Tmpfs(_at(root, mount.path), options, sc.MS_NOSUID | sc.MS_NODEV)]
    ops += [Mkdir(root + d, 0o755) for d in dirs]
    ops.append(ReadOnlyRebind(_at(root, mount.path)))  # read-only once the mount points exist
    return ops


def _mounts_with_points(
    root: str,
    mounts: list[HostMount],
    host: dict[str, HostMount],
    region: str,
    mount_ops: Callable[[HostMount], list[MountOp]],
) -> list[MountOp]:
    """``mount_ops(m)`` for each mount in order, each after the stand-in it needs, if any."""
    lost = _lost_mount_points(mounts, host, region)
    ops: list[MountOp] = []
    for mount in mounts:
        for stand_in in [s for s in lost if _under(mount.path, s)]:
            ops += _stand_in_ops(root, host[stand_in], lost.pop(stand_in))
        ops += mount_ops(mount)
    return ops


def _writable_ops(
    root: str,
    writable: str,
    below: list[HostMount],
    host: dict[str, HostMount],
    identity: tuple[int, int] | None = None,
    extra: tuple[tuple[str, tuple[int, int]], ...] = (),
) -> list[MountOp]:
    """Execute: the workspace bound read-write, with the data mounts below it, and private,
    empty /tmp and /var/tmp that nothing covers; before the workspace, the ``extra``
    directories the policy grants (package caches: each bound only if it is still the
    directory its identity names), but none inside the workspace or a private tmp.

    A private tmp that contains the workspace comes first (the workspace's mount point is
    made inside it); one below the workspace comes after it (cwd / or /var must not uncover
    the host's /var/tmp). The data mounts below the workspace are bound again on top of its
    bind (a non-recursive bind shows only the workspace's own file system), read-write if
    directories, read-only if files, as the dry run overlays or binds them.
    """

    def private_tmp(tmp: str) -> list[MountOp]:
        ops: list[MountOp] = [Tmpfs(root + tmp, "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV)]
        if _under(writable, tmp) and writable != tmp:
            path = tmp
            for part in writable[len(tmp) + 1 :].split("/"):
                path = f"{path}/{part}"
                ops.append(Mkdir(root + path, 0o755))
        return ops

    def rebind(mount: HostMount) -> list[MountOp]:
        return [Bind(mount.path, _at(root, mount.path), readonly=not mount.is_dir)]

    after = [t for t in _PRIVATE_TMP if _under(t, writable) and t != writable]
    ops: list[MountOp] = []
    for tmp in _PRIVATE_TMP:
        if tmp not in after:
            ops += private_tmp(tmp)
    for path, extra_identity in extra:
        if _under(path, writable) or any(_under(path, t) for t in _PRIVATE_TMP):
            continue
        ops.append(Bind(path, _at(root, path), readonly=False, identity=extra_identity))
    ops.append(Bind(writable, _at(root, writable), readonly=False, identity=identity))
    ops += _mounts_with_points(root, below, host, writable, rebind)
    for tmp in after:
        ops += private_tmp(tmp)
    return ops


def _dev_ops(root: str) -> list[MountOp]:
    dev = root + "/dev"
    ops: list[MountOp] = [Tmpfs(dev, "mode=755,size=64k", sc.MS_NOSUID)]
    for name, major, minor in (
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ):
        ops.append(Mknod(f"{dev}/{name}", major, minor))
    ops += [
        Mkdir(f"{dev}/pts"),
        Devpts(f"{dev}/pts"),
        Symlink("pts/ptmx", f"{dev}/ptmx"),
        Mkdir(f"{dev}/shm", 0o1777),
        Tmpfs(f"{dev}/shm", "mode=1777,size=64m"),
        Symlink("/proc/self/fd", f"{dev}/fd"),
        Symlink("/proc/self/fd/0", f"{dev}/stdin"),
        Symlink("/proc/self/fd/1", f"{dev}/stdout"),
        Symlink("/proc/self/fd/2", f"{dev}/stderr"),
    ]
    return ops


def build_template(
    *,
    settings: SandboxSettings,
    scratch_bytes: int,
    cgroup: CgroupSpec,
    host_mounts: tuple[HostMount, ...],
    trace_processes: bool = True,
    proc_connector: bool = True,
    capture_network: bool = True,
    seccomp_program: bytes = b"",
    writable: str = "",
    writable_identity: tuple[int, int] | None = None,
    extra_writable: tuple[tuple[str, tuple[int, int]], ...] = (),
    watch_reads: bool = False,
) -> SandboxTemplate:
    """Decide every set-up step shared by this daemon's dry runs (or, with ``writable``, of
    an Execute in that directory). Pure.

    Every data mount of the host the sandbox shows (``_shown``), parents first: a directory
    becomes an overlay (a dry run's writable one, whose upper layer is diffed; Execute's
    read-only one), a bind-mounted file a read-only bind. Then Execute's workspace and
    private tmp dirs, /dev, /sys, and the hidden paths, last, so that nothing covers them.
    ``writable_identity``: the workspace's (st_dev, st_ino) as the request check found it;
    the workspace is bound only if the directory at ``writable`` is still that one.
    ``extra_writable``: Execute's other read-write directories (the policy's filesystem
    grants, resolved as the caller), each with its identity.
    """
    scratch = settings.scratch_dir
    root = f"{scratch}/root"
    base = f"{scratch}/empty"  # Execute: the second, empty lower layer of its overlays
    ops: list[MountOp] = [Tmpfs(scratch, f"mode=700,size={scratch_bytes}"), Mkdir(root, 0o755)]
    if writable:
        ops.append(Mkdir(base, 0o755))
    layers: list[Layer] = []
    host = {m.path: m for m in host_mounts}
    shown = [m for m in host_mounts if _shown(m, scratch)]
    index = {m.path: i for i, m in enumerate(shown)}

    def show(mount: HostMount) -> list[MountOp]:
        target = _at(root, mount.path)
        if not mount.is_dir:  # a bind-mounted file, or one root cannot stat: read-only
            return [Bind(mount.path, target)]
        if writable:  # Execute: read-only, and no host socket answers through it
            return [Overlay(target, mount.path, base=base)]
        upper, work = f"{scratch}/u{index[mount.path]}", f"{scratch}/w{index[mount.path]}"
        layers.append(Layer(os.fsencode(mount.path), os.fsencode(upper), os.fsencode(mount.path)))
        return [
            Mkdir(upper, mount.mode, mount.uid, mount.gid),
            Mkdir(work, 0o700),
            Overlay(target, mount.path, upper, work),
        ]

    ops += _mounts_with_points(root, shown, host, "", show)

    if writable:
        # The mounts below the workspace, but not those a private tmp or a hidden path covers.
        covered = [t for t in _PRIVATE_TMP if _under(t, writable) and t != writable]
        covered += settings.hidden_paths
        below = [
            m
            for m in shown
            if _under(m.path, writable)
            and m.path != writable
            and not any(_under(m.path, c) for c in covered)
        ]
        ops += _writable_ops(root, writable, below, host, writable_identity, extra_writable)
    ops += _dev_ops(root)
    ops.append(Sysfs(root + "/sys"))
    for hidden in settings.hidden_paths:
        if writable and any(
            _under(hidden, tmp)
            and (not _under(hidden, writable) or (_under(tmp, writable) and tmp != writable))
            for tmp in _PRIVATE_TMP
        ):
            continue  # Execute's private tmp already hides it
        ops.append(
            Tmpfs(root + hidden, "mode=755,size=4k", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_RDONLY)
        )

    init_ops: list[InitOp] = [Proc(root + "/proc")]
    init_ops += [
        ReadOnlyRebind(root + p)
        for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
    ]
    init_ops.append(PivotRoot(root))
    return SandboxTemplate(
        hostname=settings.hostname,
        namespaces=sc.CLONE_NEWNS
        | sc.CLONE_NEWPID
        | sc.CLONE_NEWNET
        | sc.CLONE_NEWIPC
        | sc.CLONE_NEWUTS,
        scratch_dir=scratch,
        scratch_bytes=scratch_bytes,
        host_setup=tuple(ops),
        init_setup=tuple(init_ops),
        layers=tuple(layers),
        cgroup=cgroup,
        trace_processes=trace_processes,
        proc_connector=proc_connector,
        capture_network=capture_network,
        seccomp_program=seccomp_program,
        writable=writable,
        protected=settings.protected_paths,
        host_sockets=HOST_SOCKETS if capture_network and not writable else (),
        watch_reads=watch_reads and not writable,
    )


def build_run(
    *,
    sandbox_id: str,
    command: str,
    cwd: str,
    env: tuple[tuple[str, str], ...],
    uid: int,
    gid: int,
    groups: tuple[int, ...],
    timeout_s: float,
    output_bytes: int,
    diff_options: DiffOptions,
    settings: SandboxSettings,
    sensitive_globs: tuple[str, ...] = (),
    home: str = "",
) -> RunSpec:
    """Decide what one request runs. Pure."""
    env_dict = dict(env)
    env_dict.setdefault("PATH", DEFAULT_PATH)
    return RunSpec(
        sandbox_id=sandbox_id,
        argv=(settings.bash, "-c", command),
        env=tuple(sorted(env_dict.items())),
        cwd=posixpath.normpath(cwd),
        uid=uid,
        gid=gid,
        groups=groups,
        timeout_s=timeout_s,
        output_bytes=output_bytes,
        diff=diff_options,
        sensitive_globs=sensitive_globs,
        home=home,
    )
