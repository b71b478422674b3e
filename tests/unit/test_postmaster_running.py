"""igops.pg.hostcmd.POSTMASTER_RUNNING, the shell test every host-side script uses for "a
postmaster runs on this data directory", run with the real pg_ctl against a data directory whose
postmaster.pid names a process of the test's: alive, exited but not yet reaped, then reaped.

A restored member's data carries the postmaster.pid of the server its snapshot was taken from;
where init reaps late, that server's stopped postmaster lingers as a zombie, which pg_ctl status
takes for a running one (a rebuild run again planned a stop of a server that was not there)."""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from igops.pg.hostcmd import POSTMASTER_RUNNING

BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.skipif(not (BIN / "pg_ctl").exists(), reason="PostgreSQL 15 is not installed")


@pytest.fixture
def data_directory():
    # pg_ctl refuses to run as root: as root, the test runs it as postgres, which must reach it.
    data = Path(tempfile.mkdtemp(prefix="igops-pgdata-"))
    (data / "PG_VERSION").write_text("15\n")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    yield data
    shutil.rmtree(data)


def postmaster_running(data: Path) -> bool:
    argv = ["sh", "-c", f'bin="$1"; data="$2"; {POSTMASTER_RUNNING}', "sh", str(BIN), str(data)]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def test_a_live_process_counts_a_zombie_or_none_does_not(data_directory):
    assert not postmaster_running(data_directory)  # no postmaster.pid
    # pg_ctl's kill(pid, 0) must reach it: the postgres user's own process, as a postmaster is.
    process = subprocess.Popen(["sleep", "60"], user="postgres" if os.geteuid() == 0 else None)
    try:
        (data_directory / "postmaster.pid").write_text(f"{process.pid}\n{data_directory}\n")
        assert postmaster_running(data_directory)
        os.kill(process.pid, signal.SIGKILL)
        # Not waited for: a zombie until this process reaps it.
        stat = Path(f"/proc/{process.pid}/stat")
        while stat.read_text().split()[2] != "Z":
            pass
        assert not postmaster_running(data_directory)
    finally:
        process.kill()
        process.wait()
    assert not postmaster_running(data_directory)
