"""Golden and property tests of the pure sandbox planner (airlock/sandbox/plan.py).

The planner turns the host's mount table into the steps that build a sandbox; the threat model
(docs/threat-model.md) leans on it for "every data mount of the host is the read-only lower
layer of an overlayfs", for /proc, /sys and /dev being replaced rather than copied, and for the
daemon's state directory being hidden. Nothing here touches the live mount table or the kernel:
the host is a fixed mountinfo text in ``data/`` plus a fake ``inspect`` (the seam
``parse_mountinfo`` offers for the ``stat`` of each mount's root), so the tests run as any user.

Goldens: ``data/<host>.mounts.golden`` (the parsed table and what each plan does with each
mount), ``data/<host>.dry.golden`` and ``data/<host>.execute.golden`` (one line per step).
Regenerate with ``AIRLOCK_UPDATE_GOLDEN=1 pytest tests/unit/sandbox``, then review the diff line
by line: a golden is only as good as its review.

Each property is a ``check_*`` function used on every fixture; ``test_checks_catch_*`` feed them
deliberately broken plans, so a check that cannot fail shows up as a failing test.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox.cgroup import CgroupHost, CgroupSpec
from airlock.sandbox.diff import DiffOptions, Layer
from airlock.sandbox.plan import (
    DEFAULT_PATH,
    HOST_SOCKETS,
    KERNEL_TREES,
    Bind,
    Devpts,
    HostMount,
    Mkdir,
    Mknod,
    Overlay,
    PivotRoot,
    Proc,
    ReadOnlyRebind,
    RunSpec,
    SandboxSettings,
    SandboxTemplate,
    Symlink,
    Sysfs,
    Tmpfs,
    build_run,
    build_template,
    parse_mountinfo,
)
from airlock.types import CgroupVersion

DATA = Path(__file__).resolve().parent / "data"
UPDATE_GOLDEN = os.environ.get("AIRLOCK_UPDATE_GOLDEN") == "1"

# As the engine builds them from the default DaemonConfig (airlock/core/engine.py):
# scratch_dir = state_dir/scratch, hidden_paths = (state_dir,),
# protected_paths = (socket_path, state_dir).
STATE_DIR = "/var/lib/airlock"
SCRATCH = f"{STATE_DIR}/scratch"
ROOT = f"{SCRATCH}/root"
DAEMON_SOCKET = "/run/airlock/airlock.sock"  # the daemon's and the client's default
SETTINGS = SandboxSettings(
    scratch_dir=SCRATCH, hidden_paths=(STATE_DIR,), protected_paths=(DAEMON_SOCKET, STATE_DIR)
)
SCRATCH_BYTES = 1 << 30
CGROUP = CgroupSpec(
    host=CgroupHost(CgroupVersion.V2, ("memory", "pids"), (("unified", "/sys/fs/cgroup"),)),
    group="airlock-0123456789ab",
    name="sb",
    memory_bytes=1 << 30,
    pids=512,
)
SECCOMP = b"\x20\x00\x00\x00\x04\x00\x00\x00"  # any bytes: the planner only carries them

# The mounts a plan makes, and the sandbox's own kernel file systems among them.
MOUNT_OPS = (Tmpfs, Overlay, Bind, Proc, Sysfs, Devpts)
FRESH_KERNEL_FS = (Proc, Sysfs, Tmpfs, Devpts)
DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
READ_ONLY_PROC = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
PRIVATE_TMP = ("/tmp", "/var/tmp")
ALL_NAMESPACES = (
    sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
)
CLONE_NEWUSER = 0x10000000


# --- The fixture hosts --------------------------------------------------------------------------


Stat = tuple[int, int, int, int]  # what inspect(path) returns: file type, mode, uid, gid
DIR: Stat = (S_IFDIR, 0o755, 0, 0)
# What airlock.sandbox.mnt._inspect returns when root cannot stat the mount's root (a FUSE
# mount without allow_other, such as gvfs and the document portal): no file type.
UNSTATABLE: Stat = (0, 0o755, 0, 0)


@dataclass(frozen=True)
class Host:
    """A fixture host: its mountinfo file, the stat of mount roots, and the expected verdicts.

    ``data`` and ``files`` are an oracle written by hand, not derived from the planner: the
    host mounts a plan must carry into the sandbox (directories as overlays, bind-mounted
    regular files and mounts root cannot stat as read-only binds). Every other mount must be
    left out: kernel interfaces, and sockets, FIFOs and devices (a socket stays connectable
    through a bind, even a read-only one).
    """

    name: str
    workspace: str  # Execute's working directory (bound read-write)
    data: frozenset[str]
    files: frozenset[str] = frozenset()
    stat: dict[str, Stat] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return (DATA / f"{self.name}.mountinfo").read_text(encoding="utf-8")

    def inspect(self, path: str) -> Stat:
        return self.stat.get(path, DIR)

    def mounts(self) -> tuple[HostMount, ...]:
        return parse_mountinfo(self.text, self.inspect)

    def __str__(self) -> str:
        return self.name


HOSTS = (
    # This VM's own /proc/self/mountinfo, as a fixed text: one data mount, stacked /dev/pts and
    # /dev/shm, cgroup v1 hierarchies under a tmpfs in /sys, kernel trees listed before /.
    Host(name="debian-vm", workspace="/home/alice/src", data=frozenset({"/"})),
    # A systemd desktop on btrfs subvolumes: /home, /var and the daemon's state directory are
    # subvolumes, /srv/www is a bind of a directory of /home, /tmp and /run are tmpfs, /boot/efi
    # an automount (autofs with vfat stacked on it), FUSE mounts root cannot stat, a snap.
    Host(
        name="workstation-btrfs",
        workspace="/home/alice/src",
        data=frozenset(
            {
                "/",
                "/boot",
                "/boot/efi",
                "/home",
                "/run",
                "/run/credentials/systemd-sysctl.service",
                "/run/lock",
                "/run/user/1000",
                "/snap/core22/1380",
                "/srv/www",
                "/tmp",
                "/var",
                "/var/lib/airlock",
            }
        ),
        files=frozenset({"/run/user/1000/gvfs", "/run/user/1000/doc"}),
        stat={
            "/boot/efi": (S_IFDIR, 0o700, 0, 0),
            "/tmp": (S_IFDIR, 0o1777, 0, 0),
            "/var/lib/airlock": (S_IFDIR, 0o700, 0, 0),
            "/run/credentials/systemd-sysctl.service": (S_IFDIR, 0o700, 0, 0),
            "/run/user/1000": (S_IFDIR, 0o700, 1000, 1000),
            "/run/user/1000/gvfs": UNSTATABLE,
            "/run/user/1000/doc": UNSTATABLE,
            "/srv/www": (S_IFDIR, 0o2775, 1000, 33),
        },
    ),
    # Airlock in a CI job container: overlay root, files bound in by Docker, the Docker socket
    # bound in, Docker's masks over /proc and /sys, the state directory on a volume with a tmpfs
    # the operator mounted for the scratch space.
    Host(
        name="ci-container",
        workspace="/builds/group/project",
        data=frozenset({"/", "/builds", "/cache", "/var/lib/airlock"}),
        files=frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}),  # not docker.sock
        stat={
            "/etc/hostname": (S_IFREG, 0o644, 0, 0),
            "/etc/hosts": (S_IFREG, 0o644, 0, 0),
            "/etc/resolv.conf": (S_IFREG, 0o644, 0, 0),
            "/run/docker.sock": (S_IFSOCK, 0o660, 0, 998),
            # Docker's masks: /dev/null bound over files of /proc.
            "/proc/kcore": (S_IFCHR, 0o666, 0, 0),
            "/proc/keys": (S_IFCHR, 0o666, 0, 0),
            "/proc/timer_list": (S_IFCHR, 0o666, 0, 0),
            "/proc/sysrq-trigger": (S_IFREG, 0o200, 0, 0),
            "/builds": (S_IFDIR, 0o777, 0, 0),
            "/var/lib/airlock": (S_IFDIR, 0o700, 0, 0),
        },
    ),
    # An enterprise host: NFS homes under an autofs indirect map, /net -hosts with an offset
    # mount, a direct automount, sshfs, CIFS, gvfs, rpc_pipefs and nfsd.
    Host(
        name="nfs-autofs",
        workspace="/home/alice/project",
        data=frozenset(
            {
                "/",
                "/boot",
                "/home/alice",
                "/home/bob",
                "/mnt/archive",
                "/mnt/share",
                "/mnt/sshfs",
                "/net/fs1.example.com/export",
                "/run",
                "/run/user/1000",
                "/var",
            }
        ),
        files=frozenset({"/run/user/1000/gvfs"}),
        stat={
            "/home/alice": (S_IFDIR, 0o700, 1000, 1000),
            "/home/bob": (S_IFDIR, 0o700, 1001, 1001),
            "/mnt/sshfs": (S_IFDIR, 0o755, 1000, 1000),
            "/run/user/1000": (S_IFDIR, 0o700, 1000, 1000),
            "/run/user/1000/gvfs": UNSTATABLE,
        },
    ),
    # Mount points with escaped characters (space, tab, newline, backslash), overlayfs
    # separators (comma, colon), UTF-8, a dash as a path component and as the source, and three
    # mounts stacked on /srv/stack.
    Host(
        name="odd-paths",
        workspace="/media/alice/My Disk/work",
        data=frozenset(
            {
                "/",
                "/media/alice/My Disk",
                "/media/alice/My Disk/photos (2024)",
                "/run",
                "/srv/-",
                "/srv/dash - name",
                "/srv/stack",
                "/srv/tab\tname",
                "/srv/Фото",
            }
        ),
        stat={"/media/alice/My Disk": (S_IFDIR, 0o755, 1000, 1000)},
    ),
)
HOST_BY_NAME = {h.name: h for h in HOSTS}


def dry_template(host: Host, settings: SandboxSettings = SETTINGS) -> SandboxTemplate:
    return build_template(
        settings=settings,
        scratch_bytes=SCRATCH_BYTES,
        cgroup=CGROUP,
        host_mounts=host.mounts(),
        seccomp_program=SECCOMP,
    )


def execute_template(
    host: Host, workspace: str | None = None, settings: SandboxSettings = SETTINGS
) -> SandboxTemplate:
    # As Engine.execute_plan: the same builder with writable=cwd; the engine turns the network
    # capture off for Execute.
    return build_template(
        settings=settings,
        scratch_bytes=SCRATCH_BYTES,
        cgroup=dataclasses.replace(CGROUP, name="ex"),
        host_mounts=host.mounts(),
        capture_network=False,
        seccomp_program=SECCOMP,
        writable=host.workspace if workspace is None else workspace,
    )


# --- Reading a plan -----------------------------------------------------------------------------


def under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def in_sandbox(path: str) -> str:
    """Where the supervisor mounts what the command will see at ``path``."""
    return ROOT if path == "/" else ROOT + path


def steps(t: SandboxTemplate) -> list[object]:
    """Every step in the order it runs: the supervisor's, then init's (before pivot_root)."""
    return [*t.host_setup, *t.init_setup]


def provider(t: SandboxTemplate, path: str) -> object | None:
    """The mount the command sees at ``path``: the last mount on it or on one of its parents.

    A later mount on a parent hides every earlier mount below it; a read-only rebind shows the
    same file system again, so it does not change who provides the path.
    """
    target = in_sandbox(path)
    found = None
    for op in steps(t):
        if isinstance(op, MOUNT_OPS) and under(target, op.target):
            found = op
    return found


def is_read_only(t: SandboxTemplate, path: str) -> bool:
    """Whether ``path`` is read-only in the sandbox (ro bind, overlay without an upper layer,
    sysfs, ro tmpfs, ro rebind)."""
    target = in_sandbox(path)
    top = provider(t, path)
    if isinstance(top, Bind) and top.readonly:
        return True
    if isinstance(top, Overlay) and not top.upper:
        return True
    if isinstance(top, Sysfs):  # mnt.execute mounts sysfs with MS_RDONLY
        return True
    if isinstance(top, Tmpfs) and top.flags & sc.MS_RDONLY:
        return True
    after = steps(t)[steps(t).index(top) + 1 :] if top is not None else []
    return any(isinstance(op, ReadOnlyRebind) and under(target, op.target) for op in after)


def sources(t: SandboxTemplate) -> list[str]:
    """Every host path a plan mounts into the sandbox (overlay lower layers, bind sources)."""
    out = []
    for op in t.host_setup:
        if isinstance(op, Overlay):
            out.append(op.lower)
        elif isinstance(op, Bind):
            out.append(op.source)
    return out


def with_steps(t: SandboxTemplate, host_setup: list[object]) -> SandboxTemplate:
    return dataclasses.replace(t, host_setup=tuple(host_setup))  # type: ignore[arg-type]


# --- Rendering (goldens) ------------------------------------------------------------------------


_PLAIN = re.compile(r"[^\s'\"\\]+")


def show_path(path: str, *, host: bool = False) -> str:
    """A path, quoted if not plain; unless a ``host`` path, with $ROOT and $SCRATCH for the
    sandbox's directories."""
    if host:
        pass
    elif under(path, ROOT):
        path = "$ROOT" + path[len(ROOT) :]
    elif under(path, SCRATCH):
        path = "$SCRATCH" + path[len(SCRATCH) :]
    return path if _PLAIN.fullmatch(path) and path.isprintable() else repr(path)


def show_flags(flags: int) -> str:
    names = []
    for bit, name in (
        (sc.MS_RDONLY, "ro"),
        (sc.MS_NOSUID, "nosuid"),
        (sc.MS_NODEV, "nodev"),
        (sc.MS_NOEXEC, "noexec"),
    ):
        if flags & bit:
            names.append(name)
            flags &= ~bit
    if flags:
        names.append(hex(flags))
    return ",".join(names) or "-"


def show_owner(mode: int, uid: int, gid: int) -> str:
    return f"mode={mode:04o} owner={uid}:{gid}"


def show_step(op: object) -> str:
    match op:
        case Tmpfs(target, options, flags):
            return f"tmpfs     {show_path(target)}  {options}  flags={show_flags(flags)}"
        case Overlay(target, lower, upper, work, base) if not upper and not work:
            return (
                f"overlay   {show_path(target)}  lower={show_path(lower)}:{show_path(base)}  ro"
                f"  flags={show_flags(op.flags)}"
            )
        case Overlay(target, lower, upper, work):
            return (
                f"overlay   {show_path(target)}  lower={show_path(lower)}"
                f"  upper={show_path(upper)}  work={show_path(work)}  flags={show_flags(op.flags)}"
            )
        case Bind(source, target, readonly):
            mode = "ro" if readonly else "RW"
            return (
                f"bind      {show_path(target)}  from={show_path(source)}  {mode}"
                f"  flags={show_flags(op.flags)}"
            )
        case ReadOnlyRebind(target):
            return f"ro-rebind {show_path(target)}"
        case Mkdir(path, mode, uid, gid):
            return f"mkdir     {show_path(path)}  {show_owner(mode, uid, gid)}"
        case Mknod(path, major, minor, mode):
            return f"mknod     {show_path(path)}  char {major}:{minor}  mode={mode:04o}"
        case Symlink(target, path):
            return f"symlink   {show_path(path)} -> {target}"
        case Proc(target):
            return f"proc      {show_path(target)}"
        case Sysfs(target):
            return f"sysfs     {show_path(target)}"
        case Devpts(target):
            return f"devpts    {show_path(target)}"
        case PivotRoot(new_root):
            return f"pivot     {show_path(new_root)}"
    raise AssertionError(f"unknown step {op!r}")


def show_namespaces(flags: int) -> str:
    names = [
        name
        for name in ("NEWNS", "NEWPID", "NEWNET", "NEWIPC", "NEWUTS", "NEWCGROUP")
        if flags & getattr(sc, f"CLONE_{name}")
    ]
    rest = flags & ~sum(getattr(sc, f"CLONE_{n}") for n in names)
    return "|".join(names + ([hex(rest)] if rest else []))


def render_template(host: Host, kind: str, t: SandboxTemplate) -> str:
    lines = [
        f"# {kind} plan of data/{host.name}.mountinfo (tests/unit/sandbox/test_plan.py)",
        f"# $SCRATCH = {SCRATCH}   $ROOT = $SCRATCH/root"
        f"   hidden = {', '.join(SETTINGS.hidden_paths)}",
        f"hostname {t.hostname}",
        f"namespaces {show_namespaces(t.namespaces)}",
        f"scratch {show_path(t.scratch_dir)} {t.scratch_bytes} bytes",
        f"writable {show_path(t.writable) if t.writable else '-'}",
        f"cgroup {t.cgroup.name} memory={t.cgroup.memory_bytes} pids={t.cgroup.pids}",
        f"trace_processes={t.trace_processes} proc_connector={t.proc_connector}"
        f" capture_network={t.capture_network} seccomp={len(t.seccomp_program)} bytes",
        "host_setup:",
        *(f"  {show_step(op)}" for op in t.host_setup),
        "init_setup:",
        *(f"  {show_step(op)}" for op in t.init_setup),
        "layers:",
        *(
            f"  {show_path(os.fsdecode(la.host_path))}  upper={show_path(os.fsdecode(la.upper))}"
            f"  lower={show_path(os.fsdecode(la.lower))}"
            for la in t.layers
        ),
    ]
    return "\n".join(lines) + "\n"


def use_of(t: SandboxTemplate, path: str) -> str:
    """Every step that mounts the host's ``path``, in order (Execute binds a mount below the
    workspace again, read-write, over its read-only overlay)."""
    uses = []
    for op in t.host_setup:
        if isinstance(op, Overlay) and op.lower == path:
            uses.append("overlay" if op.upper else "overlay-ro")
        if isinstance(op, Bind) and op.source == path:
            uses.append("bind-ro" if op.readonly else "bind-RW")
    return "+".join(uses) or "-"


FILE_TYPES = {
    S_IFDIR: "dir",
    S_IFREG: "file",
    S_IFSOCK: "socket",
    S_IFCHR: "chardev",
    S_IFBLK: "blockdev",
    S_IFIFO: "fifo",
    S_IFLNK: "symlink",
    0: "unknown",
}


def render_mounts(host: Host) -> str:
    dry, ex = dry_template(host), execute_template(host)
    lines = [
        f"# parse_mountinfo(data/{host.name}.mountinfo): one line per mount point, the top mount",
        "# path  fstype  file type  mode owner  ->  in the dry-run plan / in the Execute plan",
    ]
    for m in host.mounts():
        kind = FILE_TYPES[m.file_type]
        lines.append(
            f"{show_path(m.path, host=True)}  {m.fstype}  {kind}"
            f"  {show_owner(m.mode, m.uid, m.gid)}"
            f"  ->  dry={use_of(dry, m.path)}  execute={use_of(ex, m.path)}"
        )
    return "\n".join(lines) + "\n"


def check_golden(name: str, text: str) -> None:
    path = DATA / name
    if UPDATE_GOLDEN:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no golden {path}: run with AIRLOCK_UPDATE_GOLDEN=1 and review it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, (
        f"{name} differs from the plan; if the change is intended, regenerate with "
        "AIRLOCK_UPDATE_GOLDEN=1 and review the diff line by line"
    )


# --- Goldens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_golden_mount_table(host: Host) -> None:
    check_golden(f"{host.name}.mounts.golden", render_mounts(host))


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_golden_dry_run_plan(host: Host) -> None:
    check_golden(f"{host.name}.dry.golden", render_template(host, "dry-run", dry_template(host)))


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_golden_execute_plan(host: Host) -> None:
    text = render_template(host, "Execute", execute_template(host))
    check_golden(f"{host.name}.execute.golden", text)


def test_every_golden_belongs_to_a_fixture() -> None:
    """A renamed or dropped fixture must not leave a golden nobody compares any more."""
    expected = {f"{h.name}.{k}.golden" for h in HOSTS for k in ("mounts", "dry", "execute")}
    assert {p.name for p in DATA.glob("*.golden")} == expected
    assert {p.stem for p in DATA.glob("*.mountinfo")} == set(HOST_BY_NAME)


# --- Property checks (each used on every fixture, and fed broken plans below) -------------------


def check_kernel_trees(t: SandboxTemplate, host: Host) -> None:
    """/proc, /sys, /dev are the sandbox's own, never the host's; /proc/sys & co read-only."""
    probes = {
        "/proc",
        "/proc/1/root",
        "/proc/sys/kernel/core_pattern",
        "/sys",
        "/sys/fs/cgroup",
        "/sys/kernel/security",
        "/dev",
        "/dev/sda",
        "/dev/shm",
        "/dev/pts",
        "/dev/mqueue",
        *READ_ONLY_PROC,
        *(m.path for m in host.mounts() if any(under(m.path, k) for k in KERNEL_TREES)),
    }
    for path in sorted(probes):
        top = provider(t, path)
        assert isinstance(top, FRESH_KERNEL_FS), f"{path} in the sandbox is {top}"
        tree = next(k for k in KERNEL_TREES if under(path, k))
        expected = {"/proc": Proc, "/sys": Sysfs, "/dev": (Tmpfs, Devpts)}[tree]
        assert isinstance(top, expected), f"{path} in the sandbox is {top}"
    for path in READ_ONLY_PROC:
        assert is_read_only(t, path), f"{path} is writable in the sandbox"
    assert is_read_only(t, "/sys/kernel/mm"), "/sys is writable in the sandbox"
    init = list(t.init_setup)
    assert init[0] == Proc(ROOT + "/proc")
    assert init[-1] == PivotRoot(ROOT), "pivot_root must come last"


def check_no_kernel_sources(t: SandboxTemplate) -> None:
    """No host path under /proc, /sys or /dev is an overlay lower layer or a bind source."""
    for source in sources(t):
        assert not any(under(source, k) for k in KERNEL_TREES), f"host {source} in the plan"


def check_dev(t: SandboxTemplate) -> None:
    """/dev: a tmpfs with six character devices, a private devpts, a private /dev/shm."""
    dev = ROOT + "/dev"
    nodes = {
        op.path[len(dev) + 1 :]: (op.major, op.minor)
        for op in t.host_setup
        if isinstance(op, Mknod)
    }
    assert nodes == DEVICES
    for op in t.host_setup:
        if isinstance(op, Mknod | Symlink):
            assert under(op.path, dev), f"{op} outside /dev"
        if isinstance(op, Devpts):
            assert op.target == dev + "/pts", f"{op} outside /dev"
    assert Tmpfs(dev, "mode=755,size=64k", sc.MS_NOSUID) in t.host_setup
    assert Devpts(dev + "/pts") in t.host_setup
    assert isinstance(provider(t, "/dev/pts/ptmx"), Devpts)
    assert isinstance(provider(t, "/dev/shm"), Tmpfs)
    assert provider(t, "/dev/shm").target == dev + "/shm"


def check_hidden(t: SandboxTemplate, hidden: str = STATE_DIR) -> None:
    """The state directory (and the scratch space, the internal socket in it) is an empty
    read-only tmpfs in the sandbox: nothing mounted after it covers it."""
    for path in (hidden, hidden + "/private/grpc.sock", hidden + "/audit.sqlite3", SCRATCH):
        if not under(path, hidden):
            continue
        top = provider(t, path)
        assert isinstance(top, Tmpfs), f"{path} in the sandbox is {top}"
        assert top.target == in_sandbox(hidden), f"{path} in the sandbox is {top}"
        want = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
        assert top.flags & want == want, f"{path}: the hidden tmpfs is not read-only, nosuid, nodev"


def check_scratch(t: SandboxTemplate) -> None:
    """The scratch tmpfs comes first; upper and work directories live in it, outside the
    sandbox's root; nothing of the host under the scratch directory is mounted."""
    assert t.host_setup[0] == Tmpfs(
        SCRATCH, f"mode=700,size={SCRATCH_BYTES}", sc.MS_NOSUID | sc.MS_NODEV
    )
    assert t.host_setup[1] == Mkdir(ROOT, 0o755)
    for op in t.host_setup:
        if isinstance(op, Overlay):
            for d in (op.upper, op.work) if op.upper else (op.base,):
                assert under(d, SCRATCH) and not under(d, ROOT), f"{d} is visible in the sandbox"
    for source in sources(t):
        if t.writable and source == t.writable:
            continue
        assert not under(source, SCRATCH), f"host {source} (under the scratch dir) in the plan"


def check_dry_run(t: SandboxTemplate, host: Host) -> None:
    """Every data mount of the host is the lower layer of its own overlay, and stays visible;
    non-directories are bound read-only; nothing is writable on the host; every overlay's
    upper is a layer the diff reads."""
    assert not t.writable
    overlays = [op for op in t.host_setup if isinstance(op, Overlay)]
    binds = [op for op in t.host_setup if isinstance(op, Bind)]
    assert {o.lower for o in overlays} == host.data, "overlaid host mounts"
    assert {b.source for b in binds} == host.files, "bound host mounts"
    assert all(b.readonly for b in binds), "a dry run binds something read-write"
    for o in overlays:
        assert o.target == in_sandbox(o.lower)
        if not any(under(o.lower, h) for h in SETTINGS.hidden_paths):
            assert provider(t, o.lower) == o, f"{o.lower} is covered by {provider(t, o.lower)}"
    for b in binds:
        assert b.target == in_sandbox(b.source)
        assert provider(t, b.source) == b
    uppers = [o.upper for o in overlays] + [o.work for o in overlays]
    assert len(set(uppers)) == len(uppers), "two overlays share an upper or work directory"
    # The upper's root has the lower root's mode and owner (else the diff reports a change),
    # and is made before its overlay; work is root's alone.
    mounts = {m.path: m for m in host.mounts()}
    for o in overlays:
        m = mounts[o.lower]
        before = t.host_setup[: t.host_setup.index(o)]
        assert Mkdir(o.upper, m.mode, m.uid, m.gid) in before, f"upper of {o.lower}"
        assert Mkdir(o.work, 0o700) in before, f"work of {o.lower}"
    assert list(t.layers) == [
        Layer(os.fsencode(o.lower), os.fsencode(o.upper), os.fsencode(o.lower)) for o in overlays
    ], "every overlay's upper must be diffed, and nothing else"


def check_execute(t: SandboxTemplate, host: Host) -> None:
    """Execute: every data directory of the host is a read-only overlay (the command sees the
    overlay's inodes, so no host Unix socket answers through it), every bound file a read-only
    bind; the workspace is bound read-write on top, then the data mounts below it again (the
    directories read-write, as the dry run shows them); no layer to diff."""
    ws = t.writable
    assert ws
    overlays = [op for op in t.host_setup if isinstance(op, Overlay)]
    binds = [op for op in t.host_setup if isinstance(op, Bind)]
    assert not any(o.upper or o.work for o in overlays), "a writable overlay in Execute"
    assert t.layers == ()
    assert {o.lower for o in overlays} == host.data, "overlaid host mounts"
    assert {b.source for b in binds if b.readonly} == host.files, "bound host mounts"
    # The second lower layer of every overlay: one empty directory of the scratch tmpfs.
    bases = {o.base for o in overlays}
    assert len(bases) <= 1 and all(under(b, SCRATCH) and not under(b, ROOT) for b in bases)
    for b in bases:
        assert t.host_setup[2] == Mkdir(b, 0o755), "the base is made first"
        assert not any(isinstance(op, MOUNT_OPS) and under(op.target, b) for op in t.host_setup)
    # Read-write: the workspace, then the data directories below it that nothing covers.
    covered = [*SETTINGS.hidden_paths, *(p for p in PRIVATE_TMP if under(p, ws) and p != ws)]
    below = sorted(
        p for p in host.data if under(p, ws) and p != ws and not any(under(p, c) for c in covered)
    )
    rw = [b for b in binds if not b.readonly]
    assert rw[:1] == [Bind(ws, in_sandbox(ws), readonly=False)], "read-write binds"
    assert sorted(b.source for b in rw[1:]) == below, "read-write binds"
    assert all(b.target == in_sandbox(b.source) for b in binds)
    assert provider(t, ws) == rw[0]
    for path in below:
        top = provider(t, path)
        assert isinstance(top, Bind) and top.source == path and not top.readonly, f"{path}: {top}"
    read_only: list[Overlay | Bind] = [*overlays, *(b for b in binds if b.readonly)]
    for op in read_only:
        path = op.lower if isinstance(op, Overlay) else op.source
        if not any(under(path, p) for p in (ws, *PRIVATE_TMP, *SETTINGS.hidden_paths)):
            assert provider(t, path) == op, f"{path} is covered"
            assert is_read_only(t, path)


def check_private_tmp(t: SandboxTemplate) -> None:
    """Execute: /tmp and /var/tmp are private, empty tmpfs, whatever the host mounts there."""
    for tmp in PRIVATE_TMP:
        top = provider(t, tmp + "/some-file")
        assert top == Tmpfs(ROOT + tmp, "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV), (
            f"{tmp} in the sandbox is {top}"
        )


# --- Property tests on every fixture ------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_dry_run_overlays_every_data_mount_and_nothing_else(host: Host) -> None:
    check_dry_run(dry_template(host), host)


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_execute_binds_every_data_mount_read_only(host: Host) -> None:
    check_execute(execute_template(host), host)


@pytest.mark.parametrize("kind", ["dry", "execute"])
@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_kernel_trees_are_the_sandboxs_own(host: Host, kind: str) -> None:
    t = dry_template(host) if kind == "dry" else execute_template(host)
    check_kernel_trees(t, host)
    check_no_kernel_sources(t)
    check_dev(t)


@pytest.mark.parametrize("kind", ["dry", "execute"])
@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_state_dir_and_scratch_are_hidden(host: Host, kind: str) -> None:
    t = dry_template(host) if kind == "dry" else execute_template(host)
    check_hidden(t)
    check_scratch(t)


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_execute_has_private_tmp(host: Host) -> None:
    check_private_tmp(execute_template(host))


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_template_namespaces_and_settings(host: Host) -> None:
    for t in (dry_template(host), execute_template(host)):
        assert t.namespaces == ALL_NAMESPACES
        assert not t.namespaces & CLONE_NEWUSER, "the threat model: no user namespace"
        assert t.hostname == "airlock"
        assert t.scratch_dir == SCRATCH
        assert t.seccomp_program == SECCOMP
    assert dry_template(host).cgroup == CGROUP


# --- Execute workspaces -------------------------------------------------------------------------

WORKSTATION = HOST_BY_NAME["workstation-btrfs"]


@pytest.mark.parametrize(
    "workspace",
    [
        "/home/alice/src",
        "/srv/www",
        "/tmp",
        "/tmp/build/x",
        "/var/tmp/ci",
        "/var/lib",
        STATE_DIR,
        STATE_DIR + "/changesets",
        ROOT + "/etc",
        "/",
        "/var",
    ],
)
def test_execute_never_uncovers_the_state_dir(workspace: str) -> None:
    t = execute_template(WORKSTATION, workspace)
    check_hidden(t)
    check_kernel_trees(t, WORKSTATION)
    if not under(STATE_DIR, workspace) and not under(workspace, STATE_DIR):
        assert provider(t, workspace) == Bind(workspace, in_sandbox(workspace), readonly=False)


@pytest.mark.parametrize("workspace", ["/tmp/build/x", "/var/tmp/ci"])
def test_execute_workspace_below_private_tmp_gets_its_mount_point(workspace: str) -> None:
    t = execute_template(WORKSTATION, workspace)
    ops = list(t.host_setup)
    tmp = next(p for p in PRIVATE_TMP if under(workspace, p))
    start = ops.index(Tmpfs(ROOT + tmp, "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV))
    end = ops.index(Bind(workspace, ROOT + workspace, readonly=False))
    parts = workspace[len(tmp) + 1 :].split("/")
    made = [ROOT + tmp + "/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
    assert ops[start + 1 : end] == [Mkdir(p, 0o755) for p in made] + (
        [Tmpfs(ROOT + "/var/tmp", "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV)]
        if tmp == "/tmp"
        else []
    )
    check_private_tmp(t)
    assert provider(t, workspace) == Bind(workspace, ROOT + workspace, readonly=False)
    assert provider(t, tmp + "/other") == ops[start]


@pytest.mark.parametrize("workspace", ["/", "/var"])
def test_execute_private_tmp_with_a_workspace_above_it(workspace: str) -> None:
    check_private_tmp(execute_template(WORKSTATION, workspace))


@pytest.mark.parametrize(
    ("host", "workspace"),
    [
        ("workstation-btrfs", "/srv"),
        ("workstation-btrfs", "/run"),
        ("odd-paths", "/media/alice/My Disk"),
        ("nfs-autofs", "/home"),  # the autofs map itself: its bind shows the homes' mount points
        ("nfs-autofs", "/net"),  # an autofs map: a stand-in again, below the workspace's bind
        ("nfs-autofs", "/"),
    ],
)
def test_execute_keeps_mounts_below_the_workspace(host: str, workspace: str) -> None:
    """The dry run shows the file systems mounted below the workspace; so does Execute, where
    they are bound again over the workspace's (non-recursive) bind, writable like it if they
    are directories, read-only if files, each with its mount point. What a private tmp or a
    hidden path covers stays covered."""
    fixture = HOST_BY_NAME[host]
    t = execute_template(fixture, workspace)
    covered = [*PRIVATE_TMP, STATE_DIR]
    below = [
        p
        for p in sorted(fixture.data | fixture.files)
        if under(p, workspace) and p != workspace and not any(under(p, c) for c in covered)
    ]
    assert below
    for path in below:
        top = provider(t, path)
        assert isinstance(top, Bind) and top.source == path, f"{path} in Execute is {top}"
        assert top.readonly == (path in fixture.files), f"{path} in Execute is {top}"
    check_mount_points(t, fixture)
    check_private_tmp(t)
    check_hidden(t)


@pytest.mark.parametrize("workspace", ["/proc", "/proc/sys", "/sys", "/sys/fs/cgroup", "/dev"])
def test_execute_workspace_in_a_kernel_tree_stays_covered(workspace: str) -> None:
    """The engine refuses such a cwd (check_request, with plan.KERNEL_TREES); should one get
    through, the sandbox's own /proc, /sys, /dev are still mounted over the bind."""
    t = execute_template(WORKSTATION, workspace)
    check_kernel_trees(t, WORKSTATION)
    assert not isinstance(provider(t, workspace), Bind)


def test_kernel_trees_constant() -> None:
    # The engine refuses a cwd under these; the planner replaces them.
    assert KERNEL_TREES == ("/proc", "/sys", "/dev")


def test_execute_hidden_path_under_tmp() -> None:
    """A hidden path below /tmp needs no tmpfs of its own in Execute (the private /tmp hides
    it), unless the workspace uncovers it (a workspace in /tmp): then it gets its own
    read-only tmpfs. A workspace above /tmp does not uncover it: the private /tmp comes after
    the workspace's bind."""
    secret = "/tmp/airlock-state"
    settings = dataclasses.replace(SETTINGS, hidden_paths=(STATE_DIR, secret))
    elsewhere = execute_template(WORKSTATION, "/home/alice/src", settings)
    assert not any(
        isinstance(op, Tmpfs) and op.target == ROOT + secret for op in elsewhere.host_setup
    )
    assert provider(elsewhere, secret).target == ROOT + "/tmp"
    t = execute_template(WORKSTATION, "/tmp", settings)
    top = provider(t, secret + "/key")
    assert isinstance(top, Tmpfs) and top.target == ROOT + secret and top.flags & sc.MS_RDONLY
    for workspace in ("/", "/home/alice/src"):
        t = execute_template(WORKSTATION, workspace, settings)
        assert provider(t, secret + "/key") == Tmpfs(
            ROOT + "/tmp", "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV
        )
        assert not any(isinstance(op, Tmpfs) and op.target == ROOT + secret for op in t.host_setup)
    dry = dry_template(WORKSTATION, settings)
    check_hidden(dry, secret)


# --- The daemon's sockets -----------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_dry_run_reaches_the_daemon_socket_only_through_an_overlay(host: Host) -> None:
    """A path-based Unix socket seen through an overlay refuses connections (threat model,
    'Network (dry run)'): the daemon's socket directory must come from an overlay."""
    top = provider(dry_template(host), DAEMON_SOCKET)
    assert isinstance(top, Overlay), f"{DAEMON_SOCKET} in a dry run is {top}"


def test_dry_run_does_not_bind_a_host_socket() -> None:
    t = dry_template(HOST_BY_NAME["ci-container"])
    assert "/run/docker.sock" not in sources(t)


@pytest.mark.parametrize("workspace", [None, "/srv", "/run/user/1000"])
@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_execute_reaches_the_daemon_socket_only_through_an_overlay(
    host: Host, workspace: str | None
) -> None:
    """Execute shows every host directory through a read-only overlay, so a host Unix socket,
    the daemon's included, refuses connections there as in a dry run (the kernel's side is in
    tests/daemon/test_execute_isolation.py). Only the workspace's own tree is bound: a workspace
    that contains the daemon's socket or state directory is refused before planning
    (``mnt.workspace_conflict``, when the request is checked and again at the bind)."""
    t = execute_template(host, workspace)
    top = provider(t, DAEMON_SOCKET)
    assert isinstance(top, Overlay) and not top.upper, f"{DAEMON_SOCKET} in Execute is {top}"
    assert t.protected == (DAEMON_SOCKET, STATE_DIR)


@pytest.mark.parametrize(
    ("file_type", "shown"),
    [
        (S_IFDIR, True),
        (S_IFREG, True),
        (0, True),  # root cannot stat it (FUSE without allow_other): bound read-only
        (S_IFSOCK, False),
        (S_IFIFO, False),
        (S_IFCHR, False),
        (S_IFBLK, False),
        (S_IFLNK, False),
    ],
)
@pytest.mark.parametrize("workspace", ["", "/srv", "/srv/app"])
def test_no_socket_fifo_or_device_is_mounted_from_the_host(
    file_type: int, shown: bool, workspace: str
) -> None:
    """A bind keeps a socket connectable and a FIFO the host's pipe, even read-only: such a
    mount is left out, and the sandbox sees the mount point beneath it (in the dry run, in
    Execute, and below Execute's workspace)."""
    mounts = (
        HostMount("/", "ext4"),
        HostMount("/srv", "ext4"),
        HostMount("/srv/app/thing", "tmpfs", file_type, 0o660, 0, 998),
    )
    t = build_template(
        settings=SETTINGS,
        scratch_bytes=SCRATCH_BYTES,
        cgroup=CGROUP,
        host_mounts=mounts,
        writable=workspace,
    )
    used = [op for op in t.host_setup if isinstance(op, Overlay | Bind)]
    mounting = [
        op for op in used if (op.lower if isinstance(op, Overlay) else op.source) == mounts[2].path
    ]
    assert bool(mounting) == shown, mounting
    if shown and file_type != S_IFDIR:
        assert all(isinstance(op, Bind) and op.readonly for op in mounting)


# --- Mount points -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    id: int
    parent: int
    path: str
    fstype: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def entries(text: str) -> list[Entry]:
    """An independent reading of mountinfo, with the ids the planner does not use."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        path = _OCTAL.sub(lambda m: chr(int(m[1], 8)), f[4])
        out.append(Entry(int(f[0]), int(f[1]), path, right.split()[0]))
    return out


def top_entry(table: list[Entry], path: str) -> Entry:
    """The mount one sees at ``path``: no other mount at that path sits on it."""
    here = [e for e in table if e.path == path]
    tops = [e for e in here if not any(o.parent == e.id for o in here)]
    assert len(tops) == 1, tops
    return tops[0]


def check_mount_points(t: SandboxTemplate, host: Host) -> None:
    """Every mount the plan makes of a host mount has a mount point in the sandbox when it is
    made: what the sandbox shows there at that step is the mount it sits on in the host (past
    mounts stacked at the same path), as the top mount at its path; or the workspace's bind,
    when that mount holds the workspace; or a stand-in for a left-out mount above (an autofs
    map): an empty tmpfs with a directory made for the mount point, then made read-only.
    Otherwise the target exists only by chance and mount(2) fails with ENOENT (the overlay of
    a parent file system does not show the mounts below it)."""
    table = entries(host.text)
    by_id = {e.id: e for e in table}
    paths = {e.path for e in table}
    ops = list(t.host_setup)
    shown = {m.path for m in host.mounts()}
    holding_ws = max((p for p in shown if t.writable and under(t.writable, p)), key=len, default="")
    workspace = Bind(t.writable, in_sandbox(t.writable), readonly=False) if t.writable else None
    for i, op in enumerate(ops):
        if not isinstance(op, Overlay | Bind) or op == workspace:
            continue
        source = op.lower if isinstance(op, Overlay) else op.source
        if source == "/":
            continue
        e = top_entry(table, source)
        below = by_id[e.parent]
        while below.path == e.path:
            below = by_id[below.parent]
        before = ops[:i]
        holder = next(
            (
                o
                for o in reversed(before)
                if isinstance(o, MOUNT_OPS) and under(op.target, o.target)
            ),
            None,
        )
        if isinstance(holder, Overlay | Bind) and holder != workspace:
            held = holder.lower if isinstance(holder, Overlay) else holder.source
            if held == below.path and top_entry(table, below.path) == below:
                continue
        elif holder is not None and holder == workspace:
            if below.path == holding_ws and top_entry(table, below.path) == below:
                continue
        elif isinstance(holder, Tmpfs) and holder.flags & sc.MS_NOSUID:
            # A stand-in: over a host mount the plan leaves out, at or above the one below.
            left_out = next((p for p in paths if in_sandbox(p) == holder.target), None)
            j = before.index(holder)
            if (
                left_out is not None
                and left_out not in sources(with_steps(t, list(before[:j])))
                and under(below.path, left_out)
                and Mkdir(op.target, 0o755) in before[j:]
                and ReadOnlyRebind(holder.target) in before[before.index(Mkdir(op.target, 0o755)) :]
            ):
                continue
        raise AssertionError(
            f"{source} sits on {below.fstype} {below.path}, which the plan leaves out"
            f" (the sandbox shows {holder} there)"
        )


@pytest.mark.parametrize("host", HOSTS, ids=str)
@pytest.mark.parametrize("kind", ["dry", "execute"])
def test_every_planned_mount_has_a_mount_point(host: Host, kind: str) -> None:
    t = dry_template(host) if kind == "dry" else execute_template(host)
    check_mount_points(t, host)


# --- parse_mountinfo ----------------------------------------------------------------------------


def _line(path_field: str, fstype: str = "ext4", mid: int = 90) -> str:
    return f"{mid} 1 8:1 / {path_field} rw,relatime shared:9 - {fstype} /dev/sdz1 rw"


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("/mnt/My\\040Disk", "/mnt/My Disk"),
        ("/mnt/tab\\011x", "/mnt/tab\tx"),
        ("/mnt/new\\012line", "/mnt/new\nline"),
        ("/mnt/back\\134slash", "/mnt/back\\slash"),
        ("/mnt/\\1341234", "/mnt/\\1234"),  # a backslash followed by digits
        ("/mnt/end\\040", "/mnt/end "),
        ("/mnt/\\040\\040", "/mnt/  "),
        ("/mnt/dash\\040-\\040x", "/mnt/dash - x"),
        ("/mnt/Фото", "/mnt/Фото"),
        ("/mnt/-", "/mnt/-"),
        ("/mnt/a,b:c", "/mnt/a,b:c"),
    ],
)
def test_parse_decodes_escaped_mount_points(field: str, path: str) -> None:
    seen: list[str] = []

    def inspect(p: str) -> Stat:
        seen.append(p)
        return DIR

    mounts = parse_mountinfo(_line("/", mid=1) + "\n" + _line(field), inspect)
    assert [m.path for m in mounts] == ["/", path]
    assert seen == ["/", path], "inspect must get the decoded path"


def test_parse_fixture_paths_match_an_independent_decoder() -> None:
    for host in HOSTS:
        table = entries(host.text)
        assert {m.path for m in host.mounts()} == {e.path for e in table}
        for m in host.mounts():
            assert m.fstype == top_entry(table, m.path).fstype, f"{host}: {m.path}"


def test_parse_non_utf8_mount_point_round_trips() -> None:
    raw = (
        b"21 1 8:1 / / rw - ext4 /dev/sda1 rw\n90 21 8:17 / /media/M\xfcll rw - vfat /dev/sdb1 rw\n"
    )
    mounts = parse_mountinfo(raw.decode("utf-8", "surrogateescape"))
    t = build_template(
        settings=SETTINGS, scratch_bytes=SCRATCH_BYTES, cgroup=CGROUP, host_mounts=mounts
    )
    assert [la.host_path for la in t.layers] == [b"/", b"/media/M\xfcll"]


def test_host_mounts_reads_a_non_utf8_mount_table(tmp_path: Path) -> None:
    from airlock.sandbox import mnt  # reads the given file and stats the mount roots only

    table = tmp_path / "mountinfo"
    table.write_bytes(
        b"21 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"90 21 8:17 / /nonexistent/M\xfcll rw - vfat /dev/sdb1 rw\n"
    )
    paths = [m.path for m in mnt.host_mounts(str(table))]
    assert [os.fsencode(p) for p in paths] == [b"/", b"/nonexistent/M\xfcll"]


@pytest.mark.parametrize(
    ("host", "path", "fstype"),
    [
        ("debian-vm", "/dev/pts", "devpts"),
        ("debian-vm", "/dev/shm", "tmpfs"),
        ("workstation-btrfs", "/boot/efi", "vfat"),  # systemd automount: autofs, vfat on top
        ("nfs-autofs", "/mnt/archive", "nfs"),
        ("nfs-autofs", "/net/fs1.example.com/export", "nfs4"),
        ("odd-paths", "/srv/stack", "xfs"),  # ext4, tmpfs, xfs
    ],
)
def test_parse_stacked_mounts_keep_the_top_one(host: str, path: str, fstype: str) -> None:
    mounts = [m for m in HOST_BY_NAME[host].mounts() if m.path == path]
    assert [m.fstype for m in mounts] == [fstype]


def test_parse_stacked_mount_point_uses_the_top_ones_stat() -> None:
    # /boot/efi: the planner must classify the vfat on top (data; 0700 root) not the autofs.
    t = dry_template(WORKSTATION)
    o = next(op for op in t.host_setup if isinstance(op, Overlay) and op.lower == "/boot/efi")
    assert Mkdir(o.upper, 0o700, 0, 0) in t.host_setup


def test_parse_stacked_mount_moved_on_top() -> None:
    text = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "66 67 0:40 / /srv/jail/proc rw,relatime - proc proc rw\n"  # moved here: on top
        "67 27 0:41 / /srv/jail/proc rw,relatime - tmpfs tmpfs rw\n"
    )
    mounts = parse_mountinfo(text)
    assert [m.fstype for m in mounts if m.path == "/srv/jail/proc"] == ["proc"]
    t = build_template(
        settings=SETTINGS, scratch_bytes=SCRATCH_BYTES, cgroup=CGROUP, host_mounts=mounts
    )
    assert "/srv/jail/proc" not in sources(t)


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_parse_orders_parents_before_children_whatever_the_input_order(host: Host) -> None:
    mounts = host.mounts()
    paths = [m.path for m in mounts]
    for i, p in enumerate(paths):
        assert not any(under(p, q) and p != q for q in paths[i + 1 :]), f"{p} before its parent"
    # Reversing the file changes nothing but which of a stack is last: keep stacks in order.
    lines = host.text.splitlines()
    table = entries(host.text)
    unstacked = [ln for ln, e in zip(lines, table, strict=True) if top_entry(table, e.path) == e]
    assert parse_mountinfo("\n".join(reversed(unstacked)), host.inspect) == mounts


def test_parse_ignores_lines_without_a_separator() -> None:
    text = "\n\n   \n27 1 254:0 / / rw - ext4 /dev/vda rw\ngarbage line\n"
    assert parse_mountinfo(text) == (HostMount("/", "ext4"),)


def test_parse_without_inspect_assumes_root_owned_directories() -> None:
    assert parse_mountinfo(_line("/x")) == (HostMount("/x", "ext4", S_IFDIR, 0o755, 0, 0),)


def test_pseudo_file_systems_outside_kernel_trees_are_left_out() -> None:
    fstypes = [
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
    ]
    text = "\n".join(
        [_line("/", mid=1)] + [_line(f"/srv/{f}", f, mid=100 + i) for i, f in enumerate(fstypes)]
    )
    for t in (
        build_template(
            settings=SETTINGS,
            scratch_bytes=SCRATCH_BYTES,
            cgroup=CGROUP,
            host_mounts=parse_mountinfo(text),
            writable=w,
        )
        for w in ("", "/home/alice")
    ):
        assert sorted(sources(t)) == (["/"] if not t.writable else ["/", "/home/alice"])


# --- Purity and the template key ----------------------------------------------------------------


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"the planner touched the host: {args!r}")


HOST_CALLS = ("stat", "lstat", "open", "listdir", "scandir", "access", "readlink", "getcwd")


def _build_everything(host: Host, mounts: tuple[HostMount, ...]) -> None:
    for writable in ("", host.workspace):
        template = build_template(
            settings=SETTINGS,
            scratch_bytes=SCRATCH_BYTES,
            cgroup=CGROUP,
            host_mounts=mounts,
            writable=writable,
        )
        assert template.key  # pickles the whole template
    build_run(
        sandbox_id="v1",
        command="true",
        cwd=host.workspace,
        env=(),
        uid=1000,
        gid=1000,
        groups=(1000,),
        timeout_s=10,
        output_bytes=1024,
        diff_options=DiffOptions(workspace=os.fsencode(host.workspace)),
        settings=SETTINGS,
    )


def forbid_host_access(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HOST_CALLS:
        monkeypatch.setattr(os, name, _refuse)
    monkeypatch.setattr(builtins, "open", _refuse)


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_planner_reads_nothing_from_the_host(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    text = host.text
    forbid_host_access(monkeypatch)
    mounts = parse_mountinfo(text, host.inspect)
    _build_everything(host, mounts)


def test_the_host_access_trap_works(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_host_access(monkeypatch)
    with pytest.raises(AssertionError, match="touched the host"):
        os.stat("/")
    with pytest.raises(AssertionError, match="touched the host"):
        open("/etc/hostname")  # noqa: SIM115
    with pytest.raises(AssertionError, match="touched the host"):
        os.listdir("/")


@pytest.mark.parametrize("host", HOSTS, ids=str)
def test_template_key_is_deterministic_and_tells_templates_apart(host: Host) -> None:
    assert dry_template(host).key == dry_template(host).key
    assert execute_template(host).key == execute_template(host).key
    assert dry_template(host).key != execute_template(host).key
    assert execute_template(host, "/tmp").key != execute_template(host, "/srv").key
    more = (*host.mounts(), HostMount("/mnt/new", "ext4"))
    grown = build_template(
        settings=SETTINGS,
        scratch_bytes=SCRATCH_BYTES,
        cgroup=CGROUP,
        host_mounts=more,
        seccomp_program=SECCOMP,
    )
    assert grown.key != dry_template(host).key, "a new mount must retire the warm pool"


# --- build_run ----------------------------------------------------------------------------------


def _run(cwd: str = "/home/alice/src", env: tuple[tuple[str, str], ...] = ()) -> RunSpec:
    return build_run(
        sandbox_id="v1",
        command="make -j4 'all'",
        cwd=cwd,
        env=env,
        uid=1000,
        gid=1000,
        groups=(27, 1000),
        timeout_s=30.0,
        output_bytes=65536,
        diff_options=DiffOptions(workspace=os.fsencode(cwd)),
        settings=SETTINGS,
        sensitive_globs=("~/.ssh/*",),
        home="/home/alice",
    )


def test_build_run_runs_bash_c_with_the_command_verbatim() -> None:
    run = _run()
    assert run.argv == ("/bin/bash", "-c", "make -j4 'all'")
    assert (run.uid, run.gid, run.groups) == (1000, 1000, (27, 1000))
    assert run.keep_changes_dir == ""


def test_build_run_env_sorted_with_a_default_path() -> None:
    run = _run(env=(("Z", "1"), ("A", "2")))
    assert run.env == (("A", "2"), ("PATH", DEFAULT_PATH), ("Z", "1"))
    own = _run(env=(("PATH", "/opt/bin"),))
    assert own.env == (("PATH", "/opt/bin"),)


@pytest.mark.parametrize(
    ("cwd", "normal"),
    [("/home/alice/src/", "/home/alice/src"), ("/home/./alice/../alice", "/home/alice")],
)
def test_build_run_normalizes_cwd(cwd: str, normal: str) -> None:
    assert _run(cwd).cwd == normal


def test_build_run_leaves_kernel_tree_cwds_to_the_engine() -> None:
    # The planner does not refuse a cwd; the engine's check_request does, before planning, for
    # every cwd under KERNEL_TREES. (In the sandbox such a cwd is the sandbox's own tree.)
    assert _run("/home/../proc/sys").cwd == "/proc/sys"


# --- The checks can fail ------------------------------------------------------------------------
#
# Each case breaks one promise in an otherwise good plan; its check must notice, with the
# assertion that guards that promise (the message must match).


def _triple(ops: list[object], lower: str) -> list[object]:
    """The Mkdir upper, Mkdir work, Overlay steps of one data mount."""
    i = next(i for i, op in enumerate(ops) if isinstance(op, Overlay) and op.lower == lower)
    return ops[i - 2 : i + 1]


def _without(ops: list[object], *drop: object) -> list[object]:
    return [op for op in ops if op not in drop]


def _mutations() -> Iterator[tuple[str, str, Callable[[], None]]]:
    host = WORKSTATION
    dry, ex = dry_template(host), execute_template(host)
    ops, ex_ops = list(dry.host_setup), list(ex.host_setup)
    init = list(dry.init_setup)
    hidden = next(op for op in ops if isinstance(op, Tmpfs) and op.target == ROOT + STATE_DIR)
    root, home = _triple(ops, "/"), _triple(ops, "/home")
    private_tmp = Tmpfs(ROOT + "/tmp", "mode=1777,size=256m", sc.MS_NOSUID | sc.MS_NODEV)

    def init_with(steps: list[object]) -> SandboxTemplate:
        return dataclasses.replace(dry, init_setup=tuple(steps))  # type: ignore[arg-type]

    yield (
        "host /dev bound",
        "in the sandbox is Bind",
        lambda: check_kernel_trees(with_steps(dry, [*ops, Bind("/dev", ROOT + "/dev")]), host),
    )
    yield (
        "host /proc/sys bound",
        "/proc/sys.* in the sandbox is Bind",
        lambda: check_kernel_trees(
            init_with([*init[:-1], Bind("/proc/sys", ROOT + "/proc/sys"), init[-1]]), host
        ),
    )
    yield (
        "/proc/sys writable",
        "/proc/sys is writable",
        lambda: check_kernel_trees(
            init_with(_without(init, ReadOnlyRebind(ROOT + "/proc/sys"))), host
        ),
    )
    yield (
        "no pivot_root last",
        "pivot_root must come last",
        lambda: check_kernel_trees(init_with([init[0], init[-1], *init[1:-1]]), host),
    )
    yield (
        "kernel source",
        "host /sys/fs/bpf in the plan",
        lambda: check_no_kernel_sources(
            with_steps(dry, [*ops, Bind("/sys/fs/bpf", ROOT + "/mnt")])
        ),
    )
    yield (
        "block device",
        "sda",
        lambda: check_dev(with_steps(dry, [*ops, Mknod(ROOT + "/dev/sda", 8, 0)])),
    )
    yield (
        "hidden too early",
        "in the sandbox is Overlay",
        lambda: check_hidden(with_steps(dry, [*ops[:2], hidden, *_without(ops[2:], hidden)])),
    )
    yield (
        "hidden writable",
        "not read-only",
        lambda: check_hidden(
            with_steps(
                dry,
                [dataclasses.replace(op, flags=sc.MS_NOSUID) if op == hidden else op for op in ops],
            )
        ),
    )
    yield (
        "no hidden",
        "in the sandbox is Overlay",
        lambda: check_hidden(with_steps(dry, _without(ops, hidden))),
    )
    yield (
        "upper inside root",
        "is visible in the sandbox",
        lambda: check_scratch(
            with_steps(
                dry,
                [
                    dataclasses.replace(op, upper=ROOT + "/u0") if isinstance(op, Overlay) else op
                    for op in ops
                ],
            )
        ),
    )
    yield (
        "host scratch mounted",
        "under the scratch dir",
        lambda: check_scratch(with_steps(dry, [*ops, Bind(SCRATCH + "/u0", ROOT + "/mnt")])),
    )
    yield (
        "child before parent",
        "/home is covered by",
        lambda: check_dry_run(
            with_steps(dry, [*ops[:2], *home, *root, *_without(ops[2:], *home, *root)]), host
        ),
    )
    yield (
        "a data mount left out",
        "overlaid host mounts",
        lambda: check_dry_run(
            dataclasses.replace(with_steps(dry, _without(ops, *home)), layers=dry.layers), host
        ),
    )
    yield (
        "read-write bind in a dry run",
        "binds something read-write",
        lambda: check_dry_run(
            with_steps(
                dry,
                [
                    dataclasses.replace(op, readonly=False) if isinstance(op, Bind) else op
                    for op in ops
                ],
            ),
            host,
        ),
    )
    yield (
        "upper mode differs",
        "upper of /tmp",
        lambda: check_dry_run(
            with_steps(
                dry,
                [
                    dataclasses.replace(op, mode=0o755)
                    if isinstance(op, Mkdir)
                    and op.mode == 0o1777
                    and under(op.path, SCRATCH)
                    and not under(op.path, ROOT)
                    else op
                    for op in ops
                ],
            ),
            host,
        ),
    )
    yield (
        "layer missing",
        "must be diffed",
        lambda: check_dry_run(dataclasses.replace(dry, layers=dry.layers[1:]), host),
    )
    yield (
        "writable overlay in Execute",
        "a writable overlay in Execute",
        lambda: check_execute(with_steps(ex, [*ex_ops, home[-1]]), host),
    )
    yield (
        "second read-write bind",
        "read-write binds",
        lambda: check_execute(
            with_steps(ex, [*ex_ops, Bind("/etc", ROOT + "/etc", readonly=False)]), host
        ),
    )
    yield (
        "Execute data covered",
        "/srv/www is covered",
        lambda: check_execute(with_steps(ex, [*ex_ops, Tmpfs(ROOT + "/srv", "size=1k")]), host),
    )
    yield (
        "no private tmp",
        "/tmp in the sandbox is Overlay",
        lambda: check_private_tmp(with_steps(ex, _without(ex_ops, private_tmp))),
    )
    yield (
        "private tmp covered",
        "/tmp in the sandbox is Bind",
        lambda: check_private_tmp(with_steps(ex, [*ex_ops, Bind("/", ROOT)])),
    )
    yield (
        "mount point missing",
        "/run/.* sits on tmpfs /run, which the plan leaves out",
        lambda: check_mount_points(with_steps(dry, _without(ops, *_triple(ops, "/run"))), host),
    )


MUTATIONS = {name: (match, broken) for name, match, broken in _mutations()}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_checks_catch_broken_plans(name: str) -> None:
    match, broken = MUTATIONS[name]
    with pytest.raises(AssertionError, match=match):
        broken()


def test_only_a_dry_run_with_network_capture_stands_in_for_host_sockets() -> None:
    host = HOSTS[0]
    assert dry_template(host).host_sockets == HOST_SOCKETS
    assert "/var/run/docker.sock" in HOST_SOCKETS and "/run/docker.sock" in HOST_SOCKETS
    assert execute_template(host).host_sockets == ()
    no_capture = build_template(
        settings=SETTINGS,
        scratch_bytes=SCRATCH_BYTES,
        cgroup=CGROUP,
        host_mounts=host.mounts(),
        capture_network=False,
    )
    assert no_capture.host_sockets == ()
