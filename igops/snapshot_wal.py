"""The WAL a Postgres member's snapshot group needs: `pg_backup_start` before the freeze,
`pg_backup_stop` after the thaw, and what they return kept in the group's tags.

Why a backup and not just the position at the freeze: the frozen volumes are crash-consistent at
one instant, but a restore that replays archived WAL to a recovery target may stop before the
point the data files already reached (a page the snapshot holds was written after the checkpoint
replay starts from). The backup_label `pg_backup_stop` returns names the checkpoint to start from,
and with it Postgres refuses to call the copy consistent before the backup's end: for a standby,
the minimum recovery point its pg_control holds in the snapshot. That is the route Barman's
snapshot backups take too. The label (about 250 bytes) is kept base64-encoded over tags, which
hold 256 characters each: the group then needs nothing outside EBS to be restored.

Snapshots are taken of standbys (igops.snapshot refuses a live primary unless told): a standby
runs non-exclusive backups, and its `pg_backup_start` is a restartpoint, not a checkpoint.
A run killed between the two calls leaves nothing behind: Postgres ends a backup whose session
ends.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet

TAG_WAL_START = "igops:wal-start"  # the backup's start: its checkpoint's redo position
TAG_WAL_END = "igops:wal-end"  # where the group is consistent once replay reaches it
TAG_TIMELINE = "igops:timeline"
TAG_WAL_END_AT = "igops:wal-end-at"  # when pg_backup_stop returned: no recovery target may be earlier
TAG_CLUSTER = "igops:pg-cluster"
TAG_LABEL = "igops:backup-label-"  # + 0, 1, …: the backup_label, base64, in pieces
LABEL_PIECE = 250
# A standby's pg_backup_start waits for a restartpoint: bounded, so that a stuck one fails the
# create before anything is frozen.
BACKUP_START_TIMEOUT_MS = 120_000
# How long a standby may take to replay the primary's fresh checkpoint; past it, the group starts
# from the restartpoint the standby can make (a longer replay, not a wrong one).
REPLAY_WAIT_S = 10.0


@dataclass(frozen=True)
class WalMark:
    """What a group needs from the WAL archive: replay from `start`, consistent at `end`."""

    cluster: str
    start: str
    end: str
    timeline: int
    label: str  # the backup_label file, as pg_backup_stop returned it
    ended_at: datetime  # the group is consistent by then, so a restore to a time before it cannot be

    def tags(self) -> dict[str, str]:
        encoded = base64.b64encode(self.label.encode()).decode()
        pieces = [encoded[at : at + LABEL_PIECE] for at in range(0, len(encoded), LABEL_PIECE)]
        return {
            TAG_CLUSTER: self.cluster,
            TAG_WAL_START: self.start,
            TAG_WAL_END: self.end,
            TAG_TIMELINE: str(self.timeline),
            TAG_WAL_END_AT: self.ended_at.isoformat(timespec="milliseconds"),
            **{f"{TAG_LABEL}{index}": piece for index, piece in enumerate(pieces)},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "start": self.start,
            "end": self.end,
            "timeline": self.timeline,
            "ended_at": self.ended_at,
        }


def from_tags(tags: dict[str, str]) -> WalMark | None:
    """The mark a snapshot's tags carry, or None (a group taken without one, or of no member)."""
    if not all(tags.get(key) for key in (TAG_CLUSTER, TAG_WAL_START, TAG_WAL_END, TAG_TIMELINE, TAG_WAL_END_AT)):
        return None
    pieces = []
    index = 0
    while f"{TAG_LABEL}{index}" in tags:
        pieces.append(tags[f"{TAG_LABEL}{index}"])
        index += 1
    return WalMark(
        tags[TAG_CLUSTER],
        tags[TAG_WAL_START],
        tags[TAG_WAL_END],
        int(tags[TAG_TIMELINE]),
        base64.b64decode("".join(pieces)).decode() if pieces else "",
        datetime.fromisoformat(tags[TAG_WAL_END_AT]),
    )


def label_timeline(label: str) -> int:
    """The timeline a backup_label says its backup started on."""
    found = re.search(r"^START TIMELINE: (\d+)$", label, re.MULTILINE)
    if not found:
        raise IgopsError("pg_backup_stop returned a backup_label without START TIMELINE", "report it as a bug")
    return int(found.group(1))


def cluster_of(fleet: Fleet, host_name: str) -> str | None:
    """The Postgres cluster the host is a member of, per the inventory."""
    for name, cluster in fleet.model.postgres.clusters.items():
        if host_name == cluster.primary or host_name in cluster.standbys:
            return name
    return None


def fresh_checkpoint(fleet: Fleet, primary: str, standby: str) -> str:
    """CHECKPOINT on the primary, then wait until the standby has replayed that checkpoint's
    record: its pg_backup_start makes its restartpoint there, so the group's WAL starts now."""
    from igops import postgres

    connection = postgres.connect(fleet, fleet.host(primary), statement_timeout_ms=None)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")
            cursor.execute("SELECT checkpoint_lsn::text FROM pg_control_checkpoint()")
            row = cursor.fetchone()
            assert row is not None  # a function call returns one row
            checkpoint = str(row[0])
    finally:
        connection.close()
    started = time.monotonic()
    connection = postgres.connect(fleet, fleet.host(standby))
    try:
        with connection.cursor() as cursor:
            # Past the record's start: the last replayed position is where a record ends.
            while True:
                cursor.execute("SELECT pg_last_wal_replay_lsn() > %s::pg_lsn", (checkpoint,))
                row = cursor.fetchone()
                if row is not None and row[0]:
                    waited = (time.monotonic() - started) * 1000
                    return f"checkpoint at {checkpoint}, replayed on {standby} in {waited:.0f} ms"
                if time.monotonic() - started > REPLAY_WAIT_S:
                    raise IgopsError(
                        f"{standby} had not replayed {primary}'s checkpoint at {checkpoint} within {REPLAY_WAIT_S:g} s",
                        f"see `igops pg status` for {standby}'s replay lag",
                    )
                time.sleep(0.02)
    finally:
        connection.close()


class Backup:
    """One non-exclusive backup on a member, held open by its own session from `start` to
    `stop` (the session that starts it must stop it)."""

    def __init__(self, fleet: Fleet, host_name: str, cluster: str, label: str):
        self.fleet, self.host_name, self.cluster, self.label = fleet, host_name, cluster, label
        self.connection: Connection | None = None
        self.started: str | None = None

    def start(self) -> str:
        from igops import postgres

        self.connection = postgres.connect(
            self.fleet, self.fleet.host(self.host_name), statement_timeout_ms=BACKUP_START_TIMEOUT_MS
        )
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_backup_start(%s, true)::text", (self.label,))
            row = cursor.fetchone()
            assert row is not None  # a function call returns one row
            self.started = str(row[0])
        return self.started

    def stop(self) -> WalMark:
        assert self.connection is not None and self.started is not None  # start() came first
        with self.connection.cursor() as cursor:
            # On a standby there is nothing to wait for: it archives nothing.
            cursor.execute("SELECT lsn::text, labelfile FROM pg_backup_stop(false)")
            row = cursor.fetchone()
            assert row is not None  # a function call returns one row
        end, label = str(row[0]), str(row[1])
        self.close()
        return WalMark(self.cluster, self.started, end, label_timeline(label), label, datetime.now(UTC))

    def close(self) -> None:
        """Ends the session, and with it a backup not stopped."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
