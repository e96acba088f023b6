"""One request, one spelling: a Validate or Execute request, checked once per call.

:func:`check` turns what the client sent (``airlock.types``), the caller's kernel
credentials and the daemon's limits into a :class:`CheckedRequest`, or refuses it with
an error naming the field. That one value is what every later step sees: the engine
(plan, dry run, Execute), the workflow record, the audit events and the approvals. So
the working directory is spelled the same everywhere (``//tmp/./x/..`` is ``/tmp``
for the sandbox, the state store, the log and the token check alike), and the
environment is hashed once.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
from dataclasses import dataclass

from airlock._errors import InvalidRequest, PermissionDenied
from airlock.audit import env_sha256
from airlock.sandbox.mnt import workspace_conflict
from airlock.sandbox.plan import KERNEL_TREES
from airlock.types import ExecuteRequest, Limits, PeerCred, ValidateRequest

__all__ = ["CheckedRequest", "check"]

_MAX_PATH = 4096


@dataclass(frozen=True, kw_only=True)
class CheckedRequest:
    """A checked Validate or Execute request, and who runs it."""

    command: str
    cwd: str  # absolute and normalised: the workspace
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


def check(
    request: ValidateRequest | ExecuteRequest,
    peer: PeerCred,
    limits: Limits,
    *,
    protected: tuple[str, ...] = (),
) -> CheckedRequest:
    """Check ``request`` for ``peer``: InvalidRequest or PermissionDenied names the field.

    ``protected``: what an Execute's working directory must not contain (the daemon's socket
    and state directory, ``Engine.protected_paths``): Execute binds it read-write. A dry run
    shows the host only through overlays, where no host socket answers, so any cwd is fine.
    """
    _check_command(request.command, limits)
    cwd = _checked_cwd(request.cwd)
    if isinstance(request, ExecuteRequest) and protected:
        problem = workspace_conflict(cwd, protected)
        if problem:
            raise _fail(
                "cwd",
                f"Execute cannot run in {cwd}: {problem}, which a command run there could "
                "reach; use a directory that holds neither the daemon's socket nor its state",
                "INVALID_CWD",
            )
    _check_env(request.env, limits)
    timeout = _effective_timeout(request.timeout_s, limits)
    uid, gid, groups = _identity(request.uid, request.gid, peer)
    return CheckedRequest(
        command=request.command,
        cwd=cwd,
        env=request.env,
        env_sha256=env_sha256(request.env),
        timeout_s=timeout,
        uid=uid,
        gid=gid,
        groups=groups,
        caller=peer,
        session_id=request.session_id,
        force_dry_run=isinstance(request, ValidateRequest) and request.force_dry_run,
        approval_token=request.approval_token if isinstance(request, ExecuteRequest) else "",
    )


def _fail(field_name: str, why: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{field_name}: {why}", reason=reason)


def _check_command(command: str, limits: Limits) -> None:
    if not command.strip():
        raise _fail("command", "must not be empty", "INVALID_COMMAND")
    if "\0" in command:
        raise _fail("command", "contains a NUL byte", "INVALID_COMMAND")
    size = len(command.encode("utf-8", errors="surrogatepass"))
    if size > limits.command_bytes:
        raise _fail(
            "command", f"is {size} bytes; the limit is {limits.command_bytes}", "COMMAND_TOO_LARGE"
        )


def _checked_cwd(cwd: str) -> str:
    """The normalised working directory: absolute, an existing directory, not a kernel tree."""
    if not cwd:
        raise _fail("cwd", "is required (an absolute path of an existing directory)", "INVALID_CWD")
    if "\0" in cwd or len(cwd) > _MAX_PATH:
        raise _fail("cwd", "is not a valid path", "INVALID_CWD")
    if not cwd.startswith("/"):
        raise _fail("cwd", f"must be an absolute path, got {cwd!r}", "INVALID_CWD")
    cwd = posixpath.normpath(cwd)
    if cwd.startswith("//"):  # POSIX lets normpath keep two leading slashes; Linux does not care
        cwd = "/" + cwd.lstrip("/")
    if any(cwd == k or cwd.startswith(k + "/") for k in KERNEL_TREES):
        raise _fail("cwd", f"{cwd} is on a kernel file system, not a workspace", "INVALID_CWD")
    if not os.path.exists(cwd):
        raise _fail("cwd", f"{cwd} does not exist", "INVALID_CWD")
    if not os.path.isdir(cwd):
        raise _fail("cwd", f"{cwd} is not a directory", "INVALID_CWD")
    return cwd


def _check_env(env: tuple[tuple[str, str], ...], limits: Limits) -> None:
    env_size = 0
    for key, value in env:
        if not key:
            raise _fail("env", "has an empty variable name", "INVALID_ENV")
        if "=" in key or "\0" in key:
            raise _fail("env", f"variable name {key!r} contains '=' or a NUL byte", "INVALID_ENV")
        if "\0" in value:
            raise _fail("env", f"the value of {key} contains a NUL byte", "INVALID_ENV")
        env_size += len(key.encode()) + len(value.encode()) + 2
    if env_size > limits.env_bytes:
        raise _fail("env", f"is {env_size} bytes; the limit is {limits.env_bytes}", "INVALID_ENV")


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
