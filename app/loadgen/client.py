"""A minimal keep-alive JSON client on http.client, one per thread."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit


class LoadgenError(Exception):
    pass


@dataclass
class ApiResponse:
    status: int | None
    payload: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    @property
    def error_kind(self) -> str | None:
        if self.ok:
            return None
        return self.error or f"http_{self.status}"


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError):
        return "connection_reset"
    if isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError)):
        return "disconnected"
    return f"error_{type(exc).__name__}"


# A server may close an idle keep-alive connection just as a request goes out;
# these mean the request was not read, so it is resent on a new connection.
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def split_base_url(base_url: str) -> SplitResult:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"--url must be an http:// or https:// URL, got {base_url!r}")
    return parts


class ApiClient:
    def __init__(self, base_url: str, timeout: float):
        parts = split_base_url(base_url)
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None
        self._reused = False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None, expect_json: bool = True
    ) -> ApiResponse:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Token {token}"
        retried = False
        while True:
            reused = self._connection is not None
            if self._connection is None:
                self._connection = self._connection_class(self._host, self._port, timeout=self._timeout)
            try:
                self._connection.request(method, self._prefix + path, body=data, headers=headers)
                response = self._connection.getresponse()
                raw = response.read()
            except Exception as exc:
                self.close()
                if reused and not retried and isinstance(exc, _STALE_CONNECTION_ERRORS):
                    retried = True
                    continue
                return ApiResponse(status=None, error=_error_kind(exc))
            if response.will_close:
                self.close()
            payload: Any = raw
            if expect_json:
                try:
                    payload = json.loads(raw) if raw else None
                except ValueError:
                    payload = None
            return ApiResponse(status=response.status, payload=payload)
