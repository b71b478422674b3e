"""The Redis tier as igops sees it: its nodes (from the inventory), what each says of itself,
the master the app uses (the directory's redis_master endpoint), and the problems that shows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import postgres, redisops, shard_map
from igops.errors import IgopsError, UsageError
from igops.output import plural

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet


@dataclass
class RedisNode:
    name: str
    address: str
    role: str  # 'master', 'replica' or 'unknown' (not answering)
    state: str  # 'running', 'down', 'hung'
    offset: int | None = None
    lag_bytes: int | None = None  # behind the app's master
    master: str | None = None  # a replica's master, by name
    link: str | None = None  # 'up' or 'down (N s)'
    priority: int | None = None
    read_only: bool | None = None
    app_master: bool = False  # the directory names it: the app writes here
    detail: str | None = None


@dataclass
class RedisState:
    nodes: list[RedisNode]
    app_master: str | None  # by name, from the directory's redis_master endpoint
    app_address: str | None
    endpoint_version: int | None
    problems: list[str] = field(default_factory=list)

    def node(self, name: str) -> RedisNode:
        return next(node for node in self.nodes if node.name == name)


@dataclass
class RedisView:
    fleet: Any
    states: dict[str, redisops.NodeState | None]
    down: dict[str, postgres.Unavailable]
    state: RedisState

    def masters(self) -> list[str]:
        return [name for name, node in self.states.items() if node and node.role == "master"]


def redis_members(fleet: Fleet) -> list[str]:
    redis = fleet.model.redis
    if not redis.master:
        raise UsageError("the inventory has no Redis nodes", "set [redis] master and replicas")
    return [redis.master, *redis.replicas]


def redis_address(fleet: Fleet, name: str) -> str:
    return f"{fleet.host(name).address}:{fleet.model.redis.port}"


def directory_connection(fleet: Fleet) -> Connection:
    """The directory, where the app reads which Redis is the master; a statement that hangs
    (a directory primary stopping) fails after 10 s rather than holding a switchover."""
    return shard_map.directory_connection(fleet, purpose="failover", settings={"statement_timeout": "10s"})


def redis_view(fleet: Fleet) -> RedisView:
    members = redis_members(fleet)

    def endpoint() -> tuple[str | None, int | None, str | None]:
        try:
            connection = directory_connection(fleet)
        except IgopsError as exc:
            return None, None, exc.one_line()
        try:
            return (*redisops.read_endpoint(connection), None)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="redis-probe") as pool:
        endpoint_future = pool.submit(endpoint)
        probed = list(pool.map(lambda name: redisops.probe(fleet, name), members))
        address, version, directory_error = endpoint_future.result()
    states = {name: state for name, state, _ in probed}
    down = {name: error for name, _, error in probed if error}
    return RedisView(fleet, states, down, redis_state_of(fleet, states, down, address, version, directory_error))


def redis_state_of(
    fleet: Fleet,
    states: dict[str, redisops.NodeState | None],
    down: dict[str, postgres.Unavailable],
    address: str | None,
    version: int | None,
    directory_error: str | None,
) -> RedisState:
    """The Redis tier from what each node said of itself (None and an entry in `down` for one
    that did not answer) and the directory's redis_master endpoint (or why it could not be read)."""
    members = redis_members(fleet)
    by_address: dict[str | None, str] = {redis_address(fleet, name): name for name in members}
    app_master = by_address.get(address) if address else None
    nodes = []
    for name in members:
        node_state = states.get(name)
        node = RedisNode(name, redis_address(fleet, name), "unknown", "running", app_master=name == app_master)
        if node_state is None:
            node.state = "hung" if down[name].kind == "timeout" else "down"
            node.detail = down[name].detail
        else:
            node.role = node_state.role
            node.offset = node_state.offset
            node.priority = node_state.priority
            if node_state.role == "replica":
                node.master = by_address.get(node_state.master_address, node_state.master_address)
                node.link = (
                    "up"
                    if node_state.link_up
                    else "down"
                    if node_state.link_down_s is None
                    else f"down ({node_state.link_down_s} s)"
                )
                node.read_only = node_state.read_only
        nodes.append(node)
    reference = states.get(app_master) if app_master else None
    for node in nodes:
        if reference and reference.role == "master" and node.offset is not None and node.name != app_master:
            node.lag_bytes = max(0, reference.offset - node.offset)
    state = RedisState(nodes, app_master, address, version)
    state.problems = _redis_problems(fleet, state, directory_error)
    return state


def _redis_problems(fleet: Fleet, state: RedisState, directory_error: str | None) -> list[str]:
    problems = []
    masters = [node.name for node in state.nodes if node.role == "master"]
    if directory_error:
        problems.append(directory_error)
    elif state.app_address is None:
        problems.append("the directory names no Redis master")
    elif state.app_master is None:
        problems.append(f"the directory's Redis master {state.app_address} is not a Redis node of the inventory")
    elif state.node(state.app_master).role != "master":
        problems.append(
            f"the app writes to {state.app_master}, which is "
            + ("down" if state.node(state.app_master).role == "unknown" else "a replica")
        )
    if len(masters) > 1:
        problems.append(
            f"{plural(len(masters), 'master')}: {', '.join(masters)}"
            + (f" (the app uses {state.app_master})" if state.app_master in masters else "")
        )
    for node in state.nodes:
        if node.role == "unknown":
            problems.append(f"{node.name}: {node.state}")
        elif node.role == "replica":
            if state.app_master and node.master != state.app_master:
                problems.append(f"{node.name} replicates from {node.master}, not {state.app_master}")
            if node.link != "up":
                problems.append(f"{node.name}'s link to {node.master} is {node.link}")
            if node.read_only is False:
                problems.append(f"{node.name} is a replica that accepts writes (replica-read-only no)")
            if node.lag_bytes and node.lag_bytes > fleet.model.redis.max_lag_bytes:
                problems.append(f"{node.name} lags {node.lag_bytes} bytes")
    return problems


def redis_status(fleet: Fleet) -> RedisState:
    return redis_view(fleet).state
