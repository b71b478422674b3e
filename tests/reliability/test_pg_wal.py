"""The WAL of an idle cluster does not grow with the number of promotions: each promotion copies
its segment onto the new timeline, and those copies must not pile up on any member (38 promotions
once filled the lab's 448 MB WAL volumes)."""

import re

import pytest

from igops.lab import state
from tests.reliability.test_failover import HOME_PRIMARY, OTHER_PRIMARY, igops, pg_state, restore_home

pytestmark = pytest.mark.lab

SWITCHOVERS = 6
SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def segments(node: str) -> list[str]:
    return sorted(name.name for name in state.paths().pg_wal(node).iterdir() if SEGMENT.match(name.name))


def test_switchovers_of_an_idle_cluster_do_not_grow_the_wal(lab):
    restore_home(lab)
    nodes = (HOME_PRIMARY, OTHER_PRIMARY)
    seen = []
    for number in range(SWITCHOVERS):
        target = OTHER_PRIMARY if number % 2 == 0 else HOME_PRIMARY
        result, envelope = igops(lab, "pg", "switchover", "main", "--to", target, "--yes")
        assert result.returncode == 0, result.stderr[-3000:]
        seen.append({node: segments(node) for node in nodes})
    assert pg_state(lab)["primary"] == HOME_PRIMARY
    print("\nWAL segments after each switchover: "
          + "; ".join(", ".join(f"{node} {len(names)}" for node, names in counts.items()) for counts in seen))
    for node in nodes:
        after_first_round = len(seen[1][node])
        for counts in seen[2:]:
            assert len(counts[node]) <= after_first_round, (node, [len(c[node]) for c in seen], counts[node])
        # No segment number kept on more than one timeline: the promotions' copies are gone.
        numbers = [name[8:] for name in seen[-1][node]]
        assert len(numbers) == len(set(numbers)), (node, seen[-1][node])
