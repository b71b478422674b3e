"""Where logical shards live in Postgres and the DDL that creates them."""

from __future__ import annotations

from pathlib import Path

from app.ids import MAX_SHARD

SQL_DIR = Path(__file__).resolve().parent / "sql"
SCHEMA_PREFIX = "insta"


def schema_for(logical_shard: int) -> str:
    if not 0 <= logical_shard <= MAX_SHARD:
        raise ValueError(f"logical shard {logical_shard} is outside 0..{MAX_SHARD}")
    return f"{SCHEMA_PREFIX}{logical_shard}"


def directory_ddl() -> str:
    return (SQL_DIR / "directory.sql").read_text()


def shard_ddl(logical_shard: int) -> str:
    template = (SQL_DIR / "shard.sql").read_text()
    return template.format(schema=schema_for(logical_shard), shard_id=logical_shard)
