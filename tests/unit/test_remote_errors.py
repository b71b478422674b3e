"""Why an SSH connection failed, stated truly: real TCP peers on loopback that close at once,
reset, say nothing, or are not there. A peer that closes at once is no timeout."""

import socket
import struct
import threading
import time
from contextlib import contextmanager

import paramiko  # noqa: F401 - imported here so that the timings below measure the connection, not the import

from igops import remote


def drain_and_close(connection: socket.socket) -> None:
    with connection:
        while connection.recv(4096):
            pass


@contextmanager
def peer(behaviour: str):
    """A listener on a free loopback port that treats every connection as `behaviour` says."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            if behaviour == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
            elif behaviour == "close":
                # FIN at once. A bare close() with the client's banner unread would send RST
                # instead (the kernel's rule), which is the "reset" case.
                connection.shutdown(socket.SHUT_WR)
                threading.Thread(target=drain_and_close, args=(connection,), daemon=True).start()
            else:  # silent: holds the connection open and never sends a banner
                held.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        for connection in held:
            connection.close()


def connect(tmp_path, port: int) -> tuple[str, float]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    settings = remote.SshSettings(known_hosts, None, connect_timeout=2, command_timeout=5, parallel=1)
    started = time.monotonic()
    result = remote.run([remote.Target("h", "127.0.0.1", port, "root")], "true", settings)[0]
    return result.error, time.monotonic() - started


def test_a_peer_that_closes_at_once_is_not_a_timeout(tmp_path):
    with peer("close") as port:
        error, took = connect(tmp_path, port)
    assert "closed it before completing the SSH handshake" in error, error
    assert "did not complete within" not in error
    assert took < 2


def test_a_peer_that_resets_says_reset(tmp_path):
    with peer("reset") as port:
        error, _ = connect(tmp_path, port)
    assert "reset the connection" in error or "closed it before completing" in error, error
    assert "did not complete within" not in error


def test_a_silent_peer_is_a_timeout(tmp_path):
    with peer("silent") as port:
        error, took = connect(tmp_path, port)
    assert "the SSH handshake did not complete within 2 s" in error, error
    assert took >= 2


def test_nothing_listening_is_refused(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error, _ = connect(tmp_path, port)
    assert error.startswith(f"connection refused by 127.0.0.1:{port}")
