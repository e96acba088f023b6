"""The daemon's configuration: what ``airlockd``'s flags and configuration file decide."""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field

from airlock._errors import PermissionDenied
from airlock.types import Limits, PeerCred

__all__ = ["Approvers", "DaemonConfig"]


@dataclass(frozen=True)
class Approvers:
    """Who may approve a validation the policy asked about: a principal apart from the asker.

    ``uids`` and ``gids`` name the approvers (root is always one: it can rewrite this
    configuration anyway); a caller is one by its kernel credentials at connect
    (SO_PEERCRED, SO_PEERGROUPS: its uid, its gid or a supplementary group). Nobody
    approves a validation of their own uid, root included (an agent must not approve
    its own ask), unless ``allow_self_approval``: then the validation's own uid may
    approve it, as before approvers existed. Non-approvers never approve another uid's.
    """

    uids: tuple[int, ...] = (0,)
    gids: tuple[int, ...] = ()
    allow_self_approval: bool = False

    def is_approver(self, peer: PeerCred) -> bool:
        if peer.uid == 0 or peer.uid in self.uids:
            return True
        return any(g in self.gids for g in (peer.gid, *peer.groups))

    def how(self, peer: PeerCred, owner_uid: int) -> str:
        """Why ``peer`` may approve a validation of ``owner_uid`` (for the audit log);
        ``PermissionDenied`` if it may not."""
        if peer.uid == owner_uid:
            if not self.allow_self_approval:
                raise PermissionDenied(
                    f"uid {peer.uid} asked for this validation, so it may not approve it: an "
                    "agent must not approve its own ask. An approver (root"
                    + (
                        ", or one the daemon's approvers/approver-groups name"
                        if self.uids != (0,) or self.gids
                        else ""
                    )
                    + ") must run `airlock approve ID` as another user, or the operator must "
                    "set allow-self-approval",
                    reason="SELF_APPROVAL_NOT_ALLOWED",
                )
            return "self-approval (allow-self-approval is set)"
        if not self.is_approver(peer):
            raise PermissionDenied(
                f"uid {peer.uid} may not approve a validation of uid {owner_uid}: it is not "
                "one of the daemon's approvers (approvers, approver-groups in airlockd.toml; "
                "default root only)",
                reason="NOT_AN_APPROVER",
            )
        return "approver"


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str = "/run/airlock/airlock.sock"
    state_dir: str = "/var/lib/airlock"
    socket_mode: int = 0o660
    socket_gid: int | None = None
    limits: Limits = field(default_factory=Limits)
    # Sandboxes the spawner keeps prepared ahead of requests (0: prepare on demand).
    warm_pool: int = 2
    # Seconds a warm sandbox may wait unused before it is retired (it pins the host's mounts;
    # a change of the mount table retires the pool at once anyway).
    warm_idle_s: float = 30.0
    # The policy directory; None: the shipped default policy.
    policy_dir: str | None = None
    # Record every process a dry run starts (sandbox/proctrace.py).
    trace_processes: bool = True
    # Record every network attempt (sandbox/netcap.py) and opens of sensitive files
    # (sandbox/reads.py).
    capture_network: bool = True
    capture_reads: bool = True
    # Tests only: names the egress relay resolves to these addresses instead of asking the
    # host's resolver (``--test-resolve NAME=ADDR``); the address checks still apply.
    test_resolve: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Keep each dry run's changes for Apply (under state_dir/changesets), up to this many.
    keep_changes: bool = True
    keep_changes_max: int = 2000
    # The space the kept changes may take in all, and the percent of it one uid's may take:
    # past its share, a uid's validations still succeed, without their changes kept.
    keep_changes_quota_bytes: int = 2 * 1024**3
    keep_changes_share_per_uid: int = 25
    # Connections on the public socket: in all, per non-root uid (root keeps the last eighth
    # of max_connections for itself), and how long one may stay silent before its first call.
    max_connections: int = 512
    max_connections_per_uid: int = 64
    first_request_timeout_s: float = 10.0
    # Who may approve an ask (not the asker's uid, unless allow_self_approval).
    approvers: Approvers = field(default_factory=Approvers)
    # Start even if the audit log does not reach the head the state store recorded (an
    # operator starting a new log on purpose: ``airlockd --new-audit-log``, never a file key).
    new_audit_log: bool = False

    @property
    def keep_changes_uid_quota_bytes(self) -> int:
        """The most bytes of kept changes one uid's validations may hold at once."""
        return self.keep_changes_quota_bytes * self.keep_changes_share_per_uid // 100

    @property
    def changesets_dir(self) -> str:
        return posixpath.join(self.state_dir, "changesets")

    @property
    def scratch_dir(self) -> str:
        return posixpath.join(self.state_dir, "scratch")

    @property
    def cgroup_group(self) -> str:
        """One cgroup parent per state directory, so two daemons never sweep each other."""
        digest = hashlib.sha256(os.fsencode(os.path.realpath(self.state_dir))).hexdigest()
        return f"airlock-{digest[:12]}"
