"""The sandbox plan: an immutable list of typed setup operations, built before anything runs.

As in bubblewrap, deciding *what* to do is kept apart from doing it. ``build_plan``
is pure: it turns a checked request, the caller's identity and the host's mount
table into a :class:`SandboxPlan`. The privileged code in ``contain`` only
executes plans, step by step, and names the failing step when one fails.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    target: str
    lower: str
    upper: str
    work: str


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    readonly: bool = True


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
    is_dir: bool = True
    # The mount root's permission bits and owner: an overlay's upper root must match them, or
    # the merged root would change (a 1777 /tmp would become 0755) and the diff would say so.
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class SandboxSettings:
    """Daemon-wide settings a plan is built from (from ``DaemonConfig``)."""

    scratch_dir: str
    hidden_paths: tuple[str, ...]
    hostname: str = "airlock"
    bash: str = "/bin/bash"


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
    # Execute only: the one host directory the command may change (bound read-write); every
    # other file system is a read-only bind, /tmp and /var/tmp are private and empty. Empty:
    # a dry run, where every file system is an overlay whose changes are thrown away.
    writable: str = ""

    @property
    def key(self) -> bytes:
        """Identifies the template: a warm sandbox serves only requests with its key."""
        return hashlib.sha256(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)).digest()


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


@dataclass(frozen=True)
class ApplyPlan:
    """Apply: write a kept changeset to the host as its validation's user (sandbox/contain.py)."""

    changeset_dir: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    # Never a warm sandbox's key: an apply always goes to a fresh supervisor.
    template_key: bytes = b""


@dataclass(frozen=True)
class ApplyReply:
    """What the apply supervisor sends back: the result, or the error to raise."""

    result: Any = None  # airlock.apply.ApplyResult
    error_class: str = ""  # the name of an airlock._errors class
    message: str = ""
    reason: str = ""
    paths: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class SandboxPlan:
    """Everything the privileged code will do for one dry run, decided in advance."""

    template: SandboxTemplate
    run: RunSpec
    template_key: bytes


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


def parse_mountinfo(
    text: str, inspect: Callable[[str], tuple[bool, int, int, int]] | None = None
) -> tuple[HostMount, ...]:
    """The mounts of the host, parents before children, last mount on a path winning.

    ``inspect(path)`` returns (is_dir, mode, uid, gid) of the mount's root.
    """
    by_path: dict[str, HostMount] = {}
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        path, fstype = _unescape(fields[4]), fields[sep + 1]
        by_path.pop(path, None)  # a later mount on the same point hides the earlier one
        by_path[path] = HostMount(path, fstype, *(inspect(path) if inspect else ()))
    return tuple(sorted(by_path.values(), key=lambda m: (m.path.count("/"), m.path)))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# --- Building ---------------------------------------------------------------------------------


_PRIVATE_TMP = ("/tmp", "/var/tmp")


def _writable_ops(root: str, writable: str) -> list[MountOp]:
    """Execute: private, empty /tmp and /var/tmp, then the workspace bound read-write on top.

    A workspace below a private tmp needs its mount point made inside that tmpfs.
    """
    ops: list[MountOp] = []
    for tmp in _PRIVATE_TMP:
        ops.append(Tmpfs(root + tmp, "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV))
        if _under(writable, tmp) and writable != tmp:
            path = tmp
            for part in writable[len(tmp) + 1 :].split("/"):
                path = f"{path}/{part}"
                ops.append(Mkdir(root + path, 0o755))
    ops.append(Bind(writable, root + writable, readonly=False))
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
) -> SandboxTemplate:
    """Decide every set-up step shared by this daemon's dry runs (or, with ``writable``, of
    an Execute in that directory). Pure."""
    scratch = settings.scratch_dir
    root = f"{scratch}/root"
    ops: list[MountOp] = [Tmpfs(scratch, f"mode=700,size={scratch_bytes}")]
    layers: list[Layer] = []

    data_mounts = [
        m
        for m in host_mounts
        if m.fstype not in _PSEUDO_FS
        and not any(_under(m.path, k) for k in KERNEL_TREES)
        and not _under(m.path, scratch)
        and not (_OVERLAY_UNSAFE & set(m.path))
    ]
    ops.append(Mkdir(root, 0o755))
    for index, mount in enumerate(data_mounts):
        target = root if mount.path == "/" else root + mount.path
        upper, work = f"{scratch}/u{index}", f"{scratch}/w{index}"
        if not mount.is_dir or writable:  # a bind-mounted file, or Execute: read-only
            ops.append(Bind(mount.path, target))
            continue
        ops += [Mkdir(upper, mount.mode, mount.uid, mount.gid), Mkdir(work, 0o700)]
        ops.append(Overlay(target, mount.path, upper, work))
        layers.append(Layer(os.fsencode(mount.path), os.fsencode(upper), os.fsencode(mount.path)))

    if writable:
        ops += _writable_ops(root, writable)
    ops += _dev_ops(root)
    ops.append(Sysfs(root + "/sys"))
    for hidden in settings.hidden_paths:
        hidden_by_tmp = any(_under(hidden, tmp) for tmp in _PRIVATE_TMP)
        if writable and hidden_by_tmp and not _under(hidden, writable):
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
