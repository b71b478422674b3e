"""Timelines against real PostgreSQL 15 servers (igops.pg.timelines): the timeline a standby
reports once its upstream died, a timeline's history as a standby holds it, and which members can
follow a new primary. db1, the primary of timeline 1, is stopped and copied: db2 is promoted to
timeline 2, db3 streams from db2 onto it, db4 stays where timeline 2 forked. db1 is then started
again to write past the fork, and fenced (standby.signal): the former primary of an earlier
failover, running read-only. PostgreSQL itself then says who can follow db2: db4, not db1."""

import time
from pathlib import Path

import psycopg2
import pytest

from igops import inventory, postgres
from igops.pg import cluster as pg_cluster, timelines
from tests.unit import postgres_servers as servers
from tests.unit.inventories import unit_inventory

ADDRESSES = {"db1": "127.78.0.1", "db2": "127.78.0.2", "db3": "127.78.0.3", "db4": "127.78.0.4"}
HOSTS = [(name, address, "postgres") for name, address in ADDRESSES.items()]
POSTGRES = """[postgres]
port = {port}
[postgres.clusters.main]
primary = "db1"
standbys = ["db2", "db3", "db4"]
"""
FORKED_BEFORE_RECOVERY_POINT = "forked off current database system timeline 1 before current recovery point"


@pytest.fixture(scope="module")
def template():
    data = servers.template()
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write("host all all 127.0.0.0/8 trust\nhost replication all 127.0.0.0/8 trust\n")
    with open(data / "postgresql.conf", "a") as conf:
        # A standby refused a timeline tries its upstream again this often (5 s by default).
        conf.write("wal_retrieve_retry_interval = '200ms'\n")
    yield data
    servers.remove(data.parent, [])


class Members:
    def __init__(self, base: Path, template: Path, port: int, fleet):
        self.base, self.template, self.port, self.fleet = base, template, port, fleet
        self.data: dict[str, Path] = {}

    def make(self, name: str, source: Path) -> Path:
        self.data[name] = servers.copy_cluster(
            source,
            self.base / name,
            {"listen_addresses": ADDRESSES[name], "port": str(self.port), "unix_socket_directories": ""},
        )
        return self.data[name]

    def start(self, name: str, standby: bool = True) -> None:
        if standby:
            servers.run(["touch", str(self.data[name] / "standby.signal")])
        servers.start(self.data[name])

    def sql(self, name: str, query: str):
        connection = psycopg2.connect(
            host=ADDRESSES[name], port=self.port, user="postgres", dbname="postgres", connect_timeout=5
        )
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(query)
                return cursor.fetchall() if cursor.description else None
        finally:
            connection.close()

    def follow(self, name: str, upstream: str) -> None:
        conninfo = f"host={ADDRESSES[upstream]} port={self.port} user=postgres"
        self.sql(name, f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'")
        self.sql(name, "SELECT pg_reload_conf()")

    def receiving(self, name: str) -> list:
        return self.sql(name, "SELECT status, received_tli FROM pg_stat_wal_receiver")

    def server(self, name: str) -> postgres.ServerState:
        connection = postgres.connect(self.fleet, self.fleet.host(name))
        try:
            return postgres.server_state(connection)
        finally:
            connection.close()

    def probe(self, name: str) -> postgres.ServerState:
        """The member as `igops pg status` and the plans see it."""
        probe = pg_cluster._probe_member(self.fleet, name)
        assert probe.server is not None, probe.down
        return probe.server


def wait_for(what, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


@pytest.fixture
def members(tmp_path, template, monkeypatch):
    """db1 stopped after some writes on timeline 1; db2, a copy, promoted to timeline 2 and
    written to; db3, a copy, streaming from db2 on timeline 2."""
    base = servers.private_directory("igops-timelines-")
    port = servers.free_port(ADDRESSES.values())
    monkeypatch.delenv("IGOPS_POSTGRES_PASSWORD", raising=False)
    fleet = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=POSTGRES.format(port=port)))
    made = Members(base, template, port, fleet)
    try:
        made.make("db1", template)
        made.start("db1", standby=False)
        made.sql("db1", "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        servers.stop(made.data["db1"])
        for name in ("db2", "db3", "db4"):
            made.make(name, made.data["db1"])
        made.start("db2")
        assert made.sql("db2", "SELECT pg_promote(true, 30)") == [(True,)]
        made.sql("db2", "INSERT INTO t SELECT generate_series(1, 1000)")
        made.start("db3")
        made.follow("db3", "db2")
        wait_for(lambda: made.receiving("db3") == [("streaming", 2)])
        yield made
    finally:
        servers.remove(base, list(made.data.values()))


@servers.needs_postgres
def test_who_can_follow_a_new_timeline_is_told_from_its_history_as_postgres_tells_it(members):
    # db1, the former primary, writes past the fork, then runs fenced and read-only.
    members.start("db1", standby=False)
    members.sql("db1", "INSERT INTO t SELECT generate_series(1, 100)")
    servers.stop(members.data["db1"])
    members.start("db1")
    members.start("db4")
    history = timelines.timeline_history(members.fleet, members.fleet.host("db3"), 2)
    assert history is not None and list(history) == [1]  # db3, a standby, holds timeline 2's history
    assert timelines.timeline_history(members.fleet, members.fleet.host("db4"), 2) is None  # db4 lacks it
    assert timelines.timeline_history(members.fleet, members.fleet.host("db4"), 1) == {}
    fork = history[1]
    positions = {}
    for name in ("db1", "db4"):
        server = members.probe(name)
        positions[name] = (server.timeline, pg_cluster.wal_received(server))
    assert positions["db1"][0] == 1 and positions["db1"][1] > fork
    assert positions["db4"] == (1, fork)  # where timeline 2 forked, exactly
    assert timelines.cannot_follow(members.fleet, "db3", 2, None, positions) == {
        "db1": f"its WAL on timeline 1 goes to {postgres.format_lsn(positions['db1'][1])}, past "
        f"{postgres.format_lsn(fork)}, where db3's timeline 2 forked from it"
    }
    # PostgreSQL agrees: db4 follows db2 onto timeline 2, db1 is refused it.
    members.follow("db4", "db2")
    members.follow("db1", "db2")
    wait_for(lambda: members.receiving("db4") == [("streaming", 2)])
    log = Path(f"{members.data['db1']}.log")
    wait_for(lambda: FORKED_BEFORE_RECOVERY_POINT in log.read_text())
    # db1 took timeline 2's history from db2 when it was refused: its timeline is still 1.
    assert (members.data["db1"] / "pg_wal" / "00000002.history").exists()
    assert members.probe("db1").timeline == 1


@servers.needs_postgres
def test_a_standby_whose_upstream_died_is_on_the_timeline_it_streamed_onto(members):
    """Its WAL receiver gone, a standby reports its last restartpoint's timeline: the one before
    the switch, here. What it holds in pg_wal where its WAL ends says the timeline it is on."""
    servers.stop(members.data["db2"])
    wait_for(lambda: members.receiving("db3") == [])
    assert members.server("db3").timeline == 1
    assert members.probe("db3").timeline == 2
