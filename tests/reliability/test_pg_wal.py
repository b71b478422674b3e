"""The WAL of an idle cluster does not grow with the number of promotions: each promotion copies
its segment onto the new timeline, and those copies must not pile up on any member (38 promotions
once filled the lab's 448 MB WAL volumes)."""

import re
import shutil
import subprocess

import pytest

from igops import postgres
from igops.lab import state
from tests.reliability.test_failover import HOME_PRIMARY, OTHER_PRIMARY, igops, pg_state, restore_home

pytestmark = pytest.mark.lab

SWITCHOVERS = 6
SEGMENT = re.compile(r"^[0-9A-F]{24}$")
BIN = "/usr/lib/postgresql/15/bin"


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
    print(
        "\nWAL segments after each switchover: "
        + "; ".join(", ".join(f"{node} {len(names)}" for node, names in counts.items()) for counts in seen)
    )
    for node in nodes:
        after_first_round = len(seen[1][node])
        for counts in seen[2:]:
            assert len(counts[node]) <= after_first_round, (node, [len(c[node]) for c in seen], counts[node])
        # No segment number kept on more than one timeline: the promotions' copies are gone.
        numbers = [name[8:] for name in seen[-1][node]]
        assert len(numbers) == len(set(numbers)), (node, seen[-1][node])


def test_the_end_of_wal_is_found_past_segments_the_server_pre_allocated(lab, tmp_path):
    """A clean shutdown pre-allocates the next segments, all zeros until written. pg_waldump left
    to pick a file itself may read the segment size from one of them and give up, and a
    switchover then cannot tell where the old primary's WAL ends."""
    # A copy of a member's control file and of its WAL from the last checkpoint on: the server
    # writes on, and the copy holds still.
    node = HOME_PRIMARY
    (tmp_path / "global").mkdir()
    shutil.copy(state.paths().pgdata(node) / "global" / "pg_control", tmp_path / "global")
    control = postgres.parse_controldata(
        subprocess.run(
            [f"{BIN}/pg_controldata", "-D", str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout
    )
    size = int(control["Bytes per WAL segment"])
    timeline, at = int(control["Latest checkpoint's TimeLineID"]), control["Latest checkpoint location"]
    (tmp_path / "pg_wal").mkdir()
    copied = [
        name
        for name in segments(node)
        if postgres.segment_start(name, size)[0] == timeline
        and postgres.segment_start(name, size)[1] + size > postgres.parse_lsn(at)
    ]
    for name in copied:
        shutil.copy(state.paths().pg_wal(node) / name, tmp_path / "pg_wal")
    # Read the old way first, while only written segments are there: the end to find.
    expected = postgres.wal_end_from_waldump(
        subprocess.run(
            [f"{BIN}/pg_waldump", "-q", "-p", str(tmp_path / "pg_wal"), "-t", str(timeline), "-s", at],
            capture_output=True,
            text=True,
        ).stderr,
        size,
    )
    assert expected is not None and expected > postgres.parse_lsn(at)
    last = postgres.segment_start(copied[-1], size)[1]
    for start in range(last + size, last + 7 * size, size):
        name = f"{timeline:08X}{start >> 32:08X}{(start & 0xFFFFFFFF) // size:08X}"
        (tmp_path / "pg_wal" / name).write_bytes(bytes(size))
    script = f'bin={BIN}; data="$1"; tli={timeline}; at={at}; ' + postgres.WALDUMP_TO_END
    printed = subprocess.run(["sh", "-c", script, "sh", str(tmp_path)], capture_output=True, text=True).stdout
    assert "header specifies 0 bytes" not in printed
    assert postgres.wal_end_from_waldump(printed, size) == expected, printed
