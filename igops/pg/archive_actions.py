"""The steps of `igops pg archive setup` (igops.pg.archive plans them): PgActions' own PgBouncer
pause and resume (with their watchdogs), waits and repmgrd pause, plus writing pgBackRest's
configuration, ALTER SYSTEM, restarts and pgBackRest's stanza-create and check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from igops import postgres
from igops.host_commands import ssh_ok, stdin_into
from igops.operations.steps import StepReport, execute
from igops.output import Reporter
from igops.pg.actions import PgActions
from igops.pg.archive import (
    ArchivePlan,
    alter_system_sql,
    archive_settings,
    member_paths,
    pgbackrest_argv,
    render_config,
)
from igops.pg.cluster import describe_left_behind, pg_status
from igops.pg.hostcmd import as_postgres, repmgr
from igops.pg.timeouts import STOP_TIMEOUT

if TYPE_CHECKING:
    from igops.inventory import Fleet

# Written beside the file and renamed over it, mode and owner set before the rename: the secret
# is never readable by others, and a reader never sees half a file. The content comes on stdin.
_WRITE_CONFIG = (
    'set -e; file="$1"; os_user="$2"; size="$3"; (umask 022; mkdir -p "$(dirname "$file")"); umask 077; '
    'tmp="$file.igops-$$"; trap \'rm -f "$tmp"\' EXIT; '
    + stdin_into('"$tmp"')
    + '; chown "root:$(id -gn "$os_user")" "$tmp"; chmod 0640 "$tmp"; sync "$tmp"; mv -f "$tmp" "$file"'
)


@dataclass
class ArchiveResult:
    cluster: str
    stanza: str
    primary: str
    steps: list[StepReport]


class ArchiveActions(PgActions):
    """PgActions' steps and those of an archive set-up."""

    def write_config(self, cluster: str, node: str) -> str:
        host = self._host(node)
        path = member_paths(self.fleet, host)["config_file"]
        data = render_config(self.fleet, cluster, host).encode()
        ssh_ok(
            self.fleet,
            host,
            ["sh", "-c", _WRITE_CONFIG, "sh", path, self.fleet.model.postgres.os_user, str(len(data))],
            f"writing {path}",
            timeout=30,
            stdin=data,
        )
        return path

    def make_dirs(self, node: str, paths: tuple[str, ...]) -> None:
        host = self._host(node)
        os_user = self.fleet.model.postgres.os_user
        ssh_ok(
            self.fleet,
            host,
            [
                "sh",
                "-c",
                'user="$1"; shift; install -d -m 0750 -o "$user" -g "$(id -gn "$user")" "$@"',
                "sh",
                os_user,
                *paths,
            ],
            "creating pgBackRest's directories",
            timeout=30,
        )

    def stanza_create(self, cluster: str, node: str) -> str:
        host = self._host(node)
        output = ssh_ok(
            self.fleet,
            host,
            as_postgres(self.fleet, pgbackrest_argv(self.fleet, cluster, host, "stanza-create")),
            "pgbackrest stanza-create",
            timeout=120,
        )
        return _last_line(output)

    def alter_system(self, node: str, changes: dict[str, str]) -> str:
        connection = postgres.connect(self.fleet, self._host(node))
        try:
            with connection.cursor() as cursor:
                for name, value in changes.items():
                    cursor.execute(alter_system_sql(name, value))
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            connection.close()
        return ", ".join(changes)

    def restart_member(self, node: str) -> None:
        # A stop, then a start: repmgr's --action=restart runs the service's own restart
        # command, which `pg_ctl -D <config dir> restart` (the lab's, and any set-up whose
        # configuration lives apart from the data) answers by stopping the server only.
        host = self._host(node)
        for action in ("stop", "start"):
            ssh_ok(
                self.fleet,
                host,
                repmgr(self.fleet, host, "node", "service", f"--action={action}"),
                action,
                timeout=STOP_TIMEOUT * 2 + 60,
            )

    def restart_primary(self, node: str) -> str:
        self.restart_member(node)
        return self._wait_writable(node)

    def check(self, cluster: str, node: str) -> str:
        host = self._host(node)
        timeout = archive_settings(self.fleet).archive_timeout
        output = ssh_ok(
            self.fleet,
            host,
            as_postgres(
                self.fleet, pgbackrest_argv(self.fleet, cluster, host, f"--archive-timeout={timeout}", "check")
            ),
            "pgbackrest check",
            timeout=timeout + 120,
        )
        return _last_line(output) or "the switched segment is in the repository"


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def apply_archive_setup(fleet: Fleet, plan: ArchivePlan, reporter: Reporter = Reporter()) -> ArchiveResult:
    reports = execute(
        plan.actions,
        ArchiveActions(fleet),
        reporter,
        plan.failure_hint,
        left_behind=lambda: describe_left_behind(pg_status(fleet, plan.cluster)),
    )
    return ArchiveResult(plan.cluster, plan.stanza, plan.primary, reports)
