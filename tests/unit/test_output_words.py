"""Words the output layer puts together: counts agree with their nouns."""

import pytest

from igops.output import plural


@pytest.mark.parametrize(("count", "expected"), [(0, "0 hosts"), (1, "1 host"), (2, "2 hosts")])
def test_plural_agrees(count, expected):
    assert plural(count, "host") == expected


def test_plural_with_an_irregular_noun():
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"


def test_hosts_table_title_says_one_host(tmp_path):
    from tests.conftest import run_igops

    path = tmp_path / "igops.toml"
    path.write_text(
        f'[fleet]\nname = "unit"\nstate_dir = "{tmp_path}"\n'
        '[[hosts]]\nname = "web1"\naddress = "127.0.0.1"\nroles = ["app"]\n'
    )
    result = run_igops("-c", str(path), "hosts")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unit: 1 host ") and "1 hosts" not in result.stdout


def test_a_pg_node_state_reads_as_a_state():
    """ "db2: host unreachable", not "db2 is host unreachable"."""
    from types import SimpleNamespace

    from igops import failover
    from igops.pg import cluster as pg_cluster

    nodes = [
        failover.PgNode("db1", "10.0.0.21", "primary", "running"),
        failover.PgNode("db2", "10.0.0.22", "unknown", "host unreachable"),
    ]
    state = failover.PgClusterState("main", nodes, "db1", {}, {})
    fleet = SimpleNamespace(model=SimpleNamespace(postgres=SimpleNamespace(max_lag_bytes=1 << 20)))
    problems = pg_cluster.pg_problems(fleet, state, ["db1"], pg_cluster.PgView(None, "main", {}, {}, {}, []))
    assert "db2: host unreachable" in problems


def test_piped_tables_have_no_box_drawing(tmp_path):
    from tests.conftest import run_igops

    path = tmp_path / "igops.toml"
    path.write_text(
        f'[fleet]\nname = "unit"\nstate_dir = "{tmp_path}"\n'
        '[[hosts]]\nname = "web1"\naddress = "127.0.0.1"\nroles = ["app"]\n'
    )
    result = run_igops("-c", str(path), "hosts")
    assert result.returncode == 0, result.stderr
    assert not set(result.stdout) & set("┃│━╇─┼┏┓┗┛╋")
    assert any(line.split()[:2] == ["web1", "127.0.0.1"] for line in result.stdout.splitlines())


def test_no_count_is_glued_to_a_plural_noun_in_the_source():
    """A count put before a plural noun by hand says "1 hosts" when it is one: counts go through
    plural(). The agents run alone on hosts (no igops import) and spell their few counts out."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "igops"
    glued = re.compile(r"\{len\([^{}]*\)\} (?!(?:is|was|has|does|lacks|accepts|bytes|as)\b)[a-z]+s\b")
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if "agent" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if glued.search(line)
    ]
    assert found == []


def test_nagios_line_says_one_check():
    from igops.checks import Result, nagios
    from igops.errors import NagiosStatus

    line, _ = nagios.line("lab", [Result("ssh", "app1", NagiosStatus.OK, "reachable")], 0.1)
    assert "lab: 1 check OK" in line
    line, _ = nagios.line("lab", [Result("ssh", "app1", NagiosStatus.CRITICAL, "refused")], 0.1)
    assert "1 critical of 1 check:" in line
