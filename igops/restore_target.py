"""Where a point-in-time restore goes: the target (a time, an LSN, or the latest archived WAL),
the snapshot group it starts from, and the recovery settings that take it there.

A group can serve a target only from the point it is consistent at (igops.snapshot_wal): for a
time, when its backup ended; for an LSN, its end position. Of the groups that can, the newest
is chosen, so the least WAL is replayed. A target earlier than every retained group, or later
than the archive reaches, is refused with the range that is available: a restore that stopped
short would look like success.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from igops.errors import RefusedError, UsageError
from igops.postgres import format_lsn, parse_lsn

if TYPE_CHECKING:
    from igops.snapshot_groups import SnapshotGroup
    from igops.snapshot_wal import WalMark

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


@dataclass
class Recovery:
    """How a restored copy gets from its group to the target: the group's backup_label, and
    restore_command fetching the cluster's archived WAL through a pgBackRest config of its own."""

    cluster: str
    stanza: str
    target: RecoveryTarget
    mark: WalMark
    config_file: str  # in the restored copy's run directory, removed with it

    def restore_command(self) -> str:
        return shlex.join(["pgbackrest", f"--config={self.config_file}", f"--stanza={self.stanza}"]) + (
            ' archive-get %f "%p"'
        )

    def settings(self) -> dict[str, str]:
        return {"restore_command": self.restore_command(), **self.target.settings()}


def recovery_files_script(recovery: Recovery, data_directory: str, os_user: str) -> str:
    """Shell for the host: the backup_label where pg_backup_stop said, and recovery.signal
    (targeted recovery: the copy fetches archived WAL and never streams from a member)."""
    data, user = shlex.quote(data_directory), shlex.quote(os_user)
    return "\n".join(
        [
            "set -e",
            f"printf '%s' {shlex.quote(recovery.mark.label)} > {data}/backup_label",
            f": > {data}/recovery.signal",
            f"chown {user} {data}/backup_label {data}/recovery.signal",
            f"chmod 0600 {data}/backup_label {data}/recovery.signal",
        ]
    )


def promoted_script(psql: str, alive: str, log: str, timeout: float) -> str:
    """Shell for the host: wait until the restored copy has reached its target and promoted.
    Recovery that cannot reach its target ends the server (FATAL): then `alive` (pg_ctl status)
    fails, and the log's tail says why."""
    quoted_log = shlex.quote(log)
    return "\n".join(
        [
            f"deadline=$(( $(date +%s) + {int(timeout)} ))",
            "while :; do",
            f"  state=$({psql} -XAtqc 'SELECT pg_is_in_recovery()' 2>/dev/null || true)",
            '  [ "$state" = f ] && exit 0',
            f"  if ! {alive}; then",
            f"    if grep -q 'recovery ended before configured recovery target was reached' {quoted_log}; then",
            "      echo 'the archive ends before the target: no transaction committed after it is archived"
            " (a quiet cluster, or WAL not yet archived); restore to an earlier time, or pass --latest' >&2",
            "    else",
            # The cause is the server's FATAL or PANIC line, not the shutdown lines after it.
            f"      echo 'the restored server stopped:' >&2; grep -E 'FATAL|PANIC' {quoted_log} | tail -n 2 >&2"
            f" || tail -n 5 {quoted_log} >&2",
            "    fi",
            "    exit 1",
            "  fi",
            '  if [ "$(date +%s)" -ge "$deadline" ]; then',
            f'    echo "still recovering after {int(timeout)} s" >&2; tail -n 3 {quoted_log} >&2; exit 1',
            "  fi",
            "  sleep 1",
            "done",
        ]
    )


@dataclass
class Reached:
    """What a recovery reached, from the restored server's log."""

    redo_done: str | None  # the last WAL position replayed
    last_transaction: str | None  # the commit time of the last transaction replayed
    stopped: str | None  # where it stopped for the target ("before commit of transaction …")


def reached_from_log(log: str) -> Reached:
    redo = re.findall(r"redo done at ([0-9A-F]+/[0-9A-F]+)", log)
    last = re.findall(r"last completed transaction was at log time (.+)$", log, re.MULTILINE)
    stopped = re.findall(r"recovery stopping (.+)$", log, re.MULTILINE)
    return Reached(
        redo[-1] if redo else None, last[-1].strip() if last else None, stopped[-1].strip() if stopped else None
    )


def replayed_bytes(mark: WalMark, reached: Reached) -> int | None:
    """The WAL replayed from the group's start to where recovery ended."""
    if reached.redo_done is None:
        return None
    return max(0, parse_lsn(reached.redo_done) - parse_lsn(mark.start))
