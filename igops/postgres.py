"""PostgreSQL and PgBouncer as failover sees them: psycopg2 connections and probes, LSN
arithmetic, the PgBouncer admin console, and parsers for what pg_controldata, pg_waldump and
PgBouncer's databases file say.

No SSH here: igops.pg (hostcmd and the actions) runs the host-side commands and hands their
output to these parsers, which keeps them testable on recorded text.
"""

from __future__ import annotations

import re
import select
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from igops.errors import (
    IgopsError,
    Unavailable as Unavailable,  # re-exported: callers catch postgres.Unavailable
    first_line,
)
from igops.secrets import Secrets

T = TypeVar("T")

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet
    from igops.postgres_deadline import Deadline

# repmgr keeps its metadata (nodes, their types, upstreams and priorities) in this database.
REPMGR_DATABASE = "repmgr"
PROBE_TIMEOUT = 3
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_AT_LSN = re.compile(r"\bat ([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})")
_AT_SEGMENT = re.compile(r"(?:log|WAL) segment ([0-9A-F]{24}),(?: LSN [0-9A-F]+/[0-9A-F]+,)? offset (\d+)")
_MISSING_SEGMENT = re.compile(r'could not (?:find|open) file "(?:[^"]*/)?([0-9A-F]{24})"')


# --- LSNs -------------------------------------------------------------------------------------
def parse_lsn(text: str) -> int:
    """'16/B374D848' -> the byte position it names."""
    match = _LSN.match(text.strip())
    if not match:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def optional_lsn(text: str | None) -> int | None:
    return parse_lsn(text) if text else None


def segment_start(name: str, segment_size: int) -> tuple[int, int]:
    """A WAL segment file name -> (timeline, LSN of its first byte)."""
    timeline, log, segment = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
    return timeline, (log << 32) + segment * segment_size


# --- what host-side tools print ---------------------------------------------------------------
def parse_controldata(text: str) -> dict[str, str]:
    """pg_controldata's 'Key:   value' lines as a dict."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def server_arguments(postmaster_opts: str, data_directory: str) -> list[str]:
    """The options the server last started with (its postmaster.opts), without the binary: what
    a single-user run needs to find the same configuration, wherever that lives."""
    import shlex

    words = shlex.split(postmaster_opts)
    return words[1:] if len(words) > 1 else ["-D", data_directory]


# With "$bin" (Postgres' binaries), "$data" (a stopped server's data directory), "$tli" and "$at"
# (a timeline and an LSN on it) set: dumps its WAL from there to where the readable WAL ends.
# pg_waldump is named its first and last segment files: left to find one itself, it takes the
# segment size from whichever file pg_wal lists first, and one the server pre-allocated holds
# only zeros there. The last is the timeline's highest-named file; the marker line names it.
WALDUMP_TO_END = (
    '[ -n "${size:-}" ] || size=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Bytes per WAL segment: *//p"); '
    'tl=$(printf %08X "$tli"); '
    'first=$(printf "%s%08X%08X" "$tl" "0x${at%/*}" "$((0x${at#*/} / size))"); '
    'last=$({ ls "$data/pg_wal"; echo "$first"; } | grep -E "^$tl[0-9A-F]{16}$" | sort | tail -n 1); '
    'echo "-- last segment $last"; '
    '"$bin/pg_waldump" -q -p "$data/pg_wal" -s "$at" "$first" "$last" 2>&1 || true'
)
_LAST_SEGMENT = re.compile(r"^-- last segment ([0-9A-F]{24})$", re.MULTILINE)


def wal_end_from_waldump(message: str, segment_size: int) -> int | None:
    """Where readable WAL ends, from what WALDUMP_TO_END printed.

    The reader names the first position it could not decode: an LSN after "at", or a page
    (segment and offset) that holds no continuation of the log, or a segment file that does not
    exist. A dump that read the last segment to its end without an error ends where that
    segment does. None when the message says none of these."""
    page = _AT_SEGMENT.search(message)
    if page:
        _, start = segment_start(page.group(1), segment_size)
        return start + int(page.group(2))
    positions = _AT_LSN.findall(message)
    if positions:
        return parse_lsn(positions[-1])
    missing = _MISSING_SEGMENT.search(message)
    if missing:
        return segment_start(missing.group(1), segment_size)[1]
    last = _LAST_SEGMENT.search(message)
    if last and "error" not in message:
        return segment_start(last.group(1), segment_size)[1] + segment_size
    return None


# --- PgBouncer's databases file -----------------------------------------------------------------
_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_ENTRY = re.compile(r"^(\s*)([^=;#\s][^=]*?)(\s*=\s*)(.*?)\s*$")
_CONNSTR_ITEM = re.compile(r"(\w+)\s*=\s*('(?:[^']|'')*'|\S+)")


def log_file_of(repmgr_conf: str) -> str | None:
    """The server log a repmgr.conf's service_start_command writes to (`pg_ctl ... -l FILE`)."""
    for line in repmgr_conf.splitlines():
        key, _, value = line.partition("=")
        if key.strip() != "service_start_command":
            continue
        try:
            words = (
                shlex.split(shlex.split(value.strip())[0])
                if value.strip().startswith(("'", '"'))
                else shlex.split(value)
            )
        except (ValueError, IndexError):
            return None
        for index, word in enumerate(words[:-1]):
            if word in ("-l", "--log"):
                return words[index + 1]
            if word.startswith("--log="):
                return word.split("=", 1)[1]
    return None


LOG_SEVERITIES = ("PANIC", "FATAL", "ERROR")
# Messages every promotion or shutdown logs: never the cause of a failure.
_ROUTINE = re.compile(
    r"due to administrator command|the database system is (?:starting up|shutting down|in "
    r"recovery mode|not yet accepting connections)|terminating connection because of crash"
)


def log_cause(log_text: str, since: str | None = None) -> str | None:
    """Why a server failed, from its log: the first PANIC after the last line containing `since`
    (e.g. "received promote request"), else the first FATAL, else the first ERROR, from the
    severity on (the line prefix is the site's own); routine messages are passed over."""
    lines = log_text.splitlines()
    if since:
        marks = [index for index, line in enumerate(lines) if since in line]
        if marks:
            lines = lines[marks[-1] :]
    for severity in LOG_SEVERITIES:
        marker = f"{severity}:"
        for line in lines:
            if marker in line and not _ROUTINE.search(line):
                return " ".join(line[line.index(marker) :].split())[:400]
    return None


def parse_connstr(connstr: str) -> list[tuple[str, str]]:
    return [(key, value) for key, value in _CONNSTR_ITEM.findall(connstr)]


def repoint_databases(text: str, names: set[str], host: str, port: int) -> str:
    """The databases file with every entry in `names` pointing at host:port and nothing else
    changed (comments, order, other keys such as dbname or pool_size stay as they are).

    Entries outside any section count as [databases]: the file is %include'd for that section."""
    section = "databases"
    found: set[str] = set()
    lines = []
    for line in text.splitlines(keepends=True):
        header = _SECTION.match(line)
        if header:
            section = header.group(1).strip().lower()
            lines.append(line)
            continue
        entry = _ENTRY.match(line.rstrip("\n"))
        name = entry.group(2).strip().strip('"') if entry else None
        if section != "databases" or entry is None or name not in names:
            lines.append(line)
            continue
        items = parse_connstr(entry.group(4))
        keys = [key for key, _ in items]
        items = [(key, host if key == "host" else str(port) if key == "port" else value) for key, value in items]
        if "host" not in keys:
            items.insert(0, ("host", host))
        if "port" not in keys:
            items.insert(1, ("port", str(port)))
        newline = "\n" if line.endswith("\n") else ""
        lines.append(
            f"{entry.group(1)}{entry.group(2)}{entry.group(3)}"
            + " ".join(f"{key}={value}" for key, value in items)
            + newline
        )
        found.add(name)
    missing = names - found
    if missing:
        raise ValueError(f"no entry for {', '.join(sorted(missing))} in the databases file")
    return "".join(lines)


# --- connections and probes ---------------------------------------------------------------------
def classify(message: str) -> str:
    lowered = message.lower()
    if "connection refused" in lowered or "no such file or directory" in lowered:
        return "refused"
    if "timeout" in lowered or "timed out" in lowered or "no route to host" in lowered:
        return "timeout"
    if "fatal" in lowered or "the database system" in lowered:
        return "rejected"
    return "timeout"


def connect(
    fleet: Fleet,
    host: Any,
    database: str = "postgres",
    timeout: int = PROBE_TIMEOUT,
    statement_timeout_ms: int | None = 10_000,
    deadline: Deadline | None = None,
) -> Connection:
    """An autocommit superuser connection to one server (not through PgBouncer). A `deadline`
    replaces `timeout` and `statement_timeout_ms`: its connection parameters, and its session
    settings from the connection's first statement on."""
    import psycopg2

    model = fleet.model
    settings = {"statement_timeout": str(statement_timeout_ms)} if statement_timeout_ms else {}
    parameters: dict[str, Any] = {"connect_timeout": timeout}
    if deadline is not None:
        settings = deadline.session_settings()
        parameters = deadline.connection_parameters()
    options = " ".join(f"-c {name}={value}" for name, value in settings.items()) or None
    try:
        connection: Connection = psycopg2.connect(
            host=str(host.address),
            port=model.postgres.port,
            user=model.postgres.user,
            password=Secrets(model.secrets.file).get("postgres_password"),
            dbname=database,
            options=options,
            application_name="igops-failover",
            **parameters,
        )
    except psycopg2.OperationalError as exc:
        detail = first_line(exc)
        raise Unavailable(host.name, detail, classify(detail)) from None
    connection.autocommit = True
    return connection


@dataclass
class Replica:
    """One row of the primary's pg_stat_replication."""

    name: str  # application_name: repmgr sets it to the node's name
    address: str | None
    state: str
    sent_lsn: int | None
    flush_lsn: int | None
    replay_lsn: int | None
    replay_lag_s: float | None


@dataclass
class ServerState:
    in_recovery: bool
    timeline: int | None
    current_lsn: int | None  # a primary's insert position
    receive_lsn: int | None  # a standby's: received and flushed
    replay_lsn: int | None
    replay_paused: bool
    last_replay_age_s: float | None  # how old the last replayed transaction is
    receiver_status: str | None  # 'streaming' while a standby follows its upstream
    upstream_address: str | None
    replicas: list[Replica] = field(default_factory=list)


_STATE_QUERY = """
SELECT pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host FROM pg_stat_wal_receiver),
       (SELECT received_tli FROM pg_stat_wal_receiver)
"""

_REPLICAS_QUERY = """
SELECT application_name, client_addr::text, state, sent_lsn::text, flush_lsn::text, replay_lsn::text,
       extract(epoch FROM replay_lag)::float8
  FROM pg_stat_replication
"""


def server_state(connection: Connection) -> ServerState:
    with connection.cursor() as cursor:
        cursor.execute(_STATE_QUERY)
        row = cursor.fetchone()
        assert row is not None  # a SELECT of expressions without FROM returns one row
        (
            in_recovery,
            current,
            walfile,
            received,
            replayed,
            pause_state,
            replay_age,
            checkpoint_tli,
            receiver_status,
            sender_host,
            received_tli,
        ) = row
        replicas = []
        if not in_recovery:
            cursor.execute(_REPLICAS_QUERY)
            replicas = [
                Replica(name, address, state, optional_lsn(sent), optional_lsn(flushed), optional_lsn(replay), lag)
                for name, address, state, sent, flushed, replay, lag in cursor.fetchall()
            ]
    timeline = int(walfile[:8], 16) if walfile else (received_tli or checkpoint_tli)
    return ServerState(
        in_recovery=in_recovery,
        timeline=timeline,
        current_lsn=optional_lsn(current),
        receive_lsn=optional_lsn(received),
        replay_lsn=optional_lsn(replayed),
        replay_paused=pause_state in ("paused", "pause requested"),
        last_replay_age_s=replay_age,
        receiver_status=receiver_status,
        upstream_address=sender_host,
        replicas=replicas,
    )


@dataclass
class RepmgrNode:
    node_id: int
    name: str
    type: str
    upstream_id: int | None
    active: bool
    priority: int
    conninfo: str


def repmgr_nodes(connection: Connection) -> list[RepmgrNode]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT node_id, node_name, type, upstream_node_id, active, priority, conninfo "
            "FROM repmgr.nodes ORDER BY node_id"
        )
        return [RepmgrNode(*row) for row in cursor.fetchall()]


def repmgrd_state(connection: Connection) -> str:
    """What repmgrd's registration in this node's shared memory says: 'running', 'paused' or
    'not running'. The registration lives in the repmgr extension, so `connection` must be to
    the repmgr database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT repmgr.repmgrd_is_running(), repmgr.repmgrd_is_paused()")
        row = cursor.fetchone()
        assert row is not None  # a SELECT of expressions without FROM returns one row
        running, paused = row
    if not running:
        return "not running"
    return "paused" if paused else "running"


# --- the PgBouncer admin console -----------------------------------------------------------------
@dataclass(frozen=True)
class BouncerDatabase:
    name: str
    host: str | None
    port: int | None
    database: str | None
    paused: bool
    disabled: bool


class PauseFailed(IgopsError):
    pass


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Bouncer:
    """The admin console of one PgBouncer. PAUSE, RESUME and KILL act on named databases only:
    the pools of other clusters keep running."""

    def __init__(self, fleet: Fleet, host: Any):
        self.fleet = fleet
        self.host = host
        self._console: Connection | None = None  # kept between open() and close()

    def open(self) -> None:
        """Keep one admin console session for what follows (SHOW, RELOAD, RESUME, KILL) until
        close(): a switchover opens it before writes pause, so none of them logs in meanwhile."""
        if self._console is None:
            self._console = self._connect()

    def close(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def _on_console(self, work: Callable[[Connection], T]) -> T:
        """`work` on the kept session, or on one of its own. A kept session that broke (PgBouncer
        restarted since) is replaced once: every command here may be sent twice (RESUME of a
        database not paused is ignored, the others change nothing the second time)."""
        import psycopg2

        if self._console is not None:
            try:
                return work(self._console)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if not self._console.closed:
                    raise  # PgBouncer answered with an error: the session is fine
                self.close()
                self.open()
                assert self._console is not None
                return work(self._console)
        connection = self._connect()
        try:
            return work(connection)
        finally:
            connection.close()

    def _connect(self, asynchronous: bool = False) -> Connection:
        import psycopg2

        model = self.fleet.model
        try:
            connection = psycopg2.connect(
                host=str(self.host.address),
                port=model.pgbouncer.port,
                user=model.pgbouncer.admin_user,
                dbname="pgbouncer",
                password=Secrets(model.secrets.file).get("pgbouncer_password"),
                connect_timeout=PROBE_TIMEOUT,
                async_=asynchronous,
            )
        except psycopg2.OperationalError as exc:
            detail = first_line(exc)
            raise Unavailable(self.host.name, f"PgBouncer: {detail}", classify(detail)) from None
        if not asynchronous:
            connection.autocommit = True
        return connection

    def run(self, command: str) -> list[tuple[Any, ...]]:
        def work(connection: Connection) -> list[tuple[Any, ...]]:
            with connection.cursor() as cursor:
                cursor.execute(command)
                return cursor.fetchall() if cursor.description else []

        return self._on_console(work)

    def databases(self) -> list[BouncerDatabase]:
        def work(connection: Connection) -> list[dict[str, Any]]:
            with connection.cursor() as cursor:
                cursor.execute("SHOW DATABASES")
                assert cursor.description is not None  # SHOW returns rows, so it describes them
                columns = [column[0] for column in cursor.description]
                return [dict(zip(columns, row, strict=False)) for row in cursor.fetchall()]

        rows = self._on_console(work)
        return [
            BouncerDatabase(
                row["name"],
                row.get("host"),
                row.get("port"),
                row.get("database"),
                bool(row.get("paused")),
                bool(row.get("disabled")),
            )
            for row in rows
            if row["name"] != "pgbouncer"
        ]

    def pause(self, names: list[str], timeout: float) -> None:
        """PAUSE every database at once and wait until all have no active server connection.
        If that takes longer than `timeout`, give up: close the waiting consoles, RESUME them
        all and raise PauseFailed, so a long transaction costs nothing but a retry later."""
        import psycopg2

        deadline = time.monotonic() + timeout
        waiting = []
        cursors = []  # an asynchronous query is abandoned when its cursor is collected
        try:
            for name in names:
                connection = self._connect(asynchronous=True)
                waiting.append(connection)
                _wait_async(connection, deadline)
                cursors.append(connection.cursor())
                cursors[-1].execute(f"PAUSE {_quote(name)}")
            for connection in waiting:
                _wait_async(connection, deadline)
        except (TimeoutError, psycopg2.Error, Unavailable) as exc:
            for connection in waiting:
                connection.close()
            self.resume(names)
            reason = f"still busy after {timeout:g} s" if isinstance(exc, TimeoutError) else first_line(exc)
            raise PauseFailed(
                f"PgBouncer on {self.host.name} could not pause {', '.join(names)}: {reason}",
                "every database was resumed; a long transaction may hold a server connection "
                "(SHOW SERVERS on the admin console), retry when it is gone",
            ) from None
        finally:
            for connection in waiting:
                if not connection.closed:
                    connection.close()

    def resume(self, names: list[str]) -> list[str]:
        """RESUME each database that is paused; returns those resumed."""
        import psycopg2

        def work(connection: Connection) -> list[str]:
            resumed = []
            for name in names:
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(f"RESUME {_quote(name)}")
                    resumed.append(name)
                except psycopg2.Error as exc:
                    if "is not paused" not in str(exc):
                        raise
            return resumed

        return self._on_console(work)

    def kill(self, names: list[str]) -> None:
        """Drop every client and server connection of the databases and hold new queries
        (KILL leaves them paused), for when their server is gone and PAUSE could wait on it."""

        def work(connection: Connection) -> None:
            for name in names:
                with connection.cursor() as cursor:
                    cursor.execute(f"KILL {_quote(name)}")

        self._on_console(work)

    def reload(self) -> None:
        self.run("RELOAD")


def _wait_async(connection: Connection, deadline: float) -> None:
    from psycopg2 import extensions

    while True:
        state = connection.poll()
        if state == extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if state == extensions.POLL_READ:
            select.select([connection.fileno()], [], [], remaining)
        elif state == extensions.POLL_WRITE:
            select.select([], [connection.fileno()], [], remaining)
