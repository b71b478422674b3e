"""The host-side scripts that keep an old primary from coming back writable, run here as on a
member (as the postgres user, through the SSH command igops sends, with the real pg_ctl,
pg_controldata and repmgr) against real data directories:

- a failover's fence (igops.pg.primary_actions' fence): standby.signal first, then an immediate stop
  of a postmaster that runs, whether the plan found it running or down. A crashed primary that its
  service manager restarted between the plan and the fence is a real server here, and so is the
  start after the fence, which must come up read-only. Where the order matters (the fence written
  before the stop's signal), a process of the test's stands in as the postmaster and says what it
  found when it was signalled;
- a rejoin's recovery of a member whose control file says "in archive recovery"
  (igops.pg.standby_actions' ensure_clean_shutdown) after a promotion that died having removed
  standby.signal: it must recover as a standby, not as a primary on the old timeline."""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from igops import host_commands, inventory, remote
from igops.errors import IgopsError
from igops.pg.actions import PgActions
from tests.unit import postgres_servers as servers
from tests.unit.inventories import unit_inventory

pytestmark = servers.needs_postgres

HOSTS = [("db1", "10.0.0.21", "postgres"), ("db2", "10.0.0.22", "postgres")]
POSTGRES = """[postgres]
bin_dir = "{bin}"
data_directory = "{base}/{{host}}"
repmgr_config = "{base}/{{host}}.repmgr.conf"
[postgres.clusters.main]
primary = "db1"
standbys = ["db2"]
"""


@pytest.fixture(scope="module")
def template():
    data = servers.template()
    yield data
    shutil.rmtree(data.parent, ignore_errors=True)


class Member:
    """db1: its data directory (a copy of the template, its socket in `base`) and the fleet whose
    SSH to db1 runs the command here."""

    def __init__(self, base: Path, fleet: inventory.Fleet):
        self.base = base
        self.data = base / "db1"
        self.fleet = fleet

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def status(self) -> str:
        return (self.data / "postmaster.pid").read_text().splitlines()[7].strip()

    def in_recovery(self) -> bool:
        import psycopg2

        connection = psycopg2.connect(host=str(self.base), user="postgres", dbname="postgres", connect_timeout=5)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                return bool(cursor.fetchone()[0])
        finally:
            connection.close()

    def crash(self) -> None:
        """SIGKILL to the postmaster, as a crash would; then wait until its children have exited
        (they do when they see it die) and init has reaped it (a new postmaster takes a pid that
        still exists, even a zombie's, for a live one), leaving its postmaster.pid behind."""
        pid = self.pid()
        children = [stat.parent.name for stat in Path("/proc").glob("[0-9]*/stat") if _parent(stat) == pid]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(child) for child in children) or Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the killed postmaster was not reaped, or its children did not exit"
            time.sleep(0.05)
        assert (self.data / "postmaster.pid").exists()


def _parent(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def member(tmp_path, template, monkeypatch):
    base = servers.private_directory("igops-fence-")
    servers.copy_cluster(template, base / "db1", {"listen_addresses": "", "unix_socket_directories": str(base)})
    path = unit_inventory(tmp_path, HOSTS, sections=POSTGRES.format(bin=servers.BIN, base=base))
    fleet = inventory.load_file(path)

    def ssh(fleet, host, argv, timeout=60, stdin=None) -> remote.HostResult:
        # The command as sshd would run it on db1: as root, runuser makes it the postgres user's.
        assert host.name == "db1", argv
        command = argv if servers.AS_ROOT else argv[argv.index("sh") :]
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        return remote.HostResult(host.name, "", run.returncode == 0, run.returncode, run.stdout, run.stderr, 1.0)

    monkeypatch.setattr(host_commands, "ssh", ssh)
    yield Member(base, fleet)
    servers.remove(base, [base / "db1"])


# A process standing in as the postmaster: it writes its postmaster.pid (status line from its
# argument), and on pg_ctl's stop signal writes what it was sent and whether standby.signal was
# there, then exits as a postmaster does (its postmaster.pid removed, unless told to leave it).
STAND_IN = r"""
import os, signal, sys, time
data, status, leave = sys.argv[1], sys.argv[2], sys.argv[3] == "leave"

def stopped(signum, frame):
    fenced = os.path.exists(os.path.join(data, "standby.signal"))
    with open(os.path.join(data, "stopped-by"), "w") as out:
        out.write(f"{signal.Signals(signum).name} fenced={fenced}")
    if not leave:
        os.unlink(os.path.join(data, "postmaster.pid"))
    os._exit(0)

for number in (signal.SIGQUIT, signal.SIGINT, signal.SIGTERM):
    signal.signal(number, stopped)
lines = [str(os.getpid()), data, str(int(time.time())), "5432", "", "", "0 0", status]
with open(os.path.join(data, "postmaster.pid"), "w") as out:
    out.write("\n".join(lines) + "\n")
print("up", flush=True)
time.sleep(120)
"""


# The system's: one the postgres user can run (a root-only pyenv's shim is not).
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else shutil.which("python3") or "python3"


@pytest.fixture
def stand_in(member):
    processes = []

    def started(status: str, leave_pid_file: bool = False) -> subprocess.Popen:
        process = subprocess.Popen(
            [PYTHON, "-c", STAND_IN, str(member.data), status] + ["leave" if leave_pid_file else "remove"],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            user="postgres" if servers.AS_ROOT else None,  # pg_ctl, as postgres, must be able to signal it
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "up"
        # Reaped as soon as it exits, as init reaps a daemonized postmaster.
        threading.Thread(target=process.wait, daemon=True).start()
        return process

    yield started
    for process in processes:
        process.kill()


# --- the failover's fence ------------------------------------------------------------------------
def test_an_old_primary_that_came_back_since_the_plan_is_fenced_then_stopped(member, stand_in):
    """The plan found it down (stop_first False); it runs now, as a primary ("ready"): the fence
    is on disk before the stop's signal reaches it, and it is stopped before the step ends."""
    process = stand_in("ready   ")
    detail = PgActions(member.fleet).fence("db1", False)
    assert (member.data / "stopped-by").read_text() == "SIGQUIT fenced=True"  # pg_ctl stop -m immediate
    assert process.wait(timeout=10) == 0
    assert (member.data / "standby.signal").exists() and not (member.data / "postmaster.pid").exists()
    assert detail == (
        f"{member.data}/standby.signal written; FOUND ITS POSTMASTER RUNNING (postmaster.pid: ready), which "
        "the plan found down: it came back since; stopped it (immediate); its control file says shut down"
    )


@pytest.mark.parametrize("status", ["starting", "stopping", "ready   "])
def test_a_postmaster_the_plan_found_running_is_fenced_before_it_is_stopped(member, stand_in, status):
    """With stop_first (hung, starting or stopping at the plan) the order is the same: a start
    between the stop and the fence would have come up writable."""
    stand_in(status)
    detail = PgActions(member.fleet).fence("db1", True)
    assert (member.data / "stopped-by").read_text() == "SIGQUIT fenced=True"
    assert f"its postmaster ran (postmaster.pid: {status.strip()}): stopped it (immediate)" in detail


def test_a_postmaster_that_exits_as_it_is_stopped_counts_as_stopped(member, stand_in):
    """One that exits at the signal but leaves its postmaster.pid (pg_ctl then says it did not shut
    down): no postmaster runs, which is what the fence needs."""
    stand_in("ready   ", leave_pid_file=True)
    detail = PgActions(member.fleet).fence("db1", True)
    assert "its postmaster ran (postmaster.pid: ready): it exited meanwhile" in detail
    assert (member.data / "standby.signal").exists()


def test_a_crashed_primary_is_fenced_and_any_start_after_it_is_read_only(member):
    servers.start(member.data)
    assert not member.in_recovery()
    member.crash()  # its postmaster.pid stays, naming a process that is gone
    detail = PgActions(member.fleet).fence("db1", False)
    assert detail == (
        f"{member.data}/standby.signal written; no postmaster running; its control file says in production"
    )
    servers.start(member.data)  # its service manager restarts it
    assert member.in_recovery()


def test_a_crashed_primary_restarted_before_the_fence_is_stopped_and_comes_back_read_only(member):
    """A crash, then its service manager's restart (RestartSec=5) between the plan, which saw it
    down, and the fence: it runs as a primary again when the fence comes."""
    servers.start(member.data)
    member.crash()
    servers.start(member.data)
    assert not member.in_recovery() and member.status() == "ready"
    detail = PgActions(member.fleet).fence("db1", False)
    assert "FOUND ITS POSTMASTER RUNNING (postmaster.pid: ready), which the plan found down" in detail
    assert detail.endswith("stopped it (immediate); its control file says in production")
    assert not (member.data / "postmaster.pid").exists()
    servers.start(member.data)
    # Read-only from now on; a hot standby's postmaster.pid says "ready" too.
    assert member.in_recovery() and member.status() == "ready"


def test_a_fence_that_cannot_be_written_fails_and_stops_nothing(member, stand_in):
    process = stand_in("ready   ")
    member.data.chmod(0o500)  # no new file there, not even for its owner
    try:
        with pytest.raises(IgopsError, match=r"fencing .* failed: touch: cannot touch"):
            PgActions(member.fleet).fence("db1", False)
    finally:
        member.data.chmod(0o700)
    assert process.poll() is None and not (member.data / "stopped-by").exists()
    assert not (member.data / "standby.signal").exists()


# --- a rejoin's recovery of a member in archive recovery ----------------------------------------
REPMGR_CONF = """node_id = 1
node_name = 'db1'
conninfo = 'host={base} user=postgres dbname=postgres connect_timeout=2'
data_directory = '{data}'
pg_bindir = '{bin}'
service_start_command = '{bin}/pg_ctl -D {data} -l {data}.log -w -t 60 start'
"""


@pytest.mark.parametrize("signal_left", [False, True])
def test_a_member_in_archive_recovery_recovers_as_a_standby(member, signal_left):
    """A standby whose promotion died after it chose a timeline: Postgres removed standby.signal
    at the promotion, and its control file still says "in archive recovery". Started without it,
    it would recover as a primary on the old timeline ("shut down" once stopped) and take writes;
    with it, it comes back a standby ("shut down in recovery"). (signal_left: a standby that merely
    crashed, its standby.signal still there.) repmgr stops it with its own default, `pg_ctl -W`,
    which does not wait: the step waits for the postmaster to be gone."""
    servers.run(["touch", str(member.data / "standby.signal")])  # the postgres user's, as on a member
    servers.start(member.data)
    assert member.in_recovery()
    servers.stop(member.data, "immediate")
    assert servers.control_state(member.data) == "in archive recovery"
    if not signal_left:
        (member.data / "standby.signal").unlink()
    conf = member.base / "db1.repmgr.conf"
    conf.write_text(REPMGR_CONF.format(base=member.base, data=member.data, bin=servers.BIN))
    conf.chmod(0o644)
    detail = PgActions(member.fleet).ensure_clean_shutdown("db1")
    assert detail == "was in archive recovery: fenced, started as a standby and stopped cleanly"
    assert not (member.data / "postmaster.pid").exists()
    assert servers.control_state(member.data) == "shut down in recovery"
    assert (member.data / "standby.signal").exists()
