"""Parallel remote execution over SSH (asyncssh, every connection on one event loop), with strict
host-key checking.

One dead or hung host can never hang a run: every host gets a connect timeout, a handshake
timeout, and a per-command deadline, and the number of hosts at once is bounded. Commands are
built from argument lists and quoted here, so no value reaches a remote shell unquoted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import shlex
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from igops import ssh_keys, ssh_loop
from igops.errors import UsageError

if TYPE_CHECKING:
    from pathlib import Path

    from asyncssh import SSHClientConnection, SSHClientProcess

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
    Results come back in the targets' order; `on_start` and `on_done` are called (on the SSH
    loop's thread: they must not block, nor call igops.remote) as each host's turn begins and
    as its result is in, so a caller can show the run as it goes."""
    if not targets:
        return []
    workers = max(1, min(parallel or settings.parallel, len(targets)))
    allow_descriptors(DESCRIPTORS_PER_CONNECTION * workers)
    request = Request(command, timeout or settings.command_timeout, stdin)
    return ssh_loop.call(_run_all(targets, request, settings, workers, on_start, on_done))


async def _run_all(
    targets: Sequence[Target],
    request: Request,
    settings: SshSettings,
    workers: int,
    on_start: Callable[[Target], None] | None,
    on_done: Callable[[HostResult], None] | None,
) -> list[HostResult]:
    turns = asyncio.Semaphore(workers)
    admission = SlowStart(SLOW_START_HOSTS, SLOW_START_PATIENCE_S)

    async def one(target: Target) -> HostResult:
        async with turns:
            await admission.enter()
            widened = False

            def logged_in() -> None:  # or failed to: either way its login no longer takes a share
                nonlocal widened
                if not widened:
                    widened = True
                    admission.widen()

            try:
                if on_start:
                    on_start(target)
                result = await _run_one(target, request, settings, logged_in)
            finally:
                logged_in()
        if on_done:
            on_done(result)
        return result

    tasks = [asyncio.ensure_future(one(target)) for target in targets]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # A callback that raised ends the run: the hosts still under way are stopped with it,
        # not left running behind the caller (gather cancels them only when it is cancelled).
        for task in tasks:
            task.cancel()


# How many logins a run begins with before it widens towards its `parallel`, and how long a host
# waits for its turn at most: logins that hang (hosts down, addresses black-holed, each up to
# the connect timeout) must not keep a run narrow.
SLOW_START_HOSTS = 10
SLOW_START_PATIENCE_S = 1.0


class SlowStart:
    """Admits `first` hosts, then two more as each admitted one's login ends (in or refused; not
    its command, which may take minutes), as TCP's slow start widens its window: the width
    triples with each round of logins until the run's `parallel` bounds it. Logins all begun at
    once share the client's and the targets' CPU evenly, so none finishes before most do: at 100
    at once on two cores the first result waited for about a hundred handshakes (1.4-1.8 s),
    where ten first give one in the time of ten, and the run is as wide as asked three rounds
    later. Used on the SSH loop."""

    def __init__(self, first: int, patience: float):
        self._allowed = max(1, first)
        self._patience = patience
        self._begun = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        """Wait for a turn, at most `patience` seconds: then begin anyway."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._patience
        while self._begun >= self._allowed and (remaining := deadline - loop.time()) > 0:
            waiter = loop.create_future()
            self._waiting.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                break
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
        self._begun += 1

    def widen(self) -> None:
        self._allowed += 2
        for _ in range(2):
            while self._waiting and self._waiting[0].done():
                self._waiting.popleft()
            if self._waiting:
                self._waiting.popleft().set_result(None)


# A connection under way holds one descriptor, its socket (every connection shares the loop's).
DESCRIPTORS_PER_CONNECTION = 1
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


# The ciphers offered, in OpenSSH's client order but AES-GCM first: an AEAD cipher's tag is
# checked inside the cryptography library with the decryption, where CTR needs a MAC of its own
# over every packet. No CBC modes, which OpenSSH's client no longer offers either.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")


class HostKeyRejected(Exception):
    """The host's key is not the one known_hosts has for it (`known`), or it has none."""

    def __init__(self, known: bool):
        super().__init__("host key changed" if known else "host key not found in known_hosts")
        self.known = known


class HandshakeTimeout(Exception):
    """The host accepted the TCP connection but the SSH handshake and login did not end in time."""


async def open_connection(target: Target, settings: SshSettings) -> SSHClientConnection:
    """Connect and authenticate, every wait bounded by the connect timeout. Only the identity file
    (or, without one, the user's default keys); no agent, no ~/.ssh/config: what igops does is
    the inventory's to say. Raises OSError (known_hosts or the identity unreadable, the TCP
    connection refused or timed out), ssh_keys.IdentityError, HostKeyRejected, HandshakeTimeout,
    or what asyncssh raises."""
    import asyncssh

    known = ssh_keys.known_host_keys(settings.known_hosts).lookup(
        ssh_keys.known_hosts_name(target.address, target.port)
    )
    client_keys = ssh_keys.identity(settings.identity_file) if settings.identity_file else ()
    sock = await _tcp_connect(target, settings.connect_timeout)
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                target.address,
                target.port,
                sock=sock,
                username=target.user,
                known_hosts=(list(known.values()), [], []),
                client_keys=client_keys,
                agent_path=None,
                config=[],
                encryption_algs=CIPHERS,
            ),
            settings.connect_timeout,
        )
    except BaseException as exc:
        # asyncssh closes the socket of a connect that fails once it holds it; before that (a
        # cancel, a timeout) it is ours to close.
        if sock.fileno() != -1:
            sock.close()
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            raise HostKeyRejected(known=bool(known)) from None
        if isinstance(exc, TimeoutError):
            raise HandshakeTimeout() from None
        raise


async def _tcp_connect(target: Target, timeout: float) -> socket.socket:
    """The TCP connection, opened here so that its timeout is told apart from the handshake's."""
    loop = asyncio.get_running_loop()
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(target.address).version == 6 else socket.AF_INET
        addresses: list[Any] = [(family, (target.address, target.port))]
    except ValueError:  # a name: resolved off the loop
        infos = await loop.getaddrinfo(target.address, target.port, type=socket.SOCK_STREAM)
        addresses = [(info[0], info[4]) for info in infos]
    failure: OSError = OSError(f"no address for {target.address}")
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
            return sock
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError) or not isinstance(exc, OSError):  # a timeout, a cancel
                raise
            failure = exc
    raise failure


class KeptConnections:
    """SSH connections kept open between commands, one per host, while an operation runs under
    `keep_connections()`: a command then costs a channel on an open connection, not a login
    (a handshake and a key exchange, some 40 ms of two processes' CPU). What a switchover runs
    while writes are paused needs that. Used on the SSH loop."""

    def __init__(self) -> None:
        self._connections: dict[tuple[object, ...], SSHClientConnection] = {}
        self._opening: dict[tuple[object, ...], asyncio.Lock] = {}

    @staticmethod
    def _key(target: Target, settings: SshSettings) -> tuple[object, ...]:
        return target.address, target.port, target.user, settings.known_hosts, settings.identity_file

    async def connection(self, target: Target, settings: SshSettings) -> SSHClientConnection:
        """An open, authenticated connection to `target` (opened now if there is none, or the
        one kept died). Raises what connecting raises."""
        key = self._key(target, settings)
        async with self._opening.setdefault(key, asyncio.Lock()):
            connection = self._connections.get(key)
            if connection is not None and not connection.is_closed():
                return connection
            if connection is not None:
                connection.abort()
            connection = self._connections[key] = await open_connection(target, settings)
            return connection

    def forget(self, target: Target, settings: SshSettings) -> None:
        """Close the connection kept to `target` (a command on it failed: the next opens anew)."""
        connection = self._connections.pop(self._key(target, settings), None)
        if connection is not None:
            connection.abort()

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(close_connection(connection) for connection in connections))


# The connections kept by the innermost keep_connections() of this process: a process-wide
# setting, not a context variable, because the commands are asked for from many threads (the
# callers' own parallel maps) and run on the SSH loop's, none of which would see one.
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
        ssh_loop.call(kept.close())


def connect_ahead(targets: Sequence[Target], settings: SshSettings) -> None:
    """Open the kept connections to `targets` now, before a pause, so that the commands run in
    it do not log in. Without keep_connections() there is nothing to keep, and a host that
    cannot be reached now is left for its command to report (with the hint)."""
    kept = _kept
    if kept is None or not targets:
        return

    async def all_of() -> None:
        await asyncio.gather(*(kept.connection(target, settings) for target in targets), return_exceptions=True)

    ssh_loop.call(all_of())


@dataclass(frozen=True)
class Request:
    """What a run asks of each host: an already-quoted command, its deadline, its input."""

    command: str
    timeout: float
    stdin: bytes | None = None


async def _run_one(
    target: Target, request: Request, settings: SshSettings, logged_in: Callable[[], None]
) -> HostResult:
    """`request` on `target`, its result; `logged_in` is called once the login is over. On a
    kept connection when there are any, else on one of its own."""
    kept = _kept
    started = time.monotonic()
    command = with_remote_deadline(request.command, request.timeout)
    try:
        connection, process = await _start(target, command, settings, kept, logged_in)
    except _NotStarted as failure:
        return _result(target, started, None, error=str(failure))
    try:
        return await _exec(process, target, request, started)
    except Exception as exc:  # noqa: BLE001 - every failure becomes this host's result
        if kept is not None:
            kept.forget(target, settings)
        return _result(target, started, None, error=session_failed(exc))
    finally:
        if kept is None:
            connection.close()


def session_failed(exc: Exception) -> str:
    """A host's error for a session that broke: asyncssh's errors may have no text (a channel the
    host refused without a reason), and then their kind is the message."""
    return f"SSH session failed: {str(exc) or type(exc).__name__}"


class _NotStarted(Exception):
    """The command did not start on the host; the message is the error its result carries."""


async def _start(
    target: Target, command: str, settings: SshSettings, kept: KeptConnections | None, logged_in: Callable[[], None]
) -> tuple[SSHClientConnection, SSHClientProcess[bytes]]:
    """A connection to `target` (the kept one, if connections are kept) and `command` started on
    it. A kept connection that no longer opens a channel (its host's sshd restarted) is replaced
    once: the command had not begun."""
    for _attempt in (1, 2):
        try:
            connection = await (kept.connection(target, settings) if kept else open_connection(target, settings))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this host's result
            raise _NotStarted(describe_connect_error(exc, target, settings)) from None
        finally:
            logged_in()
        try:
            return connection, await connection.create_process(command, encoding=None)
        except Exception as exc:  # noqa: BLE001
            failure = session_failed(exc)
            if kept is None:
                connection.close()
                break
            kept.forget(target, settings)
    raise _NotStarted(failure)


async def _exec(process: SSHClientProcess[bytes], target: Target, request: Request, started: float) -> HostResult:
    """Give the started command its input, wait for it under the request's deadline, and its result."""
    import asyncssh

    try:
        if request.stdin:
            process.stdin.write(request.stdin)
        process.stdin.write_eof()
        done = await process.wait(timeout=max(0.0, started + request.timeout - time.monotonic()))
    except asyncssh.TimeoutError as exc:
        # With encoding=None asyncssh's output is bytes (or None when there was none).
        out, err = cast(bytes, exc.stdout or b""), cast(bytes, exc.stderr or b"")
        return _result(target, started, None, out, err, f"{TIMED_OUT} {request.timeout:g} s")
    finally:
        process.close()
    status = done.exit_status if done.exit_status is not None else -1
    return _result(target, started, status, cast(bytes, done.stdout or b""), cast(bytes, done.stderr or b""))


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


def with_remote_deadline(command: str, timeout: float) -> str:
    """Closing an SSH channel does not stop the command behind it, so the host enforces the
    deadline too: TERM at the deadline, KILL two seconds later."""
    return f"timeout -k 2 {math.ceil(timeout) + 1} sh -c {shlex.quote(command)}"


def describe_connect_error(exc: Exception, target: Target, settings: SshSettings) -> str:
    import asyncssh

    where = f"{target.address}:{target.port}"
    if isinstance(exc, HostKeyRejected):
        if exc.known:
            return (
                f"host key for {where} CHANGED (possible man-in-the-middle); if the change is expected, "
                f"replace its entry in {settings.known_hosts}"
            )
        return (
            f"host key for {where} is unknown: verify it and add it to {settings.known_hosts} "
            f"(igops never trusts a new key automatically)"
        )
    if isinstance(exc, ssh_keys.IdentityError):
        return f"{exc}: set [ssh] identity_file to an unencrypted private key"
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication failed for {target.user}@{where}: check the SSH key and user"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: is sshd running there?"
    if isinstance(exc, HandshakeTimeout):
        return (
            f"{where} accepted the connection but the SSH handshake did not complete within "
            f"{settings.connect_timeout:g} s"
        )
    if isinstance(exc, TimeoutError):
        return f"connect to {where} timed out after {settings.connect_timeout:g} s"
    if isinstance(exc, OSError) and exc.filename is not None:  # known_hosts or the identity file
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    causes = _causes(exc)
    if any(isinstance(cause, ConnectionResetError) for cause in causes):
        return (
            f"{where} reset the connection before the SSH handshake completed: is sshd refusing connections "
            f"there (MaxStartups, a firewall, fail2ban)?"
        )
    if isinstance(exc, asyncssh.ConnectionLost) or any(isinstance(cause, EOFError) for cause in causes):
        # At once, not after a wait: a peer that closes is no timeout.
        return (
            f"{where} accepted the connection and closed it before completing the SSH handshake: is sshd "
            f"what listens there, and is it turning connections away (MaxStartups, tcp wrappers, fail2ban)?"
        )
    if isinstance(exc, asyncssh.ProtocolNotSupported | asyncssh.ProtocolError):
        return f"{where} accepted the connection but did not answer as an SSH server ({exc})"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"{where} ended the SSH handshake: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}"
    return f"SSH to {where} failed: {exc}"


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


async def close_connection(connection: SSHClientConnection) -> None:
    """Close a connection and wait, briefly, for it to be gone (its host sees it close at once)."""
    connection.close()
    try:
        await asyncio.wait_for(connection.wait_closed(), 1.0)
    except Exception:  # noqa: BLE001 - however it ended, it is closed or aborted now
        connection.abort()
