"""The steps that make members standbys of the primary: rejoin (crash recovery first, stale
timeline history removed, pg_rewind by repmgr), follow, wait until streaming; and the WAL kept
for a rejoin (a replication slot reserved before the promotion) and released after it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from igops import postgres
from igops.errors import IgopsError
from igops.host_commands import ssh_ok
from igops.pg.cluster import lsn_text
from igops.pg.hostcmd import WAIT_STOPPED, bin_path, data_directory, postgres_sh, repmgr, repmgr_argv
from igops.pg.timeouts import REJOIN_TIMEOUT, STOP_TIMEOUT
from igops.role_change import STREAMING_TIMEOUT

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

    from igops.inventory import Fleet


class RejoinActions:
    """Rejoining and following (mixed into igops.pg.actions.PgActions: `fleet` and `_host` are
    PgActions')."""

    fleet: Fleet

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

    def register_standby(self, node: str, primary: str) -> None:
        host = self._host(node)
        upstream = self._repmgr_record(primary)
        ssh_ok(
            self.fleet,
            host,
            repmgr(self.fleet, host, "standby", "register", "--force", f"--upstream-node-id={upstream.node_id}"),
            "repmgr standby register",
        )

    def stop(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(self.fleet, host, repmgr(self.fleet, host, "node", "service", "--action=stop"), "stop", timeout=90)

    # Single-user mode refuses standby mode, so standby.signal steps aside for the run and comes
    # back whatever happens (pg_rewind does the same when it recovers a target itself).
    _SINGLE_USER = (
        'set -e; data="$1"; shift; hidden=; '
        'if [ -e "$data/standby.signal" ]; then mv "$data/standby.signal" "$data/standby.signal.igops"; '
        "hidden=1; fi; "
        'restore() { if [ -n "$hidden" ]; then '
        'mv "$data/standby.signal.igops" "$data/standby.signal"; fi; }; '
        'trap restore EXIT; "$@" </dev/null'
    )

    # Shell, with "$bin" the bin_dir, "$data" the data directory, "$wait" tenths of a second and
    # repmgr's `node service` as "$@": standby.signal, then the start and the stop through repmgr
    # (what service_start_command and service_stop_command say, else pg_ctl), then the wait for
    # the postmaster to be gone (repmgr's own stop does not wait).
    _START_STOP_AS_STANDBY = (
        'set -e; bin="$1"; data="$2"; wait="$3"; shift 3; touch "$data/standby.signal"; '
        '"$@" --action=start </dev/null; "$@" --action=stop </dev/null; ' + WAIT_STOPPED
    )

    def ensure_clean_shutdown(self, node: str) -> str:
        """pg_rewind needs a cleanly shut down target. A crashed one is recovered the way pg_rewind
        would, but with the server's own configuration, which may live outside the data directory
        (Debian's /etc/postgresql) where pg_rewind's own recovery cannot find it."""
        fleet = self.fleet
        host = self._host(node)
        data = data_directory(fleet, host)
        script = '"$1" -D "$2"; echo "-- postmaster.opts"; cat "$2/postmaster.opts" 2>/dev/null || true'
        output = ssh_ok(
            fleet,
            host,
            postgres_sh(fleet, script, bin_path(fleet, "pg_controldata"), data),
            "pg_controldata",
        )
        control_text, _, opts = output.partition("-- postmaster.opts")
        state = postgres.parse_controldata(control_text).get("Database cluster state", "unknown")
        if state in ("shut down", "shut down in recovery"):
            return f"{state} cleanly already"
        if state == "in archive recovery":
            # A standby that crashed (or whose promotion died): recovering it outside standby mode
            # would write a checkpoint of its own on the primary's timeline, where the primary's
            # later WAL differs and pg_rewind sees no fork. It starts as the standby it is instead,
            # with standby.signal written first: a promotion removes it before it writes the new
            # timeline's history file, so one that died after choosing a timeline left none, and
            # started without it the node would recover as a primary and open for writes.
            ssh_ok(
                fleet,
                host,
                postgres_sh(
                    fleet,
                    self._START_STOP_AS_STANDBY,
                    fleet.model.postgres.bin_dir,
                    data,
                    str(int(STOP_TIMEOUT) * 10),
                    *repmgr_argv(fleet, host, "node", "service"),
                ),
                "start and stop as a standby",
                timeout=REJOIN_TIMEOUT * 2 + STOP_TIMEOUT,
            )
            return f"was {state}: fenced, started as a standby and stopped cleanly"
        single_user = [
            bin_path(fleet, "postgres"),
            "--single",
            "-F",
            *postgres.server_arguments(opts.strip(), data),
            "template1",
        ]
        ssh_ok(
            fleet,
            host,
            postgres_sh(fleet, self._SINGLE_USER, data, *single_user),
            "single-user crash recovery",
            timeout=REJOIN_TIMEOUT,
        )
        return f"was {state}: crash recovery done"

    # History files of timelines past the node's own (its last checkpoint's, or the one its
    # recovery reached): it never was on them, so they are leftovers, e.g. of a promotion that
    # died after it chose its new timeline. A standby takes the history of a timeline it does not
    # have from its primary, so one of the same number made elsewhere must go. First, a stop
    # still under way (a switchover's, whose postmaster hands its last segment to
    # archive_command after the shutdown checkpoint) is waited for, as long as a stop may take.
    _STALE_HISTORY = (
        'set -e; bin="$1"; data="$2"; wait="$3"; ' + WAIT_STOPPED + '; control=$("$bin/pg_controldata" -D "$data"); '
        'own=$(printf "%s\\n" "$control" | sed -n "s/^Latest checkpoint.s TimeLineID: *//p"); '
        'reached=$(printf "%s\\n" "$control" | sed -n "s/^Min recovery ending loc.s timeline: *//p"); '
        '[ "${reached:-0}" -gt "$own" ] && own=$reached; '
        'for file in "$data"/pg_wal/*.history; do [ -e "$file" ] || continue; '
        'name=$(basename "$file" .history); [ $((0x$name)) -gt "$own" ] || continue; '
        'rm -f "$file" "$data/pg_wal/archive_status/$name.history.ready" '
        '"$data/pg_wal/archive_status/$name.history.done"; echo "$name.history"; done'
    )

    def remove_stale_history(self, node: str) -> str:
        fleet = self.fleet
        host = self._host(node)
        output = ssh_ok(
            fleet,
            host,
            postgres_sh(
                fleet,
                self._STALE_HISTORY,
                fleet.model.postgres.bin_dir,
                data_directory(fleet, host),
                str(int(STOP_TIMEOUT) * 10),
            ),
            "removing stale timeline history files",
            timeout=STOP_TIMEOUT + 30,
        )
        removed = output.split()
        return f"removed {', '.join(removed)}" if removed else "none"

    def _repmgr_record(self, node: str) -> postgres.RepmgrNode:
        """A node's record in repmgr's metadata, as the node itself has it."""
        connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        try:
            record = next((n for n in postgres.repmgr_nodes(connection) if n.name == node), None)
        finally:
            connection.close()
        if record is None:
            raise IgopsError(f"{node} is not in repmgr's metadata", "register it with repmgr first")
        return record

    def rejoin(self, node: str, primary: str) -> str:
        host = self._host(node)
        output = ssh_ok(
            self.fleet,
            host,
            repmgr(
                self.fleet,
                host,
                "node",
                "rejoin",
                "-d",
                self._repmgr_record(primary).conninfo,
                "--force-rewind",
                "--verbose",
            ),
            "repmgr node rejoin",
            timeout=REJOIN_TIMEOUT,
        )
        rewound = "rewinding from last common checkpoint" in output or "servers diverged" in output
        return "pg_rewind rewound it" if rewound else "no rewind needed"

    def restore_archive_command(self, node: str) -> str:
        from igops.pg.archive import alter_system_sql, wanted_settings
        from igops.pg.cluster import cluster_of

        wanted = wanted_settings(self.fleet, cluster_of(self.fleet, node), self._host(node))["archive_command"]
        connection = postgres.connect(self.fleet, self._host(node))
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW archive_command")
                row = cursor.fetchone()
                assert row is not None  # SHOW returns one row
                if row[0] == wanted:
                    return "its own already"
                cursor.execute(alter_system_sql("archive_command", wanted))
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            connection.close()
        return "set back to its own"

    def follow(self, node: str, primary: str) -> None:
        host = self._host(node)
        upstream = self._repmgr_record(primary)
        ssh_ok(
            self.fleet,
            host,
            repmgr(self.fleet, host, "standby", "follow", f"--upstream-node-id={upstream.node_id}"),
            "repmgr standby follow",
            timeout=REJOIN_TIMEOUT,
        )

    def streaming_replica(self, node: str, primary: str) -> postgres.Replica | None:
        """`node` as `primary` sees it if it streams from it now (by name or address)."""
        try:
            connection = postgres.connect(self.fleet, self._host(primary))
        except postgres.Unavailable:
            return None
        try:
            replicas = postgres.server_state(connection).replicas
        except postgres.Unavailable:
            return None
        finally:
            connection.close()
        address = str(self._host(node).address)
        streaming = [r for r in replicas if r.state == "streaming" and (r.name == node or r.address == address)]
        return streaming[0] if streaming else None

    def wait_streaming(self, node: str, primary: str) -> str:
        deadline = time.monotonic() + STREAMING_TIMEOUT
        while True:
            replica = self.streaming_replica(node, primary)
            if replica is not None:
                return f"streaming, replayed up to {lsn_text(replica.replay_lsn)}"
            if time.monotonic() > deadline:
                raise IgopsError(
                    f"{node} does not stream from {primary} after {STREAMING_TIMEOUT:g} s", f"see {node}'s Postgres log"
                )
            time.sleep(0.2)


class WalRetentionActions:
    """The WAL a rejoin needs, reserved and released (mixed into igops.pg.actions.PgActions:
    `fleet`, `_host` and `session` are PgActions'; `_slot_of` is its own)."""

    fleet: Fleet

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

        def session(self, node: str) -> Connection: ...

    def _slot_of(self, cursor: Cursor, node: str) -> str:
        cursor.execute("SELECT slot_name FROM repmgr.nodes WHERE node_name = %s", (node,))
        row = cursor.fetchone()
        if not row or not row[0]:
            raise IgopsError(
                f"repmgr's metadata names no replication slot for {node}",
                "set use_replication_slots in repmgr.conf and re-register the member",
            )
        slot: str = row[0]
        return slot

    def reserve_rejoin_wal(self, node: str, for_node: str) -> str:
        # On the candidate's session kept for the plan, opened before writes paused.
        with self.session(node).cursor() as cursor:
            slot = self._slot_of(cursor, for_node)
            cursor.execute("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cursor.fetchone()
            if row is None:
                cursor.execute("SELECT lsn::text FROM pg_create_physical_replication_slot(%s, true)", (slot,))
                created = cursor.fetchone()
                assert created is not None  # the function returns one row
                return f"{slot} holds WAL from {created[0]}"
            return f"{slot} exists already (from {row[0] or 'no position'})"

    def drop_rejoin_reservation(self, node: str, for_node: str) -> str:
        connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        try:
            with connection.cursor() as cursor:
                slot = self._slot_of(cursor, for_node)
                cursor.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
                return f"dropped {slot}" if cursor.rowcount else f"{slot}: none inactive"
        finally:
            connection.close()

    def release_switch_segment(self, primary: str, standbys: tuple[str, ...] = ()) -> str:
        """A promotion copies the segment it happened in onto the new timeline, and Postgres
        removes segments by number whatever their timeline: while the WAL stays in that segment
        (an idle cluster), checkpoints keep every timeline's copy, 16 MB per promotion on each
        member. So: end the segment; wait until the standbys' slots have moved past it (a slot
        holds back what its standby has not flushed); CHECKPOINT; then a restartpoint on each
        standby once it has replayed that checkpoint. `wal_keep_size` keeps every timeline's
        copies of its last segments as well: the copies go when the WAL moves past it."""
        deadline = time.monotonic() + STREAMING_TIMEOUT
        connection = postgres.connect(self.fleet, self._host(primary), statement_timeout_ms=None)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_switch_wal()")
                cursor.execute("SELECT pg_current_wal_lsn()::text")
                row = cursor.fetchone()
                assert row is not None  # a SELECT without FROM returns one row
                _wait_until(
                    cursor,
                    "SELECT NOT EXISTS (SELECT FROM pg_replication_slots WHERE active AND "
                    "slot_type = 'physical' AND restart_lsn < %s::pg_lsn)",
                    row[0],
                    deadline,
                    f"the standbys' slots on {primary} did not move past the switched segment",
                )
                cursor.execute("CHECKPOINT")
                cursor.execute("SELECT pg_current_wal_lsn()::text")
                row = cursor.fetchone()
                assert row is not None  # a SELECT without FROM returns one row
                checkpointed: str = row[0]
                counts = [f"{primary} {_wal_segments(cursor)}"]
        finally:
            connection.close()
        for standby in standbys:
            connection = postgres.connect(self.fleet, self._host(standby), statement_timeout_ms=None)
            try:
                with connection.cursor() as cursor:
                    _wait_until(
                        cursor,
                        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                        checkpointed,
                        deadline,
                        f"{standby} did not replay {primary}'s checkpoint",
                    )
                    cursor.execute("CHECKPOINT")
                    counts.append(f"{standby} {_wal_segments(cursor)}")
            finally:
                connection.close()
        return "WAL segments left: " + ", ".join(counts)


def _wait_until(cursor: Cursor, query: str, position: str, deadline: float, what: str) -> None:
    while True:
        cursor.execute(query, (position,))
        row = cursor.fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        if row[0]:
            return
        if time.monotonic() > deadline:
            raise IgopsError(
                f"{what} ({position}) within {STREAMING_TIMEOUT:g} s",
                "see `igops pg status`; the old timelines' segments go once the WAL moves on",
            )
        time.sleep(0.1)


def _wal_segments(cursor: Cursor) -> int:
    cursor.execute("SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'")
    row = cursor.fetchone()
    assert row is not None  # count(*) returns one row
    count: int = row[0]
    return count
