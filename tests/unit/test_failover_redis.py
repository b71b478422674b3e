"""A Redis switchover against two real redis-server processes on loopback (no lab): the
connections the switchover needs while writes are paused are opened before the pause, so none
is set up (2 s connect timeout) while the pause runs out; and a failover whose directory names a
demoted master only finishes the switch."""

import shutil
import socket
import subprocess

import pytest

from igops import inventory, redis_failover, redisops
from igops.errors import IgopsError
from igops.operations import steps as step_runner
from igops.output import Reporter
from tests.labtools import wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
ADDRESSES = {"redis1": "127.0.77.1", "redis2": "127.0.77.2"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.77.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def pair(tmp_path):
    """redis1 a master, redis2 its replica, and a fleet naming them."""
    port = free_port()
    servers = []
    for name, address in ADDRESSES.items():
        directory = tmp_path / name
        directory.mkdir()
        servers.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    address,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    str(directory),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    hosts = "".join(
        f'[[hosts]]\nname = "{name}"\naddress = "{address}"\nroles = ["redis"]\n' for name, address in ADDRESSES.items()
    )
    path = tmp_path / "igops.toml"
    path.write_text(hosts + f'[redis]\nmaster = "redis1"\nreplicas = ["redis2"]\nport = {port}\n')
    fleet = inventory.load_file(path)
    clients = {name: redisops.client(fleet, fleet.host(name)) for name in ADDRESSES}
    try:
        assert wait_for(lambda: all(_answers(client) for client in clients.values()), 10)
        clients["redis2"].execute_command("REPLICAOF", ADDRESSES["redis1"], str(port))
        clients["redis1"].set("before", "1")
        assert wait_for(lambda: redisops.node_state(clients["redis2"]).link_up, 10)
        yield fleet, clients
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            server.terminate()
            server.wait(10)


def _answers(client) -> bool:
    try:
        return client.ping()
    except Exception:  # noqa: BLE001 - not up yet
        return False


def connections_received(client) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_no_connection_is_opened_between_the_pause_and_the_demotion(pair):
    fleet, clients = pair
    steps = redis_failover.redis_switchover_steps(fleet, "redis1", "redis2", [])
    actions = [step.action for step in steps]
    assert actions[:5] == ["hold_connections", "pause_writes", "wait_offset", "promote", "demote"]
    assert set(steps[0].args) == {"redis1", "redis2"}
    before = {name: connections_received(client) for name, client in clients.items()}
    switch = redis_failover.RedisActions(fleet)
    try:
        step_runner.execute(steps[:4], switch, Reporter(), "")
        # redis2 is the master now; redis1 has not connected to it yet (it is demoted next).
        assert connections_received(clients["redis2"]) - before["redis2"] == 1
        step_runner.execute(steps[4:5], switch, Reporter(), "")
        assert connections_received(clients["redis1"]) - before["redis1"] == 1
    finally:
        switch.close()
    assert redisops.node_state(clients["redis1"]).role == "replica"
    assert redisops.node_state(clients["redis2"]).role == "master"
    clients["redis1"].execute_command("CLIENT", "UNPAUSE")


class LapsesAfterThePromotion(redis_failover.RedisActions):
    """The old master's write pause lapses once the promotion is done, before its demotion (the
    journal's write between the two took longer than the pause had left), and the app writes to
    it: the pause ends as Redis ends it, and the write is acknowledged."""

    def __init__(self, fleet, clients):
        super().__init__(fleet)
        self.clients = clients

    def promote(self, *args):
        detail = super().promote(*args)
        self.clients["redis1"].execute_command("CLIENT", "UNPAUSE")
        assert self.clients["redis1"].set("acked", "1")
        return detail


def test_a_demotion_after_the_pause_lapsed_is_refused_and_the_promotion_undone(pair):
    fleet, clients = pair
    steps = redis_failover.redis_switchover_steps(fleet, "redis1", "redis2", [])
    switch = LapsesAfterThePromotion(fleet, clients)
    try:
        with pytest.raises(step_runner.StepFailed) as failed:
            step_runner.execute(steps, switch, Reporter(), "")
    finally:
        switch.close()
    assert "lapsed before its demotion" in str(failed.value)
    assert [item.outcome for item in failed.value.recovery] == ["undone", "released"]
    assert not failed.value.past_point_of_no_return
    assert redisops.node_state(clients["redis1"]).role == "master"
    assert redisops.node_state(clients["redis2"]).role == "replica"
    assert clients["redis1"].get("acked") == "1"
    assert wait_for(lambda: clients["redis2"].get("acked") == "1", 10), "the acknowledged write is not lost"


def test_a_demotion_is_refused_once_the_pause_has_run_out_and_its_probe_reads_the_roles(pair):
    fleet, clients = pair
    steps = redis_failover.redis_switchover_steps(fleet, "redis1", "redis2", [])
    switch = redis_failover.RedisActions(fleet)
    try:
        step_runner.execute(steps[:4], switch, Reporter(), "")
        switch.paused_at -= fleet.model.redis.pause_timeout  # as if the pause's time went by
        with pytest.raises(IgopsError, match="had 0.0 s left before its demotion"):
            switch.demote("redis1", "redis2")
        assert switch.demoted("redis1", "redis2") == ""
        switch.replicate("redis2", "redis1")  # the promotion's undo
    finally:
        switch.close()
    clients["redis1"].execute_command("CLIENT", "UNPAUSE")
    assert redisops.node_state(clients["redis2"]).role == "replica"
    assert switch.demoted("redis2", "redis1") == "redis2 replicates from redis1"


class PingsBeforeThePromotion(redis_failover.RedisActions):
    """The old master sends its replica the stream's PING (every repl-ping-replica-period, client
    pause or not) after the level check and before the promotion: its offset moves on by 14
    bytes that the promoted node holds too."""

    def __init__(self, fleet, clients):
        super().__init__(fleet)
        self.clients = clients

    def wait_offset(self, master, replica, deadline=None):
        detail = super().wait_offset(master, replica, deadline)
        old, new = self.clients[master], self.clients[replica]
        before = redisops.node_state(old).offset
        old.config_set("repl-ping-replica-period", 1)
        try:
            assert wait_for(lambda: redisops.node_state(old).offset > before, 3, interval=0.05)
        finally:
            old.config_set("repl-ping-replica-period", 10)
        pinged = redisops.node_state(old).offset
        assert pinged - before == len(redis_failover.REPLICATION_PING)
        assert wait_for(lambda: redisops.node_state(new).offset >= pinged, 3, interval=0.05)
        return detail


def test_a_ping_in_the_stream_during_the_pause_is_no_write_and_the_switchover_completes(pair):
    fleet, clients = pair
    steps = redis_failover.redis_switchover_steps(fleet, "redis1", "redis2", [])
    switch = PingsBeforeThePromotion(fleet, clients)
    try:
        step_runner.execute(steps[:5], switch, Reporter(), "")
    finally:
        switch.close()
    assert redisops.node_state(clients["redis1"]).role == "replica"
    assert redisops.node_state(clients["redis2"]).role == "master"
    clients["redis1"].execute_command("CLIENT", "UNPAUSE")
