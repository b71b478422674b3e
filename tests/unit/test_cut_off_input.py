"""A run killed while it sends a file or a program to a host: the host's end of the SSH channel
sees the end of its input early. What was sent is then neither put in place nor run.

Found by the switchover drill: killed as it rewrote PgBouncer's databases file, a run left that
file empty (`cat` took the closed channel for the end of the file), and the resume found no
entries to repoint. These run the very scripts igops sends, in a local shell and python3.
"""

import shlex
import subprocess
import sys
from pathlib import Path

from igops.agent import BOOTSTRAP
from igops.host_commands import _REPLACE_FILE
from igops.pg.archive_actions import _WRITE_CONFIG
from igops.restore import _WRITE_PRIVATE_FILE

WHOLE = b"[databases]\nmain = host=10.0.0.22 port=5432 dbname=main\n"


def sh(script: str, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script, "sh", *args], input=stdin, capture_output=True, timeout=30)


def test_a_replaced_file_cut_off_in_transit_keeps_the_old_one(tmp_path: Path):
    path = tmp_path / "databases.ini"
    path.write_bytes(b"[databases]\nmain = host=10.0.0.21 port=5432 dbname=main\n")
    before = path.read_bytes()
    for cut in (0, 12, len(WHOLE) - 1):
        done = sh(_REPLACE_FILE, str(path), str(len(WHOLE)), stdin=WHOLE[:cut])
        assert done.returncode != 0
        assert b"ended early" in done.stderr
        assert path.read_bytes() == before, cut
        assert [p.name for p in tmp_path.iterdir()] == ["databases.ini"], "no temporary file is left"
    done = sh(_REPLACE_FILE, str(path), str(len(WHOLE)), stdin=WHOLE)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == WHOLE


def test_a_config_cut_off_in_transit_is_not_written(tmp_path: Path):
    path = tmp_path / "conf" / "pgbackrest.conf"
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    done = sh(_WRITE_CONFIG, str(path), user, str(len(WHOLE)), stdin=WHOLE[:5])
    assert done.returncode != 0 and b"ended early" in done.stderr
    assert not path.exists()
    done = sh(_WRITE_CONFIG, str(path), user, str(len(WHOLE)), stdin=WHOLE)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == WHOLE


def test_a_private_file_cut_off_in_transit_is_removed(tmp_path: Path):
    run, path = tmp_path / "run", tmp_path / "run" / "restore.conf"
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()

    def script(size: int) -> str:
        quoted = {"run": shlex.quote(str(run)), "file": shlex.quote(str(path)), "user": shlex.quote(user)}
        return _WRITE_PRIVATE_FILE.format(size=size, **quoted)

    done = sh(script(len(WHOLE)), stdin=WHOLE[:-1])
    assert done.returncode != 0 and b"ended early" in done.stderr
    assert not path.exists()
    done = sh(script(len(WHOLE)), stdin=WHOLE)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == WHOLE and path.stat().st_mode & 0o077 == 0


def test_an_agent_program_cut_off_in_transit_is_not_run(tmp_path: Path):
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').close()\n# the rest of the program\n".encode()
    bootstrap = BOOTSTRAP.format(name="igops-test")

    def run(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap], input=stdin, capture_output=True)

    cut = run(str(len(program)).encode() + b"\n" + program[: program.index(b"#")])
    assert cut.returncode != 0 and b"ended early" in cut.stderr
    assert not marker.exists()
    whole = run(str(len(program)).encode() + b"\n" + program)
    assert whole.returncode == 0, whole.stderr
    assert marker.exists()
