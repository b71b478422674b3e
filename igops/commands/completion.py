"""Shell completion of the names the inventory holds: hosts, roles, Postgres clusters and their
nodes, Redis nodes and logical shard numbers (`igops --install-completion` turns it on).

A completion runs igops once per TAB, so it must be quick: it reads the inventory's TOML as it
is, without validating it (no pydantic), and never fails. An inventory that cannot be found or
read completes nothing. The inventory is the one the command line names (-c before or after the
command), else $IGOPS_CONFIG, else /etc/igops/igops.toml, as for the command itself.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from igops import inventory
from igops.commands.options import GlobalOptions
from igops.errors import IgopsError

if TYPE_CHECKING:
    from typer._click.core import Context, Parameter

    Completer = Callable[[Context | None, Parameter, str], list[str]]

DEFAULT_SHARD_COUNT = 16  # [shards] count when the inventory does not set it


def read_inventory(ctx: Context | None) -> dict[str, Any]:
    """The inventory's TOML, unvalidated; {} when there is none to read."""
    try:
        path = inventory.find_config(_config_given(ctx))
        return tomllib.loads(path.read_text())
    except (IgopsError, OSError, ValueError):
        return {}


def _config_given(ctx: Context | None) -> str | None:
    """-c after the command (stored in the GlobalOptions by its callback) wins over -c before it."""
    context = ctx
    while context is not None:
        if isinstance(context.obj, GlobalOptions) and context.obj.config:
            return context.obj.config
        context = context.parent
    root = ctx.find_root() if ctx is not None else None
    config: str | None = root.params.get("config") if root is not None else None
    return config


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def host_names(raw: dict[str, Any]) -> list[str]:
    hosts = raw.get("hosts")
    return _strings([host.get("name") for host in hosts if isinstance(host, dict)] if isinstance(hosts, list) else [])


def role_names(raw: dict[str, Any]) -> list[str]:
    """The roles the inventory's hosts have (the ones worth filtering by)."""
    found = raw.get("hosts")
    hosts = found if isinstance(found, list) else []
    return sorted({role for host in hosts if isinstance(host, dict) for role in _strings(host.get("roles"))})


def cluster_names(raw: dict[str, Any]) -> list[str]:
    return list(_table(_table(raw, "postgres"), "clusters"))


def postgres_node_names(raw: dict[str, Any]) -> list[str]:
    """Every member of every Postgres cluster: its primary, then its standbys."""
    names: list[str] = []
    for cluster in _table(_table(raw, "postgres"), "clusters").values():
        if isinstance(cluster, dict):
            names += [
                name
                for name in _strings(cluster.get("primary")) + _strings(cluster.get("standbys"))
                if name not in names
            ]
    return names


def redis_node_names(raw: dict[str, Any]) -> list[str]:
    redis = _table(raw, "redis")
    return _strings(redis.get("master")) + [
        name for name in _strings(redis.get("replicas")) if name not in _strings(redis.get("master"))
    ]


def shard_numbers(raw: dict[str, Any]) -> list[str]:
    """0 to [shards] count - 1 (nothing without an inventory)."""
    if not raw:
        return []
    count = _table(raw, "shards").get("count", DEFAULT_SHARD_COUNT)
    count = count if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= 8192 else 0
    return [str(number) for number in range(count)]


def _completer(names: Callable[[dict[str, Any]], list[str]]) -> Completer:
    def complete(ctx: Context | None, param: Parameter, incomplete: str) -> list[str]:
        return [name for name in names(read_inventory(ctx)) if name.startswith(incomplete)]

    complete.__name__ = f"complete_{names.__name__}"
    return complete


hosts = _completer(host_names)
roles = _completer(role_names)
clusters = _completer(cluster_names)
postgres_nodes = _completer(postgres_node_names)
redis_nodes = _completer(redis_node_names)
shards = _completer(shard_numbers)

# A parameter's completer by its name; "verb:name" wins over the bare name, and None completes
# nothing from the inventory (a path, a revision, a free-form target).
COMPLETERS: dict[str, Completer | None] = {
    "host": hosts,
    "hosts": hosts,
    "pattern": hosts,
    "source": hosts,
    "target": hosts,
    "to": hosts,
    "role": roles,
    "cluster": clusters,
    "against": clusters,
    "shard": shards,
    "shard move:to": clusters,
    "pg switchover:to": postgres_nodes,
    "pg failover:to": postgres_nodes,
    "pg rejoin:node": postgres_nodes,
    "redis switchover:to": redis_nodes,
    "redis failover:to": redis_nodes,
    "redis rejoin:node": redis_nodes,
    "deploy run:source": None,
    "deploy pending:source": None,
    "deploy rollback:to": None,
    "ops history:target": None,
}


def completer_for(verb: str, name: str) -> Completer | None:
    key = f"{verb}:{name}"
    return COMPLETERS[key] if key in COMPLETERS else COMPLETERS.get(name)
