"""Per-host monotonic counters for monitoring (GET /stats).

All gunicorn workers of a host add to one SQLite file in the shared directory
named by the config, so the counts are per host and survive worker restarts
and deploys. WAL mode with synchronous=NORMAL makes each flush an append to
the log without an fsync; a request's increments go in one transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from app.errors import ServiceUnavailable

log = logging.getLogger(__name__)

COUNTER_NAMES = (
    "requests",
    "errors",
    "client_errors",
    "write_errors",
    "signups",
    "photos_posted",
    "likes",
    "follows",
    "request_seconds_total",
    "db_retries",
    "redis_retries",
    "worker_starts",
)
BUSY_TIMEOUT_SECONDS = 2.0


class CounterStore:
    def __init__(self, path: Path):
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value NUMERIC NOT NULL)")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.executemany(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(name,) for name in COUNTER_NAMES]
                )
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('since', ?)", (str(time.time()),))
            self._db = db
        return self._db

    def add(self, increments: Mapping[str, float]) -> None:
        if not increments:
            return
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(increments.items()),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def read(self) -> dict[str, float | int | str]:
        db = self._connection()
        values: dict[str, float | int | str] = dict(db.execute("SELECT name, value FROM counters ORDER BY name"))
        (since,) = db.execute("SELECT value FROM meta WHERE key = 'since'").fetchone()
        values["since"] = float(since)
        values["host"] = os.uname().nodename
        return values

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class Stats:
    """Collects one request's increments and writes them together at its end."""

    def __init__(self, store: CounterStore):
        self.store = store
        self.pending: Counter[str] = Counter()

    def bump(self, name: str, amount: float = 1) -> None:
        self.pending[name] += amount

    def flush(self) -> None:
        try:
            self.store.add(self.pending)
        except sqlite3.Error:
            # losing a few counts beats failing the request that produced them
            log.exception("could not write counters to %s", self.store.path)
            self.store.close()
        finally:
            self.pending.clear()

    def read(self) -> dict[str, float | int | str]:
        try:
            return self.store.read()
        except sqlite3.Error as exc:
            self.store.close()
            raise ServiceUnavailable(f"counter store {self.store.path} unreadable: {exc}") from exc


def count_worker_start(path: Path) -> None:
    """One more gunicorn worker started on this host (app.wsgi, as each worker boots)."""
    store = CounterStore(path)
    try:
        store.add({"worker_starts": 1})
    except sqlite3.Error:
        # a worker that cannot count itself must still serve
        log.exception("could not count a worker start in %s", path)
    finally:
        store.close()
