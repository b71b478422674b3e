"""Helpers shared by the lab-backed tests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from igops.lab import aws, state
from igops.secrets import Secrets
from tests.conftest import run_igops


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Ask `predicate` until it answers truthy or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def verify_lab_ledger(ledger: Path, app_host: str = "app1"):
    """Check a load generator's ledger against the lab's Postgres, Redis and S3, reading the
    stores' addresses from `app_host`'s app config."""
    # Not app.loadgen.verify: once the submodule of that name is imported, it shadows the function.
    from app.loadgen.verify import verify_ledger

    config = state.paths().app_root(app_host) / "shared" / "app.toml"
    previous = {key: os.environ.get(key) for key in aws.AWS_ENV}
    os.environ.update(aws.AWS_ENV)
    try:
        return verify_ledger(ledger, config)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def postgres(lab, node: str, database: str = "postgres", user: str | None = None, password: str | None = None):
    """An autocommit connection straight to one lab server (the inventory's superuser by default)."""
    import psycopg2

    connection = psycopg2.connect(
        host=str(lab.host(node).address),
        port=lab.model.postgres.port,
        user=user or lab.model.postgres.user,
        dbname=database,
        connect_timeout=5,
        password=password or Secrets(lab.model.secrets.file).get("postgres_password"),
    )
    connection.autocommit = True
    return connection


def trim_wal(lab, primary: str, standby: str) -> None:
    """Every promotion leaves a 16 MB segment per timeline on each member until the WAL moves past
    it; the lab's WAL volumes are small, so move it along and checkpoint everywhere."""
    position = _ask(
        lab,
        primary,
        *(["SELECT pg_logical_emit_message(false, 'igops-test', 'trim')", "SELECT pg_switch_wal()"] * 4),
        "CHECKPOINT",
        "SELECT pg_current_wal_lsn()::text",
    )
    # A standby that is not streaming just keeps its segments: nothing to wait for.
    replayed(lab, standby, position, 30)
    _ask(lab, standby, "CHECKPOINT")


def wait_replayed(lab, primary: str, standby: str, timeout: float = 60) -> None:
    """Wait until the standby has replayed all the primary has written so far: a switchover
    refuses a candidate that lags (as it should), and a test that just wrote a shard's worth of
    WAL must let it catch up first."""
    position = _ask(lab, primary, "SELECT pg_current_wal_lsn()::text")
    assert replayed(lab, standby, position, timeout), f"{standby} did not replay to {position}"


def replayed(lab, standby: str, position: str, timeout: float) -> bool:
    """Whether the standby replays up to `position` within `timeout` seconds."""
    connection = postgres(lab, standby)
    try:
        with connection.cursor() as cursor:

            def done() -> bool:
                cursor.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (position,))
                return bool(cursor.fetchone()[0])

            return bool(wait_for(done, timeout))
    finally:
        connection.close()


def _ask(lab, node: str, *statements: str):
    """Run `statements` on one connection to `node`; the first column of the last one's row
    (None for a statement without one)."""
    connection = postgres(lab, node)
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
            return cursor.fetchone()[0] if cursor.description else None
    finally:
        connection.close()


def without_coordination(inventory_text: str) -> str:
    """An inventory's text without its [coordination] section: leases, journal and audit log go
    back to the state directory (the local backend)."""
    import re

    return re.sub(r"^\[coordination\]\n(?:[^\[\n][^\n]*\n)*", "", inventory_text, flags=re.M)


def igops(lab, *args: str, timeout: float = 300):
    """igops against the lab with --json: the process, and its envelope (None if stdout held none)."""
    result = run_igops("-c", str(lab.source), *args, "--json", timeout=timeout)
    try:
        envelope = json.loads(result.stdout)
    except ValueError:
        envelope = None
    return result, envelope
