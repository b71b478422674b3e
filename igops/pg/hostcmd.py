"""Postgres and repmgr tools run on a member over SSH: as the postgres user, from the bin_dir
and with the repmgr.conf and data directory the inventory names; and where the WAL on a
stopped member's disk ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from igops import postgres
from igops.host_commands import ssh

if TYPE_CHECKING:
    from igops.inventory import Fleet


def data_directory(fleet: Fleet, host: Any) -> str:
    return fleet.path_for(fleet.model.postgres.data_directory, host)


def as_postgres(fleet: Fleet, argv: list[str]) -> list[str]:
    # From /, because the SSH user's home is usually closed to the postgres user.
    return ["runuser", "-u", fleet.model.postgres.os_user, "--", "env", "-C", "/", *argv]


def postgres_sh(fleet: Fleet, script: str, *args: str) -> list[str]:
    """`script` run by sh as the postgres user, its arguments as $1, $2, …"""
    return as_postgres(fleet, ["sh", "-c", script, "sh", *args])


def bin_path(fleet: Fleet, program: str) -> str:
    return f"{fleet.model.postgres.bin_dir.rstrip('/')}/{program}"


def repmgr_argv(fleet: Fleet, host: Any, *args: str) -> list[str]:
    return [bin_path(fleet, "repmgr"), "-f", fleet.path_for(fleet.model.postgres.repmgr_config, host), *args]


def repmgr(fleet: Fleet, host: Any, *args: str) -> list[str]:
    return as_postgres(fleet, repmgr_argv(fleet, host, *args))


# Shell: true while a postmaster runs on "$data" ("$bin" the bin_dir): pg_ctl status, except for
# one that has exited but is not yet reaped. pg_ctl takes a zombie for a live postmaster, and a
# daemonized postmaster's parent is init, which on some hosts (a container's) reaps late or never:
# a stale postmaster.pid, such as the one in data restored from a running member's snapshot,
# then names a process that looks alive until it is reaped. The zombie test is shell builtins
# only: it runs inside a switchover's write pause.
POSTMASTER_RUNNING = (
    '{ "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1 && ! { read -r pm_pid < "$data/postmaster.pid" && '
    'read -r _ _ pm_state _ < "/proc/$pm_pid/stat" && [ "$pm_state" = Z ]; } 2>/dev/null; }'
)

# Shell: wait, with "$bin" the bin_dir, "$data" the data directory and "$wait" tenths of a
# second, until no postmaster runs on the data directory; exit 1 if one still does.
WAIT_STOPPED = (
    f"while {POSTMASTER_RUNNING}; do "
    '[ "$wait" -le 0 ] && { echo "its postmaster is still running" >&2; exit 1; }; '
    "wait=$((wait - 1)); sleep 0.1; done"
)

# Shell: with "$bin", "$data", "$socket", "$port", "$wait" (seconds) set and a start command as
# "$@": a postmaster that answers is left as it is (prints "running"); one that does not answer yet
# but whose postmaster.pid says it is starting (line 8: its recovery has not reached a consistent
# state, which can take minutes of replay) is a start already under way (prints "starting"); one
# that says anything else is a shutdown under way (a stop that outlived the igops that began it)
# and is waited for; then the start command runs. pg_ctl start fails while any postmaster holds
# the data directory, and pg_isready answers the same for a startup as for a shutdown.
START_AFTER_SHUTDOWN = (
    f"while {POSTMASTER_RUNNING}; do "
    '"$bin/pg_isready" -q -h "$socket" -p "$port" && { echo running; exit 0; }; '
    'case "$(sed -n 8p "$data/postmaster.pid" 2>/dev/null)" in starting*) echo starting; exit 0;; esac; '
    '[ "$wait" -le 0 ] && { echo "still shutting down" >&2; exit 1; }; wait=$((wait - 1)); sleep 1; '
    'done; exec "$@"'
)


def start_unless_answering(fleet: Fleet, host: Any, wait_seconds: int, first: str = "") -> list[str]:
    """The member's server started through repmgr's `node service --action=start`, after the
    shell `first` and as START_AFTER_SHUTDOWN says; prints "running" when it already answered,
    "starting" when a start was already under way."""
    return postgres_sh(
        fleet,
        'bin="$1"; data="$2"; socket="$3"; port="$4"; wait="$5"; shift 5; ' + first + START_AFTER_SHUTDOWN,
        fleet.model.postgres.bin_dir,
        data_directory(fleet, host),
        fleet.path_for(fleet.model.postgres.socket_dir, host),
        str(fleet.model.postgres.port),
        str(wait_seconds),
        *repmgr_argv(fleet, host, "node", "service", "--action=start"),
    )


_WAL_LISTING = '"$1" -D "$2"; echo "-- pg_wal"; ls "$2/pg_wal"'


class WalEnd(NamedTuple):
    """Where a server's WAL ends: an LSN means something only on its timeline."""

    timeline: int
    lsn: int


def wal_end_on_disk(fleet: Fleet, host: Any) -> WalEnd | None:
    """Where the WAL on a stopped server's disk ends (pg_waldump from its last checkpoint, on the
    newest timeline it holds WAL of)."""
    data = data_directory(fleet, host)
    listing = ssh(
        fleet,
        host,
        postgres_sh(fleet, _WAL_LISTING, bin_path(fleet, "pg_controldata"), data),
        timeout=30,
    )
    if not listing.ok:
        return None
    control_text, _, files = listing.stdout.partition("-- pg_wal")
    control = postgres.parse_controldata(control_text)
    try:
        segment_size = int(control.get("Bytes per WAL segment", 16 << 20))
        redo = postgres.parse_lsn(control["Latest checkpoint's REDO location"])
        redo_timeline = int(control["Latest checkpoint's TimeLineID"])
    except (KeyError, ValueError):
        return None
    segments = [name for name in files.split() if len(name) == 24 and all(c in "0123456789ABCDEF" for c in name)]
    timeline = max([int(name[:8], 16) for name in segments] + [redo_timeline])
    start = (
        redo
        if timeline == redo_timeline
        else min(postgres.segment_start(name, segment_size)[1] for name in segments if int(name[:8], 16) == timeline)
    )
    dump = ssh(
        fleet,
        host,
        postgres_sh(
            fleet,
            'bin="$1"; data="$2"; tli="$3"; at="$4"; ' + postgres.WALDUMP_TO_END,
            fleet.model.postgres.bin_dir,
            data,
            str(timeline),
            postgres.format_lsn(start),
        ),
        timeout=60,
    )
    if not dump.reached:
        return None
    end = postgres.wal_end_from_waldump(dump.stderr + dump.stdout, segment_size)
    return WalEnd(timeline, end) if end is not None else None
