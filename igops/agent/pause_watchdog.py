"""Bound a PgBouncer PAUSE to the igops that issued it: RESUME the databases when igops is gone.

Usage: pause_watchdog.py DEADLINE_SECONDS ADDRESS PORT ADMIN_USER DATABASE [DATABASE ...]

igops starts this on every PgBouncer host of an operation, over an SSH session whose stdin it
keeps open, BEFORE it PAUSEs the databases, and ends it once it has RESUMEd them itself.

Protocol, one line each way at a time:
- igops -> watchdog, first line: a JSON object {"password": "..."} (null or "" when the admin
  console takes none). The password never appears in an argv or in this process's environment:
  each psql run gets it as PGPASSWORD in its own environment only, and it is never printed.
- watchdog -> igops: {"event": "armed", "deadline_s": D, "databases": [...]} once psql on this
  host has read the admin console's SHOW DATABASES and every database given is there; else
  {"event": "error", "message": "..."} and exit 2 (igops then does not pause).
- igops -> watchdog: "beat" about every second while the operation is alive.
  "done": igops has RESUMEd the databases itself (or never paused them): exit without acting,
  after {"event": "released"}.
  Anything else is answered {"event": "error", ...} and is NOT a heartbeat.
- The watchdog RESUMEs every database it was given through the local admin console (psql) when
  stdin reaches EOF (igops died or its SSH session dropped: reason "eof"), when no "beat" has
  come for DEADLINE seconds (igops hangs, is stopped, or its network is gone: "deadline"), or on
  SIGTERM, SIGHUP or SIGINT (the session's remote deadline, `timeout`, ends it: "signal"). It
  then writes {"event": "resumed", "reason": R, "resumed": [...], "not_paused": [...],
  "failed": {database: why}} and exits 0, or 1 if a RESUME failed. It also says so to syslog.

Why a RESUME at any moment is safe: see docs/failover-postgres.md ("The pause watchdog"). In a
switchover the old primary is stopped and fenced on disk before the candidate is promoted, so
resumed clients meet the running old primary (nothing promoted yet) or a fenced one (errors,
never writes that a promotion then loses).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import IO, Any

# How long one psql may take to connect to the local admin console.
CONNECT_TIMEOUT_S = 3
MAX_DEADLINE_S = 3600.0


class Stop(Exception):
    """A signal asked this process to end: RESUME first."""


def parse_args(argv: list[str]) -> tuple[float, str, int, str, list[str]]:
    """(deadline seconds, address, port, admin user, databases); ValueError says what is wrong."""
    if len(argv) < 5:
        raise ValueError("usage: pause_watchdog DEADLINE ADDRESS PORT ADMIN_USER DATABASE [DATABASE ...]")
    try:
        deadline = float(argv[0])
    except ValueError:
        raise ValueError(f"bad deadline {argv[0]!r}") from None
    if not 0 < deadline <= MAX_DEADLINE_S:
        raise ValueError(f"deadline {argv[0]} is outside 0-{MAX_DEADLINE_S:g} s")
    if not argv[2].isdigit() or not 0 < int(argv[2]) < 65536:
        raise ValueError(f"bad port {argv[2]!r}")
    databases = argv[4:]
    if any(not name for name in databases):
        raise ValueError("an empty database name")
    return deadline, argv[1], int(argv[2]), argv[3], databases


def parse_password(line: bytes) -> str | None:
    """The first stdin line: {"password": ...} -> the password, or None."""
    try:
        value = json.loads(line)
    except ValueError:
        raise ValueError("the first line is not JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("password", ""), (str, type(None))):
        raise ValueError('the first line must be {"password": "..."}')
    password: str | None = value.get("password")
    return password or None


def parse_command(line: bytes) -> str | None:
    """One later stdin line -> "beat", "done", or None for anything else."""
    word = line.strip()
    return word.decode() if word in (b"beat", b"done") else None


class Heartbeat:
    """When igops last showed it was alive, on an injectable monotonic clock."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline_s = deadline_s
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def remaining(self) -> float:
        return self.deadline_s - (self.clock() - self.last)


def watch(
    next_line: Callable[[float], bytes | None],
    heartbeat: Heartbeat,
    report: Callable[[str], None] = lambda message: None,
) -> str:
    """Follow igops' lines until it says "done" (returns "done") or is gone (returns "eof" or
    "deadline"). next_line(timeout) gives the next line, b"" at EOF, None when none came."""
    while True:
        remaining = heartbeat.remaining()
        if remaining <= 0:
            return "deadline"
        line = next_line(remaining)
        if line is None:
            continue
        if line == b"":
            return "eof"
        command = parse_command(line)
        if command == "done":
            return "done"
        if command == "beat":
            heartbeat.beat()
        else:
            report(f"not a command: {line[:40]!r}")


def resume_outcome(returncode: int, stderr: str) -> str:
    """What one psql `RESUME` said: "resumed", "not paused", or why it failed."""
    if returncode == 0:
        return "resumed"
    text = " ".join(stderr.split())
    if "is not paused" in text:
        return "not paused"
    return text[-300:] or f"psql exited {returncode}"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Console:
    """The admin console of this host's PgBouncer, through the host's own psql."""

    def __init__(self, address: str, port: int, user: str, password: str | None) -> None:
        self.argv = [
            "psql",
            "-X",
            "-w",
            "-q",
            "-A",
            "-t",
            "-F",
            "\t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            address,
            "-p",
            str(port),
            "-U",
            user,
            "-d",
            "pgbouncer",
        ]
        self.password = password

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S), PGAPPNAME="igops-pause-watchdog")
        if self.password:
            env["PGPASSWORD"] = self.password  # this child's environment only
        return subprocess.run(
            [*self.argv, "-c", command],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def databases(self) -> list[str]:
        done = self.run("SHOW DATABASES", CONNECT_TIMEOUT_S + 5)
        if done.returncode != 0:
            raise RuntimeError(" ".join(done.stderr.split())[-300:] or f"psql exited {done.returncode}")
        return [line.split("\t", 1)[0] for line in done.stdout.splitlines() if line]

    def resume(self, databases: list[str]) -> dict[str, str]:
        """RESUME each database, all at once: clients wait on every one of them."""
        outcomes: dict[str, str] = {}

        def one(name: str) -> None:
            try:
                done = self.run(f"RESUME {quote_identifier(name)}", CONNECT_TIMEOUT_S + 5)
                outcomes[name] = resume_outcome(done.returncode, done.stderr)
            except (OSError, subprocess.SubprocessError) as exc:
                outcomes[name] = str(exc)

        threads = [threading.Thread(target=one, args=(name,)) for name in databases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {name: outcomes[name] for name in databases}


def emit(event: str, **fields: Any) -> None:
    """A JSON line to igops; once its session is gone there is no one to tell."""
    try:
        sys.stdout.write(json.dumps(dict(event=event, **fields)) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def to_syslog(message: str) -> None:
    try:
        import syslog

        syslog.openlog("igops-pause-watchdog", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, message)
    except OSError:
        pass


def line_reader(stream: IO[bytes]) -> Callable[[float], bytes | None]:
    """A thread reads stdin (blocking), so the main thread can wait for a line with a timeout."""
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        while True:
            line = stream.readline()
            lines.put(line)
            if not line:
                return

    threading.Thread(target=read, daemon=True).start()

    def next_line(timeout: float) -> bytes | None:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return None

    return next_line


class Signals:
    """SIGTERM, SIGHUP and SIGINT end the watch (raising Stop) once; from then on, and once the
    watch has ended, they are ignored, so that a RESUME under way always finishes."""

    def __init__(self) -> None:
        self.ended = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.ended:
            self.ended = True
            raise Stop

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, self)


def main() -> None:
    try:
        deadline, address, port, user, databases = parse_args(sys.argv[1:])
        password = parse_password(sys.stdin.buffer.readline())
    except ValueError as exc:
        emit("error", message=str(exc))
        sys.exit(2)
    os.chdir("/")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dropped session must not kill us mid-RESUME
    console = Console(address, port, user, password)
    try:
        known = console.databases()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        emit("error", message=f"psql cannot read the admin console of {address}:{port}: {exc}")
        sys.exit(2)
    missing = [name for name in databases if name not in known]
    if missing:
        emit("error", message=f"PgBouncer on {address}:{port} has no database {', '.join(missing)}")
        sys.exit(2)

    heartbeat = Heartbeat(deadline)
    next_line = line_reader(sys.stdin.buffer)
    signals = Signals()
    signals.install()
    emit("armed", deadline_s=deadline, databases=databases)
    try:
        reason = watch(next_line, heartbeat, report=lambda message: emit("error", message=message))
        signals.ended = True  # inside the try: a signal landing just before is still caught
    except Stop:
        reason = "signal"
    if reason == "done":
        emit("released")
        return
    outcomes = console.resume(databases)
    failed = {name: why for name, why in outcomes.items() if why not in ("resumed", "not paused")}
    emit(
        "resumed",
        reason=reason,
        resumed=[name for name, why in outcomes.items() if why == "resumed"],
        not_paused=[name for name, why in outcomes.items() if why == "not paused"],
        failed=failed,
    )
    to_syslog(
        f"igops went away ({reason}) while PgBouncer on {address}:{port} held {', '.join(databases)}: "
        + ", ".join(f"{name} {why}" for name, why in outcomes.items())
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
