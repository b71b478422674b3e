import re
import string

import pytest

from app.schema import SQL_DIR, directory_ddl, schema_for, shard_ddl


def test_shard_template_has_only_the_two_placeholders():
    template = (SQL_DIR / "shard.sql").read_text()
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    assert fields == {"schema", "shard_id"}


def test_rendered_shard_ddl_names_its_schema_and_shard():
    ddl = shard_ddl(5)
    assert "{" not in ddl and "}" not in ddl
    assert "CREATE SCHEMA IF NOT EXISTS insta5;" in ddl
    assert "shard_id bigint := 5;" in ddl
    assert "nextval('insta5.table_id_seq') % 1024" in ddl
    assert "%%" not in ddl
    assert "our_epoch bigint := 1314220021721;" in ddl


def test_every_shard_table_has_a_primary_key_for_logical_replication():
    ddl = shard_ddl(0)
    tables = re.findall(r"CREATE TABLE IF NOT EXISTS insta0\.(\w+) \((.*?)\n\);", ddl, re.S)
    assert {name for name, _ in tables} == {"users", "photos", "likes", "following", "followers"}
    for name, body in tables:
        assert "PRIMARY KEY" in body, name


def test_generated_ids_default_to_next_id():
    ddl = shard_ddl(3)
    assert ddl.count("DEFAULT insta3.next_id()") == 2


def test_ddl_is_idempotent_statements_only():
    for ddl in (directory_ddl(), shard_ddl(1)):
        for statement in re.findall(r"^CREATE [A-Z ]+", ddl, re.M):
            assert "IF NOT EXISTS" in statement or "OR REPLACE" in statement, statement


def test_directory_has_the_contract_tables():
    ddl = directory_ddl()
    for table in ("clusters", "shard_map", "shard_map_version", "endpoints", "usernames"):
        assert f"CREATE TABLE IF NOT EXISTS {table} (" in ddl


@pytest.mark.parametrize("shard", [-1, 8192])
def test_schema_for_rejects_shards_outside_13_bits(shard):
    with pytest.raises(ValueError):
        schema_for(shard)
