"""What the steps of one shard move share: the move's plan, the autocommit connections to the
source's and the target's primaries (opened on first use), the reporter, the `--pause-after`
stop, and what each step leaves for its journal entry."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from igops.output import Reporter
from igops.postgres_admin import connect
from igops.shard_move_steps import MovePlan

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet


class MoveSession:
    def __init__(self, fleet: Fleet, plan: MovePlan, reporter: Reporter, pause_after: str | None):
        self.fleet = fleet
        self.plan = plan
        self.reporter = reporter
        self.pause_after = pause_after
        self.database = fleet.model.postgres.database
        self._source: Connection | None = None
        self._target: Connection | None = None
        self.result_fields: dict[str, Any] = {}

    # Connections to the primaries, autocommit, opened on first use, and again after one broke
    # (the cut-over's watchdog cuts them when a server stops answering). They run the long waits
    # of a move too (a catch-up, a decode of all the WAL since the verification, through a
    # network blip): the cut-over's deadline is theirs only while it holds the shard's writes
    # (igops.postgres_deadline.session_deadline).
    @property
    def source(self) -> Connection:
        if self._source is None or self._source.closed:
            self._source = connect(self.fleet, self.plan.source, self.database, autocommit=True, purpose="move")
        return self._source

    @property
    def target(self) -> Connection:
        if self._target is None or self._target.closed:
            self._target = connect(self.fleet, self.plan.target, self.database, autocommit=True, purpose="move")
        return self._target

    def close(self) -> None:
        for connection in (self._source, self._target):
            if connection is not None:
                connection.close()

    def pause(self, point: str) -> None:
        if self.pause_after == point:
            self.reporter.log(
                f"paused after {point} (--pause-after): kill igops now to rehearse a crash here; "
                f"then `igops shard move --resume {self.plan.move_id}` or `--abort {self.plan.move_id}`"
            )
            threading.Event().wait()


class SessionPart:
    """A piece of a move that works within its session (the copy, the cut-over): the session's
    fleet, plan, database and reporter at hand."""

    def __init__(self, session: MoveSession):
        self.session = session
        self.fleet = session.fleet
        self.plan = session.plan
        self.database = session.database
        self.reporter = session.reporter
