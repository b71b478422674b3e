"""Continuous WAL archiving with pgBackRest: its configuration on each member, the
archive_command Postgres runs, and `plan_archive_setup`, which reads what every member has and
plans only what differs (a second run plans nothing). The steps run in
igops.pg.archive_actions; `igops pg archive status` is igops.pg.archive_status.

Every member gets the same settings, standbys included: a standby with archive_mode=on archives
nothing, and starts to the moment it is promoted, so a switchover keeps the archive going.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.errors import RefusedError, UsageError
from igops.host_commands import failure_reason, parallel_map, ssh
from igops.operations.steps import Step
from igops.pg.cluster import PgView, bouncer_text, cluster_members, pg_view
from igops.pg.hostcmd import as_postgres, data_directory
from igops.pg.plan_steps import with_repmgrd_paused
from igops.secrets import Secrets

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Archive

# The settings setup manages, in the order ALTER SYSTEM sets them.
SETTINGS = ("archive_command", "archive_timeout", "archive_mode")
CONFIG_MODE = "640"  # root:<postgres group>: it holds the repository's S3 secret
RESTART_PRIMARY_HINT = (
    "switch over to a restarted standby first (igops pg switchover), or pass --restart-primary "
    "(writes pause in PgBouncer during the restart)"
)


def archive_settings(fleet: Fleet) -> Archive:
    archive = fleet.model.archive
    if archive is None:
        raise UsageError(
            "the inventory has no [archive] section",
            "add [archive] and [archive.repository] (see config/example.toml), then run this again",
        )
    return archive


def stanza(fleet: Fleet, cluster: str) -> str:
    return archive_settings(fleet).stanza.replace("{cluster}", cluster)


def member_paths(fleet: Fleet, host: Any) -> dict[str, str]:
    archive = archive_settings(fleet)
    return {
        name: fleet.path_for(getattr(archive, name), host)
        for name in ("config_file", "spool_path", "log_path", "lock_path")
    }


def _ini_value(name: str, value: object) -> str:
    text = "y" if value is True else "n" if value is False else str(value)
    if "\n" in text or "\r" in text:
        raise UsageError(f"pgBackRest option {name} holds a line break", "fix the value in the inventory or secrets")
    return text


def _repository_options(fleet: Fleet) -> list[tuple[str, object]]:
    """The repository and its S3 secret: the same for every config that reaches it."""
    repo = archive_settings(fleet).repository
    secrets = Secrets(fleet.model.secrets.file)
    options: list[tuple[str, object]] = [
        ("repo1-type", repo.type),
        ("repo1-path", repo.path),
        ("repo1-s3-bucket", repo.bucket),
        ("repo1-s3-endpoint", repo.endpoint),
        ("repo1-s3-region", repo.region),
        ("repo1-s3-uri-style", repo.uri_style),
        ("repo1-storage-port", repo.port),
        ("repo1-storage-verify-tls", repo.verify_tls),
    ]
    if repo.ca_file:
        options.append(("repo1-storage-ca-file", repo.ca_file))
    return [
        *options,
        ("repo1-s3-key", secrets.require("archive_s3_key")),
        ("repo1-s3-key-secret", secrets.require("archive_s3_key_secret")),
    ]


def _ini(header: str, options: list[tuple[str, object]], section: str, stanza_options: list[tuple[str, object]]) -> str:
    lines = [header, "[global]"]
    lines += [f"{name}={_ini_value(name, value)}" for name, value in options]
    lines += ["", f"[{section}]"]
    lines += [f"{name}={_ini_value(name, value)}" for name, value in stanza_options]
    return "\n".join(lines) + "\n"


def render_config(fleet: Fleet, cluster: str, host: Any) -> str:
    """The member's pgbackrest.conf. It holds the S3 secret: it only ever travels on stdin."""
    archive = archive_settings(fleet)
    paths = member_paths(fleet, host)
    pg = fleet.model.postgres
    options: list[tuple[str, object]] = [
        *_repository_options(fleet),
        # archive-push returns as soon as the segment is queued in the spool, and process-max
        # processes push ahead of Postgres: a slow S3 never holds up the archiver.
        ("archive-async", True),
        ("spool-path", paths["spool_path"]),
        ("process-max", archive.process_max),
        *([("archive-push-queue-max", archive.push_queue_max_bytes)] if archive.push_queue_max_bytes else []),
        ("log-path", paths["log_path"]),
        ("lock-path", paths["lock_path"]),
        ("log-level-file", "info"),
    ]
    stanza_options: list[tuple[str, object]] = [
        ("pg1-path", data_directory(fleet, host)),
        ("pg1-port", pg.port),
        ("pg1-socket-path", fleet.path_for(pg.socket_dir, host)),
        ("pg1-user", pg.user),
    ]
    header = "# Written by `igops pg archive setup`: changes here are replaced by the next run."
    return _ini(header, options, stanza(fleet, cluster), stanza_options)


def render_restore_config(fleet: Fleet, cluster: str, data: str, run_directory: str, port: int) -> str:
    """pgbackrest.conf for a restored copy's restore_command: the cluster's repository, read only
    (archive-get), everything else of its own in its run directory, so that it never touches a
    member's spool, locks or logs. It holds the S3 secret: it only ever travels on stdin."""
    options: list[tuple[str, object]] = [
        *_repository_options(fleet),
        # archive-get fetches the segments after the one asked for into the spool, process-max
        # at once, while the server replays: a restore then waits on the repository only for its
        # first segment, not for every one in turn (a fetch and its decompression took about as
        # long as replaying the segment).
        ("archive-async", True),
        ("process-max", archive_settings(fleet).process_max),
        ("log-path", run_directory),
        ("lock-path", run_directory),
        ("spool-path", run_directory),
        ("log-level-file", "info"),
    ]
    stanza_options: list[tuple[str, object]] = [
        ("pg1-path", data),
        ("pg1-port", port),
        ("pg1-socket-path", run_directory),
    ]
    header = "# Written by `igops snapshot restore` for a restored copy; removed with it."
    return _ini(header, options, stanza(fleet, cluster), stanza_options)


def pgbackrest_argv(fleet: Fleet, cluster: str, host: Any, *args: str) -> list[str]:
    return [
        "pgbackrest",
        f"--config={member_paths(fleet, host)['config_file']}",
        f"--stanza={stanza(fleet, cluster)}",
        *args,
    ]


def archive_command(fleet: Fleet, cluster: str, host: Any) -> str:
    """Postgres runs it through the shell with %p (the segment's path) filled in."""
    return shlex.join(pgbackrest_argv(fleet, cluster, host)) + " archive-push %p"


def restore_command(fleet: Fleet, cluster: str, host: Any) -> str:
    """What a restore (point-in-time recovery) of this member fetches WAL with."""
    return shlex.join(pgbackrest_argv(fleet, cluster, host)) + ' archive-get %f "%p"'


def wanted_settings(fleet: Fleet, cluster: str, host: Any) -> dict[str, str]:
    return {
        "archive_command": archive_command(fleet, cluster, host),
        "archive_timeout": str(archive_settings(fleet).archive_timeout),
        "archive_mode": "on",
    }


def sql_literal(value: str) -> str:
    """A string constant whatever standard_conforming_strings says (E'' escapes both)."""
    if "\0" in value:
        raise UsageError("a setting holds a NUL character", "fix the inventory")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def alter_system_sql(name: str, value: str) -> str:
    if name not in SETTINGS:
        raise ValueError(f"setup does not manage {name}")
    return f"ALTER SYSTEM SET {name} = {sql_literal(value)}"


# --- reading a member ------------------------------------------------------------------------

# As root: the config file is root's. Prints key=value lines that parse_member_probe reads.
_PROBE = (
    'config="$1"; os_user="$2"; shift 2; '
    # As the postgres user, as every pgBackRest command runs: some versions refuse root.
    'printf "version=%s\\n" "$(runuser -u "$os_user" -- env -C / pgbackrest version 2>/dev/null)"; '
    'printf "group=%s\\n" "$(id -gn "$os_user")"; '
    'if [ -f "$config" ]; then printf "config=%s %s\\n" "$(sha256sum < "$config" | cut -d" " -f1)" '
    '"$(stat -c "%U:%G:%a" "$config")"; fi; '
    'for dir in "$@"; do if [ -d "$dir" ]; then printf "dir=%s %s\\n" "$(stat -c %U "$dir")" "$dir"; fi; done'
)


@dataclass
class MemberProbe:
    version: str | None  # pgBackRest's, None: not installed
    group: str  # the postgres OS user's group
    config_sha256: str | None  # None: no file
    config_owner: str | None  # user:group:mode
    dirs: dict[str, str] = field(default_factory=dict)  # path -> owner


def parse_member_probe(text: str) -> MemberProbe:
    probe = MemberProbe(None, "", None, None)
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "version" and value.strip():
            probe.version = value.strip().removeprefix("pgBackRest ").strip()
        elif key == "group":
            probe.group = value.strip()
        elif key == "config":
            digest, _, owner = value.partition(" ")
            probe.config_sha256, probe.config_owner = digest, owner.strip()
        elif key == "dir":
            owner, _, path = value.partition(" ")
            probe.dirs[path] = owner
    return probe


@dataclass
class MemberState:
    name: str
    role: str  # 'primary' or 'standby'
    pgbackrest: str | None
    config_current: bool
    dirs_missing: list[str]
    running: dict[str, str]  # the settings the server runs with
    configured: dict[str, str]  # what its files say (archive_mode differs until a restart)


def _read_member(fleet: Fleet, cluster: str, name: str, role: str) -> MemberState:
    from igops import postgres

    host = fleet.host(name)
    paths = member_paths(fleet, host)
    os_user = fleet.model.postgres.os_user
    dirs = [paths["spool_path"], paths["log_path"], paths["lock_path"]]
    result = ssh(fleet, host, ["sh", "-c", _PROBE, "sh", paths["config_file"], os_user, *dirs], timeout=30)
    if not result.ok:
        raise RefusedError(
            f"{name}: cannot read its pgBackRest set-up: {failure_reason(result)}",
            f"check that SSH to {name} works as root (igops exec --host {name} -- true)",
        )
    probe = parse_member_probe(result.stdout)
    wanted_digest = hashlib.sha256(render_config(fleet, cluster, host).encode()).hexdigest()
    config_current = probe.config_sha256 == wanted_digest and probe.config_owner == f"root:{probe.group}:{CONFIG_MODE}"
    try:
        connection = postgres.connect(fleet, host)
    except postgres.Unavailable as exc:
        raise RefusedError(
            f"{name}: Postgres does not answer: {exc.detail}", "setup needs every member running"
        ) from None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(SETTINGS),))
            running = {row[0]: row[1] for row in cursor.fetchall()}
            # The value the files give (postgresql.auto.conf last): archive_mode's differs from
            # the running one until a restart.
            cursor.execute(
                "SELECT DISTINCT ON (name) name, setting FROM pg_file_settings "
                "WHERE name = ANY(%s) AND error IS NULL ORDER BY name, seqno DESC",
                (list(SETTINGS),),
            )
            configured = {**running, **{row[0]: row[1] for row in cursor.fetchall()}}
    finally:
        connection.close()
    return MemberState(
        name,
        role,
        probe.version,
        config_current,
        [path for path in dirs if probe.dirs.get(path) != os_user],
        running,
        configured,
    )


# pgBackRest's stanza status codes: 0 ok, 2 no valid backups (archiving alone is that), the
# others (1 missing stanza path, 3 missing stanza data, ...) mean it is not usable.
STANZA_USABLE = (0, 2)


@dataclass
class ArchiveRange:
    database: str  # pgBackRest's archive id: <Postgres version>-<database id>
    min_wal: str | None
    max_wal: str | None


@dataclass
class RepositoryInfo:
    exists: bool
    status: str
    ranges: list[ArchiveRange] = field(default_factory=list)


def parse_info(text: str, name: str) -> RepositoryInfo:
    """`pgbackrest info --output=json`: the stanza's status and its archive ranges."""
    try:
        stanzas = json.loads(text)
    except ValueError:
        return RepositoryInfo(False, f"unreadable info output: {text.strip()[-200:]}")
    found = next((item for item in stanzas if isinstance(item, dict) and item.get("name") == name), None)
    if found is None:
        return RepositoryInfo(False, "no such stanza")
    status = found.get("status") or {}
    ranges = [
        ArchiveRange(str(item.get("id")), item.get("min"), item.get("max")) for item in found.get("archive") or []
    ]
    return RepositoryInfo(status.get("code") in STANZA_USABLE, str(status.get("message", "unknown")), ranges)


# --- the plan --------------------------------------------------------------------------------


@dataclass
class ArchivePlan:
    cluster: str
    stanza: str
    primary: str
    title: str
    members: list[MemberState]
    stanza_exists: bool | None  # None: unknown (the primary's configuration is not written yet)
    actions: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure_hint: str = "see `igops pg archive status` and `igops pg status` for where things stand"

    def steps(self) -> list[str]:
        return [step.title for step in self.actions]


def plan_archive_setup(fleet: Fleet, cluster: str, restart_primary: bool = False) -> ArchivePlan:
    archive_settings(fleet)
    members = cluster_members(fleet, cluster)
    view = pg_view(fleet, cluster)
    writable = view.writable()
    if len(writable) != 1:
        raise RefusedError(
            f"cluster {cluster} has {' and '.join(writable) or 'no'} primary accepting writes",
            f"see `igops pg status {cluster}`",
        )
    primary = writable[0]
    stopped = [name for name in members if view.probes[name].server is None]
    if stopped:
        raise RefusedError(
            f"{', '.join(stopped)} of cluster {cluster} not running: every member must get the settings",
            f"start or rejoin it first (igops pg rejoin {stopped[0]})",
        )
    states = parallel_map(
        lambda name: _read_member(fleet, cluster, name, "primary" if name == primary else "standby"), members
    )
    missing = [state.name for state in states if state.pgbackrest is None]
    if missing:
        raise RefusedError(
            f"pgBackRest is not installed on {', '.join(missing)}", "install the pgbackrest package on every member"
        )
    primary_state = next(state for state in states if state.name == primary)
    exists = _stanza_exists(fleet, cluster, primary) if primary_state.config_current else None
    plan = ArchivePlan(
        cluster,
        stanza(fleet, cluster),
        primary,
        f"Set up WAL archiving of cluster {cluster} (pgBackRest stanza {stanza(fleet, cluster)})",
        states,
        exists,
    )
    plan.actions = _steps(fleet, view, plan, restart_primary)
    if not plan.actions:
        plan.notes.insert(0, f"nothing to do: every member of {cluster} archives to stanza {plan.stanza}")
    return plan


def _stanza_exists(fleet: Fleet, cluster: str, primary: str) -> bool | None:
    host = fleet.host(primary)
    result = ssh(fleet, host, as_postgres(fleet, pgbackrest_argv(fleet, cluster, host, "--output=json", "info")), 60)
    if not result.ok:
        return None
    info = parse_info(result.stdout, stanza(fleet, cluster))
    return info.exists


def _steps(fleet: Fleet, view: PgView, plan: ArchivePlan, restart_primary: bool) -> list[Step]:
    cluster, primary = plan.cluster, plan.primary
    steps = []
    archive = archive_settings(fleet)
    for state in plan.members:
        if not state.config_current:
            config = member_paths(fleet, fleet.host(state.name))["config_file"]
            steps.append(
                Step(
                    f"{state.name}: write {config} (mode 0640, root:{fleet.model.postgres.os_user}; "
                    "the S3 secret goes on stdin)",
                    "write_config",
                    (cluster, state.name),
                )
            )
    for state in plan.members:
        if state.dirs_missing:
            steps.append(
                Step(
                    f"{state.name}: create {', '.join(state.dirs_missing)} owned by {fleet.model.postgres.os_user}",
                    "make_dirs",
                    (state.name, tuple(state.dirs_missing)),
                )
            )
    # Before archive_mode comes on: archive-push refuses a stanza that does not exist, and
    # Postgres would retry every segment until it did.
    if plan.stanza_exists is not True:
        steps.append(
            Step(
                f"{primary}: pgbackrest stanza-create (stanza {plan.stanza}; "
                + ("it is missing" if plan.stanza_exists is False else "nothing if it exists and matches")
                + ")",
                "stanza_create",
                (cluster, primary),
            )
        )
    for state in plan.members:
        wanted = wanted_settings(fleet, cluster, fleet.host(state.name))
        changes = {name: value for name, value in wanted.items() if _differs(state, name, value)}
        if changes:
            steps.append(
                Step(
                    f"{state.name}: "
                    + "; ".join(alter_system_sql(name, value) for name, value in changes.items())
                    + "; SELECT pg_reload_conf()",
                    "alter_system",
                    (state.name, changes),
                )
            )
    restarts = [state for state in plan.members if state.running.get("archive_mode") != "on"]
    restart_steps: list[Step] = []
    for state in restarts:
        if state.role == "standby":
            restart_steps += [
                Step(
                    f"{state.name}: restart for archive_mode (repmgr node service --action=stop, then --action=start)",
                    "restart_member",
                    (state.name,),
                ),
                Step(f"{state.name}: wait until it streams from {primary}", "wait_streaming", (state.name, primary)),
            ]
    primary_waits = False
    if any(state.role == "primary" for state in restarts):
        if restart_primary:
            restart_steps += _primary_restart_steps(fleet, view, primary)
        elif not steps and not restart_steps:
            raise RefusedError(
                f"refused: archive_mode takes a restart, and {primary} is the primary of {cluster}",
                RESTART_PRIMARY_HINT,
            )
        else:
            # The standbys' part can be done now: a restarted standby is what a switchover
            # needs, so that the primary need never be restarted as one.
            primary_waits = True
            plan.notes.append(
                f"{primary} (the primary) is left with archive_mode waiting for a restart, and nothing is "
                f"archived until then: afterwards {RESTART_PRIMARY_HINT}, and run this again"
            )
    if restart_steps:
        others = tuple(name for name in view.probes if name != primary)
        steps += with_repmgrd_paused(restart_steps, on=primary, members=(primary, *others))
    if steps and not primary_waits:
        steps.append(
            Step(
                f"{primary}: pgbackrest check (switches WAL and waits, at most {archive.archive_timeout} s, until "
                "that segment is in the repository)",
                "check",
                (cluster, primary),
            )
        )
    return steps


def _differs(state: MemberState, name: str, value: str) -> bool:
    """Whether ALTER SYSTEM (and a reload) must set `name`: its files say otherwise, or it is
    reloadable and the server still runs another value (a run cut short before its reload).
    archive_command shows "(disabled)" while archive_mode is off; its files' value counts then."""
    if state.configured.get(name) != value:
        return True
    return name != "archive_mode" and state.running.get(name) not in (value, "(disabled)")


def _primary_restart_steps(fleet: Fleet, view: PgView, primary: str) -> list[Step]:
    databases = view.databases()
    standbys = [name for name in view.probes if name != primary]
    resume = Step(f"PgBouncer: RESUME {bouncer_text(databases)}", "resume", (databases,))
    steps = [Step(f"{primary}: CHECKPOINT, so the restart's own checkpoint is quick", "checkpoint", (primary,))]
    if databases:
        steps.append(
            Step(
                f"PgBouncer: arm a watchdog on {', '.join(databases)} (it RESUMEs them if igops is gone or silent "
                f"for {fleet.model.pgbouncer.watchdog_deadline:g} s), then PAUSE {bouncer_text(databases)}",
                "pause",
                (databases,),
                release=resume,
            )
        )
    steps.append(
        Step(
            f"{primary}: fast restart (repmgr node service --action=stop, then --action=start), wait until it "
            "accepts writes",
            "restart_primary",
            (primary,),
        )
    )
    if databases:
        steps.append(resume)
    steps += [
        Step(f"{name}: wait until it streams from {primary}", "wait_streaming", (name, primary)) for name in standbys
    ]
    return steps
