"""Parallel remote execution over SSH (paramiko), with strict host-key checking.

One dead or hung host can never hang a run: every host gets a connect timeout, banner and
auth timeouts, and a per-command deadline, and the pool is bounded. Commands are built from
argument lists and quoted here, so no value reaches a remote shell unquoted.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from igops.errors import UsageError

if TYPE_CHECKING:
    from paramiko import Channel, PKey, SSHClient, Transport

    from igops.inventory import Fleet
    from igops.inventory_model import Host


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    port: int
    user: str


@dataclass(frozen=True)
class SshSettings:
    known_hosts: Path
    identity_file: Path | None
    connect_timeout: float
    command_timeout: float
    parallel: int


@dataclass
class HostResult:
    host: str
    address: str
    ok: bool
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    error: str | None = None

    @property
    def reached(self) -> bool:
        return self.exit_code is not None

    @property
    def timed_out(self) -> bool:
        return not self.reached and (self.error or "").startswith(TIMED_OUT)


TIMED_OUT = "command timed out after"
T = TypeVar("T")
# How often an open connection's paramiko thread wakes when nothing arrives (paramiko's own 0.1 s
# is for noticing a close, which igops never waits on): a deploy holds an agent's connection to
# every host for the whole run, and 1,000 of them woke 10,000 times a second, half of the run's
# client CPU. Data still wakes the thread at once.
IDLE_WAKE_S = 1.0
# The PATH init gives a host's services (systemd's default), whatever a login shell puts first.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def quote_command(argv: Sequence[str]) -> str:
    """The shell command line that runs exactly `argv` remotely, every argument literal."""
    if not argv:
        raise UsageError("no command given", "put the command after --, e.g. igops exec -- uptime")
    return shlex.join(str(arg) for arg in argv)


def settings_for(fleet: Fleet) -> SshSettings:
    ssh = fleet.model.ssh
    known_hosts = fleet.resolve(ssh.known_hosts)
    identity = fleet.resolve(ssh.identity_file) if ssh.identity_file else None
    # Every missing credential at once: fixing one should not reveal the next.
    missing = (
        [
            (
                f"known_hosts file {known_hosts} does not exist",
                "set [ssh] known_hosts to a file with every host's key (host keys are checked strictly)",
            )
        ]
        if not known_hosts.is_file()
        else []
    )
    if identity and not identity.is_file():
        missing.append((f"SSH identity file {identity} does not exist", "fix [ssh] identity_file"))
    if missing:
        raise UsageError("; ".join(problem for problem, _ in missing), "; ".join(fix for _, fix in missing))
    return SshSettings(known_hosts, identity, ssh.connect_timeout, ssh.command_timeout, ssh.parallel)


def targets_for(fleet: Fleet, hosts: Iterable[Host]) -> list[Target]:
    return [Target(host.name, str(host.address), fleet.ssh_port(host), fleet.ssh_user(host)) for host in hosts]


def run(
    targets: Sequence[Target],
    command: str,
    settings: SshSettings,
    *,
    parallel: int | None = None,
    timeout: float | None = None,
    stdin: bytes | None = None,
    on_start: Callable[[Target], None] | None = None,
    on_done: Callable[[HostResult], None] | None = None,
) -> list[HostResult]:
    """Run one already-quoted command on every target, at most `parallel` at a time.
    Results come back in the targets' order; `on_start` and `on_done` are called (from the
    pool's threads) as each host's turn begins and as its result is in, so a caller can show
    the run as it goes."""
    if not targets:
        return []
    workers = max(1, min(parallel or settings.parallel, len(targets)))
    deadline = timeout or settings.command_timeout
    allow_descriptors(DESCRIPTORS_PER_CONNECTION * workers)

    admission = SlowStart(SLOW_START_HOSTS, SLOW_START_PATIENCE_S)

    def one(target: Target) -> HostResult:
        admission.enter()
        widened = False

        def logged_in() -> None:  # or failed to: either way its login no longer takes a share
            nonlocal widened
            if not widened:
                widened = True
                admission.widen()

        try:
            if on_start:
                on_start(target)
            result = _run_one(target, Request(command, deadline, stdin), settings, logged_in)
        finally:
            logged_in()
        if on_done:
            on_done(result)
        return result

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ssh") as pool:
        return list(pool.map(one, targets))


# How many logins a run begins with before it widens towards its `parallel`, and how long a host
# waits for its turn at most: logins that hang (hosts down, addresses black-holed, each up to
# the connect timeout) must not keep a run narrow.
SLOW_START_HOSTS = 10
SLOW_START_PATIENCE_S = 1.0


class SlowStart:
    """Admits `first` hosts, then two more as each admitted one's login ends (in or refused; not
    its command, which may take minutes), as TCP's slow start widens its window: the width
    triples with each round of logins until the pool's size bounds it. Logins all begun at once
    share the client's and the targets' CPU evenly, so none finishes before most do: at 100 at
    once on two cores the first result waited for about a hundred handshakes (1.4-1.8 s), where
    ten first give one in the time of ten, and the run is as wide as asked three rounds later."""

    def __init__(self, first: int, patience: float):
        self._allowed = max(1, first)
        self._patience = patience
        self._begun = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        """Wait for a turn, at most `patience` seconds: then begin anyway."""
        with self._changed:
            self._changed.wait_for(lambda: self._begun < self._allowed, self._patience)
            self._begun += 1

    def widen(self) -> None:
        with self._changed:
            self._allowed += 2
            self._changed.notify(2)


# A connection under way holds its socket and its channel's pipe (paramiko's Channel.fileno(),
# which the wait for output polls): three descriptors.
DESCRIPTORS_PER_CONNECTION = 3
# Besides the connections: the interpreter's, the inventory's and known_hosts' files, the
# progress bar's terminal, log and audit files, a Session beside the run.
DESCRIPTORS_SPARE = 256


def allow_descriptors(needed: int) -> None:
    """Raise this process's soft limit on open files (as far as its hard limit allows) when it
    is too low for `needed` more: at the soft limit most systems start processes with (1024), a
    run of a few hundred hosts at once would fail its later connections with "Too many open
    files". Raising the soft limit up to the hard one needs no privilege."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + DESCRIPTORS_SPARE
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def _client(target: Target, settings: SshSettings) -> SSHClient:
    """A paramiko client for `target` that knows this host's keys alone and refuses any other
    (unknown or changed). Only this host's entries: handing every connection the whole file
    makes a run's client work grow with the square of the fleet's size."""
    from paramiko import RejectPolicy, SSHClient

    client = SSHClient()
    client.set_missing_host_key_policy(RejectPolicy())
    name = known_hosts_name(target.address, target.port)
    for key_type, key in _known_host_keys(settings.known_hosts).lookup(name).items():
        client.get_host_keys().add(name, key_type, key)
    return client


def _open(client: SSHClient, target: Target, settings: SshSettings) -> Transport:
    """Connect and authenticate, every wait bounded by the connect timeout. Only the identity file
    (or, without one, the user's default keys); no agent, no ~/.ssh/config: what igops does is
    the inventory's to say."""
    identity = _identity(settings.identity_file) if settings.identity_file else None
    timeout = max(1, round(settings.connect_timeout))
    sock = socket.create_connection((target.address, target.port), timeout=timeout)
    # Without TCP_NODELAY a small SSH packet waits for the ACK of the one before it, which the
    # server delays by 40 ms: that is most of a command's cost on a kept connection (about 50 ms
    # against 5) and two thirds of a login's on a near network.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(
            target.address,
            port=target.port,
            sock=sock,
            username=target.user,
            timeout=timeout,
            pkey=identity,
            # A file that did not load is paramiko's to read, and to explain, as before.
            key_filename=str(settings.identity_file) if settings.identity_file and identity is None else None,
            look_for_keys=settings.identity_file is None,
            allow_agent=False,
            banner_timeout=settings.connect_timeout,
            auth_timeout=settings.connect_timeout,
            channel_timeout=settings.connect_timeout,
            transport_factory=_transport,
        )
    except BaseException:
        sock.close()
        raise
    transport = client.get_transport()
    if transport is None:  # connect() returned, so it has one; this says so to the type checker
        raise RuntimeError(f"no SSH transport to {target.address}:{target.port} after connecting")
    transport.sock.settimeout(IDLE_WAKE_S)
    return transport


# The ciphers offered, in OpenSSH's client order but AES-GCM first: an AEAD cipher carries its own
# tag, checked inside the cryptography library, where with CTR paramiko checks each packet's MAC in
# Python (a byte-by-byte constant-time compare): about 0.3 ms less client CPU a login. No CBC
# modes, which OpenSSH's client no longer offers either.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")


def _transport(
    sock: Any,
    /,
    *,
    gss_kex: bool = False,
    gss_deleg_creds: bool = True,
    disabled_algorithms: Mapping[str, Iterable[str]] | None = None,
) -> Transport:
    """paramiko's Transport for `sock`, offering CIPHERS (those this paramiko has). GSS-API is
    never used (older paramiko passes its flags, newer has none)."""
    from paramiko import Transport

    transport = Transport(sock, disabled_algorithms=disabled_algorithms)
    security = transport.get_security_options()
    security.ciphers = tuple(name for name in CIPHERS if name in security.ciphers)
    return transport


def known_hosts_name(address: str, port: int) -> str:
    """How known_hosts (and paramiko) name a host: its address, or `[address]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


class KnownHosts:
    """A known_hosts file read once and looked up per host without scanning it.

    paramiko's HostKeys compares every entry for every lookup (and reloading a file checks each
    line against those before it), and for a hashed entry (`ssh-keygen -H`) it decodes the salt
    and re-encodes the digest each time: with 1,000 hosts, a run's lookups alone took seconds of
    client CPU, tens of seconds for a hashed file. Here plain names are a dict, a hashed entry's
    salt and digest are decoded once (a lookup costs one HMAC per hashed entry, as in OpenSSH),
    and each key is parsed once, when a host that has it is looked up. Matching is paramiko's:
    an exact name or a hashed one, the first key of each type in the file's order."""

    def __init__(self, text: str):
        self._plain: dict[str, list[tuple[int, str, str]]] = {}
        self._hashed: list[tuple[int, bytes, bytes, str, str]] = []
        self._keys: dict[tuple[str, str], PKey | None] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = re.split(" |\t", line)
            if len(fields) < 3:
                continue
            names, key_type, key_data = fields[:3]
            for name in names.split(","):
                if name.startswith("|1|"):
                    hashed = _hashed_name(name)
                    if hashed is not None:
                        self._hashed.append((number, *hashed, key_type, key_data))
                else:
                    self._plain.setdefault(name, []).append((number, key_type, key_data))

    @classmethod
    def read(cls, path: Path) -> KnownHosts:
        return cls(path.read_text(errors="replace"))

    def lookup(self, name: str) -> dict[str, PKey]:
        """The keys known for `name` (an address, or `[address]:port`), by key type."""
        found = list(self._plain.get(name, []))
        if self._hashed and not name.startswith("|1|"):
            encoded = name.encode()
            found += [
                (number, key_type, key_data)
                for number, salt, digest, key_type, key_data in self._hashed
                if hmac.compare_digest(hmac.digest(salt, encoded, "sha1"), digest)
            ]
        keys: dict[str, PKey] = {}
        for _, key_type, key_data in sorted(found):
            key = self._key(key_type, key_data)
            if key is not None:
                keys.setdefault(key.get_name(), key)
        return keys

    def _key(self, key_type: str, key_data: str) -> PKey | None:
        if (key_type, key_data) not in self._keys:
            from paramiko import PKey

            try:
                key: PKey | None = PKey.from_type_string(key_type, base64.b64decode(key_data))
            except Exception:  # noqa: BLE001 - a line paramiko cannot read names no key, as in HostKeys
                key = None
            self._keys[(key_type, key_data)] = key
        return self._keys[(key_type, key_data)]


def _hashed_name(name: str) -> tuple[bytes, bytes] | None:
    """A hashed name's salt and HMAC-SHA1 digest, or None for one paramiko would never match."""
    parts = name.split("|")
    if len(parts) != 4:
        return None
    try:
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except ValueError:
        return None
    canonical = base64.b64encode(salt).decode() == parts[2] and base64.b64encode(digest).decode() == parts[3]
    return (salt, digest) if canonical and len(salt) == len(digest) == 20 else None


class _ReadOnce(Generic[T]):
    """A file's contents as `load` makes them, read once per run and again whenever the file
    changes (its mtime or size)."""

    def __init__(self, load: Callable[[Path], T]):
        self._load = load
        self._lock = threading.Lock()
        self._read: tuple[tuple[str, int, int], T] | None = None

    def get(self, path: Path) -> T:
        status = path.stat()
        key = (str(path), status.st_mtime_ns, status.st_size)
        with self._lock:
            if self._read is None or self._read[0] != key:
                self._read = (key, self._load(path))
            return self._read[1]


def _load_identity(path: Path) -> PKey | None:
    from paramiko import PKey

    try:
        return PKey.from_path(path)
    except Exception:  # noqa: BLE001 - paramiko says what is wrong when it reads the file itself
        return None


_known_hosts_files = _ReadOnce(KnownHosts.read)
_identity_files = _ReadOnce(_load_identity)


def _known_host_keys(path: Path) -> KnownHosts:
    """The known_hosts file, parsed once per run and again whenever it changes."""
    return _known_hosts_files.get(path)


def _identity(path: Path) -> PKey | None:
    """The identity file's key, with its certificate (`<file>-cert.pub`) when there is one, read
    once per run and again whenever it changes: given the file, paramiko reads it again for every
    connection and tries each key type in turn until one parses. None when it does not load here
    (missing, encrypted, unknown type)."""
    try:
        return _identity_files.get(path)
    except OSError:
        return None


class KeptConnections:
    """SSH connections kept open between commands, one per host, while an operation runs under
    `keep_connections()`: a command then costs a channel on an open connection, not a login
    (a handshake and a key exchange, some 40 ms of two processes' CPU). What a switchover runs
    while writes are paused needs that."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[object, ...], SSHClient] = {}
        self._opening: dict[tuple[object, ...], threading.Lock] = {}

    @staticmethod
    def _key(target: Target, settings: SshSettings) -> tuple[object, ...]:
        return target.address, target.port, target.user, settings.known_hosts, settings.identity_file

    def transport(self, target: Target, settings: SshSettings) -> Transport:
        """An open, authenticated connection to `target` (opened now if there is none, or the
        one kept died). Raises what connecting raises."""
        key = self._key(target, settings)
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:
            client = self._clients.get(key)
            transport = client.get_transport() if client is not None else None
            if transport is not None and transport.is_active():
                return transport
            if client is not None:
                client.close()
            client = _client(target, settings)
            try:
                transport = _open(client, target, settings)
            except BaseException:
                client.close()
                raise
            self._clients[key] = client
            return transport

    def forget(self, target: Target, settings: SshSettings) -> None:
        """Close the connection kept to `target` (a command on it failed: the next opens anew)."""
        with self._lock:
            client = self._clients.pop(self._key(target, settings), None)
        if client is not None:
            client.close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


# The connections kept by the innermost keep_connections() of this process: a process-wide
# setting, not a context variable, because the commands run on pool threads (run(), and the
# callers' own parallel maps) that would not see one.
_kept: KeptConnections | None = None


@contextmanager
def keep_connections() -> Iterator[KeptConnections]:
    """Keep one SSH connection per host open for every command run inside (nested: the outer
    one's), and close them all at the end."""
    global _kept
    if _kept is not None:
        yield _kept
        return
    kept = _kept = KeptConnections()
    try:
        yield kept
    finally:
        _kept = None
        kept.close()


def connect_ahead(targets: Sequence[Target], settings: SshSettings) -> None:
    """Open the kept connections to `targets` now, before a pause, so that the commands run in
    it do not log in. Without keep_connections() there is nothing to keep, and a host that
    cannot be reached now is left for its command to report."""
    kept = _kept
    if kept is None or not targets:
        return

    def one(target: Target) -> None:
        try:
            kept.transport(target, settings)
        except Exception:  # noqa: BLE001, S110 - the command that needs it reports why, with the hint
            pass

    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="ssh-ahead") as pool:
        list(pool.map(one, targets))


@dataclass(frozen=True)
class Request:
    """What a run asks of each host: an already-quoted command, its deadline, its input."""

    command: str
    timeout: float
    stdin: bytes | None = None


def _run_one(target: Target, request: Request, settings: SshSettings, logged_in: Callable[[], None]) -> HostResult:
    """`request` on `target`, its result; `logged_in` is called once the login is over."""
    kept = _kept
    if kept is not None:
        return _run_kept(kept, target, request, settings, logged_in)
    started = time.monotonic()

    def finish(exit_code: int | None, out: bytes = b"", err: bytes = b"", error: str | None = None) -> HostResult:
        return _result(target, started, exit_code, out, err, error)

    try:
        client = _client(target, settings)
    except OSError as exc:  # known_hosts gone or unreadable since the run began
        return finish(None, error=f"cannot read {settings.known_hosts}: {exc.strerror or exc}")
    try:
        try:
            transport = _open(client, target, settings)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this host's result
            return finish(None, error=describe_connect_error(exc, target, settings))
        finally:
            logged_in()
        channel = transport.open_session(timeout=settings.connect_timeout)
        return _exec(channel, target, request, started)
    except Exception as exc:  # noqa: BLE001
        return finish(None, error=f"SSH session failed: {exc}")
    finally:
        # Also after a failed connect: paramiko leaves that transport's thread and socket open
        # until the client is closed.
        client.close()


def _run_kept(
    kept: KeptConnections, target: Target, request: Request, settings: SshSettings, logged_in: Callable[[], None]
) -> HostResult:
    """_run_one on a kept connection: a channel on it, the connection left open. A kept
    connection that no longer opens a channel (its host's sshd restarted) is replaced once."""
    started = time.monotonic()
    for attempt in (1, 2):
        try:
            transport = kept.transport(target, settings)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError | PermissionError):
                error = f"cannot read {settings.known_hosts}: {exc.strerror or exc}"
                return _result(target, started, None, error=error)
            return _result(target, started, None, error=describe_connect_error(exc, target, settings))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this host's result
            return _result(target, started, None, error=describe_connect_error(exc, target, settings))
        finally:
            logged_in()
        try:
            channel = transport.open_session(timeout=settings.connect_timeout)
            break
        except Exception as exc:  # noqa: BLE001
            kept.forget(target, settings)
            if attempt == 2:
                return _result(target, started, None, error=f"SSH session failed: {exc}")
    try:
        try:
            return _exec(channel, target, request, started)
        finally:
            channel.close()
    except Exception as exc:  # noqa: BLE001
        kept.forget(target, settings)
        return _result(target, started, None, error=f"SSH session failed: {exc}")


def _exec(channel: Channel, target: Target, request: Request, started: float) -> HostResult:
    """Run the request's command on an open session channel under its deadline, and its result."""
    channel.exec_command(with_remote_deadline(request.command, request.timeout))
    if request.stdin:
        channel.sendall(request.stdin)
    channel.shutdown_write()
    out, err, timed_out = _collect(channel, started + request.timeout)
    if timed_out:
        return _result(target, started, None, out, err, f"{TIMED_OUT} {request.timeout:g} s")
    return _result(target, started, channel.recv_exit_status(), out, err)


def _result(
    target: Target,
    started: float,
    exit_code: int | None,
    out: bytes = b"",
    err: bytes = b"",
    error: str | None = None,
) -> HostResult:
    return HostResult(
        target.name,
        target.address,
        exit_code == 0 and error is None,
        exit_code,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        round((time.monotonic() - started) * 1000, 1),
        error,
    )


def _collect(channel: Channel, deadline: float) -> tuple[bytes, bytes, bool]:
    out, err = bytearray(), bytearray()
    readable = _readable(channel)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            channel.close()
            return bytes(out), bytes(err), True
        readable(min(remaining, 1.0))
        while channel.recv_ready():
            out += channel.recv(65536)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        if (
            channel.exit_status_ready()
            and not channel.recv_ready()
            and not channel.recv_stderr_ready()
            and channel.eof_received
        ):
            return bytes(out), bytes(err), False


def _readable(channel: Channel) -> Callable[[float], None]:
    """A wait of at most some seconds for the channel to have something to read (or to close).
    poll, not select: select cannot watch a descriptor numbered 1024 or more, which a run with a
    few hundred connections at once reaches (each channel's fileno() is a pipe of its own, beside
    its transport's socket), and then every further host would fail with "filedescriptor out of
    range in select()"."""
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)

    def wait(seconds: float) -> None:
        poller.poll(max(0, seconds) * 1000)

    return wait


def with_remote_deadline(command: str, timeout: float) -> str:
    """Closing an SSH channel does not stop the command behind it, so the host enforces the
    deadline too: TERM at the deadline, KILL two seconds later."""
    return f"timeout -k 2 {math.ceil(timeout) + 1} sh -c {shlex.quote(command)}"


def describe_connect_error(exc: Exception, target: Target, settings: SshSettings) -> str:
    from paramiko import AuthenticationException, BadHostKeyException, SSHException
    from paramiko.ssh_exception import NoValidConnectionsError

    where = f"{target.address}:{target.port}"
    if isinstance(exc, BadHostKeyException):
        return (
            f"host key for {where} CHANGED (possible man-in-the-middle); if the change is expected, "
            f"replace its entry in {settings.known_hosts}"
        )
    if isinstance(exc, AuthenticationException):
        return f"authentication failed for {target.user}@{where}: check the SSH key and user"
    if isinstance(exc, NoValidConnectionsError) or isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: is sshd running there?"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"connect to {where} timed out after {settings.connect_timeout:g} s"
    if isinstance(exc, SSHException) and "not found in known_hosts" in str(exc):
        return (
            f"host key for {where} is unknown: verify it and add it to {settings.known_hosts} "
            f"(igops never trusts a new key automatically)"
        )
    causes = _causes(exc)
    if any(isinstance(cause, ConnectionResetError) for cause in causes):
        return (
            f"{where} reset the connection before the SSH handshake completed: is sshd refusing connections "
            f"there (MaxStartups, a firewall, fail2ban)?"
        )
    if any(isinstance(cause, EOFError) for cause in causes):
        # At once, not after a wait: a peer that closes is no timeout.
        return (
            f"{where} accepted the connection and closed it before completing the SSH handshake: is sshd "
            f"what listens there, and is it turning connections away (MaxStartups, tcp wrappers, fail2ban)?"
        )
    # paramiko reports a banner or key exchange that never came as these, with no cause kept.
    if any(isinstance(cause, (socket.timeout, TimeoutError)) for cause in causes) or (
        isinstance(exc, SSHException)
        and any(sign in str(exc).lower() for sign in ("no existing session", "negotiation timed out"))
    ):
        return (
            f"{where} accepted the connection but the SSH handshake did not complete within "
            f"{settings.connect_timeout:g} s"
        )
    if isinstance(exc, SSHException) and "banner" in str(exc).lower():
        return f"{where} accepted the connection but did not answer as an SSH server ({exc})"
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}"
    return f"SSH to {where} failed: {exc}"


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling (paramiko wraps the socket's)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


class Session:
    """One interactive command on one host: write to its stdin, read its stdout line by line,
    each read under its own deadline. Used by agents that hold host-side state (a freeze)."""

    def __init__(self, target: Target, command: str, settings: SshSettings, stdin_prefix: bytes = b""):
        self.target = target
        self._client: SSHClient | None = None
        self._settings = settings
        self._command = with_remote_deadline(command, settings.command_timeout)
        self._prefix = stdin_prefix
        self._buffer = bytearray()
        self._channel: Channel | None = None

    def __enter__(self) -> Session:
        from igops.errors import RemoteError

        try:
            self._client = _client(self.target, self._settings)
        except OSError as exc:
            raise RemoteError(
                f"{self.target.name}: cannot read {self._settings.known_hosts}: {exc.strerror or exc}"
            ) from None
        try:
            transport = _open(self._client, self.target, self._settings)
        except Exception as exc:  # noqa: BLE001
            self._client.close()
            raise RemoteError(
                f"{self.target.name}: {describe_connect_error(exc, self.target, self._settings)}"
            ) from None
        channel = transport.open_session(timeout=self._settings.connect_timeout)
        self._channel = channel
        channel.exec_command(self._command)
        if self._prefix:
            channel.sendall(self._prefix)
        return self

    def _open_channel(self) -> Channel:
        if self._channel is None:
            raise RuntimeError("remote.Session is used outside its with block")
        return self._channel

    def send(self, data: bytes) -> None:
        self._open_channel().sendall(data)

    def read_line(self, timeout: float) -> str | None:
        """The next stdout line, or None at EOF or when the deadline passes."""
        deadline = time.monotonic() + timeout
        channel = self._open_channel()
        readable = _readable(channel)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable(min(remaining, 0.5))
            if channel.recv_ready():
                chunk = channel.recv(65536)
                if not chunk:
                    return None
                self._buffer += chunk
            elif channel.eof_received and not channel.recv_ready():
                return None
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode(errors="replace")

    def stderr(self) -> str:
        data = bytearray()
        while self._channel is not None and self._channel.recv_stderr_ready():
            data += self._channel.recv_stderr(65536)
        return data.decode(errors="replace")

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()
