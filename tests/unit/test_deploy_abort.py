"""`igops ops abort` of an interrupted deploy, with the real release and upstream agents run on
this machine (as the SSH session runs them) and a real HTTP server per app host that answers
/health for the release its `current` points at: a host the deploy left drained goes back into
the load balancer only once it passes the rollout's health gate; one that fails it returns to
its release before the interrupted run and is gated there; the others, and an unreachable host,
stay out and are named."""

import asyncio
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from igops import deploy, deploy_agents, deploy_gate, deploy_record, interrupted, inventory, process_identity, safety
from igops.agent import upstream
from igops.errors import ExitCode, IgopsError
from tests.unit.inventories import unit_inventory
from tests.unit.test_deploy_drain import upstream_answer
from tests.unit.test_deploy_rollout import Recorder

HOSTS = {"app1": "127.0.31.1", "app2": "127.0.31.2", "app3": "127.0.31.3"}
OPERATION = "20261204-071530-a3f9"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOSTS["app1"], 0))
        return probe.getsockname()[1]


def root(tmp_path: Path, host: str) -> Path:
    return tmp_path / "hosts" / host / "app"


def current_of(tmp_path: Path, host: str) -> str:
    return os.path.basename(os.readlink(root(tmp_path, host) / "current"))


class Lab:
    """The app hosts' roots (R1 and R2 staged, `current` on the release given), nginx's upstream
    file, and /health on each host's address: 503 for a (host, release) in `broken`."""

    def __init__(self, tmp_path: Path, currents: dict[str, str], broken: set[tuple[str, str]]):
        self.tmp_path = tmp_path
        self.broken = broken
        self.port = free_port()
        for host, release in currents.items():
            for name in ("R1", "R2"):
                directory = root(tmp_path, host) / "releases" / name
                directory.mkdir(parents=True)
                (directory / "RELEASE.json").write_text(json.dumps({"id": name, "built_at": "2026-12-04T07:00:00Z"}))
            (root(tmp_path, host) / "current").symlink_to(root(tmp_path, host) / "releases" / release)
        self.upstream = tmp_path / "upstream.conf"
        self.upstream.write_text(
            "upstream app {\n" + "".join(f"    server {a}:{self.port};\n" for a in HOSTS.values()) + "}\n"
        )
        sections = (
            f'[app]\nport = {self.port}\nroot = "{tmp_path}/hosts/{{host}}/app"\nreload_command = "true"\n'
            f'[lb]\nupstream_file = "{self.upstream}"\ntest_command = "true"\nreload_command = "true"\n'
        )
        hosts = [(name, address, "app") for name, address in HOSTS.items()] + [("lb1", "127.0.31.100", "lb")]
        self.fleet = inventory.load(unit_inventory(tmp_path, hosts, sections=sections))

    def drained(self) -> list[str]:
        text = self.upstream.read_text()
        return [host for host, address in HOSTS.items() if f"server {address}:{self.port} down;" in text]

    @contextmanager
    def serving(self) -> Iterator[None]:
        lab = self

        class Health(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = next(name for name, address in HOSTS.items() if address == self.server.server_address[0])
                release = current_of(lab.tmp_path, host)
                failing = (host, release) in lab.broken
                document = {"release": release, "checks": {"db": {"ok": not failing, "error": "injected"}}}
                body = json.dumps(document).encode()
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        servers = [ThreadingHTTPServer((address, self.port), Health) for address in HOSTS.values()]
        for server in servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            yield
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


class Agents:
    """What agents_here gives a test: the hosts that do not answer, as one SSH cannot reach, and
    each request a host's release agent received, in order."""

    def __init__(self) -> None:
        self.unreachable: set[str] = set()
        self.release_requests: list[tuple[str, dict]] = []


@pytest.fixture
def agents_here(monkeypatch):
    """Every agent request runs the agent on this machine: the release agent as its SSH session
    would run it, the upstream agent's request handler in this process, without nginx (whose
    workers it would wait for: a lab's, on this machine, never reload)."""
    agents = Agents()
    monkeypatch.setattr(upstream, "workers", dict)

    async def request(session, document, timeout, payload=b""):
        if session.target.name in agents.unreachable:
            return deploy_agents.AgentAnswer(None, "ssh: connect to host: Connection timed out", False)
        if "igops-upstream" in session.command:
            return await upstream_answer(session, document)
        agents.release_requests.append((session.target.name, document))
        line = json.dumps(document).encode() + b"\n" + payload
        done = await asyncio.to_thread(
            subprocess.run, ["sh", "-c", session.command], input=session.prefix + line, capture_output=True
        )
        return session._parse(done.stdout.decode().strip().splitlines()[-1])

    monkeypatch.setattr(deploy_agents.AgentSession, "request", request)
    return agents


def drain(lab: Lab, hosts: list[str]) -> None:
    """As the deploy's batch did before it was killed: out of nginx with igops' mark."""
    with deploy.AppFleet.of(lab.fleet) as app:
        deploy_gate.LoadBalancers(app, "deploy D to R2").change(down=[app.server(app.host(name)) for name in hosts])


def killed_run(lab: Lab, before: dict[str, str]) -> None:
    """The last-run record of deploy D to R2, whose process, of this machine, is gone (SIGKILL)."""
    gone = subprocess.Popen(["sleep", "60"])
    process = {
        "host": safety.operator_host(),
        "pid": gone.pid,
        **process_identity.own(),
        "process_start": process_identity.process_start(gone.pid),
    }
    gone.kill()
    gone.wait()
    path = deploy_record.last_run_path(lab.fleet)
    path.parent.mkdir(parents=True)
    record = {"deploy_id": "D", "kind": "deploy", "target": "R2", "status": "running", "before": before}
    path.write_text(json.dumps({**record, **process, "machine": socket.gethostname(), "updated": "x"}))


def operation() -> dict:
    return {
        "id": OPERATION,
        "kind": "deploy",
        "title": "deploy of R2",
        "targets": list(HOSTS),
        "resources": [["app", name] for name in HOSTS],
        "params": {"target": "R2", "batch": "1", "health_passes": 2, "health_timeout": 1.0},
    }


def abort(lab: Lab) -> tuple[interrupted.Continuation, Recorder]:
    continuation = interrupted.plan_abort(lab.fleet, operation(), [])
    return continuation, Recorder()


def test_a_host_killed_while_failing_its_gate_returns_to_its_release_before_and_only_healthy_hosts_go_back(
    tmp_path, agents_here
):
    # Killed while app1, switched to R2 (whose /health fails), was gated; app2, drained with it,
    # was not switched yet; app3 was never drained.
    lab = Lab(tmp_path, {"app1": "R2", "app2": "R1", "app3": "R1"}, broken={("app1", "R2")})
    drain(lab, ["app1", "app2"])
    killed_run(lab, {"app1": "R1", "app2": "R1"})
    with lab.serving():
        continuation, recorder = abort(lab)
        assert continuation.spec.steps == [
            "health gate app1 (on R2), app2 (on R1): 2 passes of /health in a row within 1 s, serving the release "
            "it runs",
            "each of those that fails it and ran another release before the interrupted deploy goes back to that "
            "release (app1 to R1): switch current, reload gunicorn, health gate: 2 passes of /health in a row "
            "within 1 s, serving that release",
            "put back in the load balancer each of app1, app2 that passed a health gate; the others stay out of it",
        ]
        assert "app1: returns to R1 if it fails (its release before the interrupted deploy D)" in continuation.notes
        assert lab.drained() == ["app1", "app2"], "planning changes nothing"
        result = continuation.apply(recorder)
    assert [step.title for step in recorder.steps] == continuation.spec.steps
    assert recorder.steps[0].detail.startswith("app1: failed its gate on R2: /health answered 503 (release R2)")
    assert lab.drained() == []
    assert {host: current_of(tmp_path, host) for host in HOSTS} == dict.fromkeys(HOSTS, "R1")
    assert result["not_undone"] == []
    assert result["undone"][0].startswith("app1 back in the load balancer (failed its gate on R2")
    assert "; back on R1)" in result["undone"][0]
    history = (root(tmp_path, "app1") / "revisions.log").read_text().splitlines()
    assert [(e["action"], e["release"], e["deploy"]) for e in map(json.loads, history)] == [
        ("rollback", "R1", OPERATION)
    ]
    # The request the rollout's switch back sends, `protect` too: the same releases spared.
    assert [(host, r) for host, r in agents_here.release_requests if r["op"] == "switch"] == [
        (
            "app1",
            {
                "op": "switch",
                "id": "R1",
                "keep": lab.fleet.model.app.keep_releases,
                "reload": "true",
                "action": "rollback",
                "deploy": OPERATION,
                "protect": ["R1"],
            },
        )
    ]


def test_a_host_unhealthy_on_both_releases_and_an_unreachable_one_stay_out_and_are_named(tmp_path, agents_here):
    lab = Lab(tmp_path, {"app1": "R2", "app2": "R2", "app3": "R1"}, broken={("app1", "R2"), ("app1", "R1")})
    drain(lab, ["app1", "app2", "app3"])
    killed_run(lab, dict.fromkeys(HOSTS, "R1"))
    agents_here.unreachable.add("app2")
    with lab.serving():
        continuation, recorder = abort(lab)
        assert continuation.spec.steps[0].startswith("health gate app1 (on R2), app3 (on R1): ")
        assert "app2 stays out of the load balancer: unreachable: ssh: connect to host: Connection timed out " in (
            "\n".join(continuation.notes)
        )
        with pytest.raises(IgopsError) as failed:
            continuation.apply(recorder)
    assert failed.value.exit_code == ExitCode.PARTIAL
    message = failed.value.message
    assert message.startswith("2 app hosts left out of the load balancer: app1: failed its gate on R2: /health")
    assert "; back on R1 but unhealthy there too: /health answered 503 (release R1): db: injected" in message
    assert "app2: unreachable: ssh: connect to host" in message and message.endswith("; back in it: app3")
    assert f"igops ops abort {OPERATION} again" in failed.value.hint
    assert failed.value.data["not_undone"][0].startswith("app1 stays out of the load balancer: failed its gate")
    assert lab.drained() == ["app1", "app2"]
    assert recorder.steps[-1].detail == "back: app3; left out: app1, app2"
    assert current_of(tmp_path, "app1") == "R1" and current_of(tmp_path, "app2") == "R2"


def test_without_a_release_to_return_to_a_failing_host_stays_out_on_the_release_it_runs(tmp_path, agents_here):
    """No record of the interrupted run on this machine (it ran elsewhere): the release app1 ran
    before it is unknown, so it is not switched, and it stays out."""
    lab = Lab(tmp_path, {"app1": "R2", "app2": "R1", "app3": "R1"}, broken={("app1", "R2")})
    drain(lab, ["app1"])
    with lab.serving():
        continuation, recorder = abort(lab)
        assert len(continuation.spec.steps) == 2, "no host to return: no step for it"
        with pytest.raises(IgopsError) as failed:
            continuation.apply(recorder)
    assert failed.value.exit_code == ExitCode.FAILED
    assert failed.value.message.startswith("1 app host left out of the load balancer: app1: failed its gate on R2")
    assert recorder.steps[-1].detail == "none passed a gate: nothing was put back; left out: app1"
    assert lab.drained() == ["app1"] and current_of(tmp_path, "app1") == "R2"


def test_an_abort_with_no_host_out_of_rotation_only_ends_the_operation(tmp_path, agents_here):
    lab = Lab(tmp_path, dict.fromkeys(HOSTS, "R1"), broken=set())
    continuation, recorder = abort(lab)
    assert continuation.spec.steps == []
    assert continuation.apply(recorder) == {"undone": [], "not_undone": []}
    assert recorder.steps == []
