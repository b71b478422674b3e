"""The agent sessions of a deploy: one SSH session per host for a whole run, serving every
request to that host's `release` or `upstream` agent (igops/agent/), and `AppFleet`, an
inventory's app servers and load balancers with the sessions open on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import agent, remote, remote_session, ssh_loop
from igops.errors import IgopsError, UsageError

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

# How long nginx's old workers may take to finish their requests after a drain's reload; the
# upstream agent waits up to that long.
DRAIN_TIMEOUT_S = 10.0
SESSION_LIFETIME_S = 6 * 3600.0
# A new session's first answer also waits for the login and the interpreter's start.
AGENT_START_S = 30.0
# The health gate's probes at once (igops.deploy_gate): each holds a socket beside the sessions.
HEALTH_PROBES_AT_ONCE = 128


@dataclass
class AgentAnswer:
    answer: dict[str, Any] | None
    error: str | None
    # False when nothing came back: the request may or may not have been carried out.
    answered: bool


class AgentSession:
    """One agent process on one host, serving every request of a run over one SSH session: a
    host costs one login and one interpreter however many batches the run has. Requests are
    idempotent, so one that got no answer because the session ended is sent once more on a
    new session; one that timed out is not."""

    def __init__(self, target: remote.Target, settings: remote.SshSettings, program: str, args: list[str]):
        self.target = target
        # The session lives as long as the run; the agent also exits when igops goes away.
        self.settings = dataclasses.replace(settings, command_timeout=SESSION_LIFETIME_S)
        command, self.prefix = agent.invocation(program, args)
        # The system's interpreter and tools, whatever a login shell puts first on PATH: the
        # virtualenvs built here are run by the app's user, who cannot use an interpreter in
        # root's home directory (pyenv), and reload and test commands behave the same everywhere.
        self.command = f"PATH={remote.SYSTEM_PATH}; export PATH; {command}"
        self._session: remote_session.Session | None = None
        # Bound to the SSH loop at its first use, where every request to the agent runs.
        self._lock = asyncio.Lock()

    async def request(self, document: dict[str, Any], timeout: float, payload: bytes = b"") -> AgentAnswer:
        """On the SSH loop: the agent's answer to one request (one at a time per session)."""
        line = json.dumps(document).encode() + b"\n" + payload
        async with self._lock:
            answer, session_ended = await self._exchange(line, timeout)
            if session_ended:
                answer, _ = await self._exchange(line, timeout)
            return answer

    async def _exchange(self, line: bytes, timeout: float) -> tuple[AgentAnswer, bool]:
        """The answer, and whether the session ended without giving one (worth one more try)."""
        deadline = timeout
        if self._session is None:
            deadline += AGENT_START_S
            # The agent's program goes out with its first request: one packet, not two.
            line = self.prefix + line
            session = remote_session.Session(self.target, self.command, self.settings)
            try:
                await session.open()
            except IgopsError as exc:
                return AgentAnswer(None, exc.message.removeprefix(f"{self.target.name}: "), False), False
            except Exception as exc:  # noqa: BLE001 - connected, but no session: as unreachable
                return AgentAnswer(None, remote.session_failed(exc), False), False
            self._session = session
        started = time.monotonic()
        try:
            reply = await self._session.exchange(line, deadline)
        except Exception as exc:  # noqa: BLE001 - a dead session: the request did not get through
            await self.close()
            return AgentAnswer(None, remote.session_failed(exc), False), True
        except BaseException:
            # Cancelled mid-request (an interrupt): its answer, still to come, would be read as
            # the answer to the session's next request (the put-back of an interrupted run's).
            await self.close()
            raise
        if reply is not None:
            return self._parse(reply), False
        timed_out = time.monotonic() - started >= deadline
        ended = (await self._session.take_stderr()).strip()[-300:] or "the SSH session ended"
        await self.close()
        if timed_out:
            return AgentAnswer(None, f"no answer within {deadline:g} s", False), False
        return AgentAnswer(None, ended, False), True

    @staticmethod
    def _parse(reply: str) -> AgentAnswer:
        try:
            document = json.loads(reply)
        except ValueError:
            return AgentAnswer(None, f"unexpected answer: {reply[:200]}", True)
        if "error" in document:
            return AgentAnswer(None, document["error"], True)
        return AgentAnswer(document, None, True)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# --- the fleet's app servers and load balancers ---------------------------------------------------


@dataclass
class AppFleet:
    """The app servers and load balancers of an inventory, and the agent sessions on them
    (close them when done: `with AppFleet.of(fleet) as app`)."""

    fleet: Fleet
    hosts: list[Host]
    lbs: list[Host]
    settings: remote.SshSettings
    agents: dict[str, AgentSession] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, fleet: Fleet) -> AppFleet:
        hosts = fleet.with_role("app")
        if not hosts:
            raise UsageError("no host has the 'app' role", f'add roles = ["app"] to the app servers in {fleet.source}')
        lbs = fleet.with_role("lb")
        settings = remote.settings_for(fleet)
        # A session stays open on every host for the whole run: a thousand hosts are past the
        # soft limit on open files most systems start processes with.
        remote.allow_descriptors(remote.DESCRIPTORS_PER_CONNECTION * (len(hosts) + len(lbs)) + HEALTH_PROBES_AT_ONCE)
        return cls(fleet, hosts, lbs, settings)

    def __enter__(self) -> AppFleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(session.close() for session in self.agents.values()))

        if self.agents:
            ssh_loop.call(close_all())

    @property
    def name(self) -> str:
        return self.fleet.model.fleet.name

    def host(self, name: str) -> Host:
        return self.fleet.host(name)

    def root(self, host: Host) -> str:
        return self.fleet.path_for(self.fleet.model.app.root, host)

    def reload_command(self, host: Host) -> str:
        return self.fleet.path_for(self.fleet.model.app.reload_command, host)

    def server(self, host: Host) -> str:
        """The host as nginx's upstream names it."""
        return f"{host.address}:{self.fleet.model.app.port}"

    def release_agent(self, host: Host) -> AgentSession:
        return self._agent(host, "release", ["serve", self.root(host)])

    def upstream_agent(self, host: Host) -> AgentSession:
        lb = self.fleet.model.lb
        path = self.fleet.path_for
        return self._agent(
            host,
            "upstream",
            [
                path(lb.upstream_file, host),
                path(lb.test_command, host),
                path(lb.reload_command, host),
                f"{DRAIN_TIMEOUT_S:g}",
            ],
        )

    def _agent(self, host: Host, program: str, args: list[str]) -> AgentSession:
        key = f"{program}@{host.name}"
        if key not in self.agents:
            [target] = remote.targets_for(self.fleet, [host])
            self.agents[key] = AgentSession(target, self.settings, program, args)
        return self.agents[key]

    def request_each(
        self,
        agents: dict[str, tuple[AgentSession, dict[str, Any], bytes]],
        timeout: float,
        parallel: int | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> dict[str, AgentAnswer]:
        """name -> its agent's answer to its request, at most `parallel` hosts at once. Every
        host's exchange is a coroutine on the SSH loop, as exec's commands are: a thread a host,
        each handing every request over to the loop and waiting on it, cost more CPU than the
        requests. `on_done` is called on the loop's thread: it must not block."""
        if not agents:
            return {}
        workers = max(1, min(parallel or self.settings.parallel, len(agents)))

        async def each() -> list[AgentAnswer]:
            turns = asyncio.Semaphore(workers)

            async def one(session: AgentSession, document: dict[str, Any], payload: bytes) -> AgentAnswer:
                async with turns:
                    answer = await session.request(document, timeout, payload)
                if on_done:
                    on_done()
                return answer

            return await asyncio.gather(*(one(*job) for job in agents.values()))

        return dict(zip(agents, ssh_loop.call(each()), strict=True))
