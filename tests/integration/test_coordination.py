"""Leases and the audit trail on the lab's real three-member etcd, against the local backend.

Two igops processes stand for two bastions: each has its own state directory, user and
operator host (IGOPS_OPERATOR_HOST). The mutating command is `igops pagerduty test` against
the lab's PagerDuty receiver, slowed by an injected delay so that the first one still holds
its lease when the second asks. Each test writes a copy of the lab's inventory with a
[coordination] section and its own key prefix, so no two runs share keys.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from igops import coordination, etcd_gateway, inventory
from igops.errors import ExitCode
from igops.lab import etcd as lab_etcd, proc, state
from tests.labtools import wait_for, without_coordination

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
TTL = 3
# etcd's lessor looks for expired leases every 500 ms and revokes them through a Raft round.
EXPIRY_SLACK = 1.0
RECEIVER = f"http://{state.PAGERDUTY[0]}:{state.PAGERDUTY[1]}"
TEST_PREFIX = "/igops-test/"
# etcd's check-quorum: a leader that has not heard from a majority for an election timeout
# (1 s by default) steps down at its next check, so within two of them.
LEADER_STEP_DOWN = 2.0


@pytest.fixture(autouse=True)
def forget_test_keys(lab):
    """The keys every test wrote under /igops-test/, deleted afterwards (the lab's etcd lives on)."""
    yield
    body = {
        "key": etcd_gateway.b64(TEST_PREFIX),
        "range_end": etcd_gateway.b64(etcd_gateway.prefix_end(TEST_PREFIX)),
    }
    requests.post(state.etcd_endpoints()[0] + "/v3/kv/deleterange", json=body, timeout=5).raise_for_status()


def write_inventory(tmp_path: Path, with_etcd: bool) -> tuple[Path, str]:
    """A copy of the lab's inventory, with [coordination] on the lab's etcd when asked."""
    prefix = f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}/"
    # The lab's own [coordination] goes: each test chooses its backend and its own prefix.
    text = without_coordination(state.paths().inventory.read_text())
    if with_etcd:
        endpoints = ", ".join(json.dumps(url) for url in state.etcd_endpoints())
        text += f'\n[coordination]\netcd = [{endpoints}]\nlease_ttl = {TTL}\nprefix = "{prefix}"\n'
    path = tmp_path / ("etcd.toml" if with_etcd else "local.toml")
    path.write_text(text)
    return path, prefix


def bastion(tmp_path: Path, name: str, user: str, reason: str | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("IGOPS_CONFIG", "IGOPS_REASON")}
    env.update(
        IGOPS_STATE_DIR=str(tmp_path / f"state-{name}"), USER=user, LOGNAME=user, IGOPS_OPERATOR_HOST=name, NO_COLOR="1"
    )
    if reason:
        env["IGOPS_REASON"] = reason
    return env


def start_igops(config: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "igops", "-c", str(config), *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_igops(config: Path, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "igops", "-c", str(config), *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture
def slow_receiver(lab):
    """The PagerDuty receiver, made to answer each of the next requests after a delay."""
    session = requests.Session()

    def slow(delay_ms: int, count: int) -> None:
        session.post(
            f"{RECEIVER}/_lab/faults", json={"status": 200, "delay_ms": delay_ms, "count": count}, timeout=5
        ).raise_for_status()

    yield slow
    session.delete(f"{RECEIVER}/_lab/faults", timeout=5)
    session.close()


def gateway(config: Path) -> etcd_gateway.EtcdGateway:
    return etcd_gateway.EtcdGateway(coordination.settings_for(inventory.load_file(config)))


def test_the_lab_runs_a_healthy_three_member_etcd(lab):
    assert [lab_etcd.health(address)[0] for _, address in state.ETCD_MEMBERS] == [True, True, True]


def test_two_bastions_on_etcd_exactly_one_proceeds_and_the_other_names_it(lab, tmp_path, slow_receiver):
    config, prefix = write_inventory(tmp_path, with_etcd=True)
    slow_receiver(2500, 2)  # the winner's trigger and resolve: it holds its lease for 5 s
    alice = start_igops(
        config, bastion(tmp_path, "bastion-a", "alice", "INC-101 failover drill"), "pagerduty", "test", "--yes"
    )
    bob = start_igops(config, bastion(tmp_path, "bastion-b", "bob", "INC-102"), "pagerduty", "test", "--yes")
    outcomes = {"alice": finish(alice), "bob": finish(bob)}
    codes = sorted(code for code, _ in outcomes.values())
    assert codes == [ExitCode.OK, ExitCode.LOCKED], outcomes
    winner = next(name for name, (code, _) in outcomes.items() if code == ExitCode.OK)
    loser_error = next(stderr for code, stderr in outcomes.values() if code == ExitCode.LOCKED)
    held_by = {
        "alice": (alice.pid, "alice@bastion-a", "INC-101 failover drill"),
        "bob": (bob.pid, "bob@bastion-b", "INC-102"),
    }[winner]
    assert "pagerduty all is held by pagerduty-test " in loser_error, loser_error
    assert f"{held_by[1]} pid {held_by[0]} since " in loser_error and f"reason: {held_by[2]}" in loser_error

    etcd = gateway(config)
    try:
        records = [json.loads(value) for _, value in etcd.get_prefix(prefix + "audit/")]
        assert etcd.get_prefix(prefix + "locks/") == []  # released when the winner finished
    finally:
        etcd.close()
    # The winner's operation, audited as it started and as it ended, under one operation id.
    assert [record["result"] for record in records] == ["started", "triggered and resolved"], records
    assert records[0]["operation"] == records[1]["operation"]
    ended = records[1]
    assert (f"{ended['user']}@{ended['host']}", ended["pid"]) == (held_by[1], held_by[0])
    assert ended["exit_code"] == 0 and ended["reason"] == held_by[2]
    assert "igops -c" in ended["command"] and "pagerduty test --yes" in ended["command"]
    for name in ("bastion-a", "bastion-b"):
        assert not (tmp_path / f"state-{name}" / "audit.log").exists()


def test_two_bastions_on_the_local_backend_do_not_see_each_other(lab, tmp_path, slow_receiver):
    """The documented limit: local locks only bind processes sharing one state directory."""
    config, _ = write_inventory(tmp_path, with_etcd=False)
    slow_receiver(2500, 4)
    alice = start_igops(config, bastion(tmp_path, "bastion-a", "alice"), "pagerduty", "test", "--yes")
    bob = start_igops(config, bastion(tmp_path, "bastion-b", "bob"), "pagerduty", "test", "--yes")
    outcomes = [finish(alice), finish(bob)]
    assert [code for code, _ in outcomes] == [ExitCode.OK, ExitCode.OK], outcomes
    for name in ("bastion-a", "bastion-b"):
        record = json.loads((tmp_path / f"state-{name}" / "audit.log").read_text().splitlines()[-1])
        assert record["host"] == name and record["result"] == "triggered and resolved"


def test_a_sigkilled_holders_lease_expires_within_its_ttl(lab, tmp_path, slow_receiver):
    config, prefix = write_inventory(tmp_path, with_etcd=True)
    slow_receiver(60_000, 1)  # the trigger hangs: the holder is mid-command when it dies
    holder = start_igops(config, bastion(tmp_path, "bastion-a", "alice"), "pagerduty", "test", "--yes")
    etcd = gateway(config)
    try:
        assert wait_for(lambda: etcd.get_prefix(prefix + "locks/"), 30), "the holder never took its lease"
        # Its start is audited just after it took the lease: the kill lands after that.
        assert wait_for(lambda: etcd.get_prefix(prefix + "audit/"), 30), "the holder never audited its start"
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        holder.communicate(timeout=10)
        assert wait_for(lambda: not etcd.get_prefix(prefix + "locks/"), TTL + EXPIRY_SLACK, interval=0.1)
        assert time.monotonic() - killed <= TTL + EXPIRY_SLACK
        # A SIGKILL leaves the start's audit record and an operation record with no end: interrupted.
        [started] = [json.loads(value) for _, value in etcd.get_prefix(prefix + "audit/")]
        assert started["result"] == "started" and started["exit_code"] is None
        [(_, value)] = etcd.get_prefix(prefix + "ops/")
        assert json.loads(value)["ended"] is None
        listed = run_igops(config, bastion(tmp_path, "bastion-b", "bob"), "ops", "list", "--json")
        [record] = json.loads(listed.stdout)["data"]["records"]
        assert record["status"] == "interrupted" and record["id"] == started["operation"]
    finally:
        etcd.close()
    requests.delete(f"{RECEIVER}/_lab/faults", timeout=5)
    after = run_igops(config, bastion(tmp_path, "bastion-b", "bob"), "pagerduty", "test", "--yes")
    assert after.returncode == ExitCode.OK, after.stderr


def test_without_quorum_mutating_commands_refuse_and_reading_ones_work(lab, tmp_path):
    """Without quorum a lease is refused; reading commands work, and another operator's machine,
    which never read the list before, still sees the fleet's operations from the member left."""
    config, prefix = write_inventory(tmp_path, with_etcd=True)
    env = bastion(tmp_path, "bastion-a", "alice")
    backend = coordination.for_fleet(inventory.load_file(config))
    paths = state.paths()
    stopped = [name for name, _ in state.ETCD_MEMBERS[1:]]
    before = run_igops(config, env, "pagerduty", "test", "--yes")
    assert before.returncode == ExitCode.OK, before.stderr
    try:
        holder = coordination.current_holder("coordination-test", "quorum", "igops (the test's own lease)", None)
        with backend.lease([("coordination-test", "quorum")], holder) as held:
            pids = [proc.running_pid(paths.etcd_dir(name) / "etcd.pid", paths.root) for name in stopped]
            assert all(pids), f"etcd {stopped} are not all running"
            # Both at once, as a crash would: stopped one by one, the last two elect a leader
            # between them just before the second goes.
            proc.terminate(pids, sig=signal.SIGKILL)
            quorum_lost = time.monotonic()
            # It counts as lost a whole TTL after its last acknowledged renewal. A leader left
            # alone acknowledges renewals until its quorum check makes it step down, within two
            # election timeouts (2 s).
            assert wait_for(held.lost, TTL + LEADER_STEP_DOWN, interval=0.1), "the lease was never marked lost"
            assert time.monotonic() - quorum_lost <= TTL + LEADER_STEP_DOWN
            with pytest.raises(coordination.LeaseLost, match="coordination-test quorum was lost"):
                held.check()

        refused = run_igops(config, env, "pagerduty", "test", "--yes")
        assert refused.returncode == ExitCode.REFUSED, refused.stderr
        assert "etcd cannot grant a lease" in refused.stderr and "majority of the etcd members" in refused.stderr
        for reading in (["status"], ["hosts"]):
            result = run_igops(config, env, *reading)
            assert result.returncode == ExitCode.OK, (reading, result.stderr)
        elsewhere = bastion(tmp_path, "bastion-b", "bob")
        listed = run_igops(config, elsewhere, "ops", "list", "--all", "--json")
        view = json.loads(listed.stdout)["data"]
        assert listed.returncode == ExitCode.OK and view["stale"] and view["read_from"] == "member copy", view
        assert [record["result"] for record in view["records"]] == ["triggered and resolved"], view
        checked = run_igops(config, elsewhere, "check", "--only", "operations", "--json")
        [found] = [r for r in json.loads(checked.stdout)["data"]["results"] if r["target"] == "operations"]
        assert found["status"] == "UNKNOWN" and "as one etcd member holds it" in found["summary"], found
    finally:
        for name in stopped:
            proc.start(lab_etcd.daemon(paths, name), paths.root)
        lab_etcd.wait_healthy()
    again = run_igops(config, env, "pagerduty", "test", "--yes")
    assert again.returncode == ExitCode.OK, again.stderr
