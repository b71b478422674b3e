"""igops check without a fleet: Nagios output and perfdata, the runner's deadline, dedup keys,
Pingdom's limit headers, Munin parsing and limits, and the shipped plugin's config."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from igops.checks import Perf, Probe, Result, counts, level, munin, nagios, overall, pingdom, run_all
from igops.errors import ExitCode, NagiosStatus
from igops.pagerduty import incidents as pagerduty
from tests.conftest import run_igops
from tests.unit.inventories import unit_inventory

PLUGIN = Path(__file__).resolve().parents[2] / "igops" / "munin_plugins" / "igops_"


def test_perfdata_items_follow_the_plugin_convention():
    assert nagios.perf_item(Perf("disk db1:/data", 81.25, "%", 80, 90, 0, 100)) == "'disk db1:/data'=81.25%;80;90;0;100"
    assert nagios.perf_item(Perf("checks", 12, minimum=0)) == "'checks'=12;;;0"
    assert nagios.perf_item(Perf("lag", 0.5, "s")) == "'lag'=0.5s"
    assert nagios.perf_item(Perf("it's|a=b", 1)) == "'it''s/a_b'=1"


def test_nagios_line_is_one_line_with_the_worst_status_and_problems_first():
    results = [
        Result("ssh", "app1", NagiosStatus.OK, "reachable"),
        Result("disk", "db1:/data", NagiosStatus.WARNING, "85% used", [Perf("disk db1:/data", 85, "%", 80, 90)]),
        Result("http-app", "app2", NagiosStatus.CRITICAL, "GET /health: refused |\nbad"),
    ]
    line, status = nagios.line("lab", results, 0.8123)
    assert status == NagiosStatus.CRITICAL
    assert "\n" not in line and line.count("|") == 1
    text, perfdata = line.split(" | ")
    assert text.startswith("IGOPS CRITICAL - lab: 1 critical, 1 warning of 3 checks: http-app app2:")
    assert text.index("http-app app2") < text.index("disk db1:/data")
    assert "'checks'=3;;;0 'critical'=1;;;0 'warning'=1;;;0 'unknown'=0;;;0 'duration'=0.812s;;;0" in perfdata
    assert "'disk db1:/data'=85%;80;90" in perfdata


def test_nagios_ok_and_long_problem_lists_stay_short():
    line, status = nagios.line("lab", [Result("ssh", f"h{i}", NagiosStatus.OK, "ok") for i in range(3)], 0.1)
    assert status == NagiosStatus.OK and line.startswith("IGOPS OK - lab: 3 checks OK | ")
    many = [Result("ssh", f"host{i}", NagiosStatus.CRITICAL, "x" * 300) for i in range(20)]
    line, _ = nagios.line("lab", many, 1.0)
    assert len(line.split(" | ")[0]) <= nagios.MAX_TEXT + len("IGOPS CRITICAL - ")
    assert nagios.unknown("bad\ninventory | x") == "IGOPS UNKNOWN - bad inventory / x"


def test_a_secret_is_redacted_before_the_line_is_cleaned_or_cut(monkeypatch):
    """A secret holding a `|` or blanks, or cut at the limit, no longer matches once the line is
    rewritten: it is redacted first."""
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    secret = "s3cr3t|tok3n  with\tblanks-0123456789"
    secrets.register(secret)
    results = [Result("http-app", "app2", NagiosStatus.CRITICAL, f"GET /health said {secret}")]
    line, _ = nagios.line("lab", results, 0.1)
    assert "s3cr3t" not in line and "tok3n" not in line and "***" in line
    long_one = [Result("http-app", "app2", NagiosStatus.CRITICAL, "x" * (nagios.MAX_TEXT - 60) + secret)]
    line, _ = nagios.line("lab", long_one, 0.1)
    assert "s3cr3t" not in line
    assert "s3cr3t" not in nagios.unknown(f"inventory said {secret}")


def test_overall_status_ranks_critical_warning_unknown_ok():
    make = lambda *states: [Result("c", str(i), s, "") for i, s in enumerate(states)]  # noqa: E731
    assert overall(make(NagiosStatus.OK, NagiosStatus.UNKNOWN)) == NagiosStatus.UNKNOWN
    assert overall(make(NagiosStatus.UNKNOWN, NagiosStatus.WARNING)) == NagiosStatus.WARNING
    assert overall(make(NagiosStatus.WARNING, NagiosStatus.CRITICAL, NagiosStatus.OK)) == NagiosStatus.CRITICAL
    assert overall([]) == NagiosStatus.OK
    assert counts(make(NagiosStatus.OK, NagiosStatus.OK, NagiosStatus.CRITICAL)) == {
        "ok": 2,
        "warning": 0,
        "critical": 1,
        "unknown": 0,
    }
    assert level(79.9, 80, 90) == NagiosStatus.OK and level(80, 80, 90) == NagiosStatus.WARNING
    assert level(95, 80, 90) == NagiosStatus.CRITICAL and level(5, None, None) == NagiosStatus.OK


def test_runner_returns_at_the_deadline_and_names_what_did_not_answer():
    release = threading.Event()

    def hangs(report):
        report(Result("redis-master", "redis1", NagiosStatus.OK, "master"))
        release.wait(30)

    def fails(report):
        raise ValueError("broken probe")

    probes = [
        Probe("fast", [("ssh", "a")], lambda report: report(Result("ssh", "a", NagiosStatus.OK, "ok"))),
        Probe("hangs", [("redis-master", "redis1"), ("redis-replica", "redis2")], hangs),
        Probe("fails", [("memcached", "cache1")], fails),
    ]
    started = time.monotonic()
    results = run_all(probes, timeout=0.5)
    elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 1.5
    by_key = {result.key: result for result in results}
    assert [result.key for result in results] == [
        ("ssh", "a"),
        ("redis-master", "redis1"),
        ("redis-replica", "redis2"),
        ("memcached", "cache1"),
    ]
    assert by_key[("redis-master", "redis1")].status == NagiosStatus.OK
    assert by_key[("redis-replica", "redis2")].status == NagiosStatus.CRITICAL
    assert by_key[("redis-replica", "redis2")].summary == "no answer within 0.5 s"
    assert by_key[("memcached", "cache1")].status == NagiosStatus.UNKNOWN
    assert "broken probe" in by_key[("memcached", "cache1")].summary


def test_a_member_answering_in_its_live_role_stands_for_the_inventorys_role():
    """After a failover the inventory still lists db1 first: "postgres-primary db1" is answered
    as "postgres-standby db1", in the inventory's order, and not as a missing answer."""

    def swapped(report):
        report(Result("postgres-primary", "db2", NagiosStatus.OK, "writable"))
        report(Result("postgres-standby", "db1", NagiosStatus.OK, "streaming"))

    def half(report):
        report(Result("postgres-primary", "db4", NagiosStatus.OK, "writable"))
        raise ValueError("broken probe")

    probes = [
        Probe("main", [("postgres-primary", "db1"), ("postgres-standby", "db2")], swapped),
        Probe("pg2", [("postgres-primary", "db3"), ("postgres-standby", "db4")], half),
    ]
    results = run_all(probes, timeout=5)
    assert [(r.key, r.status) for r in results] == [
        (("postgres-standby", "db1"), NagiosStatus.OK),
        (("postgres-primary", "db2"), NagiosStatus.OK),
        (("postgres-primary", "db3"), NagiosStatus.UNKNOWN),
        (("postgres-primary", "db4"), NagiosStatus.OK),
    ]


def test_the_live_primary_is_the_member_out_of_recovery_and_of_two_the_one_streamed_from():
    from igops.checks.probe_context import MemberView, live_primary

    cluster = SimpleNamespace(primary="db1", standbys=["db2", "db3"])
    standby, down = MemberView(in_recovery=True, receiver="streaming"), MemberView(error="connection refused")
    assert live_primary(cluster, {"db1": down, "db2": MemberView(in_recovery=False), "db3": standby}) == "db2"
    assert live_primary(cluster, {"db1": standby, "db2": standby, "db3": down}) is None
    streamed = MemberView(in_recovery=False, replication={"db3": ("streaming", 0)})
    assert live_primary(cluster, {"db1": MemberView(in_recovery=False), "db2": streamed, "db3": standby}) == "db2"
    assert (
        live_primary(
            cluster, {"db1": MemberView(in_recovery=False), "db2": MemberView(in_recovery=False), "db3": standby}
        )
        == "db1"
    )


def test_a_standbys_lag_is_from_where_it_says_it_replayed_not_its_last_report():
    """After a WAL segment switch on a quiet primary, pg_stat_replication's replay_lsn (the
    standby's report of up to 10 s ago) trails by the rest of the segment: the lag is the primary's
    position less the standby's own replay position, and never below zero."""
    from igops.checks.postgres_probes import _standby_result
    from igops.checks.probe_context import MemberView

    thresholds = SimpleNamespace(replication_lag_warning_bytes=1 << 20, replication_lag_critical_bytes=16 << 20)
    stale_report = ("streaming", 16180416)
    replayed = MemberView(in_recovery=True, receiver="streaming", wal_lsn=0x5000000)
    judged = _standby_result("db1", "db2", stale_report, None, replayed, 0x5000000, thresholds, 1.0)
    assert judged.status == NagiosStatus.OK and "replay lag 0 bytes" in judged.summary
    ahead_of_the_read = _standby_result("db1", "db2", stale_report, None, replayed, 0x4FFFF00, thresholds, 1.0)
    assert "replay lag 0 bytes" in ahead_of_the_read.summary
    behind = _standby_result("db1", "db2", ("streaming", 0), None, replayed, 0x5000000 + (2 << 20), thresholds, 1.0)
    assert behind.status == NagiosStatus.WARNING and f"replay lag {2 << 20} bytes" in behind.summary
    unknown = MemberView(in_recovery=True, receiver="streaming")
    reported = _standby_result("db1", "db2", stale_report, None, unknown, 0x5000000, thresholds, 1.0)
    assert reported.status == NagiosStatus.WARNING and "16180416" in reported.summary


def test_dedup_keys_are_stable_per_fleet_check_and_target():
    key = pagerduty.dedup_key("lab", "http-app", "app2")
    assert key == "igops/lab/http-app/app2" == pagerduty.dedup_key("lab", "http-app", "app2")
    assert key != pagerduty.dedup_key("lab", "http-app", "app3")
    assert key != pagerduty.dedup_key("prod", "http-app", "app2")
    assert pagerduty.dedup_key("my fleet", "disk", "db1:/var/lib/x y") == "igops/my_fleet/disk/db1:/var/lib/x_y"
    assert len(pagerduty.dedup_key("f", "c", "t" * 400)) == 255


def test_pingdom_limit_headers_parse():
    assert pingdom.parse_limit("Remaining: 394 Time until reset: 3589") == pingdom.RateLimit(394, 3589)
    assert pingdom.parse_limit("remaining: 0 time until reset: 12") == pingdom.RateLimit(0, 12)
    assert pingdom.parse_limit(None) is None and pingdom.parse_limit("garbage") is None
    assert [pingdom.parse_duration(text) for text in ("90s", "10m", "2h", "1d", "45")] == [90, 600, 7200, 86400, 45]
    with pytest.raises(Exception, match="bad duration"):
        pingdom.parse_duration("10 minutes")


def test_munin_limits_and_rates(tmp_path):
    assert munin.parse_range("80") == (None, 80.0)
    assert munin.parse_range("10:") == (10.0, None)
    assert munin.parse_range(":5") == (None, 5.0)
    assert munin.parse_range("1:9") == (1.0, 9.0)
    assert munin.parse_range(None) is None and munin.parse_range("x") is None
    config = [
        "multigraph g_errors",
        "graph_title Errors",
        "errors.label 5xx",
        "errors.type DERIVE",
        "errors.min 0",
        "errors.warning 1",
        "errors.critical 5",
        "multigraph g_conn",
        "used.label used",
        "used.type GAUGE",
        "used.warning 80",
        "used.critical 95",
    ]
    values = ["multigraph g_errors", "errors.value 100", "multigraph g_conn", "used.value 90"]
    fields, complaints = munin.parse("p", config, values)
    assert complaints == []
    assert {(f.graph, f.name, f.type, f.value) for f in fields} == {
        ("g_errors", "errors", "DERIVE", 100.0),
        ("g_conn", "used", "GAUGE", 90.0),
    }
    samples = munin.Samples(tmp_path / "samples.json")
    first = {j.field.name: j for j in munin.judge("db1", fields, samples, now=1000.0)}
    assert first["used"].status == NagiosStatus.WARNING and first["used"].value == 90
    assert first["errors"].value is None and first["errors"].status == NagiosStatus.OK  # no rate without a sample
    samples.save()
    later = munin.Samples(tmp_path / "samples.json")
    fields[[f.name for f in fields].index("errors")].value = 700.0
    second = {j.field.name: j for j in munin.judge("db1", fields, later, now=1100.0)}
    assert second["errors"].value == pytest.approx(6.0)
    assert second["errors"].status == NagiosStatus.CRITICAL
    assert second["errors"].describe() == "g_errors.errors = 6/s (limit 5)"
    _, complaints = munin.parse("p", [], ["# Bad exit"])
    assert complaints == ["Bad exit"]


def _plugin(tmp_path, service: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    link = tmp_path / f"igops_{service}"
    if not link.exists():
        link.symlink_to(PLUGIN)
    environment = {"PATH": "/usr/bin:/bin", "MUNIN_CAP_MULTIGRAPH": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(link), *args], capture_output=True, text=True, env=environment, timeout=30
    )


def test_plugin_config_declares_rates_as_derive_with_limits(tmp_path):
    done = _plugin(tmp_path, "app", "config", env={"errors_warning": "2", "errors_critical": "7"})
    assert done.returncode == 0, done.stderr
    fields, complaints = munin.parse("igops_app", done.stdout.splitlines(), [])
    assert not complaints
    by_path = {field.path: field for field in fields}
    for path in (
        "igops_app_photos.photos",
        "igops_app_likes.likes",
        "igops_app_signups.signups",
        "igops_app_errors.errors",
        "igops_app_requests.requests",
    ):
        assert by_path[path].type == "DERIVE", path
    assert (by_path["igops_app_errors.errors"].warning, by_path["igops_app_errors.errors"].critical) == ("2", "7")
    assert (by_path["igops_app_latency.mean"].warning, by_path["igops_app_latency.mean"].critical) == ("500", "2000")
    lines = done.stdout.splitlines()
    for name in ("photos", "likes", "signups", "errors", "client_errors", "requests"):
        assert f"{name}.min 0" in lines
    assert all(line.startswith(("multigraph ", "graph_")) or "." in line.split()[0] for line in lines)
    assert "graph_category igops" in lines


def test_plugin_autoconf_says_no_with_the_reason_and_needs_multigraph(tmp_path):
    done = _plugin(tmp_path, "app", "autoconf", env={"url": "http://127.0.20.250:9/stats"})
    assert done.returncode == 0 and done.stdout.startswith("no (http://127.0.20.250:9/stats")
    done = _plugin(tmp_path, "redis", "autoconf", env={"host": "127.0.20.250", "port": "9"})
    assert done.returncode == 0 and done.stdout.startswith("no (redis 127.0.20.250:9")
    without = subprocess.run(
        [sys.executable, str(tmp_path / "igops_app"), "config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert without.returncode == 0 and without.stdout.startswith("multigraph not supported")
    link = tmp_path / "igops_nosuch"
    link.symlink_to(PLUGIN)
    assert subprocess.run([sys.executable, str(link)], capture_output=True).returncode == 1


def unreachable_inventory(tmp_path: Path) -> Path:
    return unit_inventory(tmp_path, [("web1", "127.0.20.250", "app")])


def test_check_cli_nagios_line_and_exit_codes_without_a_fleet(tmp_path):
    config = str(unreachable_inventory(tmp_path))
    result = run_igops("-c", config, "check", "--nagios", "--timeout", "5")
    assert result.returncode == NagiosStatus.CRITICAL, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("IGOPS CRITICAL - unit: 2 critical of 3 checks:")  # + operations
    assert "ssh web1:" in lines[0] and "http-app web1:" in lines[0]

    result = run_igops("-c", config, "check", "--json", "--only", "http")
    envelope = json.loads(result.stdout)
    assert result.returncode == ExitCode.PROBLEMS_FOUND and envelope["exit_code"] == ExitCode.PROBLEMS_FOUND
    assert envelope["data"]["status"] == "CRITICAL" and envelope["data"]["counts"]["critical"] == 1
    assert [(r["check"], r["target"]) for r in envelope["data"]["results"]] == [("http-app", "web1")]

    result = run_igops("-c", config, "check", "--nagios", "--only", "nosuch")
    assert result.returncode == NagiosStatus.UNKNOWN
    assert result.stdout.startswith("IGOPS UNKNOWN - unknown check 'nosuch'")
    result = run_igops("-c", str(tmp_path / "missing.toml"), "check", "--nagios")
    assert result.returncode == NagiosStatus.UNKNOWN and result.stdout.startswith("IGOPS UNKNOWN - inventory not found")


def test_a_second_check_while_one_runs_exits_locked(tmp_path):
    from igops import inventory, safety

    config = unreachable_inventory(tmp_path)
    fleet = inventory.load_file(config)
    with safety.lock(fleet.state_dir, "check", "unit", "igops check (held by the test)"):
        result = run_igops("-c", str(config), "check", "--only", "http")
        nagios_result = run_igops("-c", str(config), "check", "--only", "http", "--nagios")
    assert result.returncode == ExitCode.LOCKED, result.stderr
    assert "check on unit is already running" in result.stderr and "held by the test" in result.stderr
    assert nagios_result.returncode == NagiosStatus.UNKNOWN
    assert nagios_result.stdout.startswith("IGOPS UNKNOWN - check on unit is already running")


def test_quiet_prints_nothing_when_all_is_well(tmp_path):
    config = unreachable_inventory(tmp_path)
    config.write_text(config.read_text().replace('roles = ["app"]', "roles = []"))
    result = run_igops("-c", str(config), "check", "--quiet", "--only", "http")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    result = run_igops("-c", str(config), "check", "--only", "http")
    assert result.returncode == 0 and "0 checks, all OK" in result.stdout


def test_the_run_ends_at_its_deadline_whatever_hangs(tmp_path):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel completes connections; nothing ever answers on them
    port = hung.getsockname()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = tmp_path / "igops.toml"
    config.write_text(f"""
[fleet]
name = "unit"
state_dir = "{tmp_path / "state"}"
[ssh]
known_hosts = "{known_hosts}"
port = {port}
connect_timeout = 30
[app]
port = {port}
[[hosts]]
name = "stuck"
address = "127.0.0.1"
roles = ["app"]
""")
    started = time.monotonic()
    result = run_igops("-c", str(config), "check", "--nagios", "--timeout", "1.5")
    elapsed = time.monotonic() - started
    hung.close()
    assert result.returncode == NagiosStatus.CRITICAL, result.stdout + result.stderr
    assert "http-app stuck: no answer within 1.5 s" in result.stdout
    duration = float(result.stdout.split("'duration'=", 1)[1].split("s", 1)[0])
    assert duration < 2.5, f"the checks took {duration} s with a 1.5 s deadline"
    # A connect or banner wait of the inventory's 30 s would show here, start-up aside.
    assert elapsed < 15, f"the process took {elapsed:.1f} s to exit"


@pytest.mark.parametrize(
    "service, env, graphs",
    [
        (
            "postgres",
            {"PGHOST": "127.0.20.250", "PGPORT": "9", "PGCONNECT_TIMEOUT": "1"},
            ["igops_pg_connections", "igops_pg_commits"],
        ),
        ("redis", {"host": "127.0.20.250", "port": "9"}, ["igops_redis_memory", "igops_redis_ops"]),
        (
            "pgbouncer",
            {"PGHOST": "127.0.20.250", "PGPORT": "9"},
            ["igops_pgbouncer_waiting", "igops_pgbouncer_maxwait"],
        ),
    ],
)
def test_plugin_config_describes_its_graphs_while_the_service_is_down(tmp_path, service, env, graphs):
    """munin-node runs `config` once when it starts and drops a plugin that prints nothing, until
    its next restart; a data store that starts after the node must not cost its graphs."""
    done = _plugin(tmp_path, service, "config", env=env)
    assert done.returncode == 0 and "describing the graphs without it" in done.stderr, done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("multigraph ")] == graphs
    fetched = _plugin(tmp_path, service, env=env)
    assert fetched.returncode == 1 and fetched.stdout == ""


# --- Redis, judged by live roles against the master the app writes to ---------------------------


def redis_tier(tmp_path, states, app_address="10.0.0.31:6379", directory_error=None):
    from igops import inventory, postgres
    from igops.redis_tier import redis_state_of
    from tests.unit.test_failover import FLEET

    path = tmp_path / "igops.toml"
    path.write_text(FLEET)
    fleet = inventory.load_file(path)
    down = {
        name: postgres.Unavailable(name, "Connection refused", "refused")
        for name, state in states.items()
        if state is None
    }
    tier = redis_state_of(fleet, states, down, app_address, 7 if app_address else None, directory_error)
    return fleet, tier


def redis_node(role, offset, master=None, link_up=True, read_only=True):
    from igops import redisops

    return redisops.NodeState(role, offset, master, link_up if role == "replica" else None, None, read_only, 100, "run")


def redis_verdicts(tmp_path, states, **endpoint):
    from igops.checks.redis_probes import redis_results

    fleet, tier = redis_tier(tmp_path, states, **endpoint)
    results = redis_results(tier, endpoint.get("directory_error"), fleet.model.check, 1.0)
    return {result.target: (result.check, result.status, result.summary) for result in results}


def test_redis_after_a_failover_the_promoted_replica_is_the_master_and_the_old_one_a_replica(tmp_path):
    verdicts = redis_verdicts(
        tmp_path,
        {
            "redis1": redis_node("replica", 900, "10.0.0.32:6379"),
            "redis2": redis_node("master", 1000),
            "redis3": redis_node("replica", 1000, "10.0.0.32:6379"),
        },
        app_address="10.0.0.32:6379",
    )
    assert verdicts["redis2"][:2] == ("redis-master", NagiosStatus.OK)
    assert verdicts["redis1"] == ("redis-replica", NagiosStatus.OK, "linked to redis2, offset lag 100 bytes")
    assert verdicts["redis3"][1] == NagiosStatus.OK


def test_redis_a_second_master_and_an_app_pointed_at_a_replica_are_critical(tmp_path):
    two = redis_verdicts(
        tmp_path,
        {
            "redis1": redis_node("master", 5),
            "redis2": redis_node("master", 9),
            "redis3": redis_node("replica", 9, "10.0.0.32:6379"),
        },
    )
    assert two["redis1"][:2] == ("redis-master", NagiosStatus.OK)
    assert two["redis2"] == ("redis-master", NagiosStatus.CRITICAL, "a second master: the app writes to redis1")
    assert two["redis3"][1:] == (NagiosStatus.CRITICAL, "replicates redis2, not the master redis1")
    stale = redis_verdicts(
        tmp_path,
        {
            "redis1": redis_node("replica", 5, "10.0.0.32:6379"),
            "redis2": redis_node("master", 9),
            "redis3": redis_node("replica", 9, "10.0.0.32:6379"),
        },
    )
    assert stale["redis2"][1] == NagiosStatus.CRITICAL
    assert stale["redis2"][2].endswith("the app does not write here: the directory names redis1, which is a replica")
    assert stale["redis3"][1] == NagiosStatus.OK


def test_redis_without_the_directory_the_only_master_is_the_reference(tmp_path):
    verdicts = redis_verdicts(
        tmp_path,
        {
            "redis1": None,
            "redis2": redis_node("master", 9),
            "redis3": redis_node("replica", 9, "10.0.0.32:6379", link_up=False),
        },
        app_address=None,
        directory_error="no primary of cluster main answers",
    )
    assert verdicts["redis1"] == ("redis-replica", NagiosStatus.CRITICAL, "down: Connection refused")
    assert verdicts["redis2"][1] == NagiosStatus.CRITICAL and verdicts["redis2"][2].endswith(
        "no primary of cluster main answers"
    )
    assert verdicts["redis3"][1:] == (NagiosStatus.CRITICAL, "link to redis2 is down")


HOSTPROBE = Path(__file__).resolve().parents[2] / "igops" / "agent" / "hostprobe.py"
SHARED_MEMORY = "/dev/shm"


@pytest.fixture
def probe_lock():
    """The host probe's lock for /dev/shm, held by the test as another probe would hold it."""
    from igops.agent import hostprobe

    if not Path(SHARED_MEMORY).is_mount():
        pytest.skip("this machine has no tmpfs at /dev/shm")
    descriptor = os.open(hostprobe.lock_path(hostprobe.lock_dir(), SHARED_MEMORY), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def start_probe() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HOSTPROBE), "0.5", SHARED_MEMORY], stdout=subprocess.PIPE)


def probe_answer(probe: subprocess.Popen) -> dict:
    return json.loads(probe.communicate(timeout=60)[0])["mounts"][0]


def test_a_probe_waits_its_turn_behind_healthy_writers_and_takes_a_fresh_write_as_its_answer(probe_lock):
    # Overlapping probes of one mount (cron and a person, or hosts sharing a kernel) queue on the
    # lock; here writes that each finish in 20 ms keep it changing hands for three stalls' worth.
    from igops.agent import hostprobe

    probe = start_probe()
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        started = time.time()
        hostprobe.write_record(probe_lock, started, 0, os.getpid())
        time.sleep(0.02)
        hostprobe.write_record(probe_lock, started, time.time(), os.getpid())
        time.sleep(0.005)
    fcntl.flock(probe_lock, fcntl.LOCK_UN)
    answer = probe_answer(probe)
    assert answer["writable"] is True and answer["detail"] is None, answer


def test_a_write_under_way_for_longer_than_the_stall_reads_as_frozen_at_once(probe_lock):
    from igops.agent import hostprobe

    with subprocess.Popen(["sleep", "30"]) as blocked_writer:
        try:
            hostprobe.write_record(probe_lock, time.time() - 1, 0, blocked_writer.pid)
            started = time.monotonic()
            answer = probe_answer(start_probe())
        finally:
            blocked_writer.kill()
    assert answer["writable"] is False and answer["detail"].startswith("a write has been blocked for "), answer
    assert time.monotonic() - started < 5


def test_a_record_left_by_a_writer_that_is_gone_is_not_a_blocked_write(probe_lock):
    """A probe that gave up on a slow writer leaves a record of a write under way; while the next
    holder has the lock and has not started its writer yet, that record is not a frozen mount."""
    from igops.agent import hostprobe

    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    hostprobe.write_record(probe_lock, time.time() - 100, 0, gone.pid)
    probe = start_probe()
    time.sleep(0.3)
    fcntl.flock(probe_lock, fcntl.LOCK_UN)
    answer = probe_answer(probe)
    assert answer["writable"] is True and answer["detail"] is None, answer


def test_a_failed_write_is_no_answer_for_the_probes_after_it(probe_lock):
    from igops.agent import hostprobe

    hostprobe.write_record(probe_lock, time.time(), -time.time(), os.getpid())
    assert hostprobe.lock_record(probe_lock)[1] < 0
    fcntl.flock(probe_lock, fcntl.LOCK_UN)
    answer = probe_answer(start_probe())
    assert answer["writable"] is True, "the probe wrote for itself"
    start, ended, pid = hostprobe.lock_record(probe_lock)
    # The record keeps milliseconds: a write on tmpfs can end within the millisecond it began.
    assert start is not None and ended is not None and ended >= start > 0 and pid != os.getpid()


# --- a paused PgBouncer database ----------------------------------------------------------


def test_a_paused_pgbouncer_database_is_remembered_from_the_first_check_that_saw_it(tmp_path):
    from igops.checks.postgres_probes import paused_since

    path = tmp_path / "check" / "pgbouncer-paused-db1.json"
    assert paused_since(path, [], 1000.0) == {}
    assert paused_since(path, ["main"], 1000.0) == {"main": 1000.0}
    assert paused_since(path, ["main", "directory"], 1030.0) == {"main": 1000.0, "directory": 1030.0}
    assert paused_since(path, ["directory"], 1060.0) == {"directory": 1030.0}, "main was resumed"
    assert paused_since(path, ["main"], 1090.0) == {"main": 1090.0}, "paused again: a new pause"
    path.write_text("not json")
    assert paused_since(path, ["main"], 2000.0) == {"main": 2000.0}


def test_a_paused_database_is_warning_and_critical_once_seen_paused_past_the_limit():
    from igops.checks.postgres_probes import paused_finding

    assert paused_finding({}, 1000.0, 60) == (NagiosStatus.OK, None)
    state, text = paused_finding({"main": 1000.0}, 1000.0, 60)
    assert state == NagiosStatus.WARNING
    assert text.startswith("PAUSED: main (seen paused for 0 s); CRITICAL after 60 s") and "RESUME" in text
    state, text = paused_finding({"main": 1000.0, "directory": 1050.0}, 1060.0, 60)
    assert state == NagiosStatus.CRITICAL and "directory (seen paused for 10 s), main (seen paused for 60 s)" in text


def test_the_latency_mean_waits_for_enough_requests(tmp_path, monkeypatch):
    """A mean over a handful of requests (one that waited on a frozen replica) says nothing of the
    app: unknown, and the baseline stays, so the next fetch's mean covers them and those after."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("igops_munin_plugin", str(PLUGIN))
    plugin = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(plugin)
    monkeypatch.setenv("MUNIN_STATEFILE", str(tmp_path / "state"))
    assert plugin.latency_ms({"requests": 100, "request_seconds_total": 1.0}) is None  # no baseline yet
    assert plugin.latency_ms({"requests": 102, "request_seconds_total": 4.0}) is None  # 2 requests: 1.5 s each
    assert plugin.latency_ms({"requests": 130, "request_seconds_total": 4.6}) == pytest.approx(120.0)
    assert plugin.latency_ms({"requests": 180, "request_seconds_total": 5.6}) == pytest.approx(20.0)
    monkeypatch.setenv("latency_min_requests", "1")
    assert plugin.latency_ms({"requests": 181, "request_seconds_total": 6.6}) == pytest.approx(1000.0)
