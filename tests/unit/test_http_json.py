"""igops.http_json against real servers on loopback: kept-alive connections and their end,
refusals and timeouts as failures, TLS with a CA and a client certificate (made with openssl),
and https through a CONNECT proxy unless NO_PROXY names the host."""

import base64
import json
import select
import socket
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from igops.http_json import HttpFailure, JsonClient
from tests.serving import served


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        server.seen.append((self.client_address, self.path, json.loads(body), dict(self.headers)))
        time.sleep(server.delay)
        answer = json.dumps({"echo": json.loads(body), "path": self.path}).encode()
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        # An idle timeout's end, as a server has it: closed after answering, with no word in the answer.
        self.close_connection = server.hang_up

    def log_message(self, *args):
        pass


@contextmanager
def json_server(tls: ssl.SSLContext | None = None, delay: float = 0.0, status: int = 200):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.seen, server.delay, server.status, server.hang_up = [], delay, status, False
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    with served(server):
        yield server


def url(server, scheme="http", host="127.0.0.1") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}/v3/kv/range"


def test_a_connection_is_kept_for_the_next_request_and_replaced_once_the_server_closes_it():
    client = JsonClient()
    with json_server() as server:
        assert client.post(url(server), {"n": 1}).json() == {"echo": {"n": 1}, "path": "/v3/kv/range"}
        assert client.post(url(server), {"n": 2}, headers={"Authorization": "token"}).status == 200
        assert len({seen[0] for seen in server.seen}) == 1  # one client port: one connection
        assert server.seen[1][3]["Authorization"] == "token"
        assert server.seen[1][3]["Content-Type"] == "application/json"
        # The server ends the kept connection after an answer: the next request opens another.
        server.hang_up = True
        assert client.post(url(server), {"n": 3}).status == 200
        assert len({seen[0] for seen in server.seen}) == 1
        time.sleep(0.1)  # the server's end of it has arrived
        assert client.post(url(server), {"n": 4}).json()["echo"] == {"n": 4}
        assert len({seen[0] for seen in server.seen}) == 2
    client.close()


def test_a_refused_connection_and_a_late_answer_are_failures_that_say_so():
    client = JsonClient()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(HttpFailure, match="^connection refused$") as refused:
        client.post(f"http://127.0.0.1:{port}/", {})
    assert not refused.value.timed_out
    with json_server(delay=0.5) as server:
        started = time.monotonic()
        with pytest.raises(HttpFailure, match="no answer within 0.2 s") as late:
            client.post(url(server), {}, timeout=0.2)
        assert late.value.timed_out and time.monotonic() - started < 0.45
    with pytest.raises(HttpFailure, match="not an http"):
        client.post("ftp://127.0.0.1/", {})


def test_any_status_is_an_answer_for_the_caller_to_judge():
    with json_server(status=503) as server:
        answer = JsonClient().post(url(server), {"a": "b"})
    assert answer.status == 503 and answer.json()["echo"] == {"a": "b"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    directory = tmp_path_factory.mktemp("pki")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=igops test CA",
    )  # fmt: skip
    for name in ("server", "client"):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}",
        )  # fmt: skip
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return directory


def server_tls(pki, require_client: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki / "ca.pem")
    return context


def test_tls_with_the_ca_file_and_a_client_certificate(pki):
    with json_server(server_tls(pki, require_client=True)) as server:
        client = JsonClient(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
        assert client.post(url(server, "https"), {"tls": True}).json()["echo"] == {"tls": True}
        client.close()
        with pytest.raises(HttpFailure):  # no client certificate: the server ends the handshake
            JsonClient(str(pki / "ca.pem")).post(url(server, "https"), {})
        with pytest.raises(HttpFailure, match="TLS: CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know it
            JsonClient().post(url(server, "https"), {})
    with pytest.raises(HttpFailure, match="No such file"):
        JsonClient(str(pki / "missing.pem")).post("https://127.0.0.1:1/", {})


@contextmanager
def connect_proxy():
    """A CONNECT proxy that records where it was asked to go and what credentials it got."""
    listener = socket.create_server(("127.0.0.1", 0))
    asked = []

    def relay(client):
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        lines = head.decode().split("\r\n")
        host, port = lines[0].split()[1].rsplit(":", 1)
        asked.append((lines[0], [line for line in lines if line.lower().startswith("proxy-authorization")]))
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        ends = [client, upstream]
        while True:
            for end in select.select(ends, [], [], 5)[0]:
                data = end.recv(65536)
                if not data:
                    client.close()
                    upstream.close()
                    return
                (upstream if end is client else client).sendall(data)

    def serve():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], asked
    finally:
        listener.close()


def test_https_goes_through_the_proxy_the_environment_names_unless_no_proxy_names_the_host(pki, monkeypatch):
    with json_server(server_tls(pki, require_client=False)) as server, connect_proxy() as (port, asked):
        for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://ops:s3%40cret@127.0.0.1:{port}")
        client = JsonClient(str(pki / "ca.pem"))
        assert client.post(url(server, "https"), {"via": "proxy"}).status == 200
        credentials = "Proxy-Authorization: Basic " + base64.b64encode(b"ops:s3@cret").decode()
        assert asked == [(f"CONNECT 127.0.0.1:{server.server_address[1]} HTTP/1.0", [credentials])]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert JsonClient(str(pki / "ca.pem")).post(url(server, "https"), {"via": "direct"}).status == 200
        assert len(asked) == 1
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTPS_PROXY", f"https://127.0.0.1:{port}")
        with pytest.raises(HttpFailure, match="only an http:// proxy is supported"):
            JsonClient(str(pki / "ca.pem")).post(url(server, "https"), {})
        assert len(asked) == 1
        # Plain http never goes through it: it is for the fleet's own network (etcd).
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with json_server() as plain:
        assert JsonClient().post(url(plain), {}).status == 200
        assert len(asked) == 1
