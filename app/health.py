"""GET /health: every dependency checked in parallel, answered within a second.

Each check runs in its own thread on its own short-lived connection, so a hung
dependency costs the caller at most the deadline and never blocks the
worker's regular connections. A /health that arrives while a check is still
running (a load balancer, a monitor and igops probing at once, on the threads
of one worker) waits for that check's answer instead of starting another: every
caller gets a true answer, and a dead dependency holds one thread per check,
not one per probe.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from pymemcache.client.base import Client as MemcacheClient

from app.config import AppConfig, HostPort
from app.db import connect
from app.directory import read_snapshot
from app.redis_client import discover_master, make_client
from app.shardmap import DirectorySnapshot

DEADLINE_SECONDS = 0.9
# the directory tells which clusters and Redis master to check, so it goes first
DIRECTORY_WAIT_SECONDS = 0.4
# libpq's smallest connect timeout; the deadline still bounds what the caller waits
PG_CONNECT_TIMEOUT_SECONDS = 2
NETWORK_TIMEOUT_SECONDS = 0.5

CheckDetail = dict[str, Any]


class _RunningCheck:
    """One run of one check, whose answer every /health that arrives while it runs shares."""

    def __init__(self, name: str, probe: Callable[[_RunningCheck], CheckDetail]):
        self.name = name
        self.done = threading.Event()
        self.result: CheckDetail | None = None
        # what the directory check read, for every caller sharing it
        self.snapshot: DirectorySnapshot | None = None
        self._probe = probe
        self._started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"health-{name}", daemon=True)

    def _run(self) -> None:
        try:
            detail = self._probe(self)
        except Exception as exc:
            detail = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()}"}
        detail["ms"] = round((time.monotonic() - self._started) * 1000, 1)
        self.result = detail
        self.done.set()

    def outcome(self) -> CheckDetail:
        if self.result is not None:
            return self.result
        running = time.monotonic() - self._started
        if running > DEADLINE_SECONDS * 1.5:
            return {"ok": False, "error": f"no answer: the check has been running for {running:.1f}s"}
        return {"ok": False, "error": f"no answer within {DEADLINE_SECONDS}s"}


class HealthChecker:
    """One per process, shared by its threads."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._lock = threading.Lock()
        self._running: dict[str, _RunningCheck] = {}
        # The directory this process read last: a worker thread that has not served a request
        # yet has no cached copy, and a directory read slower than DIRECTORY_WAIT_SECONDS must
        # not make a healthy app answer "cluster list unknown".
        self._snapshot: DirectorySnapshot | None = None

    def _start(self, name: str, probe: Callable[[_RunningCheck], CheckDetail]) -> _RunningCheck:
        """The check `name` running now: the one already under way, or a new one."""
        with self._lock:
            running = self._running.get(name)
            if running is not None and not running.done.is_set():
                return running
            check = _RunningCheck(name, probe)
            self._running[name] = check
        check.thread.start()
        return check

    def run(self, cached: DirectorySnapshot | None) -> tuple[bool, dict[str, CheckDetail]]:
        deadline = time.monotonic() + DEADLINE_SECONDS
        started: dict[str, _RunningCheck | CheckDetail] = {
            "directory": self._start("directory", self._check_directory),
            "memcached": self._start("memcached", lambda _: self._check_memcached()),
        }
        directory_check = started["directory"]
        known = cached or self._snapshot
        # With no directory known at all (a process's first probe), waiting for it is the only way
        # to learn which clusters to check.
        wait = DIRECTORY_WAIT_SECONDS if known is not None else DEADLINE_SECONDS
        directory_check.done.wait(min(wait, max(0.0, deadline - time.monotonic())))
        snapshot = directory_check.snapshot or known
        if known is None:
            # The clusters' checks get their own time after the wait, as on a warm process.
            deadline = max(deadline, time.monotonic() + DEADLINE_SECONDS - DIRECTORY_WAIT_SECONDS)

        if snapshot is None:
            started["clusters"] = {"ok": False, "error": "cluster list unknown: the directory has not been read yet"}
        else:
            for cluster, database in sorted(snapshot.shard_map.database_of_cluster.items()):
                started[f"cluster:{cluster}"] = self._start(
                    f"cluster:{cluster}", lambda _, db=database: self._check_postgres(db)
                )
        master = snapshot.redis_master if snapshot is not None else None
        started["redis"] = self._start("redis", lambda _: self._check_redis(master))

        checks: dict[str, CheckDetail] = {}
        for name, check in started.items():
            if isinstance(check, _RunningCheck):
                check.done.wait(max(0.0, deadline - time.monotonic()))
                checks[name] = check.outcome()
            else:
                checks[name] = check
        return all(detail["ok"] for detail in checks.values()), checks

    def _check_postgres(self, database: str, directory_check: _RunningCheck | None = None) -> CheckDetail:
        connection = connect(self.config.postgres, database, connect_timeout=PG_CONNECT_TIMEOUT_SECONDS)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                (in_recovery,) = cursor.fetchone()
                if directory_check is not None:
                    directory_check.snapshot = read_snapshot(cursor)
            connection.rollback()
        finally:
            connection.close()
        return {"ok": True, "database": database, "in_recovery": in_recovery}

    def _check_directory(self, check: _RunningCheck) -> CheckDetail:
        detail = self._check_postgres(self.config.postgres.directory_database, directory_check=check)
        self._snapshot = check.snapshot or self._snapshot
        return detail

    def _check_redis(self, master: HostPort | None) -> CheckDetail:
        address = master or discover_master(self.config.redis.nodes, timeout=NETWORK_TIMEOUT_SECONDS)
        if address is None:
            return {
                "ok": False,
                "error": "no redis_master endpoint in the directory and no single node reports role master",
            }
        client = make_client(address, socket_timeout=NETWORK_TIMEOUT_SECONDS, connect_timeout=NETWORK_TIMEOUT_SECONDS)
        try:
            client.ping()
            role = client.role()[0]
        finally:
            client.close()
        detail: CheckDetail = {"ok": role == "master", "address": str(address), "role": role}
        if role != "master":
            detail["error"] = f"{address} reports role {role}, not master"
        return detail

    def _check_memcached(self) -> CheckDetail:
        key = f"igops:health:{os.uname().nodename}:{os.getpid()}"
        servers: dict[str, str] = {}
        for server in self.config.memcached.servers:
            client = MemcacheClient(
                (server.host, server.port), connect_timeout=NETWORK_TIMEOUT_SECONDS, timeout=NETWORK_TIMEOUT_SECONDS
            )
            token = str(time.time()).encode()
            try:
                client.set(key, token, expire=60, noreply=False)
                servers[str(server)] = "ok" if client.get(key) == token else "set/get mismatch"
            except Exception as exc:
                servers[str(server)] = f"{type(exc).__name__}: {exc}"
            finally:
                client.close()
        return {"ok": all(state == "ok" for state in servers.values()), "servers": servers}
