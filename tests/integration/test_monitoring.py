"""Monitoring against the lab: igops' Munin plugins installed and read over munin-node's
protocol, a real Munin master (Debian's munin-update) collecting every plugin, Pingdom checks as
code, the PagerDuty path, `igops check` in its three outputs, and the crontab entries of
docs/cron.md run from cron's bare environment.

Each session uses a copy of the lab inventory with its own fleet name and state directory, so
its Pingdom checks, PagerDuty dedup keys, locks and audit log are its own."""

import json
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

from igops import inventory, postgres_admin
from igops.checks import munin
from igops.errors import ExitCode, NagiosStatus
from igops.failover import cluster_members
from igops.secrets import Secrets
from tests.conftest import ROOT, run_igops
from tests.labtools import without_coordination

pytestmark = pytest.mark.lab

# Runs that must come out all OK get a deadline far above their usual second or two: they test
# what is checked, not how fast, and the two cores are shared with other people's work.
PATIENT = ["--timeout", "60"]

IGOPS_BIN = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "igops")
MUNIN_UPDATE = "/usr/share/munin/munin-update"


def own_inventory(fleet, directory: Path, name: str, extra: str = "") -> Path:
    """The lab inventory under another fleet name and state directory, on the local backend: its
    locks, journal and audit log are in that directory."""
    directory.mkdir(parents=True, exist_ok=True)
    text = without_coordination(Path(fleet.source).read_text())
    text = re.sub(r'(?m)^name = "lab"$', f'name = "{name}"', text, count=1)
    text = re.sub(r"(?m)^state_dir = .*$", f'state_dir = "{directory / "state"}"', text, count=1)
    path = directory / "igops.toml"
    path.write_text(text + extra)
    return path


class Receivers:
    """The lab's PagerDuty and Pingdom receivers, through their /_lab endpoints and the API."""

    def __init__(self, fleet):
        import requests

        self.session = requests.Session()
        self.pagerduty = fleet.model.monitoring.pagerduty_url
        self.pingdom_api = fleet.model.monitoring.pingdom_url
        self.pingdom = self.pingdom_api.removesuffix("/api/3.1")
        self.token = Secrets(fleet.model.secrets.file).require("pingdom_token")

    def last_seq(self, base: str) -> int:
        requests_seen = self.session.get(f"{base}/_lab/requests", timeout=5).json()["requests"]
        return requests_seen[-1]["seq"] if requests_seen else 0

    def requests_since(self, base: str, seq: int) -> list[dict]:
        return self.session.get(f"{base}/_lab/requests", params={"since": seq}, timeout=5).json()["requests"]

    def incidents(self, prefix: str) -> dict[str, dict]:
        state = self.session.get(f"{self.pagerduty}/_lab/state", timeout=5).json()
        return {item["dedup_key"]: item for item in state["incidents"] if item["dedup_key"].startswith(prefix)}

    def fault(self, base: str, status: int, count: int = 1) -> None:
        self.session.post(f"{base}/_lab/faults", json={"status": status, "count": count}, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        for base in (self.pagerduty, self.pingdom):
            self.session.delete(f"{base}/_lab/faults", timeout=5)

    def delete_checks(self, tag: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        listed = self.session.get(
            f"{self.pingdom_api}/checks", params={"tags": tag, "include_tags": "true"}, headers=headers, timeout=5
        ).json()["checks"]
        for check in listed:
            self.session.delete(f"{self.pingdom_api}/checks/{check['id']}", headers=headers, timeout=5)


def resolve_leftovers(config: Path) -> None:
    from igops.pagerduty.incidents import Pager

    pager = Pager(inventory.load_file(config))
    for key in list(pager.open_incidents()):
        pager.resolve(key)


@pytest.fixture(scope="module")
def monitored(lab, tmp_path_factory):
    """Plugins installed on every host, and this module's own fleet name."""
    name = f"mon{uuid.uuid4().hex[:6]}"
    directory = tmp_path_factory.mktemp("monitoring")
    config = own_inventory(lab, directory, name)
    installed = run_igops("-c", str(config), "munin", "install", "--yes", timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    receivers = Receivers(lab)
    receivers.clear_faults()
    yield {
        "config": config,
        "name": name,
        "fleet": inventory.load_file(config),
        "receivers": receivers,
        "directory": directory,
    }
    receivers.clear_faults()
    receivers.delete_checks(f"igops-{name}")
    resolve_leftovers(config)


def test_munin_install_is_idempotent_and_every_node_lists_its_plugins(monitored):
    result = run_igops("-c", str(monitored["config"]), "munin", "install", "--yes", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    hosts = json.loads(result.stdout)["data"]["hosts"]
    fleet = monitored["fleet"]
    expected = {host.name: munin.plugins_for(host) for host in fleet.hosts if munin.plugins_for(host)}
    assert {entry["host"]: entry["plugins"] for entry in hosts} == expected
    for entry in hosts:
        assert entry["changed"] == [] and entry["restarted"] is False, entry
        assert set(entry["plugins"]) <= set(entry["listed"])
    conf = Path(fleet.path_for(fleet.model.munin.plugin_conf_dir, fleet.host("pgb1"))) / munin.CONF_NAME
    assert conf.stat().st_mode & 0o777 == 0o600
    link = Path(fleet.path_for(fleet.model.munin.plugin_dir, fleet.host("pgb1"))) / "igops_pgbouncer"
    assert link.is_symlink() and os.readlink(link).endswith("/igops_")


def test_munin_fetch_speaks_the_node_protocol(monitored):
    fleet = monitored["fleet"]
    primary = fleet.model.postgres.clusters["main"].primary
    standby = fleet.model.postgres.clusters["main"].standbys[0]
    result = run_igops(
        "-c", str(monitored["config"]), "munin", "fetch", primary, "igops_postgres", "--config", "--json"
    )
    assert result.returncode == 0, result.stderr
    [plugin] = json.loads(result.stdout)["data"]["plugins"]
    fields = {f"{field['graph']}.{field['name']}": field for field in plugin["fields"]}
    lag = fields[f"igops_pg_replication.lag_{standby}"]
    assert lag["type"] == "GAUGE" and lag["warning"] == str(fleet.model.check.replication_lag_warning_bytes)
    assert lag["value"] is not None and lag["value"] >= 0
    assert fields["igops_pg_commits.commits"]["type"] == "DERIVE" and fields["igops_pg_commits.commits"]["value"] > 0
    assert fields["igops_pg_connections.used"]["warning"] == "80"
    table = run_igops("-c", str(monitored["config"]), "munin", "fetch", "pgb1")
    assert table.returncode == 0 and "igops_pgbouncer_waiting" in table.stdout and "load" in table.stdout


def test_a_real_munin_master_collects_every_plugin(monitored):
    import tempfile

    fleet = monitored["fleet"]
    # munin-update runs as the munin user, who cannot enter pytest's private temporary tree.
    with tempfile.TemporaryDirectory(prefix="igops-munin-master-") as directory:
        work = Path(directory)
        for name in ("db", "run", "log", "html"):
            (work / name).mkdir()
        nodes = "".join(
            f"[{monitored['name']};{host.name}]\n    address {host.address}\n    port {fleet.model.munin.port}\n"
            for host in fleet.with_role("munin")
        )
        config = work / "munin.conf"
        config.write_text(
            f"dbdir {work / 'db'}\nrundir {work / 'run'}\nlogdir {work / 'log'}\n"
            f"htmldir {work / 'html'}\ntmpldir /etc/munin/templates\n{nodes}"
        )
        subprocess.run(["chown", "-R", "munin:munin", str(work)], check=True)
        done = subprocess.run(
            ["runuser", "-u", "munin", "--", MUNIN_UPDATE, "--config_file", str(config), "--nofork"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        made = {path.name for path in (work / "db" / monitored["name"]).glob("*.rrd")}
    missing = []
    for host in fleet.with_role("munin"):
        with munin.NodeClient(str(host.address), fleet.model.munin.port) as node:
            node.cap(["multigraph"])
            for plugin in node.list():
                fields, complaints = munin.parse(plugin, node.config(plugin), [])
                assert not complaints, (host.name, plugin, complaints)
                for field in fields:
                    rrd = f"{host.name}-{field.graph}-{field.name}-{field.type[0].lower()}.rrd"
                    if rrd not in made:
                        missing.append(rrd)
    assert not missing, f"munin-update made no RRD for: {missing[:10]}"
    assert any(name.startswith("app1-igops_app_photos-photos-d") for name in made)


def test_pingdom_checks_as_code_status_and_maintenance(monitored):
    config, name, receivers = str(monitored["config"]), monitored["name"], monitored["receivers"]
    tag = f"igops-{name}"
    before = receivers.last_seq(receivers.pingdom)
    dry = run_igops("-c", config, "pingdom", "sync", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # The plan is a dry run's result: on stdout.
    assert f"+ create '{name} lb1 health': http://127.0.10.10:80/health" in dry.stdout
    assert all(entry["method"] == "GET" for entry in receivers.requests_since(receivers.pingdom, before))

    synced = run_igops("-c", config, "pingdom", "sync", "--yes", "--json")
    assert synced.returncode == 0, synced.stderr
    assert [change["action"] for change in json.loads(synced.stdout)["data"]["applied"]] == ["create"]
    again = run_igops("-c", config, "pingdom", "sync", "--yes", "--json")
    assert json.loads(again.stdout)["data"]["changes"] == []
    assert f"in sync: 1 check tagged {tag}" in again.stderr

    import time

    deadline = time.monotonic() + 15
    while True:
        status = json.loads(run_igops("-c", config, "pingdom", "status", "--window", "1h", "--json").stdout)
        [check] = status["data"]["checks"]
        if check["status"] == "up" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert check["status"] == "up" and check["uptime_percent"] == 100.0 and check["last_response_ms"] is not None

    window = run_igops("-c", config, "pingdom", "maintenance", "--for", "10m", "--yes", "--json")
    assert window.returncode == 0, window.stderr
    created = json.loads(window.stdout)["data"]
    state = receivers.session.get(f"{receivers.pingdom}/_lab/state", timeout=5).json()
    [recorded] = [item for item in state["maintenance"] if item["id"] == created["id"]]
    # The window starts when Pingdom receives it (`from` = 1, "now"), which may be a second after
    # igops computed its end.
    assert recorded["checks"]["uptime"] == [check["id"]] and 599 <= recorded["to"] - recorded["from"] <= 600

    checked = run_igops("-c", config, "check", "--only", "pingdom", "--json", *PATIENT)
    [result] = json.loads(checked.stdout)["data"]["results"]
    assert (result["check"], result["target"], result["status"]) == ("pingdom", f"{name} lb1 health", "OK")


def test_pagerduty_test_triggers_then_resolves(monitored):
    receivers = monitored["receivers"]
    before = receivers.last_seq(receivers.pagerduty)
    result = run_igops("-c", str(monitored["config"]), "pagerduty", "test", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    key = json.loads(result.stdout)["data"]["result"]["dedup_key"]
    sent = [entry["body"] for entry in receivers.requests_since(receivers.pagerduty, before)]
    assert [(event["event_action"], event["dedup_key"]) for event in sent] == [("trigger", key), ("resolve", key)]
    assert receivers.incidents(key)[key]["status"] == "resolved"


def test_check_outputs_for_people_nagios_and_programs(monitored):
    config = str(monitored["config"])
    quiet = run_igops(
        "-c",
        config,
        "check",
        "--role",
        "app",
        "--quiet",
        "--only",
        "ssh",
        "--only",
        "http",
        "--only",
        "munin",
        *PATIENT,
    )
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")

    full = run_igops("-c", config, "check", "--json", *PATIENT)
    data = json.loads(full.stdout)["data"]
    fleet = monitored["fleet"]
    by_check = {}
    for result in data["results"]:
        by_check.setdefault(result["check"], {})[result["target"]] = result
    assert set(by_check["ssh"]) == {host.name for host in fleet.hosts}
    assert set(by_check["http-app"]) == {"app1", "app2", "app3"} and set(by_check["http-lb"]) == {"lb1"}
    assert set(by_check["frozen"]) == {f"{host.name}:{mount.path}" for host in fleet.hosts for mount in host.mounts}
    assert set(by_check["postgres-primary"]) == {c.primary for c in fleet.model.postgres.clusters.values()}
    assert set(by_check["redis-replica"]) == set(fleet.model.redis.replicas)
    assert set(by_check["munin"]) == {host.name for host in fleet.with_role("munin")}
    for group in (
        "ssh",
        "http-app",
        "http-lb",
        "frozen",
        "disk",
        "postgres-primary",
        "postgres-standby",
        "pgbouncer",
        "memcached",
        "munin",
    ):
        for target, result in by_check[group].items():
            assert result["status"] == "OK", (group, target, result["summary"])
    # Redis is judged against what the nodes say right now: other work on this lab may leave a
    # replica promoted, and then the check must say so.
    for check, name, healthy in redis_truth(fleet):
        assert by_check[check][name]["status"] == ("OK" if healthy else "CRITICAL"), by_check[check][name]
    assert data["duration_ms"] < data["timeout"] * 1000

    nagios = run_igops("-c", config, "check", "--nagios", "--only", "postgres", "--only", "redis", *PATIENT)
    assert nagios.returncode == NagiosStatus.OK, nagios.stdout
    [line] = nagios.stdout.splitlines()
    text, perfdata = line.split(" | ")
    assert text.startswith(f"IGOPS OK - {monitored['name']}: ")
    standby = fleet.model.postgres.clusters["main"].standbys[0]
    assert re.search(rf"'postgres-lag {standby}'=\d+B;1048576;67108864;0", perfdata)


def redis_truth(fleet) -> list[tuple[str, str, bool]]:
    """(check, node, whether its role and link are as the inventory says), asked directly."""
    import redis

    def info(name: str) -> dict:
        client = redis.Redis(host=str(fleet.host(name).address), port=fleet.model.redis.port, socket_timeout=5)
        try:
            return client.info("replication")
        finally:
            client.close()

    master = fleet.host(fleet.model.redis.master)
    truth = [("redis-master", master.name, info(master.name)["role"] == "master")]
    for name in fleet.model.redis.replicas:
        replica = info(name)
        truth.append(
            (
                "redis-replica",
                name,
                replica["role"] == "slave"
                and replica.get("master_host") == str(master.address)
                and replica.get("master_link_status") == "up",
            )
        )
    return truth


def cron_entries() -> list[str]:
    text = (ROOT / "docs" / "cron.md").read_text()
    block = text.split("```crontab", 1)[1].split("```", 1)[0]
    return [match.group(1) for match in re.finditer(r"(?m)^(?:\S+\s+){5}root\s+(.+)$", block)]


def test_cron_entries_run_from_crons_bare_environment(monitored, tmp_path):
    entries = cron_entries()
    assert len(entries) == 3
    logs = tmp_path / "log"
    logs.mkdir()
    outcomes = []
    # A schedule that is due now: the snapshot entry takes a group of every set of data.
    config = tmp_path / "igops.toml"
    text, count = re.subn(r"(?m)^schedule = .*$", 'schedule = "every 1m"', monitored["config"].read_text(), count=1)
    assert count == 1
    config.write_text(text)
    for entry in entries:
        command = (
            entry.replace("/usr/local/bin/igops", IGOPS_BIN)
            .replace("/etc/igops/igops.toml", str(config))
            .replace("/var/log/igops", str(logs))
        )
        done = subprocess.run(
            ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=300,
            cwd="/",
        )
        outcomes.append((shlex.split(entry)[3], done))
    assert [job for job, _ in outcomes] == ["snapshot", "check", "pingdom"]
    for job, done in outcomes:
        if job != "check":
            assert done.returncode == 0 and done.stdout == "", (job, done)
    assert (logs / "snapshot-cron.log").stat().st_size > 0 and (logs / "pingdom-sync.log").stat().st_size > 0
    check = outcomes[1][1]
    # It ran: all well, or problems found (5). A standby the snapshot entry just froze can be a
    # few MB behind in replay for a moment, a WARNING the check rightly reports.
    assert check.returncode in (ExitCode.OK, ExitCode.PROBLEMS_FOUND), check.stderr
    assert "error" not in check.stderr, check.stderr
    if check.returncode == ExitCode.OK:
        assert check.stdout == ""
    else:
        assert "OK " not in check.stdout, "--quiet shows only the problems"

    # Following the crontab leaves every set of data backed up: a Postgres cluster by a group
    # taken on its standby.
    fleet = monitored["fleet"]
    live_primary = postgres_admin.primary_of(fleet, "main").name
    standby = next(name for name in cluster_members(fleet, "main") if name != live_primary)
    snapshots = json.loads(run_igops("-c", str(config), "check", "--only", "snapshot", "--json", *PATIENT).stdout)[
        "data"
    ]["results"]
    assert {result["target"]: result["status"] for result in snapshots} == {"main": "OK", "pg2": "OK", "redis": "OK"}
    main = next(result for result in snapshots if result["target"] == "main")
    assert f"(on {standby})" in main["summary"] and re.search(r"is \d+ min old", main["summary"]), main
