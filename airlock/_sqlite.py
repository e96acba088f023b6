"""The SQLite set-up the audit log and the state store share: one file, WAL, a checked schema.

Each store describes its file with a :class:`Database` (its name in messages, its error class
and reasons, its ``application_id``, schema and schema version) and keeps its own tables,
queries and locking. What is shared:

* :meth:`Database.create_file`: the file exists, mode 0600, never through a symbolic link;
* :meth:`Database.connect`: autocommit connections in WAL mode with the store's
  ``synchronous`` setting, usable from any thread (the store serializes them);
* :func:`immediate`: one ``BEGIN IMMEDIATE`` transaction, committed or rolled back whole;
* :meth:`Database.check_schema`: create the schema in an empty file, or refuse a file that is
  not this store or has another schema version (the store's corrupt reason);
* :meth:`Database.guard`: ``sqlite3`` and OS errors become the store's error naming the file;
  a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB) gets the corrupt reason and the store's advice.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from airlock._errors import AirlockError

__all__ = ["BUSY_TIMEOUT_S", "CACHE_KIB", "Database", "immediate"]

BUSY_TIMEOUT_S = 30.0
# Each connection's page cache, KiB. SQLite's default (2,000 KiB) fills as a store grows, so a
# daemon's three long-lived connections (state store, audit writer and reader) grew its RSS
# for its first ~10,000 calls (the soak's "per-call leak", issue 15); reads past the cache
# come from the OS's page cache, which the kernel bounds and reclaims.
CACHE_KIB = 512
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes)


@dataclass(frozen=True)
class Database:
    """One store's SQLite file and how its failures read.

    ``noun``: the store in messages ("audit log"); ``error``: its error class, whose default
    reason is that of a failure; ``corrupt_reason``: the reason of a damaged or foreign file;
    ``corrupt_advice``: what to do about a damaged one.
    """

    path: str
    noun: str
    error: type[AirlockError]
    corrupt_reason: str
    corrupt_advice: str
    application_id: int
    schema_version: int
    schema: str
    synchronous: str = "FULL"
    foreign_keys: bool = False

    def create_file(self) -> None:
        """Create the file (mode 0600) if it is missing; refuse a symbolic link."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def connect(self) -> sqlite3.Connection:
        """A new autocommit connection in WAL mode (transactions are explicit)."""
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise self.error(
                    f"the {self.noun} {self.path} cannot use WAL mode (journal_mode={mode})"
                )
            # FULL: the WAL is fsynced at every commit, so a commit survives a crash of the
            # machine. NORMAL: a commit is written to the WAL (the OS has it: it survives the
            # process being killed) and fsynced at checkpoints only.
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            if self.foreign_keys:
                conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def check_schema(self, conn: sqlite3.Connection) -> bool:
        """Create the schema in an empty file (True), or check that the file is this store's
        with this schema version (False). Call it inside :func:`immediate`."""
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app == 0 and version == 0 and tables == 0:
            for statement in self.schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {self.application_id}")
            conn.execute(f"PRAGMA user_version = {self.schema_version}")
            return True
        if app != self.application_id:
            raise self.error(
                f"{self.path} is not an Airlock {self.noun} (application_id {app:#x})",
                reason=self.corrupt_reason,
            )
        if version != self.schema_version:
            raise self.error(
                f"the {self.noun} {self.path} has schema version {version}; "
                f"this Airlock reads version {self.schema_version}",
                reason=self.corrupt_reason,
            )
        return False

    @contextlib.contextmanager
    def guard(self, action: str) -> Iterator[None]:
        """sqlite3 and OS errors become the store's errors that name the file."""
        try:
            yield
        except sqlite3.Error as err:
            code = getattr(err, "sqlite_errorcode", 0) & 0xFF
            if code in _CORRUPT_CODES:
                raise self.error(
                    f"the {self.noun} {self.path} is corrupt ({err}); {self.corrupt_advice}",
                    reason=self.corrupt_reason,
                ) from None
            raise self.error(f"{self.noun} {self.path}: could not {action}: {err}") from None
        except OSError as err:
            raise self.error(f"{self.noun} {self.path}: could not {action}: {err}") from None


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, else rolled back
    whole (an error raised inside, such as a refusal, changes nothing)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
