"""`igops pg archive`: pgBackRest's configuration, the set-up plan (only what differs, nothing
on a second run, the primary's restart refused without --restart-primary) and the status
parsers, without a fleet: SSH and Postgres are replaced by what the members would answer."""

import hashlib
import json
import shlex
from types import SimpleNamespace

import pytest

from igops import inventory, postgres, remote
from igops.errors import RefusedError, UsageError
from igops.pg import archive, archive_actions, archive_status
from tests.conftest import run_igops
from tests.unit.inventories import unit_inventory

KEY = "AKIAUNITARCHIVE0000"
SECRET = "unit-archive-secret/with+odd'chars"
ARCHIVE = """
[postgres]
socket_dir = "/run/pg/{host}"
[postgres.clusters.main]
primary = "db1"
standbys = ["db2"]
[archive]
archive_timeout = 30
config_file = "/srv/{host}/pgbackrest.conf"
spool_path = "/srv/{host}/spool"
[archive.repository]
bucket = "wal"
endpoint = "127.0.10.8"
ca_file = "/etc/lab ca.crt"
"""
CLUSTER = '[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n'
HOSTS = [("db1", "127.0.99.1", "postgres"), ("db2", "127.0.99.2", "postgres")]


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY", KEY)
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY_SECRET", SECRET)
    return inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=ARCHIVE))


def test_the_config_names_the_repository_the_member_and_its_paths(fleet):
    text = archive.render_config(fleet, "main", fleet.host("db2"))
    lines = text.splitlines()
    for line in (
        "repo1-type=s3",
        "repo1-s3-bucket=wal",
        "repo1-s3-endpoint=127.0.10.8",
        "repo1-storage-port=443",
        "repo1-path=/pgbackrest",
        "repo1-s3-uri-style=path",
        "repo1-storage-ca-file=/etc/lab ca.crt",
        "repo1-storage-verify-tls=y",
        f"repo1-s3-key={KEY}",
        f"repo1-s3-key-secret={SECRET}",
        "archive-async=y",
        "spool-path=/srv/db2/spool",
        "process-max=2",
        "log-path=/var/log/pgbackrest",
        "lock-path=/tmp/pgbackrest",
        "log-level-file=info",
        "[main]",
        "pg1-path=/var/lib/postgresql/15/main",
        "pg1-port=5432",
        "pg1-socket-path=/run/pg/db2",
        "pg1-user=postgres",
    ):
        assert line in lines
    assert lines.index("[main]") > lines.index("[global]")
    assert not any(line.startswith("archive-push-queue-max") for line in lines)  # unset: every segment kept


def test_a_push_queue_limit_reaches_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY", KEY)
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY_SECRET", SECRET)
    sections = ARCHIVE.replace("archive_timeout = 30\n", "archive_timeout = 30\npush_queue_max_bytes = 268435456\n")
    limited = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=sections))
    assert (
        "archive-push-queue-max=268435456" in archive.render_config(limited, "main", limited.host("db1")).splitlines()
    )


def test_the_commands_quote_their_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY", KEY)
    monkeypatch.setenv("IGOPS_ARCHIVE_S3_KEY_SECRET", SECRET)
    sections = ARCHIVE.replace('"/srv/{host}/pgbackrest.conf"', '"/srv/my {host}/pgbackrest.conf"')
    fleet = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=sections))
    command = archive.archive_command(fleet, "main", fleet.host("db1"))
    assert command == "pgbackrest '--config=/srv/my db1/pgbackrest.conf' --stanza=main archive-push %p"
    assert shlex.split(command.replace("%p", "pg_wal/X"))[1] == "--config=/srv/my db1/pgbackrest.conf"
    assert archive.restore_command(fleet, "main", fleet.host("db1")).endswith(' archive-get %f "%p"')


def test_sql_literals_survive_quotes_and_backslashes():
    assert archive.sql_literal("it's a \\ path") == "E'it''s a \\\\ path'"
    assert archive.alter_system_sql("archive_timeout", "60") == "ALTER SYSTEM SET archive_timeout = E'60'"
    with pytest.raises(ValueError):
        archive.alter_system_sql("shared_preload_libraries", "x")


def test_no_archive_section_is_a_usage_error(tmp_path):
    fleet = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=CLUSTER))
    with pytest.raises(UsageError, match=r"\[archive\]"):
        archive.archive_settings(fleet)


def test_the_secret_goes_only_on_stdin(fleet, monkeypatch):
    calls = []

    def fake_ssh(fleet_, host, argv, what, timeout=60, stdin=None):
        calls.append((argv, stdin))
        return ""

    monkeypatch.setattr(archive_actions, "ssh_ok", fake_ssh)
    archive_actions.ArchiveActions(fleet).write_config("main", "db1")
    [(argv, stdin)] = calls
    assert SECRET not in " ".join(argv) and KEY not in " ".join(argv)
    assert SECRET.encode() in stdin
    assert "/srv/db1/pgbackrest.conf" in argv and "chmod 0640" in argv[2] and "umask 077" in argv[2]


# --- the plan ---------------------------------------------------------------------------------


class Members:
    """What each member answers: its probe over SSH and its settings over SQL."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.config = {"db1": None, "db2": None}  # sha256 of the file on the host
        self.dirs = {"db1": False, "db2": False}
        self.running = {
            name: {"archive_mode": "off", "archive_command": "(disabled)", "archive_timeout": "0"}
            for name in ("db1", "db2")
        }
        self.configured = {name: {} for name in ("db1", "db2")}
        self.stanza = None  # pgbackrest info's JSON, None: no such stanza
        self.commands = []

    def set_up(self, name):
        """As the first run leaves it: config written, directories made, settings applied."""
        host = self.fleet.host(name)
        self.config[name] = hashlib.sha256(archive.render_config(self.fleet, "main", host).encode()).hexdigest()
        self.dirs[name] = True
        self.running[name] = archive.wanted_settings(self.fleet, "main", host)
        self.stanza = [{"name": "main", "status": {"code": 2, "message": "no valid backups"}, "archive": []}]

    def ssh(self, fleet, host, argv, timeout=60, stdin=None):
        self.commands.append(argv)
        name = host.name
        if "info" in argv:
            return remote.HostResult(name, "", True, 0, json.dumps(self.stanza or []), "", 1.0)
        lines = ["version=pgBackRest 2.45", "group=postgres"]
        if self.config[name]:
            lines.append(f"config={self.config[name]} root:postgres:640")
        if self.dirs[name]:
            lines += [f"dir=postgres {path}" for path in argv[6:]]
        return remote.HostResult(name, "", True, 0, "\n".join(lines) + "\n", "", 1.0)

    def connect(self, fleet, host, *args, **kwargs):
        members = self

        class Cursor:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def execute(self, query, params=None):
                self.rows = list((members.running if "pg_settings" in query else members.configured)[host.name].items())

            def fetchall(self):
                return self.rows

        return SimpleNamespace(cursor=Cursor, close=lambda: None)


@pytest.fixture
def members(fleet, monkeypatch):
    state = Members(fleet)
    monkeypatch.setattr(archive, "ssh", state.ssh)
    monkeypatch.setattr(postgres, "connect", state.connect)
    probes = {
        "db1": SimpleNamespace(host=fleet.host("db1"), server=SimpleNamespace(in_recovery=False)),
        "db2": SimpleNamespace(host=fleet.host("db2"), server=SimpleNamespace(in_recovery=True)),
    }
    view = SimpleNamespace(
        probes=probes,
        writable=lambda: ["db1"],
        databases=lambda: {"pgb1": ["main"]},
    )
    monkeypatch.setattr(archive, "pg_view", lambda fleet_, cluster: view)
    return state


def actions(plan):
    return [step.action for step in plan.actions]


# A fresh cluster's set-up up to its standbys' restarts, with or without --restart-primary.
STANDBYS_FIRST = [
    "write_config",
    "write_config",
    "make_dirs",
    "make_dirs",
    "stanza_create",
    "alter_system",
    "alter_system",
    "pause_repmgrd",
    "restart_member",
    "wait_streaming",
]


def test_without_restart_primary_the_standbys_part_is_done_and_then_it_is_refused(fleet, members):
    plan = archive.plan_archive_setup(fleet, "main")
    assert actions(plan) == [*STANDBYS_FIRST, "unpause_repmgrd"]
    assert all("db1" not in step.title for step in plan.actions if step.action == "restart_member")
    assert any("--restart-primary" in note and "switchover" in note for note in plan.notes)
    # Once only the primary's restart is left, the plan refuses.
    for name in ("db1", "db2"):
        members.set_up(name)
    members.configured["db1"] = dict(members.running["db1"])
    members.running["db1"].update(archive_mode="off", archive_command="(disabled)")
    with pytest.raises(RefusedError) as refused:
        archive.plan_archive_setup(fleet, "main")
    assert "db1 is the primary" in refused.value.message
    assert "igops pg switchover" in refused.value.hint and "--restart-primary" in refused.value.hint
    assert actions(archive.plan_archive_setup(fleet, "main", restart_primary=True))[-3:] == [
        "wait_streaming",
        "unpause_repmgrd",
        "check",
    ]


def test_a_fresh_cluster_gets_every_step_in_order(fleet, members):
    plan = archive.plan_archive_setup(fleet, "main", restart_primary=True)
    assert actions(plan) == [
        *STANDBYS_FIRST,
        "checkpoint",
        "pause",
        "restart_primary",
        "resume",
        "wait_streaming",
        "unpause_repmgrd",
        "check",
    ]
    pause = next(step for step in plan.actions if step.action == "pause")
    assert pause.release is not None and pause.release.action == "resume"
    alter = next(step for step in plan.actions if step.action == "alter_system")
    assert alter.args[1] == archive.wanted_settings(fleet, "main", fleet.host("db1"))
    # The journal keeps every step's title and arguments: no secret in them.
    assert SECRET not in repr(plan.actions)


def test_a_second_run_plans_nothing(fleet, members):
    for name in ("db1", "db2"):
        members.set_up(name)
    plan = archive.plan_archive_setup(fleet, "main")
    assert plan.actions == []
    assert plan.notes[0].startswith("nothing to do")


def test_only_the_member_that_differs_is_changed(fleet, members):
    for name in ("db1", "db2"):
        members.set_up(name)
    # db2 was rebuilt from a backup: its settings are there (ALTER SYSTEM travelled with the data
    # directory), its pgBackRest file is not; and its archive_mode waits for a restart.
    members.config["db2"] = None
    members.running["db2"]["archive_mode"] = "off"
    members.configured["db2"] = {"archive_mode": "on"}
    plan = archive.plan_archive_setup(fleet, "main")
    assert actions(plan) == [
        "write_config",
        "pause_repmgrd",
        "restart_member",
        "wait_streaming",
        "unpause_repmgrd",
        "check",
    ]
    assert all("db2" in step.title for step in plan.actions[:1] + plan.actions[2:4])


def test_a_changed_timeout_is_altered_without_a_restart(fleet, members):
    for name in ("db1", "db2"):
        members.set_up(name)
    members.running["db1"]["archive_timeout"] = "300"
    plan = archive.plan_archive_setup(fleet, "main")
    assert actions(plan) == ["alter_system", "check"]
    assert plan.actions[0].args == ("db1", {"archive_timeout": "30"})


def test_a_disabled_archive_command_counts_by_its_files(fleet, members):
    """archive_command shows "(disabled)" until archive_mode is on: once ALTER SYSTEM set it,
    only the restart is left."""
    for name in ("db1", "db2"):
        members.set_up(name)
    members.configured["db2"] = dict(members.running["db2"])
    members.running["db2"].update(archive_mode="off", archive_command="(disabled)")
    assert actions(archive.plan_archive_setup(fleet, "main")) == [
        "pause_repmgrd",
        "restart_member",
        "wait_streaming",
        "unpause_repmgrd",
        "check",
    ]


def test_a_missing_stanza_is_created(fleet, members):
    for name in ("db1", "db2"):
        members.set_up(name)
    members.stanza = [{"name": "main", "status": {"code": 1, "message": "missing stanza path"}}]
    assert actions(archive.plan_archive_setup(fleet, "main")) == ["stanza_create", "check"]


def test_pgbackrest_missing_is_refused(fleet, members, monkeypatch):
    original = members.ssh

    def without(fleet_, host, argv, timeout=60, stdin=None):
        result = original(fleet_, host, argv, timeout, stdin)
        if host.name == "db2":
            result.stdout = result.stdout.replace("version=pgBackRest 2.45", "version=")
        return result

    monkeypatch.setattr(archive, "ssh", without)
    with pytest.raises(RefusedError, match="not installed on db2"):
        archive.plan_archive_setup(fleet, "main", restart_primary=True)


# --- status -----------------------------------------------------------------------------------


def test_member_probe_parsing():
    probe = archive.parse_member_probe(
        "version=pgBackRest 2.45\ngroup=postgres\nconfig=abc123 root:postgres:640\ndir=postgres /var/spool/x y\n"
    )
    assert (probe.version, probe.group, probe.config_sha256, probe.config_owner) == (
        "2.45",
        "postgres",
        "abc123",
        "root:postgres:640",
    )
    assert probe.dirs == {"/var/spool/x y": "postgres"}
    assert archive.parse_member_probe("version=\ngroup=postgres\n").version is None


INFO = json.dumps(
    [
        {
            "name": "main",
            "status": {"code": 2, "message": "no valid backups"},
            "archive": [
                {
                    "database": {"id": 1},
                    "id": "15-1",
                    "min": "000000010000000000000003",
                    "max": "000000020000000000000009",
                }
            ],
            "backup": [],
        },
        {"name": "pg2", "status": {"code": 1, "message": "missing stanza path"}, "archive": []},
    ]
)


def test_info_parsing():
    info = archive.parse_info(INFO, "main")
    assert info.exists and info.status == "no valid backups"
    assert [(r.database, r.min_wal, r.max_wal) for r in info.ranges] == [
        ("15-1", "000000010000000000000003", "000000020000000000000009")
    ]
    assert not archive.parse_info(INFO, "pg2").exists
    assert archive.parse_info(INFO, "other").status == "no such stanza"
    assert not archive.parse_info("ERROR: [055]: unable to load info file", "main").exists


def test_backlog_parsing():
    text = f"ready=3\noldest_ready_age=42\nspool=4096\n-- info\n{INFO}"
    assert archive_status.parse_backlog(text) == (archive_status.Backlog(3, 42.0, 4096), INFO)
    assert archive_status.parse_backlog("ready=\nspool=0\n-- info\n")[0] == archive_status.Backlog(None, None, 0)


def stats(**changes):
    values = dict(
        archive_mode="on",
        archived_count=10,
        last_archived_wal="000000010000000000000009",
        last_archived_time="2026-12-04 02:00:00+00",
        last_archived_age_s=20.0,
        failed_count=0,
        last_failed_wal=None,
        last_failed_time=None,
        last_failed_age_s=None,
        current_wal="00000001000000000000000A",
    )
    return archive_status.ArchiverStats(**{**values, **changes})


REPO = archive.RepositoryInfo(True, "no valid backups")


def waiting(ready_files, oldest_ready_age_s=None):
    return archive_status.Backlog(ready_files, oldest_ready_age_s, 0)


def test_the_wait_is_the_oldest_segments_else_the_last_archives():
    assert waiting(0, 30.0).waited_s(stats(last_archived_age_s=5000.0)) == 0
    assert waiting(None).waited_s(stats()) == 0
    assert waiting(2, 3.0).waited_s(stats(last_archived_age_s=5000.0)) == 3.0
    assert waiting(2).waited_s(stats(last_archived_age_s=5000.0)) == 5000.0
    assert waiting(2).waited_s(stats(last_archived_age_s=None)) == float("inf")


def test_archiving_that_keeps_up_has_no_problem():
    assert archive_status.archive_problems(stats(), waiting(0), REPO, 60) == []
    # Quiet: nothing waits, however old the last archive is.
    assert archive_status.archive_problems(stats(last_archived_age_s=5000.0), waiting(0), REPO, 60) == []
    # Quiet, then a segment handed to the archiver a moment ago: no problem either.
    assert archive_status.archive_problems(stats(last_archived_age_s=5000.0), waiting(1, 3.0), REPO, 60) == []
    # An old failure, archived successfully since.
    old = stats(failed_count=2, last_failed_wal="X", last_failed_time="t", last_failed_age_s=900.0)
    assert archive_status.archive_problems(old, waiting(0), REPO, 60) == []


def test_archiving_problems():
    behind = archive_status.archive_problems(stats(last_archived_age_s=200.0), waiting(4, 190.0), REPO, 60)
    assert len(behind) == 1 and "4 segments wait to be archived, the oldest for 190 s" in behind[0]
    assert "120 s" in behind[0]
    unknown = archive_status.archive_problems(stats(last_archived_age_s=200.0), waiting(4), REPO, 60)
    assert len(unknown) == 1 and "for longer than the last archive" in unknown[0]
    failing = stats(
        failed_count=3, last_failed_wal="00000001000000000000000A", last_failed_time="t", last_failed_age_s=5.0
    )
    assert "failed 5 s ago" in archive_status.archive_problems(failing, waiting(1, 4.0), REPO, 60)[0]
    off = archive_status.archive_problems(
        stats(archive_mode="off"), waiting(0), archive.RepositoryInfo(False, "missing stanza path"), 60
    )
    assert len(off) == 2


def test_the_cli_without_archive_section_says_so(tmp_path):
    path = unit_inventory(tmp_path, HOSTS, sections=CLUSTER)
    result = run_igops("-c", str(path), "pg", "archive", "status", "main")
    assert result.returncode == 2
    assert "[archive]" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_lab_inventory_archives_through_the_tls_front(tmp_path):
    """The lab's [archive]: moto's bucket behind the TLS front, trusted through the lab CA, and
    every path per host (the lab's hosts share one machine)."""
    import tomllib

    from igops.lab import inventory as lab_inventory, s3tls
    from igops.lab.aws import AwsState
    from igops.lab.state import S3_TLS, WAL_BUCKET, Paths

    paths = Paths(tmp_path)
    text = lab_inventory.render(paths, [], AwsState(), {"main": "db1", "pg2": "db3"}, "redis1")
    model = inventory.validate(tomllib.loads(text), paths.inventory).model
    repo = model.archive.repository
    assert (repo.bucket, repo.endpoint, repo.port, repo.ca_file) == (
        WAL_BUCKET,
        S3_TLS[0],
        S3_TLS[1],
        str(s3tls.ca_file(paths)),
    )
    for template in (model.archive.config_file, model.archive.spool_path, model.archive.lock_path):
        assert "/hosts/{host}/pgbackrest/" in template
