"""Durable workflow state: validations, approvals and apply results in one SQLite file.

A daemon restart loses nothing and a retried Apply never applies twice: every state
change is one ``BEGIN IMMEDIATE`` transaction, committed (WAL, ``synchronous=FULL``:
fsynced) before the call returns, and every check that guards a change (state, owner,
expiry, token) runs inside that same transaction. The one exception is a new validation,
committed without the fsync: a crash of the machine (not of the daemon) right after may lose
it, and it is then unknown (NOT_FOUND), never in another state (docs/decisions.md section 15).
The store is thread-safe (one connection behind a lock) and several stores may share a file
(SQLite's own locking serializes their transactions).

The life of a validation::

      record_validation (verdict ASK)    (verdict ALLOW)          (verdict DENY)
                  |                            |                        |
                  |  a live SESSION grant      |                        |
                  |  covers it ----------+     |                        |
                  v                      |     v                        v
          PENDING_APPROVAL               |  ALLOWED                  DENIED
                  | approve              |     |                   (never approved
                  v                      v     |                    nor applied)
              APPROVED <------+  approve again |
                  |   |_______|                |
                  | begin_apply                | begin_apply
                  v                            v
              APPLYING ------ abort_apply ---> back to APPROVED / ALLOWED
                  |      \\                    (nothing was written; the approval
     finish_apply |       \\ recover()          the apply used is usable again)
                  v        v (daemon restart)
              APPLIED    APPLY_INTERRUPTED

    discard:  PENDING_APPROVAL, APPROVED, ALLOWED, DENIED, APPLY_INTERRUPTED -> DISCARDED
    expire:   the same states, once past their time to live                   -> EXPIRED
    APPLIED, DISCARDED and EXPIRED are final. Every other transition is refused
    with an error whose reason names the state (nothing changes).

Apply is idempotent: ``begin_apply`` on an APPLIED validation returns the first
result (:class:`ApplyDone`) and applies nothing; on an APPLYING one it refuses
(``APPLY_IN_PROGRESS``). A crash mid-apply leaves the row APPLYING; ``recover`` (run
at start-up, while the daemon holds the state directory's lock, so that no apply is
really in flight) moves it to APPLY_INTERRUPTED, and Apply then refuses for good with
``APPLY_INTERRUPTED``: some of the changes may be on the host, so a person must check
it, then discard the validation and validate again. Before that, the workflow settles
what it can (``Workflow.recover``: ``applying`` lists them): an apply rolled forward on
the host ends with ``finish_apply``, one rolled back with ``abort_apply``; only those
recovery could not settle reach APPLY_INTERRUPTED.

Approvals. ``approve`` returns a random token (256 bits, URL-safe) of which only the
SHA-256 is stored. The token is bound to the validation's uid, command, cwd, policy
version and diff hash (and, for SESSION scope, its session). A ONCE approval
authorizes exactly one effect: either one Execute (``authorize`` with its token) or
the validation's Apply, whichever comes first, and only while the validation is
APPROVED and unexpired. A SESSION approval lets commands with the same command line,
cwd, policy version and uid run in the same session (Execute without a token, and
new ASK validations start APPROVED) until ``end_session`` or its own expiry.

Who may act: the validation's caller (same uid) or root approves, applies and
discards it. That an approval came from a person, not from the agent under the same
uid, is for the caller of ``approve`` to establish (for example by the client
certificate it records as ``approver_subject``).

Changesets (the dry run's upper directory) belong to the caller: the store only
records where each is and how big, refuses a new one beyond the quota (the total, or the
share of one uid), and hands the directory back (``discard``, ``expire``,
``finish_apply``) for the caller to delete. A validation recorded without its changes
says why in ``changes_not_kept``: Apply then refuses it (``CHANGES_NOT_KEPT``) with that
reason, rather than applying nothing.

Special files (:mod:`airlock._special`: setuid, setgid, file capabilities, device nodes,
FIFOs, sockets) are recorded with each validation; an approval may name some of them
(``special_paths``), and only those are handed to Apply (``begin_apply``'s record's
``approved_special``), which writes no other privileged one (FIFOs and sockets need no
approval). An ALLOW validation needs no approval, but may get one that names its special
files (its state becomes APPROVED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from airlock import _sqlite
from airlock._errors import (
    AirlockError,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
)
from airlock._notkept import not_kept_advice
from airlock._special import PRIVILEGED
from airlock.audit.model import Anchor, Authorization
from airlock.types import ApprovalScope, Verdict

__all__ = [
    "DEFAULT_QUOTA_BYTES",
    "DEFAULT_SESSION_TTL_S",
    "DEFAULT_TTL_S",
    "STATE_FILE",
    "ApplyDone",
    "ApprovalRecord",
    "ApprovalScope",
    "AuthContext",
    "NewValidation",
    "SpecialChange",
    "StateError",
    "StateStore",
    "ValidationRecord",
    "ValidationState",
]

STATE_FILE = "state.db"
DEFAULT_TTL_S = 15 * 60.0
DEFAULT_SESSION_TTL_S = 60 * 60.0
DEFAULT_QUOTA_BYTES = 2 * 1024**3
TOKEN_BYTES = 32
_APPLICATION_ID = 0x41535441  # "ASTA" in the database header
_SCHEMA_VERSION = 2
_MAX_ID_CHARS = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Why an action was authorized; the same enum the audit log records.
AuthContext = Authorization


def new_token() -> str:
    """A new approval token: ``TOKEN_BYTES`` random bytes, URL-safe base64, never beginning
    with ``-``. One in 64 would, and a command line cannot pass it as an option's value
    (``airlock run --token -x...`` reads it as another option); drawing again costs the
    token log2(64/63) bits, 0.02 of its 256."""
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if not token.startswith("-"):
            return token


class ValidationState(enum.StrEnum):
    """Where a validation is in its life (see the diagram in the module docstring)."""

    PENDING_APPROVAL = "PENDING_APPROVAL"  # verdict ASK: waits for an approval
    APPROVED = "APPROVED"  # approved (or covered by a session grant): may be applied
    ALLOWED = "ALLOWED"  # verdict ALLOW: may be applied without an approval
    DENIED = "DENIED"  # verdict DENY: can never be approved or applied
    APPLYING = "APPLYING"  # an apply is in progress
    APPLIED = "APPLIED"  # applied; the result is stored (final)
    APPLY_INTERRUPTED = "APPLY_INTERRUPTED"  # the daemon stopped mid-apply: check the host
    DISCARDED = "DISCARDED"  # its changes were dropped (final)
    EXPIRED = "EXPIRED"  # its time to live passed; changes dropped (final)


# States whose changeset is still on disk (they count against the quota).
_LIVE = (
    ValidationState.PENDING_APPROVAL,
    ValidationState.APPROVED,
    ValidationState.ALLOWED,
    ValidationState.DENIED,
    ValidationState.APPLYING,
    ValidationState.APPLY_INTERRUPTED,
)
# States that discard and expire move on (APPLYING is never pulled from under an apply).
_DROPPABLE = tuple(s for s in _LIVE if s is not ValidationState.APPLYING)

_SCHEMA = """
CREATE TABLE validations (
    validation_id TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    cwd TEXT NOT NULL,
    env_sha256 TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    caller_pid INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    diff_hash TEXT NOT NULL,
    verdict INTEGER NOT NULL,
    summary TEXT NOT NULL,
    changeset_dir TEXT NOT NULL,
    changeset_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,
    auth_context TEXT,
    apply_approval_id TEXT,
    apply_result_json TEXT,
    applied_at REAL,
    apply_error TEXT NOT NULL,
    changes_not_kept TEXT NOT NULL DEFAULT '',
    specials_json TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX validations_state ON validations (state, expires_at);
CREATE TABLE approvals (
    approval_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    validation_id TEXT NOT NULL REFERENCES validations (validation_id),
    scope INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    uid INTEGER NOT NULL,
    approver_uid INTEGER NOT NULL,
    approver_subject TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    ended_at REAL,
    command TEXT NOT NULL,
    cwd TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    diff_hash TEXT NOT NULL,
    special_paths_json TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX approvals_validation ON approvals (validation_id);
CREATE INDEX approvals_grant ON approvals (session_id, command, cwd);
"""


# The audit log's last head the daemon knew (one row): a restart refuses a log that no longer
# reaches it (airlock.daemon.server). Beside the versioned schema, created where missing.
_AUDIT_HEAD = (
    "CREATE TABLE IF NOT EXISTS audit_head (one INTEGER PRIMARY KEY CHECK (one = 1), "
    "seq INTEGER NOT NULL, hash TEXT NOT NULL, recorded_at REAL NOT NULL)"
)


# Version 1 (before special files and per-uid quotas) to 2: three columns, with defaults
# that say what version 1 meant (nothing special, changes kept or none, nothing named).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE validations ADD COLUMN changes_not_kept TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE validations ADD COLUMN specials_json TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE approvals ADD COLUMN special_paths_json TEXT NOT NULL DEFAULT '[]'",
)

# One special file of a validation: its host path and how it is special ("setuid", ...).
SpecialChange = tuple[bytes, tuple[str, ...]]


class StateError(AirlockError):
    """The state store cannot be read or written (reason says why)."""

    default_reason = Reason.STATE_STORE_FAILED


@dataclass(frozen=True, kw_only=True)
class NewValidation:
    """What ``Validate`` hands the store; the store adds times and the state."""

    validation_id: str
    command: str
    cwd: str
    uid: int
    gid: int
    verdict: Verdict
    env_sha256: str = ""
    caller_pid: int = 0
    session_id: str = ""
    policy_version: str = ""
    diff_hash: str = ""  # hex SHA-256 of the dry run's diff; "" if no changes are kept
    summary: str = ""
    changeset_dir: str = ""  # where the dry run's changes are kept; "" if nowhere
    changeset_bytes: int = 0
    # ALLOW only: POLICY_ALLOWED (the default) or AUTO_APPROVED (read-only fast path).
    auth_context: AuthContext | None = None
    # The dry run changed files but they are not kept for Apply: why ("" otherwise).
    changes_not_kept: str = ""
    # Its special files (airlock._special), which Apply writes only if an approval names them.
    specials: tuple[SpecialChange, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    """A validation as stored: what was validated, its state and its apply result."""

    validation_id: str
    command: str
    cwd: str
    env_sha256: str
    uid: int
    gid: int
    caller_pid: int
    session_id: str
    policy_version: str
    diff_hash: str
    verdict: Verdict
    summary: str
    changeset_dir: str
    changeset_bytes: int
    created_at: float
    expires_at: float
    updated_at: float
    state: ValidationState
    auth_context: AuthContext | None  # how its latest decision was authorized
    apply_result_json: str | None  # set once APPLIED
    applied_at: float | None
    apply_error: str  # why the last apply was aborted or interrupted; "" if none
    changes_not_kept: str = ""  # it changed files that were not kept for Apply: why
    specials: tuple[SpecialChange, ...] = ()  # its special files (airlock._special)
    # Set by begin_apply: the special paths the approval it rests on names.
    approved_special: tuple[bytes, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ApprovalRecord:
    """One approval; its token is not stored, only the token's SHA-256."""

    approval_id: str
    validation_id: str
    scope: ApprovalScope
    session_id: str
    uid: int  # the uid the approval is for (the validation's caller)
    approver_uid: int
    approver_subject: str  # e.g. the approver's client certificate subject
    created_at: float
    expires_at: float
    used_at: float | None  # ONCE: when it was used
    ended_at: float | None  # SESSION: when its session ended
    command: str
    cwd: str
    policy_version: str
    diff_hash: str
    special_paths: tuple[bytes, ...] = ()  # the special files it approves writing


@dataclass(frozen=True)
class ApplyDone:
    """``begin_apply`` on an APPLIED validation: the first apply's result, nothing redone."""

    record: ValidationRecord

    @property
    def result_json(self) -> str:
        return self.record.apply_result_json or ""


_V_COLUMNS = (
    "validation_id, command, cwd, env_sha256, uid, gid, caller_pid, session_id, "
    "policy_version, diff_hash, verdict, summary, changeset_dir, changeset_bytes, "
    "created_at, expires_at, updated_at, state, auth_context, apply_result_json, "
    "applied_at, apply_error, changes_not_kept, specials_json"
)
_A_COLUMNS = (
    "approval_id, validation_id, scope, session_id, uid, approver_uid, approver_subject, "
    "created_at, expires_at, used_at, ended_at, command, cwd, policy_version, diff_hash, "
    "special_paths_json"
)


def _path_text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _path_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _specials_json(specials: tuple[SpecialChange, ...]) -> str:
    return json.dumps([[_path_text(p), list(kinds)] for p, kinds in specials])


def _specials_from(text: str) -> tuple[SpecialChange, ...]:
    return tuple((_path_bytes(p), tuple(kinds)) for p, kinds in json.loads(text))


def _paths_json(paths: tuple[bytes, ...]) -> str:
    return json.dumps([_path_text(p) for p in paths])


def _paths_from(text: str) -> tuple[bytes, ...]:
    return tuple(_path_bytes(p) for p in json.loads(text))


def _validation(row: tuple[Any, ...]) -> ValidationRecord:
    (vid, command, cwd, env, uid, gid, pid, session, policy, diff, verdict, summary) = row[:12]
    (cdir, cbytes, created, expires, updated, state, auth, result, applied, error) = row[12:22]
    not_kept, specials = row[22:]
    return ValidationRecord(
        validation_id=vid,
        command=command,
        cwd=cwd,
        env_sha256=env,
        uid=uid,
        gid=gid,
        caller_pid=pid,
        session_id=session,
        policy_version=policy,
        diff_hash=diff,
        verdict=Verdict(verdict),
        summary=summary,
        changeset_dir=cdir,
        changeset_bytes=cbytes,
        created_at=created,
        expires_at=expires,
        updated_at=updated,
        state=ValidationState(state),
        auth_context=None if auth is None else Authorization[auth],
        apply_result_json=result,
        applied_at=applied,
        apply_error=error,
        changes_not_kept=not_kept,
        specials=_specials_from(specials),
    )


def _approval(row: tuple[Any, ...]) -> ApprovalRecord:
    (aid, vid, scope, session, uid, approver, subject, created, expires, used, ended) = row[:11]
    command, cwd, policy, diff, special = row[11:]
    return ApprovalRecord(
        approval_id=aid,
        validation_id=vid,
        scope=ApprovalScope(scope),
        session_id=session,
        uid=uid,
        approver_uid=approver,
        approver_subject=subject,
        created_at=created,
        expires_at=expires,
        used_at=used,
        ended_at=ended,
        command=command,
        cwd=cwd,
        policy_version=policy,
        diff_hash=diff,
        special_paths=_paths_from(special),
    )


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _in(states: tuple[ValidationState, ...]) -> str:
    """``(?, ?, ...)`` for ``states`` (bound as parameters)."""
    return "(" + ", ".join("?" * len(states)) + ")"


def _refusal(rec: ValidationRecord, now: float, action: str) -> AirlockError | None:
    """Why no new action may be taken on ``rec`` (None: it is still open)."""
    vid = rec.validation_id
    state = rec.state
    if state is ValidationState.DENIED:
        return PermissionDenied(
            f"validation {vid} was denied by the policy; it can never be {action}",
            reason="VALIDATION_DENIED",
        )
    if state is ValidationState.APPLYING:
        return FailedPrecondition(
            f"validation {vid} is being applied right now; retry to get the result",
            reason="APPLY_IN_PROGRESS",
        )
    if state is ValidationState.APPLIED:
        return FailedPrecondition(
            f"validation {vid} was already applied; it cannot be {action}",
            reason="VALIDATION_APPLIED",
        )
    if state is ValidationState.APPLY_INTERRUPTED:
        return FailedPrecondition(
            f"an apply of validation {vid} was interrupted (the daemon stopped during it), "
            "so some of its changes may be on the host and others not; it will not be "
            "applied again: check the host, then discard it and validate again",
            reason="APPLY_INTERRUPTED",
        )
    if state is ValidationState.DISCARDED:
        return FailedPrecondition(
            f"validation {vid} was discarded; validate the command again",
            reason="VALIDATION_DISCARDED",
        )
    if state is ValidationState.EXPIRED or now >= rec.expires_at:
        return FailedPrecondition(
            f"validation {vid} expired (its changes are kept for a limited time); "
            "validate the command again",
            reason="VALIDATION_EXPIRED",
        )
    return None


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store of an older schema version up to this one (inside its transaction)."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app == _APPLICATION_ID and version == 1:
        for statement in _MIGRATE_1_TO_2:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _check_owner(rec: ValidationRecord, uid: int, action: str) -> None:
    if uid != rec.uid and uid != 0:
        raise PermissionDenied(
            f"uid {uid} may not {action} validation {rec.validation_id}: only its caller "
            f"(uid {rec.uid}) or root may",
            reason="NOT_YOUR_VALIDATION",
        )


def _check_new(new: NewValidation) -> AuthContext | None:
    """Fail closed on a malformed record; returns its initial authorization context."""

    def bad(field: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"validation record: {field} {why}", reason="INVALID_VALIDATION")

    if not new.validation_id or len(new.validation_id) > _MAX_ID_CHARS:
        raise bad("validation_id", f"must be 1..{_MAX_ID_CHARS} characters")
    if not isinstance(new.verdict, Verdict):
        raise bad("verdict", f"must be a Verdict, not {new.verdict!r}")
    if new.uid < 0 or new.gid < 0:
        raise bad("uid/gid", "must not be negative")
    if new.changeset_bytes < 0:
        raise bad("changeset_bytes", "must not be negative")
    if new.changeset_bytes and not new.changeset_dir:
        raise bad("changeset_dir", "is required when changeset_bytes is not 0")
    if new.diff_hash and not _HEX64.fullmatch(new.diff_hash):
        raise bad("diff_hash", "must be 64 lowercase hex digits (or empty)")
    if new.changes_not_kept and new.changeset_dir:
        raise bad("changes_not_kept", "must be empty when the changes are kept")
    if new.verdict is Verdict.ALLOW:
        ctx = new.auth_context or AuthContext.POLICY_ALLOWED
        if ctx not in (AuthContext.POLICY_ALLOWED, AuthContext.AUTO_APPROVED):
            raise bad("auth_context", f"of an ALLOW verdict cannot be {ctx.name}")
        return ctx
    if new.auth_context is not None:
        raise bad("auth_context", f"must be empty for a {new.verdict.name} verdict")
    return None


class StateStore:
    """Validations, approvals and apply results in the SQLite file ``path``.

    ``ttl_s``: how long a validation (and its changes) may be approved and applied.
    ``session_ttl_s``: how long a SESSION approval lasts at most. ``quota_bytes``:
    the most changeset bytes kept at once; ``uid_quota_bytes``: the most of them one uid's
    validations may hold (None: ``quota_bytes``), so that one user cannot take the space
    every other user's validations need. ``clock``: epoch seconds (tests inject one).
    Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl_s: float = DEFAULT_TTL_S,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        uid_quota_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not ttl_s > 0 or not session_ttl_s > 0:
            raise InvalidRequest("ttl_s and session_ttl_s must be positive", reason="INVALID_TTL")
        if quota_bytes < 0 or (uid_quota_bytes is not None and uid_quota_bytes < 0):
            raise InvalidRequest(
                "the changeset quotas must not be negative", reason="INVALID_QUOTA"
            )
        self.path = os.fspath(path)
        self.ttl_s = float(ttl_s)
        self.session_ttl_s = float(session_ttl_s)
        self.quota_bytes = quota_bytes
        self.uid_quota_bytes = quota_bytes if uid_quota_bytes is None else uid_quota_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        # FULL: the WAL is fsynced at every commit, so a change survives a crash of the
        # machine, not only of the daemon.
        self._db = _sqlite.Database(
            path=self.path,
            noun="state store",
            error=StateError,
            corrupt_reason=Reason.STATE_STORE_CORRUPT,
            corrupt_advice="move it aside (pending validations in it are lost)",
            application_id=_APPLICATION_ID,
            schema_version=_SCHEMA_VERSION,
            schema=_SCHEMA,
            synchronous="FULL",
            foreign_keys=True,
        )
        with self._db.guard("open"):
            self._db.create_file()
            self._conn = self._db.connect()
            try:
                with _sqlite.immediate(self._conn):
                    _migrate(self._conn)
                    self._db.check_schema(self._conn)
                    self._conn.execute(_AUDIT_HEAD)
            except BaseException:
                self._conn.close()
                raise

    @classmethod
    def in_state_dir(cls, state_dir: str, **kw: Any) -> StateStore:
        """The daemon's store, ``STATE_DIR/state.db`` (mode 0600)."""
        return cls(os.path.join(state_dir, STATE_FILE), **kw)

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    # --- The audit log's head ------------------------------------------------------------------

    def audit_head(self) -> Anchor | None:
        """The audit log's last head recorded here (None: none recorded)."""
        with self._read("read the audit head") as conn:
            row = conn.execute("SELECT seq, hash FROM audit_head").fetchone()
        return None if row is None else Anchor(seq=row[0], hash=row[1])

    def record_audit_head(self, head: Anchor | None) -> None:
        """Record the audit log's head (None: forget it, for a new, empty log)."""
        with self._write("record the audit head") as conn:
            conn.execute("DELETE FROM audit_head")
            if head is not None:
                conn.execute(
                    "INSERT INTO audit_head VALUES (1, ?, ?, ?)", (head.seq, head.hash, time.time())
                )

    # --- Validations --------------------------------------------------------------------------

    def record_validation(self, new: NewValidation) -> ValidationRecord:
        """Store a new validation; it survives the daemon when this returns, and the machine
        once a later commit is fsynced (this one is not: the audit log already holds the
        decision, and its changeset is not fsynced either; decisions section 15).

        Its state follows the verdict: ALLOW -> ALLOWED, DENY -> DENIED, ASK ->
        PENDING_APPROVAL, or APPROVED (SESSION_GRANTED) if a live SESSION approval of
        its session covers its command, cwd, policy version and uid. Refuses
        (``CHANGESET_QUOTA_EXCEEDED``, nothing stored) changes that would take the
        uid's kept changesets over its share, or all of them over the quota: the caller
        may ``expire`` and retry, or record the validation without its changes (and
        why, in ``changes_not_kept``).
        """
        ctx = _check_new(new)
        with self._write("record a validation", fsync=False) as conn:
            now = self._clock()
            exists = conn.execute(
                "SELECT 1 FROM validations WHERE validation_id = ?", (new.validation_id,)
            ).fetchone()
            if exists:
                raise InvalidRequest(
                    f"validation {new.validation_id} is already recorded",
                    reason="DUPLICATE_VALIDATION_ID",
                )
            if new.changeset_bytes:
                mine = self._usage(conn, new.uid)
                used = self._usage(conn)
                if mine + new.changeset_bytes > self.uid_quota_bytes:
                    raise ResourceExhausted(
                        f"keeping the {new.changeset_bytes} bytes of changes of validation "
                        f"{new.validation_id} would exceed uid {new.uid}'s share of the "
                        f"changeset quota ({mine} of {self.uid_quota_bytes} bytes in use); "
                        "apply or discard that user's validations, or wait for them to expire",
                        reason="CHANGESET_QUOTA_EXCEEDED",
                    )
                if used + new.changeset_bytes > self.quota_bytes:
                    raise ResourceExhausted(
                        f"keeping the {new.changeset_bytes} bytes of changes of validation "
                        f"{new.validation_id} would exceed the changeset quota ({used} of "
                        f"{self.quota_bytes} bytes in use); discard validations or wait "
                        "for them to expire",
                        reason="CHANGESET_QUOTA_EXCEEDED",
                    )
            if new.verdict is Verdict.ALLOW:
                state = ValidationState.ALLOWED
            elif new.verdict is Verdict.DENY:
                state = ValidationState.DENIED
            elif self._session_grant(
                conn, now, new.session_id, new.command, new.cwd, new.policy_version, new.uid
            ):
                state, ctx = ValidationState.APPROVED, AuthContext.SESSION_GRANTED
            else:
                state = ValidationState.PENDING_APPROVAL
            rec = ValidationRecord(
                validation_id=new.validation_id,
                command=new.command,
                cwd=new.cwd,
                env_sha256=new.env_sha256,
                uid=new.uid,
                gid=new.gid,
                caller_pid=new.caller_pid,
                session_id=new.session_id,
                policy_version=new.policy_version,
                diff_hash=new.diff_hash,
                verdict=new.verdict,
                summary=new.summary,
                changeset_dir=new.changeset_dir,
                changeset_bytes=new.changeset_bytes,
                created_at=now,
                expires_at=now + self.ttl_s,
                updated_at=now,
                state=state,
                auth_context=ctx,
                apply_result_json=None,
                applied_at=None,
                apply_error="",
                changes_not_kept=new.changes_not_kept,
                specials=new.specials,
            )
            conn.execute(
                f"INSERT INTO validations ({_V_COLUMNS}) VALUES ({', '.join('?' * 24)})",  # noqa: S608
                (
                    rec.validation_id,
                    rec.command,
                    rec.cwd,
                    rec.env_sha256,
                    rec.uid,
                    rec.gid,
                    rec.caller_pid,
                    rec.session_id,
                    rec.policy_version,
                    rec.diff_hash,
                    int(rec.verdict),
                    rec.summary,
                    rec.changeset_dir,
                    rec.changeset_bytes,
                    rec.created_at,
                    rec.expires_at,
                    rec.updated_at,
                    rec.state.value,
                    None if ctx is None else ctx.name,
                    None,
                    None,
                    "",
                    rec.changes_not_kept,
                    _specials_json(rec.specials),
                ),
            )
        return rec

    def get(self, validation_id: str) -> ValidationRecord:
        """The validation ``validation_id`` (``NotFound`` if there is none)."""
        with self._read("read a validation") as conn:
            return self._load(conn, validation_id)

    def approvals(self, validation_id: str) -> list[ApprovalRecord]:
        """The approvals given for a validation, oldest first."""
        with self._read("read approvals") as conn:
            rows = conn.execute(
                f"SELECT {_A_COLUMNS} FROM approvals WHERE validation_id = ? "  # noqa: S608
                "ORDER BY created_at, approval_id",
                (validation_id,),
            ).fetchall()
        return [_approval(r) for r in rows]

    def approval_used(
        self,
        token: str | None,
        *,
        command: str,
        cwd: str,
        policy_version: str,
        session_id: str,
        uid: int,
    ) -> ApprovalRecord | None:
        """The approval ``authorize`` rests on (the token's, else the live SESSION grant that
        covers the command), to say in the audit log who approved; None if there is none."""
        with self._read("read an approval") as conn:
            if token:
                row = conn.execute(
                    f"SELECT {_A_COLUMNS} FROM approvals WHERE token_sha256 = ?",  # noqa: S608
                    (_token_hash(token),),
                ).fetchone()
                return None if row is None else _approval(row)
            grant = self._session_grant(
                conn, self._clock(), session_id, command, cwd, policy_version, uid
            )
            if grant is None:
                return None
            row = conn.execute(
                f"SELECT {_A_COLUMNS} FROM approvals WHERE approval_id = ?",  # noqa: S608
                (grant,),
            ).fetchone()
        return None if row is None else _approval(row)

    def pending(
        self, *, uid: int | None = None, after: tuple[float, str] | None = None, limit: int = 100
    ) -> list[ValidationRecord]:
        """Validations waiting for an approval (PENDING_APPROVAL, unexpired), oldest first:
        of ``uid`` only, or everyone's (None); those after ``(created_at, validation_id)``."""
        where = ["state = ?", "expires_at > ?"]
        params: list[object] = [ValidationState.PENDING_APPROVAL.value, self._clock()]
        if uid is not None:
            where.append("uid = ?")
            params.append(uid)
        if after is not None:
            where.append("(created_at > ? OR (created_at = ? AND validation_id > ?))")
            params += [after[0], after[0], after[1]]
        with self._read("list pending validations") as conn:
            rows = conn.execute(
                f"SELECT {_V_COLUMNS} FROM validations WHERE "  # noqa: S608
                f"{' AND '.join(where)} ORDER BY created_at, validation_id LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_validation(r) for r in rows]

    def changeset_usage(self) -> int:
        """Bytes of the changesets still kept (the quota counts these)."""
        with self._read("read the changeset usage") as conn:
            return self._usage(conn)

    # --- Approvals ----------------------------------------------------------------------------

    def approve(
        self,
        validation_id: str,
        scope: ApprovalScope,
        *,
        approver_uid: int,
        approver_subject: str = "",
        special_paths: tuple[bytes, ...] = (),
        may_approve: Callable[[ValidationRecord], None] | None = None,
    ) -> tuple[str, ApprovalRecord]:
        """Approve a validation: returns the token (shown once; only its hash is kept).

        Moves PENDING_APPROVAL (or APPROVED: another approval) to APPROVED. Refuses an
        unknown (``VALIDATION_NOT_FOUND``), denied (``VALIDATION_DENIED``), applied,
        discarded or expired validation, one that needs no approval (ALLOW verdict and no
        ``special_paths``: ``APPROVAL_NOT_NEEDED``), a SESSION approval of a validation
        without a session (``NO_SESSION``), and any approver but the validation's caller
        and root; or, given ``may_approve``, whoever it refuses (it raises; run inside the
        transaction, on the record as stored). The approval's session is the validation's.
        ``special_paths`` names the validation's special files the approval lets Apply
        write; each must be one (``INVALID_SPECIAL_PATH``). An ALLOW validation approved
        that way is APPROVED.
        """
        try:
            scope = ApprovalScope(scope)
        except ValueError:
            raise InvalidRequest(
                f"approval scope {scope!r} is not ONCE or SESSION", reason="INVALID_SCOPE"
            ) from None
        token = new_token()
        with self._write("approve") as conn:
            now = self._clock()
            rec = self._load(conn, validation_id)
            if may_approve is None:
                _check_owner(rec, approver_uid, "approve")
            else:
                may_approve(rec)
            refusal = _refusal(rec, now, "approved")
            if refusal is not None:
                raise refusal
            special_paths = tuple(dict.fromkeys(special_paths))
            specials = dict(rec.specials)
            unknown = [p for p in special_paths if p not in specials]
            if unknown:
                listed = ", ".join(
                    f"{_path_text(p)} ({' and '.join(k)})" for p, k in rec.specials[:10]
                )
                raise InvalidRequest(
                    f"{', '.join(map(repr, unknown[:5]))}: not a special file of validation "
                    f"{validation_id}; its special files: {listed or 'none'}",
                    reason="INVALID_SPECIAL_PATH",
                )
            if rec.state is ValidationState.ALLOWED and not special_paths:
                more = (
                    "; to let Apply write its special files, approve it naming them"
                    if any(PRIVILEGED.intersection(kinds) for _path, kinds in rec.specials)
                    else ""
                )
                raise FailedPrecondition(
                    f"validation {validation_id} is allowed by the policy; it needs no "
                    f"approval{more}",
                    reason="APPROVAL_NOT_NEEDED",
                )
            if scope is ApprovalScope.SESSION and not rec.session_id:
                raise InvalidRequest(
                    f"validation {validation_id} has no session; approve it ONCE",
                    reason="NO_SESSION",
                )
            expires = rec.expires_at
            if scope is ApprovalScope.SESSION:
                expires = now + self.session_ttl_s
            approval = ApprovalRecord(
                approval_id=uuid.uuid4().hex,
                validation_id=validation_id,
                scope=scope,
                session_id=rec.session_id,
                uid=rec.uid,
                approver_uid=approver_uid,
                approver_subject=approver_subject,
                created_at=now,
                expires_at=expires,
                used_at=None,
                ended_at=None,
                command=rec.command,
                cwd=rec.cwd,
                policy_version=rec.policy_version,
                diff_hash=rec.diff_hash,
                special_paths=special_paths,
            )
            conn.execute(
                f"INSERT INTO approvals (token_sha256, {_A_COLUMNS}) "  # noqa: S608
                f"VALUES ({', '.join('?' * 17)})",
                (
                    _token_hash(token),
                    approval.approval_id,
                    approval.validation_id,
                    int(approval.scope),
                    approval.session_id,
                    approval.uid,
                    approval.approver_uid,
                    approval.approver_subject,
                    approval.created_at,
                    approval.expires_at,
                    None,
                    None,
                    approval.command,
                    approval.cwd,
                    approval.policy_version,
                    approval.diff_hash,
                    _paths_json(approval.special_paths),
                ),
            )
            conn.execute(
                "UPDATE validations SET state = ?, auth_context = ?, updated_at = ? "
                "WHERE validation_id = ?",
                (
                    ValidationState.APPROVED.value,
                    AuthContext.USER_VERIFIED.name,
                    now,
                    validation_id,
                ),
            )
        return token, approval

    def authorize(
        self,
        token: str | None,
        *,
        command: str,
        cwd: str,
        policy_version: str,
        session_id: str,
        uid: int,
        diff_hash: str | None = None,
    ) -> AuthContext | None:
        """Whether an approval covers running ``command`` now (for Execute).

        With a token: USER_VERIFIED for a ONCE token (used up here, atomically: it
        works exactly once, whoever races for it), SESSION_GRANTED for a SESSION one.
        The token must bind exactly this uid, command, cwd, policy version (the
        session for SESSION scope, the diff hash if one is given for ONCE scope), or
        ``PermissionDenied`` ``APPROVAL_MISMATCH``; an unknown token is
        ``APPROVAL_INVALID``. A used, expired or ended one is ``FailedPrecondition``
        (``APPROVAL_USED``, ``APPROVAL_EXPIRED``, ``SESSION_ENDED``), as is a ONCE
        token whose validation is no longer APPROVED (applied, discarded, expired).

        Without a token: SESSION_GRANTED if a live SESSION approval of this session
        covers the uid, command, cwd and policy version, else None (ask for one).
        """
        if not token:
            with self._read("authorize") as conn:
                grant = self._session_grant(
                    conn, self._clock(), session_id, command, cwd, policy_version, uid
                )
            return AuthContext.SESSION_GRANTED if grant else None
        with self._write("authorize") as conn:
            now = self._clock()
            row = conn.execute(
                f"SELECT {_A_COLUMNS} FROM approvals WHERE token_sha256 = ?",  # noqa: S608
                (_token_hash(token),),
            ).fetchone()
            if row is None:
                raise PermissionDenied(
                    "the approval token is not one that Approve returned", reason="APPROVAL_INVALID"
                )
            approval = _approval(row)
            if approval.uid != uid:
                raise PermissionDenied(
                    "the approval token was given for another user", reason="APPROVAL_MISMATCH"
                )
            wrong = [
                name
                for name, given, bound in (
                    ("command", command, approval.command),
                    ("working directory", cwd, approval.cwd),
                    ("policy version", policy_version, approval.policy_version),
                )
                if given != bound
            ]
            if approval.scope is ApprovalScope.SESSION and session_id != approval.session_id:
                wrong.append("session")
            if (
                approval.scope is ApprovalScope.ONCE
                and diff_hash is not None
                and diff_hash != approval.diff_hash
            ):
                wrong.append("dry-run diff")
            if wrong:
                raise PermissionDenied(
                    f"the approval token was given for another {', '.join(wrong)}: "
                    "it approves exactly what was validated",
                    reason="APPROVAL_MISMATCH",
                )
            if approval.ended_at is not None:
                raise FailedPrecondition(
                    "the session of this approval has ended; ask for a new approval",
                    reason="SESSION_ENDED",
                )
            if now >= approval.expires_at:
                raise FailedPrecondition(
                    "the approval has expired; ask for a new approval", reason="APPROVAL_EXPIRED"
                )
            if approval.scope is ApprovalScope.SESSION:
                return AuthContext.SESSION_GRANTED
            if approval.used_at is not None:
                raise FailedPrecondition(
                    "the approval was for one run and has been used; ask for a new approval",
                    reason="APPROVAL_USED",
                )
            rec = self._load(conn, approval.validation_id)
            refusal = _refusal(rec, now, "run")
            if refusal is not None:
                raise refusal
            if rec.state is not ValidationState.APPROVED:  # pragma: no cover - invariant
                raise FailedPrecondition(
                    f"validation {rec.validation_id} is {rec.state.value}",
                    reason="APPROVAL_REQUIRED",
                )
            conn.execute(
                "UPDATE approvals SET used_at = ? WHERE approval_id = ?",
                (now, approval.approval_id),
            )
            conn.execute(
                "UPDATE validations SET auth_context = ?, updated_at = ? WHERE validation_id = ?",
                (AuthContext.USER_VERIFIED.name, now, rec.validation_id),
            )
        return AuthContext.USER_VERIFIED

    def end_session(self, session_id: str) -> int:
        """End the SESSION approvals of a session; returns how many were live."""
        if not session_id:
            return 0
        with self._write("end a session") as conn:
            now = self._clock()
            cur = conn.execute(
                "UPDATE approvals SET ended_at = ? WHERE session_id = ? AND scope = ? "
                "AND ended_at IS NULL AND expires_at > ?",
                (now, session_id, int(ApprovalScope.SESSION), now),
            )
            return cur.rowcount

    # --- Applying -----------------------------------------------------------------------------

    def begin_apply(self, validation_id: str, *, uid: int) -> ValidationRecord | ApplyDone:
        """Claim a validation for applying: APPROVED/ALLOWED -> APPLYING.

        Returns the APPLYING record (the caller applies, then calls
        :meth:`finish_apply` or :meth:`abort_apply`), or :class:`ApplyDone` if it was
        applied before (nothing is redone). An APPROVED validation needs an approval
        still usable: an unused ONCE approval of its own (used up here: USER_VERIFIED),
        else a live SESSION approval of its own (USER_VERIFIED) or of its session
        covering it (SESSION_GRANTED); else ``APPROVAL_REQUIRED`` (its ONCE approval
        went to an Execute, or its session grant ended). PENDING_APPROVAL is
        ``APPROVAL_REQUIRED``; the other states are refused with their own reason, and a
        validation whose changes were not kept with ``CHANGES_NOT_KEPT`` (and why).
        The record's ``approved_special`` is what the approval of this validation the
        apply rests on names (an ALLOWED one with special files uses such an approval
        when it has one); Apply writes no other special file.
        """
        with self._write("begin an apply") as conn:
            now = self._clock()
            rec = self._load(conn, validation_id)
            _check_owner(rec, uid, "apply")
            if rec.state is ValidationState.APPLIED:
                return ApplyDone(rec)
            refusal = _refusal(rec, now, "applied")
            if refusal is not None:
                raise refusal
            if rec.changes_not_kept:
                raise FailedPrecondition(
                    f"validation {validation_id} has nothing to apply: its dry run's changes "
                    f"were not kept ({rec.changes_not_kept}); "
                    + not_kept_advice(rec.changes_not_kept),
                    reason="CHANGES_NOT_KEPT",
                )
            if rec.state is ValidationState.PENDING_APPROVAL:
                raise FailedPrecondition(
                    f"validation {validation_id} needs an approval before it can be applied",
                    reason="APPROVAL_REQUIRED",
                )
            ctx = rec.auth_context
            used: str | None = None
            if rec.state is ValidationState.APPROVED:
                ctx, used = self._claim_approval(conn, now, rec)
            elif rec.specials:  # ALLOWED: an approval of its own may name its special files
                own = self._own_approval(conn, now, rec)
                if own is not None:
                    ctx, used = own
            approved: tuple[bytes, ...] = ()
            if used is not None:
                row = conn.execute(
                    "SELECT special_paths_json FROM approvals "
                    "WHERE approval_id = ? AND validation_id = ?",
                    (used, validation_id),
                ).fetchone()
                approved = _paths_from(row[0]) if row is not None else ()
            conn.execute(
                "UPDATE validations SET state = ?, auth_context = ?, apply_approval_id = ?, "
                "updated_at = ? WHERE validation_id = ?",
                (
                    ValidationState.APPLYING.value,
                    None if ctx is None else ctx.name,
                    used,
                    now,
                    validation_id,
                ),
            )
        return dataclasses.replace(
            rec,
            state=ValidationState.APPLYING,
            auth_context=ctx,
            updated_at=now,
            approved_special=approved,
        )

    def finish_apply(self, validation_id: str, result_json: str) -> ValidationRecord:
        """APPLYING -> APPLIED with its result (a JSON text), returned to later retries.

        Returns the record: the caller deletes its ``changeset_dir``.
        """
        try:
            json.loads(result_json)
        except (ValueError, TypeError):
            raise InvalidRequest(
                "the apply result must be a JSON text", reason="INVALID_APPLY_RESULT"
            ) from None
        with self._write("finish an apply") as conn:
            now = self._clock()
            rec = self._applying(conn, validation_id, "finish")
            conn.execute(
                "UPDATE validations SET state = ?, apply_result_json = ?, applied_at = ?, "
                "updated_at = ? WHERE validation_id = ?",
                (ValidationState.APPLIED.value, result_json, now, now, validation_id),
            )
        return dataclasses.replace(
            rec,
            state=ValidationState.APPLIED,
            apply_result_json=result_json,
            applied_at=now,
            updated_at=now,
        )

    def abort_apply(self, validation_id: str, reason: str) -> ValidationRecord:
        """APPLYING -> back to APPROVED/ALLOWED: the apply wrote nothing (e.g. a conflict).

        A ONCE approval the apply had used becomes usable again. Only call this when
        nothing was written; an apply that wrote and failed ends with
        :meth:`finish_apply` and a result saying so.
        """
        with self._write("abort an apply") as conn:
            now = self._clock()
            rec = self._applying(conn, validation_id, "abort")
            back = (
                ValidationState.ALLOWED
                if rec.verdict is Verdict.ALLOW
                else ValidationState.APPROVED
            )
            row = conn.execute(
                "SELECT apply_approval_id FROM validations WHERE validation_id = ?",
                (validation_id,),
            ).fetchone()
            if row[0] is not None:
                conn.execute(
                    "UPDATE approvals SET used_at = NULL WHERE approval_id = ? AND scope = ?",
                    (row[0], int(ApprovalScope.ONCE)),
                )
            conn.execute(
                "UPDATE validations SET state = ?, apply_approval_id = NULL, apply_error = ?, "
                "updated_at = ? WHERE validation_id = ?",
                (back.value, reason, now, validation_id),
            )
        return dataclasses.replace(rec, state=back, apply_error=reason, updated_at=now)

    # --- Dropping and recovering --------------------------------------------------------------

    def discard(self, validation_id: str, *, uid: int) -> ValidationRecord:
        """Drop a validation's changes: -> DISCARDED; the caller deletes ``changeset_dir``.

        Idempotent: a DISCARDED (or EXPIRED) validation is returned as it is. Refuses
        an APPLYING (``APPLY_IN_PROGRESS``) or APPLIED (``VALIDATION_APPLIED``) one.
        Its ONCE tokens die with it; SESSION grants of its session stay.
        """
        with self._write("discard") as conn:
            now = self._clock()
            rec = self._load(conn, validation_id)
            _check_owner(rec, uid, "discard")
            if rec.state in (ValidationState.DISCARDED, ValidationState.EXPIRED):
                return rec
            if rec.state not in _DROPPABLE:
                refusal = _refusal(rec, now, "discarded")
                assert refusal is not None
                raise refusal
            conn.execute(
                "UPDATE validations SET state = ?, updated_at = ? WHERE validation_id = ?",
                (ValidationState.DISCARDED.value, now, validation_id),
            )
        return dataclasses.replace(rec, state=ValidationState.DISCARDED, updated_at=now)

    def expire(self, now: float | None = None, limit: int = -1) -> list[ValidationRecord]:
        """Move validations past their time to live to EXPIRED; returns them.

        The caller deletes their ``changeset_dir``. APPLYING, APPLIED and final
        validations are left alone. ``limit`` (> 0): at most that many, the oldest first.
        """
        with self._write("expire validations") as conn:
            at = self._clock() if now is None else now
            states = tuple(s.value for s in _DROPPABLE)
            rows = conn.execute(
                f"SELECT {_V_COLUMNS} FROM validations "  # noqa: S608
                f"WHERE state IN {_in(_DROPPABLE)} AND expires_at <= ? "
                "ORDER BY expires_at LIMIT ?",
                (*states, at, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE validations SET state = ?, updated_at = ? WHERE validation_id = ?",
                [(ValidationState.EXPIRED.value, at, r[0]) for r in rows],
            )
        return [
            dataclasses.replace(_validation(r), state=ValidationState.EXPIRED, updated_at=at)
            for r in rows
        ]

    def applying(self) -> list[ValidationRecord]:
        """The APPLYING validations (at start-up: the applies a crash interrupted), each with
        the special paths the approval it rests on names."""
        with self._read("list applies in progress") as conn:
            rows = conn.execute(
                f"SELECT {_V_COLUMNS} FROM validations WHERE state = ?",  # noqa: S608
                (ValidationState.APPLYING.value,),
            ).fetchall()
        return [_validation(r) for r in rows]

    def prune(self, before: float, limit: int) -> int:
        """Delete rows nothing needs any more: approvals that expired or ended before
        ``before``, then validations that became final (APPLIED, DISCARDED, EXPIRED) before
        it and that no approval names. At most ``limit`` of each; returns how many rows went.

        Until then a retried Apply still gets its first result and a late Approve or Apply
        the state's own reason; afterwards VALIDATION_NOT_FOUND (the audit log keeps them).
        """
        final = (ValidationState.APPLIED, ValidationState.DISCARDED, ValidationState.EXPIRED)
        with self._write("prune old rows") as conn:
            gone = conn.execute(
                "DELETE FROM approvals WHERE approval_id IN (SELECT approval_id FROM approvals "
                "WHERE expires_at < ? OR ended_at < ? LIMIT ?)",
                (before, before, limit),
            ).rowcount
            gone += conn.execute(
                "DELETE FROM validations WHERE validation_id IN ("  # noqa: S608
                f"SELECT v.validation_id FROM validations v WHERE v.state IN {_in(final)} "
                "AND v.updated_at < ? AND NOT EXISTS (SELECT 1 FROM approvals a "
                "WHERE a.validation_id = v.validation_id) LIMIT ?)",
                (*(s.value for s in final), before, limit),
            ).rowcount
        return int(gone)

    def recover(self) -> list[ValidationRecord]:
        """At start-up: APPLYING validations (a crash mid-apply) -> APPLY_INTERRUPTED.

        Call it only while no apply can be running (the daemon holds the state
        directory's lock and has not started serving). Apply refuses such a validation
        for good (``APPLY_INTERRUPTED``): its changes may be partly on the host.
        Returns them, for the caller to log and report.
        """
        why = "the daemon stopped during the apply; some changes may have been written"
        with self._write("recover") as conn:
            now = self._clock()
            rows = conn.execute(
                f"SELECT {_V_COLUMNS} FROM validations WHERE state = ?",  # noqa: S608
                (ValidationState.APPLYING.value,),
            ).fetchall()
            conn.execute(
                "UPDATE validations SET state = ?, apply_error = ?, updated_at = ? WHERE state = ?",
                (
                    ValidationState.APPLY_INTERRUPTED.value,
                    why,
                    now,
                    ValidationState.APPLYING.value,
                ),
            )
        return [
            dataclasses.replace(
                _validation(r),
                state=ValidationState.APPLY_INTERRUPTED,
                apply_error=why,
                updated_at=now,
            )
            for r in rows
        ]

    # --- Internals ----------------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, validation_id: str) -> ValidationRecord:
        row = conn.execute(
            f"SELECT {_V_COLUMNS} FROM validations WHERE validation_id = ?",  # noqa: S608
            (validation_id,),
        ).fetchone()
        if row is None:
            raise NotFound(
                f"no validation {validation_id!r} is kept: the id is unknown, or its validation "
                "left nothing to approve or apply (allowed or denied with no changes)",
                reason="VALIDATION_NOT_FOUND",
            )
        return _validation(row)

    def _applying(
        self, conn: sqlite3.Connection, validation_id: str, action: str
    ) -> ValidationRecord:
        rec = self._load(conn, validation_id)
        if rec.state is not ValidationState.APPLYING:
            raise FailedPrecondition(
                f"cannot {action} the apply of validation {validation_id}: it is "
                f"{rec.state.value}, not APPLYING",
                reason="NOT_APPLYING",
            )
        return rec

    @staticmethod
    def _usage(conn: sqlite3.Connection, uid: int | None = None) -> int:
        """Bytes of the changesets still kept: all of them, or ``uid``'s."""
        states = tuple(s.value for s in _LIVE)
        if uid is None:
            row = conn.execute(
                "SELECT coalesce(sum(changeset_bytes), 0) FROM validations "  # noqa: S608
                f"WHERE state IN {_in(_LIVE)}",
                states,
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT coalesce(sum(changeset_bytes), 0) FROM validations "  # noqa: S608
                f"WHERE state IN {_in(_LIVE)} AND uid = ?",
                (*states, uid),
            ).fetchone()
        return int(row[0])

    @staticmethod
    def _session_grant(
        conn: sqlite3.Connection,
        now: float,
        session_id: str,
        command: str,
        cwd: str,
        policy_version: str,
        uid: int,
    ) -> str | None:
        """The id of a live SESSION approval covering this command, if any."""
        if not session_id:
            return None
        row = conn.execute(
            "SELECT approval_id FROM approvals WHERE scope = ? AND session_id = ? "
            "AND command = ? AND cwd = ? AND policy_version = ? AND uid = ? "
            "AND ended_at IS NULL AND expires_at > ? ORDER BY created_at LIMIT 1",
            (int(ApprovalScope.SESSION), session_id, command, cwd, policy_version, uid, now),
        ).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _own_approval(
        conn: sqlite3.Connection, now: float, rec: ValidationRecord
    ) -> tuple[AuthContext, str] | None:
        """A usable approval of this validation itself (a ONCE one is used up); None if none."""
        row = conn.execute(
            "SELECT approval_id FROM approvals WHERE validation_id = ? AND scope = ? "
            "AND used_at IS NULL AND expires_at > ? ORDER BY created_at LIMIT 1",
            (rec.validation_id, int(ApprovalScope.ONCE), now),
        ).fetchone()
        if row is not None:
            conn.execute("UPDATE approvals SET used_at = ? WHERE approval_id = ?", (now, row[0]))
            return AuthContext.USER_VERIFIED, str(row[0])
        row = conn.execute(
            "SELECT approval_id FROM approvals WHERE validation_id = ? AND scope = ? "
            "AND ended_at IS NULL AND expires_at > ? ORDER BY created_at LIMIT 1",
            (rec.validation_id, int(ApprovalScope.SESSION), now),
        ).fetchone()
        if row is not None:
            return AuthContext.USER_VERIFIED, str(row[0])
        return None

    def _claim_approval(
        self, conn: sqlite3.Connection, now: float, rec: ValidationRecord
    ) -> tuple[AuthContext, str | None]:
        """The approval an apply of an APPROVED validation rests on (a ONCE one is used)."""
        own = self._own_approval(conn, now, rec)
        if own is not None:
            return own
        grant = self._session_grant(
            conn, now, rec.session_id, rec.command, rec.cwd, rec.policy_version, rec.uid
        )
        if grant is not None:
            return AuthContext.SESSION_GRANTED, grant
        raise FailedPrecondition(
            f"validation {rec.validation_id} has no usable approval left (its one-time "
            "approval was used by an Execute, or its session grant ended or expired); "
            "approve it again",
            reason="APPROVAL_REQUIRED",
        )

    def _open_conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StateError(f"the state store {self.path} is closed", reason="STATE_STORE_CLOSED")
        return self._conn

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db.guard(action):
            yield self._open_conn()

    @contextlib.contextmanager
    def _write(self, action: str, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed (fsynced) or rolled back whole.

        An error raised inside (a refusal) rolls back, so a refused call changes nothing.
        ``fsync=False`` commits without the fsync (``synchronous=NORMAL`` for this one
        transaction): it survives a crash of the daemon, and a crash of the machine only once
        a later commit or checkpoint syncs the log; a torn commit is rolled back whole.
        """
        with self._lock, self._db.guard(action):
            conn = self._open_conn()
            if not fsync:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with _sqlite.immediate(conn):
                    yield conn
            finally:
                if not fsync:
                    conn.execute(f"PRAGMA synchronous = {self._db.synchronous}")
