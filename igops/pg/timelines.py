"""Timelines, for the plans that promote a member or point members at a primary. An LSN names a
byte of one history: WAL on a timeline past the point where a later timeline forked from it is
on no history of that later one, so positions compare only along one history. Here: which
timeline a standby is on, a timeline's history (where each timeline before it ended), whether a
member can follow a primary (`repmgr standby follow`) or needs `igops pg rejoin` (pg_rewind),
and how much of an old primary's WAL a candidate lacks when their timelines differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from igops import postgres

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet
    from igops.pg.hostcmd import WalEnd

# A history file holds a line per timeline before its own: a few dozen bytes each.
HISTORY_MAX_BYTES = 1 << 20


def parse_history(text: str) -> dict[int, int]:
    """A timeline history file (`pg_wal/0000000N.history`): each timeline before N -> the LSN
    where the history left it (where the next timeline of the history forked from it)."""
    switched = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            switched[int(fields[0])] = postgres.parse_lsn(fields[1])
    return switched


def timeline_history(fleet: Fleet, host: Any, timeline: int) -> dict[int, int] | None:
    """The history of `timeline` (see `parse_history`) as the running member on `host` holds it
    in its pg_wal (a standby fetches it from its upstream when it reaches that timeline); {} for
    timeline 1, None when it cannot be read."""
    import psycopg2

    if timeline == 1:
        return {}
    try:
        connection = postgres.connect(fleet, host)
    except postgres.Unavailable:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_read_file(%s, 0, %s, true)", (f"pg_wal/{timeline:08X}.history", HISTORY_MAX_BYTES)
            )
            row = cursor.fetchone()
        return parse_history(row[0]) if row and row[0] is not None else None
    except (psycopg2.Error, ValueError, IndexError):
        return None
    finally:
        connection.close()


def standby_timeline(connection: Connection, reported: int | None, receiving: bool, position: int) -> int | None:
    """A standby's timeline. `reported` is its WAL receiver's while one runs (`receiving`), else
    its last restartpoint's, which lags a switch replayed since: a standby that streamed onto a
    new timeline reports the one before it from the moment its upstream dies until its next
    restartpoint (checkpoint_timeout later, at most). So without a WAL receiver, the newest
    timeline of the WAL files in its pg_wal for the segment where its WAL ends (the byte before
    `position`) counts too: streamed or restored WAL is kept under its timeline's name there, and
    a member refused a newer timeline never holds WAL of it. Unknown that stays `reported`."""
    import psycopg2

    if receiving or position <= 0:
        return reported
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'")
            row = cursor.fetchone()
            if row is None:
                return reported
            segment = (position - 1) // row[0]
            per_log = 0x100000000 // row[0]
            cursor.execute(
                "SELECT max(left(name, 8)) FROM pg_ls_waldir() WHERE name ~ %s",
                (f"^[0-9A-F]{{8}}{segment // per_log:08X}{segment % per_log:08X}$",),
            )
            found = cursor.fetchone()
    except psycopg2.Error:  # pg_ls_waldir needs a superuser or pg_monitor: then what it reports
        return reported
    on_disk = int(found[0], 16) if found and found[0] else None
    return max((timeline for timeline in (reported, on_disk) if timeline is not None), default=None)


def why_cannot_follow(
    timeline: int | None,
    position: int,
    upstream: str,
    upstream_timeline: int | None,
    end: int | None,
    history: dict[int, int] | None,
) -> str | None:
    """Why a member on `timeline` whose WAL goes to `position` cannot follow `upstream`, or None
    when it can: its WAL must lie on the upstream's history, as Postgres (and repmgr's follow,
    before it) requires. `upstream_timeline` is the upstream's (a candidate's: the one its
    promotion forks from); `end` where its WAL on it ends for a follower (a candidate's: what it
    has, as its promotion forks there or later; None: a primary, which writes on); `history` that
    timeline's (None: not read)."""
    if timeline is None:
        return "its timeline is unknown"
    if upstream_timeline is None:
        return f"{upstream}'s timeline is unknown"
    if timeline > upstream_timeline:
        return f"it is on timeline {timeline}, newer than {upstream}'s {upstream_timeline}"
    if timeline == upstream_timeline:
        if end is not None and position > end:
            return (
                f"its WAL on timeline {timeline} goes to {postgres.format_lsn(position)}, past "
                f"{postgres.format_lsn(end)}, all {upstream} has"
            )
        return None
    if history is None:
        return f"it is on timeline {timeline}, {upstream} on {upstream_timeline}, whose history could not be read"
    if timeline not in history:
        return f"its timeline {timeline} is not in the history of {upstream}'s timeline {upstream_timeline}"
    if position > history[timeline]:
        return (
            f"its WAL on timeline {timeline} goes to {postgres.format_lsn(position)}, past "
            f"{postgres.format_lsn(history[timeline])}, where {upstream}'s timeline {upstream_timeline} forked from it"
        )
    return None


def cannot_follow(
    fleet: Fleet,
    upstream: str,
    upstream_timeline: int | None,
    end: int | None,
    members: dict[str, tuple[int | None, int]],
) -> dict[str, str]:
    """Of `members` (name -> its timeline and where its WAL goes), those that cannot follow
    `upstream` (see `why_cannot_follow`), each with why. The upstream's history is read only when a
    member is on an older timeline than it."""
    history = None
    if upstream_timeline is not None and any(
        timeline is not None and timeline < upstream_timeline for timeline, _ in members.values()
    ):
        history = timeline_history(fleet, fleet.host(upstream), upstream_timeline)
    found = {}
    for name, (timeline, position) in members.items():
        why = why_cannot_follow(timeline, position, upstream, upstream_timeline, end, history)
        if why:
            found[name] = why
    return found


def left_out_note(name: str, upstream: str, why: str) -> str:
    return (
        f"{name} is left out of the follow: it cannot follow {upstream} ({why}); afterwards `igops pg rejoin "
        f"{name}` makes it a standby of {upstream} (pg_rewind if its WAL went past the fork)"
    )


def wal_lacked(
    fleet: Fleet, old: str, end: WalEnd, candidate: str, timeline: int | None, received: int
) -> tuple[int | None, str]:
    """How many bytes of `old`'s WAL, which ends at `end`, the candidate lacks: a candidate on
    `timeline` whose WAL goes to `received`. On one timeline, the difference. On an older one
    than the candidate's, the history of the candidate's timeline says where `old`'s left it: the
    candidate has `old`'s WAL up to there. Otherwise it cannot be counted: (None, why)."""
    if timeline == end.timeline:
        return max(0, end.lsn - received), ""
    uncounted = f"how much of {old}'s WAL {candidate} lacks cannot be counted"
    if timeline is None:
        return None, f"{old}'s WAL ends on timeline {end.timeline}, {candidate}'s timeline is unknown: {uncounted}"
    said = f"{old}'s WAL ends on timeline {end.timeline}, {candidate} is on timeline {timeline}"
    if end.timeline > timeline:
        return None, (
            f"{said}: {candidate} holds no WAL of timeline {end.timeline}, and promoting it loses what {old} "
            f"wrote there ({uncounted})"
        )
    history = timeline_history(fleet, fleet.host(candidate), timeline)
    if history is None:
        return None, f"{said}, whose history could not be read: {uncounted}"
    if end.timeline not in history:
        return None, f"{said}, whose history does not hold timeline {end.timeline}: {uncounted}"
    return max(0, end.lsn - history[end.timeline]), ""
