"""`igops check` against real faults in the lab: gunicorn stopped on an app server, the standby
stopped, a data mount frozen, a disk nearly full (a small loop filesystem), munin-node down.
Each is found and named, paged once however often cron runs, and resolved when it recovers. The
PagerDuty receiver answers 429, 500 and 400 in turn. No secret reaches any output, log or audit
record."""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from igops import inventory
from igops.errors import ExitCode
from igops.lab import state
from igops.lab.proc import alive  # a zombie is dead: the lab's daemons may be this process's children
from igops.secrets import Secrets
from tests.conftest import run_igops
from tests.integration.test_monitoring import Receivers, own_inventory, resolve_leftovers
from tests.labtools import wait_for

pytestmark = pytest.mark.lab

# Probes get a deadline far above their usual second or two: these tests are about what is found,
# and the two cores are shared with other people's work.
FAULT_CHECKS = [
    "--only",
    "http",
    "--only",
    "postgres",
    "--only",
    "frozen",
    "--only",
    "disk",
    "--only",
    "munin",
    "--timeout",
    "60",
]
GHOST = "127.0.10.99"  # nothing listens here


@pytest.fixture(scope="module")
def setting(lab, tmp_path_factory):
    """This module's fleet (its own name and state dir), every igops run it makes, and a small
    loop filesystem mounted as one more data mount of cache1."""
    directory = tmp_path_factory.mktemp("check")
    small = directory / "small.img"
    mount_point = directory / "small"
    mount_point.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(small)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(small)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(small)], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["mount", device, str(mount_point)], check=True)
    name = f"rel{uuid.uuid4().hex[:6]}"
    hosts = [host.name for host in inventory.load_file(lab.source).hosts]
    assert hosts[-1] == "cache1", "the mount below is appended to the last host"
    extra = (
        f'\n[[hosts.mounts]]\npath = "{mount_point}"\npurpose = "data"\n'
        f'\n[[hosts]]\nname = "ghost"\naddress = "{GHOST}"\nroles = ["memcached"]\n'
    )
    config = own_inventory(lab, directory, name, extra)
    receivers = Receivers(lab)
    receivers.clear_faults()
    runs: list[subprocess.CompletedProcess] = []

    def igops(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = run_igops("-c", str(config), *args, timeout=timeout)
        runs.append(result)
        return result

    marks = {"pagerduty": receivers.last_seq(receivers.pagerduty), "pingdom": receivers.last_seq(receivers.pingdom)}
    try:
        yield {
            "config": config,
            "name": name,
            "igops": igops,
            "runs": runs,
            "receivers": receivers,
            "small": mount_point,
            "directory": directory,
            "marks": marks,
        }
    finally:
        receivers.clear_faults()
        resolve_leftovers(config)
        subprocess.run(["umount", str(mount_point)], check=False)
        release_namespaces(mount_point)
        subprocess.run(["losetup", "-d", device], check=False)
        small.unlink(missing_ok=True)


def release_namespaces(mount_point: Path) -> None:
    """A munin-node started while the small filesystem was mounted has its own copy of that mount
    (each node lives in its own mount namespace): restart it, or the loop device stays busy."""
    paths = state.paths()
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if f" {mount_point} " not in mountinfo.read_text():
                continue
            command = (mountinfo.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for host in state.HOSTS:
            if "munin-node" in command and str(paths.munin_dir(host.name)) + "/" in command:
                subprocess.run([str(paths.munin_dir(host.name) / "restart")], check=False)


def fleet_now(lab):
    """Other tests switch primaries over: the inventory as the lab last wrote it."""
    return inventory.load_file(lab.source)


def results_of(result: subprocess.CompletedProcess) -> tuple[dict, dict]:
    data = json.loads(result.stdout)["data"]
    return {(r["check"], r["target"]): r for r in data["results"]}, data["paging"]


def pid_from(path: Path) -> int:
    return int(path.read_text().strip())


def stuck_writers(mount: str) -> list[int]:
    """Host-probe writers sleeping on a frozen filesystem (state D), for this mount."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (
                b"igops-hostprobe" in (proc / "cmdline").read_bytes()
                and mount.encode() in (proc / "cmdline").read_bytes()
            ):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def lab_up() -> None:
    from igops import lab as lab_module
    from igops.output import Reporter

    lab_module.up(Reporter())


def test_each_fault_is_found_named_paged_once_and_resolved(lab, setting):
    igops, receivers, name = setting["igops"], setting["receivers"], setting["name"]
    fleet = fleet_now(lab)
    paths = state.paths()
    standby = fleet.model.postgres.clusters["main"].standbys[0]
    frozen = next(mount.path for mount in fleet.host(standby).mounts if mount.purpose == "data")
    small = str(setting["small"])
    expected = {
        ("http-app", "app2"),
        ("postgres-standby", standby),
        ("frozen", f"{standby}:{frozen}"),
        ("disk", f"cache1:{small}"),
        ("munin", "cache1"),
    }
    keys = {f"igops/{name}/{check}/{target}" for check, target in expected}

    before = igops("check", "--json", *FAULT_CHECKS)
    found, _ = results_of(before)
    assert all(found[key]["status"] == "OK" for key in expected), {k: found[k] for k in expected}

    fill = setting["small"] / "fill"
    gunicorn_pid = pid_from(paths.app_root("app2") / "shared" / "gunicorn.pid")
    munin_pid = pid_from(paths.munin_dir("cache1") / "munin-node.pid")
    try:
        room = os.statvfs(small)
        fill.write_bytes(b"\0" * int(room.f_bavail * room.f_frsize * 0.97))
        os.kill(gunicorn_pid, signal.SIGTERM)
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                f"{fleet.model.postgres.bin_dir}/pg_ctl",
                "-D",
                str(paths.host_dir(standby) / "pgconf"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            check=True,
            capture_output=True,
        )
        os.kill(munin_pid, signal.SIGTERM)
        assert wait_for(lambda: not alive(gunicorn_pid) and not alive(munin_pid), 20)
        subprocess.run(["fsfreeze", "-f", frozen], check=True)

        first = igops("check", "--page", "--json", *FAULT_CHECKS)
        assert first.returncode == ExitCode.PROBLEMS_FOUND, first.stderr
        found, paging = results_of(first)
        for key in expected:
            assert found[key]["status"] == "CRITICAL", (key, found[key])
        assert "not streaming" in found[("postgres-standby", standby)]["summary"]
        assert found[("frozen", f"{standby}:{frozen}")]["summary"].startswith("frozen: ")
        assert found[("disk", f"cache1:{small}")]["summary"].startswith(("9", "100"))
        assert "not answering" in found[("munin", "cache1")]["summary"]
        assert keys <= set(paging["triggered"]), paging
        incidents = receivers.incidents(f"igops/{name}/")
        assert all(incidents[key]["status"] == "triggered" for key in keys)
        events_before = incidents

        nagios = igops("check", "--nagios", *FAULT_CHECKS)
        assert nagios.returncode == 2
        assert nagios.stdout.startswith(f"IGOPS CRITICAL - {name}: ") and "http-app app2" in nagios.stdout

        second = igops("check", "--page", "--json", *FAULT_CHECKS)
        _, paging = results_of(second)
        assert paging["triggered"] == [] and keys <= set(paging["still_open"])
        incidents = receivers.incidents(f"igops/{name}/")
        assert all(incidents[key]["events"] == events_before[key]["events"] for key in keys), "a repeat was sent"
        assert len(stuck_writers(frozen)) <= 1, "repeated runs piled up writers on the frozen mount"
    finally:
        subprocess.run(["fsfreeze", "-u", frozen], check=False)
        fill.unlink(missing_ok=True)
        subprocess.run([str(paths.munin_dir("cache1") / "restart")], check=False)
        lab_up()
    assert wait_for(lambda: not stuck_writers(frozen), 10)

    recovered = igops("check", "--page", "--json", *FAULT_CHECKS)
    found, paging = results_of(recovered)
    for key in expected:
        assert found[key]["status"] == "OK", (key, found[key])
    assert keys <= set(paging["resolved"]), paging
    incidents = receivers.incidents(f"igops/{name}/")
    assert all(incidents[key]["status"] == "resolved" for key in keys)
    audit = [json.loads(line) for line in (setting["directory"] / "state" / "audit.log").read_text().splitlines()]
    paged = [record for record in audit if record["result"].startswith("paged: ")]
    assert any(keys <= set(record["targets"]) for record in paged), paged


def test_paging_through_429_500_then_400(lab, setting):
    igops, receivers, name = setting["igops"], setting["receivers"], setting["name"]
    key = f"igops/{name}/memcached/ghost"
    for status in (429, 500, 400):
        receivers.fault(receivers.pagerduty, status)
    seq = receivers.last_seq(receivers.pagerduty)

    first = igops("check", "--page", "--json", "--only", "memcached", "--timeout", "60")
    found, paging = results_of(first)
    assert found[("memcached", "ghost")]["status"] == "CRITICAL"
    assert paging["triggered"] == [] and paging["failed"][0]["dedup_key"] == key
    assert paging["failed"][0]["error"].startswith("HTTP 400")
    assert "(the next run retries)" in first.stderr
    sent = [entry for entry in receivers.requests_since(receivers.pagerduty, seq) if entry["path"] == "/v2/enqueue"]
    assert [entry["status"] for entry in sent] == [429, 500, 400], "429 and 500 are retried, 400 never"

    second = igops("check", "--page", "--json", "--only", "memcached", "--timeout", "60")
    _, paging = results_of(second)
    assert paging["triggered"] == [key] and not paging["failed"]
    assert receivers.incidents(key)[key]["status"] == "triggered"


def test_no_secret_reaches_output_logs_audit_or_the_wrong_part_of_a_request(lab, setting):
    igops, receivers = setting["igops"], setting["receivers"]
    igops("-v", "pagerduty", "test", "--yes")
    igops("-v", "pingdom", "sync", "--dry-run")
    igops("check", "--only", "pingdom", "--nagios")
    secrets = Secrets(lab.model.secrets.file)
    values = [secrets.require("pagerduty_routing_key"), secrets.require("pingdom_token")]
    values += [value for value in (secrets.get("postgres_password"), secrets.get("pgbouncer_password")) if value]
    assert len(setting["runs"]) >= 8
    state_dir = setting["directory"] / "state"
    texts = {f"run {i} stdout": run.stdout for i, run in enumerate(setting["runs"])}
    texts.update({f"run {i} stderr": run.stderr for i, run in enumerate(setting["runs"])})
    texts.update({str(path): path.read_text() for path in state_dir.rglob("*") if path.is_file()})
    assert str(state_dir / "audit.log") in texts
    for where, text in texts.items():
        for value in values:
            assert value not in text, f"a secret appears in {where}"

    routing_key, token = values[0], values[1]
    for entry in receivers.requests_since(receivers.pagerduty, setting["marks"]["pagerduty"]):
        body = dict(entry["body"] or {})
        body.pop("routing_key", None)
        assert routing_key not in json.dumps(body) and routing_key not in json.dumps(entry["headers"])
    for entry in receivers.requests_since(receivers.pingdom, setting["marks"]["pingdom"]):
        headers = {k: v for k, v in entry["headers"].items() if k != "authorization"}
        assert token not in json.dumps([headers, entry["path"], entry["query"], entry["body"]])


def test_a_paused_pgbouncer_database_is_warning_then_critical_past_the_limit(lab, tmp_path):
    import psycopg2

    config = own_inventory(
        lab, tmp_path, f"pause{uuid.uuid4().hex[:6]}", "\n[check]\npgbouncer_paused_critical_seconds = 2\n"
    )
    [bouncer] = lab.with_role("pgbouncer")
    database = lab.model.postgres.clusters["main"].pgbouncer_database

    def pgbouncer_result() -> dict:
        done = run_igops("-c", str(config), "check", "--only", "pgbouncer", "--json", timeout=60)
        [found] = [r for r in json.loads(done.stdout)["data"]["results"] if r["target"] == bouncer.name]
        return found

    assert pgbouncer_result()["status"] == "OK"
    console = psycopg2.connect(
        host=str(bouncer.address),
        port=lab.model.pgbouncer.port,
        user=lab.model.pgbouncer.admin_user,
        dbname="pgbouncer",
        password=Secrets(lab.model.secrets.file).get("pgbouncer_password"),
        connect_timeout=5,
    )
    console.autocommit = True
    try:
        with console.cursor() as cursor:
            cursor.execute(f"PAUSE {database}")
        paused = pgbouncer_result()
        assert paused["status"] == "WARNING", paused
        assert f"PAUSED: {database} (seen paused for" in paused["summary"], paused
        time.sleep(2.5)
        held = pgbouncer_result()
        assert held["status"] == "CRITICAL" and "CRITICAL after 2 s" in held["summary"], held
    finally:
        with console.cursor() as cursor:
            cursor.execute(f"RESUME {database}")
        console.close()
    assert pgbouncer_result()["status"] == "OK"
