"""The operation engine on the lab's real etcd: two bastions, one journal.

For each pair of the conflict table, "bastion-1" holds the first operation's lease (a library
caller of the engine, stopped inside a step) and "bastion-2", another igops process with its own
state directory, user and host name, runs the second command for real: it exits 4 naming the
holder, its operation id, its current step and its reason, and changes nothing. Both see the
operation in `ops list`; `ops show` has its journal; `ops history` its start.
"""

import json
import threading

import pytest

from igops import inventory
from igops.errors import ExitCode
from igops.operations import conflicts, engine
from igops.output import Reporter
from tests.integration.test_coordination import bastion, forget_test_keys, run_igops, write_inventory  # noqa: F401 - autouse: keys go after

pytestmark = pytest.mark.lab


class Holding:
    """An operation of `kind` on `resources`, run by this process as bastion-1, inside its step
    "[1] <title>" until released."""

    def __init__(self, config, kind, resources, title="hold the targets", reason="INC-16 drill"):
        self.fleet = inventory.load_file(config)
        self.spec = engine.OperationSpec(kind, f"{kind} (held by the test)", ["held"], resources, [title])
        self.title, self.reason = title, reason
        self.inside, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        def action(operation):
            self.operation_id = operation.id
            with operation.reporter.step(self.title):
                self.inside.set()
                self.release.wait(60)

        engine.perform(self.fleet, self.spec, action, Reporter(), reason=self.reason)

    def __enter__(self):
        self.thread.start()
        assert self.inside.wait(20)
        return self

    def __exit__(self, *exc_info):
        self.release.set()
        self.thread.join(30)


def shard_on(lab, cluster: str) -> int:
    from tests.labtools import postgres

    connection = postgres(lab, "db1", "directory")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT logical_shard FROM shard_map WHERE cluster <> %s ORDER BY 1 LIMIT 1", (cluster,))
            return cursor.fetchone()[0]
    finally:
        connection.close()


def pairs(lab, tmp_path):
    """(what bastion-1 holds, what bastion-2 runs): the pairs of the conflict table. A rollback
    needs a release before the current one, which a fresh lab may not have, so the rollback is
    what bastion-1 holds and bastion-2 deploys a new release."""
    from igops import failover
    from tests.reliability.test_deploy import app_copy

    fleet = lab
    # Other tests leave either member the primary: the switchover goes to whichever is not.
    standby = "db2" if failover.pg_status(fleet, "main").primary == "db1" else "db1"
    replica = "redis2" if failover.redis_status(fleet).app_master == "redis1" else "redis1"
    return [
        ("pg-failover", [conflicts.pg_cluster("main")], ["pg", "switchover", "main", "--to", standby]),
        (
            "pg-switchover",
            [conflicts.pg_cluster("main")],
            ["shard", "move", str(shard_on(lab, "main")), "--to", "main"],
        ),
        ("pg-switchover", [conflicts.pg_cluster("main")], ["snapshot", "create", standby]),
        ("snapshot-create", conflicts.for_host(fleet, standby), ["pg", "switchover", "main", "--to", standby]),
        ("redis-switchover", [conflicts.REDIS], ["snapshot", "create", replica]),
        # Deploys lease their app servers one by one: a rollback holding one of them refuses it.
        (
            "deploy-rollback",
            [conflicts.app_server("app1")],
            ["deploy", "--source", str(app_copy(tmp_path, "bastion-2")), "--analysis", "0"],
        ),
    ]


@pytest.mark.parametrize("backend", ["etcd", "local-shared"])
def test_every_conflicting_pair_exits_4_naming_the_holder_and_its_step(lab, tmp_path, backend):
    config, prefix = write_inventory(tmp_path, with_etcd=backend == "etcd")
    env = bastion(tmp_path, "bastion-2", "bob")
    if backend == "local-shared":
        # The local backend binds only processes that share the state directory (docs/operations.md).
        env["IGOPS_STATE_DIR"] = str(inventory.load_file(config).state_dir)
    for kind, resources, command in pairs(lab, tmp_path):
        with Holding(config, kind, resources) as held:
            result = run_igops(config, env, *command, "--yes", "--json")
            assert result.returncode == ExitCode.LOCKED, (command, result.stderr[-2000:])
            message = json.loads(result.stdout)["error"]["message"]
            assert f"is held by {kind} {held.operation_id}" in message, message
            assert "[1] hold the targets" in message and "reason: INC-16 drill" in message, message
            listed = run_igops(config, env, "ops", "list", "--json")
            ids = [record["id"] for record in json.loads(listed.stdout)["data"]["records"]]
            assert held.operation_id in ids, listed.stdout


def test_the_journal_and_history_are_the_teams(lab, tmp_path):
    config, _ = write_inventory(tmp_path, with_etcd=True)
    with Holding(config, "pg-switchover", [conflicts.pg_cluster("main")]) as held:
        pass
    other = bastion(tmp_path, "bastion-2", "bob")
    shown = json.loads(run_igops(config, other, "ops", "show", held.operation_id, "--json").stdout)["data"]
    record, entries = shown["operation"], shown["journal"]
    assert record["status"] == "ok" and record["reason"] == "INC-16 drill" and record["backend"] == "etcd"
    assert [entry["event"] for entry in entries] == ["begin", "intent", "result", "end"]
    history = json.loads(run_igops(config, other, "ops", "history", "--json").stdout)["data"]["records"]
    assert [r["result"] for r in history if r.get("operation") == held.operation_id] == ["started", "ok"]


def test_an_operation_that_ends_sends_a_pagerduty_change_event(lab, tmp_path):
    import urllib.request

    config, _ = write_inventory(tmp_path, with_etcd=True)
    receiver = lab.model.monitoring.pagerduty_url
    urllib.request.urlopen(urllib.request.Request(f"{receiver}/_lab/faults", method="DELETE"), timeout=5).close()
    with Holding(config, "pg-switchover", [conflicts.pg_cluster("main")], reason="INC-16 marker") as held:
        pass
    with urllib.request.urlopen(f"{receiver}/_lab/requests?since=0", timeout=5) as answer:
        requests = json.load(answer)["requests"]
    events = [
        r["body"]
        for r in requests
        if r["path"] == "/v2/change/enqueue"
        and isinstance(r["body"], dict)
        and r["body"].get("payload", {}).get("custom_details", {}).get("operation") == held.operation_id
    ]
    assert events, [r["path"] for r in requests][-20:]
    details = events[-1]["payload"]["custom_details"]
    assert details["kind"] == "pg-switchover" and details["result"] == "ok" and details["reason"] == "INC-16 marker"


HOLD_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from igops import inventory
from igops.operations import conflicts, engine
from igops.output import Reporter

def action(operation):
    with operation.reporter.step("hold the targets"):
        print(operation.id, flush=True)
        time.sleep(600)

spec = engine.OperationSpec("pg-switchover", "held until killed", ["main"], [conflicts.pg_cluster("main")],
                            ["hold the targets"])
engine.perform(inventory.load_file(Path(sys.argv[1])), spec, action, Reporter())
"""


def killed_holder(config, env) -> str:
    """The id of a pg-switchover on main whose holder, a process of the bastion `env` describes,
    was SIGKILLed inside its step."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_UNTIL_KILLED, str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        op_id = holder.stdout.readline().strip()
        assert op_id, "the holder never reached its step"
    finally:
        holder.kill()
        holder.wait(10)
    return op_id


def test_a_killed_holder_is_interrupted_at_once_on_its_machine_and_after_the_ttl_elsewhere(lab, tmp_path):
    """Its own machine knows the holder's pid is gone; another bastion knows only that the lease
    has not expired yet, so it says running until the TTL has passed."""
    import time

    from tests.labtools import wait_for

    config, _ = write_inventory(tmp_path, with_etcd=True)
    here, elsewhere = bastion(tmp_path, "bastion-1", "alice"), bastion(tmp_path, "bastion-2", "bob")
    op_id = killed_holder(config, here)
    killed = time.monotonic()

    def status(env):
        records = json.loads(run_igops(config, env, "ops", "list", "--json").stdout)["data"]["records"]
        return next((record["status"] for record in records if record["id"] == op_id), None)

    assert status(here) == "interrupted"
    ttl = inventory.load_file(config).model.coordination.lease_ttl
    if time.monotonic() - killed < ttl - 2:
        assert status(elsewhere) == "running"
    assert wait_for(lambda: status(elsewhere) == "interrupted", ttl + 5, interval=0.5)
    aborted = run_igops(config, here, "ops", "abort", op_id, "--yes")
    assert aborted.returncode == 0, aborted.stderr[-2000:]


# An `ops abort` whose undo fails, as a library caller of the engine runs it.
ABORT_THAT_FAILS = """
import sys
from pathlib import Path
from igops import coordination, inventory
from igops.errors import RemoteError
from igops.operations import conflicts, engine, journal
from igops.output import Reporter

fleet = inventory.load_file(Path(sys.argv[1]))
record = journal.for_coordinator(coordination.for_fleet(fleet), fleet.state_dir).record(sys.argv[2])
spec = engine.OperationSpec("pg-switchover", "abort (the test's)", ["main"], [conflicts.pg_cluster("main")], [])

def failing_undo(operation):
    with operation.reporter.step("db1: start it again"):
        raise RemoteError("db1 did not start", "look at its log")

engine.perform(fleet, spec, failing_undo, Reporter(), resume={**record, "continued_by": "abort"})
"""


def test_an_abort_that_fails_leaves_the_operation_interrupted_for_every_bastion(lab, tmp_path):
    """On etcd too: the failed abort's record stays open (its marker under open/), another
    bastion's `ops list` and `check` show it interrupted with the failure, and an abort run
    again ends it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    config, _ = write_inventory(tmp_path, with_etcd=True)
    here, elsewhere = bastion(tmp_path, "bastion-1", "alice"), bastion(tmp_path, "bastion-2", "bob")
    op_id = killed_holder(config, here)
    # The abort runs where the holder ran (bastion-1 knows its pid is gone, and takes its lease).
    failed = subprocess.run(
        [sys.executable, "-c", ABORT_THAT_FAILS, str(config), op_id], cwd=ROOT, env=here, capture_output=True, text=True
    )
    assert failed.returncode != 0 and "db1 did not start" in failed.stderr, failed.stderr[-2000:]
    listed = json.loads(run_igops(config, elsewhere, "ops", "list", "--json").stdout)["data"]["records"]
    [found] = [r for r in listed if r["id"] == op_id]
    assert found["status"] == "interrupted" and "db1 did not start" in found["abort_failed"]["detail"], found
    checked = run_igops(config, elsewhere, "check", "--only", "operations", "--json")
    [line] = [r for r in json.loads(checked.stdout)["data"]["results"] if r["target"] == "operations"]
    assert line["status"] == "WARNING" and "its abort failed at step 1 (db1: start it again)" in line["summary"]
    assert f"then igops ops abort {op_id}" in line["summary"], line
    aborted = run_igops(config, here, "ops", "abort", op_id, "--yes")
    assert aborted.returncode == 0, aborted.stderr[-2000:]
    listed = json.loads(run_igops(config, elsewhere, "ops", "list", "--json").stdout)["data"]["records"]
    assert op_id not in [r["id"] for r in listed]
