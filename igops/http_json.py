"""JSON POSTs over HTTP(S) with the standard library's http.client: connections kept alive per
origin and shared between threads, a connect timeout apart from the answer's, TLS with a CA
file and a client certificate, https through the proxy HTTPS_PROXY names (a CONNECT tunnel)
unless NO_PROXY names the host; plain http goes direct, as it is meant for a fleet's own
network. It is what etcd's v3 gateway and PagerDuty's change events need.

`requests` did this before: importing it took some 160 ms, which every mutating command paid
before its first step (its lease in etcd) and again for its change event, and each request
cost about a millisecond of CPU in its layers. Retries stay with the callers, who know which
answers may be asked again.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit


class HttpFailure(Exception):
    """No answer: refused, reset, timed out, a TLS failure or a garbled response."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)


class JsonClient:
    def __init__(self, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None):
        self._tls = (ca_file, cert_file, key_file)
        self._context: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def post(
        self,
        url: str,
        body: Any,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 1.0,
        timeout: float = 5.0,
    ) -> Answer:
        """POST `body` as JSON and read the whole answer, whatever its status."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpFailure(f"not an http(s) URL: {url}")
        origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = json.dumps(body).encode()
        connection = self._take(origin)
        try:
            if connection is None:
                connection = self._connect(origin, connect_timeout)
            assert connection.sock is not None  # connected above, or kept from an earlier answer
            connection.sock.settimeout(timeout)
            connection.request(
                "POST", path, body=payload, headers={"Content-Type": "application/json", **(headers or {})}
            )
            response = connection.getresponse()
            answer = Answer(response.status, response.read())
        except TimeoutError:
            _close(connection)
            raise HttpFailure(f"no answer within {timeout:g} s", timed_out=True) from None
        except (OSError, http.client.HTTPException) as exc:
            _close(connection)
            raise HttpFailure(_describe(exc)) from None
        if response.will_close:
            connection.close()
        else:
            with self._lock:
                self._idle.setdefault(origin, []).append(connection)
        return answer

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _take(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        """A kept connection the server has not closed meanwhile (a readable idle socket has
        met its end, or holds bytes nobody asked for: either way it cannot carry a request)."""
        while True:
            with self._lock:
                kept = self._idle.get(origin)
                connection = kept.pop() if kept else None
            if connection is None or connection.sock is None:
                return None
            if not select.select([connection.sock], [], [], 0)[0]:
                return connection
            connection.close()

    def _connect(self, origin: tuple[str, str, int], timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = origin
        connection: http.client.HTTPConnection | None = None
        try:
            if scheme == "https":
                proxy = _https_proxy(host)
                if proxy is None:
                    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
                else:
                    proxy_host, proxy_port, tunnel_headers = proxy
                    connection = http.client.HTTPSConnection(
                        proxy_host, proxy_port, timeout=timeout, context=self._tls_context()
                    )
                    connection.set_tunnel(host, port, headers=tunnel_headers)
            else:
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
            connection.connect()
        except TimeoutError:
            _close(connection)
            raise HttpFailure(f"cannot connect within {timeout:g} s", timed_out=True) from None
        except (OSError, http.client.HTTPException) as exc:  # ssl's errors (a CA file unread, too) are OSErrors
            _close(connection)
            raise HttpFailure(_describe(exc)) from None
        assert connection.sock is not None  # connect() returned
        # A request is one small write and its answer one small read: no waiting on delayed ACKs.
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                ca_file, cert_file, key_file = self._tls
                context = ssl.create_default_context(cafile=ca_file)
                if cert_file:
                    context.load_cert_chain(cert_file, key_file)  # a lone cert file holds its key
                self._context = context
            return self._context


def _https_proxy(host: str) -> tuple[str, int, dict[str, str]] | None:
    """Where to tunnel to `host` through, as the environment says: the proxy's host, its port and
    the CONNECT request's credentials. A proxy spoken to over TLS itself is refused."""
    if not (os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")):
        return None
    import urllib.request  # only then: it costs more to import than all the rest of this module

    if urllib.request.proxy_bypass(host):  # NO_PROXY
        return None
    url = urllib.request.getproxies_environment().get("https", "")
    address = urlsplit(url if "://" in url else f"http://{url}")
    if address.scheme != "http" or not address.hostname:
        raise HttpFailure(
            f"HTTPS_PROXY {address.scheme}://{address.hostname or ''}: only an http:// proxy is supported"
        )
    headers = {}
    if address.username:
        secret = f"{unquote(address.username)}:{unquote(address.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret).decode()
    return address.hostname, address.port or 80, headers


def _close(connection: http.client.HTTPConnection | None) -> None:
    if connection is not None:
        connection.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"[:160]
