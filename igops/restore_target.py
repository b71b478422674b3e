"""Where a point-in-time restore goes: the target (a time, an LSN, or the latest archived WAL),
the snapshot group it starts from, and the recovery settings that take it there.

A group can serve a target only from the point it is consistent at (igops.snapshot_wal): for a
time, when its backup ended; for an LSN, its end position. Of the groups that can, the newest
is chosen, so the least WAL is replayed. A target earlier than every retained group, or later
than the archive reaches, is refused with the range that is available: a restore that stopped
short would look like success.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from igops.errors import RefusedError, UsageError
from igops.postgres import format_lsn, parse_lsn

if TYPE_CHECKING:
    from igops.snapshot import SnapshotGroup

TIME, LSN, LATEST = "time", "lsn", "latest"


@dataclass(frozen=True)
class RecoveryTarget:
    kind: str  # TIME, LSN or LATEST
    time: datetime | None = None
    lsn: str | None = None

    def describe(self) -> str:
        if self.kind == TIME:
            assert self.time is not None  # parse_target sets it for TIME
            return f"{self.time.isoformat(timespec='seconds')}"
        if self.kind == LSN:
            return f"LSN {self.lsn}"
        return "the end of the archived WAL"

    def settings(self) -> dict[str, str]:
        """Postgres' recovery settings for the target; the restored copy then promotes itself (it
        is a copy to read and check, never a member: it follows no one)."""
        settings = {"recovery_target_timeline": "latest", "recovery_target_action": "promote"}
        if self.kind == TIME:
            assert self.time is not None  # parse_target sets it for TIME
            settings["recovery_target_time"] = self.time.isoformat(sep=" ")
        elif self.kind == LSN:
            assert self.lsn is not None  # parse_target sets it for LSN
            settings["recovery_target_lsn"] = self.lsn
        return settings


def parse_target(time: str | None, lsn: str | None, latest: bool) -> RecoveryTarget:
    """Exactly one of --time, --lsn and --latest. A time without a zone is UTC, as every time
    igops prints is."""
    given = [name for name, value in (("--time", time), ("--lsn", lsn), ("--latest", latest)) if value]
    if len(given) != 1:
        raise UsageError(
            "a point-in-time restore takes one target" + (f", not {' and '.join(given)}" if given else ""),
            "pass --time 'YYYY-MM-DD HH:MM:SS' (UTC unless it names a zone), --lsn X/Y or --latest",
        )
    if time:
        try:
            parsed = datetime.fromisoformat(time.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--time {time!r} is not a date and time",
                "write it as 'YYYY-MM-DD HH:MM:SS', e.g. '2026-12-04 14:02:00'",
            ) from None
        return RecoveryTarget(TIME, time=parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    if lsn:
        try:
            return RecoveryTarget(LSN, lsn=format_lsn(parse_lsn(lsn)))
        except ValueError:
            raise UsageError(
                f"--lsn {lsn!r} is not an LSN", "write it as Postgres prints one, e.g. 16/B374D848"
            ) from None
    return RecoveryTarget(LATEST)


def choose_group(groups: list[SnapshotGroup], cluster: str, target: RecoveryTarget) -> SnapshotGroup:
    """The newest complete group of `cluster` consistent at or before the target."""
    marked = [group for group in groups if group.state == "complete" and group.wal and group.wal.cluster == cluster]
    if not marked:
        raise RefusedError(
            f"no complete snapshot group of a member of {cluster} records its WAL position",
            f"take one with `igops snapshot create <a standby of {cluster}>` (with [archive] set, a member's "
            "group records it)",
        )

    def usable(group: SnapshotGroup) -> bool:
        assert group.wal is not None  # marked holds groups with a mark only
        if target.kind == TIME:
            assert target.time is not None
            return group.wal.ended_at <= target.time
        if target.kind == LSN:
            assert target.lsn is not None
            return parse_lsn(group.wal.end) <= parse_lsn(target.lsn)
        return True

    candidates = [group for group in marked if usable(group)]
    if not candidates:
        oldest = min(marked, key=_end_of)
        assert oldest.wal is not None
        raise RefusedError(
            f"{target.describe()} is before every retained snapshot group of {cluster} is consistent: the "
            f"oldest, {oldest.group_id}, is consistent from {oldest.wal.ended_at.isoformat(timespec='seconds')} "
            f"(LSN {oldest.wal.end})",
            "restore to that point or later; the groups before it were pruned",
        )
    return max(candidates, key=_end_of)


def _end_of(group: SnapshotGroup) -> tuple[datetime, int]:
    assert group.wal is not None  # only marked groups are compared
    return group.wal.ended_at, parse_lsn(group.wal.end)


def refuse_past_archive(target: RecoveryTarget, archived_until: datetime | None, last_segment: str | None) -> None:
    """A time target later than the newest archived segment cannot be reached: replay would end
    earlier than asked (Postgres promotes at the end of the WAL it finds, and says nothing)."""
    if target.kind != TIME:
        return
    assert target.time is not None
    if archived_until is None:
        raise RefusedError(
            "nothing is archived yet for this cluster, so no point in time can be reached",
            "check `igops pg archive status`",
        )
    if target.time > archived_until:
        raise RefusedError(
            f"{target.describe()} is after the archive reaches: WAL is archived up to "
            f"{archived_until.isoformat(timespec='seconds')} ({last_segment})",
            "restore to that time or earlier, or pass --latest for all that is archived",
        )
