"""The steps that change which member is the primary: fence and stop the old one (and start it
again, as an undo, only once no other member is or can become a primary), then promote the
candidate and record it in repmgr's metadata.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops import postgres
from igops.errors import IgopsError, first_line
from igops.host_commands import connect_ahead, failure_reason, read_file, ssh, ssh_ok
from igops.pg.cluster import cluster_members, wal_received
from igops.pg.hostcmd import (
    POSTMASTER_RUNNING,
    as_postgres,
    data_directory,
    postgres_sh,
    repmgr,
    repmgr_argv,
)
from igops.pg.timeouts import CATCH_UP_TIMEOUT, PROMOTE_TIMEOUT, STOP_TIMEOUT
from igops.role_change import STREAMING_TIMEOUT

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet


def candidate_verdict(
    node: str, cluster: str, in_recovery: bool | None, asked: bool, checked: dict[str, str] | None, error: str | None
) -> str:
    """Whether a switchover's undo may start the old primary again, as far as `node` (a member
    that may have been promoted) goes: only if it verifiably is not a primary and cannot become
    one. `in_recovery`: what it answered (None: it did not); `asked`: a promotion was or may have
    been requested; `checked`: what the host said once its postmaster was stopped (None: not
    checked, `error` says why). Returns how it was verified; raises IgopsError otherwise."""
    if in_recovery is False:
        raise IgopsError(
            f"{node} accepts writes: it was promoted",
            f"`igops pg status {cluster}`; finish a switchover to it with `igops pg switchover {cluster} --to "
            f"{node}`, or make the old primary its standby with `igops pg rejoin`",
        )
    if in_recovery and not asked:
        return f"{node} is a standby nobody asked to promote"
    if checked is None:
        # Unreachable is unknown, never "still a standby": it may have been promoted.
        raise IgopsError(
            f"cannot tell whether {node} was promoted: {error or 'its host was not asked'}",
            f"when {node}'s host answers: `igops pg status {cluster}`, then `igops pg switchover "
            f"{cluster} --to NODE` finishes or rolls back",
        )
    if "postmaster" in checked:
        raise IgopsError(
            f"cannot tell whether {node} was promoted: its postmaster did not stop",
            f"stop it, then `igops pg status {cluster}`",
        )
    control = checked.get("control", "").strip()
    stopped = "stopped" in checked
    if control not in ("in archive recovery", "shut down in recovery"):
        raise IgopsError(
            f"{node} is not verifiably a standby: its control file says {control or 'nothing'!r}"
            + (" (igops stopped it)" if stopped else ""),
            f"if it was promoted, start it and finish with `igops pg switchover {cluster} --to {node}`",
        )
    return f"{node} " + ("stopped by igops" if stopped else "is down") + f", {control}, fenced"


# How often a promotion's end is looked for: a query on an open connection costs a fraction of a
# millisecond, and each wasted interval is time the fleet's writes wait.
PROMOTED_POLL_S = 0.005


def wait_promoted(cursor: Any, deadline: float) -> bool:
    """Whether the server the cursor is connected to left recovery before `deadline`."""
    while True:
        cursor.execute("SELECT pg_is_in_recovery()")
        row = cursor.fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        if not row[0]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(PROMOTED_POLL_S)


def in_recovery_now(fleet: Fleet, host: Any) -> bool | None:
    """Whether the member's Postgres is in recovery, or None if it does not answer."""
    try:
        connection = postgres.connect(fleet, host)
        try:
            return postgres.server_state(connection).in_recovery
        finally:
            connection.close()
    except postgres.Unavailable:
        return None


@dataclass
class OtherMembers:
    """What the other members of a cluster answered, asked at once: whether they accept writes."""

    writable: list[str]
    in_recovery: list[str]
    silent: list[str]  # did not answer

    def described(self, after: OtherMembers) -> str:
        """What this check before a promotion and `after` (of those in recovery before) found,
        none of them accepting writes."""
        parts = [
            f"{', '.join(names)} {said}"
            for names, said in (
                (after.in_recovery, "in recovery before and after"),
                (after.silent, "in recovery before, no answer after"),
                (self.silent, "did not answer"),
            )
            if names
        ]
        return "no other member accepts writes" + (f" ({'; '.join(parts)})" if parts else "")


def ask_members(fleet: Fleet, hosts: dict[str, Any]) -> OtherMembers:
    """Whether each member accepts writes (in_recovery_now), all asked at once; a query that
    fails counts as no answer."""
    import psycopg2

    def ask(host: Any) -> bool | None:
        try:
            return in_recovery_now(fleet, host)
        except psycopg2.Error:
            return None

    names = list(hosts)
    if not names:
        return OtherMembers([], [], [])
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="pg-ask") as pool:
        answers = dict(zip(names, pool.map(ask, hosts.values()), strict=True))
    return OtherMembers(
        [name for name, answer in answers.items() if answer is False],
        [name for name, answer in answers.items() if answer],
        [name for name, answer in answers.items() if answer is None],
    )


class FencingActions:
    """Fencing and stopping the old primary, and starting it again (mixed into
    igops.pg.actions.PgActions: `fleet`, `_host`, `_cluster_of`, `wal_end` and
    `promote_requested` are PgActions')."""

    fleet: Fleet
    wal_end: int | None
    promote_requested: set[str]

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

        def _cluster_of(self, name: str) -> str: ...

    def stop_and_fence(self, node: str) -> str:
        fleet = self.fleet
        host = self._host(node)
        data = data_directory(fleet, host)
        # The stop runs on in the background, and this waits only until the control file says
        # "shut down": the shutdown checkpoint is then the last WAL there is, and no client gets
        # in. What the postmaster does after it (hand the segment it ended to archive_command,
        # which pushes it to the repository, and pg_ctl's wait, looked at every 100 ms) is some
        # 0.4 s that writes would otherwise stay paused for. The rejoin, after the RESUME, waits
        # for the process to be gone (ensure_clean_shutdown), and so does an undo.
        # The fast shutdown starts with SIGINT to the postmaster, as `pg_ctl stop -m fast` sends
        # it: pg_ctl given a configuration directory first runs `postgres -C data_directory` to
        # find the data, some 40 ms of writes waiting. The stop command repmgr's `node service
        # --action=stop` would run (the service_stop_command of repmgr.conf when it names one in
        # plain quotes, which also tells a service manager; else repmgr's) runs right after it:
        # it may find the postmaster gone, so its failure counts only if the control file does
        # not say "shut down". The wait reads the control file's state word itself (a uint32 at
        # byte 16 since 9.0, 1 = shut down), one small process every 2 ms: pg_controldata and sed
        # each time took CPU from the shutdown on a busy host. pg_controldata's full reading
        # after it is what the step trusts.
        script = (
            'set -e; bin="$1"; data="$2"; wait="$3"; conf="$4"; shift 4; touch "$data/standby.signal"; '
            'cluster_state() { "$bin/pg_controldata" -D "$data" | sed -n "s/^Database cluster state: *//p"; }; '
            f"if {POSTMASTER_RUNNING}; then "
            'kill -INT "$(head -n 1 "$data/postmaster.pid")" 2>/dev/null || true; '
            'own=$(sed -n "s/^ *service_stop_command *= *\'\\([^\']*\\)\' *$/\\1/p" "$conf" 2>/dev/null | tail -n 1); '
            '[ -z "$own" ] || set -- sh -c "$own"; '
            'log=$(mktemp); setsid "$@" </dev/null >"$log" 2>&1 & stop=$!; '
            'while :; do state=$(od -An -tu4 -j16 -N4 "$data/global/pg_control"); '
            '[ "${state##* }" = 1 ] && break; '
            'kill -0 "$stop" 2>/dev/null || { wait "$stop" || { [ "$(cluster_state)" = "shut down" ] || '
            '{ cat "$log" >&2; rm -f "$log"; exit 1; }; }; break; }; '
            '[ "$wait" -le 0 ] && { echo "not shut down in time: $(cluster_state)" >&2; exit 1; }; '
            'wait=$((wait - 1)); sleep 0.002; done; rm -f "$log"; fi; '
            'control=$("$bin/pg_controldata" -D "$data"); printf "%s\\n" "$control"; echo "-- waldump"; '
            'at=$(printf "%s\\n" "$control" | sed -n "s/^Latest checkpoint location: *//p"); '
            'tli=$(printf "%s\\n" "$control" | sed -n "s/^Latest checkpoint.s TimeLineID: *//p"); '
            'size=$(printf "%s\\n" "$control" | sed -n "s/^Bytes per WAL segment: *//p"); ' + postgres.WALDUMP_TO_END
        )
        stop = repmgr_argv(fleet, host, "node", "service", "--action=stop")
        polls = str(int(STOP_TIMEOUT) * 500)  # of the control file, 2 ms apart
        output = ssh_ok(
            fleet,
            host,
            postgres_sh(
                fleet,
                script,
                fleet.model.postgres.bin_dir,
                data,
                polls,
                fleet.path_for(fleet.model.postgres.repmgr_config, host),
                *stop,
            ),
            "clean stop",
            timeout=STOP_TIMEOUT + 5,
        )
        control_text, _, dump = output.partition("-- waldump")
        control = postgres.parse_controldata(control_text)
        if control.get("Database cluster state") != "shut down":
            raise IgopsError(
                f"{node} did not shut down cleanly: {control.get('Database cluster state', 'state unknown')}"
            )
        self.wal_end = postgres.wal_end_from_waldump(dump, int(control.get("Bytes per WAL segment", 16 << 20)))
        if self.wal_end is None:
            raise IgopsError(f"cannot tell where {node}'s WAL ends: {dump.strip()[-200:]}")
        return f"shut down; WAL ends at {postgres.format_lsn(self.wal_end)}"

    # A candidate that does not answer as a primary: its postmaster is stopped (a promotion under
    # way dies with it), then its control file tells whether it was promoted. One still in
    # recovery is fenced and its promote request removed, so it can only come back a standby.
    _STOP_AND_READ_CONTROL = (
        'bin="$1"; data="$2"; '
        f"if {POSTMASTER_RUNNING}; then "
        '"$bin/pg_ctl" stop -D "$data" -m immediate -w -t 30 >/dev/null 2>&1 || '
        '{ echo "postmaster=still running"; exit 0; }; echo stopped=1; fi; '
        'state=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Database cluster state: *//p"); '
        'echo "control=$state"; case "$state" in "in archive recovery"|"shut down in recovery") '
        'touch "$data/standby.signal"; rm -f "$data/promote";; esac'
    )

    def _verify_not_promoted(self, node: str) -> str:
        """Raise unless `node` verifiably is not a primary and cannot become one; say how."""
        fleet = self.fleet
        host = self._host(node)
        data = data_directory(fleet, host)
        in_recovery = in_recovery_now(fleet, host)
        asked = node in self.promote_requested
        if in_recovery and not asked:
            # An interrupted run may have asked: pg_promote leaves a promote file until the
            # startup process takes it. Unknown counts as asked.
            asked = ssh(fleet, host, ["test", "-e", f"{data}/promote"], timeout=20).exit_code != 1
        checked, error = None, None
        if in_recovery is not False and (asked or not in_recovery):
            result = ssh(
                fleet,
                host,
                postgres_sh(fleet, self._STOP_AND_READ_CONTROL, fleet.model.postgres.bin_dir, data),
                timeout=60,
            )
            if result.ok:
                checked = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
            else:
                error = failure_reason(result)
        return candidate_verdict(node, self._cluster_of(node), in_recovery, asked, checked, error)

    # Shell, with "$bin" the bin_dir, "$data" the data directory, "$wait" seconds and repmgr's start
    # command as "$@": the old primary is unfenced and started only from the state its stop left,
    # which an undo run from the journal may find changed. A shutdown still under way (the status
    # line of postmaster.pid says "stopping": a stop cut off at its timeout goes on) is waited for.
    # A postmaster running as a primary (postmaster.pid says "ready" and its control file "in
    # production") is taken as started (an earlier try of this undo, or a stop cut off before it
    # began): the fence this run wrote goes, as no other member is a primary. A hot standby's
    # postmaster.pid says "ready" too (Postgres 10 on; "standby" is one with hot_standby off), its
    # control file "in archive recovery". Any other running postmaster keeps its
    # standby.signal: a standby (one rejoined since) would come back a primary at its next restart
    # without it. A control file in recovery is a standby's: it was rejoined since. Prints
    # "started", "running", or "found=" what it found.
    _START_IF_LEFT_STOPPED = (
        'bin="$1"; data="$2"; wait="$3"; shift 3; '
        f"while {POSTMASTER_RUNNING}; do "
        'status=$(sed -n 8p "$data/postmaster.pid" 2>/dev/null); status=${status%% *}; '
        'case "$status" in stopping) ;; '
        'ready) state=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Database cluster state: *//p"); '
        'case "$state" in "in production") rm -f "$data/standby.signal" && echo running; exit 0;; esac; '
        'echo "found=its postmaster running (ready, its control file saying ${state:-nothing})"; exit 0;; '
        '*) echo "found=its postmaster running (${status:-no status})"; exit 0;; esac; '
        '[ "$wait" -le 0 ] && { echo "still shutting down" >&2; exit 1; }; wait=$((wait - 1)); sleep 1; done; '
        'state=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Database cluster state: *//p"); '
        'case "$state" in ""|"in archive recovery"|"shut down in recovery") '
        'echo "found=its control file saying ${state:-nothing}"; exit 0;; esac; '
        'rm -f "$data/standby.signal" && echo started && exec "$@"'
    )

    def unfence_and_start(self, node: str, others: tuple[str, ...]) -> str:
        """Start the old primary again, only once no other member of its cluster is or can become
        a primary, and only from the state its stop left it in (after a shutdown still under way,
        a stop cut off at its timeout, has finished). `others`: the members to ask first."""
        fleet = self.fleet
        host = self._host(node)
        cluster = self._cluster_of(node)
        # `igops ops abort` may run this undo from the journal long after its run, whose arguments
        # name only that run's candidate: another member may have been promoted since (a failover
        # to it), so every member the inventory lists is asked.
        members = [*others, *(name for name in cluster_members(fleet, cluster) if name not in (node, *others))]
        verified = [self._verify_not_promoted(other) for other in members]
        output = ssh_ok(
            fleet,
            host,
            postgres_sh(
                fleet,
                self._START_IF_LEFT_STOPPED,
                fleet.model.postgres.bin_dir,
                data_directory(fleet, host),
                str(int(STOP_TIMEOUT) * 2),
                *repmgr_argv(fleet, host, "node", "service", "--action=start"),
            ),
            "start",
            timeout=STOP_TIMEOUT * 2 + 90,
        )
        said = output.split("\n", 1)[0].strip()
        if said.startswith("found="):
            raise IgopsError(
                f"{node} was not started again: found {said.removeprefix('found=')}, not stopped as the "
                "switchover left it; it is left as it is",
                f"`igops pg status {cluster}` says what it is; `igops pg rejoin {node}` makes it a standby "
                "of the primary",
            )
        started = f"{node} was running as the primary already" if said == "running" else f"{node} unfenced, started"
        return "; ".join([*verified, started, self._wait_writable(node)])

    def _wait_writable(self, node: str) -> str:
        """A started primary must take a write (an xid), not merely answer."""
        deadline = time.monotonic() + STREAMING_TIMEOUT
        last = "not tried"
        while time.monotonic() < deadline:
            try:
                connection = postgres.connect(self.fleet, self._host(node))
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_is_in_recovery()")
                        row = cursor.fetchone()
                        assert row is not None  # a SELECT without FROM returns one row
                        if row[0]:
                            last = "it is in recovery (read-only)"
                        else:
                            cursor.execute("SELECT txid_current()")
                            return f"{node} accepts writes"
                finally:
                    connection.close()
            except postgres.Unavailable as exc:
                last = exc.detail
            time.sleep(0.2)
        raise IgopsError(
            f"{node} was started but does not accept writes after {STREAMING_TIMEOUT:g} s: {last}",
            f"see {node}'s Postgres log",
        )

    def unfence(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(
            self.fleet,
            host,
            as_postgres(self.fleet, ["rm", "-f", f"{data_directory(self.fleet, host)}/standby.signal"]),
            "removing standby.signal",
        )

    # Shell, with "$bin" the bin_dir and "$data" the data directory: a failover's fence of the old
    # primary, in one script. standby.signal comes first: a postmaster started from then on (a
    # crashed primary's service manager restarts it after a few seconds; a reboot; a colleague)
    # comes up a standby. A postmaster running after that began before the fence, and may be a
    # primary (one that came back since the plan found it down): it is stopped at once
    # (immediate), before the repoint and the promotion, so that it never runs beside the new
    # primary. pg_ctl failing counts only while a postmaster still runs (one that exited meanwhile
    # leaves nothing to stop). Prints "found=" the status line of its postmaster.pid, then
    # "stopped=pg_ctl" or "stopped=exited", and "control=" what its control file says.
    _FENCE = (
        'bin="$1"; data="$2"; touch "$data/standby.signal" || exit 1; '
        f"if {POSTMASTER_RUNNING}; then "
        'status=$(sed -n 8p "$data/postmaster.pid" 2>/dev/null); status=${status%% *}; '
        'echo "found=${status:-no status}"; '
        'if out=$("$bin/pg_ctl" stop -D "$data" -m immediate -w -t 30 2>&1); then echo stopped=pg_ctl; '
        f"elif {POSTMASTER_RUNNING}; then "
        'printf "%s\\n" "$out" >&2; echo "its postmaster did not stop" >&2; exit 1; '
        "else echo stopped=exited; fi; fi; "
        '"$bin/pg_controldata" -D "$data" 2>/dev/null | sed -n "s/^Database cluster state: */control=/p"'
    )

    def fence(self, node: str, stop_first: bool) -> str:
        """Fence the old primary on disk, then stop its postmaster if one runs: `stop_first`, the
        plan found one running (hung, starting or stopping); else it found none, and one running
        now came back since. Says what it found and did."""
        fleet = self.fleet
        host = self._host(node)
        data = data_directory(fleet, host)
        output = ssh_ok(
            fleet,
            host,
            postgres_sh(fleet, self._FENCE, fleet.model.postgres.bin_dir, data),
            "fencing (standby.signal, then an immediate stop of a running postmaster)",
            timeout=60,
        )
        said = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        parts = [f"{data}/standby.signal written"]
        found = said.get("found")
        if found is None:
            parts.append("no postmaster running" + (" (the one the plan found had exited)" if stop_first else ""))
        else:
            did = "stopped it (immediate)" if said.get("stopped") == "pg_ctl" else "it exited meanwhile"
            if stop_first:
                parts.append(f"its postmaster ran (postmaster.pid: {found}): {did}")
            else:
                parts.append(
                    f"FOUND ITS POSTMASTER RUNNING (postmaster.pid: {found}), which the plan found down: it "
                    f"came back since; {did}"
                )
        control = said.get("control", "").strip()
        if control:
            parts.append(f"its control file says {control}")
        return "; ".join(parts)


class PromotionActions:
    """Promoting the candidate (mixed into igops.pg.actions.PgActions: `fleet`, `_host`,
    `_cluster_of`, `session`, `wal_end` and `promote_requested` are PgActions')."""

    fleet: Fleet
    wal_end: int | None
    promote_requested: set[str]

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

        def session(self, node: str) -> Connection: ...

        def _cluster_of(self, name: str) -> str: ...

    def checkpoint_before_stop(self, node: str, candidate: str) -> None:
        """A switchover's CHECKPOINT, the SSH login its stop will use and the candidate's
        session (for the wait for its WAL, the reservation and the promotion), made now and kept
        (apply_pg): no login while writes are paused."""
        connect_ahead(self.fleet, [self._host(node)])
        self.session(candidate)
        self.checkpoint(node)

    def checkpoint(self, node: str) -> None:
        connection = postgres.connect(self.fleet, self._host(node), statement_timeout_ms=None)
        try:
            with connection.cursor() as cursor:
                cursor.execute("CHECKPOINT")
        finally:
            connection.close()

    def resume_replay(self, node: str) -> None:
        connection = postgres.connect(self.fleet, self._host(node))
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_wal_replay_resume()")
        finally:
            connection.close()

    def wait_received(self, node: str) -> str:
        connection = self.session(node)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:
            # Replayed counts too: a standby restarted since reports nothing received.
            received = wal_received(postgres.server_state(connection))
            if self.wal_end is not None and received >= self.wal_end:
                return f"received up to {postgres.format_lsn(received)}"
            if time.monotonic() > deadline:
                raise IgopsError(
                    f"{node} received WAL only up to {postgres.format_lsn(received)}, the old "
                    f"primary's ends at {postgres.format_lsn(self.wal_end or 0)}"
                )
            time.sleep(0.01)

    def promote(self, node: str, alone: bool = False) -> str:
        """Promote `node` and wait until it accepts writes. `alone`: repmgrd was paused while no
        member was a primary (a failover; a switchover resumed after its stop), and it reads its
        pause flag only before it begins a failover of its own: one under way then may promote
        another standby. So every other member of the cluster is asked first, and the promotion
        is refused if one accepts writes; and asked again once `node` is promoted, which fails
        loudly, naming it, if one accepts writes too."""
        import psycopg2

        before = self._other_members(node) if alone else None
        if before is not None and before.writable:
            cluster, first = self._cluster_of(node), before.writable[0]
            raise IgopsError(
                f"{node} was not promoted: {', '.join(before.writable)} accepts writes already (repmgrd, or "
                "someone, promoted it meanwhile)",
                f"`igops pg status {cluster}`; to keep {first} as the primary, `igops pg switchover {cluster} "
                f"--to {first}` finishes that failover (repoints PgBouncer to it, rejoins the others)",
            )
        self.promote_requested.add(node)
        started = time.monotonic()
        try:
            with self.session(node).cursor() as cursor:
                # Not pg_promote(true): it looks whether recovery ended every 100 ms, and writes
                # are paused meanwhile; this asks every few ms.
                cursor.execute("SELECT pg_promote(false)")
                promoted = wait_promoted(cursor, time.monotonic() + PROMOTE_TIMEOUT)
        except (postgres.Unavailable, psycopg2.Error) as exc:
            raise IgopsError(
                f"{node} did not promote: {first_line(exc)}; {self.log_cause(node)}", f"see {node}'s Postgres log"
            ) from None
        if not promoted:
            raise IgopsError(
                f"{node} did not finish promoting within {PROMOTE_TIMEOUT} s; {self.log_cause(node)}",
                f"see {node}'s Postgres log",
            )
        done = f"promoted in {(time.monotonic() - started) * 1000:.0f} ms"
        if before is None:
            return done
        # repmgrd promotes a standby that runs: those that answered in recovery are asked again.
        after = self._other_members(node, before.in_recovery)
        if after.writable:
            cluster = self._cluster_of(node)
            raise IgopsError(
                f"SPLIT BRAIN: {node} was promoted, and {', '.join(after.writable)} accepts writes too "
                "(repmgrd, or someone, promoted it meanwhile)",
                f"`igops pg status {cluster}`: stop the member whose writes may be lost, then `igops pg rejoin` it "
                "with --accept-risk (it loses what it took alone)",
            )
        return f"{done}; {before.described(after)}"

    def _other_members(self, node: str, names: list[str] | None = None) -> OtherMembers:
        """What the other members of `node`'s cluster (or `names`) answer."""
        if names is None:
            names = [name for name in cluster_members(self.fleet, self._cluster_of(node)) if name != node]
        return ask_members(self.fleet, {name: self._host(name) for name in names})

    def promoted(self, node: str) -> str:
        """What shows a promotion cut off after it was asked completed anyway, or ''. A member
        that does not answer is no proof: the old primary's undo stops it and reads its control
        file before it starts anything."""
        in_recovery = in_recovery_now(self.fleet, self._host(node))
        return f"{node} is out of recovery: it was promoted" if in_recovery is False else ""

    def log_cause(self, node: str) -> str:
        """The last PANIC, FATAL or ERROR in a member's Postgres log, and where that log is: the
        `-l` file of repmgr's service_start_command, else the newest file of the logging collector."""
        fleet = self.fleet
        host = self._host(node)
        data = data_directory(fleet, host)
        try:
            path = postgres.log_file_of(
                read_file(fleet, host, fleet.path_for(fleet.model.postgres.repmgr_config, host))
            )
            script = (
                'if [ -n "$1" ]; then log="$1"; else log=$(ls -t "$2"/log/* "$2"/pg_log/* 2>/dev/null '
                '| head -n 1); fi; [ -n "$log" ] || exit 3; echo "$log"; tail -n 300 "$log"'
            )
            output = ssh_ok(
                fleet,
                host,
                postgres_sh(fleet, script, path or "", data),
                "reading its log",
                timeout=30,
            )
        except IgopsError as exc:
            return f"its log could not be read ({exc.one_line()})"
        path, _, text = output.partition("\n")
        cause = postgres.log_cause(text, since="received promote request")
        return f"its log ({path}) says: {cause}" if cause else f"its log ({path}) names no error"

    def register_primary(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(self.fleet, host, repmgr(self.fleet, host, "primary", "register", "--force"), "repmgr primary register")
