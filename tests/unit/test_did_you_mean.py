"""Unknown hosts, roles and clusters name the close ones instead of listing the fleet."""

from pathlib import Path

import pytest

from igops import failover, inventory
from igops.errors import UsageError
from tests.conftest import ROOT, run_igops

EXAMPLE = Path(ROOT) / "config" / "example.toml"


@pytest.fixture(scope="module")
def fleet():
    return inventory.load(str(EXAMPLE))


def test_unknown_host_names_the_close_one(fleet):
    with pytest.raises(UsageError) as caught:
        fleet.host("dbl")
    assert caught.value.hint == "did you mean 'db1'?"


def test_unknown_host_without_a_close_one_points_at_the_list(fleet):
    with pytest.raises(UsageError) as caught:
        fleet.host("zzzz")
    assert "`igops hosts` lists them" in caught.value.hint and "app17" not in caught.value.hint


def test_unknown_role_names_the_close_one(fleet):
    with pytest.raises(UsageError) as caught:
        fleet.select(roles=["postgress"])
    assert caught.value.hint == "did you mean 'postgres'?"


def test_unknown_cluster_names_the_close_ones(fleet):
    with pytest.raises(UsageError) as caught:
        failover.cluster_members(fleet, "c1")
    assert caught.value.hint.startswith("did you mean 'c01'")


def test_exec_with_a_misspelt_host_through_the_cli():
    result = run_igops("-c", str(EXAMPLE), "exec", "--host", "dbl", "--dry-run", "--", "true")
    assert result.returncode == 2
    assert "unknown host 'dbl' — did you mean 'db1'?" in result.stderr
    assert "db24" not in result.stderr


def test_a_shard_out_of_range_names_the_valid_range(fleet):
    from igops import shards

    with pytest.raises(UsageError) as caught:
        shards.check_shard(fleet, 5000)
    assert caught.value.message == "shard 5000 is out of range"
    assert caught.value.hint == "shards are 0-4095 ([shards] count = 4096)"
    shards.check_shard(fleet, 4095)


def test_shard_verify_out_of_range_through_the_cli():
    """Said before any connection, so it needs no fleet."""
    result = run_igops("-c", str(EXAMPLE), "shard", "verify", "5000")
    assert result.returncode == 2
    assert "shard 5000 is out of range — shards are 0-4095" in result.stderr


def test_a_shard_move_to_a_misspelt_cluster_names_the_close_one(fleet):
    from igops import postgres_admin

    with pytest.raises(UsageError) as caught:
        postgres_admin.primary_of(fleet, "c2")
    assert caught.value.hint.startswith("did you mean 'c02'")


@pytest.mark.parametrize("plan", ["plan_redis_switchover", "plan_redis_failover", "plan_redis_rejoin"])
def test_an_unknown_redis_node_names_the_close_one(fleet, plan):
    with pytest.raises(UsageError) as caught:
        getattr(failover, plan)(fleet, "redsi2")
    assert caught.value.message == "redsi2 is not a Redis node"
    assert caught.value.hint.startswith("did you mean 'redis2'")


def test_a_pg_candidate_outside_the_cluster_names_the_close_one(fleet):
    with pytest.raises(UsageError) as caught:
        failover.plan_pg_switchover(fleet, "c01", "db3")
    assert caught.value.hint.startswith("did you mean 'db1'") or caught.value.hint.startswith("did you mean 'db2'")
