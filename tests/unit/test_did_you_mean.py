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
