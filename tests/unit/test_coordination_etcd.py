"""An etcd lease against a real single-member etcd on loopback (no lab), reached through a proxy
that delays or drops chosen requests, as a slow or partitioned path to etcd would."""

import http.client
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from igops import coordination
from igops.etcd_gateway import EtcdError, EtcdGateway, EtcdSettings
from tests.labtools import wait_for

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
