"""The Pingdom and PagerDuty clients against the lab's receivers, run here on ephemeral ports:
limits and 429 back-off, checks as code, dedup, trigger-once, resolve on recovery, which
answers are retried, and fleets that share a state dir keeping their incidents apart."""

import json
import secrets as random
import socket
import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import pytest

from igops import inventory
from igops.checks import Result, pingdom
from igops.errors import NagiosStatus
from igops.lab.pagerduty_receiver import PagerDuty
from igops.lab.pingdom_receiver import LONG_LIMIT, SHORT_LIMIT, Pingdom
from igops.lab.receiver_base import handler_for
from igops.pagerduty import incidents as pagerduty
from tests.serving import served

TOKEN = random.token_urlsafe(24)
ROUTING_KEY = random.token_hex(16)


@contextmanager
def _receivers(tmp_path, bind: str, reached_at: str):
    """The lab's PagerDuty and Pingdom receivers, listening on `bind`, reached at `reached_at`."""
    pager = PagerDuty(tmp_path, ROUTING_KEY)
    pingdom_receiver = Pingdom(tmp_path, TOKEN, probe_interval=60)
    servers = [ThreadingHTTPServer((bind, 0), handler_for(receiver)) for receiver in (pager, pingdom_receiver)]
    for server in servers:
        server.daemon_threads = True
    with served(servers[0]), served(servers[1]):
        yield {
            "pagerduty": pager,
            "pagerduty_url": f"http://{reached_at}:{servers[0].server_address[1]}",
            "pingdom": pingdom_receiver,
            "pingdom_url": f"http://{reached_at}:{servers[1].server_address[1]}/api/3.1",
        }


@pytest.fixture
def services(tmp_path):
    with _receivers(tmp_path, "127.0.0.1", "127.0.0.1") as found:
        yield found


def fleet_for(tmp_path, services, public_urls=(), lb=True, name="unit"):
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(f'pingdom_token = "{TOKEN}"\npagerduty_routing_key = "{ROUTING_KEY}"\n')
    secrets_file.chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    urls = ", ".join(f'"{url}"' for url in public_urls)
    path = tmp_path / f"{name.replace('/', '_')}.toml"
    path.write_text(f"""
[fleet]
name = "{name}"
state_dir = "{tmp_path / "state"}"
[ssh]
known_hosts = "{known_hosts}"
[monitoring]
pingdom_url = "{services["pingdom_url"]}"
pagerduty_url = "{services["pagerduty_url"]}"
public_urls = [{urls}]
[secrets]
file = "{secrets_file}"
[[hosts]]
name = "lb1"
address = "127.0.20.250"
roles = {'["lb"]' if lb else "[]"}
""")
    return inventory.load_file(path)


def test_pingdom_backs_off_on_429_and_remembers_the_limits(services):
    slept = []
    client = pingdom.Pingdom(services["pingdom_url"], TOKEN, sleep=slept.append)
    services["pingdom"].faults.add({"status": 429, "count": 2})
    assert client.checks() == []
    assert slept == [1.0, 2.0]
    assert client.limits["short"].remaining == SHORT_LIMIT - 1
    assert client.limits["long"].remaining == LONG_LIMIT - 1

    client.limits["short"] = pingdom.RateLimit(0, 5)
    client.checks()
    assert slept[-1] == pytest.approx(5, abs=0.5)
    client.limits["short"] = pingdom.RateLimit(0, 3600)
    seen = len(services["pingdom"].recorder.since(0))
    with pytest.raises(pingdom.PingdomError, match="short request limit is used up"):
        client.checks()
    assert len(services["pingdom"].recorder.since(0)) == seen, "a request was sent past the limit"


def test_pingdom_wrong_token_fails_at_once(services):
    slept = []
    client = pingdom.Pingdom(services["pingdom_url"], "not-the-token", sleep=slept.append)
    with pytest.raises(pingdom.PingdomError, match="HTTP 401"):
        client.checks()
    assert slept == []
    headers = services["pingdom"].recorder.since(0)[-1]["headers"]
    assert headers["authorization"] == "Bearer not-the-token"


def test_pingdom_sync_creates_updates_and_pauses_to_match_the_inventory(tmp_path, services):
    fleet = fleet_for(tmp_path, services, public_urls=["https://photos.example.com/explore?x=1"])
    client = pingdom.Pingdom.for_fleet(fleet)
    plan = pingdom.plan_sync(client, fleet)
    assert [(change.action, change.name) for change in plan.changes] == [
        ("create", "unit lb1 health"),
        ("create", "unit https://photos.example.com/explore?x=1"),
    ]
    pingdom.apply_sync(client, plan)
    checks = {check["name"]: check for check in client.checks("igops-unit")}
    public = client.check(checks["unit https://photos.example.com/explore?x=1"]["id"])
    assert public["hostname"] == "photos.example.com"
    assert public["type"]["http"] == {"url": "/explore?x=1", "encryption": True, "port": 443}
    assert pingdom.plan_sync(client, fleet).changes == []

    client.modify_check(checks["unit lb1 health"]["id"], {"url": "/old", "paused": True})
    services["pingdom"].create_check({"name": "someone else's", "host": "127.0.0.1", "type": "http"})
    fleet = fleet_for(tmp_path, services, public_urls=[])
    plan = pingdom.plan_sync(client, fleet)
    assert {(change.action, change.name) for change in plan.changes} == {
        ("update", "unit lb1 health"),
        ("pause", "unit https://photos.example.com/explore?x=1"),
    }
    update = next(change for change in plan.changes if change.action == "update")
    assert update.body == {"url": "/health", "paused": False}
    assert "url '/old' → '/health'" in update.describe()
    pingdom.apply_sync(client, plan)
    assert pingdom.plan_sync(client, fleet).changes == []
    statuses = {check.name: check.status for check in pingdom.statuses(client, fleet, 3600)}
    assert statuses["unit https://photos.example.com/explore?x=1"] == "paused"
    assert "someone else's" not in statuses


def test_pingdom_maintenance_starts_now_as_the_spec_says(tmp_path, services):
    """The 3.1 spec allows only future times for a window, and 1 for "now": a window that
    starts at the client's reading of the clock is refused by the time it arrives."""
    import json
    import time

    from tests.conftest import run_igops

    fleet = fleet_for(tmp_path, services)
    client = pingdom.Pingdom.for_fleet(fleet)
    pingdom.apply_sync(client, pingdom.plan_sync(client, fleet))
    before = int(time.time())
    result = run_igops("-c", str(fleet.source), "pingdom", "maintenance", "--for", "10m", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    [window] = services["pingdom"].state()["maintenance"]
    assert window["id"] == data["id"] and window["checks"]["uptime"] == [check["id"] for check in client.checks()]
    assert before <= window["from"] <= int(time.time()) and window["to"] == data["to"]
    assert 599 <= window["to"] - window["from"] <= 600
    [request] = [
        entry
        for entry in services["pingdom"].recorder.since(0)
        if entry.get("method") == "POST" and entry.get("path", "").endswith("/maintenance")
    ]
    assert request["body"]["from"] == 1


def critical(target="app2"):
    return Result("http-app", target, NagiosStatus.CRITICAL, "GET /health: connection refused")


def events(services):
    return [entry for entry in services["pagerduty"].recorder.since(0) if entry["path"] == "/v2/enqueue"]


def test_paging_triggers_once_and_resolves_on_recovery(tmp_path, services):
    fleet = fleet_for(tmp_path, services)
    pager = pagerduty.Pager(fleet)
    first = pager.reconcile([critical()], complete_run=True)
    assert first.triggered == ["igops/unit/http-app/app2"] and not first.failed
    again = pagerduty.Pager(fleet).reconcile([critical()], complete_run=True)
    assert again.triggered == [] and again.still_open == ["igops/unit/http-app/app2"]
    sent = events(services)
    assert len(sent) == 1
    payload = sent[0]["body"]["payload"]
    assert sent[0]["body"]["dedup_key"] == "igops/unit/http-app/app2"
    assert (payload["severity"], payload["source"], payload["component"]) == ("critical", "app2", "http-app")
    assert (pager.state_path.stat().st_mode & 0o777) == 0o600

    unknown = Result("http-app", "app2", NagiosStatus.UNKNOWN, "not checked")
    assert pagerduty.Pager(fleet).reconcile([unknown], complete_run=True).resolved == []
    recovered = pagerduty.Pager(fleet).reconcile(
        [Result("http-app", "app2", NagiosStatus.OK, "200")], complete_run=True
    )
    assert recovered.resolved == ["igops/unit/http-app/app2"]
    assert services["pagerduty"].state()["incidents"][0]["status"] == "resolved"
    assert pagerduty.Pager(fleet).open_incidents() == {}


def test_fleets_sharing_a_state_dir_keep_their_incidents_apart(tmp_path, services):
    prod = fleet_for(tmp_path, services, name="prod")
    staging = fleet_for(tmp_path, services, name="staging")
    assert prod.state_dir == staging.state_dir
    assert pagerduty.Pager(staging).reconcile([critical()], complete_run=True).triggered == [
        "igops/staging/http-app/app2"
    ]
    assert pagerduty.Pager(prod).reconcile([], complete_run=True).resolved == []

    again = pagerduty.Pager(staging).reconcile([critical()], complete_run=True)
    assert again.triggered == [] and again.still_open == ["igops/staging/http-app/app2"]
    assert len(events(services)) == 1
    assert services["pagerduty"].state()["incidents"][0]["status"] == "triggered"
    assert pagerduty.Pager(prod).open_incidents() == {}


def test_runs_at_once_lose_no_key(tmp_path, services):
    prod = fleet_for(tmp_path, services, name="prod")
    staging = fleet_for(tmp_path, services, name="staging")
    runs = [(prod, "app1"), (prod, "app3"), (staging, "app1"), (staging, "app3")]
    start = threading.Barrier(len(runs))

    def run(fleet, target):
        pager = pagerduty.Pager(fleet)
        start.wait()
        pager.reconcile([critical(target)], complete_run=False)

    threads = [threading.Thread(target=run, args=args) for args in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for fleet in (prod, staging):
        assert sorted(pagerduty.Pager(fleet).open_incidents()) == [
            f"igops/{fleet.model.fleet.name}/http-app/app1",
            f"igops/{fleet.model.fleet.name}/http-app/app3",
        ]


def test_open_incidents_move_from_the_shared_file_of_older_versions(tmp_path, services):
    unit = fleet_for(tmp_path, services)
    staging = fleet_for(tmp_path, services, name="staging")
    nested = fleet_for(tmp_path, services, name="unit/eu")  # its keys start igops/unit/ too
    shared = unit.state_dir / "pagerduty" / "open.json"
    shared.parent.mkdir(parents=True)
    opened = {"since": "2024-05-01T10:00:00+00:00", "summary": "GET /health: connection refused"}
    shared.write_text(
        json.dumps(
            {
                "igops/unit/http-app/app2": {"check": "http-app", "target": "app2", **opened},
                "igops/staging/http-app/app5": {"check": "http-app", "target": "app5", **opened},
                "igops/unit/eu/http-app/app1": {"check": "http-app", "target": "app1", **opened},
            }
        )
    )
    assert list(pagerduty.Pager(unit).open_incidents()) == ["igops/unit/http-app/app2"]

    first = pagerduty.Pager(unit).reconcile([critical()], complete_run=True)
    assert first.triggered == [] and first.resolved == [] and first.still_open == ["igops/unit/http-app/app2"]
    assert events(services) == []
    assert sorted(json.loads(shared.read_text())) == ["igops/staging/http-app/app5", "igops/unit/eu/http-app/app1"]
    assert list(json.loads(pagerduty.Pager(unit).state_path.read_text())) == ["igops/unit/http-app/app2"]

    ok = Result("http-app", "app5", NagiosStatus.OK, "200")
    assert pagerduty.Pager(staging).reconcile([ok], complete_run=True).resolved == ["igops/staging/http-app/app5"]
    assert list(json.loads(shared.read_text())) == ["igops/unit/eu/http-app/app1"]
    nested_pager = pagerduty.Pager(nested)
    assert nested_pager.reconcile([], complete_run=True).resolved == ["igops/unit/eu/http-app/app1"]
    assert not shared.exists()
    assert nested_pager.state_path.parent == pagerduty.Pager(unit).state_path.parent
    assert nested_pager.state_path.name.startswith("unit_eu-")
    assert pagerduty.Pager(unit).open_incidents() == {
        "igops/unit/http-app/app2": {"check": "http-app", "target": "app2", **opened}
    }


def test_paging_retries_429_and_5xx_but_never_400(tmp_path, services):
    fleet = fleet_for(tmp_path, services)
    faults = services["pagerduty"].faults
    faults.add({"status": 429, "count": 1})
    faults.add({"status": 500, "count": 1})
    report = pagerduty.Pager(fleet).reconcile([critical("app1")], complete_run=False)
    assert report.triggered == ["igops/unit/http-app/app1"]
    assert [entry["status"] for entry in events(services)] == [429, 500, 202]

    faults.add({"status": 400, "count": 1})
    report = pagerduty.Pager(fleet).reconcile([critical("app3")], complete_run=False)
    assert report.triggered == [] and report.failed[0]["error"].startswith("HTTP 400")
    assert [entry["status"] for entry in events(services)][-1] == 400
    assert len(events(services)) == 4, "a 400 was retried"
    assert "igops/unit/http-app/app3" not in pagerduty.Pager(fleet).open_incidents()
    retried = pagerduty.Pager(fleet).reconcile([critical("app3")], complete_run=False)
    assert retried.triggered == ["igops/unit/http-app/app3"], "the next run must try again"


def test_a_complete_run_resolves_what_is_no_longer_checked(tmp_path, services):
    fleet = fleet_for(tmp_path, services)
    pagerduty.Pager(fleet).reconcile([critical("app9")], complete_run=True)
    partial = pagerduty.Pager(fleet).reconcile([], complete_run=False)
    assert partial.resolved == []
    complete = pagerduty.Pager(fleet).reconcile([], complete_run=True)
    assert complete.resolved == ["igops/unit/http-app/app9"]


def test_once_pagerduty_is_unreachable_the_rest_of_the_run_is_not_sent(tmp_path, services):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    fleet = fleet_for(tmp_path, {**services, "pagerduty_url": f"http://127.0.0.1:{port}"})
    report = pagerduty.Pager(fleet).reconcile([critical("app1"), critical("app2")], complete_run=False)
    assert report.triggered == []
    first, second = report.failed
    assert first["dedup_key"].endswith("app1") and not first["error"].startswith("HTTP")
    assert second["dedup_key"].endswith("app2") and second["error"].startswith("not sent: PagerDuty failed earlier")
    assert pagerduty.Pager(fleet).open_incidents() == {}


def test_paging_refuses_a_plain_http_url_off_this_machine(tmp_path, services):
    fleet = fleet_for(tmp_path, {**services, "pagerduty_url": "http://events.example.com"})
    with pytest.raises(Exception, match="pagerduty_url 'http://events.example.com'.*https"):
        pagerduty.Pager(fleet).prepare()


def _outward_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.fixture
def outward(tmp_path):
    """The receivers listening on every address, reached over plain http at a non-loopback one."""
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    with _receivers(tmp_path, "0.0.0.0", address) as found:
        yield found


def test_no_token_or_routing_key_travels_over_plain_http_off_this_machine(outward):
    from igops.errors import UsageError
    from igops.pagerduty.changes import send_change

    with pytest.raises(UsageError, match="pingdom_url: http://.* is not https://"):
        pingdom.Pingdom(outward["pingdom_url"], TOKEN).checks()
    result = send_change(outward["pagerduty_url"], ROUTING_KEY, "deploy", "unit", sleep=lambda _: None)
    assert not result.sent and result.attempts == 0 and "not https://" in result.detail
    assert outward["pingdom"].recorder.since(0) == [] and outward["pagerduty"].recorder.since(0) == []
    with pytest.raises(Exception, match="https"):
        pagerduty.client(outward["pagerduty_url"], ROUTING_KEY, pagerduty.Reporter())


def test_plain_http_to_loopback_is_allowed(services):
    from igops.pagerduty.changes import send_change

    assert pingdom.Pingdom(services["pingdom_url"], TOKEN).checks() == []
    assert pingdom.Pingdom(services["pingdom_url"].replace("127.0.0.1", "localhost"), TOKEN).checks() == []
    assert send_change(services["pagerduty_url"], ROUTING_KEY, "deploy", "unit", sleep=lambda _: None).sent
