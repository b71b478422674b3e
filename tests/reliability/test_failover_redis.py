"""A Redis switchover SIGKILLed after the demotion and before the directory names the new master
leaves the app pointed at a replica: the next `redis switchover` or `redis failover` finishes the
job, and no acknowledged INCR is lost. The kill lands at that point deterministically: the test
holds the directory's redis_master row locked, so igops' update waits on it, and kills igops once
Postgres shows that update waiting (its statement is then cancelled, never committed)."""

import subprocess
import sys
import threading
import time
import uuid

import pytest

from igops import redisops
from tests.conftest import ROOT
from tests.labtools import postgres, wait_for
from tests.reliability.test_failover import (  # noqa: F401
    HOME_MASTER,
    HOME_PRIMARY,
    OTHER_MASTER,
    at_home,
    igops,
    node_of,
    redis_state,
    sign_up_succeeds,
)

pytestmark = pytest.mark.lab


class Increments(threading.Thread):
    """INCR one key in a loop on the master the directory names, re-reading the directory after
    an error, as the app does; remembers the highest value Redis acknowledged."""

    def __init__(self, lab):
        super().__init__(daemon=True)
        self.lab = lab
        self.key = f"igops-test:incr:{uuid.uuid4().hex}"
        self.acknowledged = 0
        self.errors = 0
        self.stopping = threading.Event()

    def _master(self):
        directory = postgres(self.lab, HOME_PRIMARY, self.lab.model.shards.directory_database)
        try:
            address, _ = redisops.read_endpoint(directory)
        finally:
            directory.close()
        host = next(host for host in self.lab.hosts if f"{host.address}:{self.lab.model.redis.port}" == address)
        # Longer than a write pause, so a write held by CLIENT PAUSE gets its answer.
        return redisops.client(self.lab, host, timeout=self.lab.model.redis.pause_timeout + 3)

    def run(self):
        import redis

        client = self._master()
        while not self.stopping.is_set():
            try:
                self.acknowledged = max(self.acknowledged, client.incr(self.key))
            except redis.RedisError:
                self.errors += 1
                client.close()
                time.sleep(0.05)
                client = self._master()
        client.close()

    def stop_and_count(self) -> int:
        self.stopping.set()
        self.join(30)
        master = redis_state(self.lab)["app_master"]
        client = redisops.client(self.lab, self.lab.host(master))
        try:
            return int(client.get(self.key) or 0)
        finally:
            client.close()


def switchover_killed_before_the_directory_update(lab, target: str) -> None:
    database = lab.model.shards.directory_database
    blocker = postgres(lab, HOME_PRIMARY, database)
    watcher = postgres(lab, HOME_PRIMARY, database)
    try:
        with blocker.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT 1 FROM endpoints WHERE name = %s FOR UPDATE", (redisops.MASTER_ENDPOINT,))
        process = subprocess.Popen(
            [sys.executable, "-m", "igops", "-c", str(lab.source), "redis", "switchover", "--to", target, "--yes"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

        def waiting_update():
            with watcher.cursor() as cursor:
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'igops-failover' AND "
                    "wait_event_type = 'Lock' AND datname = current_database()"
                )
                row = cursor.fetchone()
            return row[0] if row else None

        backend = wait_for(waiting_update, 30)
        if not backend:
            process.kill()
            raise AssertionError(f"igops never reached the directory update: {process.communicate()[1][-3000:]}")
        process.kill()
        progress = process.communicate()[1]
        with watcher.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (backend,))
        assert wait_for(lambda: waiting_update() is None, 10)
    finally:
        with blocker.cursor() as cursor:
            cursor.execute("ROLLBACK")
        blocker.close()
        watcher.close()
    assert "REPLICAOF" in progress and "directory: redis_master" in progress, progress[-3000:]


def interrupted_then_repaired(lab, *repair: str) -> None:
    increments = Increments(lab)
    increments.start()
    assert wait_for(lambda: increments.acknowledged > 0, 10)
    switchover_killed_before_the_directory_update(lab, OTHER_MASTER)
    broken = redis_state(lab)
    assert broken["app_master"] == HOME_MASTER, broken
    assert node_of(broken, OTHER_MASTER)["role"] == "master" and node_of(broken, HOME_MASTER)["role"] == "replica"
    assert f"the app writes to {HOME_MASTER}, which is a replica" in broken["problems"]

    result, envelope = igops(lab, "redis", *repair, "--yes")
    assert result.returncode == 0, result.stderr[-3000:]
    assert envelope["data"]["plan"]["title"].startswith(f"Finish: {OTHER_MASTER} is the master")
    assert wait_for(lambda: not redis_state(lab)["problems"], 15), redis_state(lab)
    assert redis_state(lab)["app_master"] == OTHER_MASTER
    assert wait_for(lambda: sign_up_succeeds(lab), 15)
    time.sleep(1)
    final = increments.stop_and_count()
    print(f"\nINCRs acknowledged up to {increments.acknowledged}, {increments.errors} errors; the key holds {final}")
    assert final >= increments.acknowledged


def test_a_switchover_killed_after_the_demotion_is_finished_by_the_next_switchover(at_home):  # noqa: F811
    interrupted_then_repaired(at_home, "switchover", "--to", OTHER_MASTER)


def test_a_switchover_killed_after_the_demotion_is_finished_by_failover(at_home):  # noqa: F811
    interrupted_then_repaired(at_home, "failover")


def test_a_switchover_to_a_replica_left_paused_lifts_the_pause_and_loses_nothing(at_home):  # noqa: F811
    """An old master demoted while paused (a switchover killed before its UNPAUSE) is a replica
    that receives its master's stream and applies none of it while the pause lasts: a switchover
    to it lifts that pause first, instead of waiting in vain for it to catch up."""
    lab = at_home
    replica = redisops.client(lab, lab.host(OTHER_MASTER))
    counter = Increments(lab)
    try:
        # Longer than the whole switchover: only igops' UNPAUSE lets it catch up in time.
        replica.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        counter.start()
        assert wait_for(lambda: counter.acknowledged > 10, 10, interval=0.1)
        result, envelope = igops(lab, "redis", "switchover", "--to", OTHER_MASTER, "--yes")
        assert result.returncode == 0, result.stderr[-3000:]
        assert envelope["data"]["after"]["app_master"] == OTHER_MASTER
    finally:
        replica.execute_command("CLIENT", "UNPAUSE")
        replica.close()
    stored = counter.stop_and_count()
    assert stored >= counter.acknowledged > 10, (stored, counter.acknowledged)
