"""The lab's PagerDuty and Pingdom stand-ins: validation as documented, recording, faults."""

import time

import pytest

from igops.secrets import Secrets

pytestmark = pytest.mark.lab


@pytest.fixture
def endpoints(lab):
    import requests

    secrets = Secrets(lab.model.secrets.file)
    pagerduty, pingdom = lab.model.monitoring.pagerduty_url, lab.model.monitoring.pingdom_url
    with requests.Session() as session:
        for base in (pagerduty, pingdom.removesuffix("/api/3.1")):
            session.delete(f"{base}/_lab/faults", timeout=5)
        yield {
            "session": session,
            "pagerduty": pagerduty,
            "pingdom": pingdom,
            "pingdom_lab": pingdom.removesuffix("/api/3.1"),
            "routing_key": secrets.require("pagerduty_routing_key"),
            "token": secrets.require("pingdom_token"),
        }


def test_pagerduty_accepts_a_valid_event_and_rejects_invalid_ones(endpoints):
    session, url, key = endpoints["session"], endpoints["pagerduty"], endpoints["routing_key"]
    event = {
        "routing_key": key,
        "event_action": "trigger",
        "dedup_key": "lab-test-1",
        "payload": {"summary": "db1 replication lag", "source": "db1", "severity": "critical"},
    }
    response = session.post(f"{url}/v2/enqueue", json=event, timeout=5)
    assert response.status_code == 202
    assert response.json() == {"status": "success", "message": "Event processed", "dedup_key": "lab-test-1"}

    for broken, fragment in [
        ({**event, "routing_key": "short"}, "routing_key"),
        ({**event, "event_action": "explode"}, "event_action"),
        ({**event, "payload": {"summary": "x", "source": "y", "severity": "bad"}}, "severity"),
        ({key: value for key, value in event.items() if key != "payload"}, "payload"),
        ({**event, "event_action": "resolve", "dedup_key": None}, "dedup_key"),
    ]:
        response = session.post(f"{url}/v2/enqueue", json=broken, timeout=5)
        assert response.status_code == 400, broken
        body = response.json()
        assert body["status"] == "invalid event" and any(fragment in error for error in body["errors"])

    change = {"routing_key": key, "payload": {"summary": "deploy 42", "source": "igops"}}
    assert session.post(f"{url}/v2/change/enqueue", json=change, timeout=5).status_code == 202


def test_injected_faults_then_recorded_requests(endpoints):
    session, url, key = endpoints["session"], endpoints["pagerduty"], endpoints["routing_key"]
    since = session.get(f"{url}/_lab/requests", timeout=5).json()["requests"]
    last = since[-1]["seq"] if since else 0
    assert session.post(f"{url}/_lab/faults", json={"status": 429, "count": 2}, timeout=5).status_code == 200
    event = {
        "routing_key": key,
        "event_action": "trigger",
        "payload": {"summary": "retry me", "source": "lab", "severity": "warning"},
    }
    statuses = [session.post(f"{url}/v2/enqueue", json=event, timeout=5).status_code for _ in range(3)]
    assert statuses == [429, 429, 202]
    recorded = session.get(f"{url}/_lab/requests", params={"since": last}, timeout=5).json()["requests"]
    assert [entry["status"] for entry in recorded] == [429, 429, 202]
    assert recorded[-1]["body"]["payload"]["summary"] == "retry me"


def test_pingdom_checks_results_and_limits(endpoints, lab):
    session, url = endpoints["session"], endpoints["pingdom"]
    assert session.get(f"{url}/checks", timeout=5).status_code == 401
    auth = {"Authorization": f"Bearer {endpoints['token']}"}
    lb = lab.with_role("lb")[0]
    created = session.post(
        f"{url}/checks",
        headers=auth,
        timeout=5,
        json={
            "name": "lab lb",
            "host": str(lb.address),
            "type": "http",
            "url": "/health",
            "resolution": 1,
            "tags": ["lab"],
        },
    )
    assert created.status_code == 200, created.text
    assert "Req-Limit-Short" in created.headers and "Req-Limit-Long" in created.headers
    check_id = created.json()["check"]["id"]
    try:
        listed = session.get(f"{url}/checks", headers=auth, params={"include_tags": "true"}, timeout=5).json()
        assert check_id in [check["id"] for check in listed["checks"]]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            results = session.get(f"{url}/results/{check_id}", headers=auth, timeout=5).json()["results"]
            if results:
                break
            time.sleep(0.5)
        assert results and results[0]["status"] == "up", results
        detail = session.get(f"{url}/checks/{check_id}", headers=auth, timeout=5).json()["check"]
        assert detail["status"] == "up" and detail["type"]["http"]["url"] == "/health"
        summary = session.get(
            f"{url}/summary.average/{check_id}", headers=auth, params={"includeuptime": "true"}, timeout=5
        ).json()["summary"]
        assert summary["status"]["totalup"] > 0
        assert (
            session.put(f"{url}/checks/{check_id}", headers=auth, json={"paused": True}, timeout=5).status_code == 200
        )
        window = session.post(
            f"{url}/maintenance",
            headers=auth,
            timeout=5,
            json={
                "description": "deploy",
                "from": int(time.time()) + 60,
                "to": int(time.time()) + 600,
                "uptimeids": [check_id],
            },
        )
        assert window.status_code == 200 and window.json()["maintenance"]["id"] >= 1
        session.post(f"{endpoints['pingdom_lab']}/_lab/faults", json={"status": 429}, timeout=5)
        limited = session.get(f"{url}/checks", headers=auth, timeout=5)
        assert limited.status_code == 429 and limited.json()["error"]["statuscode"] == 429
    finally:
        session.delete(f"{url}/checks/{check_id}", headers=auth, timeout=5)
