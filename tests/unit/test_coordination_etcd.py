"""An etcd lease against a real single-member etcd on loopback (no lab): reached through a proxy
that delays or drops chosen requests, as a slow or partitioned path to etcd would; and held for
processes that exited, or that run in another PID namespace of the same host."""

import http.client
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from igops import coordination, process_identity, safety
from igops.etcd_gateway import EtcdError, EtcdGateway, EtcdSettings
from igops.operations import journal
from tests.labtools import wait_for
from tests.unit.in_process import UNSHARE, unshare_works

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd")

TTL = 3
# Below the gateway's per-member timeout (3 s with one member), so the grant is asked only once.
GRANT_DELAY = 2.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    """A single-member etcd's client URL."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            "etcd",
            "--name=unit",
            f"--data-dir={tmp_path / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=unit={peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        gateway = EtcdGateway(EtcdSettings((client,), "/unit/"))
        assert wait_for(lambda: _answers(gateway), 20)
        gateway.close()
        yield client
    finally:
        server.terminate()
        server.wait(10)


def _answers(gateway: EtcdGateway) -> bool:
    try:
        gateway.get_prefix("/unit/")
    except EtcdError:
        return False
    return True


class SlowPath(ThreadingHTTPServer):
    """Passes requests on to etcd, except that a lease grant's answer comes GRANT_DELAY after
    etcd gave it, and no keepalive gets through."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream.removeprefix("http://")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: SlowPath

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v3/lease/keepalive":
            self._answer(503, b'{"error": "unreachable"}')
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=10)
        try:
            upstream.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
            response = upstream.getresponse()
            status, answer = response.status, response.read()
        finally:
            upstream.close()
        if self.path == "/v3/lease/grant":
            time.sleep(GRANT_DELAY)
        self._answer(status, answer)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_path(etcd: str) -> Iterator[SlowPath]:
    proxy = SlowPath(etcd)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def holder(operation_id: str) -> coordination.Holder:
    return coordination.current_holder("pg-switchover", "main", "igops pg switchover main", None, operation_id)


def test_a_lease_whose_grant_answered_late_is_lost_before_another_operator_can_take_it(etcd, slow_path, tmp_path):
    """etcd counts a lease's TTL from its grant, which may be seconds before its answer comes:
    counted from the answer, the lease still passed check() when etcd had expired it and
    another operator held the same target."""
    slow = coordination.EtcdCoordinator(EtcdSettings((slow_path.url,), "/unit/", lease_ttl=TTL), tmp_path)
    other = coordination.EtcdCoordinator(EtcdSettings((etcd,), "/unit/", lease_ttl=TTL), tmp_path)
    asked = time.monotonic()
    with slow.lease([("pg-switchover", "main")], holder("op-1")) as held:
        assert time.monotonic() - asked >= GRANT_DELAY
        assert held.lost() is None
        with other.lease([("pg-switchover", "main")], holder("op-2"), wait=3 * TTL):
            assert held.lost() == f"not renewed for {TTL} s"
            with pytest.raises(coordination.LeaseLost):
                held.check()


def exited_process() -> tuple[int, int]:
    """The pid and start time of a process of this machine that has exited."""
    process = subprocess.Popen(["sleep", "60"])
    started = process_identity.process_start(process.pid)
    process.kill()
    process.wait()
    assert started is not None
    return process.pid, started


def coordinator(etcd: str, tmp_path: Path) -> coordination.EtcdCoordinator:
    return coordination.EtcdCoordinator(EtcdSettings((etcd,), "/unit/", lease_ttl=TTL), tmp_path)


MAIN = ("pg-switchover", "main")


def test_a_holder_whose_process_exited_here_loses_its_lease_at_once(etcd, tmp_path):
    """A rerun right after a kill need not wait out the TTL. The lease stays renewed (by this
    test's keepalive thread): only the judgement of its holder's process frees it."""
    pid, started = exited_process()
    dead = replace(holder("op-1"), pid=pid, process_start=started)
    with coordinator(etcd, tmp_path).lease([MAIN], dead):
        with coordinator(etcd, tmp_path).lease([MAIN], holder("op-2")) as mine:
            assert mine.lost() is None


@pytest.mark.parametrize(
    "identity",
    [
        {"boot_id": None, "pid_namespace": None, "process_start": None},  # an older igops's record
        {"pid_namespace": 1},  # another container's igops, its pid free here
    ],
)
def test_a_holder_this_machine_cannot_judge_keeps_its_lease(etcd, tmp_path, identity):
    pid, started = exited_process()
    unjudged = replace(holder("op-1"), **{"pid": pid, "process_start": started, **identity})
    with coordinator(etcd, tmp_path).lease([MAIN], unjudged) as held:
        with pytest.raises(coordination.Conflict) as caught:
            with coordinator(etcd, tmp_path).lease([MAIN], holder("op-2")):
                pass
        assert caught.value.holder == unjudged
        assert held.lost() is None


# Run in a PID namespace of its own: holds ("pg-switchover", "other"), then tries to take the
# test's ("pg-switchover", "main"), and keeps its lease until its stdin closes.
IN_ANOTHER_NAMESPACE = textwrap.dedent("""
    import sys
    from igops import coordination
    from igops.etcd_gateway import EtcdSettings

    etcd, state_dir = sys.argv[1:]
    backend = coordination.EtcdCoordinator(EtcdSettings((etcd,), "/unit/", lease_ttl=3), state_dir)
    me = coordination.current_holder("pg-switchover", "other", "igops pg switchover other", None, "op-ns")
    with backend.lease([("pg-switchover", "other")], me):
        try:
            with backend.lease([("pg-switchover", "main")], me):
                print("took main", flush=True)
        except coordination.Conflict as conflict:
            print("refused:", conflict.holder.pid, flush=True)
        sys.stdin.read()
""")


@pytest.mark.skipif(not unshare_works(), reason="needs unshare of a user and PID namespace")
def test_holders_in_two_pid_namespaces_of_one_host_never_revoke_each_other(etcd, tmp_path, monkeypatch):
    """Two containers of one host name: each sees the other's pid missing (or someone else's),
    and must leave the other's lease alone, or both would hold one target."""
    monkeypatch.setenv(safety.OPERATOR_HOST_ENV, "shared-bastion")
    ours = coordinator(etcd, tmp_path)
    with ours.lease([MAIN], holder("op-1")) as held:
        other = subprocess.Popen(
            [*UNSHARE, sys.executable, "-c", IN_ANOTHER_NAMESPACE, etcd, str(tmp_path / "other")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert other.stdout.readline().strip() == f"refused: {os.getpid()}"
            with pytest.raises(coordination.Conflict) as caught:
                with ours.lease([("pg-switchover", "other")], holder("op-2")):
                    pass
            theirs = caught.value.holder
            assert theirs.host == "shared-bastion" and theirs.operation_id == "op-ns"
            assert theirs.pid_namespace != process_identity.pid_namespace()
            assert held.lost() is None and ours.lease_alive(held.lease_id)
        finally:
            other.stdin.close()
            other.wait(30)


def test_the_journal_calls_an_operation_interrupted_by_the_same_judgement(etcd, tmp_path):
    """While its lease lives, an operation is interrupted only if its holder's process is gone
    as judged from here; else etcd's lease says it runs."""
    backend = coordinator(etcd, tmp_path)
    store = journal.EtcdJournal(backend)
    pid, started = exited_process()
    with backend.lease([MAIN], holder("op-1")) as held:
        begun = {"id": "op-1", "lease_id": held.lease_id, "host": safety.operator_host(), "pid": pid}
        gone = {**begun, **process_identity.own(), "process_start": started}
        assert not store.alive(gone)
        # Resumed here after another machine began it: judged by the resumer's process.
        assert not store.alive({**gone, "host": "bastion-9", "resumed_by": f"bob@{safety.operator_host()}"})
        assert store.alive({**gone, "pid_namespace": 1})
        assert store.alive(begun)  # an older igops's record
