"""One request, one spelling: a Validate or Execute request, checked once per call.

:func:`check` turns what the client sent (``airlock.types``), the caller's kernel
credentials and the daemon's limits into a :class:`CheckedRequest`, or refuses it with
an error naming the field. That one value is what every later step sees: the engine
(plan, dry run, Execute), the workflow record, the audit events and the approvals. So
the working directory is spelled the same everywhere (``//tmp/./x/..`` is ``/tmp``
for the sandbox, the state store, the log and the token check alike), and the
environment is hashed once.

The working directory is resolved once, as the command's user: its symbolic links are
followed then and never again. Every rule (kernel file systems, system directories, the
daemon's socket and state) is checked on the directory found, whose path and device and
inode the request carries; Execute's sandbox binds that directory or nothing.

Every size is checked here, exactly, against what the kernel takes later (docs/errors.md):
the command and each variable within MAX_ARG_STRLEN, all of them within ARG_MAX, the cwd
within PATH_MAX (Execute's below its sandbox's root). What is accepted runs; one byte more is
INVALID_ARGUMENT naming the field, never an INTERNAL error from execve or mount.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
import time
from dataclasses import dataclass

from airlock._errors import InvalidRequest, PermissionDenied
from airlock.audit import env_sha256
from airlock.core.ids import checked_id
from airlock.sandbox import workdir
from airlock.sandbox.mnt import workspace_conflict
from airlock.sandbox.plan import KERNEL_TREES
from airlock.types import (
    AGENT_LIMITS,
    AgentContext,
    ExecuteRequest,
    Limits,
    PeerCred,
    ValidateRequest,
)

__all__ = [
    "AGENT_LIMITS",
    "MAX_ARG_STRLEN",
    "MAX_CWD_BYTES",
    "SHARED_PARENTS",
    "SYSTEM_TREES",
    "CheckedRequest",
    "check",
    "check_agent",
    "cwd_not_accessible",
]

_MAX_PATH = 4096
# The kernel's execve limits (docs/errors.md): one argument or environment string, its NUL
# included, is at most MAX_ARG_STRLEN (32 pages) bytes, so the command (bash's ``-c``
# argument) and each ``NAME=value`` are at most one byte less; all of them together, with a
# pointer each, must fit in ARG_MAX (a quarter of the stack limit). The sandbox adds a few
# strings of its own (``/bin/bash``, ``-c``, a default PATH): _EXEC_RESERVE keeps room.
MAX_ARG_STRLEN = 32 * 4096
_EXEC_RESERVE = 16 * 1024
# A working directory is one path the kernel accepts: PATH_MAX bytes with its NUL, and the
# resolver opens it as PATH + "/." (sandbox/workdir.py): 4,093 bytes.
MAX_CWD_BYTES = _MAX_PATH - 1 - len("/.")

# --- What is never a workspace (docs/policy-reference.md, "What is never a workspace") ---------
#
# The workspace is what a command is for: a dry run's changes in it are judged as the task's
# own, and Execute makes it writable. A directory of the system is never one. Compared with
# the resolved cwd by path and by device and inode (another mount of /etc is /etc).
#
# The system's own trees: the directory and everything below it.
SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/boot",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/snap",
    "/run/systemd",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/backups",
    "/var/opt",
)
# Directories that hold the system's trees or other people's (the parent of the home of the
# user the command runs as counts too): the directory itself. A directory below one may be a
# workspace (/home/alice/project, /srv/site, /var/www/site, /mnt/data/project). /tmp and
# /var/tmp are workspaces like any other: their changes are temporary-scope anyway, and a
# command there has only its user's rights over other users' files.
SHARED_PARENTS = ("/", "/var", "/home", "/srv", "/mnt", "/media", "/run", "/run/user", "/run/media")
_USE_INSTEAD = "a project directory (in your home, /srv/NAME, /var/www/NAME or /tmp/NAME)"


@dataclass(frozen=True, kw_only=True)
class CheckedRequest:
    """A checked Validate or Execute request, and who runs it."""

    command: str
    # Absolute, every symbolic link resolved (as the command's user), no "." or "..": where the
    # command runs. Execute binds exactly the directory (st_dev, st_ino) ``cwd_identity``.
    cwd: str
    cwd_identity: tuple[int, int]
    # What the changes are judged against: ``cwd``, or "" when cwd is a system directory
    # (SYSTEM_TREES, SHARED_PARENTS; a dry run only, Execute refuses it): then no change is
    # in the workspace.
    workspace: str
    env: tuple[tuple[str, str], ...]  # exactly the command's environment
    env_sha256: str  # of ``env``, as the audit log keeps it
    timeout_s: float  # the request's, or the daemon's default
    uid: int  # the identity the command runs as
    gid: int
    groups: tuple[int, ...]
    caller: PeerCred  # who asked (SO_PEERCRED)
    session_id: str = ""
    force_dry_run: bool = False  # Validate: dry-run even what the static pass denies
    approval_token: str = ""  # Execute: the approval the caller presents
    agent: AgentContext | None = None  # what made the agent ask (checked; None if empty)


def check(
    request: ValidateRequest | ExecuteRequest,
    peer: PeerCred,
    limits: Limits,
    *,
    protected: tuple[str, ...] = (),
    max_cwd_bytes: int = MAX_CWD_BYTES,
) -> CheckedRequest:
    """Check ``request`` for ``peer``: InvalidRequest or PermissionDenied names the field.

    The working directory is resolved once, with the rights of the user the command runs
    as (``sandbox.workdir``): one that user cannot enter, and one that does not exist, get
    the same answer (CWD_NOT_ACCESSIBLE). The resolved directory must not be on a kernel
    file system; Execute, which binds it read-write, also refuses a system directory
    (SYSTEM_TREES, SHARED_PARENTS) and, with ``protected`` (the daemon's socket and state
    directory, ``Engine.protected_paths``), one that contains one of those. A dry run shows
    the host only through overlays, where no host socket answers: there a system directory
    is only no workspace (``CheckedRequest.workspace`` is "").
    ``max_cwd_bytes``: the longest cwd, as asked and as resolved (Execute's is shorter:
    ``Engine.execute_cwd_bytes``).
    """
    _check_command(request.command, limits)
    agent = check_agent(request.agent)
    asked = _normal_cwd(request.cwd, max_cwd_bytes)
    uid, gid, groups = _identity(request.uid, request.gid, peer)
    execute = isinstance(request, ExecuteRequest)
    cwd, cwd_identity, system = _resolved_cwd(
        asked, uid, gid, groups, execute, protected, max_cwd_bytes
    )
    _check_env(request.env, limits)
    _check_exec_size(request.command, request.env)
    timeout = _effective_timeout(request.timeout_s, limits)
    return CheckedRequest(
        command=request.command,
        cwd=cwd,
        cwd_identity=cwd_identity,
        workspace="" if system else cwd,
        env=request.env,
        env_sha256=env_sha256(request.env),
        timeout_s=timeout,
        uid=uid,
        gid=gid,
        groups=groups,
        caller=peer,
        session_id=checked_id("session_id", request.session_id),
        force_dry_run=isinstance(request, ValidateRequest) and request.force_dry_run,
        approval_token=checked_id("approval_token", request.approval_token)
        if isinstance(request, ExecuteRequest)
        else "",
        agent=agent,
    )


def check_agent(agent: AgentContext | None) -> AgentContext | None:
    """The agent context as the audit log will keep it (None if absent or empty), or
    InvalidRequest (INVALID_AGENT_CONTEXT) naming the field over its limit."""
    if agent is None or agent.is_empty():
        return None
    for name, limit in AGENT_LIMITS.items():
        value: str = getattr(agent, name)
        if "\0" in value:
            raise _fail(f"agent.{name}", "contains a NUL character", "INVALID_AGENT_CONTEXT")
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > limit:
            raise _fail(
                f"agent.{name}",
                f"is {size} bytes; the limit is {limit}",
                "INVALID_AGENT_CONTEXT",
            )
    return agent


def _fail(field_name: str, why: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{field_name}: {why}", reason=reason)


def _check_command(command: str, limits: Limits) -> None:
    if not command.strip():
        raise _fail("command", "must not be empty", "INVALID_COMMAND")
    if "\0" in command:
        raise _fail("command", "contains a NUL byte", "INVALID_COMMAND")
    size = len(command.encode("utf-8", errors="surrogatepass"))
    limit = min(limits.command_bytes, MAX_ARG_STRLEN - 1)
    if size > limit:
        raise _fail("command", f"is {size} bytes; the limit is {limit}", "COMMAND_TOO_LARGE")


def _normal_cwd(cwd: str, max_bytes: int = MAX_CWD_BYTES) -> str:
    """The working directory as asked, normalised: absolute, no "." or "..", not a kernel tree.

    Nothing is looked up yet: ``_resolved_cwd`` does, as the command's user.
    """
    if not cwd:
        raise _fail("cwd", "is required (an absolute path of an existing directory)", "INVALID_CWD")
    if "\0" in cwd:
        raise _fail("cwd", "is not a valid path", "INVALID_CWD")
    size = len(cwd.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise _fail("cwd", f"is {size} bytes; the limit is {max_bytes}", "INVALID_CWD")
    if not cwd.startswith("/"):
        raise _fail("cwd", f"must be an absolute path, got {cwd!r}", "INVALID_CWD")
    cwd = posixpath.normpath(cwd)
    if cwd.startswith("//"):  # POSIX lets normpath keep two leading slashes; Linux does not care
        cwd = "/" + cwd.lstrip("/")
    _refuse_kernel_tree(cwd, cwd, "")
    return cwd


def _refuse_kernel_tree(asked: str, path: str, kernel_fs: str) -> None:
    """Refuse ``path`` (what ``asked`` resolved to) if it is on a kernel file system."""
    if kernel_fs or any(path == k or path.startswith(k + "/") for k in KERNEL_TREES):
        where = asked if asked == path else f"{asked} is {path}, which"
        fs = f" ({kernel_fs})" if kernel_fs else ""
        raise _fail(
            "cwd", f"{where} is on a kernel file system{fs}, not a workspace", "INVALID_CWD"
        )


def cwd_not_accessible(cwd: str, uid: int) -> InvalidRequest:
    """The one answer for a cwd ``uid`` cannot enter, whatever the reason.

    A directory that does not exist, is not a directory, or lies below one the user may
    not search: the same reason and the same words, so that the answer tells nothing of
    what lies where the caller cannot look (the engine gives it too, if the command
    cannot enter cwd in its sandbox).
    """
    return _fail(
        "cwd",
        f"uid {uid} cannot enter {cwd}: it does not exist, is not a directory, or uid {uid} "
        "may not search it or a directory above it",
        "CWD_NOT_ACCESSIBLE",
    )


def _resolved_cwd(
    asked: str,
    uid: int,
    gid: int,
    groups: tuple[int, ...],
    execute: bool,
    protected: tuple[str, ...],
    max_bytes: int = MAX_CWD_BYTES,
) -> tuple[str, tuple[int, int], str]:
    """(the resolved cwd, its (st_dev, st_ino), why it is no workspace or "").

    Resolved once, as ``uid``; every rule is checked on what that found: the resolved path
    and, through the open descriptor, the directory itself.
    """
    try:
        with workdir.resolve(asked, uid, gid, groups) as found:
            _refuse_kernel_tree(asked, found.path, found.kernel_fs)
            size = len(os.fsencode(found.path))
            if size > max_bytes:  # its symbolic links made it longer than the kernel takes
                raise _fail(
                    "cwd",
                    f"{asked} is {found.path[:64]}..., {size} bytes; the limit is {max_bytes}",
                    "INVALID_CWD",
                )
            if execute and protected:
                problem = workspace_conflict(found.fd, protected)
                if problem:
                    raise _fail(
                        "cwd",
                        f"Execute cannot run in {found.path}: {problem}, which a command run "
                        "there could reach; use a directory that holds neither the daemon's "
                        "socket nor its state",
                        "INVALID_CWD",
                    )
            system = _system_directory(found.path, found.identity, uid)
            if execute and system:
                raise _fail(
                    "cwd",
                    f"Execute cannot run in {found.path}: {system}, and Execute makes its "
                    f"working directory writable; run it in {_USE_INSTEAD}",
                    "INVALID_CWD",
                )
            return found.path, found.identity, system
    except workdir.NotAccessible:
        raise cwd_not_accessible(asked, uid) from None


def _system_directory(path: str, identity: tuple[int, int], uid: int) -> str:
    """Why the directory ``path`` (resolved; ``identity`` its device and inode) is the
    system's rather than a workspace, or "".

    By path, and by device and inode: another mount of a system directory is one too.
    """
    trees, parents = _listed_identities()
    home_parent = _home_parent(uid)
    if home_parent and (home_parent_id := _identity_of(home_parent)) is not None:
        parents = {**parents, home_parent_id: home_parent}
    parent = path if path in SHARED_PARENTS or path == home_parent else parents.get(identity)
    if parent:
        return f"it is {parent}, which holds the system's or other users' directories"
    chain = [path]
    while chain[-1] != "/":
        chain.append(posixpath.dirname(chain[-1]))
    tree = next((d for d in chain if d in SYSTEM_TREES), None)  # by path
    if tree is None:  # by device and inode: below another mount of one
        for here in chain:
            here_id = identity if here == path else _identity_of(here)
            if here_id is not None and (tree := trees.get(here_id)):
                break
    if tree:
        return f"it is a system directory ({tree} and everything below it belong to the system)"
    return ""


def _identity_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# The device and inode of each listed directory, looked up at most once a second: about 30
# stat calls, which would double the cost of a request's check. They change only when a
# listed directory is replaced or a file system is mounted on one; the paths themselves are
# compared on every request.
_IDENTITIES_TTL_S = 1.0
_identities: tuple[float, dict[tuple[int, int], str], dict[tuple[int, int], str]] = (
    -_IDENTITIES_TTL_S,
    {},
    {},
)


def _listed_identities() -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
    """({identity: tree} of SYSTEM_TREES, {identity: directory} of SHARED_PARENTS)."""
    global _identities
    now = time.monotonic()
    taken, trees, parents = _identities
    if now - taken >= _IDENTITIES_TTL_S:
        trees, parents = _identities_of(SYSTEM_TREES), _identities_of(SHARED_PARENTS)
        _identities = (now, trees, parents)
    return trees, parents


def _identities_of(paths: tuple[str, ...]) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {}
    for path in paths:
        if (path_id := _identity_of(path)) is not None:
            found.setdefault(path_id, path)
    return found


def _home_parent(uid: int) -> str:
    """The directory that holds the home of ``uid`` (/home for /home/alice), or ""."""
    try:
        home = posixpath.normpath(pwd.getpwuid(uid).pw_dir)
    except (KeyError, ValueError):
        return ""
    return posixpath.dirname(home) if home.startswith("/") and home != "/" else ""


def _check_env(env: tuple[tuple[str, str], ...], limits: Limits) -> None:
    env_size = 0
    for key, value in env:
        if not key:
            raise _fail("env", "has an empty variable name", "INVALID_ENV")
        if "=" in key or "\0" in key:
            raise _fail("env", f"variable name {key!r} contains '=' or a NUL byte", "INVALID_ENV")
        if "\0" in value:
            raise _fail("env", f"the value of {key} contains a NUL byte", "INVALID_ENV")
        one = len(key.encode()) + len(value.encode()) + 1  # NAME=value
        if one > MAX_ARG_STRLEN - 1:
            raise _fail(
                "env",
                f"{key}=... is {one} bytes; the kernel's limit for one variable is "
                f"{MAX_ARG_STRLEN - 1}",
                "INVALID_ENV",
            )
        env_size += one + 1
    if env_size > limits.env_bytes:
        raise _fail("env", f"is {env_size} bytes; the limit is {limits.env_bytes}", "INVALID_ENV")


def _check_exec_size(command: str, env: tuple[tuple[str, str], ...]) -> None:
    """The command and environment together within the kernel's ARG_MAX (this process's: the
    sandbox inherits its stack limit), strings, NULs and a pointer each, with room kept for
    the sandbox's own strings."""
    arg_max = os.sysconf("SC_ARG_MAX")
    total = len(command.encode("utf-8", errors="surrogatepass")) + 1 + 8
    total += sum(len(k.encode()) + len(v.encode()) + 2 + 8 for k, v in env)
    limit = arg_max - _EXEC_RESERVE
    if total > limit:
        raise _fail(
            "env",
            f"the command and environment take {total} bytes; the kernel's limit here "
            f"(ARG_MAX {arg_max}, less {_EXEC_RESERVE} for the sandbox) is {limit}",
            "INVALID_ENV",
        )


def _effective_timeout(timeout: float | None, limits: Limits) -> float:
    if timeout is None or timeout == 0:
        return limits.default_timeout_s
    if timeout < 0:
        raise _fail("timeout", f"must not be negative, got {timeout:g} s", "INVALID_TIMEOUT")
    if timeout > limits.max_timeout_s:
        raise _fail(
            "timeout",
            f"{timeout:g} s is above the daemon's maximum of {limits.max_timeout_s:g} s",
            "INVALID_TIMEOUT",
        )
    return timeout


def _identity(uid: int | None, gid: int | None, peer: PeerCred) -> tuple[int, int, tuple[int, ...]]:
    """(uid, gid, groups) to run as: the caller; only a root caller may name another uid or gid."""
    if peer.uid != 0:
        if uid is not None and uid != peer.uid:
            raise PermissionDenied(
                f"uid: only root may run commands as another user (you are uid {peer.uid})",
                reason="UID_NOT_ALLOWED",
            )
        if gid is not None and gid != peer.gid:
            raise PermissionDenied(
                f"gid: only root may run commands as another group (you are gid {peer.gid})",
                reason="UID_NOT_ALLOWED",
            )
        return peer.uid, peer.gid, _caller_groups(peer)
    if uid is None:
        gid = peer.gid if gid is None else gid
        return peer.uid, gid, _caller_groups(peer) if gid == peer.gid else (gid,)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise _fail("uid", f"no user has id {uid}", "UNKNOWN_USER") from None
    if gid is None:
        gid = entry.pw_gid
    else:
        try:
            grp.getgrgid(gid)
        except KeyError:
            raise _fail("gid", f"no group has id {gid}", "UNKNOWN_GROUP") from None
    return uid, gid, tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))


def _caller_groups(peer: PeerCred) -> tuple[int, ...]:
    """The caller's supplementary groups as the kernel reported them at connect (SO_PEERGROUPS):
    never looked up again by pid, which another process may hold by now."""
    return tuple(sorted(set(peer.groups) | {peer.gid}))
