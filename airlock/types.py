"""Frozen dataclasses and enums: Airlock's inside representation.

Protobuf messages exist only at the edge; ``airlock.api.convert`` is the one module
that converts between them and these types. The sandbox, policy and engine code
see only these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Re-exported unchanged: defined apart so that ``airlock hook`` need not import this module.
from airlock._vocab import AGENT_LIMITS as AGENT_LIMITS
from airlock._vocab import FindingSource as FindingSource
from airlock._vocab import Severity as Severity
from airlock._vocab import Verdict as Verdict


class ChangeKind(enum.IntEnum):
    CREATED = 1
    MODIFIED = 2
    DELETED = 3
    METADATA_CHANGED = 4


class FileType(enum.IntEnum):
    NONE = 0
    REGULAR = 1
    DIRECTORY = 2
    SYMLINK = 3
    OTHER = 4


class OtherType(enum.IntEnum):
    """What an entry of :attr:`FileType.OTHER` is (NONE: not such an entry, or unknown)."""

    NONE = 0
    CHAR_DEVICE = 1
    BLOCK_DEVICE = 2
    FIFO = 3
    SOCKET = 4


class Termination(enum.IntEnum):
    EXITED = 1
    SIGNALED = 2
    TIMED_OUT = 3
    OUT_OF_MEMORY = 4
    CANCELLED = 5


class DryRunSkip(enum.IntEnum):
    """Why a validation did not run the command in the sandbox (NONE: it did)."""

    NONE = 0
    STATIC_DENY = 1
    READ_ONLY = 2


class ActionClass(enum.IntEnum):
    """What a command does, least to most powerful."""

    READ = 1
    WRITE = 2
    EXECUTE = 3
    ADMIN = 4


class RiskTier(enum.IntEnum):
    """How bad it is if the command is wrong, least to most."""

    SAFE = 1
    DESTRUCTIVE = 2
    IRREVERSIBLE = 3
    SENSITIVE = 4


class Scope(enum.IntEnum):
    """How far the command reaches, narrowest to widest."""

    WORKSPACE = 1
    REPOSITORY = 2
    USER_HOME = 3
    SYSTEM = 4
    NETWORK = 5


class CgroupVersion(enum.IntEnum):
    NONE = 0
    V1 = 1
    V2 = 2


@dataclass(frozen=True)
class PeerCred:
    """Who is calling, as the kernel reported it when the connection was accepted.

    ``pid``, ``uid`` and ``gid`` from SO_PEERCRED, ``groups`` (the supplementary groups) from
    SO_PEERGROUPS: all four are the connecting process's at ``connect(2)``, captured once and
    never looked up again by pid (a pid can be reused by another process).
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class AgentContext:
    """What made an agent run a command, as its hook or client reports it (not verified).

    Every field is optional and length-capped (``airlock.core.request.AGENT_LIMITS``);
    the audit log keeps it with the call so that an auditor can tell which agent session
    and which tool call ran a command.
    """

    agent_name: str = ""  # "claude-code", "codex", "gemini-cli", "cursor", "mcp", ...
    agent_version: str = ""
    session_id: str = ""  # the agent's own session (conversation) id
    tool_use_id: str = ""  # the id of the tool call, where the agent has one
    tool_description: str = ""  # the tool call's own description (Claude's tool_input.description)
    transcript_path: str = ""  # where the agent keeps the conversation's transcript
    prompt_excerpt: str = ""  # an excerpt of the prompt behind the call (capped)

    def is_empty(self) -> bool:
        return not any(
            (
                self.agent_name,
                self.agent_version,
                self.session_id,
                self.tool_use_id,
                self.tool_description,
                self.transcript_path,
                self.prompt_excerpt,
            )
        )


@dataclass(frozen=True)
class ValidateRequest:
    """A Validate request as the client sent it; ``airlock.core.request.check`` checks it."""

    command: str
    cwd: str
    env: tuple[tuple[str, str], ...]
    timeout_s: float | None = None
    uid: int | None = None
    gid: int | None = None
    force_dry_run: bool = False
    session_id: str = ""
    agent: AgentContext | None = None  # what made the agent ask, if it says


@dataclass(frozen=True)
class Finding:
    rule_id: str
    verdict: Verdict
    severity: Severity
    message: str
    source: FindingSource
    subcommand: str = ""
    span: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class FileChange:
    """One change to the file system, as seen from the host's paths."""

    path: bytes
    kind: ChangeKind
    file_type: FileType
    previous_file_type: FileType = FileType.NONE
    in_workspace: bool = False
    size_before: int | None = None
    size_after: int | None = None
    sha256_after: str = ""
    mode_before: int | None = None
    mode_after: int | None = None
    uid_after: int | None = None
    gid_after: int | None = None
    symlink_target: bytes = b""
    unified_diff: str = ""
    binary: bool = False
    diff_truncated: bool = False
    entries_deleted: int = 0
    # The caller may not read this file's content (the new, or the old it replaces): no diff
    # and no hash of what it may not read are given, and the change is not kept for Apply.
    unreadable: bool = False
    # For a FileType.OTHER entry (after the change; before it for a deletion): a device node,
    # FIFO or socket.
    other_type: OtherType = OtherType.NONE
    # A regular file's file capabilities after the change (its ``security.capability``
    # extended attribute, as text: "cap_net_raw=ep"); "" when it has none.
    capabilities: str = ""
    # A non-directory with more than one name (hard links) after the change: how many it has
    # in the dry run's upper layer (a copy-up breaks host links, so the command made them);
    # 0 for one name, a directory, a deletion, or not counted.
    links: int = 0
    # When ``links`` > 1: another name of the same file the dry run shows (one outside the
    # workspace if there is one), such as /etc/shadow for ``ln /etc/shadow x``; b"" if none.
    linked_to: bytes = b""


@dataclass(frozen=True)
class Timings:
    static_analysis_s: float = 0.0
    sandbox_s: float = 0.0
    diff_s: float = 0.0
    total_s: float = 0.0
    sandbox_setup_s: float = 0.0
    command_s: float = 0.0
    warm: bool = False


@dataclass(frozen=True)
class ResourceUsage:
    peak_memory_bytes: int = 0
    cpu_time_s: float = 0.0
    memory_limit_hit: bool = False
    pids_limit_hit: bool = False
    scratch_bytes_used: int = 0


@dataclass(frozen=True)
class ProcessInfo:
    """One process the command started in the sandbox (times from the command's start)."""

    pid: int | None
    ppid: int | None
    argv: tuple[bytes, ...]
    executables: tuple[bytes, ...] = ()
    cwd: bytes = b""
    uid: int | None = None
    started_s: float | None = None
    ended_s: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    outlived_command: bool = False
    killed_by_timeout: bool = False
    argv_truncated: bool = False


@dataclass(frozen=True)
class SensitiveReadInfo:
    """A sensitive file a process of the command opened."""

    path: bytes
    pid: int | None
    argv: tuple[bytes, ...] = ()
    count: int = 1


class NetProtocol(enum.IntEnum):
    DNS = 1
    TCP = 2
    UDP = 3
    UNIX = 4  # a dry run's connection to a host Unix socket: address = its path


@dataclass(frozen=True)
class NetworkAttemptInfo:
    """One DNS query, TCP connection or UDP datagram the command tried to send out.

    Without an egress grant nothing left the machine (the dry run's network is a recording
    sinkhole); a connection a grant allowed was forwarded (``forwarded``) under ``grant``.
    """

    protocol: NetProtocol
    # The resolver for DNS; the original destination otherwise.
    address: str
    port: int
    # DNS: the name asked for. TCP/UDP: the name whose (fake) answer was ``address``.
    dns_name: str = ""
    dns_type: str = ""
    # The first bytes sent (at most 4 KiB); for DNS the query.
    payload_prefix: bytes = b""
    sni: str = ""
    http_method: str = ""
    http_host: str = ""
    http_path: str = ""
    bytes_sent: int = 0
    # Seconds since the command started.
    time_s: float = 0.0
    # Egress (airlock/egress.py): whether bytes went to the real destination, the grant that
    # allowed it (a preset's name, an allow entry's name or FILE:LINE), why it was refused or
    # cut (a code of airlock.egress.REFUSALS; with no grant every attempt is "no-grant") and
    # a sentence; what came back; the real address connected to.
    forwarded: bool = False
    grant: str = ""
    refusal: str = ""
    refusal_detail: str = ""
    bytes_received: int = 0
    upstream_address: str = ""

    @property
    def host(self) -> str:
        """The best name for the destination: TLS SNI, HTTP Host, DNS name, else the address."""
        return self.sni or self.http_host.rsplit(":", 1)[0] or self.dns_name or self.address


class LostKind(enum.IntEnum):
    """What a dry run would destroy in a git repository that exists nowhere else."""

    UNCOMMITTED = 1  # a tracked file's changes not in any commit (unstaged or staged)
    UNTRACKED = 2  # an untracked file git does not ignore
    IGNORED = 3  # an ignored file (build output, caches, .env): the policy decides
    COMMITS = 4  # commits no ref (branch, tag, HEAD, stash) reaches any more
    STASH = 5  # stash entries dropped and not applied
    UNCHECKED = 6  # the check could not tell (time or size bound, no git): ``detail`` says why


@dataclass(frozen=True)
class LostWork:
    """One loss of work the dry run found by comparing a repository before and after.

    ``repo`` is the work tree's host path; ``path`` the file's (UNCOMMITTED, UNTRACKED,
    IGNORED: a directory's path ends with "/"); ``count`` the commits or stash entries."""

    kind: LostKind
    repo: bytes
    path: bytes = b""
    count: int = 1
    detail: str = ""


@dataclass(frozen=True)
class Effects:
    """What a dry run did, as the effect rules see it. Paths are host paths."""

    workspace: str
    home: str
    changes: tuple[FileChange, ...] = ()
    processes: tuple[ProcessInfo, ...] = ()
    network: tuple[NetworkAttemptInfo, ...] = ()
    sensitive_reads: tuple[SensitiveReadInfo, ...] = ()
    # The policy's filesystem grants (``writable_paths``) for this caller, absolute: changes
    # below them are in the ``granted`` scope, not ``home``.
    granted: tuple[str, ...] = ()
    # Work the run would destroy in a git repository (airlock/sandbox/gitloss.py).
    work_lost: tuple[LostWork, ...] = ()
    # The uid the command ran as (a change's ``owner``: the caller, or another user); None:
    # not known, every owner counts as another user's (fail closed).
    uid: int | None = None


@dataclass(frozen=True)
class StaticSummary:
    """The static pass's view of a command line, as reported to clients."""

    command_count: int = 0
    command_names: tuple[str, ...] = ()
    action: ActionClass = ActionClass.READ
    risk: RiskTier = RiskTier.SAFE
    scope: Scope = Scope.WORKSPACE
    read_only: bool = False


@dataclass(frozen=True)
class PolicyInfo:
    """The policy bundle in force (GetPolicy)."""

    version: str
    directory: str
    files: tuple[str, ...]
    rule_count: int
    loaded_at: float  # seconds since the epoch
    last_reload_error: str = ""
    last_reload_at: float = 0.0
    # The last reload kept the bundle in force (invalid, still changing, or it dropped
    # files or rules without the operator's acceptance): ``last_reload_error`` says why.
    last_reload_refused: bool = False
    # The version the last reload read (the one refused, or the one now in force).
    last_reload_version: str = ""
    # What the last reload changed (or, refused, would have changed): rule ids, files.
    rules_added: tuple[str, ...] = ()
    rules_removed: tuple[str, ...] = ()
    files_added: tuple[str, ...] = ()
    files_removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Validation:
    """The result of one ``Validate``: the dry run, its changes and the verdict."""

    validation_id: str
    verdict: Verdict
    summary: str
    findings: tuple[Finding, ...] = ()
    sandboxed: bool = True
    termination: Termination = Termination.EXITED
    exit_code: int = -1
    signal: int = 0
    stdout: bytes = b""
    stdout_truncated: bool = False
    stderr: bytes = b""
    stderr_truncated: bool = False
    changes: tuple[FileChange, ...] = ()
    changes_truncated: bool = False
    timings: Timings = field(default_factory=Timings)
    resource_usage: ResourceUsage = field(default_factory=ResourceUsage)
    uid: int = 0
    gid: int = 0
    dry_run_skip: DryRunSkip = DryRunSkip.NONE
    static: StaticSummary = field(default_factory=StaticSummary)
    policy_version: str = ""
    processes: tuple[ProcessInfo, ...] = ()
    processes_truncated: bool = False
    sensitive_reads: tuple[SensitiveReadInfo, ...] = ()
    sensitive_reads_incomplete: bool = False
    network_attempts: tuple[NetworkAttemptInfo, ...] = ()
    # Attempts that were made but not recorded (past the bound, or lost in a flood).
    network_attempts_lost: int = 0
    # The dry run's changes are kept for Apply (until they expire); their digest, which an
    # approval binds to. Not kept: "" and why in changes_not_kept.
    changes_digest: str = ""
    changes_not_kept: str = ""
    # Internal (not sent to clients): where they are kept, and how many bytes.
    changeset_dir: str = ""
    changeset_bytes: int = 0


@dataclass(frozen=True)
class ExecuteRequest:
    """An Execute request as sent: a command to run for real, and what authorizes it."""

    command: str
    cwd: str
    env: tuple[tuple[str, str], ...]
    timeout_s: float | None = None
    uid: int | None = None
    gid: int | None = None
    # An approval token from Approve, needed when the policy asks about the command.
    approval_token: str = ""
    # The caller's session: a SESSION approval covers matching commands in it.
    session_id: str = ""
    agent: AgentContext | None = None  # what made the agent ask, if it says

    def as_validate(self) -> ValidateRequest:
        return ValidateRequest(
            command=self.command,
            cwd=self.cwd,
            env=self.env,
            timeout_s=self.timeout_s,
            uid=self.uid,
            gid=self.gid,
        )


@dataclass(frozen=True)
class ExecStarted:
    """The command passed the policy and is starting."""

    execution_id: str
    verdict: Verdict
    # How it was authorized: "POLICY_ALLOWED", "AUTO_APPROVED", "USER_VERIFIED", "SESSION_GRANTED".
    authorization: str
    findings: tuple[Finding, ...] = ()
    uid: int = 0
    gid: int = 0
    policy_version: str = ""


@dataclass(frozen=True)
class ExecOutput:
    """A chunk of output, in the order it was read."""

    stream: int  # 1 stdout, 2 stderr
    time_s: float  # since the command started
    data: bytes


@dataclass(frozen=True)
class ExecFinished:
    termination: Termination
    exit_code: int
    signal: int
    wall_s: float
    resource_usage: ResourceUsage
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    # Whether the sandbox was prepared before the request arrived.
    warm: bool = False
    # Every network attempt of the run (each was also sent as an event when it completed),
    # and how many more there were than the recorder keeps.
    network_attempts: tuple[NetworkAttemptInfo, ...] = ()
    network_attempts_lost: int = 0


ExecEvent = ExecStarted | ExecOutput | NetworkAttemptInfo | ProcessInfo | ExecFinished


class ApprovalScope(enum.IntEnum):
    ONCE = 1  # one Execute or one Apply of this validation
    SESSION = 2  # the same command, cwd and policy version, for the rest of the session


@dataclass(frozen=True)
class ApprovalGrant:
    """What Approve returns: the token (shown once) and its bounds."""

    approval_token: str
    approval_id: str
    expires_at: float  # seconds since the epoch
    approver_uid: int


@dataclass(frozen=True)
class PendingValidation:
    """A validation waiting for an approval (ListPendingValidations, WatchPendingValidations)."""

    validation_id: str
    command: str
    cwd: str
    uid: int  # who asked: the user the command runs as
    gid: int
    session_id: str
    summary: str
    created_at: float  # seconds since the epoch
    expires_at: float
    agent: AgentContext | None = None
    # The dry run's whole answer (findings, changes and diffs, network attempts), while the
    # daemon still holds it in memory (not after a restart: then None, and ``summary`` stays).
    validation: Validation | None = None


@dataclass(frozen=True)
class ApplyOutcome:
    """What Apply wrote (or, replayed, what the first Apply of the validation wrote)."""

    validation_id: str
    applied_paths: tuple[bytes, ...]
    replayed: bool = False
    bytes_written: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class Limits:
    """The bounds the daemon enforces; the daemon's configuration sets them."""

    default_timeout_s: float = 30.0
    max_timeout_s: float = 300.0
    memory_bytes: int = 2 * 1024**3
    pids: int = 1024
    scratch_bytes: int = 512 * 1024**2
    output_bytes: int = 1024**2
    # Execute streams its output instead of keeping it: a larger cap per stream.
    execute_output_bytes: int = 1024**3
    command_bytes: int = 128 * 1024 - 1  # the kernel's MAX_ARG_STRLEN, less its NUL
    concurrent_validations: int = 16
    changes: int = 10_000
    diff_file_bytes: int = 64 * 1024
    diff_total_bytes: int = 1024**2
    env_bytes: int = 256 * 1024


@dataclass(frozen=True)
class Capabilities:
    daemon_version: str
    kernel_release: str
    namespaces: tuple[str, ...]
    overlayfs: bool
    cgroup_version: CgroupVersion
    cgroup_controllers: tuple[str, ...]
    seccomp: bool
    seccomp_user_notification: bool
    limits: Limits
    # Whether a validation's own uid may approve it (the daemon's allow-self-approval).
    allow_self_approval: bool = False
