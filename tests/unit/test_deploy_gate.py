"""The deploy's health gate against a real HTTP server on a loopback port: what one probe sees
(the release served, a failing check, a refused or silent port, a chunked answer) and how the
gate counts passes in a row."""

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from igops import ssh_loop
from igops.deploy_gate import HealthGate, probe, wait_healthy


class _App(BaseHTTPRequestHandler):
    # HTTP/1.1, so that an answer may come chunked, as gunicorn's may.
    protocol_version = "HTTP/1.1"
    answers: list[tuple[int, dict[str, object], bool]] = []  # (status, document, chunked); the last repeats
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        status, document, chunked = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(body) // 2
            for piece in (body[:half], body[half:], b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.close_connection = self.headers.get("Connection") == "close"

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def app(*answers: tuple[int, dict[str, object], bool]) -> Iterator[tuple[int, list[str]]]:
    handler = type("App", (_App,), {"answers": list(answers), "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.paths
    finally:
        server.shutdown()
        server.server_close()


def one_probe(port: int, release: str = "R2", **options: object) -> tuple[bool, str]:
    return ssh_loop.call(probe("127.0.0.1", port, "/health?full=1", release, **options))  # type: ignore[arg-type]


def gate(port: int, passes: int = 3, timeout: float = 2.0) -> HealthGate:
    return HealthGate("/health", port, passes, timeout, interval=0.01)


async def _gated(port: int, passes: int, timeout: float) -> object:
    return await wait_healthy("127.0.0.1", gate(port, passes, timeout), "R2", asyncio.Semaphore(1))


def test_a_probe_passes_on_the_release_and_asks_for_the_path_as_given():
    with app((200, {"release": "R2"}, False)) as (port, paths):
        assert one_probe(port) == (True, "ok")
    assert paths == ["/health?full=1"]


def test_a_probe_reads_a_chunked_answer():
    with app((200, {"release": "R2", "padding": "x" * 5000}, True)) as (port, _):
        assert one_probe(port) == (True, "ok")


def test_a_probe_fails_on_another_release_and_on_one_that_names_none():
    with app((200, {"release": "R1"}, False)) as (port, _):
        assert one_probe(port) == (False, "still serving release R1")
    with app((200, {"status": "ok"}, False)) as (port, _):
        assert one_probe(port)[0] is False
        assert one_probe(port, require_release=False) == (True, "ok, but the app does not say which release it serves")


def test_a_failing_answer_names_its_failing_checks():
    document = {"release": "R2", "checks": {"db": {"ok": False, "error": "timeout"}, "cache": {"ok": True}}}
    with app((503, document, False)) as (port, _):
        assert one_probe(port) == (False, "/health?full=1 answered 503 (release R2): db: timeout")


def test_a_closed_port_and_a_silent_one_say_which():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        ok, seen = one_probe(port)
    assert not ok and "refused the connection" in seen
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        ok, seen = one_probe(silent.getsockname()[1], timeout=0.2)
    assert (ok, seen) == (False, "/health?full=1 did not answer within 0.2 s")


def test_the_gate_needs_its_passes_in_a_row():
    failing = (503, {"release": "R2"}, False)
    passing = (200, {"release": "R2"}, False)
    with app(passing, failing, passing, passing, passing) as (port, paths):
        result = ssh_loop.call(_gated(port, passes=3, timeout=5.0))
    assert result.ok and result.detail.startswith("healthy on R2")
    assert len(paths) == 5


def test_the_gate_gives_up_at_its_timeout_with_what_it_last_saw():
    with app((200, {"release": "R1"}, False)) as (port, _):
        result = ssh_loop.call(_gated(port, passes=2, timeout=0.1))
    assert not result.ok
    assert result.detail == "still serving release R1 (gate: 2 passes of /health in a row within 0.1 s)"


@pytest.mark.parametrize("path", ["/health check", "health", "/health\r\nX: 1"])
def test_an_inventory_health_path_that_is_not_an_http_path_is_refused(path):
    from pydantic import ValidationError

    from igops.inventory_model import App

    with pytest.raises(ValidationError, match="is not an HTTP path"):
        App(health_path=path)
