"""The audit log: an append-only, hash-chained table in one SQLite file.

Every event is stored with its sequence number (1, 2, ...), the hash of the event
before it and its own hash over the canonical record (``airlock.audit.canonical``);
``verify`` walks the chain. ``append`` returns only after the event is on disk:
WAL mode with ``synchronous=FULL`` fsyncs the WAL on every commit.

Optionally the hashes are keyed (HMAC-SHA256) with a key from a 0600 file that only
the daemon reads, so that someone who can write the database but not read the key
cannot rewrite the chain. Whether a log is keyed, and with which key (by its public
id), is fixed when the log is created.

Every failure of the storage is an :class:`AuditError` (an ``AirlockError``) that
says what went wrong with which file, never a bare ``sqlite3`` exception.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

from airlock import _sqlite
from airlock._errors import AirlockError, InvalidRequest, Reason
from airlock.audit.canonical import (
    GENESIS_HASH,
    MalformedEvent,
    chain_hash,
    decode_event,
    encode_event,
    key_id,
    path_text,
    record_hasher,
)
from airlock.audit.model import (
    Anchor,
    AuditEvent,
    AuditFilter,
    Caller,
    ProblemKind,
    RpcKind,
    StoredEvent,
    VerifyProblem,
    VerifyResult,
)
from airlock.types import PeerCred

__all__ = [
    "KEY_FILE",
    "LOG_FILE",
    "MAX_PAGE_SIZE",
    "AuditError",
    "AuditLog",
    "caller_of",
    "load_key",
    "parse_anchor",
    "read_events",
]

LOG_FILE = "audit.sqlite3"
KEY_FILE = "audit.key"
MAX_PAGE_SIZE = 1000
KEY_BYTES = 32
_APPLICATION_ID = 0x41415544  # "AAUD" in the database header
_SCHEMA_VERSION = 1
_MOVED_WINDOW = 1000  # verify tries this many seqs either side of an event that moved
# A stalled log (another process holds its write lock: a backup, an operator's sqlite3; a
# disk that does not answer) must not hold the daemon's callers: an append whose commit has
# not begun within APPEND_TIMEOUT_S is withdrawn and fails, and at most MAX_QUEUED events
# wait at once. The one writer thread tries SQLite's write lock _WRITER_BUSY_MS at a time;
# a read waits _READ_BUSY_MS for a lock before it fails.
APPEND_TIMEOUT_S = 5.0
MAX_QUEUED = 4096
_WRITER_BUSY_MS = 200
_READ_BUSY_MS = 2000
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)
_NOT_A_DATABASE = 26  # SQLITE_NOTADB

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    body TEXT NOT NULL,
    time_ns INTEGER GENERATED ALWAYS AS (json_extract(body, '$.time_ns')) VIRTUAL,
    verdict TEXT GENERATED ALWAYS AS (json_extract(body, '$.verdict')) VIRTUAL,
    session_id TEXT GENERATED ALWAYS AS (json_extract(body, '$.session_id')) VIRTUAL,
    uid INTEGER GENERATED ALWAYS AS (json_extract(body, '$.caller.uid')) VIRTUAL
);
CREATE INDEX events_time ON events (time_ns);
CREATE INDEX events_verdict ON events (verdict, seq);
CREATE INDEX events_session ON events (session_id, seq);
CREATE INDEX events_uid ON events (uid, seq);
CREATE TABLE event_rules (
    seq INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    PRIMARY KEY (seq, rule_id)
) WITHOUT ROWID;
CREATE INDEX event_rules_rule ON event_rules (rule_id);
"""
_FINDINGS = '"findings":['  # occurs once in a canonical body: quotes in strings are escaped
_FINDING_START = b'{"rule_id":'
_DECODER = json.JSONDecoder()


class AuditError(AirlockError):
    """The audit log cannot be read or written (reason says why)."""

    default_reason = Reason.AUDIT_LOG_FAILED


def caller_of(peer: PeerCred) -> Caller:
    """The caller of a connection: its peer credentials and ``/proc/PID/exe``.

    Read it when the connection is accepted: the pid may be reused once the caller exits.
    """
    try:
        exe = path_text(os.readlink(f"/proc/{peer.pid}/exe".encode()))
    except OSError:
        exe = ""
    return Caller(uid=peer.uid, pid=peer.pid, gid=peer.gid, exe=exe)


def parse_anchor(text: str) -> Anchor:
    """An anchor from its text form ``SEQ:HASH``."""
    seq, sep, digest = text.strip().partition(":")
    # A real anchor is under 100 characters: the message quotes no more (an error that
    # echoed a huge one would not fit in a gRPC status).
    shown = repr(text[:100]) + ("..." if len(text) > 100 else "")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise InvalidRequest(f"anchor {shown} is not SEQ:HASH", reason="INVALID_ANCHOR")
    try:
        bytes.fromhex(digest)
    except ValueError:
        raise InvalidRequest(f"anchor {shown} is not SEQ:HASH", reason="INVALID_ANCHOR") from None
    return Anchor(seq=int(seq), hash=digest.lower())


def load_key(path: str, *, create: bool = False) -> bytes:
    """The HMAC key in ``path`` (64 hex digits), created (0600, atomically) if asked.

    The file must be a regular file owned by us and unreadable to group and others.
    """
    if create and not os.path.lexists(path):
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode("ascii") + b"\n")
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(tmp, path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            os.unlink(tmp)

    def bad(why: str) -> AuditError:
        return AuditError(f"the audit key {path} {why}", reason="AUDIT_KEY_INVALID")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise bad(f"cannot be opened: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("is not a regular file")
        if st.st_uid != os.geteuid():
            raise bad(f"is owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_mode & 0o077:
            raise bad(f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise bad("does not hold hex digits") from None
    if len(key) != KEY_BYTES:
        raise bad(f"holds {len(key)} bytes; expected {KEY_BYTES}")
    return key


def _fingerprint(f: AuditFilter) -> str:
    fields = [
        f.since_ns,
        f.until_ns,
        None if f.verdict is None else f.verdict.name,
        f.rule_id,
        f.session_id,
        f.uid,
    ]
    if f.agent_name is not None or f.tool_use_id is not None:
        fields += [f.agent_name, f.tool_use_id]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:12]


def _parse_token(token: str | None, fingerprint: str) -> tuple[int, int | None]:
    """A page token's (last seq returned, upper bound of seqs to look at)."""
    if not token:
        return 0, None
    parts = token.split(".")
    if (
        len(parts) != 3
        or not parts[0].isdigit()
        or not (parts[1] == "" or parts[1].isdigit())
        or parts[2] != fingerprint
    ):
        raise InvalidRequest(
            "page_token is not one that list() returned for this filter",
            reason="INVALID_PAGE_TOKEN",
        )
    return int(parts[0]), int(parts[1]) if parts[1] else None


def _rules_of(body: str) -> builtins.list[str] | None:
    """The sorted rule ids of a canonical body's findings (None: not a canonical body)."""
    start = body.find(_FINDINGS)
    if start < 0:
        return None
    try:
        findings, _ = _DECODER.raw_decode(body, start + len(_FINDINGS) - 1)
        return sorted({f["rule_id"] for f in findings})
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class _Walk:
    """verify's one pass over the events and the rule index, both in seq order."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        key: bytes | None,
        anchor: Anchor | None,
        known: Anchor | None = None,
    ):
        self.conn = conn
        self.key = key
        self.anchor_seq = anchor.seq if anchor is not None else 0
        self.known_seq = known.seq if known is not None else 0
        self.expected_seq = 1
        self.expected_prev = GENESIS_HASH
        self.anchored: str | None = None  # the hash of event anchor_seq
        self.known: str | None = None  # the hash of event known_seq
        self.mismatch: tuple[int, str, str, str] | None = None  # a row whose hash is wrong
        self._needles: dict[str, bytes] = {}

    def run(self) -> VerifyProblem | None:
        hasher = record_hasher(self.key)
        rules = self.conn.execute("SELECT seq, rule_id FROM event_rules ORDER BY seq, rule_id")
        pending: tuple[int, str] | None = rules.fetchone()
        events = self.conn.execute(
            "SELECT seq, prev_hash, hash, CAST(body AS BLOB) FROM events ORDER BY seq"
        )
        for seq, prev, digest, body in events:
            if seq != self.expected_seq:
                first = self.expected_seq
                missing = (
                    f"event {first} is missing"
                    if seq == first + 1
                    else f"events {first}..{seq - 1} are missing"
                )
                return VerifyProblem(ProblemKind.DELETED, first, f"{missing} (the next is {seq})")
            if hasher(seq, prev, body) != digest:
                self.mismatch = (seq, prev, digest, body.decode("utf-8", "replace"))
                return None
            if prev != self.expected_prev:
                return VerifyProblem(
                    ProblemKind.DELETED,
                    seq,
                    f"event {seq} does not link to event {seq - 1}: events before it were "
                    "removed or replaced",
                )
            indexed: builtins.list[str] = []
            while pending is not None and pending[0] <= seq:
                if pending[0] < seq:
                    return VerifyProblem(
                        ProblemKind.EDITED,
                        pending[0],
                        f"the rule index names event {pending[0]}, which is not in the log",
                    )
                indexed.append(pending[1])
                pending = rules.fetchone()
            if (indexed or _FINDING_START in body) and not self._rules_match(body, indexed):
                return self._rules_problem(seq, body.decode("utf-8", "replace"), indexed)
            if seq == self.anchor_seq:
                self.anchored = digest
            if seq == self.known_seq:
                self.known = digest
            self.expected_seq, self.expected_prev = seq + 1, digest
        if pending is not None:
            last = self.expected_seq - 1
            return VerifyProblem(
                ProblemKind.TRUNCATED,
                self.expected_seq,
                f"the rule index names event {pending[0]}, but the log ends at {last}: "
                "events were removed from its end (or the index was edited)",
            )
        return None

    def _rules_match(self, body: bytes, indexed: builtins.list[str]) -> bool:
        """Whether the index lists exactly the body's rules, without parsing it (fast path).

        In a canonical body ``{"rule_id":`` only starts a finding (quotes inside strings
        are escaped), so counting it counts the findings. If every indexed rule is
        there and there are as many findings as indexed (distinct) rules, the sets are
        equal. Otherwise (a rule found twice, or a real mismatch) parse to be sure.
        """
        if body.count(_FINDING_START) != len(indexed):
            return _rules_of(body.decode("utf-8", "replace")) == indexed
        for rule in indexed:
            needle = self._needles.get(rule)
            if needle is None:
                needle = self._needles[rule] = _FINDING_START + _rule_json(rule) + b","
            if needle not in body:
                return False
        return True

    @staticmethod
    def _rules_problem(seq: int, body: str, indexed: builtins.list[str]) -> VerifyProblem:
        expected = _rules_of(body)
        if expected is None:
            return VerifyProblem(ProblemKind.EDITED, seq, f"event {seq} is not canonical JSON")
        lacking = sorted(set(expected) - set(indexed))
        if lacking:
            detail = (
                f"the rule index lacks rule {lacking[0]!r} of event {seq} "
                "(a filter by that rule would hide it)"
            )
        else:
            extra = sorted(set(indexed) - set(expected))
            detail = f"the rule index lists rule {extra[0]!r} for event {seq}, which lacks it"
        return VerifyProblem(ProblemKind.EDITED, seq, detail)


def _rule_json(rule: str) -> bytes:
    return json.dumps(rule, ensure_ascii=False).encode("utf-8", "surrogateescape")


def _check_anchor(
    anchor: Anchor, head: Anchor | None, anchored: str | None, source: str = "the anchor"
) -> VerifyProblem | None:
    """``anchor`` (an earlier head, from ``source``) against the log's head and the hash the
    log holds at the anchor's seq."""
    last = head.seq if head else 0
    if anchor.seq > last:
        return VerifyProblem(
            ProblemKind.TRUNCATED,
            last + 1,
            f"{source} names event {anchor.seq}, but the log ends at {last}: "
            f"events {last + 1}..{anchor.seq} were removed from its end",
        )
    if anchor.seq >= 1 and anchored != anchor.hash:
        return VerifyProblem(
            ProblemKind.REWRITTEN,
            anchor.seq,
            f"event {anchor.seq} has hash {anchored}, but {source} says {anchor.hash}: "
            "the chain up to it was rewritten",
        )
    return None


def _file_problem(path: str) -> VerifyProblem | None:
    """A log file emptied, seen without opening it (SQLite would wait on it or misread it).

    Only ``stat``: opening and closing the file here would drop the locks SQLite holds on it
    in this process (POSIX record locks belong to the process, not to a descriptor).
    """
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise AuditError(f"audit log {path}: cannot be read: {err.strerror}") from None
    if size == 0:
        return VerifyProblem(
            ProblemKind.TRUNCATED, 1, f"the file {path} is empty: the log was cut short"
        )
    return None


@dataclass
class _Pending:
    """Events waiting for a commit, and what became of them."""

    events: tuple[AuditEvent, ...]
    bodies: list[bytes]
    # Whether its commit must fsync (``append(durable=False)``: written, not fsynced).
    durable: bool = True
    done: threading.Event = field(default_factory=threading.Event)
    claimed: bool = False  # its commit began: it is written or fails whole, never withdrawn
    stored: list[StoredEvent] = field(default_factory=list)
    error: AuditError | None = None


class AuditLog:
    """An append-only, hash-chained audit log in the SQLite file ``path``.

    Opens (creating if need be) at construction; use it as a context manager or call
    :meth:`close`. Thread-safe: one writer thread commits appends (batched when they come
    at once), reads run beside them. ``key``: HMAC the chain with it (see ``load_key``).
    ``fsync=False`` trades durability across a machine crash for latency (an appended
    event still survives the process being killed); see docs/decisions.md.
    ``append_timeout_s``: how long an append waits for its commit to begin (see
    :meth:`append_many`). No thread runs until the first append.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        fsync: bool = True,
        append_timeout_s: float = APPEND_TIMEOUT_S,
    ) -> None:
        self.path = os.fspath(path)
        self._key = key
        self.append_timeout_s = append_timeout_s
        self._cond = threading.Condition()  # guards the queue, its count, _closing, claims
        self._queue: builtins.list[_Pending] = []  # appends waiting for the next commit
        self._queued = 0  # events in the queue
        self._writer_thread: threading.Thread | None = None
        # A commit is under way (in the writer thread, or inline in an appending thread).
        self._committing = False
        self._closing = False
        self._read_lock = threading.Lock()
        self._closed = False
        self._last: Anchor | None = None
        self._on_commit: Callable[[Anchor], None] | None = None
        # FULL: the WAL is fsynced at every commit, so an appended event survives a crash of
        # the machine; NORMAL: only the process being killed (see _sqlite.Database.connect).
        self._db = _sqlite.Database(
            path=self.path,
            noun="audit log",
            error=AuditError,
            corrupt_reason=Reason.AUDIT_LOG_CORRUPT,
            corrupt_advice="move it aside and restore a verified copy",
            application_id=_APPLICATION_ID,
            schema_version=_SCHEMA_VERSION,
            schema=_SCHEMA,
            synchronous="FULL" if fsync else "NORMAL",
        )
        with self._db.guard("open"):
            self._db.create_file()
            self._writer = self._db.connect()
            try:
                self._setup(self._writer)
                self._writer.execute(f"PRAGMA busy_timeout = {_WRITER_BUSY_MS}")
                self._reader = self._db.connect()
                self._reader.execute(f"PRAGMA busy_timeout = {_READ_BUSY_MS}")
                self._last = self._head(self._reader)
            except BaseException:
                self._writer.close()
                raise

    @classmethod
    def in_state_dir(cls, state_dir: str, *, keyed: bool = True) -> AuditLog:
        """The daemon's log, ``STATE_DIR/audit.sqlite3``, keyed with ``STATE_DIR/audit.key``."""
        key = load_key(os.path.join(state_dir, KEY_FILE), create=True) if keyed else None
        return cls(os.path.join(state_dir, LOG_FILE), key=key)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the writer (appends still queued fail with AUDIT_LOG_CLOSED), then close."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._writer_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            while self._committing:  # an append committing in its own thread: it ends first
                self._cond.wait()
        with self._read_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._reader.close()
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()

    # --- Writing ------------------------------------------------------------------------------

    def append(self, event: AuditEvent, *, durable: bool = True) -> StoredEvent:
        """Append one event; it is durable (fsynced) when this returns.

        ``durable=False``: written but not fsynced when this returns (it survives the
        process being killed; a crash of the machine may lose it until the next fsynced
        commit, which makes it durable too: the log is one file, written in order). For an
        outcome recorded after its decision, never for a decision (docs/decisions.md §47).
        """
        return self.append_many((event,), durable=durable)[0]

    def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        timeout: float | None = None,
        durable: bool = True,
    ) -> builtins.list[StoredEvent]:
        """Append events in one transaction: all of them or none.

        Every event queued so far is committed in one transaction and one fsync (group
        commit); callers wait for theirs. When no commit is under way, the appending thread
        commits the queue itself (no hand-off to the writer thread and back: two thread
        wake-ups fewer, ~0.2 ms and some CPU per call); otherwise the writer thread commits
        what queued up meanwhile, once the commit under way has ended. An append whose commit
        has not begun within ``timeout`` (default ``append_timeout_s``: another process holds
        the log's write lock, or the disk stalls) is withdrawn and fails, nothing of it
        written; so does one that finds MAX_QUEUED events waiting. One whose commit has
        begun is waited for: it is then written, or fails, as a whole.
        """
        try:
            bodies = [encode_event(e) for e in events]
        except MalformedEvent as err:
            raise AuditError(f"cannot log the event: {err}", reason="AUDIT_EVENT_INVALID") from None
        mine = _Pending(tuple(events), bodies, durable)
        with self._cond:
            if self._closing or self._closed:
                raise AuditError(f"the audit log {self.path} is closed", reason="AUDIT_LOG_CLOSED")
            if self._queued + len(bodies) > MAX_QUEUED:
                raise AuditError(
                    f"the audit log {self.path} has {self._queued} events waiting for a commit "
                    "(it is stalled); nothing was appended"
                )
            self._queue.append(mine)
            self._queued += len(bodies)
            if self._writer_thread is None:
                self._writer_thread = threading.Thread(
                    target=self._write_loop, name="audit-writer", daemon=True
                )
                self._writer_thread.start()
            inline = not self._committing
            if inline:
                self._committing = True
            else:
                self._cond.notify_all()
        if inline:
            # Commits every queued append, this one included, unless another process holds
            # the log's write lock: then the writer thread retries, as for any append.
            self._commit_turn()
        wait = self.append_timeout_s if timeout is None else timeout
        if not mine.done.wait(wait):
            with self._cond:
                if not mine.claimed:
                    self._queue.remove(mine)
                    self._queued -= len(bodies)
                    raise AuditError(
                        f"the audit log {self.path} did not take the event within {wait:g} s "
                        "(another process holds its write lock, or its disk stalls); "
                        "nothing was appended"
                    )
            mine.done.wait()  # its commit began: it ends, written or failed
        if mine.error is not None:
            raise AuditError(mine.error.message, reason=mine.error.reason)
        return mine.stored

    def on_commit(self, callback: Callable[[Anchor], None] | None) -> None:
        """Call ``callback(head)`` after each commit, in the thread that committed (the writer
        thread or an appending one; it must not block)."""
        self._on_commit = callback

    def _claim(self, *, durable: bool = True) -> builtins.list[_Pending]:
        """Take every queued append (``_cond`` held): their commit begins.

        ``durable=False`` (a commit without the fsync): only the appends that do not need
        one; the others stay queued for the next commit, which fsyncs."""
        if durable:
            batch, self._queue, self._queued = self._queue, [], 0
        else:
            batch = [p for p in self._queue if not p.durable]
            self._queue = [p for p in self._queue if p.durable]
            self._queued = sum(len(p.bodies) for p in self._queue)
        for p in batch:
            p.claimed = True
        return batch

    def _write_loop(self) -> None:
        """The writer thread: commit whatever is queued (and no appending thread commits)
        until the log closes."""
        while True:
            with self._cond:
                while (not self._queue or self._committing) and not self._closing:
                    self._cond.wait()
                if self._closing:
                    closed = AuditError(
                        f"the audit log {self.path} is closed", reason="AUDIT_LOG_CLOSED"
                    )
                    for p in self._claim():
                        p.stored, p.error = [], closed
                        p.done.set()
                    return
                self._committing = True
            if not self._commit_turn():
                with self._cond:  # locked by another process: try again shortly
                    self._cond.wait(0.05)

    def _commit_turn(self) -> bool:
        """Commit the queue (``_committing`` set by the caller), then let the next commit
        begin; False: another process holds the write lock (nothing was taken)."""
        try:
            return self._commit_queued()
        finally:
            with self._cond:
                self._committing = False
                if self._queue or self._closing:
                    self._cond.notify_all()  # the writer thread (what queued up), or close()

    def _commit_queued(self) -> bool:
        """Commit the queue in one transaction, marking each append done; False: the log
        is locked by another process (nothing was taken from the queue)."""
        conn = self._writer
        batch: builtins.list[_Pending] = []
        # Without the fsync only while nothing queued needs it; an append that needs it and
        # comes meanwhile is left for the next commit (_claim), which fsyncs.
        with self._cond:
            durable = self._db.synchronous != "NORMAL" and any(p.durable for p in self._queue)
        relaxed = self._db.synchronous != "NORMAL" and not durable
        try:
            with self._db.guard("append"):
                if relaxed:
                    conn.execute("PRAGMA synchronous = NORMAL")
                try:
                    try:
                        conn.execute("BEGIN IMMEDIATE")  # waits _WRITER_BUSY_MS at most
                    except sqlite3.OperationalError as err:
                        if getattr(err, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES:
                            return False
                        raise
                    with self._cond:
                        batch = self._claim(durable=not relaxed)
                    try:
                        self._insert(conn, batch)
                        conn.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    if relaxed:
                        conn.execute(f"PRAGMA synchronous = {self._db.synchronous}")
        except AuditError as err:
            if not batch:  # BEGIN failed: the queue fails with it
                with self._cond:
                    batch = self._claim()
            for p in batch:
                p.stored, p.error = [], err
        except Exception as exc:  # a bug: the callers fail closed, the writer goes on
            for p in batch:
                p.stored, p.error = [], AuditError(f"the append failed: {exc!r}")
        else:
            written = [p.stored[-1] for p in batch if p.stored]
            if written:
                self._last = Anchor(seq=written[-1].seq, hash=written[-1].hash)
                if self._on_commit is not None:
                    self._on_commit(self._last)
        finally:
            for p in batch:
                p.done.set()
        return True

    def _insert(self, conn: sqlite3.Connection, batch: builtins.list[_Pending]) -> None:
        head = self._head(conn)
        self._check_not_rewound(conn, head)
        seq, prev = (head.seq, head.hash) if head else (0, GENESIS_HASH)
        rows: builtins.list[tuple[int, str, str, str]] = []
        rules: builtins.list[tuple[int, str]] = []
        for p in batch:
            stored = []
            for event, body in zip(p.events, p.bodies, strict=True):
                seq += 1
                digest = chain_hash(seq, prev, body, self._key)
                rows.append((seq, prev, digest, body.decode("utf-8")))
                rules.extend((seq, r) for r in {f.rule_id for f in event.findings})
                stored.append(StoredEvent(seq=seq, prev_hash=prev, hash=digest, event=event))
                prev = digest
            p.stored = stored
        conn.executemany(
            "INSERT INTO events (seq, prev_hash, hash, body) VALUES (?, ?, ?, ?)", rows
        )
        conn.executemany("INSERT INTO event_rules (seq, rule_id) VALUES (?, ?)", rules)

    def _check_not_rewound(self, conn: sqlite3.Connection, head: Anchor | None) -> None:
        """The last event this log appended (or saw at open) must still be there."""
        last = self._last
        if last is None:
            return
        row = conn.execute("SELECT hash FROM events WHERE seq = ?", (last.seq,)).fetchone()
        if row is None or row[0] != last.hash:
            now = "gone" if row is None else "changed"
            raise AuditError(
                f"the audit log {self.path} was tampered with: event {last.seq}, which was "
                f"in the log before, is {now} (the log now ends at "
                f"{head.seq if head else 0}); nothing was appended",
                reason="AUDIT_LOG_TAMPERED",
            )

    # --- Reading ------------------------------------------------------------------------------

    def head(self) -> Anchor | None:
        """The last event's sequence number and hash: the anchor to keep elsewhere."""
        with self._read_lock, self._db.guard("read the head"):
            return self._head(self._open_conn(self._reader))

    def list(
        self,
        filter: AuditFilter | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> tuple[builtins.list[StoredEvent], str | None]:
        """One page of the events that match ``filter``, by sequence number.

        Returns the page and the token of the next page (None after the last page).
        Pages are stable: each event comes once, in seq order, and events appended
        meanwhile come on later pages if they match, except with a time range that
        ended before the first page was read (such a listing is bounded when it starts).
        """
        f = filter or AuditFilter()
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidRequest(
                f"page_size must be 1..{MAX_PAGE_SIZE}, not {page_size}",
                reason="INVALID_PAGE_SIZE",
            )
        fingerprint = _fingerprint(f)
        after, hi = _parse_token(page_token, fingerprint)
        if f.rule_id is not None:
            # Driven by the rule index, which is ordered by (rule_id, seq).
            source, key = "event_rules r JOIN events e ON e.seq = r.seq", "r.seq"
            where: builtins.list[str] = ["r.rule_id = ?"]
            params: builtins.list[object] = [f.rule_id]
        else:
            source, key = "events e", "e.seq"
            where, params = [], []
        times: builtins.list[tuple[str, object]] = []
        if f.since_ns is not None:
            times.append(("time_ns >= ?", f.since_ns))
        if f.until_ns is not None:
            times.append(("time_ns < ?", f.until_ns))
        for clause, value in (
            ("e.verdict = ?", None if f.verdict is None else f.verdict.name),
            ("e.session_id = ?", f.session_id),
            ("e.uid = ?", f.uid),
            # No index: a scan of the events the other filters leave (docs/decisions.md §8).
            ("json_extract(e.body, '$.agent.agent_name') = ?", f.agent_name),
            ("json_extract(e.body, '$.agent.tool_use_id') = ?", f.tool_use_id),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        with self._read_lock, self._db.guard("list events"):
            conn = self._open_conn(self._reader)
            conn.execute("BEGIN")
            try:
                if times and page_token is None:
                    # Times grow with seq (almost always): find the first and last seq of
                    # the range in the time index (once: later pages start after the
                    # first anyway, and the last travels in the token), then walk those
                    # seqs in order, checking the times.
                    lo, last = conn.execute(
                        "SELECT min(seq), max(seq) FROM events WHERE "  # noqa: S608
                        + " AND ".join(c for c, _ in times),
                        [v for _, v in times],
                    ).fetchone()
                    if lo is None:
                        return [], None
                    after = max(after, lo - 1)
                    # A range that ends in the past gets no new events (unless the clock
                    # went back): bound the walk. Otherwise new events may still match.
                    if f.until_ns is not None and f.until_ns <= time.time_ns():
                        hi = last
                if hi is not None:
                    where.append(f"{key} <= ?")
                    params.append(hi)
                # The unary + keeps SQLite from using the time index (and sorting by seq).
                where += [f"+e.{c}" for c, _ in times]
                params += [v for _, v in times]
                # One lower bound on seq: SQLite seeks to it (with two it may pick either).
                where.append(f"{key} > ?")
                params.append(after)
                # Only constant fragments are formatted in; every value is a parameter.
                sql = (
                    f"SELECT e.seq, e.prev_hash, e.hash, e.body FROM {source} "  # noqa: S608
                    f"WHERE {' AND '.join(where)} ORDER BY {key} LIMIT ?"
                )
                rows = conn.execute(sql, [*params, page_size + 1]).fetchall()
            finally:
                conn.execute("ROLLBACK")
        page = [self._stored(*row) for row in rows[:page_size]]
        if f.rule_id is not None:
            for stored in page:
                if all(d.rule_id != f.rule_id for d in stored.event.findings):
                    raise AuditError(
                        f"the rule index of the audit log {self.path} lists rule "
                        f"{f.rule_id!r} for event {stored.seq}, which has no such finding; "
                        "run verify: the log was probably tampered with",
                        reason="AUDIT_LOG_CORRUPT",
                    )
        more = len(rows) > page_size
        token = f"{page[-1].seq}.{'' if hi is None else hi}.{fingerprint}" if more else None
        return page, token

    def _stored(self, seq: int, prev_hash: str, digest: str, body: str) -> StoredEvent:
        try:
            event = decode_event(body)
        except MalformedEvent as err:
            raise AuditError(
                f"event {seq} of the audit log {self.path} is malformed ({err}); "
                "run verify: the log was probably tampered with",
                reason="AUDIT_LOG_CORRUPT",
            ) from None
        return StoredEvent(seq=seq, prev_hash=prev_hash, hash=digest, event=event)

    def export_jsonl(self, out: IO[bytes]) -> int:
        """Write every event as one line of canonical JSON; returns how many.

        Each line is ``{"event":BODY,"hash":H,"prev_hash":P,"seq":N}`` with BODY the
        stored canonical bytes, so an external verifier can recompute every hash.
        """
        count = 0
        with self._db.guard("export"), self._snapshot() as conn:
            cursor = conn.execute("SELECT seq, prev_hash, hash, body FROM events ORDER BY seq")
            for seq, prev, digest, body in cursor:
                line = f'{{"event":{body},"hash":"{digest}","prev_hash":"{prev}","seq":{seq}}}\n'
                out.write(line.encode("utf-8"))
                count += 1
        return count

    # --- Verifying ----------------------------------------------------------------------------

    def verify(self, anchor: Anchor | None = None) -> VerifyResult:
        """Walk the chain from seq 1 and report the first thing wrong with it.

        Finds an event that was edited, deleted or moved, and a rule index that
        disagrees with the events. Removing events from the end (or rewriting the
        whole chain, without the key) is invisible to the chain alone: pass an
        ``anchor`` (an earlier :meth:`head`, kept elsewhere) to catch it.
        """
        self._open_conn(self._reader)
        cut = _file_problem(self.path)
        if cut is not None:  # answered at once: SQLite may wait on (or misread) such a file
            return VerifyResult(events=0, head=None, problem=cut)
        known = self._last  # the last event this log appended or found at open
        with self._db.guard("verify"), self._snapshot() as conn:
            walk = _Walk(conn, self._key, anchor, known)
            problem = walk.run()
            if walk.mismatch is not None:
                problem = self._diagnose(conn, *walk.mismatch)
            last = walk.expected_seq - 1
            head = Anchor(last, walk.expected_prev) if last else None
            if problem is None and anchor is not None:
                problem = _check_anchor(anchor, head, walk.anchored)
            if problem is None and known is not None:
                problem = _check_anchor(known, head, walk.known, "the daemon's last append")
            if problem is not None and problem.seq <= last:
                # An anchor's event with another hash: the walk went past it, but only the
                # events before the problem count as intact (events and head say so).
                last = max(problem.seq - 1, 0)
                row = conn.execute("SELECT hash FROM events WHERE seq = ?", (last,)).fetchone()
                head = Anchor(last, row[0]) if last and row is not None else None
        return VerifyResult(events=last, head=head, problem=problem)

    def check_continues(self, anchor: Anchor, source: str) -> VerifyProblem | None:
        """Whether the log still holds ``anchor`` (a head kept elsewhere, by ``source``):
        None, or what is wrong (the file cut short, the log ending before it, another hash).
        Reads the header, the head and one event: prompt on any size of log."""
        cut = _file_problem(self.path)
        if cut is not None:
            return cut
        with self._read_lock, self._db.guard("read the head"):
            conn = self._open_conn(self._reader)
            head = self._head(conn)
            row = conn.execute("SELECT hash FROM events WHERE seq = ?", (anchor.seq,)).fetchone()
        return _check_anchor(anchor, head, None if row is None else row[0], source)

    def _diagnose(
        self, conn: sqlite3.Connection, seq: int, prev: str, digest: str, body: str
    ) -> VerifyProblem:
        """Why event ``seq`` does not match its hash: moved here, or edited."""
        nxt = conn.execute("SELECT min(seq) FROM events WHERE prev_hash = ?", (digest,)).fetchone()
        before = conn.execute("SELECT min(seq) FROM events WHERE hash = ?", (prev,)).fetchone()
        candidates = [s for s in (nxt[0] and nxt[0] - 1, before[0] and before[0] + 1) if s]
        # Renumbering shifts whole runs (the neighbours moved too): try nearby seqs.
        for d in range(1, _MOVED_WINDOW + 1):
            candidates += [seq + d, seq - d]
        raw = body.encode("utf-8")
        for written_at in dict.fromkeys(s for s in candidates if s > 0 and s != seq):
            if chain_hash(written_at, prev, raw, self._key) == digest:
                return VerifyProblem(
                    ProblemKind.REORDERED,
                    seq,
                    f"event {seq} holds the event written as event {written_at}: "
                    "events were moved or renumbered",
                )
        if nxt[0] is not None:
            why = "its contents were changed after it was written (its hash does not match)"
        else:
            why = "its hash does not match its contents, and no event links to that hash"
        return VerifyProblem(ProblemKind.EDITED, seq, f"event {seq}: {why}")

    # --- Plumbing -----------------------------------------------------------------------------

    def _setup(self, conn: sqlite3.Connection) -> None:
        want = "" if self._key is None else key_id(self._key)
        with _sqlite.immediate(conn):
            if self._db.check_schema(conn):
                conn.execute("INSERT INTO meta VALUES ('key_id', ?)", (want,))
                return
            row = conn.execute("SELECT value FROM meta WHERE name = 'key_id'").fetchone()
            have = None if row is None else row[0]
            if have != want:
                raise AuditError(
                    f"the audit log {self.path} was created "
                    + ("without a key" if have == "" else f"with the key {have}")
                    + ", but is opened "
                    + ("without a key" if not want else f"with the key {want}"),
                    reason="AUDIT_KEY_MISMATCH",
                )

    @staticmethod
    def _head(conn: sqlite3.Connection) -> Anchor | None:
        row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else Anchor(seq=row[0], hash=row[1])

    def _open_conn(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        if self._closed:
            raise AuditError(f"the audit log {self.path} is closed", reason="AUDIT_LOG_CLOSED")
        return conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own in one read transaction: long reads do not block."""
        self._open_conn(self._reader)
        # Not _db.connect(): setting the journal mode may wait for a lock; the file is in WAL
        # mode already. mode=rw: a log that was removed is not created empty.
        uri = f"file:{urllib.parse.quote(self.path)}?mode=rw"
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=_READ_BUSY_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("BEGIN")
            yield conn
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()


def read_events(
    path: str | os.PathLike[str],
    *,
    kinds: Sequence[RpcKind] = (),
    limit: int,
    newest_first: bool = False,
) -> builtins.list[StoredEvent]:
    """The first (or, ``newest_first``, the last) ``limit`` events of the audit log ``path``
    (of ``kinds``, if given), in that order of seq.

    Read-only, without the daemon and without its key: the file is opened with SQLite's
    ``mode=ro`` (never created, never written, its journal mode left alone; like any reader
    of a WAL database, SQLite may create its empty ``-wal`` and ``-shm`` side files) and must
    be an Airlock audit log of this schema version. The chain is not verified (``verify`` does
    that); a body that does not decode is an AUDIT_LOG_CORRUPT error.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        why = "it does not exist" if not os.path.lexists(name) else "it is not a regular file"
        raise AuditError(f"cannot read the audit log {name}: {why}")
    db = _sqlite.Database(
        path=name,
        noun="audit log",
        error=AuditError,
        corrupt_reason=Reason.AUDIT_LOG_CORRUPT,
        corrupt_advice="move it aside and restore a verified copy",
        application_id=_APPLICATION_ID,
        schema_version=_SCHEMA_VERSION,
        schema=_SCHEMA,
    )
    with db.guard("read events"):
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(name)}?mode=ro",
            uri=True,
            timeout=_READ_BUSY_MS / 1000,
            isolation_level=None,
        )
        try:
            try:
                app = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as err:
                if getattr(err, "sqlite_errorcode", 0) & 0xFF != _NOT_A_DATABASE:
                    raise
                raise AuditError(
                    f"{name} is not an Airlock audit log (not an SQLite database)",
                    reason=Reason.AUDIT_LOG_CORRUPT,
                ) from None
            if app != _APPLICATION_ID:
                raise AuditError(
                    f"{name} is not an Airlock audit log (application_id {app:#x})",
                    reason=Reason.AUDIT_LOG_CORRUPT,
                )
            if version != _SCHEMA_VERSION:
                raise AuditError(
                    f"the audit log {name} has schema version {version}; "
                    f"this Airlock reads version {_SCHEMA_VERSION}",
                    reason=Reason.AUDIT_LOG_CORRUPT,
                )
            sql = "SELECT seq, prev_hash, hash, body FROM events"
            params: builtins.list[object] = []
            if kinds:
                marks = ", ".join("?" for _ in kinds)
                sql += f" WHERE json_extract(body, '$.kind') IN ({marks})"
                params += [RpcKind(k).name for k in kinds]
            order = "DESC" if newest_first else "ASC"
            rows = conn.execute(f"{sql} ORDER BY seq {order} LIMIT ?", [*params, limit]).fetchall()
        finally:
            conn.close()
    out: builtins.list[StoredEvent] = []
    for seq, prev_hash, digest, body in rows:
        try:
            event = decode_event(body)
        except MalformedEvent as err:
            raise AuditError(
                f"event {seq} of the audit log {name} is malformed ({err}); "
                "run verify: the log was probably tampered with",
                reason=Reason.AUDIT_LOG_CORRUPT,
            ) from None
        out.append(StoredEvent(seq=seq, prev_hash=prev_hash, hash=digest, event=event))
    return out
