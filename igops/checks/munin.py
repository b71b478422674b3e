"""Munin: igops' plugins installed on hosts, and a client for munin-node's protocol (port 4949).

`install` puts the plugin script in the host's plugin library, links it into the plugin
directory once per service the host runs, writes the plugins' settings to the plugin-conf
directory and restarts munin-node (which reads both only at start) — all over one SSH session
per host, and only what differs, so a second run changes nothing and restarts nothing.
"""

from __future__ import annotations

import builtins
import fnmatch
import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from igops import remote
from igops.errors import NagiosStatus, RemoteError, UsageError

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

PLUGIN_SCRIPT = "igops_"
ROLE_PLUGINS = {
    "app": "igops_app",
    "postgres": "igops_postgres",
    "redis": "igops_redis",
    "pgbouncer": "igops_pgbouncer",
}
CONF_NAME = "igops"
RESTART_TIMEOUT = 60.0
# A rate is computed from the previous sample only if it is this recent.
MAX_SAMPLE_AGE = 900.0


# --- the node protocol ------------------------------------------------------------------------


class NodeError(Exception):
    pass


class NodeClient:
    """One connection to a munin-node. Every read is under `timeout`."""

    def __init__(self, address: str, port: int, timeout: float = 5.0):
        self.address, self.port, self.timeout = address, port, timeout
        try:
            self._sock = socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            raise NodeError(f"munin-node at {address}:{port} is not answering: {exc.strerror or exc}") from None
        self._reader = self._sock.makefile("rb")
        banner = self._line()
        if not banner.startswith("# munin node at "):
            self.close()
            raise NodeError(f"{address}:{port} is not a munin-node (said {banner[:80]!r})")
        self.node_name = banner.removeprefix("# munin node at ").strip()
        self.capabilities: set[str] = set()

    def _line(self) -> str:
        try:
            raw = self._reader.readline()
        except OSError as exc:
            raise NodeError(f"munin-node at {self.address}:{self.port}: {exc}") from None
        if not raw:
            raise NodeError(f"munin-node at {self.address}:{self.port} closed the connection")
        return raw.decode(errors="replace").rstrip("\n")

    def _send(self, command: str) -> None:
        try:
            self._sock.sendall(command.encode() + b"\n")
        except OSError as exc:
            raise NodeError(f"munin-node at {self.address}:{self.port}: {exc}") from None

    def _block(self) -> list[str]:
        lines = []
        while (line := self._line()) != ".":
            lines.append(line)
        return lines

    def cap(self, wanted: list[str]) -> set[str]:
        self._send("cap " + " ".join(wanted))
        self.capabilities = set(self._line().split()[1:])
        return self.capabilities

    def list(self, node: str | None = None) -> list[str]:
        self._send("list" + (f" {node}" if node else ""))
        return self._line().split()

    def version(self) -> str:
        self._send("version")
        return self._line().rsplit("version:", 1)[-1].strip()

    def config(self, plugin: str) -> builtins.list[str]:
        self._send(f"config {plugin}")
        return self._block()

    def fetch(self, plugin: str) -> builtins.list[str]:
        self._send(f"fetch {plugin}")
        return self._block()

    def close(self) -> None:
        try:
            self._sock.sendall(b"quit\n")
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def config_and_values(node: NodeClient, plugin: str, dirty: bool) -> tuple[list[str], list[str]]:
    """A plugin's config and values; one run of it when it sends values with its config."""
    config = node.config(plugin)
    if dirty and any(".value " in line for line in config):
        return config, []
    return config, node.fetch(plugin)


@dataclass
class Field:
    graph: str
    name: str
    label: str | None = None
    type: str = "GAUGE"
    warning: str | None = None
    critical: str | None = None
    value: float | None = None  # None: unknown (U) or not fetched

    @property
    def path(self) -> str:
        return f"{self.graph}.{self.name}"


def parse(plugin: str, config: list[str], values: list[str]) -> tuple[list[Field], list[str]]:
    """Fields of a plugin's graphs (multigraph or not) from its config and fetch output, and the
    node's complaints about the plugin ('# Bad exit', '# Timeout', '# Unknown service')."""
    fields: dict[tuple[str, str], Field] = {}
    complaints: list[str] = []

    def walk(lines: list[str], apply: Callable[[Field, str, str], None]) -> None:
        graph = plugin
        for line in lines:
            if line.startswith("#"):
                text = line.lstrip("# ").strip()
                if text and text not in complaints:
                    complaints.append(text)
                continue
            if line.startswith("multigraph "):
                graph = line.split(None, 1)[1].strip()
                continue
            key, _, rest = line.partition(" ")
            name, dot, attribute = key.partition(".")
            if dot and not name.startswith("graph_"):
                entry = fields.setdefault((graph, name), Field(graph, name))
                apply(entry, attribute, rest.strip())

    def from_config(entry: Field, attribute: str, value: str) -> None:
        if attribute in ("label", "type", "warning", "critical"):
            setattr(entry, attribute, value)
        elif attribute == "value":
            from_fetch(entry, attribute, value)

    def from_fetch(entry: Field, attribute: str, value: str) -> None:
        if attribute == "value":
            try:
                entry.value = None if value == "U" else float(value.split(":")[-1])
            except ValueError:
                entry.value = None

    walk(config, from_config)
    walk(values, from_fetch)
    return list(fields.values()), complaints


def parse_range(text: str | None) -> tuple[float | None, float | None] | None:
    """A Munin limit: 'max', 'min:max', 'min:' or ':max'."""
    if not text:
        return None
    low, colon, high = text.partition(":")
    try:
        if not colon:
            return None, float(low)
        return (float(low) if low.strip() else None), (float(high) if high.strip() else None)
    except ValueError:
        return None


def outside(value: float, bounds: tuple[float | None, float | None] | None) -> bool:
    if bounds is None:
        return False
    low, high = bounds
    return (low is not None and value < low) or (high is not None and value > high)


@dataclass
class Judged:
    field: Field
    status: NagiosStatus
    value: float | None  # the value limits apply to: the per-second rate for DERIVE/COUNTER

    def describe(self) -> str:
        limit = self.field.critical if self.status == NagiosStatus.CRITICAL else self.field.warning
        shown = "unknown" if self.value is None else f"{self.value:g}"
        rate = "/s" if self.field.type in ("DERIVE", "COUNTER") else ""
        return f"{self.field.path} = {shown}{rate} (limit {limit})"


class Samples:
    """Previous counter samples per (host, field), so DERIVE limits apply to a rate."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.previous: dict[str, list[float]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.previous = {}
        self.current: dict[str, list[float]] = {}

    def rate(self, host: str, entry: Field, value: float, now: float) -> float | None:
        key = f"{host} {entry.path}"
        self.current[key] = [value, now]
        before = self.previous.get(key)
        if not before or not 0 < now - before[1] <= MAX_SAMPLE_AGE or value < before[0]:
            return None
        return (value - before[0]) / (now - before[1])

    def save(self) -> None:
        newest = max((sample[1] for sample in self.current.values()), default=time.time())
        # Samples of hosts and fields no longer checked age out instead of piling up.
        merged = {
            key: sample for key, sample in {**self.previous, **self.current}.items() if newest - sample[1] <= 24 * 3600
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(merged))
        temporary.replace(self.path)


def judge(host: str, fields: list[Field], samples: Samples | None, now: float) -> list[Judged]:
    judged = []
    for entry in fields:
        value = entry.value
        if value is not None and entry.type in ("DERIVE", "COUNTER"):
            value = samples.rate(host, entry, value, now) if samples else None
        if value is None:
            status = NagiosStatus.OK
        elif outside(value, parse_range(entry.critical)):
            status = NagiosStatus.CRITICAL
        elif outside(value, parse_range(entry.warning)):
            status = NagiosStatus.WARNING
        else:
            status = NagiosStatus.OK
        judged.append(Judged(entry, status, value))
    return judged


def wanted(plugins: list[str], patterns: list[str]) -> list[str]:
    return [plugin for plugin in plugins if any(fnmatch.fnmatchcase(plugin, pattern) for pattern in patterns)]


# --- install ----------------------------------------------------------------------------------


@dataclass
class HostInstall:
    host: str
    plugins: list[str]
    library: str
    plugin_dir: str
    conf_path: str
    restart: str
    conf: str = field(repr=False)

    def steps(self) -> list[str]:
        return [
            f"{self.host}: put {PLUGIN_SCRIPT} in {self.library}; link {', '.join(self.plugins)} "
            f"into {self.plugin_dir}; write {self.conf_path} (mode 0600); "
            f"if anything changed, restart munin-node (`{self.restart}`)"
        ]


@dataclass
class InstallResult:
    host: str
    plugins: list[str]
    changed: list[str]
    restarted: bool
    listed: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and set(self.plugins) <= set(self.listed)


def plugin_source() -> bytes:
    return resources.files("igops").joinpath("munin_plugins", PLUGIN_SCRIPT).read_bytes()


def plugins_for(host: Host) -> list[str]:
    return [ROLE_PLUGINS[role] for role in host.roles if role in ROLE_PLUGINS]


def plugin_conf(fleet: Fleet, host: Host) -> str:
    """The plugins' settings for one host, from the inventory (and the secrets file for the
    PgBouncer and Redis passwords: the file is written 0600, as munin-node expects)."""
    from igops.secrets import Secrets

    model, address = fleet.model, str(host.address)
    secrets = Secrets(model.secrets.file)
    check = model.check
    lag = [
        f"env.lag_warning {check.replication_lag_warning_bytes}",
        f"env.lag_critical {check.replication_lag_critical_bytes}",
    ]
    sections = {
        "app": ["env.url " + f"http://{_url_host(address)}:{model.app.port}/stats"],
        "postgres": [
            f"user {model.postgres.os_user}",
            f"env.psql {model.postgres.bin_dir}/psql",
            f"env.PGHOST {fleet.path_for(model.postgres.socket_dir, host)}",
            f"env.PGPORT {model.postgres.port}",
            "env.PGDATABASE postgres",
            *lag,
        ],
        "redis": [f"env.host {address}", f"env.port {model.redis.port}", *lag]
        + ([f"env.password {secrets.get('redis_password')}"] if secrets.get("redis_password") else []),
        "pgbouncer": [
            f"env.PGHOST {address}",
            f"env.PGPORT {model.pgbouncer.port}",
            f"env.PGUSER {model.pgbouncer.admin_user}",
            f"env.maxwait_warning {check.pgbouncer_wait_warning_seconds:g}",
            f"env.maxwait_critical {check.pgbouncer_wait_critical_seconds:g}",
        ]
        + ([f"env.PGPASSWORD {secrets.get('pgbouncer_password')}"] if secrets.get("pgbouncer_password") else []),
    }
    text = f"# Written by `igops munin install` for {host.name}; changes here are overwritten.\n"
    for role in host.roles:
        if role in ROLE_PLUGINS:
            text += f"\n[{ROLE_PLUGINS[role]}]\n" + "".join(line + "\n" for line in sections[role])
    return text


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def plan_install(fleet: Fleet, roles: list[str] | None) -> list[HostInstall]:
    hosts = [host for host in fleet.select(roles=roles) if "munin" in host.roles and plugins_for(host)]
    if not hosts:
        raise UsageError(
            "no selected host runs munin-node and a service igops has plugins for",
            f"services with plugins: {', '.join(ROLE_PLUGINS)}; hosts need the 'munin' role",
        )
    munin = fleet.model.munin
    return [
        HostInstall(
            host.name,
            plugins_for(host),
            fleet.path_for(munin.plugin_library, host),
            fleet.path_for(munin.plugin_dir, host),
            f"{fleet.path_for(munin.plugin_conf_dir, host)}/{CONF_NAME}",
            fleet.path_for(munin.restart_command, host),
            plugin_conf(fleet, host),
        )
        for host in hosts
    ]


def install(
    fleet: Fleet,
    plan: list[HostInstall],
    always_restart: bool = False,
    on_done: Callable[[InstallResult], None] | None = None,
) -> list[InstallResult]:
    from igops import agent

    command, program_prefix = agent.invocation("muninsetup", [])
    script = plugin_source().decode()
    settings = remote.settings_for(fleet)

    def one(item: HostInstall) -> InstallResult:
        # The settings may hold passwords: they travel on stdin, never on a command line.
        request = json.dumps(
            {
                "library": item.library,
                "plugin_dir": item.plugin_dir,
                "conf_path": item.conf_path,
                "files": {PLUGIN_SCRIPT: script},
                "links": {plugin: PLUGIN_SCRIPT for plugin in item.plugins},
                "conf": item.conf,
                "restart": item.restart,
                "restart_timeout": RESTART_TIMEOUT,
                "always_restart": always_restart,
            }
        )
        stdin = program_prefix + request.encode()
        [result] = remote.run(
            remote.targets_for(fleet, [fleet.host(item.host)]),
            command,
            settings,
            stdin=stdin,
            timeout=RESTART_TIMEOUT + 30,
        )
        if result.ok:
            answer = json.loads(result.stdout)
            installed = InstallResult(
                item.host, item.plugins, answer["changed"], answer["restarted"], error=answer.get("error")
            )
            if installed.error is None:
                installed.listed, installed.error = _listed(fleet, fleet.host(item.host), item.plugins)
        else:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            installed = InstallResult(
                item.host,
                item.plugins,
                [],
                False,
                error=result.error or (lines[-1] if lines else f"exit {result.exit_code}"),
            )
        if on_done:
            on_done(installed)
        return installed

    with ThreadPoolExecutor(max_workers=max(1, min(settings.parallel, len(plan)))) as pool:
        return list(pool.map(one, plan))


def _listed(fleet: Fleet, host: Host, plugins: list[str]) -> tuple[list[str], str | None]:
    """What the restarted node lists; it may take a moment to come back."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with NodeClient(str(host.address), fleet.model.munin.port) as node:
                # The node hides multigraph plugins from a master that has not said it can read them.
                node.cap(["multigraph"])
                listed = node.list()
            missing = [plugin for plugin in plugins if plugin not in listed]
            if not missing:
                return listed, None
            problem = f"munin-node does not list {', '.join(missing)} after the restart"
        except NodeError as exc:
            listed, problem = [], str(exc)
        if time.monotonic() > deadline:
            return listed, problem
        time.sleep(0.2)


def fetch(fleet: Fleet, host_name: str, plugin: str | None, with_config: bool) -> list[dict[str, Any]]:
    host = fleet.host(host_name)
    try:
        with NodeClient(str(host.address), fleet.model.munin.port) as node:
            node.cap(["multigraph"])
            listed = node.list()
            if plugin and plugin not in listed:
                raise UsageError(
                    f"{host_name}'s munin-node has no plugin {plugin!r}", f"it has: {', '.join(listed) or 'none'}"
                )
            found = []
            for name in [plugin] if plugin else listed:
                config = node.config(name) if with_config else []
                values = node.fetch(name)
                fields, complaints = parse(name, config, values)
                found.append({"plugin": name, "fields": fields, "complaints": complaints})
            return found
    except NodeError as exc:
        raise RemoteError(str(exc), "is munin-node running there? (igops status)") from None
