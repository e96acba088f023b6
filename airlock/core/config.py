"""The daemon's configuration: what ``airlockd``'s flags and configuration file decide."""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field

from airlock.types import Limits

__all__ = ["DaemonConfig"]


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str = "/run/airlock/airlock.sock"
    state_dir: str = "/var/lib/airlock"
    socket_mode: int = 0o660
    socket_gid: int | None = None
    limits: Limits = field(default_factory=Limits)
    # Sandboxes the spawner keeps prepared ahead of requests (0: prepare on demand).
    warm_pool: int = 2
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
