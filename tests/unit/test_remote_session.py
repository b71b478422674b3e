"""remote.run and remote_session.Session through the SSH protocol, against a paramiko server in this
process on a loopback port (no sshd, nothing run on a host): authentication with the identity
file, strict host keys, the command as the host receives it, its output, exit status and stdin,
and the per-host callbacks. The server answers every command with what the test set."""

import asyncio
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import paramiko
import pytest

from igops import remote, remote_session, ssh_keys, ssh_loop
from igops.errors import RemoteError


@dataclass
class Answer:
    stdout: bytes = b""
    stderr: bytes = b""
    status: int = 0
    delay: float = 0.0


@dataclass
class Server:
    port: int
    host_key: paramiko.PKey
    commands: list[str] = field(default_factory=list)
    stdins: list[bytes] = field(default_factory=list)
    ciphers: list[str] = field(default_factory=list)  # agreed, a connection each
    channels_to_refuse: int = 0  # the first channel requests, of any connection, refused


class _Interface(paramiko.ServerInterface):
    def __init__(self, client_key: paramiko.PKey, server: Server):
        self.client_key = client_key
        self.server = server
        self.command = threading.Event()

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        ok = username == "deploy" and key.get_base64() == self.client_key.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if self.server.channels_to_refuse > 0:
            self.server.channels_to_refuse -= 1
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        self.server.commands.append(command.decode())
        self.command.set()
        return True


def _serve(
    sock: socket.socket, client_key: paramiko.PKey, server: Server, answer: Answer, ciphers: tuple[str, ...] | None
) -> None:
    transport = paramiko.Transport(sock)
    if ciphers:
        transport.get_security_options().ciphers = ciphers
    transport.add_server_key(server.host_key)
    interface = _Interface(client_key, server)
    try:
        transport.start_server(server=interface)
        server.ciphers.append(transport.remote_cipher)
        channel = transport.accept(10)
        if channel is None or not interface.command.wait(10):
            return
        stdin = bytearray()
        while not channel.eof_received and not channel.closed:
            if channel.recv_ready():
                stdin += channel.recv(65536)
            else:
                time.sleep(0.005)
        while channel.recv_ready():  # what came just before the EOF the loop saw first
            stdin += channel.recv(65536)
        server.stdins.append(bytes(stdin))
        time.sleep(answer.delay)
        channel.sendall(answer.stdout)
        channel.sendall_stderr(answer.stderr)
        channel.send_exit_status(answer.status)
        channel.shutdown_write()
        channel.close()
    except (EOFError, OSError, paramiko.SSHException):
        pass  # the client went away (a refused host key, a timeout): nothing to answer
    finally:
        time.sleep(0.05)
        transport.close()


@contextmanager
def ssh_server(client_key: paramiko.PKey, answer: Answer, ciphers: tuple[str, ...] | None = None):
    """A server on a loopback port that answers every command with `answer`, offering `ciphers`
    (paramiko's own list by default)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    server = Server(listener.getsockname()[1], paramiko.ECDSAKey.generate())
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(sock, client_key, server, answer, ciphers), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server
    finally:
        stop.set()
        listener.close()


@pytest.fixture(scope="module")
def client_key(tmp_path_factory):
    """An Ed25519 identity in OpenSSH's format, as ssh-keygen writes it (and the lab uses)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = (
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        .decode()
    )
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    path.write_text(text)
    path.chmod(0o600)
    return paramiko.Ed25519Key(filename=str(path)), path


def settings_for(tmp_path, server: Server, identity, known: paramiko.PKey | None = None, **overrides):
    known_hosts = tmp_path / "known_hosts"
    key = known or server.host_key
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {key.get_name()} {key.get_base64()}\n")
    values = {"connect_timeout": 5.0, "command_timeout": 10.0, "parallel": 4} | overrides
    return remote.SshSettings(known_hosts, identity, **values)


def target(name: str, server: Server, user: str = "deploy") -> remote.Target:
    return remote.Target(name, "127.0.0.1", server.port, user)


def test_a_command_runs_with_its_output_exit_status_and_stdin(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer(b"out\n", b"err\n", 3)) as server:
        settings = settings_for(tmp_path, server, identity)
        [result] = remote.run([target("h1", server)], "echo 'a b'", settings, stdin=b"input")
    assert result.host == "h1" and result.exit_code == 3 and not result.ok and result.reached
    assert result.stdout == "out\n" and result.stderr == "err\n" and result.error is None
    assert server.commands == [remote.with_remote_deadline("echo 'a b'", 10.0)]
    assert server.stdins == [b"input"]


def test_every_host_is_reported_in_order_with_its_start_and_end(tmp_path, client_key):
    key, identity = client_key
    started, done = [], []
    with ssh_server(key, Answer(b"up\n")) as server:
        settings = settings_for(tmp_path, server, identity)
        targets = [target(f"h{i}", server) for i in range(6)]
        results = remote.run(
            targets, "uptime", settings, parallel=3, on_start=lambda t: started.append(t.name), on_done=done.append
        )
    assert [r.host for r in results] == [t.name for t in targets] and all(r.ok for r in results)
    assert sorted(started) == sorted(r.host for r in done) == sorted(t.name for t in targets)


def test_an_unknown_host_key_is_refused_before_any_command(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer()) as server:
        settings = settings_for(tmp_path, server, identity)
        settings.known_hosts.write_text("")
        [result] = remote.run([target("h1", server)], "touch /tmp/x", settings)
    assert not result.reached and "is unknown" in result.error and "never trusts a new key" in result.error
    assert server.commands == []


def test_a_changed_host_key_is_refused(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer()) as server:
        settings = settings_for(tmp_path, server, identity, known=paramiko.ECDSAKey.generate())
        [result] = remote.run([target("h1", server)], "true", settings)
    assert not result.reached and "CHANGED" in result.error and server.commands == []


def test_a_wrong_user_fails_authentication(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer()) as server:
        [result] = remote.run([target("h1", server, user="root")], "true", settings_for(tmp_path, server, identity))
    assert not result.reached and "authentication failed for root@127.0.0.1" in result.error


def test_a_command_past_its_deadline_is_reported_as_timed_out(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer(b"late\n", delay=3)) as server:
        started = time.monotonic()
        [result] = remote.run([target("h1", server)], "sleep 9", settings_for(tmp_path, server, identity), timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert not result.ok and result.error == "command timed out after 0.5 s"


def test_a_session_reads_its_lines(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer(b"one\ntwo\n")) as server:
        settings = settings_for(tmp_path, server, identity)
        with remote_session.Session(target("h1", server), "agent", settings) as session:
            session.send(b"x")
            assert session.read_line(1) is None  # nothing until the host has read its stdin
        with remote_session.Session(target("h1", server), "agent", settings) as session:
            ssh_loop.call(end_input(session))
            assert [session.read_line(5), session.read_line(5), session.read_line(1)] == ["one", "two", None]


def test_a_session_to_a_host_with_an_unknown_key_is_refused(tmp_path, client_key):
    key, identity = client_key
    with ssh_server(key, Answer()) as server:
        settings = settings_for(tmp_path, server, identity)
        settings.known_hosts.write_text("")
        with pytest.raises(RemoteError, match="h1: host key for 127.0.0.1:.* is unknown"):
            with remote_session.Session(target("h1", server), "agent", settings):
                pass


async def end_input(session: remote_session.Session) -> None:
    session._started().stdin.write_eof()


def test_connections_with_descriptors_past_1024_run(tmp_path, client_key):
    """At a few hundred connections at once, descriptors pass 1024, where select() raises: the
    loop that carries them must not use it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1200:
        pytest.skip("this process may not open a descriptor numbered 1100")
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next descriptors are past 1024
    try:
        key, identity = client_key
        with ssh_server(key, Answer(b"out")) as server:
            settings = settings_for(tmp_path, server, identity)
            [result] = remote.run([target("a", server)], "true", settings)
        assert result.ok and result.stdout == "out", result
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class FakeLimits:
    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        assert limits[1] == self.limits[1] and (limits[1] == -1 or limits[0] <= limits[1])
        self.limits = limits


@pytest.mark.parametrize(
    "soft,hard,needed,after",
    [
        (1024, 524288, 100, 1024),  # enough already: left alone
        (1024, 524288, 3000, 3000 + 256),  # raised to what the run needs
        (1024, 2048, 3000, 2048),  # as far as the hard limit allows
        (1024, -1, 3000, 3000 + 256),  # no hard limit (RLIM_INFINITY)
        (-1, -1, 3000, -1),  # no limit at all
    ],
)
def test_the_open_file_limit_is_raised_for_a_wide_run(monkeypatch, soft, hard, needed, after):
    import resource

    fake = FakeLimits(soft, hard)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    monkeypatch.setattr(resource, "RLIM_INFINITY", -1)
    remote.allow_descriptors(needed)
    assert fake.limits == (after, hard)


async def run_one_at_once(target, request, settings, logged_in):
    return result_of(target)


def test_a_run_asks_for_a_descriptor_per_connection_at_once(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(remote, "allow_descriptors", asked.append)
    monkeypatch.setattr(remote, "_run_one", run_one_at_once)
    settings = remote.SshSettings(tmp_path / "known_hosts", None, 1.0, 1.0, 32)
    targets = [remote.Target(f"h{i}", "127.0.0.1", 22, "root") for i in range(50)]
    assert len(remote.run(targets, "true", settings, parallel=400)) == 50
    assert len(remote.run(targets, "true", settings)) == 50
    assert asked == [50, 32]


async def until(condition, timeout: float = 10) -> None:
    """On the SSH loop: wait until `condition()` holds (set by the test's thread)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_a_wide_run_begins_with_ten_logins_and_widens_as_logins_end_not_commands(monkeypatch, tmp_path):
    """Ten logins first, so that one ends in the time of ten, not of all at once; each login over
    lets two more begin, so hosts whose commands run long do not keep the run narrow: all 40
    are logged in at once, holding their commands until every one is."""
    hosts = 40
    begun: list[str] = []
    logins_may_end = threading.Event()
    logged_in_hosts: list[str] = []

    async def run_one(target, request, settings, logged_in):
        begun.append(target.name)
        await until(logins_may_end.is_set)  # the login
        logged_in()
        logged_in_hosts.append(target.name)
        await until(lambda: len(logged_in_hosts) == hosts)  # the command: ends once every host is in
        return result_of(target)

    monkeypatch.setattr(remote, "_run_one", run_one)
    monkeypatch.setattr(remote, "SLOW_START_PATIENCE_S", 60.0)
    settings = remote.SshSettings(tmp_path / "known_hosts", None, 1.0, 1.0, hosts)
    targets = [remote.Target(f"h{i}", "127.0.0.1", 22, "root") for i in range(hosts)]
    results: list[remote.HostResult] = []
    runner = threading.Thread(target=lambda: results.extend(remote.run(targets, "true", settings)))
    runner.start()
    assert wait_until(lambda: len(begun) >= remote.SLOW_START_HOSTS, 10)
    time.sleep(0.3)
    assert len(begun) == remote.SLOW_START_HOSTS, "more than the first ten began before a login ended"
    logins_may_end.set()
    runner.join(20)
    assert [result.host for result in results] == [target.name for target in targets]
    assert len(logged_in_hosts) == hosts


def test_logins_that_hang_keep_a_run_narrow_only_for_the_patience_of_the_others(monkeypatch, tmp_path):
    """Ten hosts down (each login waits out the connect timeout): the rest begin anyway."""
    logins_may_end = threading.Event()
    began: list[float] = []

    async def run_one(target, request, settings, logged_in):
        began.append(time.monotonic())
        if target.name.startswith("down"):
            await until(logins_may_end.is_set)
        return result_of(target)

    monkeypatch.setattr(remote, "_run_one", run_one)
    monkeypatch.setattr(remote, "SLOW_START_PATIENCE_S", 0.2)
    settings = remote.SshSettings(tmp_path / "known_hosts", None, 1.0, 1.0, 40)
    targets = [remote.Target(f"down{i}", "127.0.0.1", 22, "root") for i in range(10)]
    targets += [remote.Target(f"up{i}", "127.0.0.1", 22, "root") for i in range(30)]
    runner = threading.Thread(target=remote.run, args=(targets, "true", settings))
    started = time.monotonic()
    runner.start()
    try:
        assert wait_until(lambda: len(began) == 40, 5), f"{len(began)} of 40 began while ten logins hung"
        assert time.monotonic() - started < 5
    finally:
        logins_may_end.set()
        runner.join(10)


def test_a_callback_that_raises_ends_the_run_and_stops_the_hosts_under_way(monkeypatch, tmp_path):
    began, ended = [], []

    async def run_one(target, request, settings, logged_in):
        began.append(target.name)
        logged_in()
        await asyncio.sleep(0 if target.name == "h0" else 0.5)
        ended.append(target.name)
        return result_of(target)

    def on_done(result):
        raise RuntimeError(f"callback failed on {result.host}")

    monkeypatch.setattr(remote, "_run_one", run_one)
    settings = remote.SshSettings(tmp_path / "known_hosts", None, 1.0, 1.0, 4)
    targets = [remote.Target(f"h{i}", "127.0.0.1", 22, "root") for i in range(8)]
    with pytest.raises(RuntimeError, match="callback failed on h0"):
        remote.run(targets, "true", settings, on_done=on_done)
    time.sleep(0.8)
    assert ended == ["h0"], "hosts under way when the run failed went on running"
    assert len(began) < 8


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_slow_start_admits_the_first_then_two_more_for_each_that_widens():
    async def scenario() -> list[str]:
        admission = remote.SlowStart(2, patience=60)
        seen = []
        await admission.enter()
        await admission.enter()
        third = asyncio.create_task(admission.enter())
        await asyncio.sleep(0.2)
        seen.append(f"third waits: {not third.done()}")
        admission.widen()
        await asyncio.wait_for(third, 2)
        await asyncio.wait_for(admission.enter(), 2)  # the second of the two slots that login made
        fifth = asyncio.create_task(admission.enter())
        await asyncio.sleep(0.2)
        seen.append(f"fifth waits: {not fifth.done()}")
        admission.widen()
        await asyncio.wait_for(fifth, 2)
        return seen

    assert asyncio.run(scenario()) == ["third waits: True", "fifth waits: True"]


def test_slow_start_lets_a_host_begin_after_its_patience():
    async def scenario() -> float:
        admission = remote.SlowStart(1, patience=0.2)
        await admission.enter()
        started = time.monotonic()
        await admission.enter()
        return time.monotonic() - started

    assert 0.15 <= asyncio.run(scenario()) < 2


def result_of(target: remote.Target) -> remote.HostResult:
    return remote.HostResult(target.name, target.address, True, 0, "", "", 1.0)


def _openssh_ed25519(path, password: bytes | None = None) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption
        )
    )


def test_the_identity_file_is_read_once_per_run_and_again_when_it_changes(tmp_path):
    path = tmp_path / "id_ed25519"
    _openssh_ed25519(path)
    first = ssh_keys.identity(path)
    assert first and ssh_keys.identity(path) is first
    _openssh_ed25519(path)
    os.utime(path, ns=(1, 1))  # a new mtime even within the clock's resolution
    again = ssh_keys.identity(path)
    assert again and again[0].public_data != first[0].public_data


def test_an_identity_that_does_not_load_is_reported_with_the_fix(tmp_path, client_key):
    encrypted = tmp_path / "id_encrypted"
    _openssh_ed25519(encrypted, b"secret")
    with pytest.raises(ssh_keys.IdentityError, match="cannot use the SSH identity file .*id_encrypted"):
        ssh_keys.identity(encrypted)
    with ssh_server(client_key[0], Answer()) as server:
        [result] = remote.run([target("a", server)], "true", settings_for(tmp_path, server, encrypted))
        [missing] = remote.run([target("a", server)], "true", settings_for(tmp_path, server, tmp_path / "gone"))
    assert not result.ok and "identity_file" in result.error and "id_encrypted" in result.error, result.error
    assert not missing.ok and missing.error.startswith(f"cannot read {tmp_path / 'gone'}"), missing.error


def test_every_connection_of_a_run_is_carried_by_one_thread(tmp_path, client_key):
    """No thread per connection: a hundred connections at once, each with its own thread, spent
    more CPU handing the interpreter's lock between threads than on their handshakes."""
    with ssh_server(client_key[0], Answer()) as server:
        settings = settings_for(tmp_path, server, client_key[1], parallel=20)
        before = threading.active_count()
        seen = []
        results = remote.run(
            [target(f"h{i}", server) for i in range(20)],
            "true",
            settings,
            on_start=lambda _: seen.append(threading.active_count()),
        )
    assert all(result.ok for result in results)
    # the loop's own thread, once; the test server's threads (two for each connection) aside
    assert max(seen) - before <= 1 + 2 * 20


def test_a_connection_sends_each_packet_at_once(tmp_path, client_key):
    """TCP_NODELAY: without it a small packet waits for the ACK of the one before, which the
    server delays by 40 ms, in every exchange of a login and a command."""
    with ssh_server(client_key[0], Answer()) as server:
        settings = settings_for(tmp_path, server, client_key[1])
        connection = ssh_loop.call(remote.open_connection(target("a", server), settings))
        try:
            assert connection.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            ssh_loop.call(remote.close_connection(connection))


@pytest.mark.parametrize(
    ("offered", "agreed"), [(None, "aes128-gcm@openssh.com"), (("aes256-ctr", "aes128-cbc"), "aes256-ctr")]
)
def test_aes_gcm_is_agreed_where_the_server_offers_it_else_ctr_and_never_cbc(tmp_path, client_key, offered, agreed):
    """AES-GCM's tag is checked with the decryption; CTR needs a MAC of its own."""
    with ssh_server(client_key[0], Answer(), ciphers=offered) as server:
        settings = settings_for(tmp_path, server, client_key[1])
        [result] = remote.run([target("a", server)], "true", settings)
    assert result.ok, result.error
    assert server.ciphers == [agreed]
    assert not [name for name in remote.CIPHERS if "cbc" in name]


def test_a_refused_connection_is_named_as_such(tmp_path, client_key):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens on it once closed
    (tmp_path / "known_hosts").write_text("")
    settings = remote.SshSettings(tmp_path / "known_hosts", client_key[1], 2.0, 5.0, 4)
    [result] = remote.run([remote.Target("a", "127.0.0.1", port, "deploy")], "true", settings)
    assert not result.ok and result.error.startswith("connection refused by 127.0.0.1:"), result.error


def test_a_kept_connection_that_opens_no_channel_is_replaced_once_and_the_command_runs(tmp_path, client_key):
    # As after its host's sshd restarted: the kept connection is up but opens no channel. The
    # command had not begun, so it runs on a new login; without kept connections it is not retried.
    with ssh_server(client_key[0], Answer(stdout=b"ran\n")) as server:
        settings = settings_for(tmp_path, server, client_key[1])
        host = target("a", server)
        with remote.keep_connections():
            remote.connect_ahead([host], settings)
            server.channels_to_refuse = 1
            [result] = remote.run([host], "true", settings)
        assert result.ok and result.stdout == "ran\n", result
        assert len(server.ciphers) == 2, "one login ahead, one to replace it"

        server.channels_to_refuse = 1
        [result] = remote.run([host], "true", settings)
        assert not result.ok and result.error == "SSH session failed: ChannelOpenError", result
        assert len(server.ciphers) == 3
