"""The move journal: the `shard_moves` table in the directory database, one row per move with
its last step, state and timings, and the per-shard advisory lock that the process driving a
move holds (the server releases it the moment that process dies)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops.errors import AlreadyRunning, RefusedError, UsageError
from igops.safety import operator_host, operator_user
from igops.shard_move_steps import MovePlan

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

ACTIVE, DONE, ABORTED = "active", "done", "aborted"

JOURNAL_DDL = """
CREATE TABLE IF NOT EXISTS shard_moves (
    id bigserial PRIMARY KEY,
    logical_shard integer NOT NULL,
    schema_name text NOT NULL,
    source text NOT NULL,
    target text NOT NULL,
    step text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'done', 'aborted')),
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    started_by text NOT NULL,
    source_lsn pg_lsn,
    source_sequence bigint,
    target_sequence bigint,
    map_version bigint,
    rows_copied bigint,
    bytes_copied bigint,
    verify_pause_ms double precision,
    lock_wait_ms double precision,
    write_block_ms double precision,
    error text,
    history jsonb NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX IF NOT EXISTS shard_moves_one_active ON shard_moves (logical_shard) WHERE status = 'active';
"""
# A session-level advisory lock per shard on the journal's connection: held by the process
# driving a move, and released by the server the moment that process dies.
ADVISORY_CLASS = 0x69676D76  # "igmv"

_RECORD_FIELDS = (
    "id",
    "logical_shard",
    "schema_name",
    "source",
    "target",
    "step",
    "status",
    "started_at",
    "updated_at",
    "finished_at",
    "started_by",
    "source_lsn",
    "source_sequence",
    "target_sequence",
    "map_version",
    "rows_copied",
    "bytes_copied",
    "verify_pause_ms",
    "lock_wait_ms",
    "write_block_ms",
    "error",
    "history",
)


@dataclass
class MoveRecord:
    id: int
    logical_shard: int
    schema_name: str
    source: str
    target: str
    step: str
    status: str
    started_at: str
    updated_at: str
    finished_at: str | None
    started_by: str
    source_lsn: str | None
    source_sequence: int | None
    target_sequence: int | None
    map_version: int | None
    rows_copied: int | None
    bytes_copied: int | None
    verify_pause_ms: float | None
    lock_wait_ms: float | None
    write_block_ms: float | None
    error: str | None
    history: list[dict[str, Any]]
    running: bool | None = None  # whether a process holds the shard's move lock now
    retained_wal_bytes: int | None = None
    state: str = field(init=False)  # running, interrupted, failed, done or aborted

    def __post_init__(self) -> None:
        if self.status != ACTIVE:
            self.state = self.status
        elif self.running:
            self.state = "running"
        else:
            self.state = "failed" if self.error else "interrupted"

    @property
    def slot(self) -> str:
        return f"igops_move_{self.id}"

    @property
    def fenced_schema(self) -> str:
        return f"{self.schema_name}_moved_{self.id}"


class Journal:
    """The `shard_moves` table in the directory database, through an autocommit connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def exists(self) -> bool:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('shard_moves') IS NOT NULL")
            row = cursor.fetchone()
            assert row is not None  # a SELECT without FROM returns one row
            return bool(row[0])

    def ensure(self) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(JOURNAL_DDL)

    def _select(self, where: str, params: tuple[Any, ...], limit: int | None = None) -> list[MoveRecord]:
        if not self.exists():
            return []
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {', '.join(_RECORD_FIELDS)} FROM shard_moves WHERE {where} ORDER BY id DESC"
                + (f" LIMIT {int(limit)}" if limit else ""),
                params,
            )
            rows = cursor.fetchall()
            cursor.execute(
                "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted", (ADVISORY_CLASS,)
            )
            locked = {row[0] for row in cursor.fetchall()}
        records = []
        for row in rows:
            values = dict(zip(_RECORD_FIELDS, row, strict=False))
            for key in ("started_at", "updated_at", "finished_at"):
                if values[key] is not None:
                    values[key] = values[key].isoformat(timespec="seconds")
            values["source_lsn"] = str(values["source_lsn"]) if values["source_lsn"] else None
            values["running"] = values["status"] == ACTIVE and values["logical_shard"] in locked
            records.append(MoveRecord(**values))
        return records

    def get(self, move_id: int) -> MoveRecord:
        found = self._select("id = %s", (move_id,))
        if not found:
            raise UsageError(f"no shard move {move_id} in the journal", "see `igops shard moves`")
        return found[0]

    def active_for(self, shard: int) -> MoveRecord | None:
        found = self._select("logical_shard = %s AND status = 'active'", (shard,))
        return found[0] if found else None

    def active(self) -> list[MoveRecord]:
        return self._select("status = 'active'", ())

    def recent(self, limit: int, shard: int | None = None) -> list[MoveRecord]:
        if shard is None:
            return self._select("true", (), limit)
        return self._select("logical_shard = %s", (shard,), limit)

    def create(self, plan: MovePlan) -> MoveRecord:
        from psycopg2 import errors

        self.ensure()
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO shard_moves (logical_shard, schema_name, source, target, step, status, started_by, "
                    "history) VALUES (%s, %s, %s, %s, 'planned', 'active', %s, "
                    "jsonb_build_array(jsonb_build_object('step', 'planned', 'at', now()))) RETURNING id",
                    (plan.shard, plan.schema, plan.source, plan.target, operator_label()),
                )
                row = cursor.fetchone()
                assert row is not None  # INSERT ... RETURNING of one row returns it
                move_id: int = row[0]
        except errors.UniqueViolation:
            other = self.active_for(plan.shard)
            raise RefusedError(
                f"shard {plan.shard} already has an unfinished move"
                + (f" ({other.id}, at {other.step})" if other else ""),
                "finish it with --resume or roll it back with --abort",
            ) from None
        return self.get(move_id)

    def advance(self, move_id: int, step: str, **fields: Any) -> None:
        self.update(move_id, step=step, **fields)

    def update(self, move_id: int, step: str | None = None, active_only: bool = False, **fields: Any) -> None:
        from psycopg2 import sql

        assignments: list[sql.Composable] = [sql.SQL("updated_at = now()")]
        params: list[Any] = []
        if step is not None:
            assignments.append(
                sql.SQL(
                    "step = %s, history = history || jsonb_build_array(jsonb_build_object('step', %s, 'at', now()))"
                )
            )
            params += [step, step]
            fields.setdefault("error", None)
        for name, value in fields.items():
            assignments.append(sql.SQL("{} = %s").format(sql.Identifier(name)))
            params.append(value)
        with self.connection.cursor() as cursor:
            cursor.execute(
                sql.SQL("UPDATE shard_moves SET {} WHERE id = %s{}").format(
                    sql.SQL(", ").join(assignments), sql.SQL(" AND status = 'active'" if active_only else "")
                ),
                [*params, move_id],
            )

    def fail(self, move_id: int, error: str) -> None:
        """The error of a move that stopped; a move finished meanwhile (aborted from elsewhere,
        say) keeps its own."""
        self.update(move_id, active_only=True, error=error[:2000])

    def finish(self, move_id: int, status: str, step: str | None = None, error: str | None = None) -> None:
        self.update(move_id, step=step, status=status, finished_at=datetime.now(UTC), error=error)

    def hold_shard(self, shard: int) -> None:
        """Take the shard's move lock for the life of this connection, or say who has it."""
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", (ADVISORY_CLASS, shard))
            row = cursor.fetchone()
            assert row is not None  # a SELECT without FROM returns one row
            if row[0]:
                return
            cursor.execute(
                "SELECT a.client_addr, a.pid, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.classid = %s AND l.objid = %s AND l.granted",
                (ADVISORY_CLASS, shard),
            )
            holder = cursor.fetchone()
        raise AlreadyRunning(
            f"a move of shard {shard} is running"
            + (f" (from {holder[0]}, session since {holder[2]:%H:%M:%S})" if holder else ""),
            "wait for it; the lock is released when that igops exits",
        )


def operator_label() -> str:
    return f"{operator_user()}@{operator_host()} pid {os.getpid()}"
