"""The SQLite stores' memory is bounded: each connection's page cache is capped, so a daemon
whose state store and audit log grow does not grow with them (issue 15: the soak's RSS slope
was the page caches of three connections filling towards SQLite's default 2 MB each)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sqlite3
from pathlib import Path

import pytest

from airlock import _sqlite
from airlock._errors import AirlockError

# The library the sqlite3 module runs on (already loaded: this is the same handle).
_lib_name = ctypes.util.find_library("sqlite3")
if _lib_name is None:  # pragma: no cover - a Python built with a static SQLite
    pytest.skip("libsqlite3 is not a shared library here", allow_module_level=True)
_LIB = ctypes.CDLL(_lib_name)
_LIB.sqlite3_memory_used.restype = ctypes.c_int64


def memory_used() -> int:
    return int(_LIB.sqlite3_memory_used())


def database(path: Path) -> _sqlite.Database:
    return _sqlite.Database(
        path=str(path),
        noun="test store",
        error=AirlockError,
        corrupt_reason="STATE_STORE_CORRUPT",
        corrupt_advice="remove it",
        application_id=0x7E57,
        schema_version=1,
        schema="CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB NOT NULL)",
    )


def test_the_page_cache_of_a_connection_is_capped(tmp_path: Path) -> None:
    db = database(tmp_path / "store.db")
    db.create_file()
    conn = db.connect()
    try:
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -_sqlite.CACHE_KIB
        with _sqlite.immediate(conn):
            db.check_schema(conn)
        before = memory_used()
        # 24 MB of rows written and read back: every page passes through the cache.
        blob = os.urandom(4096)
        for start in range(0, 6000, 500):
            with _sqlite.immediate(conn):
                conn.executemany(
                    "INSERT INTO t (id, blob) VALUES (?, ?)",
                    ((i, blob) for i in range(start, start + 500)),
                )
        total = sum(len(row[0]) for row in conn.execute("SELECT blob FROM t"))
        assert total == 6000 * 4096
        grown = memory_used() - before
    finally:
        conn.close()
    # SQLite's default cache (2,000 KiB) would have filled; the cap leaves room for the
    # schema, statements and the page cache's own bookkeeping.
    assert grown < (_sqlite.CACHE_KIB + 256) * 1024, grown
    assert grown < 2000 * 1024 * 0.8, grown


def test_an_uncapped_connection_does_grow(tmp_path: Path) -> None:
    # The measurement above can fail: the same work on SQLite's default cache grows past it.
    path = tmp_path / "plain.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB NOT NULL)")
        before = memory_used()
        blob = os.urandom(4096)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (id, blob) VALUES (?, ?)", ((i, blob) for i in range(6000)))
        conn.execute("COMMIT")
        sum(len(row[0]) for row in conn.execute("SELECT blob FROM t"))
        grown = memory_used() - before
    finally:
        conn.close()
    assert grown > (_sqlite.CACHE_KIB + 256) * 1024, grown
