"""Deploys in the lab under client load through nginx: a good release, a release whose /health
fails, an app server lost mid-deploy, igops killed mid-deploy, rollbacks, and the PagerDuty
change events that mark them. Real sshd, nginx, gunicorn, Postgres, Redis and memcached; the
load generator's clients see every failed request."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from igops.errors import ExitCode
from igops.lab import state
from igops.pagerduty.changes import send_change
from igops.secrets import Secrets
from tests.conftest import ROOT, run_igops
from tests.labtools import igops, verify_lab_ledger, wait_for

pytestmark = pytest.mark.lab

APP = ROOT / "app"
APP_HOSTS = ("app1", "app2", "app3")
DEPLOY_TIMEOUT = 240
FORWARD_PORT = 2213


@pytest.fixture(scope="module", autouse=True)
def leaves_the_working_tree_release(lab):
    """Whatever the tests did, the lab ends on a good release of the current app/, with every
    app server in the load balancer."""
    yield
    done = run_igops("-c", str(lab.source), "deploy", "--analysis", "0", "--yes", timeout=DEPLOY_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert " down" not in upstream_text()


def app_copy(tmp_path: Path, name: str, break_health: bool = False) -> Path:
    """The app as a new release: the working tree plus a marker, so its content is new."""
    source = tmp_path / name / "app"
    shutil.copytree(APP, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "DEPLOY_TEST").write_text(f"{name} {time.time()}\n")
    if break_health:
        views = source / "views.py"
        text = views.read_text()
        original = "    healthy, checks = health_checker(settings.IGOPS_CONFIG).run(current.directory.cached)\n"
        assert original in text
        views.write_text(
            text.replace(
                original,
                original + '    healthy, checks["injected"] = False, '
                '{"ok": False, "error": "injected by the deploy test"}\n',
            )
        )
    return source


def current_of(host: str) -> str:
    return os.path.basename(os.readlink(state.paths().app_root(host) / "current"))


def served_by(lab, host: str) -> str:
    with urllib.request.urlopen(f"http://{lab.host(host).address}:{lab.model.app.port}/health", timeout=5) as answer:
        return json.load(answer)["release"]


def upstream_text() -> str:
    return state.paths().upstream_file().read_text()


def drained(lab, host: str) -> bool:
    return bool(re.search(rf"server {re.escape(str(lab.host(host).address))}:\d+ [^;]*down;", upstream_text()))


def health_gate_only(args: tuple[str, ...]) -> tuple[str, ...]:
    """These tests exercise the /health gate: a deploy runs without its canary analysis (on by
    default, it would wait a minute per deploy and hold one that saw too little traffic)."""
    if args and args[0] in ("rollback", "releases", "pending") or "--analysis" in args:
        return args
    return (*args, "--analysis", "0")


def igops_deploy(lab, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    return run_igops(
        "-c", str(config or lab.source), "deploy", *health_gate_only(args), "--yes", timeout=DEPLOY_TIMEOUT
    )


def start_igops_deploy(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "igops", "-c", str(config), "deploy", *health_gate_only(args), "--yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


@contextmanager
def load_through_the_lb(lab, tmp_path: Path):
    """The load generator against nginx for as long as the block runs; yields its report,
    filled in when the block ends."""
    lb = lab.with_role("lb")[0]
    ledger = tmp_path / "ledger.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.loadgen",
            "run",
            "--url",
            f"http://{lb.address}",
            "--rate",
            "40",
            "--duration",
            "600",
            "--ledger",
            str(ledger),
            "--users",
            "10",
            "--concurrency",
            "8",
            "--seed",
            "8",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    report: dict = {}
    try:
        # A photo is only posted in the timed phase: from then on every request counts.
        assert wait_for(lambda: ledger.exists() and '"op":"post"' in ledger.read_text(), 60), (
            process.stderr.read() if process.poll() is not None else "the load never started"
        )
        yield report
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()  # not left to load the lab under the tests that follow
            process.communicate()
            raise
        report.update(json.loads(out) if out.strip() else {"errors": None, "stderr": err})
        report["ledger"] = ledger


def change_events(lab, deploy_id: str) -> list[dict]:
    url = lab.model.monitoring.pagerduty_url
    with urllib.request.urlopen(f"{url}/_lab/requests?since=0", timeout=5) as answer:
        requests = json.load(answer)["requests"]
    return [
        r
        for r in requests
        if r["path"] == "/v2/change/enqueue"
        and isinstance(r["body"], dict)
        and r["body"].get("payload", {}).get("custom_details", {}).get("deploy_id") == deploy_id
    ]


def test_a_good_release_under_load_reaches_every_host_without_a_failed_request(lab, tmp_path):
    source = app_copy(tmp_path, "good")
    with load_through_the_lb(lab, tmp_path) as report:
        started = time.monotonic()
        done = igops_deploy(lab, "--source", str(source), "--json")
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    envelope = json.loads(done.stdout)
    release = envelope["data"]["target"]
    assert report["errors"] == 0, report.get("errors_by_kind") or report
    assert report["requests"] > 100
    assert {host: current_of(host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, release)
    assert {host: served_by(lab, host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, release)
    assert " down" not in upstream_text()
    assert [h["state"] for h in envelope["data"]["hosts"]] == ["deployed"] * 3
    assert took < 60, f"the deploy took {took:.0f} s"
    assert verify_lab_ledger(report["ledger"]).ok

    [event] = change_events(lab, envelope["data"]["deploy_id"])
    assert event["status"] == 202 and release in event["body"]["payload"]["summary"]
    key = Secrets(lab.model.secrets.file).get("pagerduty_routing_key")
    assert key not in done.stdout + done.stderr


def test_a_release_whose_health_fails_stops_after_the_first_batch_and_is_rolled_back(lab, tmp_path):
    before = {host: current_of(host) for host in APP_HOSTS}
    source = app_copy(tmp_path, "bad", break_health=True)
    with load_through_the_lb(lab, tmp_path) as report:
        done = igops_deploy(lab, "--source", str(source), "--health-timeout", "4")
    assert done.returncode == ExitCode.FAILED, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert "stopped at batch 1 of 3" in error and "app1 rolled back: /health answered 503" in error, error
    assert "injected by the deploy test" in error
    assert re.search(r"app1\s+rolled back", done.stdout), done.stdout
    assert report["errors"] == 0, report.get("errors_by_kind") or report
    assert {host: current_of(host) for host in APP_HOSTS} == before
    assert {host: served_by(lab, host) for host in APP_HOSTS} == before
    assert " down" not in upstream_text()


def test_a_rerun_after_a_kill_rolls_a_failing_batch_back_to_the_release_before_the_killed_run(lab, tmp_path):
    before = {host: current_of(host) for host in APP_HOSTS}
    source = app_copy(tmp_path, "killed-bad", break_health=True)
    # A long gate: igops is killed while app1, switched to the failing release, is being gated.
    run = start_igops_deploy(lab.source, "--source", str(source), "--health-timeout", "120")
    try:
        assert wait_for(lambda: current_of("app1") != before["app1"], 90), "app1 was never switched"
    finally:
        run.kill()
        run.communicate()
    release = current_of("app1")
    assert drained(lab, "app1") and current_of("app2") == before["app2"]

    rerun = igops_deploy(lab, "--source", str(source), "--health-timeout", "4")
    assert rerun.returncode == ExitCode.FAILED, rerun.stderr
    error = rerun.stderr.strip().splitlines()[-1]
    assert "app1 rolled back: /health answered 503" in error and f"back on {before['app1']}" in error, error
    assert {host: current_of(host) for host in APP_HOSTS} == before, f"{release} stayed somewhere"
    assert {host: served_by(lab, host) for host in APP_HOSTS} == before
    assert " down" not in upstream_text()


def test_an_abort_after_a_kill_during_a_failing_gate_never_puts_the_failing_release_in_rotation(lab, tmp_path):
    """igops is killed while app1, switched to a release whose /health fails, is gated. `igops ops
    abort` gates app1 before it goes back. Without the killed run's record of app1's release before
    it (as when the deploy ran on another machine), app1 fails its gate and stays drained, on the
    release it runs, and the operation stays interrupted. With the record, the abort returns app1 to
    that release, gates it there and only then puts it back. app2 and app3, serving throughout,
    are never touched."""
    from igops import deploy_record, operations_view

    before = {host: current_of(host) for host in APP_HOSTS}
    history = {host: revisions_of(host) for host in ("app2", "app3")}
    source = app_copy(tmp_path, "abort-bad", break_health=True)
    # Long enough a gate to kill igops in; the aborts wait it out on app1.
    run = start_igops_deploy(lab.source, "--source", str(source), "--health-timeout", "15")
    try:
        assert wait_for(lambda: current_of("app1") != before["app1"], 90), "app1 was never switched"
    finally:
        run.kill()
        run.communicate()
    bad = current_of("app1")
    assert drained(lab, "app1") and not drained(lab, "app2") and not drained(lab, "app3")
    record = max(
        (r for r in operations_view.list_operations(lab).records if r["kind"] == "deploy"),
        key=lambda r: r["started"],
    )
    assert record["status"] == "interrupted", record

    last_run = deploy_record.last_run_path(lab)
    kept = last_run.read_text()
    last_run.write_text(json.dumps({**json.loads(kept), "host": "elsewhere", "machine": "elsewhere"}))
    try:
        planned, envelope = igops(lab, "ops", "abort", record["id"], "--dry-run")
        assert planned.returncode == 0, planned.stderr[-3000:]
        assert envelope["plan"]["steps"][0].startswith(f"health gate app1 (on {bad}): "), envelope["plan"]
        assert len(envelope["plan"]["steps"]) == 2, "no release to return app1 to"
        aborted, envelope = igops(lab, "ops", "abort", record["id"], "--yes")
    finally:
        last_run.write_text(kept)
    assert aborted.returncode == ExitCode.FAILED, aborted.stderr[-3000:]
    message = envelope["error"]["message"]
    assert message.startswith(f"1 app host left out of the load balancer: app1: failed its gate on {bad}: ")
    assert "/health answered 503" in message and "injected by the deploy test" in message, message
    assert drained(lab, "app1") and current_of("app1") == bad
    [still] = [r for r in operations_view.list_operations(lab).records if r["id"] == record["id"]]
    assert still["status"] == "interrupted" and still["abort_failed"], still

    aborted, envelope = igops(lab, "ops", "abort", record["id"], "--yes")
    assert aborted.returncode == 0, aborted.stderr[-3000:]
    [undone] = envelope["data"]["result"]["undone"]
    assert undone.startswith(f"app1 back in the load balancer (failed its gate on {bad}: /health answered 503")
    assert f"; back on {before['app1']})" in undone, undone
    assert {host: current_of(host) for host in APP_HOSTS} == before
    assert {host: served_by(lab, host) for host in APP_HOSTS} == before
    assert " down" not in upstream_text()
    assert {host: revisions_of(host) for host in ("app2", "app3")} == history, "app2 or app3 was switched"
    assert record["id"] not in [r["id"] for r in operations_view.list_operations(lab).records]


def revisions_of(host: str) -> str:
    path = state.paths().app_root(host) / "revisions.log"
    return path.read_text() if path.exists() else ""


class SshForwarder:
    """A TCP relay in front of one host's sshd that can be cut: the host becomes unreachable
    over SSH while its app keeps serving."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]):
        self.upstream = upstream
        self.server = socket.create_server(listen, reuse_port=False)
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        # A thread blocked in accept() keeps a merely closed listener accepting; shutdown wakes it.
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def inventory_through(lab, tmp_path: Path, host: str, port: int) -> Path:
    """The lab's inventory with `host` reached over SSH through `port` on its address."""
    address = str(lab.host(host).address)
    known_hosts = Path(lab.model.ssh.known_hosts)
    entry = next(line for line in known_hosts.read_text().splitlines() if line.split()[0] == address)
    copy = tmp_path / "known_hosts"
    copy.write_text(known_hosts.read_text() + f"[{address}]:{port} {entry.split(None, 1)[1]}\n")
    text = lab.source.read_text().replace(f'known_hosts = "{known_hosts}"', f'known_hosts = "{copy}"')
    text = text.replace(f'name = "{host}"\n', f'name = "{host}"\nssh_port = {port}\n')
    path = tmp_path / "igops.toml"
    path.write_text(text)
    return path


def test_a_host_lost_mid_deploy_is_left_whole_and_out_of_traffic_and_a_rerun_finishes(lab, tmp_path):
    before = current_of("app3")
    source = app_copy(tmp_path, "lost")
    address = str(lab.host("app3").address)
    forwarder = SshForwarder((address, FORWARD_PORT), (address, 22))
    try:
        run = start_igops_deploy(inventory_through(lab, tmp_path, "app3", FORWARD_PORT), "--source", str(source))
        # Once app1 is out of the load balancer every host has the release staged.
        assert wait_for(lambda: drained(lab, "app1"), 60), run.communicate()
        forwarder.cut()
        out, err = run.communicate(timeout=DEPLOY_TIMEOUT)
    finally:
        forwarder.cut()
    assert run.returncode == ExitCode.PARTIAL, err
    release = current_of("app1")
    assert release != before and current_of("app2") == release
    assert current_of("app3") in (before, release), "app3's current is one release or the other, never broken"
    assert os.path.isdir(os.readlink(state.paths().app_root("app3") / "current"))
    assert "app3 unknown: unreachable during the switch" in err.strip().splitlines()[-1]
    assert drained(lab, "app3") and "# igops-drained:" in upstream_text()
    assert not drained(lab, "app1") and not drained(lab, "app2")

    report = run_igops("-c", str(lab.source), "deploy", "releases", "--json")
    assert report.returncode == ExitCode.PARTIAL
    problems = json.loads(report.stdout)["data"]["problems"]
    assert any("app3 is out of the load balancer" in problem for problem in problems), problems

    rerun = igops_deploy(lab, "--source", str(source), "--json")
    assert rerun.returncode == 0, rerun.stderr
    hosts = {h["host"]: h["state"] for h in json.loads(rerun.stdout)["data"]["hosts"]}
    assert hosts == {"app1": "already", "app2": "already", "app3": "deployed"}
    assert {host: current_of(host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, release)
    assert served_by(lab, "app3") == release and " down" not in upstream_text()


def test_igops_killed_mid_deploy_leaves_no_host_half_switched_and_a_rerun_finishes(lab, tmp_path):
    before = {host: current_of(host) for host in APP_HOSTS}
    source = app_copy(tmp_path, "killed")
    run = start_igops_deploy(lab.source, "--source", str(source))
    assert wait_for(lambda: drained(lab, "app2"), 90), run.communicate()
    run.kill()
    run.wait()
    release = current_of("app1")
    assert release != before["app1"]
    assert current_of("app2") in (before["app2"], release) and current_of("app3") == before["app3"]

    report = run_igops("-c", str(lab.source), "deploy", "releases", "--json")
    assert report.returncode == ExitCode.PARTIAL
    problems = " ".join(json.loads(report.stdout)["data"]["problems"])
    assert "was interrupted" in problems and "app2 is out of the load balancer" in problems
    checked = run_igops("-c", str(lab.source), "check", "--only", "operations", "--json")
    [rotation] = [r for r in json.loads(checked.stdout)["data"]["results"] if r["target"] == "app rotation"]
    assert rotation["status"] == "WARNING" and rotation["summary"].startswith("app2 out of rotation"), rotation
    assert "igops ops abort " in rotation["summary"], rotation

    rerun = igops_deploy(lab, "--source", str(source))
    assert rerun.returncode == 0, rerun.stderr
    assert {host: current_of(host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, release)
    assert " down" not in upstream_text()
    assert run_igops("-c", str(lab.source), "deploy", "releases").returncode == 0


def test_a_deploy_that_loses_etcd_stops_at_the_next_batch_with_the_batch_back_in_rotation(lab, tmp_path):
    """Every etcd member is killed while batch 1 (app1) works: the deploy cannot journal batch
    2 and its lease cannot be renewed, so it stops before batch 2, puts app1 back in rotation
    (a recovery step runs without the journal) and says why. app2 and app3 are untouched."""
    from igops.lab import etcd as lab_etcd
    from tests.reliability.test_operations_killed import etcd_pids, restart_etcd

    before = {host: current_of(host) for host in APP_HOSTS}
    source = app_copy(tmp_path, "lease-lost")
    members = [name for name, _ in state.ETCD_MEMBERS]
    run = start_igops_deploy(lab.source, "--source", str(source), "--batch", "1")
    try:
        assert wait_for(lambda: drained(lab, "app1"), 90), run.communicate()
        for pid in etcd_pids(members):
            os.kill(pid, signal.SIGKILL)
        _, errors = run.communicate(timeout=DEPLOY_TIMEOUT)
    finally:
        restart_etcd(members)
        lab_etcd.wait_healthy()
    assert run.returncode not in (0, None), errors[-3000:]
    assert "etcd" in errors, errors[-3000:]
    assert " down" not in upstream_text(), upstream_text()
    assert current_of("app2") == before["app2"] and current_of("app3") == before["app3"]
    assert "] batch 2/3" not in errors, errors[-3000:]  # the plan lists it; it never began
    rerun = igops_deploy(lab, "--source", str(source))
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_a_request_cancelled_before_its_answer_does_not_answer_the_next_one(lab):
    """An interrupt cancels the requests under way, whose agents still owe their answers: the
    session is dropped, so the next request to that host (an interrupted run's put-back) gets
    its own answer on a new session, not the cancelled one's."""
    from igops import ssh_loop
    from igops.deploy_agents import AppFleet

    stage = {"op": "stage", "id": "never-sent", "sha256": "0" * 64, "size": 1 << 20, "shared": []}

    async def cancel_then_survey(agent):
        assert (await agent.request({"op": "survey"}, 30)).answer is not None
        # A stage whose tarball never comes: its agent waits for the bytes and owes an answer.
        staging = asyncio.ensure_future(agent.request(stage, 30))
        await asyncio.sleep(0.5)
        staging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staging
        return await agent.request({"op": "survey"}, 10)

    with AppFleet.of(lab) as app:
        answer = ssh_loop.call(cancel_then_survey(app.release_agent(app.host("app1"))))
    assert answer.error is None, answer.error
    assert answer.answer["current"] == current_of("app1")
    assert "never-sent" not in releases_on("app1")


def releases_on(host: str) -> list[str]:
    return sorted(os.listdir(state.paths().app_root(host) / "releases"))


def test_a_batch_of_every_app_server_is_refused_with_nothing_changed(lab, tmp_path):
    before = {host: (current_of(host), releases_on(host)) for host in APP_HOSTS}
    upstream = upstream_text()
    source = app_copy(tmp_path, "everything")
    refused = igops_deploy(lab, "--source", str(source), "--batch", "100%")
    assert refused.returncode == ExitCode.REFUSED, refused.stderr
    error = refused.stderr.strip().splitlines()
    assert any("batch 1 (app1, app2, app3) would leave 0 app servers in service" in line for line in error), error
    assert any("smaller batches" in line for line in error), error
    assert {host: (current_of(host), releases_on(host)) for host in APP_HOSTS} == before
    assert upstream_text() == upstream


def test_rollback_returns_to_the_release_before_and_forward_again(lab):
    newest = current_of("app1")
    listing = json.loads(run_igops("-c", str(lab.source), "deploy", "releases", "--json").stdout)["data"]
    [previous] = {row["previous"] for row in listing["hosts"]}
    back = igops_deploy(lab, "rollback", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["data"]["target"] == previous
    assert {host: served_by(lab, host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, previous)
    forward = igops_deploy(lab, "rollback", "--to", newest, "--batch", "2")
    assert forward.returncode == 0, forward.stderr
    assert {host: current_of(host) for host in APP_HOSTS} == dict.fromkeys(APP_HOSTS, newest)
    missing = igops_deploy(lab, "rollback", "--to", "19990101000000-gone000")
    assert missing.returncode == ExitCode.REFUSED and "is not on app1" in missing.stderr


def test_change_events_retry_throttling_and_never_resend_a_refused_one(lab):
    url = lab.model.monitoring.pagerduty_url
    key = Secrets(lab.model.secrets.file).get("pagerduty_routing_key")
    request = urllib.request.Request(
        f"{url}/_lab/faults",
        data=json.dumps({"status": 429, "count": 2}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).close()
    throttled = send_change(url, key, "deploy test: throttled twice", "igops tests", sleep=lambda _: None)
    assert throttled.sent and throttled.attempts == 3
    wrong_key = "0" * 32
    refused = send_change(url, wrong_key, "deploy test: refused", "igops tests", sleep=lambda _: None)
    assert not refused.sent and refused.attempts == 1 and "Invalid routing key" in refused.detail
