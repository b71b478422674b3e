"""The rows of a shard written since a point, by primary key, for a cut-over that compares only
what changed since the verification instead of counting every row of the shard with writes held.

A temporary logical replication slot on the source decodes the move's own publication with
pgoutput (Postgres' built-in output plugin, through `pg_logical_slot_get_binary_changes`); every
insert, update and delete gives the key of a row written. The slot lives in one session of the
igops that verified: it disappears with that igops, and a move resumed after its verification
verifies again.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from igops.output import plural

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from psycopg2.extensions import connection as Connection, cursor as Cursor

UNCHANGED = object()  # a TOASTed value an update left alone: pgoutput does not send it


class ProtocolError(ValueError):
    """A pgoutput message this reader cannot take apart."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise ProtocolError(f"message ends at byte {len(self.data)}, {size} more expected at {self.at}")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def byte(self) -> bytes:
        return self.take(1)

    def int16(self) -> int:
        value: int = struct.unpack("!h", self.take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack("!i", self.take(4))[0]
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise ProtocolError(f"a name without its end at byte {self.at}")
        text = self.data[self.at : end].decode()
        self.at = end + 1
        return text

    def row(self) -> list[Any]:
        values: list[Any] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(UNCHANGED)
            elif kind in (b"t", b"b"):
                raw = self.take(self.int32())
                values.append(raw.decode() if kind == b"t" else raw)
            else:
                raise ProtocolError(f"unknown column kind {kind!r}")
        return values


def parse_message(data: bytes) -> tuple[Any, ...] | None:
    """One pgoutput (protocol 1) message: ("relation", relid, name, columns), ("insert", relid,
    rows), ("update", relid, rows), ("delete", relid, rows) or ("truncate", relids); None for
    the messages that write no row (begin, commit, origin, type)."""
    reader = _Reader(bytes(data))
    kind = reader.byte()
    if kind == b"R":
        relid = reader.int32()
        reader.string()  # the schema: one publication, one schema
        name = reader.string()
        reader.byte()  # replica identity
        columns = []
        for _ in range(reader.int16()):
            reader.byte()  # flags
            columns.append(reader.string())
            reader.take(8)  # type oid, type modifier
        return ("relation", relid, name, columns)
    if kind == b"I":
        relid = reader.int32()
        if reader.byte() != b"N":
            raise ProtocolError("an insert without its new row")
        return ("insert", relid, [reader.row()])
    if kind == b"U":
        relid = reader.int32()
        rows = []
        marker = reader.byte()
        if marker in (b"K", b"O"):  # the old key (or row): the key itself changed
            rows.append(reader.row())
            marker = reader.byte()
        if marker != b"N":
            raise ProtocolError("an update without its new row")
        rows.append(reader.row())
        return ("update", relid, rows)
    if kind == b"D":
        relid = reader.int32()
        if reader.byte() not in (b"K", b"O"):
            raise ProtocolError("a delete without its old key")
        return ("delete", relid, [reader.row()])
    if kind == b"T":
        count = reader.int32()
        reader.byte()  # options (cascade, restart identity)
        return ("truncate", [reader.int32() for _ in range(count)])
    return None


class ChangedRows:
    """The keys of the rows of `schema`'s tables written since `start()`, through `connection`
    (autocommit, to the source's primary), which holds the temporary slot."""

    def __init__(
        self, connection: Connection, slot: str, publication: str, schema: str, keys: dict[str, tuple[str, ...]]
    ):
        self.connection = connection
        self.slot = slot
        self.publication = publication
        self.schema = schema
        self.primary_keys = keys  # table -> its primary key's columns
        self.keys: dict[str, set[tuple[Any, ...]]] = {table: set() for table in keys}
        self.truncated: set[str] = set()
        self.relations: dict[int, tuple[str, list[str]]] = {}

    def start(self, watch: AbstractContextManager[object] | None = None) -> str:
        """Create the slot: every change committed after the position returned is decoded. The
        creation waits for the transactions open on the source: a move's runs under `watch`
        (igops.shard_slot_wait.SlotCreationWatch), which names them and bounds the wait."""
        with self.connection.cursor() as cursor:
            self._drop(cursor)
            with watch or nullcontext():
                cursor.execute("SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput', true)", (self.slot,))
            row = cursor.fetchone()
            assert row is not None  # the function returns one row
            position: str = row[0]
            # Column lists as pgoutput sends rows (no dropped or generated columns), for changes
            # whose relation message an earlier call of this session already sent.
            cursor.execute(
                """
                SELECT c.oid, c.relname, array_agg(a.attname ORDER BY a.attnum)
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                     AND a.attgenerated = ''
                 WHERE n.nspname = %s AND c.relkind IN ('r', 'p') GROUP BY 1, 2""",
                (self.schema,),
            )
            self.relations = {oid: (name, list(columns)) for oid, name, columns in cursor.fetchall()}
        return position

    def drain(self, upto: str | None = None) -> int:
        """Read the changes of the transactions committed so far (or before `upto`) and keep
        their keys; returns how many changes were read."""
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes(%s, %s, NULL, 'proto_version', '1', "
                "'publication_names', %s)",
                (self.slot, upto, self.publication),
            )
            messages = [parse_message(row[0]) for row in cursor.fetchall()]
        read = 0
        for message in messages:
            if message is None:
                continue
            if message[0] == "relation":
                _, relid, name, columns = message
                self.relations[relid] = (name, columns)
            elif message[0] == "truncate":
                self.truncated |= {self.relations[relid][0] for relid in message[1] if relid in self.relations}
                read += 1
            else:
                self._keep(*message[1:])
                read += 1
        return read

    def _keep(self, relid: int, rows: list[list[Any]]) -> None:
        if relid not in self.relations:
            raise ProtocolError(f"a change of relation {relid}, which {self.schema} does not have")
        table, columns = self.relations[relid]
        positions = [columns.index(column) for column in self.primary_keys.get(table, ())]
        if not positions:  # a table created since the move began: compared whole under the lock
            self.truncated.add(table)
            return
        for row in rows:
            key = tuple(row[position] for position in positions)
            if any(value is None or value is UNCHANGED for value in key):
                raise ProtocolError(f"a change of {table} without its key")
            self.keys.setdefault(table, set()).add(key)

    def compare(self, cursors: tuple[Any, Any], schemas: tuple[str, str]) -> tuple[int, list[str]]:
        """Count and hash, on both copies, the rows with a key written since `start()` (and
        every row of a table truncated since); returns the rows compared and one line per table
        that differs. Both copies must hold still: writes held, the target caught up."""
        tables = sorted(table for table, keys in self.keys.items() if keys and table not in self.truncated) + sorted(
            self.truncated
        )

        def digests(index: int) -> dict[str, tuple[int, int]]:
            return {
                table: _digest(
                    cursors[index],
                    schemas[index],
                    table,
                    self.primary_keys.get(table, ()),
                    None if table in self.truncated else self.keys[table],
                )
                for table in tables
            }

        with ThreadPoolExecutor(max_workers=2) as pool:
            left, right = pool.map(digests, (0, 1))
        differences = [
            (
                f"{table}: rows {left[table][0]} vs {right[table][0]}"
                if left[table][0] != right[table][0]
                else f"{table}: values differ"
            )
            + (
                " (the whole table: truncated or new)"
                if table in self.truncated
                else f" among the {plural(len(self.keys[table]), 'key')} written since the verification"
            )
            for table in tables
            if left[table] != right[table]
        ]
        return sum(rows for rows, _ in left.values()), differences

    def close(self) -> None:
        """Drop the slot now (it would go with the session, but not at once)."""
        if not self.connection.closed:
            with self.connection.cursor() as cursor:
                self._drop(cursor)

    def _drop(self, cursor: Cursor) -> None:
        cursor.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid = pg_backend_pid()",
            (self.slot,),
        )


def _digest(
    cursor: Cursor, schema: str, table: str, key: tuple[str, ...], keys: set[tuple[Any, ...]] | None
) -> tuple[int, int]:
    """Rows and the XOR of their 64-bit text hashes (the sessions render values alike): of the
    rows with one of `keys`, or of the whole table when `keys` is None."""
    from psycopg2 import sql

    relation = sql.Identifier(schema, table)
    query = sql.SQL("SELECT count(*), coalesce(bit_xor(hashtextextended(t::text, 0)), 0) FROM {} AS t").format(relation)
    params: tuple[Any, ...] = ()
    if keys is not None:
        columns = sql.SQL(", ").join(sql.Identifier(column) for column in key)
        query += sql.SQL(" WHERE ({}) IN (SELECT {} FROM json_populate_recordset(NULL::{}, %s::json))").format(
            sql.SQL(", ").join(sql.SQL("t.") + sql.Identifier(column) for column in key), columns, relation
        )
        params = (json.dumps([dict(zip(key, values, strict=False)) for values in sorted(keys)]),)
    cursor.execute(query, params)
    row = cursor.fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    rows: int = row[0]
    digest: int = row[1]
    return rows, digest
