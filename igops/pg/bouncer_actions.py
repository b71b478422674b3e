"""The PgBouncer steps of a Postgres plan: read the databases files, pause (or hold, for a dead
primary) behind the pause watchdogs, repoint and resume.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from igops import postgres
from igops.errors import IgopsError
from igops.host_commands import parallel_map, read_file, replace_file
from igops.pg.cluster import bouncer_text
from igops.pg.timeouts import DEAD_SERVER_PAUSE_S

if TYPE_CHECKING:
    from igops.bouncer_watchdog import PauseWatchdogs
    from igops.inventory import Fleet


class BouncerActions:
    """The PgBouncer steps of igops.pg.actions.PgActions (mixed in: `fleet`, `_host`,
    `databases_files`, `bouncers`, `watchdogs`, `paused_at` and `resumed_at` are PgActions')."""

    fleet: Fleet
    databases_files: dict[str, str]
    bouncers: dict[str, postgres.Bouncer]
    watchdogs: PauseWatchdogs
    paused_at: float | None
    resumed_at: float | None

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

    def _databases_file(self, host: Any) -> str:
        return self.fleet.path_for(self.fleet.model.pgbouncer.databases_file, host)

    def _bouncer(self, host_name: str) -> postgres.Bouncer:
        """The plan's one client of that PgBouncer's admin console (its session, once opened,
        serves every later step)."""
        if host_name not in self.bouncers:
            self.bouncers[host_name] = postgres.Bouncer(self.fleet, self._host(host_name))
        return self.bouncers[host_name]

    def read_databases_files(self, databases: dict[str, list[str]]) -> None:
        # The admin sessions the repoint's RELOAD and SHOW and the RESUME use are opened here too,
        # before writes pause: a login is some 6 ms each that they would otherwise wait for.
        def one(host_name: str) -> tuple[str, str]:
            host = self._host(host_name)
            self._bouncer(host_name).open()
            return host_name, read_file(self.fleet, host, self._databases_file(host))

        self.databases_files.update(parallel_map(one, list(databases)))

    def _bouncers(self, databases: dict[str, list[str]], method: str, *args: object) -> None:
        # One thread per PgBouncer host, each on its own entry of self.bouncers.
        def one(item: tuple[str, list[str]]) -> None:
            host_name, names = item
            getattr(self._bouncer(host_name), method)(names, *args)

        parallel_map(one, list(databases.items()))

    def watch(self, databases: dict[str, list[str]]) -> str:
        """Arm the pause watchdogs over databases that are paused already."""
        return self.watchdogs.arm(databases)

    def pause(self, databases: dict[str, list[str]]) -> str:
        # The watchdogs start before the pause, so their SSH logins are not part of the stall. A
        # RESUME of theirs is safe at any point of this plan: the old primary is fenced and stopped
        # before the candidate is promoted, so resumed clients meet the old primary still running
        # (nothing promoted; the promotion waits for all its WAL) or fenced (errors, no lost writes).
        armed = self.watchdogs.arm(databases)
        timeout = self.fleet.model.pgbouncer.pause_timeout
        started = time.monotonic()
        try:
            self._bouncers(databases, "pause", timeout)
        except IgopsError:
            self._bouncers(databases, "resume")
            raise
        self.paused_at = started
        return f"{armed}; paused in {(time.monotonic() - started) * 1000:.0f} ms"

    def resume(self, databases: dict[str, list[str]]) -> str | None:
        try:
            self._bouncers(databases, "resume")
        except BaseException:
            # Closing their sessions without "done" makes the watchdogs RESUME from their hosts.
            self.watchdogs.release(clean=False)
            raise
        details = []
        if self.paused_at is not None and self.resumed_at is None:
            self.resumed_at = time.monotonic()
            details.append(f"writes were paused {(self.resumed_at - self.paused_at) * 1000:.0f} ms")
        released = self.watchdogs.release()
        if released:
            details.append(released)
        return "; ".join(details) or None

    def hold(self, databases: dict[str, list[str]]) -> str:
        """Stop queries reaching a dead primary. PAUSE first: the connections to a crashed
        server are already gone, so it completes at once. KILL only when PAUSE cannot finish
        (server connections hung on an unreachable host), because PgBouncer can crash when
        a client logs in to a killed database (pgbouncer/pgbouncer#1401). KILL leaves them
        paused, so the watchdogs (armed first) cover both."""
        armed = self.watchdogs.arm(databases)
        self.paused_at = time.monotonic()
        try:
            self._bouncers(databases, "pause", DEAD_SERVER_PAUSE_S)
            return f"{armed}; paused in {(time.monotonic() - self.paused_at) * 1000:.0f} ms"
        except postgres.PauseFailed:
            self._bouncers(databases, "kill")
            return f"{armed}; did not pause within {DEAD_SERVER_PAUSE_S:g} s: killed the connections instead"

    def repoint(self, databases: dict[str, list[str]], node: str) -> str:
        fleet = self.fleet
        target = self._host(node)
        port = fleet.model.postgres.port

        def one(item: tuple[str, list[str]]) -> None:
            host_name, names = item
            host = self._host(host_name)
            path = self._databases_file(host)
            text = self.databases_files.get(host_name) or read_file(fleet, host, path)
            try:
                updated = postgres.repoint_databases(text, set(names), str(target.address), port)
            except ValueError as exc:
                raise IgopsError(f"{host_name}:{path}: {exc}", "add the entries PgBouncer shows to that file") from None
            if updated != text:
                replace_file(fleet, host, path, updated)
            bouncer = self._bouncer(host_name)
            bouncer.reload()
            wrong = [
                database.name
                for database in bouncer.databases()
                if database.name in names and database.host != str(target.address)
            ]
            if wrong:
                raise IgopsError(
                    f"{host_name}: after RELOAD, {', '.join(wrong)} still route elsewhere",
                    f"check {path} and PgBouncer's log",
                )

        parallel_map(one, list(databases.items()))
        return f"{bouncer_text(databases)} -> {target.address}:{port}"
