"""Tables for people at 80 and 200 columns, --wide, --format plain|tsv and --watch, through the
real output layer (igops.output.Output on a rich Console of a forced width)."""

import io
import json
import os
import signal
import subprocess
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from rich.console import Console

from igops.cli import _watch_seconds_given, build_command, verbs
from igops.failover import PgClusterState, PgNode
from igops.output import Output
from igops.tables import Column, layout
from tests.conftest import IGOPS, ROOT, run_igops
from tests.unit.inventories import unit_inventory

BOX_DRAWING = set("┃│━╇─┼┏┓┗┛╋┡┩")
GROUP_ID = "db12-20261203T041500Z-9f3c"  # as snapshot.new_group_id makes them: 26 characters
LSNS = ("0/D2A3F0B8", "0/D2A3E100", "0/D29F0000")


def output(
    width: int,
    table_format: str = "table",
    wide: bool = False,
    terminal: bool = True,
    command: str = "pg status",
    json_mode: bool = False,
) -> tuple[Output, io.StringIO]:
    out = Output(command, json_mode=json_mode, table_format=table_format, wide=wide)
    screen = io.StringIO()
    out._out = Console(file=screen, width=width, force_terminal=terminal, color_system=None, highlight=False)
    out._err = Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)
    return out, screen


def cluster() -> PgClusterState:
    primary = PgNode(
        "db11",
        "10.0.1.11",
        "primary",
        "running",
        timeline=3,
        lsn=LSNS[0],
        repmgr="primary",
        repmgrd="running",
        pgbouncer=["pgb1:main", "pgb2:main"],
    )
    standby = PgNode(
        "db12",
        "10.0.1.12",
        "standby",
        "running",
        timeline=3,
        lsn=LSNS[1],
        received_lsn=LSNS[1],
        replayed_lsn=LSNS[2],
        lag_bytes=21168,
        lag_s=0.4,
        streaming_from="db11",
        repmgr="standby of db11",
        repmgrd="running",
    )
    down = PgNode("db13", "10.0.1.13", "unknown", "host unreachable", repmgr="standby of db11 (inactive)")
    return PgClusterState("main", [primary, standby, down], "db11", {}, {})


def snapshot_groups() -> list:
    created = datetime(2026, 12, 3, 4, 15, tzinfo=UTC)
    return [
        SimpleNamespace(
            group_id=GROUP_ID,
            host="db12",
            mounts=["/data", "/var/lib/postgresql"],
            volumes=4,
            expected=4,
            state="complete",
            created=created,
            size_gib=1600,
            freeze_ms=412.0,
            kept=None,
        ),
        SimpleNamespace(
            group_id="db12-20261202T041500Z-0a1e",
            host="db12",
            mounts=["/data"],
            volumes=3,
            expected=4,
            state="incomplete",
            created=created,
            size_gib=1200,
            freeze_ms=None,
            kept=None,
        ),
    ]


def show_snapshot_list(out: Output) -> None:
    from igops.commands.snapshot import GROUP_COLUMNS, _group_row

    out.table("2 snapshot groups", GROUP_COLUMNS, [_group_row(group) for group in snapshot_groups()])


def show_pg_status(out: Output) -> None:
    from igops.commands.pg import show_state

    show_state(out, cluster())


def lines_of(screen: io.StringIO) -> list[str]:
    return screen.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 200])
def test_snapshot_list_keeps_group_ids_whole(width):
    out, screen = output(width)
    show_snapshot_list(out)
    text = screen.getvalue()
    assert GROUP_ID in text and "db12-20261202T041500Z-0a1e" in text
    assert "complete" in text and "incomplete" in text
    assert all(len(line.rstrip()) <= width for line in lines_of(screen)), text


@pytest.mark.parametrize("width", [80, 200])
def test_pg_status_keeps_lsns_roles_and_nodes_whole(width):
    out, screen = output(width)
    show_pg_status(out)
    text = screen.getvalue()
    for word in ("db11", "db12", "db13", "primary", "standby", "unknown", LSNS[0], LSNS[1]):
        assert word in text, (word, text)
    assert all(len(line.rstrip()) <= width for line in lines_of(screen)), text


def test_at_80_columns_secondary_columns_are_hidden_and_named():
    out, screen = output(80)
    show_pg_status(out)
    text = screen.getvalue()
    header = next(line for line in lines_of(screen) if line.startswith("node"))
    assert "LSN" in header and "repmgr" not in header and "replayed" not in header
    assert "hidden to fit 80 columns:" in " ".join(text.split()) and "--wide" in text


def test_at_200_columns_every_column_shows():
    out, screen = output(200)
    show_pg_status(out)
    header = next(line for line in lines_of(screen) if line.startswith("node"))
    for name in ("role", "state", "TL", "LSN", "received", "replayed", "lag", "streams from", "repmgr", "PgBouncer"):
        assert name in header, name
    assert LSNS[2] in screen.getvalue() and "hidden" not in screen.getvalue()


def test_wide_shows_every_column_at_80():
    out, screen = output(80, wide=True)
    show_pg_status(out)
    text = screen.getvalue()
    header = next(line for line in lines_of(screen) if line.startswith("node"))
    for name in ("received", "replayed", "streams from", "repmgr", "PgBouncer"):
        assert name in header, name
    # Every value whole, on its row: the line runs past 80 columns rather than cut one.
    for word in (*LSNS, "standby of db11 (inactive)", "pgb1:main, pgb2:main"):
        assert word in text, word
    assert "hidden" not in text


def test_free_text_wraps_at_word_breaks_and_never_cuts():
    out, screen = output(40)
    out.table(
        None,
        ["host", Column("detail", wrap=True)],
        [["db12", "connection refused by 10.0.1.12:22: is sshd running there?"]],
    )
    text = screen.getvalue()
    assert "…" not in text and "10.0.1.12:22:" in text
    assert all(len(line.rstrip()) <= 40 for line in lines_of(screen)), text


def test_an_identifier_wider_than_the_terminal_is_printed_whole():
    path = "/var/lib/postgresql/15/main/base/16384/2619_fsm"
    out, screen = output(40)
    out.table(None, ["file", "cached"], [[path, "8.0 KiB"]])
    assert path in screen.getvalue() and "…" not in screen.getvalue()


def test_plain_has_aligned_columns_and_no_box_drawing():
    out, screen = output(80, table_format="plain")
    show_snapshot_list(out)
    text = screen.getvalue()
    assert not set(text) & BOX_DRAWING
    rows = [line.split() for line in lines_of(screen)]
    assert [GROUP_ID, "db12"] == next(row for row in rows if row and row[0] == GROUP_ID)[:2]
    header = next(line for line in lines_of(screen) if line.startswith("group"))
    row = next(line for line in lines_of(screen) if line.startswith(GROUP_ID))
    assert header.index("host") == row.index(" db12 ") + 1


def test_tsv_is_a_header_row_and_tab_separated_rows_only():
    out, screen = output(80, table_format="tsv")
    show_pg_status(out)
    lines = lines_of(screen)
    assert lines[0].split("\t") == [
        "node",
        "role",
        "state",
        "TL",
        "LSN",
        "received",
        "replayed",
        "lag",
        "streams from",
        "repmgr",
        "PgBouncer",
    ]
    assert lines[1].split("\t") == [
        "db11",
        "primary",
        "running",
        "3",
        LSNS[0],
        "",
        "",
        "",
        "",
        "primary; repmgrd running",
        "pgb1:main, pgb2:main",
    ]
    assert lines[2].split("\t")[4:7] == [LSNS[1], LSNS[1], LSNS[2]]
    assert len(lines) == 4 and all(line.count("\t") == 10 for line in lines)
    assert not set(screen.getvalue()) & BOX_DRAWING


def test_tsv_sends_sentences_to_stderr_and_separates_tables_by_one_empty_line():
    out, screen = output(80, table_format="tsv", command="status")
    out.table("hosts", ["host", "ssh"], [["web1", "ok"]])
    out.text("all hosts reachable")
    out.table("services", ["service", "state"], [["gunicorn", "ok"], ["nginx", "DOWN"]])
    assert screen.getvalue() == "host\tssh\nweb1\tok\n\nservice\tstate\ngunicorn\tok\nnginx\tDOWN\n"
    assert "all hosts reachable" in out.err.file.getvalue()


def test_tsv_strips_a_cells_markup_and_flattens_tabs_and_line_breaks():
    out, screen = output(80, table_format="tsv", command="check")
    out.table(None, ["check", "status", Column("detail", wrap=True)], [["ssh", "[red]CRITICAL[/]", "a\tb\nc"]])
    assert screen.getvalue().splitlines()[1] == "ssh\tCRITICAL\ta b c"


def test_piped_output_hides_and_wraps_nothing():
    out, screen = output(80, terminal=False)
    out._out.width = 400  # as Output sets it for output that is not a terminal
    show_pg_status(out)
    text = screen.getvalue()
    assert not set(text) & BOX_DRAWING and "hidden" not in text
    assert any(line.split()[:1] == ["db13"] and "standby of db11 (inactive)" in line for line in lines_of(screen))


def test_layout_hides_the_highest_rank_first_then_the_rightmost():
    columns = [Column("id"), Column("a", drop=1), Column("b", drop=2), Column("c", drop=2)]
    cells = [["x" * 20, "y" * 20, "z" * 20, "w" * 20]]
    assert layout(columns, cells, 70, ruled=True).hidden == ["c"]
    assert layout(columns, cells, 47, ruled=True).hidden == ["b", "c"]
    assert layout(columns, cells, 10, ruled=True).hidden == ["a", "b", "c"]
    assert layout(columns, cells, 10, ruled=True, wide=True).hidden == []
    assert layout(columns, cells, None, ruled=False).widths == [20, 20, 20, 20]


def test_layout_wraps_free_text_to_its_least_even_when_identifiers_overflow():
    """Identifiers alone wider than the terminal: the table runs wider by that much only, with
    its free text still wrapped, rather than every column at full width."""
    columns = [Column("path"), Column("detail", wrap=True)]
    cells = [["/" + "x" * 59, "a sentence of free text that would take a long line on its own"]]
    fit = layout(columns, cells, 40, ruled=True)
    assert fit.widths == [60, 10] and fit.total == 73
    assert layout(columns, cells, 40, ruled=True, wide=True).widths == [60, 62]


# --- every table a person reads at 80 columns ---------------------------------------------------
# Representative rows as the commands make them; at 80 columns every line fits and every
# identifier shown (what a person pastes into the next command) is whole on one line.
OP_IDS = ("20261203-071530-a3f9", "20261202-221004-0b7e", "20261201-093312-5c1d")
AUDIT_TIMES = ("2026-12-03T07:15:30.412+00:00", "2026-12-03T07:19:02.877+00:00", "2026-12-03T08:02:11.030+00:00")


def show_check(out: Output, newest_group: str | None = None) -> list[str]:
    """The check table; with `newest_group`, the snapshot check names that group (an identifier
    inside free text, which wraps around it and never through it)."""
    from igops.checks import Result
    from igops.checks.fleet import disk_result
    from igops.commands.check import CHECK_COLUMNS, result_row
    from igops.errors import NagiosStatus

    gib = 1024**3
    mount = {
        "mounted": True,
        "bytes_total": 600 * gib,
        "bytes_free": 118 * gib,
        "bytes_available": 112 * gib,
        "inodes_total": 39_321_600,
        "inodes_free": 38_500_000,
    }
    results = [
        Result("ssh", "db12", NagiosStatus.OK, "load 0.42 0.37 0.30", duration_ms=38.2),
        disk_result("db1:/var/lib/postgresql/wal", mount, 80, 90, 41.0),
        Result(
            "postgres-standby",
            "db13",
            NagiosStatus.CRITICAL,
            "not streaming from db11 (primary reports state catchup); its WAL receiver is stopped",
            duration_ms=1204.7,
        ),
        Result(
            "postgres-repmgrd",
            "db11",
            NagiosStatus.WARNING,
            "repmgrd paused (`igops pg switchover main --to PRIMARY` unpauses it)",
            duration_ms=233.0,
        ),
        Result(
            "http-app",
            "web1",
            NagiosStatus.CRITICAL,
            "GET /healthz -> 503 (postgres: connection refused; redis: timeout after 2 s) on :8000 (twice)",
            duration_ms=4012.9,
        ),
        Result(
            "snapshot",
            "pg main",
            NagiosStatus.OK if newest_group else NagiosStatus.CRITICAL,
            f"newest complete group {newest_group} (on db12) is 3 h 12 min old"
            if newest_group
            else "no complete snapshot group of pg main",
            duration_ms=95.1,
        ),
    ]
    out.table(None, CHECK_COLUMNS, [result_row(result) for result in results])
    return ["db1:/var/lib/postgresql/wal", "postgres-standby", "postgres-repmgrd", "CRITICAL", "WARNING", "pg main"]


def audit_records() -> list[dict]:
    base = {"user": "alice", "host": "ops-laptop", "pid": 48213, "sudo_user": None}
    switchover = "igops pg switchover main --to db12 --yes"
    return [
        {
            **base,
            "time": AUDIT_TIMES[0],
            "operation": OP_IDS[0],
            "command": switchover,
            "targets": ["main"],
            "result": "started",
            "exit_code": None,
            "reason": "kernel upgrade on db11 (CHG-4711)",
        },
        {
            **base,
            "time": AUDIT_TIMES[1],
            "operation": OP_IDS[0],
            "command": switchover,
            "targets": ["main"],
            "result": "switchover: db12 is the primary of main",
            "exit_code": 0,
            "reason": "kernel upgrade on db11 (CHG-4711)",
        },
        {
            **base,
            "time": AUDIT_TIMES[2],
            "command": "igops check --page",
            "targets": ["postgres-standby db13"],
            "result": "paged: 1 triggered, 0 resolved, 0 failed",
            "exit_code": 0,
        },
    ]


def show_ops_history(out: Output) -> list[str]:
    from igops.commands.ops import HISTORY_COLUMNS, history_row

    out.table(None, HISTORY_COLUMNS, [history_row(record) for record in audit_records()])
    return list(AUDIT_TIMES)


def show_ops_list_all(out: Output) -> list[str]:
    from igops.commands.ops import LIST_COLUMNS, list_row

    base = {"user": "alice", "host": "ops-laptop", "pid": 48213, "started": AUDIT_TIMES[0]}
    records = [
        {
            **base,
            "id": OP_IDS[0],
            "kind": "pg-switchover",
            "targets": ["main"],
            "status": "switchover: db12 is the primary of main",
            "reason": "kernel upgrade on db11 (CHG-4711)",
        },
        {
            **base,
            "id": OP_IDS[1],
            "kind": "snapshot-restore",
            "targets": ["db14"],
            "status": "interrupted",
            "step": {"number": 4, "title": "db14: attach the volumes made from db12-20261203T041500Z-9f3c"},
        },
        {
            **base,
            "id": OP_IDS[2],
            "kind": "shard-move",
            "targets": ["shard 17", "main", "users2"],
            "status": "move 9 done, writes blocked 412 ms",
            "reason": "rebalance before the sale",
        },
    ]
    out.table(None, LIST_COLUMNS, [list_row(record) for record in records])
    return [*OP_IDS, "pg-switchover", "snapshot-restore", "shard-move"]


def show_ops_kinds(out: Output) -> list[str]:
    from igops.commands.ops import KINDS_COLUMNS
    from igops.operations import conflicts

    rows = conflicts.table_rows()
    out.table(None, KINDS_COLUMNS, [list(row) for row in rows])
    return [kind for kind, _, _ in rows]


def show_lab_status(out: Output) -> list[str]:
    from igops.commands.lab import LAB_COLUMNS, component_row
    from igops.lab.health import Component

    components = [
        Component("ssh", "db1", "127.0.10.21:2222", True, "load 0.31"),
        Component("ssh", "redis2", "127.0.10.32:2222", False, "connection refused by 127.0.10.32:2222"),
        Component("postgres", "db1", "127.0.10.21:5432", True, "primary, timeline 185, 2 standbys streaming"),
        Component("write via pgbouncer", "pgb1", "127.0.10.20:6432/directory", True, "INSERT and rollback in 4 ms"),
        Component("etcd", "etcd2", "127.0.10.52:2379", True, "healthy"),
        Component("pagerduty-receiver", "-", "127.0.10.60:8025", False, "[Errno 111] Connection refused"),
        Component("volume data", "db1", "/var/lib/igops-lab/hosts/db1/data", True, "ext4 on /dev/loop3"),
        Component("volume wal", "db4", "/var/lib/igops-lab/hosts/db4/wal", False, "not mounted"),
    ]
    out.table("lab at /var/lib/igops-lab", LAB_COLUMNS, [component_row(c) for c in components])
    return ["pgb1", "redis2", "etcd2", "db4", "DOWN"]


TABLES = {
    "check": show_check,
    "ops history": show_ops_history,
    "ops list --all": show_ops_list_all,
    "ops kinds": show_ops_kinds,
    "lab status": show_lab_status,
}


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("name", list(TABLES))
def test_every_table_fits_and_keeps_identifiers_whole(name, width):
    out, screen = output(width)
    identifiers = TABLES[name](out)
    text = screen.getvalue()
    assert all(len(line.rstrip()) <= width for line in lines_of(screen)), (name, width, text)
    for identifier in identifiers:
        assert any(identifier in line for line in lines_of(screen)), (name, identifier, text)


def test_a_table_runs_wider_than_80_only_by_what_its_identifiers_need():
    """A check target of 27 characters beside a group id in the snapshot check's text: the
    check, target and status columns and that id alone need more than 80 columns. The text
    around the id still wraps; only those identifiers push the table past 80."""
    out, screen = output(80)
    identifiers = show_check(out, newest_group=GROUP_ID)
    text = screen.getvalue()
    needed = len("postgres-repmgrd") + len("db1:/var/lib/postgresql/wal") + len("CRITICAL") + len(GROUP_ID) + 3 * 3
    assert needed > 80 and max(len(line.rstrip()) for line in lines_of(screen)) == needed, text
    for identifier in (*identifiers, GROUP_ID):
        assert any(identifier in line for line in lines_of(screen)), (identifier, text)
    assert "is 3 h 12 min old" not in text  # wrapped to the id's width, not kept on one line


def test_lab_status_gives_up_the_endpoint_first_and_shows_it_whole_when_wide():
    narrow, screen = output(80)
    show_lab_status(narrow)
    assert "hidden to fit 80 columns: endpoint" in " ".join(screen.getvalue().split())
    assert "not mounted" in screen.getvalue() and "[Errno 111] Connection refused" in screen.getvalue()
    for out, screen in (output(200), output(80, wide=True)):
        show_lab_status(out)
        for endpoint in ("127.0.10.20:6432/directory", "/var/lib/igops-lab/hosts/db1/data"):
            assert any(endpoint in line for line in lines_of(screen)), (endpoint, screen.getvalue())


def test_ops_history_shows_the_reason_at_80_columns():
    out, screen = output(80)
    show_ops_history(out)
    header = lines_of(screen)[0]
    for name in ("time", "command", "result", "reason"):
        assert name in header.split(), (name, screen.getvalue())
    assert "(CHG-4711)" in screen.getvalue()


# --- --watch ----------------------------------------------------------------------------------
class Interrupted:
    """A sleep that lets `refreshes` refreshes happen, then is Ctrl-C."""

    def __init__(self, refreshes: int):
        self.left = refreshes
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.left -= 1
        if self.left <= 0:
            raise KeyboardInterrupt


def test_watch_prints_one_envelope_per_refresh_as_json_lines(capsys):
    out, _ = output(80, json_mode=True)
    refreshes = iter(range(100))

    def show():
        with out.step("read the cluster"):
            pass
        return {"refresh": next(refreshes)}, 5

    sleep = Interrupted(3)
    out.watch(2, show, sleep=sleep)
    lines = capsys.readouterr().out.splitlines()
    envelopes = [json.loads(line) for line in lines]
    assert [envelope["data"]["refresh"] for envelope in envelopes] == [0, 1, 2]
    assert all(envelope["exit_code"] == 5 and len(envelope["steps"]) == 1 for envelope in envelopes)
    assert sleep.slept == [2, 2, 2]


def test_watch_redraws_the_terminal_under_a_heading():
    out, screen = output(80)
    calls = []

    def show():
        calls.append(1)
        show_pg_status(out)
        return {}, 0

    out.watch(0.5, show, sleep=Interrupted(2))
    text = screen.getvalue()
    assert len(calls) == 2
    assert text.count("\x1b[2J") == 2  # the screen cleared before each refresh is swapped in
    assert text.count("every 0.5 s: igops pg status") == 2 and LSNS[0] in text


def test_watch_on_a_pipe_appends_refreshes_and_tsv_keeps_only_rows():
    out, screen = output(80, table_format="tsv", terminal=False)

    def show():
        out.table(None, ["node", "LSN"], [["db11", LSNS[0]]])
        return {}, 0

    out.watch(1, show, sleep=Interrupted(2))
    assert screen.getvalue() == f"node\tLSN\ndb11\t{LSNS[0]}\n\nnode\tLSN\ndb11\t{LSNS[0]}\n"


def test_a_bare_watch_gets_the_default_seconds():
    assert _watch_seconds_given(["pg", "status", "--watch"]) == ["pg", "status", "--watch", "2"]
    assert _watch_seconds_given(["pg", "status", "--watch", "main"]) == ["pg", "status", "--watch", "2", "main"]
    assert _watch_seconds_given(["pg", "status", "--watch", "0.5", "main"]) == [
        "pg",
        "status",
        "--watch",
        "0.5",
        "main",
    ]
    assert _watch_seconds_given(["exec", "--", "tool", "--watch"]) == ["exec", "--", "tool", "--watch"]


# --- through the real command line --------------------------------------------------------------
def inventory(tmp_path):
    return str(unit_inventory(tmp_path, [("web1", "127.0.20.250", "app"), ("web2", "127.0.20.251", "app")]))


def test_format_tsv_and_plain_through_the_cli(tmp_path):
    config = inventory(tmp_path)
    tsv = run_igops("-c", config, "hosts", "--format", "tsv")
    assert tsv.returncode == 0, tsv.stderr
    assert tsv.stdout.splitlines() == [
        "host\taddress\tssh\troles\tinstance\tdata mounts",
        "web1\t127.0.20.250\troot:22\tapp\t\t",
        "web2\t127.0.20.251\troot:22\tapp\t\t",
    ]
    plain = run_igops("--format", "plain", "-c", config, "hosts", "--wide")
    assert plain.returncode == 0 and not set(plain.stdout) & BOX_DRAWING
    assert any(line.split()[:2] == ["web1", "127.0.20.250"] for line in plain.stdout.splitlines())
    bad = run_igops("-c", config, "hosts", "--format", "yaml", "--json")
    assert bad.returncode == 2 and "--format" in json.loads(bad.stdout)["error"]["message"]


def test_every_verb_takes_format_and_wide():
    for _, verb in verbs(build_command()):
        names = {name for param in verb.params for name in param.opts}
        assert {"--format", "--wide", "--json"} <= names, verb.name


@pytest.mark.parametrize("verb", [["status"], ["pg", "status"], ["redis", "status"], ["warm", "show"]])
def test_watch_is_offered(verb):
    assert "--watch [SECONDS]" in run_igops(*verb, "--help").stdout


def test_ctrl_c_ends_a_watch_with_exit_0(tmp_path):
    """`igops status --watch 0.2 --json` against hosts where nothing answers: an envelope a line
    per refresh, and SIGINT (Ctrl-C) ends it with exit 0."""
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen(
        [*IGOPS, "-c", inventory(tmp_path), "status", "--watch", "0.2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    envelopes = [json.loads(line) for line in lines + rest.splitlines()]
    assert process.returncode == 0, errors
    assert len(envelopes) >= 2 and all(envelope["command"] == "status" for envelope in envelopes)
    assert {host["host"] for host in envelopes[0]["data"]["hosts"]} == {"web1", "web2"}
