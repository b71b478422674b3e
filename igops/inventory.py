"""The fleet inventory: TOML in, a validated and typed fleet out.

Every problem in an inventory is collected and reported together, each with where it is and
how to fix it, so an operator fixes a broken file in one pass. Secrets never live here: see
`igops.secrets`.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops.errors import ConfigError, ConfigProblem, validation_words
from igops.inventory_rules import ROLES, InvalidValue

if TYPE_CHECKING:  # the models import pydantic, which the CLI's start-up never does
    from pydantic_core import ErrorDetails

    from igops.inventory_model import Host, Inventory

DEFAULT_CONFIG_PATH = Path("/etc/igops/igops.toml")
CONFIG_ENV = "IGOPS_CONFIG"

SECRET_KEY_PATTERN = re.compile(r"(password|passwd|secret|token|routing_key|api_key)", re.I)
PATH_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Fleet:
    """A validated inventory and the file it came from."""

    source: Path
    model: Inventory  # validated: igops.inventory_model
    hosts_by_name: dict[str, Host] = field(repr=False)

    @property
    def hosts(self) -> list[Host]:
        return list(self.model.hosts)

    def host(self, name: str) -> Host:
        from igops.errors import UsageError

        try:
            return self.hosts_by_name[name]
        except KeyError:
            raise UsageError(
                f"unknown host {name!r}",
                unknown_name_hint(
                    name, list(self.hosts_by_name), f"hosts in {self.source}", "`igops hosts` lists them"
                ),
            ) from None

    def with_role(self, role: str) -> list[Host]:
        return [host for host in self.model.hosts if role in host.roles]

    @property
    def directory_cluster(self) -> str | None:
        """The Postgres cluster whose primary holds the directory database (the shard map, the
        move journal, the clusters' PgBouncer names): [shards] directory_cluster, else the
        inventory's first cluster; None when it has none."""
        return self.model.shards.directory_cluster or next(iter(self.model.postgres.clusters), None)

    def select(
        self, roles: list[str] | None = None, names: list[str] | None = None, pattern: str | None = None
    ) -> list[Host]:
        """Hosts matching any of the roles and names (all hosts when neither is given),
        then filtered by a shell-style name pattern; inventory order is kept."""
        import fnmatch

        from igops.errors import UsageError

        for role in roles or []:
            if role not in ROLES:
                raise UsageError(f"unknown role {role!r}", unknown_name_hint(role, list(ROLES), "roles are"))
        chosen = {self.host(name).name for name in names or []}
        selected = [
            host
            for host in self.model.hosts
            if (not roles and not names) or host.name in chosen or any(role in host.roles for role in roles or [])
        ]
        if pattern:
            selected = [host for host in selected if fnmatch.fnmatchcase(host.name, pattern)]
        return selected

    def ssh_user(self, host: Host) -> str:
        return host.ssh_user or self.model.ssh.user

    def ssh_port(self, host: Host) -> int:
        return host.ssh_port or self.model.ssh.port

    def path_for(self, template: str, host: Host) -> str:
        """Fill a per-host path template: `{host}` is the host's name."""
        return template.replace("{host}", host.name)

    @property
    def state_dir(self) -> Path:
        configured = os.environ.get("IGOPS_STATE_DIR") or self.model.fleet.state_dir
        if configured:
            return Path(configured).expanduser()
        if os.geteuid() == 0:
            return Path("/var/lib/igops")
        return Path("~/.local/state/igops").expanduser()

    def resolve(self, path: str) -> Path:
        """A path from the inventory, relative to the inventory file's directory."""
        return _relative_to(self.source, path)


def find_config(explicit: str | None) -> Path:
    """--config, then $IGOPS_CONFIG, then /etc/igops/igops.toml."""
    from igops.errors import UsageError

    if explicit:
        path, how = Path(explicit), "--config"
    elif os.environ.get(CONFIG_ENV):
        path, how = Path(os.environ[CONFIG_ENV]), f"${CONFIG_ENV}"
    else:
        path, how = DEFAULT_CONFIG_PATH, "the default path"
    path = path.expanduser()
    if not path.is_file():
        raise UsageError(
            f"inventory not found: {path} (from {how})",
            f"pass --config FILE, set {CONFIG_ENV}, or create {DEFAULT_CONFIG_PATH}",
        )
    return path


def load(explicit: str | None = None) -> Fleet:
    return load_file(find_config(explicit))


def load_file(path: Path) -> Fleet:
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("TOML", str(exc), "fix the syntax at that line")]) from None
    except OSError as exc:
        raise ConfigError(
            source, [ConfigProblem("file", exc.strerror or str(exc), "check the path and its permissions")]
        ) from None
    return validate(raw, path)


def unknown_name_hint(name: str, known: list[str], listing: str, where_all: str | None = None) -> str:
    """The hint for an unknown name: the close ones ("did you mean 'db1'?") when there are any,
    else the names themselves, or where to find them when there are too many to read."""
    import difflib

    # What a person misreads or mistypes alike: l and 1, o and 0, a number's leading zeros.
    close = [candidate for candidate in known if _lookalike(candidate) == _lookalike(name)]
    close = close or difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(candidate) for candidate in close) + "?"
    if where_all and len(known) > 12:
        return f"{len(known)} {listing}: {where_all}"
    return f"{listing}: {', '.join(sorted(known)) or 'none'}"


def _lookalike(name: str) -> str:
    import re

    return re.sub(r"(?<!\d)0+(?=\d)", "", name.lower().translate(str.maketrans("lio", "110")))


def validate(raw: dict[str, Any], path: Path) -> Fleet:
    from pydantic import ValidationError

    problems = _secret_keys(raw)
    model: Inventory | None
    try:
        from igops.inventory_model import Inventory

        model = Inventory.model_validate(raw)
    except ValidationError as exc:
        model = None
        problems += [_describe(error, raw) for error in exc.errors() if not _is_secret_key_error(error)]
    problems += _cross_check(raw)
    if problems:
        raise ConfigError(str(path), problems)
    # A failed validation always leaves a problem: each of its errors is described above or,
    # for a secret's key, reported by _secret_keys.
    assert model is not None
    source = path.resolve()
    if model.secrets.file:
        # Like known_hosts, a relative secrets file is the inventory's neighbour, wherever igops
        # runs from. Resolved here, so that every reader of the model gets the same file.
        secrets_file = str(_relative_to(source, model.secrets.file))
        model = model.model_copy(update={"secrets": model.secrets.model_copy(update={"file": secrets_file})})
    return Fleet(source, model, {host.name: host for host in model.hosts})


def _relative_to(source: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else source.parent / candidate


def _secret_keys(raw: Any, where: str = "") -> list[ConfigProblem]:
    found: list[ConfigProblem] = []
    # Only tables and arrays are walked into, and a key's place is spelt out only where it is
    # reported: a fleet's inventory has tens of thousands of plain values and a few dozen key names.
    if isinstance(raw, dict):
        for key, value in raw.items():
            nested = isinstance(value, (dict, list))
            if not nested and _names_a_secret(key):
                found.append(
                    ConfigProblem(
                        f"{where}.{key}" if where else key,
                        "a secret in the inventory",
                        "remove it; secrets come from the environment (IGOPS_*) or the 0600 secrets file "
                        "named by [secrets] file",
                    )
                )
            elif nested:
                found += _secret_keys(value, f"{where}.{key}" if where else key)
    elif isinstance(raw, list):
        for index, item in enumerate(raw):
            if isinstance(item, (dict, list)):
                found += _secret_keys(item, f"{where}[{index}]")
    return found


@functools.lru_cache(maxsize=1024)
def _names_a_secret(key: str) -> bool:
    return bool(SECRET_KEY_PATTERN.search(key))


def _is_secret_key_error(error: ErrorDetails) -> bool:
    """An unknown key that _secret_keys reports as a secret (a value that is not a table or an
    array), so it is reported once."""
    return (
        error["type"] == "extra_forbidden"
        and _names_a_secret(str(error["loc"][-1]))
        and not isinstance(error["input"], (dict, list))
    )


def _location(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(item, int):
            name = (
                node[item].get("name")
                if isinstance(node, list) and item < len(node) and isinstance(node[item], dict)
                else None
            )
            parts[-1] += f"[{item}]" + (f" ({name})" if name else "")
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "top level"


def _describe(error: ErrorDetails, raw: dict[str, Any]) -> ConfigProblem:
    where = _location(error["loc"], raw)
    kind = error["type"]
    if kind == "missing":
        return ConfigProblem(where, "required key is missing", f"add {error['loc'][-1]} = …")
    if kind == "extra_forbidden":
        return ConfigProblem(where, "unknown key", "remove it or fix its spelling (see the README's config reference)")
    if kind == "string_pattern_mismatch" and error["loc"][-1] == "name":
        return ConfigProblem(where, f"bad host name {error['input']!r}", "use lowercase letters, digits and dashes")
    if kind.startswith("ip_") or "ip" in kind:
        return ConfigProblem(where, f"{error['input']!r} is not an IP address", "use an IPv4 or IPv6 address")
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidValue):
        return ConfigProblem(where, cause.problem, cause.fix)
    message = validation_words(dict(error)) or error["msg"].removeprefix("Value error, ")
    return ConfigProblem(where, message, "correct the value")


def _cross_check(raw: dict[str, Any]) -> list[ConfigProblem]:
    """Checks across sections. They read the raw document, not the model, so they still run
    (and their findings are still reported) when some field failed validation."""
    problems: list[ConfigProblem] = []

    def section(name: str) -> dict[str, Any]:
        return raw[name] if isinstance(raw.get(name), dict) else {}

    def strings(value: Any) -> list[str]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    ssh_port = section("ssh").get("port", 22)
    raw_hosts = [h for h in raw.get("hosts", []) if isinstance(h, dict)] if isinstance(raw.get("hosts"), list) else []
    hosts: dict[str, dict[str, Any]] = {}
    endpoints: dict[tuple[str, Any], str] = {}
    for index, host in enumerate(raw_hosts):
        name = str(host.get("name", f"#{index}"))
        where = f"hosts[{index}] ({name})"
        if name in hosts:
            problems.append(ConfigProblem(where, f"duplicate host name {name!r}", "give every host a unique name"))
        hosts.setdefault(name, host)
        endpoint = (str(host.get("address")), host.get("ssh_port") or ssh_port)
        if endpoint[0] != "None" and endpoint in endpoints:
            problems.append(
                ConfigProblem(
                    where,
                    f"address {endpoint[0]} (SSH port {endpoint[1]}) is also {endpoints[endpoint]}'s",
                    "give every host its own address",
                )
            )
        endpoints.setdefault(endpoint, name)
        for role in strings(host.get("roles")):
            if role not in ROLES:
                problems.append(
                    ConfigProblem(f"{where}.roles", f"unknown role {role!r}", f"use one of: {', '.join(ROLES)}")
                )
        mounts = (
            [m.get("path") for m in host.get("mounts", []) if isinstance(m, dict)]
            if isinstance(host.get("mounts"), list)
            else []
        )
        if "/" in mounts:
            problems.append(
                ConfigProblem(
                    f"{where}.mounts",
                    "/ cannot be a data mount",
                    "list only data filesystems; the root is never frozen",
                )
            )
        for path in {path for path in mounts if mounts.count(path) > 1}:
            problems.append(ConfigProblem(f"{where}.mounts", f"mount {path} listed twice", "list each mount once"))

    def member(where: str, name: str, role: str) -> None:
        if name not in hosts:
            problems.append(
                ConfigProblem(where, f"names undefined host {name!r}", "define it under [[hosts]] or fix the name")
            )
        elif role not in strings(hosts[name].get("roles")):
            problems.append(
                ConfigProblem(where, f"host {name!r} lacks the {role!r} role", f"add {role!r} to its roles")
            )

    clustered: dict[str, str] = {}
    clusters = section("postgres").get("clusters", {})
    for cluster_name, cluster in clusters.items() if isinstance(clusters, dict) else []:
        if not isinstance(cluster, dict):
            continue
        where = f"postgres.clusters.{cluster_name}"
        primary = cluster.get("primary")
        for name in ([primary] if isinstance(primary, str) else []) + strings(cluster.get("standbys")):
            member(where, name, "postgres")
            if name in clustered:
                what = "primary" if name == primary else "standby"
                problems.append(
                    ConfigProblem(
                        where,
                        f"{what} {name!r} is already in cluster {clustered[name]!r}"
                        if clustered[name] != cluster_name
                        else f"{name!r} is listed twice",
                        "a server belongs to one cluster, once",
                    )
                )
            clustered.setdefault(name, cluster_name)
    for name, host in hosts.items():
        if "postgres" in strings(host.get("roles")) and name not in clustered:
            problems.append(
                ConfigProblem(
                    f"host {name}",
                    "has role 'postgres' but is in no cluster",
                    "add it to a [postgres.clusters.*] primary or standbys",
                )
            )

    redis = section("redis")
    master = redis.get("master") if isinstance(redis.get("master"), str) else None
    redis_members = ([master] if master else []) + strings(redis.get("replicas"))
    for name in redis_members:
        member("redis", name, "redis")
    if len(set(redis_members)) != len(redis_members):
        problems.append(ConfigProblem("redis", "a node is listed twice", "list each node once"))
    for name, host in hosts.items():
        if "redis" in strings(host.get("roles")) and name not in redis_members:
            problems.append(
                ConfigProblem(
                    f"host {name}",
                    "has role 'redis' but is not in [redis]",
                    "set it as redis.master or add it to redis.replicas",
                )
            )
    if redis_members and not master:
        problems.append(ConfigProblem("redis", "replicas without a master", "set redis.master"))

    problems += _snapshot_policy_names(
        section("snapshot"), hosts, clusters if isinstance(clusters, dict) else {}, clustered, set(redis_members)
    )

    directory_cluster = section("shards").get("directory_cluster")
    if isinstance(directory_cluster, str) and directory_cluster not in (clusters if isinstance(clusters, dict) else {}):
        problems.append(
            ConfigProblem(
                "shards.directory_cluster",
                f"names undefined cluster {directory_cluster!r}",
                "name one of the [postgres.clusters.*] entries",
            )
        )

    for where, template in [
        ("postgres.data_directory", section("postgres").get("data_directory")),
        ("postgres.repmgr_config", section("postgres").get("repmgr_config")),
        ("postgres.socket_dir", section("postgres").get("socket_dir")),
        ("app.root", section("app").get("root")),
        ("app.reload_command", section("app").get("reload_command")),
        ("lb.access_log", section("lb").get("access_log")),
        ("munin.plugin_dir", section("munin").get("plugin_dir")),
        ("munin.plugin_conf_dir", section("munin").get("plugin_conf_dir")),
        ("munin.restart_command", section("munin").get("restart_command")),
        ("munin.plugin_library", section("munin").get("plugin_library")),
        ("redis.config_file", section("redis").get("config_file")),
    ]:
        unknown = {
            name for name in PATH_PLACEHOLDER.findall(template if isinstance(template, str) else "") if name != "host"
        }
        if unknown:
            problems.append(
                ConfigProblem(where, f"unknown placeholder {{{sorted(unknown)[0]}}}", "the only placeholder is {host}")
            )
    return problems


def _snapshot_policy_names(
    snapshot: dict[str, Any],
    hosts: dict[str, dict[str, Any]],
    clusters: dict[str, Any],
    clustered: dict[str, str],
    redis_members: set[str],
) -> list[ConfigProblem]:
    """A policy table must name something igops snapshots as one set of data: a Postgres
    cluster, the Redis set, or a host with data mounts in neither."""
    problems = []
    named: dict[str, Any] = snapshot["clusters"] if isinstance(snapshot.get("clusters"), dict) else {}
    for name in named:
        if name not in clusters:
            problems.append(
                ConfigProblem(
                    f"snapshot.clusters.{name}",
                    f"names undefined cluster {name!r}",
                    unknown_name_hint(name, list(clusters), "clusters are"),
                )
            )
    if isinstance(snapshot.get("redis"), dict) and not redis_members:
        problems.append(
            ConfigProblem(
                "snapshot.redis",
                "a policy for the Redis set, but [redis] names no master",
                "set redis.master, or remove [snapshot.redis]",
            )
        )
    named = snapshot["hosts"] if isinstance(snapshot.get("hosts"), dict) else {}
    for name in named:
        where = f"snapshot.hosts.{name}"
        if name not in hosts:
            problems.append(
                ConfigProblem(
                    where, f"names undefined host {name!r}", unknown_name_hint(name, list(hosts), "hosts are")
                )
            )
        elif name in clustered:
            problems.append(
                ConfigProblem(
                    where,
                    f"{name} is a member of Postgres cluster {clustered[name]!r}, which is snapshotted as one",
                    f"set its policy under [snapshot.clusters.{clustered[name]}]",
                )
            )
        elif name in redis_members:
            problems.append(
                ConfigProblem(
                    where,
                    f"{name} is in the Redis set, which is snapshotted as one",
                    "set its policy under [snapshot.redis]",
                )
            )
        elif not hosts[name].get("mounts"):
            problems.append(
                ConfigProblem(
                    where,
                    f"host {name} has no data mounts: there is nothing to snapshot",
                    "list its [[hosts.mounts]], or remove the policy",
                )
            )
    return problems
