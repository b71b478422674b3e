"""Real PostgreSQL 15 servers for the unit tests of host-side scripts and actions: one initdb per
test module (a template), copied into a directory of the test's, started and stopped with the real
pg_ctl. As root, every tool runs as the postgres user, as on a member (pg_ctl refuses root); the
directories are then the postgres user's. Nothing listens on TCP unless a test asks for a
loopback address of its own."""

import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

BIN = Path("/usr/lib/postgresql/15/bin")
AS_ROOT = os.geteuid() == 0
needs_postgres = pytest.mark.skipif(
    not all((BIN / tool).exists() for tool in ("initdb", "pg_ctl", "pg_controldata", "postgres", "repmgr")),
    reason="PostgreSQL 15 and repmgr are not installed (make deps)",
)


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", "env", "-C", "/", *argv] if AS_ROOT else argv


# In memory where there is a tmpfs: a data directory is copied and written for every test.
TOP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def private_directory(prefix: str) -> Path:
    """A directory with a short path (a Unix socket's has a limit), the postgres user's."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=TOP))
    if AS_ROOT:
        shutil.chown(path, "postgres")
    return path


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(as_postgres(argv), capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result


def template() -> Path:
    """A fresh cluster's data directory, never started; shut down cleanly, on timeline 1."""
    base = private_directory("igops-pgtemplate-")
    run(
        [
            str(BIN / "initdb"),
            "-D",
            str(base / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "--wal-segsize=1",
        ],
        timeout=120,
    )
    with open(base / "data" / "postgresql.conf", "a") as conf:
        conf.write("fsync = off\nshared_buffers = 16MB\n")
    return base / "data"


def copy_cluster(source: Path, target: Path, settings: dict[str, str]) -> Path:
    """`source` copied to `target` (owners kept), with `settings` added to its postgresql.conf."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    with open(target / "postgresql.conf", "a") as conf:
        conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
    return target


def start(data: Path) -> None:
    argv = [str(BIN / "pg_ctl"), "-D", str(data), "-l", f"{data}.log", "-w", "-t", "60", "start"]
    result = subprocess.run(as_postgres(argv), capture_output=True, text=True, timeout=90, check=False)
    log = Path(f"{data}.log")
    assert result.returncode == 0, result.stderr + (log.read_text()[-3000:] if log.exists() else "")


def stop(data: Path, mode: str = "fast") -> None:
    run([str(BIN / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"], timeout=90)


def stop_if_running(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        subprocess.run(
            as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=90,
            check=False,
        )


def control_state(data: Path) -> str:
    output = run([str(BIN / "pg_controldata"), "-D", str(data)]).stdout
    return next(
        line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Database cluster state")
    )


def remove(base: Path, data_directories: list[Path]) -> None:
    for data in data_directories:
        stop_if_running(data)
    shutil.rmtree(base, ignore_errors=True)


def free_port(addresses: Iterable[str]) -> int:
    """A port free on every one of `addresses` (each member's loopback address listens on the
    fleet's one port, as the inventory says)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            for address in addresses:
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port")
