"""`igops status` without a fleet: a health URL that answers 503 is shown DOWN with the reason its
body gives, in the table, the JSON envelope and the closing line."""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from igops import status
from igops.secrets import Secrets
from tests.conftest import run_igops
from tests.serving import served
from tests.unit.inventories import unit_inventory

UNHEALTHY = {
    "status": "fail",
    "release": "R1",
    "checks": {"directory": {"ok": True, "ms": 3.1}, "redis": {"ok": False, "error": "Timeout connecting to server"}},
}


@pytest.fixture
def failing_app():
    """An HTTP server answering /health as the app does when Redis is down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(UNHEALTHY).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with served(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as server:
        yield server.server_address[1]


def test_the_reason_for_a_failed_health_check_comes_from_its_body():
    assert status.failure_reason(json.dumps(UNHEALTHY).encode()) == "redis: Timeout connecting to server"
    assert status.failure_reason(b"<html>502 Bad Gateway</html>\n<hr>") == "<html>502 Bad Gateway</html>"
    assert status.failure_reason(b"") is None


def test_status_shows_why_an_app_server_answered_503(tmp_path, failing_app):
    config = unit_inventory(
        tmp_path, [("app1", "127.0.0.1", "app")], ssh="port = 9\n", sections=f"[app]\nport = {failing_app}\n"
    )
    shown = run_igops("-c", str(config), "status")
    reason = "GET /health -> 503: redis: Timeout connecting to server"
    assert reason in shown.stdout, shown.stdout
    assert f"gunicorn on app1 down ({reason})" in shown.stdout
    envelope = json.loads(run_igops("-c", str(config), "status", "--json").stdout)
    [service] = envelope["data"]["services"]
    assert service["ok"] is False and service["detail"] == reason


def test_a_redis_that_hangs_up_is_asked_once_not_retried():
    """redis-py's default retries a failed connection three times, backing off: some 4.6 s for
    each dead node in `status` and `check`. igops' probes tell a dead node at the first try."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        probed = status._probe("redis", "redis1", "127.0.0.1", listener.getsockname()[1], status._redis, Secrets(None))
    finally:
        listener.close()
    assert not probed.ok, probed
    assert len(accepted) == 1, f"{len(accepted)} connections"
