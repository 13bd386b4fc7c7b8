"""Stored responses in SQLite (stdlib sqlite3, WAL): bounded in number and age, on a thread of their own."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gpt4all_j_server.responses")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    response TEXT NOT NULL,
    items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""
BUSY_TIMEOUT = 2.0  # seconds a call waits for another process's lock on the file before it fails


class StoreError(Exception):
    """The store's file cannot be used (not a database, locked, read-only, disk full...): the reason."""


@dataclass(frozen=True)
class Stored:
    """A stored response: the response object and its full input items (a chain's history included)."""

    response: dict
    items: list[dict]


def _guarded(method):
    """SQLite's errors as StoreError naming the file (the connection is dropped: the next call reopens it)."""

    @functools.wraps(method)
    def call(self, *args):
        with self._lock:
            try:
                return method(self, *args)
            except sqlite3.Error as exc:
                self._drop()
                raise StoreError(f"{self.path}: {exc}") from exc

    return call


class ResponseStore:
    """Responses by id. The file is opened on first use (a server that never stores creates none). The sync
    methods take a lock; `run` calls them on the store's own thread, so a slow or locked file never holds up
    the threads the rest of the server uses."""

    def __init__(self, path: Path, max_stored: int, ttl_days: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_stored = max_stored
        self.ttl = ttl_days * 86400.0
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="responses-store")

    @property
    def enabled(self) -> bool:
        """Whether anything is stored at all (responses_max_stored 0 stores none)."""
        return self.max_stored > 0

    async def run(self, method: Callable, *args):
        """A store method, called on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(method, *args))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                db.execute("SELECT id, created, response, items FROM responses LIMIT 0")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _cutoff(self) -> float | None:
        return self.clock() - self.ttl if self.ttl > 0 else None

    @_guarded
    def check(self) -> None:
        """Open an existing file and check it holds the responses table (StoreError if it cannot be used)."""
        if self.path.exists():
            self._conn()

    @_guarded
    def put(self, response: dict, items: list[dict]) -> None:
        """Store (or replace) a response, then delete expired ones and the oldest beyond the bound."""
        if not self.enabled:
            return
        row = (response["id"], self.clock(), json.dumps(response, ensure_ascii=False),
               json.dumps(items, ensure_ascii=False))
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO responses (id, created, response, items) VALUES (?, ?, ?, ?)", row)
            self._prune(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _prune(self, db: sqlite3.Connection) -> None:
        cutoff = self._cutoff()
        if cutoff is not None:
            db.execute("DELETE FROM responses WHERE created < ?", (cutoff,))
        (count,) = db.execute("SELECT COUNT(*) FROM responses").fetchone()
        if count > self.max_stored:
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created, rowid "
                       "LIMIT ?)", (count - self.max_stored,))

    @_guarded
    def get(self, response_id: str) -> Stored | None:
        """The stored response, unless unknown or expired."""
        if not self._exists():
            return None
        row = self._conn().execute("SELECT created, response, items FROM responses WHERE id = ?",
                                   (response_id,)).fetchone()
        cutoff = self._cutoff()
        if row is None or (cutoff is not None and row[0] < cutoff):
            return None
        return Stored(json.loads(row[1]), json.loads(row[2]))

    @_guarded
    def delete(self, response_id: str) -> bool:
        """Delete a response; whether it was there (an expired one counts as gone)."""
        if not self._exists():
            return False
        cutoff = self._cutoff()
        cur = self._conn().execute("DELETE FROM responses WHERE id = ? AND created >= ?",
                                   (response_id, cutoff if cutoff is not None else float("-inf")))
        return cur.rowcount > 0

    @_guarded
    def count(self) -> int:
        """How many rows the file holds (expired ones not yet pruned included)."""
        if not self._exists():
            return 0
        return self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def _exists(self) -> bool:
        return self._db is not None or self.path.exists()

    def close(self) -> None:
        """Close the file (the next call opens it again)."""
        with self._lock:
            self._drop()


def store_for(db: Path | None, data_dir: Path | None, max_stored: int, ttl_days: float) -> ResponseStore:
    """The server's store: the responses_db file, else responses.sqlite3 in the data folder. An existing file
    that cannot be used is reported at once (the server still starts; storing and reading then fail clearly)."""
    from backends.registry_paths import user_data_dir

    store = ResponseStore(Path(db).expanduser() if db else user_data_dir(data_dir) / "responses.sqlite3",
                          max_stored, ttl_days)
    try:
        store.check()
    except StoreError as exc:
        log.error("stored responses are unavailable: %s. Responses are answered but not stored (store: false) "
                  "until the file is fixed or moved away (or --responses-db names another file).", exc)
    return store
