"""A shard schema's DDL and shape: the service's shard DDL, read from the inventory's file and
applied as the database's owner; a schema's tables, columns, keys, indexes, sequences and
functions as the catalog has them; and every difference between two such shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from igops.errors import IgopsError, UsageError

if TYPE_CHECKING:
    from psycopg2.extensions import cursor as Cursor

    from igops.inventory import Fleet


def shard_ddl(template: str, schema: str, shard: int) -> str:
    return template.format(schema=schema, shard_id=shard)


def read_ddl(fleet: Fleet, key: str) -> str:
    configured = getattr(fleet.model.shards, key)
    if not configured:
        raise UsageError(f"[shards] {key} is not set", "point it at the service's SQL file")
    try:
        return fleet.resolve(configured).read_text()
    except OSError as exc:
        raise UsageError(
            f"cannot read [shards] {key} {configured}: {exc.strerror or exc}", "fix the path in the inventory"
        ) from None


def act_as_owner(cursor: Cursor) -> None:
    """Create objects as the database's owner, so the service that owns the database owns
    its tables too."""
    from psycopg2 import sql

    cursor.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    row = cursor.fetchone()
    assert row is not None  # the current database is in pg_database
    cursor.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(row[0])))


@dataclass(frozen=True)
class TableShape:
    name: str
    columns: tuple[tuple[str, str, bool], ...]  # (name, type, not null) in column order
    primary_key: tuple[str, ...]
    indexes: tuple[str, ...]  # definitions with the schema name taken out


@dataclass(frozen=True)
class SchemaShape:
    tables: dict[str, TableShape]
    sequences: tuple[str, ...]
    functions: tuple[str, ...]


def describe_schema(cursor: Cursor, schema: str) -> SchemaShape | None:
    """The shape of a schema, or None when it does not exist."""
    cursor.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,))
    if cursor.fetchone() is None:
        return None
    cursor.execute(
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname, a.attnum""",
        (schema,),
    )
    columns: dict[str, list[tuple[str, str, bool]]] = {}
    for table, column, kind, not_null in cursor.fetchall():
        columns.setdefault(table, []).append((column, kind, not_null))
    cursor.execute(
        """
        SELECT c.relname, array_agg(a.attname ORDER BY k.ord)
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
         WHERE n.nspname = %s AND con.contype = 'p' GROUP BY c.relname""",
        (schema,),
    )
    keys = {table: tuple(names) for table, names in cursor.fetchall()}
    cursor.execute(
        """
        SELECT t.relname, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = %s ORDER BY 1, 2""",
        (schema,),
    )
    indexes: dict[str, list[str]] = {}
    for table, definition in cursor.fetchall():
        indexes.setdefault(table, []).append(definition.replace(f" ON {schema}.", " ON "))
    cursor.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'S' ORDER BY 1",
        (schema,),
    )
    sequences = tuple(row[0] for row in cursor.fetchall())
    cursor.execute(
        "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1",
        (schema,),
    )
    functions = tuple(row[0] for row in cursor.fetchall())
    tables = {
        table: TableShape(table, tuple(cols), keys.get(table, ()), tuple(sorted(indexes.get(table, []))))
        for table, cols in columns.items()
    }
    return SchemaShape(tables, sequences, functions)


def schema_diff(left: SchemaShape, right: SchemaShape, left_name: str, right_name: str) -> list[str]:
    """Every difference that would make the two copies of a shard disagree, one line each."""
    problems: list[str] = []
    for table in sorted(set(left.tables) | set(right.tables)):
        if table not in right.tables:
            problems.append(f"{right_name} lacks table {table}")
            continue
        if table not in left.tables:
            problems.append(f"{left_name} lacks table {table}")
            continue
        a, b = left.tables[table], right.tables[table]
        if a.columns != b.columns:
            problems.append(f"{table}: columns differ ({left_name}: {_columns(a)}; {right_name}: {_columns(b)})")
        if a.primary_key != b.primary_key:
            problems.append(
                f"{table}: primary key ({', '.join(a.primary_key) or 'none'}) on {left_name}, "
                f"({', '.join(b.primary_key) or 'none'}) on {right_name}"
            )
        for definition in sorted(set(a.indexes) - set(b.indexes)):
            problems.append(f"{right_name} lacks index on {table}: {definition}")
        for definition in sorted(set(b.indexes) - set(a.indexes)):
            problems.append(f"{left_name} lacks index on {table}: {definition}")
    for kind, a_items, b_items in (
        ("sequence", left.sequences, right.sequences),
        ("function", left.functions, right.functions),
    ):
        for item in sorted(set(a_items) - set(b_items)):
            problems.append(f"{right_name} lacks {kind} {item}")
        for item in sorted(set(b_items) - set(a_items)):
            problems.append(f"{left_name} lacks {kind} {item}")
    return problems


def _columns(shape: TableShape) -> str:
    return ", ".join(f"{name} {kind}{' not null' if not_null else ''}" for name, kind, not_null in shape.columns)


def tables_of(cursor: Cursor, schema: str) -> list[str]:
    cursor.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
        (schema,),
    )
    tables = [row[0] for row in cursor.fetchall()]
    if not tables:
        raise IgopsError(f"schema {schema} has no tables")
    return tables


def sequence_values(cursor: Cursor, schema: str, sequences: tuple[str, ...]) -> dict[str, int]:
    from psycopg2 import sql

    values: dict[str, int] = {}
    for sequence in sequences:
        cursor.execute(sql.SQL("SELECT last_value FROM {}").format(sql.Identifier(schema, sequence)))
        row = cursor.fetchone()
        assert row is not None  # a sequence has one row
        values[sequence] = row[0]
    return values
