"""Applying a Postgres plan: `PgActions`, the actions its steps name, composed of one mixin per
concern (PgBouncer, the old and new primary, standbys, repmgrd, a standby's rebuild from a
snapshot group), and `apply_pg`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops import postgres, remote
from igops.bouncer_watchdog import PauseWatchdogs
from igops.operations.steps import StepReport, execute
from igops.output import Reporter
from igops.pg.bouncer_actions import BouncerActions
from igops.pg.cluster import cluster_of, describe_left_behind, pg_status
from igops.pg.plans import PgPlan
from igops.pg.primary_actions import FencingActions, PromotionActions
from igops.pg.rebuild_actions import RebuildActions
from igops.pg.repmgrd import RepmgrdActions
from igops.pg.standby_actions import RejoinActions, WalRetentionActions

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet


@dataclass
class PgResult:
    operation: str
    cluster: str
    old_primary: str | None
    new_primary: str | None
    write_pause_ms: float | None  # from PgBouncer pausing the cluster's databases to resuming them
    bytes_at_risk: int | None
    steps: list[StepReport]
    not_followed: dict[str, str]  # the plan's: members left to `igops pg rejoin`, each with why


class PgActions(
    BouncerActions, FencingActions, PromotionActions, RejoinActions, WalRetentionActions, RepmgrdActions, RebuildActions
):
    """The actions a Postgres plan's steps name, with what they learn along the way."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.wal_end: int | None = None
        self.promote_requested: set[str] = set()  # members asked to promote: only a stopped one is known not to
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        # PgBouncer host -> its databases file, read before writes are paused so that the pause
        # holds only the write
        self.databases_files: dict[str, str] = {}
        # PgBouncer host -> the plan's client of its admin console (BouncerActions).
        self.bouncers: dict[str, postgres.Bouncer] = {}
        # member -> a connection to its repmgr database kept for the plan (session()).
        self._sessions: dict[str, Connection] = {}
        # Armed before every PAUSE, released by the RESUME: a pause never outlives igops by more
        # than [pgbouncer] watchdog_deadline (igops/bouncer_watchdog.py).
        self.watchdogs = PauseWatchdogs(fleet)

    def _host(self, name: str) -> Any:
        return self.fleet.host(name)

    def session(self, node: str) -> Connection:
        """A connection to `node`'s repmgr database kept for the rest of the plan: the
        switchover's candidate gets one before writes pause, and the wait for its WAL, the
        reservation of the old primary's and the promotion reuse it instead of logging in while
        writes wait. One that broke since is replaced. Callers do not close it; close() does."""
        import psycopg2

        kept = self._sessions.get(node)
        if kept is not None:
            try:
                with kept.cursor() as cursor:
                    cursor.execute("SELECT 1")
                return kept
            except psycopg2.Error:
                kept.close()
        self._sessions[node] = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        return self._sessions[node]

    def close(self) -> None:
        """The kept connections and admin console sessions."""
        for connection in self._sessions.values():
            connection.close()
        self._sessions.clear()
        for bouncer in self.bouncers.values():
            bouncer.close()

    def _cluster_of(self, name: str) -> str:
        return cluster_of(self.fleet, name)


def apply_pg(fleet: Fleet, plan: PgPlan, reporter: Reporter = Reporter()) -> PgResult:
    actions = PgActions(fleet)
    # One SSH connection per member and PgBouncer host for the whole plan: the steps inside the
    # write pause run over connections opened before it.
    with remote.keep_connections():
        try:
            reports = execute(
                plan.actions,
                actions,
                reporter,
                plan.failure_hint,
                left_behind=lambda: describe_left_behind(pg_status(fleet, plan.cluster)),
            )
        finally:
            actions.close()
    pause_ms = (
        (actions.resumed_at - actions.paused_at) * 1000
        if actions.paused_at is not None and actions.resumed_at is not None
        else None
    )
    return PgResult(
        plan.operation,
        plan.cluster,
        plan.old_primary,
        plan.new_primary,
        round(pause_ms, 1) if pause_ms is not None else None,
        plan.bytes_at_risk,
        reports,
        plan.not_followed,
    )
