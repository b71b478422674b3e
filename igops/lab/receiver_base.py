"""What the lab's PagerDuty and Pingdom stand-ins share: the Receiver base (routing, recording
every request, injected faults, the /_lab endpoints) and the HTTP handler that serves one.

The receivers themselves are in pagerduty_receiver.py and pingdom_receiver.py; the process that
serves both is receivers.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

MAX_REMEMBERED = 20_000


class Recorder:
    """Every request a receiver saw, in order, with what it answered."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.sequence = 0

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.sequence += 1
            entry = {"seq": self.sequence, **entry}
            self.entries.append(entry)
            del self.entries[:-MAX_REMEMBERED]
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")

    def since(self, sequence: int) -> list[dict[str, Any]]:
        with self.lock:
            return [entry for entry in self.entries if entry["seq"] > sequence]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


class Faults:
    """Injected failures, consumed one per request: {"status", "count", "delay_ms", "body"}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[dict[str, Any]] = []

    def add(self, spec: dict[str, Any]) -> dict[str, Any]:
        status = int(spec.get("status", 500))
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = {
            "status": status,
            "count": max(1, int(spec.get("count", 1))),
            "delay_ms": max(0, int(spec.get("delay_ms", 0))),
            "body": spec.get("body"),
        }
        with self.lock:
            self.queue.append(fault)
        return fault

    def take(self) -> dict[str, Any] | None:
        with self.lock:
            if not self.queue:
                return None
            fault = self.queue[0]
            fault["count"] -= 1
            if fault["count"] <= 0:
                self.queue.pop(0)
            return dict(fault)

    def clear(self) -> None:
        with self.lock:
            self.queue.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(fault) for fault in self.queue]


class Reply(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


class Receiver:
    """Routing, recording and fault injection shared by both services."""

    name = "receiver"

    def __init__(self, record_dir: Path):
        self.recorder = Recorder(record_dir / f"{self.name}.jsonl")
        self.faults = Faults()

    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/_lab/"):
            return self.lab(method, path, query, body)
        started = time.time()
        parsed_body = _parse_body(body, headers.get("content-type", ""))
        fault = self.faults.take()
        status: int
        reply: Any  # an injected fault's body is any JSON value
        extra: dict[str, str]
        if fault:
            time.sleep(fault["delay_ms"] / 1000)
        if fault and fault["status"] < 400:
            fault = None  # a pure delay: the request is then served normally
        if fault:
            status, reply, extra = fault["status"], fault["body"] or self.fault_body(fault["status"]), {}
        else:
            try:
                status, reply, extra = self.route(method, path, query, headers, parsed_body)
            except Reply as answer:
                status, reply, extra = answer.status, answer.body, answer.headers
        extra = {**self.common_headers(), **extra}
        self.recorder.add(
            {
                "time": started,
                "method": method,
                "path": path,
                "query": query,
                "headers": headers,
                "body": parsed_body,
                "status": status,
                "response": reply,
                "fault": bool(fault),
            }
        )
        return status, reply, extra

    def lab(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path == "/_lab/requests" and method == "GET":
            since = int(query.get("since", "0") or 0)
            return 200, {"requests": self.recorder.since(since)}, {}
        if path == "/_lab/requests" and method == "DELETE":
            self.recorder.clear()
            return 200, {"cleared": True}, {}
        if path == "/_lab/faults" and method == "POST":
            try:
                fault = self.faults.add(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:
                return 400, {"error": str(exc)}, {}
            return 200, {"fault": fault, "pending": self.faults.pending()}, {}
        if path == "/_lab/faults" and method == "GET":
            return 200, {"pending": self.faults.pending()}, {}
        if path == "/_lab/faults" and method == "DELETE":
            self.faults.clear()
            return 200, {"pending": []}, {}
        if path == "/_lab/state" and method == "GET":
            return 200, self.state(), {}
        return 404, {"error": f"no lab endpoint {method} {path}"}, {}

    def common_headers(self) -> dict[str, str]:
        return {}

    def fault_body(self, status: int) -> dict[str, Any]:
        return {
            "status": "error",
            "message": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "injected fault",
        }

    def route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        raise Reply(404, {"error": f"no resource {method} {path}"})

    def state(self) -> dict[str, Any]:
        return {}


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if "application/x-www-form-urlencoded" in content_type:
        return {key: values[-1] for key, values in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


# --- the HTTP servers ------------------------------------------------------------------------


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"igops-lab-{receiver.name}"

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = {key: values[-1] for key, values in urllib.parse.parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {key.lower(): value for key, value in self.headers.items()}
            try:
                status, reply, extra = receiver.handle(self.command, url.path, query, headers, body)
            except Exception as exc:  # noqa: BLE001 - a receiver bug must answer 500, not hang
                status, reply, extra = 500, {"error": f"{type(exc).__name__}: {exc}"}, {}
            payload = json.dumps(reply, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
