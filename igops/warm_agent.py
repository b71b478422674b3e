"""`igops warm`'s side of the host agent igops.agent.pagecache: its invocations, one run of
it, the JSON events it prints and the failures they report, and the SSH sessions of a copy
(opened together, the profile relayed from the source to the target as it streams).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from igops import agent, remote, remote_session
from igops.errors import RefusedError, RemoteError
from igops.profile import Root
from igops.warm_paths import allowed_prefixes, data_directory, postgres_cluster_of

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

# An agent silent this long is taken for hung (a warm's own deadline: vmtouch.DEFAULT_TIMEOUT).
STALL_TIMEOUT = 120.0


def capture_invocation(fleet: Fleet, host: Host, roots: list[Root]) -> tuple[str, bytes]:
    header = {
        "host": host.name,
        "fleet": fleet.model.fleet.name,
        "postgres_cluster": postgres_cluster_of(fleet, host.name),
        "roots": [dataclasses.asdict(root) for root in roots],
    }
    args = ["capture", "--header", json.dumps(header, separators=(",", ":"))]
    if any(root.base == "postgres" for root in roots):
        pgdata = data_directory(fleet, host)
        assert pgdata is not None  # source_roots makes a postgres root only of the host's data directory
        args += ["--cluster-dir", pgdata]
    for prefix in allowed_prefixes(fleet, host):
        args += ["--within", prefix]
    return agent.invocation("pagecache", args)


def agent_failure(host: str, event: dict[str, Any], what: str) -> Exception:
    message = (
        f"{host}: {what} refused: {event.get('message')}"
        if event.get("refused")
        else f"{host}: {what} failed: {event.get('message')}"
    )
    if event.get("refused"):
        return RefusedError(message, "nothing was read or warmed")
    summary = event.get("summary") or {}
    done = (
        f"{summary['warmed_pages']} pages of {summary['warmed_files']} files were already warmed" if summary else None
    )
    return RemoteError(message, done)


def event(line: str, host: str, what: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise RemoteError(f"{host}: unexpected output from the {what} agent: {line[:200]!r}") from None
    if not isinstance(event, dict):
        raise RemoteError(f"{host}: unexpected output from the {what} agent: {line[:200]!r}")
    return event


def run_agent(fleet: Fleet, host: Host, invocation: tuple[str, bytes], what: str, stdin: bytes = b"") -> str:
    command, prefix = invocation
    [result] = remote.run(remote.targets_for(fleet, [host]), command, remote.settings_for(fleet), stdin=prefix + stdin)
    if not result.reached:
        raise RemoteError(f"{host.name}: {result.error}", "nothing was read or warmed")
    first = result.stdout.split("\n", 1)[0]
    if first.startswith("{"):
        parsed = event(first, host.name, what)
        if parsed.get("event") == "error":
            raise agent_failure(host.name, parsed, what)
    if not result.ok:
        raise RemoteError(
            f"{host.name}: the {what} agent failed (exit {result.exit_code}): "
            f"{result.stderr.strip()[-300:] or 'no message'}"
        )
    return result.stdout


def send(session: remote_session.Session, data: bytes) -> bool:
    """Send to the agent; False when it has already exited (having refused the profile's header,
    which it then says on stdout)."""
    try:
        session.send(data)
        return True
    except OSError:
        return False


class Relay:
    """Reads the capture on the source line by line for the profile reader, forwarding each line
    to the target as it goes: the profile streams through igops and is checked on the way."""

    def __init__(self, source: remote_session.Session, target: remote_session.Session, host: str):
        self.source, self.target, self.host = source, target, host
        self.first = True
        self.target_listening = True

    def readline(self, limit: int = -1) -> bytes:
        line = self.source.read_line(STALL_TIMEOUT)
        if line is None:
            return b""
        if self.first and line.startswith("{"):
            parsed = event(line, self.host, "capture")
            raise agent_failure(self.host, parsed, "capture")
        self.first = False
        data = line.encode() + b"\n"
        if self.target_listening:
            self.target_listening = send(self.target, data)
        return data


def open_together(stack: ExitStack, sessions: list[remote_session.Session]) -> None:
    """Connect to every host at once (an SSH handshake is most of a short copy's time); the
    stack closes whichever opened, whatever happens."""
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        openings = [pool.submit(session.__enter__) for session in sessions]
    for session, opening in zip(sessions, openings, strict=False):
        if opening.exception() is None:
            stack.push(session.__exit__)
    for opening in openings:
        failure = opening.exception()
        if failure is not None:
            raise failure
