"""One interactive command on one host over SSH (igops.remote's connections): write to its stdin,
read its stdout line by line under a deadline each time. For agents that hold host-side state
while igops acts (a freeze, PgBouncer's pause watchdog, a deploy's agents, a page-cache capture)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from igops import remote, ssh_loop

if TYPE_CHECKING:
    from asyncssh import SSHClientConnection, SSHClientProcess


class Session:
    """One interactive command on one host: write to its stdin, read its stdout line by line,
    each read under its own deadline. Used by agents that hold host-side state (a freeze).
    Threads use the with block, send, read_line and stderr; coroutines on the SSH loop (a
    deploy's agents, one per host) use open, exchange, take_stderr and close."""

    def __init__(self, target: remote.Target, command: str, settings: remote.SshSettings, stdin_prefix: bytes = b""):
        self.target = target
        self._settings = settings
        self._command = remote.with_remote_deadline(command, settings.command_timeout)
        self._prefix = stdin_prefix
        self._connection: SSHClientConnection | None = None
        self._process: SSHClientProcess[bytes] | None = None
        self._stderr = bytearray()

    def __enter__(self) -> Session:
        # The login and the command's start in one call to the loop: at a hundred hosts at once,
        # every hand-over between a caller's thread and the loop costs CPU of its own.
        ssh_loop.call(self.open())
        return self

    async def open(self) -> None:
        """Log in and start the command (on the SSH loop: a coroutine's way into the session).
        Raises RemoteError when the login fails."""
        from igops.errors import RemoteError

        try:
            try:
                self._connection = await remote.open_connection(self.target, self._settings)
            except Exception as exc:  # noqa: BLE001 - described for the person below
                raise RemoteError(
                    f"{self.target.name}: {remote.describe_connect_error(exc, self.target, self._settings)}"
                ) from None
            process = self._process = await self._connection.create_process(self._command, encoding=None)
        except BaseException:
            await self.close()
            raise
        if self._prefix:
            process.stdin.write(self._prefix)
        asyncio.get_running_loop().create_task(self._gather_stderr(process))

    async def _gather_stderr(self, process: SSHClientProcess[bytes]) -> None:
        import asyncssh

        try:
            while chunk := await process.stderr.read(65536):
                self._stderr += chunk
        except (asyncssh.Error, OSError):
            return  # the connection ended: what came before it is kept

    def _started(self) -> SSHClientProcess[bytes]:
        if self._process is None:
            raise RuntimeError("remote_session.Session is used before it is open or after it is closed")
        return self._process

    def send(self, data: bytes) -> None:
        ssh_loop.call(self._send(self._started(), data))

    @staticmethod
    async def _send(process: SSHClientProcess[bytes], data: bytes) -> None:
        process.stdin.write(data)
        await process.stdin.drain()

    def read_line(self, timeout: float) -> str | None:
        """The next stdout line, or None at EOF or when the deadline passes."""
        return ssh_loop.call(self._read_line(self._started(), timeout))

    async def exchange(self, data: bytes, timeout: float) -> str | None:
        """On the SSH loop: send(data), then read_line(timeout) (a request and its answer)."""
        process = self._started()
        await self._send(process, data)
        return await self._read_line(process, timeout)

    @staticmethod
    async def _read_line(process: SSHClientProcess[bytes], timeout: float) -> str | None:
        import asyncssh

        try:
            # A read cut off by the deadline leaves what it had read in the stream's buffer.
            line = await asyncio.wait_for(process.stdout.readline(), max(0.0, timeout))
        except TimeoutError:
            return None
        except (asyncssh.Error, OSError):
            return None  # the connection ended: as at EOF
        if not line.endswith(b"\n"):
            return None  # EOF, with or without a last unterminated piece
        return line[:-1].decode(errors="replace")

    def stderr(self) -> str:
        """What the command wrote to stderr since the last call."""
        return ssh_loop.call(self.take_stderr())

    async def take_stderr(self) -> str:
        """On the SSH loop: what the command wrote to stderr since the last call."""
        await asyncio.sleep(0)  # what arrived with the last read is gathered first
        data, self._stderr = bytes(self._stderr), bytearray()
        return data.decode(errors="replace")

    def __exit__(self, *exc_info: object) -> None:
        ssh_loop.call(self.close())

    async def close(self) -> None:
        """On the SSH loop: end the command and the connection (the host sees them go, as after
        a kill)."""
        connection, self._connection, self._process = self._connection, None, None
        if connection is not None:
            await remote.close_connection(connection)
