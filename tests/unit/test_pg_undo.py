"""The undo of a switchover's stop (igops.pg.primary_actions' unfence_and_start), which `igops ops
abort` may run from the journal long after its run: its host-side script runs here against a data
directory, with stand-ins for pg_ctl, pg_controldata, pg_isready and repmgr, while the other members
answer through stand-ins for their connections and SSH."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from igops import host_commands, inventory, postgres, remote
from igops.errors import IgopsError
from igops.pg import primary_actions
from igops.pg.actions import PgActions
from tests.unit.inventories import unit_inventory

HOSTS = [("db1", "10.0.0.21", "postgres"), ("db2", "10.0.0.22", "postgres"), ("db3", "10.0.0.23", "postgres")]
POSTGRES = """[postgres]
bin_dir = "{bin}"
data_directory = "{data}/{{host}}"
[postgres.clusters.main]
primary = "db1"
standbys = ["db2", "db3"]
"""

# pg_ctl status -D DATA: a postmaster.pid is a running postmaster (the test names its own process
# in it). pg_isready answers while it says ready or standby.
TOOLS = {
    "pg_ctl": '[ "$1" = status ] && [ -e "$3/postmaster.pid" ]',
    "pg_controldata": 'cat "$2/control"',
    "pg_isready": 'case "$(sed -n 8p {data}/postmaster.pid 2>/dev/null)" in ready*|standby*) exit 0;; esac; exit 2',
    "repmgr": "touch {data}/started",
}


class Members:
    """What the other members answer: whether each is in recovery (None: no answer), and who
    was asked."""

    def __init__(self, monkeypatch, answers: dict[str, bool | None]):
        self.answers = answers
        self.asked: list[str] = []
        monkeypatch.setattr(primary_actions, "in_recovery_now", self.in_recovery)
        monkeypatch.setattr(primary_actions, "ssh", self.ssh)
        monkeypatch.setattr(host_commands, "ssh", self.ssh)
        monkeypatch.setattr(postgres, "connect", lambda fleet, host, *args: Writable())

    def in_recovery(self, fleet, host) -> bool | None:
        self.asked.append(host.name)
        return self.answers[host.name]

    def ssh(self, fleet, host, argv, timeout=60, stdin=None) -> remote.HostResult:
        if argv[0] == "test":  # a promote file waiting: none
            return remote.HostResult(host.name, "", False, 1, "", "", 1.0)
        assert host.name == "db1", argv  # no other member is stopped or changed here
        run = subprocess.run(argv[argv.index("sh") :], capture_output=True, text=True, timeout=timeout, check=False)
        return remote.HostResult(host.name, "", run.returncode == 0, run.returncode, run.stdout, run.stderr, 1.0)


class Writable:
    """A connection to a started primary: out of recovery, it takes a write."""

    def cursor(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, query):
        self.query = query

    def fetchone(self):
        return (False,)

    def close(self):
        pass


@pytest.fixture
def old_primary(tmp_path):
    """db1's data directory as the switchover's stop left it: shut down cleanly, fenced."""
    bin_dir, data = tmp_path / "bin", tmp_path / "data" / "db1"
    bin_dir.mkdir()
    data.mkdir(parents=True)
    for name, body in TOOLS.items():
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\n" + body.replace("{data}", str(data)) + "\n")
        tool.chmod(0o755)
    (data / "control").write_text("Database cluster state:               shut down\n")
    (data / "standby.signal").touch()
    path = unit_inventory(tmp_path, HOSTS, sections=POSTGRES.format(bin=bin_dir, data=tmp_path / "data"))
    return inventory.load_file(path), data


def running(data: Path, status: str) -> None:
    """A postmaster on `data`, its postmaster.pid's status line `status`."""
    lines = [str(os.getpid()), str(data), "0", "5432", "/tmp", "*", "0 0", status]
    (data / "postmaster.pid").write_text("\n".join(lines) + "\n")


def test_a_member_the_undo_was_not_told_of_that_accepts_writes_keeps_the_old_primary_fenced(old_primary, monkeypatch):
    # The journal names only the run's candidate, db2; db3 was promoted since (a failover to it).
    fleet, data = old_primary
    members = Members(monkeypatch, {"db2": True, "db3": False})
    with pytest.raises(IgopsError, match="db3 accepts writes") as refused:
        PgActions(fleet).unfence_and_start("db1", ("db2",))
    assert "igops pg rejoin" in (refused.value.hint or "")
    assert members.asked == ["db2", "db3"]
    assert (data / "standby.signal").exists() and not (data / "started").exists()


@pytest.mark.parametrize(
    "status, control, found",
    [
        # Rejoined since: a hot standby's postmaster.pid says "ready" as a primary's does (Postgres
        # 15; "standby" with hot_standby off), its control file tells them apart.
        (
            "ready   ",
            "in archive recovery",
            "its postmaster running (ready, its control file saying in archive recovery)",
        ),
        ("standby ", "in archive recovery", "its postmaster running (standby)"),
        ("starting", "in archive recovery", "its postmaster running (starting)"),
        (None, "shut down in recovery", "its control file saying shut down in recovery"),  # rejoined, stopped
    ],
)
def test_an_old_primary_no_longer_as_its_stop_left_it_is_left_alone(old_primary, monkeypatch, status, control, found):
    fleet, data = old_primary
    if status:
        running(data, status)
    (data / "control").write_text(f"Database cluster state:               {control}\n")
    Members(monkeypatch, {"db2": True, "db3": True})
    with pytest.raises(IgopsError, match=re.escape(f"db1 was not started again: found {found},")) as refused:
        PgActions(fleet).unfence_and_start("db1", ("db2",))
    assert "igops pg status main" in (refused.value.hint or "")
    assert (data / "standby.signal").exists() and not (data / "started").exists()


def test_the_old_primary_left_stopped_and_fenced_is_unfenced_and_started(old_primary, monkeypatch):
    fleet, data = old_primary
    members = Members(monkeypatch, {"db2": True, "db3": True})
    detail = PgActions(fleet).unfence_and_start("db1", ("db2",))
    assert members.asked == ["db2", "db3"]
    assert not (data / "standby.signal").exists() and (data / "started").exists()
    assert detail == (
        "db2 is a standby nobody asked to promote; db3 is a standby nobody asked to promote; "
        "db1 unfenced, started; db1 accepts writes"
    )


@pytest.mark.parametrize("fenced", [False, True])
def test_an_old_primary_running_as_a_primary_is_taken_as_started_and_unfenced(old_primary, monkeypatch, fenced):
    # Started by an earlier try of the undo, or fenced by a stop cut off before its signal.
    fleet, data = old_primary
    if not fenced:
        (data / "standby.signal").unlink()
    running(data, "ready   ")
    (data / "control").write_text("Database cluster state:               in production\n")
    Members(monkeypatch, {"db2": True, "db3": True})
    detail = PgActions(fleet).unfence_and_start("db1", ("db2", "db3"))
    assert not (data / "started").exists() and not (data / "standby.signal").exists()
    assert detail.endswith("db1 was running as the primary already; db1 accepts writes")
