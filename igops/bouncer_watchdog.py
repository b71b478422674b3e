"""igops' side of the PgBouncer pause watchdog (the host program is igops/agent/pause_watchdog.py).

Before it PAUSEs a cluster's databases, an operation starts a watchdog on every PgBouncer host
involved, over one SSH session each, all at once, and waits until each says it is armed. While
the operation lives, a thread sends each a heartbeat every second. Once igops has RESUMEd the
databases itself it tells them "done" and they exit without acting. If igops dies (its SSH
sessions drop, stdin reaches EOF) or stops beating for `[pgbouncer] watchdog_deadline` seconds
(hung, stopped, cut off), each watchdog RESUMEs its databases through its host's admin console,
so no pause outlives its operation by more than that deadline. The session's own remote deadline
(`[ssh] command_timeout`) bounds a watchdog's life, and it RESUMEs then too.

Starting them costs an SSH login and a psql probe, before the pause: clients never wait on it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from igops import agent, remote, remote_session
from igops.errors import RemoteError
from igops.secrets import Secrets

if TYPE_CHECKING:
    from igops.inventory import Fleet

T = TypeVar("T")
R = TypeVar("R")

HEARTBEAT_INTERVAL_S = 1.0
# How long a watchdog may take to start, reach its admin console with psql and say so.
ARM_TIMEOUT_S = 15.0
RELEASE_TIMEOUT_S = 2.0
TERMINAL_EVENTS = ("released", "resumed")


def parse_event(line: str | None) -> dict[str, Any]:
    """One JSON line from a watchdog; {} for no line (EOF, timeout) or one that is not an event."""
    if not line:
        return {}
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else {}


def describe_release(host: str, event: dict[str, Any], clean: bool) -> str:
    """What a watchdog said when igops let it go, for the RESUME step's detail."""
    kind = event.get("event")
    if kind == "released":
        return f"{host} released"
    if kind == "resumed":
        return f"{host} had RESUMEd already ({event.get('reason')})"
    if not clean:
        return f"{host} left to RESUME from the host"
    return f"{host} did not confirm" + (f": {event['message']}" if event.get("message") else "")


class PauseWatchdogs:
    """The watchdogs of one operation, one per PgBouncer host, and their heartbeat."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.sessions: dict[str, remote_session.Session] = {}
        self.lost: list[str] = []  # hosts whose session broke while igops was beating
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def deadline(self) -> float:
        return self.fleet.model.pgbouncer.watchdog_deadline

    def arm(self, databases: dict[str, list[str]]) -> str:
        """Start a watchdog for `databases` (PgBouncer host -> names) on every host at once and
        wait until each is armed; if any is not, let the others go and raise RemoteError."""
        started = time.monotonic()
        wanted = [(host, names) for host, names in databases.items() if host not in self.sessions]
        outcomes = _parallel(lambda item: self._start(*item), wanted)
        # Each outcome is the session or the exception that stopped it (None: its thread died).
        failures = [str(outcome) for outcome in outcomes if not isinstance(outcome, remote_session.Session)]
        armed = {
            host: outcome
            for (host, _), outcome in zip(wanted, outcomes, strict=False)
            if isinstance(outcome, remote_session.Session)
        }
        if failures:
            _parallel(lambda session: _close(session, clean=True), list(armed.values()))
            raise RemoteError(
                "; ".join(failures),
                "nothing was paused; fix the PgBouncer host (python3 and psql, "
                "the admin console's password), then run the operation again",
            )
        with self._lock:
            self.sessions.update(armed)
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="pause-watchdog-heartbeat", daemon=True)
            self._thread.start()
        return (
            f"watchdog armed on {', '.join(databases)} in {(time.monotonic() - started) * 1000:.0f} ms "
            f"(RESUMEs if igops is gone or silent for {self.deadline:g} s)"
        )

    def _start(self, host_name: str, names: list[str]) -> remote_session.Session:
        fleet = self.fleet
        model = fleet.model
        host = fleet.host(host_name)
        settings = remote.settings_for(fleet)
        [target] = remote.targets_for(fleet, [host])
        command, program = agent.invocation(
            "pause_watchdog",
            [f"{self.deadline:g}", str(host.address), str(model.pgbouncer.port), model.pgbouncer.admin_user, *names],
        )
        # The password travels on stdin only, never in the remote command line.
        password = Secrets(model.secrets.file).get("pgbouncer_password")
        session = remote_session.Session(
            target, command, settings, stdin_prefix=program + json.dumps({"password": password}).encode() + b"\n"
        )
        session.__enter__()
        try:
            line = session.read_line(settings.connect_timeout + ARM_TIMEOUT_S)
            event = parse_event(line)
            if event.get("event") != "armed":
                why = event.get("message") or (line or session.stderr() or "no answer").strip()[-300:]
                raise RemoteError(f"{host_name}: the pause watchdog did not arm: {why}")
        except BaseException:
            session.__exit__(None, None, None)
            raise
        return session

    def _beat(self) -> None:
        from igops.operations.engine import lease_lost

        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            if lease_lost():
                # Another operator may hold the cluster now: stop vouching for this process, so
                # the watchdogs RESUME by their deadline even if it hangs before its own RESUME.
                return
            with self._lock:
                sessions = list(self.sessions.items())
            for host, session in sessions:
                try:
                    session.send(b"beat\n")
                except Exception:  # noqa: BLE001 - a broken session: that watchdog RESUMEs on its own
                    with self._lock:
                        if self.sessions.pop(host, None) is not None:
                            self.lost.append(host)
                    session.__exit__(None, None, None)

    def release(self, clean: bool = True) -> str | None:
        """Stop beating and let every watchdog go: `clean`, igops RESUMEd the databases itself
        and tells them "done"; otherwise it only closes their sessions, and each RESUMEs from
        its host. None when none was armed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_INTERVAL_S + 5)
            self._thread = None
        with self._lock:
            sessions, self.sessions = self.sessions, {}
        lost, self.lost = self.lost, []
        if not sessions and not lost:
            return None
        items = list(sessions.items())
        said = [
            text if isinstance(text, str) else f"{host} did not confirm: {text}"
            for (host, _), text in zip(
                items,
                _parallel(lambda item: describe_release(item[0], _close(item[1], clean), clean), items),
                strict=False,
            )
        ]
        said += [f"{host}'s session broke: it RESUMEd from the host" for host in lost]
        return "watchdog " + "; ".join(said)


def _close(session: remote_session.Session, clean: bool) -> dict[str, Any]:
    """Say "done" (when `clean`) and wait briefly for the watchdog's last word; close."""
    try:
        if not clean:
            return {}
        try:
            session.send(b"done\n")
        except Exception:  # noqa: BLE001 - it may have gone already; its last line can still be read
            pass
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            event = parse_event(session.read_line(remaining))
            if not event or event["event"] in TERMINAL_EVENTS:
                return event
        return {}
    finally:
        session.__exit__(None, None, None)


def _parallel(function: Callable[[T], R], items: list[T]) -> list[R | Exception | None]:
    """function(item) for every item at once; an exception is returned in its item's place."""
    results: list[R | Exception | None] = [None] * len(items)

    def one(index: int) -> None:
        try:
            results[index] = function(items[index])
        except Exception as exc:  # noqa: BLE001 - reported per item by the caller
            results[index] = exc

    threads = [threading.Thread(target=one, args=(index,), name="pause-watchdog") for index in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
