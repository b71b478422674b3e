"""A fault-injecting proxy in front of the lab's AWS endpoint.

A real region answers in about 100 ms and sometimes fails; moto answers at once and never does.
Tests and benchmarks point igops at this proxy to add latency to every call, hold calls of one
action for a long time, or fail calls (an endpoint that is down, a volume that errors).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    latency: float = 0.0  # seconds added to every call
    hold: dict[str, float] = field(default_factory=dict)  # action -> extra seconds
    fail: dict[str, int] = field(default_factory=dict)  # action -> HTTP status to answer with
    fail_when: dict[str, str] = field(default_factory=dict)  # action -> text in the body that selects the call
    # action -> (text, replacement) applied to the answer: e.g. make moto's instantly completed
    # snapshots look pending, as a real region's are for minutes.
    rewrite: dict[str, tuple[str, str]] = field(default_factory=dict)
    # action -> how many of its next calls are applied upstream and then answered 500, as when
    # a region acted but its answer was lost: the SDK's retry acts a second time.
    lose_answer: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)


# What a region answers when it fails inside: the SDK retries it (botocore's standard mode).
_INTERNAL_ERROR = (
    b"<Response><Errors><Error><Code>InternalError</Code><Message>igops lab proxy lost the answer"
    b"</Message></Error></Errors></Response>"
)


class AwsProxy:
    def __init__(self, listen: tuple[str, int], upstream: str, faults: Faults | None = None):
        self.faults = faults or Faults()
        self.upstream = upstream.rstrip("/")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                action = urllib.parse.parse_qs(body.decode(errors="replace")).get("Action", [""])[0]
                proxy.faults.calls.append(action)
                time.sleep(proxy.faults.latency + proxy.faults.hold.get(action, 0.0))
                status = proxy.faults.fail.get(action)
                selector = proxy.faults.fail_when.get(action)
                if status and (selector is None or selector in body.decode(errors="replace")):
                    payload = (
                        f"<Response><Errors><Error><Code>InjectedFault</Code><Message>igops lab proxy "
                        f"failed {action}</Message></Error></Errors></Response>"
                    ).encode()
                    return self._answer(status, payload, "text/xml")
                request = urllib.request.Request(
                    f"{proxy.upstream}{self.path}",
                    data=body or None,
                    method=method,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=120) as answer:
                        payload = answer.read()
                        if proxy._lose(action):
                            return self._answer(500, _INTERNAL_ERROR, "text/xml")
                        if action in proxy.faults.rewrite:
                            old, new = proxy.faults.rewrite[action]
                            payload = payload.replace(old.encode(), new.encode())
                        self._answer(answer.status, payload, answer.headers.get("Content-Type", "text/xml"))
                except urllib.error.HTTPError as error:
                    self._answer(error.code, error.read(), error.headers.get("Content-Type", "text/xml"))

            def _answer(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                self._forward("POST")

            def do_GET(self) -> None:
                self._forward("GET")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(listen, Handler)
        self._losing = threading.Lock()
        self._server.daemon_threads = True
        self.url = f"http://{listen[0]}:{self._server.server_address[1]}"

    def _lose(self, action: str) -> bool:
        """Whether this call's answer is to be lost (counted down under a lock: calls run in
        threads of their own)."""
        with self._losing:
            left = self.faults.lose_answer.get(action, 0)
            if left > 0:
                self.faults.lose_answer[action] = left - 1
            return left > 0

    def __enter__(self) -> AwsProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
