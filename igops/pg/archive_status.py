"""`igops pg archive status`: how a cluster's WAL archiving is doing, seen from its primary
(pg_stat_archiver, the WAL waiting to be archived and the spool), and from the repository
(pgBackRest's archive range per database, and the bytes the repository holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError
from igops.host_commands import failure_reason, ssh
from igops.pg import archive_repository
from igops.pg.archive import (
    RepositoryInfo,
    archive_settings,
    member_paths,
    parse_info,
    pgbackrest_argv,
    restore_command,
    stanza,
)
from igops.pg.hostcmd import as_postgres, data_directory

if TYPE_CHECKING:
    from igops.inventory import Fleet


@dataclass(frozen=True)
class Backlog:
    """The WAL on the primary waiting to be archived: its .ready files, the seconds the oldest of
    them has waited, and the spool's bytes (None: not read)."""

    ready_files: int | None
    oldest_ready_age_s: float | None
    spool_bytes: int | None

    def waited_s(self, archiver: ArchiverStats) -> float:
        """How long WAL has waited to be archived; 0 while none waits. Counted from the oldest
        waiting segment's .ready file, not from the last archive: on a cluster idle for an hour, the
        first segment after it has waited a moment, not an hour. Without that time, the last
        archive's age stands in, the longest the wait can be."""
        if not self.ready_files:
            return 0.0
        if self.oldest_ready_age_s is not None:
            return self.oldest_ready_age_s
        return archiver.last_archived_age_s if archiver.last_archived_age_s is not None else math.inf


def parse_backlog(text: str) -> tuple[Backlog, str]:
    """The status script's output: the backlog, and the info command's output."""
    head, _, info = text.partition("-- info\n")
    values: dict[str, int | None] = {"ready": None, "oldest_ready_age": None, "spool": None}
    for line in head.splitlines():
        key, _, value = line.partition("=")
        if key in values:
            values[key] = int(value) if value.strip().isdigit() else None
    oldest = values["oldest_ready_age"]
    return Backlog(values["ready"], None if oldest is None else float(oldest), values["spool"]), info


@dataclass
class ArchiverStats:
    archive_mode: str
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: str | None
    last_archived_age_s: float | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: str | None
    last_failed_age_s: float | None
    current_wal: str


@dataclass
class ArchiveStatus:
    cluster: str
    stanza: str
    primary: str
    archive_timeout: int
    archiver: ArchiverStats
    # The backlog's fields, flat: `--json` prints this dataclass as it is, and they are its keys.
    ready_files: int | None
    oldest_ready_age_s: float | None
    spool_bytes: int | None
    repository: RepositoryInfo
    repository_bytes: int | None
    restore_command: str
    problems: list[str] = field(default_factory=list)


def archive_problems(
    archiver: ArchiverStats, backlog: Backlog, repository: RepositoryInfo, archive_timeout: int
) -> list[str]:
    """What `status` exits PROBLEMS_FOUND for. An idle cluster switches no segment, so an old
    last archive is no problem: WAL that has waited too long to be archived is."""
    problems = []
    limit = 2 * archive_timeout
    if archiver.archive_mode != "on":
        problems.append(f"archive_mode is {archiver.archive_mode}: run `igops pg archive setup`")
    if not repository.exists:
        problems.append(f"the repository's stanza is not usable: {repository.status}")
    if archiver.last_failed_time is not None:
        failing = archiver.last_archived_time is None or (
            archiver.last_failed_age_s is not None
            and archiver.last_archived_age_s is not None
            and archiver.last_failed_age_s < archiver.last_archived_age_s
        )
        recent = archiver.last_failed_age_s is not None and archiver.last_failed_age_s < limit
        if failing or recent:
            problems.append(
                f"archiving {archiver.last_failed_wal} failed {archiver.last_failed_age_s or 0:.0f} s ago "
                f"({archiver.failed_count} failures since the statistics were reset); see pgBackRest's log"
            )
    waited = backlog.waited_s(archiver)
    if waited > limit:
        known = backlog.oldest_ready_age_s is not None
        since = f"the oldest for {waited:.0f} s" if known else "for longer than the last archive"
        problems.append(
            f"{backlog.ready_files} segments wait to be archived, {since} (limit 2 × archive_timeout = {limit} s)"
        )
    return problems


_ARCHIVER = (
    "SELECT current_setting('archive_mode'), archived_count, last_archived_wal, last_archived_time::text, "
    "extract(epoch FROM now() - last_archived_time)::float8, failed_count, last_failed_wal, "
    "last_failed_time::text, extract(epoch FROM now() - last_failed_time)::float8, "
    "pg_walfile_name(pg_current_wal_lsn()) FROM pg_stat_archiver"
)

# The .ready files' count and the age of the oldest, from one listing (find's %T@: the time the
# segment was handed to the archiver, on the primary's own clock, as `date` is).
_BACKLOG = (
    'data="$1"; spool="$2"; shift 2; '
    'find "$data/pg_wal/archive_status" -maxdepth 1 -name "*.ready" -printf "%T@\\n" | sort -n '
    '| awk -v now="$(date +%s)" \'NR == 1 { oldest = now - int($1) } '
    'END { print "ready=" NR; if (NR) print "oldest_ready_age=" (oldest < 0 ? 0 : oldest) }\'; '
    'printf "spool=%s\\n" "$(if [ -d "$spool" ]; then du -sb "$spool" | cut -f1; else echo 0; fi)"; '
    'echo "-- info"; "$@"'
)


def archiver_stats(fleet: Fleet, cluster: str) -> tuple[Any, ArchiverStats]:
    """The primary (its inventory host) and its pg_stat_archiver: one query, nothing of the
    repository's, so that it answers at once while the repository does not."""
    from igops import postgres_admin

    with postgres_admin.primary_connection(
        fleet, cluster, "postgres", autocommit=True, purpose="archive"
    ) as connection:
        with connection.cursor() as cursor:
            cursor.execute(_ARCHIVER)
            row = cursor.fetchone()
            assert row is not None  # pg_stat_archiver always has its one row
    return postgres_admin.primary_of(fleet, cluster), ArchiverStats(*row)


def backlog(fleet: Fleet, host: Any, *then: str) -> tuple[Backlog, str, bool]:
    """On the primary: the WAL waiting to be archived, and what `then` printed (and whether it
    succeeded)."""
    spool = member_paths(fleet, host)["spool_path"]
    result = ssh(fleet, host, ["sh", "-c", _BACKLOG, "sh", data_directory(fleet, host), spool, *then], timeout=60)
    if not result.reached:
        raise IgopsError(f"{host.name}: {failure_reason(result)}", "check SSH to the primary (igops hosts)")
    waiting, said = parse_backlog(result.stdout)
    return waiting, said if result.ok else failure_reason(result), result.ok


def archive_status(fleet: Fleet, cluster: str) -> ArchiveStatus:
    settings = archive_settings(fleet)
    name = stanza(fleet, cluster)
    host, archiver = archiver_stats(fleet, cluster)
    info_argv = as_postgres(fleet, pgbackrest_argv(fleet, cluster, host, "--output=json", "info"))
    waiting, info_text, ok = backlog(fleet, host, *info_argv)
    repository = parse_info(info_text, name) if ok else RepositoryInfo(False, info_text)
    status = ArchiveStatus(
        cluster,
        name,
        host.name,
        settings.archive_timeout,
        archiver,
        waiting.ready_files,
        waiting.oldest_ready_age_s,
        waiting.spool_bytes,
        repository,
        archive_repository.repository_bytes(fleet),
        restore_command(fleet, cluster, host),
    )
    status.problems = archive_problems(archiver, waiting, repository, settings.archive_timeout)
    return status
