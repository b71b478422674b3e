"""A move's copy: every table COPYed out of the source under the snapshot its replication slot
exported and into the target through a pipe in this process, several tables at a time, largest
first, with the target's keys and indexes dropped first and built afterwards (as a restore does).
Between servers of one major version the COPY is binary: neither side formats or parses a value
as text (a table of bigints and timestamps copied in about two thirds of the time)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from igops.output import Reporter, human_bytes
from igops.postgres_admin import connect, replication_connection
from igops.shard_move_session import SessionPart
from igops.shard_move_steps import COPY_PARALLEL
from igops.shard_replication import drop_publication_and_slot, drop_subscription
from igops.shard_schema import tables_of
from igops.shard_slot_wait import SlotCreationWatch

if TYPE_CHECKING:
    from psycopg2.extensions import cursor as Cursor

PIPE_BLOCK = 256 * 1024  # bytes of COPY data handed on at a time


class ShardCopier(SessionPart):
    """The step `copied` of a move: its `run` and the copy pipes it drives."""

    def run(self) -> str:
        """Copy the tables at the slot's starting point, so the subscription takes over from
        exactly there. The snapshot lives only as long as this process: a copy cut short is
        started again from scratch (a new slot, emptied tables)."""
        plan = self.plan
        started = time.monotonic()
        with self.session.target.cursor() as cursor:
            drop_subscription(self.session.target, plan.slot)
            tables = tables_of(cursor, plan.schema)
            with self.session.source.cursor() as source_cursor:
                builds = _deferrable_indexes(source_cursor, plan.schema)
            if builds:
                for statement in _drop_statements(cursor, plan.schema):
                    cursor.execute(statement)
        # Each type's binary form is the same within a major version; across one (a move onto an
        # upgraded cluster), the text form is the one COPY promises to read back.
        binary = self.session.source.server_version // 10000 == self.session.target.server_version // 10000
        drop_publication_and_slot(self.session.source, plan.slot, keep_publication=True)
        replication = replication_connection(self.fleet, plan.source, self.database, plan.slot)
        try:
            with replication.cursor() as cursor:
                with SlotCreationWatch(self.session, replication, plan.slot):
                    cursor.execute(f"CREATE_REPLICATION_SLOT {plan.slot} LOGICAL pgoutput (SNAPSHOT 'export')")
                created = cursor.fetchone()
                assert created is not None  # CREATE_REPLICATION_SLOT answers with one row, or raises
                _, consistent_point, snapshot, _ = created
                rows, size = self._copy_tables(tables, snapshot, binary)
        finally:
            replication.close()
        copy_seconds = time.monotonic() - started
        if builds:
            self._build_indexes(builds)
        self.session.result_fields["copied"] = {
            "source_lsn": consistent_point,
            "rows_copied": rows,
            "bytes_copied": size,
        }
        return f"{rows:,} rows, {human_bytes(size)} in {copy_seconds:.1f} s" + (
            f"; {len(builds)} {'key or index' if len(builds) == 1 else 'keys and indexes'} in "
            f"{time.monotonic() - started - copy_seconds:.1f} s"
            if builds
            else ""
        )

    def _copy_tables(self, tables: list[str], snapshot: str, binary: bool) -> tuple[int, int]:
        """COPY each table out of the source under `snapshot` and into the target, through
        a pipe in this process, COPY_PARALLEL tables at a time, largest first. Returns the rows
        (as the source's COPY counted them) and the bytes."""
        plan = self.plan
        estimates = {table.name: table.rows for table in plan.tables}
        order = sorted(tables, key=lambda name: -estimates.get(name, 0))
        counter = _CopyCounter(self.reporter, plan.schema, sum(estimates.values()))
        with self.reporter.progress(f"copy {plan.schema}", sum(estimates.values()) or None, "rows") as advance:
            counter.advance = advance
            with ThreadPoolExecutor(max_workers=COPY_PARALLEL) as pool:
                copies = [pool.submit(self._copy_table, table, snapshot, counter, binary) for table in order]
                rows = sum(future.result() for future in copies)
        return rows, counter.bytes

    def _copy_table(self, table: str, snapshot: str, counter: _CopyCounter, binary: bool) -> int:
        """One table's COPY out of the source into the target; returns its rows. The target's
        transaction commits only when the source's COPY finished whole."""
        from psycopg2 import sql

        plan = self.plan
        name = sql.Identifier(plan.schema, table)
        read_options = sql.SQL(" (FORMAT binary)" if binary else "")
        write_options = sql.SQL(" (FORMAT binary, FREEZE)" if binary else " (FREEZE)")
        reader = connect(self.fleet, plan.source, self.database, purpose="move")
        writer = connect(self.fleet, plan.target, self.database, purpose="move")
        read_end, write_end = os.pipe()
        sink = _CountingPipe(write_end, counter)

        def load() -> None:
            # Closing the read end on any failure makes the source side's next write fail
            # instead of blocking on a full pipe.
            with os.fdopen(read_end, "rb") as source, writer.cursor() as cursor:
                # Emptied in the COPY's own transaction, the table takes its rows frozen and its
                # pages marked all-visible: the index builds and the verification that read them
                # next need not set each row's hint bits (and write every page again) first.
                # Nothing else reads the target's copy before the cut-over.
                cursor.execute(sql.SQL("TRUNCATE {}").format(name))
                cursor.copy_expert(
                    sql.SQL("COPY {} FROM STDIN{}").format(name, write_options).as_string(cursor),
                    source,
                    size=PIPE_BLOCK,
                )

        try:
            reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with reader.cursor() as cursor, ThreadPoolExecutor(max_workers=1) as pump:
                cursor.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
                loading = pump.submit(load)
                try:
                    cursor.copy_expert(
                        sql.SQL("COPY {} TO STDOUT{}").format(name, read_options).as_string(cursor), sink
                    )
                    rows: int = cursor.rowcount
                    sink.close()
                except BaseException:
                    sink.abandon()
                    failure = loading.exception()
                    if failure is not None:  # the target's failure is the cause
                        raise failure from None
                    raise
                loading.result()
            writer.commit()
            return rows
        finally:
            sink.abandon()
            reader.close()
            writer.close()

    def _build_indexes(self, builds: list[tuple[str, str]]) -> None:
        """Keys first, then the other indexes, one connection per table, tables in parallel."""
        by_table: dict[str, list[str]] = {}
        for table, statement in builds:
            by_table.setdefault(table, []).append(statement)

        def build(statements: list[str]) -> None:
            connection = connect(
                self.fleet,
                self.plan.target,
                self.database,
                autocommit=True,
                purpose="move",
                settings={"maintenance_work_mem": "64MB"},
            )
            try:
                with connection.cursor() as cursor:
                    for statement in statements:
                        cursor.execute(statement)
            finally:
                connection.close()

        with ThreadPoolExecutor(max_workers=COPY_PARALLEL) as pool:
            for future in [pool.submit(build, statements) for statements in by_table.values()]:
                future.result()


class _CopyCounter:
    """Rows and bytes through every table's pipe, for the progress bar and a line every 5 s."""

    def __init__(self, reporter: Reporter, schema: str, expected_rows: int):
        self.reporter = reporter
        self.schema = schema
        self.expected_rows = expected_rows
        self.rows = 0
        self.bytes = 0
        self.advance: Callable[[float], None] = lambda amount: None
        self.lock = threading.Lock()
        self.logged = time.monotonic()

    def add(self, data: bytes | bytearray, rows: int) -> None:
        with self.lock:
            self.rows += rows
            self.bytes += len(data)
            log = time.monotonic() - self.logged > 5
            if log:
                self.logged = time.monotonic()
        self.advance(rows)
        if log:
            self.reporter.log(
                f"copying {self.schema}: {self.rows:,} of ~{self.expected_rows:,} rows, {human_bytes(self.bytes)}"
            )


class _CountingPipe:
    """The write end of a pipe as the file psycopg2's COPY TO writes into. psycopg2 writes
    each CopyData message the server sends, and the server sends one per row (the protocol
    says so; a binary COPY's header comes with the first row, its trailer alone), so rows are
    gathered into blocks: the pipe, the counter and the progress bar see a block at a time,
    not a million rows one by one."""

    def __init__(self, fd: int, counter: _CopyCounter):
        self.fd: int | None = fd  # None once the stream is ended
        self.counter = counter
        self.block = bytearray()
        self.rows = 0  # in the block

    def write(self, data: bytes) -> int:
        self.block += data
        self.rows += 1
        if len(self.block) >= PIPE_BLOCK:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        fd = self.fd
        view = memoryview(self.block)
        while view:
            if fd is None:
                raise ValueError("write to an ended pipe")
            view = view[os.write(fd, view) :]
        view.release()
        self.counter.add(self.block, self.rows)
        self.block.clear()
        self.rows = 0

    def close(self) -> None:
        """Send what is gathered, then end the stream."""
        if self.fd is not None:
            self._flush()
            self.abandon()

    def abandon(self) -> None:
        """End the stream without sending the rest: the copy failed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _deferrable_indexes(cursor: Cursor, schema: str) -> list[tuple[str, str]]:
    """(table, statement) that build the schema's keys and indexes as the source has them:
    primary keys, then unique and exclusion constraints, then plain indexes. Empty when a
    foreign key involves the schema (its keys must then stay in place during the copy)."""
    cursor.execute(
        """
        SELECT count(*) FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
         WHERE con.contype = 'f' AND (n.nspname = %s OR con.confrelid IN (
               SELECT c.oid FROM pg_class c JOIN pg_namespace m ON m.oid = c.relnamespace WHERE m.nspname = %s))""",
        (schema, schema),
    )
    row = cursor.fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    if row[0]:
        return []
    cursor.execute(
        """
        SELECT c.relname, format('ALTER TABLE %%I.%%I ADD CONSTRAINT %%I %%s', n.nspname, c.relname, con.conname,
                                 pg_get_constraintdef(con.oid))
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND con.contype IN ('p', 'u', 'x')
         ORDER BY con.contype <> 'p', c.relname, con.conname""",
        (schema,),
    )
    builds = [(row[0], row[1]) for row in cursor.fetchall()]
    cursor.execute(
        """
        SELECT t.relname, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
          JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE n.nspname = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)
         ORDER BY t.relname, ic.relname""",
        (schema,),
    )
    return builds + [(row[0], row[1]) for row in cursor.fetchall()]


def _drop_statements(cursor: Cursor, schema: str) -> list[str]:
    """What removes every key and index of the schema's tables, so a bulk copy need not keep
    them up to date row by row."""
    cursor.execute(
        """
        SELECT format('ALTER TABLE %%I.%%I DROP CONSTRAINT %%I', n.nspname, c.relname, con.conname)
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND con.contype IN ('p', 'u', 'x')
        UNION ALL
        SELECT format('DROP INDEX %%I.%%I', n.nspname, ic.relname)
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
         WHERE n.nspname = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)""",
        (schema, schema),
    )
    return [row[0] for row in cursor.fetchall()]
