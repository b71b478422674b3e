"""What keeps traffic off a host while it changes release: the load balancers (every nginx
with the `lb` role, changed together through the `upstream` agent) and the health gate a
switched host must pass before it goes back into traffic.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from igops.deploy_agents import DRAIN_TIMEOUT_S, AppFleet
from igops.errors import RemoteError

HEALTH_INTERVAL_S = 0.2
HEALTH_HTTP_TIMEOUT_S = 2.0
LB_TIMEOUT_S = 60.0 + DRAIN_TIMEOUT_S


# --- the load balancers --------------------------------------------------------------------------


@dataclass
class LbServer:
    lb: str
    server: str
    down: bool
    igops: bool
    note: str | None


@dataclass
class LbState:
    servers: list[LbServer] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def drained_by_igops(self, server: str) -> bool:
        return any(item.server == server and item.down and item.igops for item in self.servers)

    def drained_by_others(self, server: str) -> bool:
        return any(item.server == server and item.down and not item.igops for item in self.servers)

    def describe(self, server: str) -> str:
        entries = [item for item in self.servers if item.server == server]
        if not entries:
            return "unknown" if self.errors else "no load balancer"
        if any(item.down and not item.igops for item in entries):
            return "drained (by someone else)"
        if any(item.down for item in entries):
            note = next(item.note for item in entries if item.down)
            return f"drained by igops ({note})"
        return "in"


class LbChangeFailed(RemoteError):
    """A change some load balancers did not make. `unchanged`: those whose agent refused it (it
    puts its file back when the test or the reload fails); the others made it, or may have (no
    answer came back)."""

    def __init__(self, errors: dict[str, str], unchanged: set[str]):
        super().__init__(
            "load balancer change failed: " + "; ".join(f"{name}: {error}" for name, error in errors.items()),
            "on each load balancer named, fix what it reports (`nginx -t` there shows a configuration error; "
            "one that did not answer needs SSH to reach it), then run again",
        )
        self.errors = errors
        self.unchanged = unchanged


class LoadBalancers:
    """Every nginx with the `lb` role, changed together through the upstream agent."""

    def __init__(self, app: AppFleet, note: str):
        self.app = app
        self.note = note

    def change(
        self,
        down: Sequence[str] = (),
        up: Sequence[str] = (),
        share: tuple[Sequence[str], int] | None = None,
        reset_weights: bool = False,
        on: Collection[str] | None = None,
    ) -> LbState:
        """Apply, and return the servers as every LB now has them. Raises LbChangeFailed naming
        the LBs where it failed. Any change puts back the weights an earlier share raised; `share`
        (servers, percent) then gives those servers at most that percentage of the requests
        (the canary's, while its analysis watches); `reset_weights` alone puts them back. `on`:
        the names of the LBs to change, if not all of them."""
        request: dict[str, object] = {"down": sorted(down), "up": sorted(up), "note": self.note}
        if share is not None:
            request["share"] = {"servers": sorted(share[0]), "percent": share[1]}
        if reset_weights:
            request["reset_weights"] = True
        changing = bool(down or up or share or reset_weights)
        lbs = [host for host in self.app.lbs if on is None or host.name in on]
        answers = self.app.request_each(
            {host.name: (self.app.upstream_agent(host), request, b"") for host in lbs}, LB_TIMEOUT_S
        )
        state = LbState()
        unchanged = set()
        for host in lbs:
            answer, error = answers[host.name].answer, answers[host.name].error
            if answer is None:
                # An agent's answer without a document says why; a session that died says nothing.
                state.errors[host.name] = error or "no answer from its agent"
                if answers[host.name].answered:
                    unchanged.add(host.name)
                continue
            state.servers += [
                LbServer(host.name, item["address"], item["down"], item["igops"], item["note"])
                for item in answer["servers"]
            ]
        if state.errors and changing:
            raise LbChangeFailed(state.errors, unchanged)
        return state

    def read(self) -> LbState:
        return self.change()


def drained_by_igops(app: AppFleet) -> list[str]:
    """The app hosts some load balancer has out of rotation because an igops deploy drained
    them: what an interrupted deploy can leave behind."""
    state = LoadBalancers(app, "survey").read()
    return [host.name for host in app.hosts if state.drained_by_igops(app.server(host))]


def put_back(app: AppFleet, names: list[str], note: str) -> None:
    """Every load balancer takes these app hosts back into rotation."""
    LoadBalancers(app, note).change(up=[app.server(app.host(name)) for name in names])


# --- the health gate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthGate:
    path: str
    port: int
    passes: int
    timeout: float
    interval: float = HEALTH_INTERVAL_S
    # Releases igops built serve an app that names its release in /health; a release from
    # elsewhere may not, and is then gated on health alone.
    require_release: bool = True

    def describe(self) -> str:
        return f"{self.passes} passes of {self.path} in a row within {self.timeout:g} s"


@dataclass
class GateResult:
    ok: bool
    detail: str
    ms: float


class _Received:
    """A whole response read off a socket, as http.client's parser reads one."""

    def __init__(self, data: bytes):
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


async def probe(
    address: str,
    port: int,
    path: str,
    release: str,
    require_release: bool = True,
    timeout: float = HEALTH_HTTP_TIMEOUT_S,
) -> tuple[bool, str]:
    """One /health request, on the SSH loop beside the agents' sessions: (passed, what was
    seen). The response is read to the end (the request asks the server to close) and parsed
    by http.client."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            try:
                host = f"[{address}]" if ":" in address else address  # an IPv6 address is bracketed
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                data = await reader.read()
            finally:
                writer.close()
        response = http.client.HTTPResponse(_Received(data))  # type: ignore[arg-type]
        response.begin()
        body = response.read()
    except ConnectionRefusedError:
        return False, f"{address}:{port} refused the connection (is gunicorn running?)"
    except TimeoutError:
        return False, f"{path} did not answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{path}: {type(exc).__name__}: {exc}"
    try:
        document = json.loads(body)
    except ValueError:
        document = {}
    served = document.get("release") if isinstance(document, dict) else None
    if response.status != 200:
        failing = (
            [
                f"{name}: {check.get('error', 'failed')}"
                for name, check in (document.get("checks") or {}).items()
                if isinstance(check, dict) and not check.get("ok")
            ]
            if isinstance(document, dict)
            else []
        )
        return False, (
            f"{path} answered {response.status}"
            + (f" (release {served})" if served else "")
            + (": " + "; ".join(failing)[:300] if failing else "")
        )
    if served is None:
        if require_release:
            return False, f"{path} does not say which release it serves (the app must put `release` in it)"
        return True, "ok, but the app does not say which release it serves"
    if served != release:
        return False, f"still serving release {served}"
    return True, "ok"


async def wait_healthy(address: str, gate: HealthGate, release: str, probes: asyncio.Semaphore) -> GateResult:
    """On the SSH loop: probe until `gate.passes` in a row pass, or its timeout; each probe
    waits for one of `probes`, which bounds the sockets open at once."""
    started = time.monotonic()
    streak, last = 0, "no answer yet"
    while True:
        async with probes:
            ok, seen = await probe(address, gate.port, gate.path, release, gate.require_release)
        elapsed = time.monotonic() - started
        if ok:
            streak += 1
            if streak >= gate.passes:
                caveat = "" if seen == "ok" else f" ({seen}: not verified)"
                return GateResult(True, f"healthy on {release} in {elapsed:.1f} s{caveat}", round(elapsed * 1000, 1))
        else:
            streak, last = 0, seen
        if elapsed > gate.timeout:
            return GateResult(False, f"{last} (gate: {gate.describe()})", round(elapsed * 1000, 1))
        await asyncio.sleep(gate.interval)
