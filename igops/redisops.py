"""Redis as failover sees it (redis-py): replication state, write pauses, role changes; the
directory row that tells the app where the master is; and the `replicaof` line of a node's
config file, which decides the role a node takes when it restarts.

No SSH here: igops.redis_failover reads and replaces config files on the hosts and hands the
text to `with_replicaof`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, Unavailable, first_line
from igops.secrets import Secrets

if TYPE_CHECKING:
    import redis
    from psycopg2.extensions import connection as PgConnection

    from igops.inventory import Fleet

# The directory's endpoints row the app reads (app/directory.py): address "host:port", and a
# version every change bumps so each worker reloads within about a second.
MASTER_ENDPOINT = "redis_master"
PROBE_TIMEOUT = 2.0
_ROLE_LINE = re.compile(r"^\s*(replicaof|slaveof|replica-read-only|slave-read-only)\b", re.I)


def client(fleet: Fleet, host: Any, timeout: float = PROBE_TIMEOUT) -> redis.Redis:
    return connect(
        str(host.address), fleet.model.redis.port, Secrets(fleet.model.secrets.file).get("redis_password"), timeout
    )


def connect(address: str, port: int, password: str | None, timeout: float) -> redis.Redis:
    """A client of one Redis node, as every igops probe makes it."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py's default (three, backing off) spends about 4.6 s on a refused
    # connection, and telling a dead node quickly is the point of every probe.
    return redis.Redis(
        host=address,
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


def probe(fleet: Fleet, name: str, timeout: float = PROBE_TIMEOUT) -> tuple[str, NodeState | None, Unavailable | None]:
    """One member's state, or why it could not be had (a down member is an answer, not an error)."""
    connection = client(fleet, fleet.host(name), timeout)
    try:
        return name, node_state(connection), None
    except Unavailable as down:
        return name, None, down
    finally:
        connection.close()


@dataclass
class LinkedReplica:
    """A replica as its master sees it (INFO replication's slaveN lines)."""

    address: str
    offset: int
    state: str
    lag_s: int | None


@dataclass
class NodeState:
    role: str  # 'master' or 'replica'
    offset: int  # a master's replication offset, or how far a replica has processed its stream
    master_address: str | None  # a replica's master, "host:port"
    link_up: bool | None
    link_down_s: int | None
    read_only: bool
    priority: int  # replica-priority: lower is preferred, 0 never promoted
    run_id: str
    replicas: list[LinkedReplica] = field(default_factory=list)


def node_state(connection: redis.Redis) -> NodeState:
    """One node's replication state. Raises Unavailable when it does not answer."""
    import redis

    try:
        info = connection.info("replication")
        server = connection.info("server")
    except redis.exceptions.RedisError as exc:
        detail = first_line(exc)
        kind = (
            "refused"
            if "refused" in detail.lower()
            else "timeout"
            if isinstance(exc, (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError))
            else "rejected"
        )
        raise Unavailable(connection.connection_pool.connection_kwargs.get("host", "?"), detail, kind) from None
    replicas = []
    for key, value in info.items():
        if re.fullmatch(r"slave\d+", key) and isinstance(value, dict):
            replicas.append(
                LinkedReplica(
                    f"{value.get('ip')}:{value.get('port')}",
                    int(value.get("offset", 0)),
                    str(value.get("state")),
                    value.get("lag"),
                )
            )
    if info["role"] == "master":
        return NodeState(
            "master",
            int(info["master_repl_offset"]),
            None,
            None,
            None,
            False,
            int(info.get("slave_priority", info.get("replica_priority", 100)) or 100),
            server.get("run_id", ""),
            replicas,
        )
    link_up = info.get("master_link_status") == "up"
    return NodeState(
        "replica",
        int(info.get("slave_repl_offset", info.get("master_repl_offset", 0))),
        f"{info['master_host']}:{info['master_port']}",
        link_up,
        None if link_up else info.get("master_link_down_since_seconds"),
        bool(info.get("slave_read_only", 1)),
        int(info.get("slave_priority", info.get("replica_priority", 100))),
        server.get("run_id", ""),
        replicas,
    )


def pause_writes(connection: redis.Redis, milliseconds: int) -> None:
    """Hold every write command on this node (reads go on) until UNPAUSE or the timeout,
    whichever comes first: a crashed igops cannot leave writes paused."""
    connection.execute_command("CLIENT", "PAUSE", str(milliseconds), "WRITE")  # type: ignore[no-untyped-call]  # unannotated in redis-py


def unpause(connection: redis.Redis) -> None:
    connection.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]  # unannotated in redis-py


def replicate_from(connection: redis.Redis, master: tuple[str, int] | None) -> None:
    """REPLICAOF host port, or REPLICAOF NO ONE to make the node a master."""
    if master is None:
        connection.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]  # unannotated in redis-py
    else:
        connection.execute_command("REPLICAOF", master[0], str(master[1]))  # type: ignore[no-untyped-call]  # unannotated in redis-py


class CatchUpTimeout(IgopsError):
    pass


def wait_for_offset(connection: redis.Redis, offset: int, deadline: float, interval: float = 0.005) -> int:
    """Until the replica has processed the stream up to `offset`; returns its offset."""
    reached = node_state(connection).offset
    while reached < offset:
        if time.monotonic() >= deadline:
            raise CatchUpTimeout(f"replica at offset {reached}, master at {offset}{_held_back(connection, offset)}")
        time.sleep(interval)
        reached = node_state(connection).offset
    return reached


def _held_back(connection: redis.Redis, offset: int) -> str:
    """Why a replica lags, when it is not the link: a replica under CLIENT PAUSE WRITE (an old
    master demoted while paused) reads its master's stream but applies none of it."""
    received = int(connection.info("replication").get("slave_read_repl_offset", 0))
    if received >= offset:
        return f" (it has received up to {received} but applies nothing: is a write pause left on it?)"
    return f" (received up to {received})"


def wait_for_link(connection: redis.Redis, deadline: float, interval: float = 0.05) -> NodeState:
    state = node_state(connection)
    while not (state.role == "replica" and state.link_up):
        if time.monotonic() >= deadline:
            raise CatchUpTimeout("the replication link did not come up")
        time.sleep(interval)
        state = node_state(connection)
    return state


# --- the directory's redis_master endpoint (a connection to the directory database's primary) ---
def read_endpoint(connection: PgConnection) -> tuple[str | None, int | None]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT address, version FROM endpoints WHERE name = %s", (MASTER_ENDPOINT,))
        row = cursor.fetchone()
    return (row[0], row[1]) if row else (None, None)


def write_endpoint(connection: PgConnection, address: str) -> int:
    """Point the app at `address` ("host:port"); returns the new version."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO endpoints (name, address) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, "
            "version = endpoints.version + 1, updated_at = now() RETURNING version",
            (MASTER_ENDPOINT, address),
        )
        row = cursor.fetchone()
        assert row is not None  # an upsert RETURNING returns its row
        version: int = row[0]
        return version


# --- the config file --------------------------------------------------------------------------------
def with_replicaof(text: str, master: tuple[str, int] | None) -> str:
    """The config with its role lines replaced: `replicaof host port` and `replica-read-only yes`
    for a replica (a replica that accepted writes would be no fence at all), none for a master.
    Every other line stays as it is."""
    kept = [line for line in text.splitlines() if not _ROLE_LINE.match(line)]
    while kept and not kept[-1].strip():
        kept.pop()
    if master is not None:
        kept += [f"replicaof {master[0]} {master[1]}", "replica-read-only yes"]
    return "\n".join(kept) + "\n"


def configured_master(text: str) -> tuple[str, int] | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].lower() in ("replicaof", "slaveof"):
            return parts[1], int(parts[2])
    return None
