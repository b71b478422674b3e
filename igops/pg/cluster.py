"""A Postgres cluster as igops sees it: its members (from the inventory), what each says of
itself, its host and repmgr's metadata, where PgBouncer routes, and the problems all that
shows, each with the command that resolves it.

Roles are whatever the servers say, never what the inventory says: the inventory names
members, a failover does not rewrite it. `PgView` keeps what was probed for the planners;
`PgClusterState` is its report for people.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import inventory, postgres
from igops.errors import UsageError, first_line
from igops.host_commands import ssh
from igops.pg.hostcmd import POSTMASTER_RUNNING, data_directory, postgres_sh
from igops.pg.timelines import standby_timeline

if TYPE_CHECKING:
    from igops.inventory import Fleet


@dataclass
class PgNode:
    name: str
    address: str
    role: str  # 'primary', 'standby' or 'unknown' (not answering)
    state: str  # 'running', 'stopped', 'hung', 'starting or stopping', 'host unreachable'
    fenced: bool | None = None  # standby.signal on its disk (None: not looked)
    timeline: int | None = None
    lsn: str | None = None  # a primary's insert position
    received_lsn: str | None = None
    replayed_lsn: str | None = None
    lag_bytes: int | None = None  # behind the primary's insert position, in replay
    lag_s: float | None = None
    replay_paused: bool = False
    streaming_from: str | None = None  # the upstream it streams from, by name
    repmgr: str | None = None  # how repmgr's metadata records it
    repmgrd: str | None = None  # 'running', 'paused' or 'not running' (None: the node does not answer)
    pgbouncer: list[str] = field(default_factory=list)  # "pgb1:main" entries that route here
    detail: str | None = None
    # pg_controldata's "Database cluster state" of a member that does not answer: "shut down"
    # is a primary stopped cleanly, "in production" one that crashed.
    control_state: str | None = None


@dataclass
class PgClusterState:
    cluster: str
    nodes: list[PgNode]
    primary: str | None
    pgbouncer: dict[str, dict[str, str]]  # PgBouncer host -> {database -> node it routes to}
    paused: dict[str, list[str]]  # PgBouncer host -> paused databases of this cluster
    problems: list[str] = field(default_factory=list)
    fixes: dict[str, str] = field(default_factory=dict)  # problem -> what resolves it

    def node(self, name: str) -> PgNode:
        return next(node for node in self.nodes if node.name == name)

    def follows_primary(self, node: PgNode) -> bool:
        """Whether `node` follows the primary (see `follows`)."""
        return self.primary is not None and follows(node, self.node(self.primary))


def follows(member: PgNode, primary: PgNode) -> bool:
    """Whether `member` streams from `primary` on the primary's timeline. A fenced old primary
    whose WAL went past the fork connects its walreceiver to the new primary on its own, older
    timeline, is refused, and tries again a few seconds later: for a moment it streams from it."""
    return member.streaming_from == primary.name and member.timeline is not None and member.timeline == primary.timeline


def why_not_following(member: PgNode, primary: PgNode) -> str | None:
    """What keeps `member` from following `primary` (see `follows`), said after its name."""
    if follows(member, primary):
        return None
    if member.streaming_from == primary.name:
        return f"streams from {primary.name} on timeline {member.timeline}, not on its timeline {primary.timeline}"
    return f"does not stream from {primary.name}" + (
        f" (it streams from {member.streaming_from})" if member.streaming_from else ""
    )


@dataclass
class PgProbe:
    """What igops saw of one member: kept beside the report for planning."""

    host: Any
    server: postgres.ServerState | None
    down: postgres.Unavailable | None
    postmaster_running: bool | None = None
    fenced: bool | None = None
    host_reachable: bool | None = None
    repmgrd: str | None = None
    control_state: str | None = None


@dataclass
class PgView:
    fleet: Any
    cluster: str
    probes: dict[str, PgProbe]
    bouncers: dict[str, list[postgres.BouncerDatabase]]  # PgBouncer host -> this cluster's databases
    bouncer_errors: dict[str, str]
    repmgr: list[postgres.RepmgrNode]
    state: PgClusterState | None = None  # the report of the above, for people

    def writable(self) -> list[str]:
        return [name for name, probe in self.probes.items() if probe.server and not probe.server.in_recovery]

    def databases(self) -> dict[str, list[str]]:
        return {
            host: [database.name for database in databases] for host, databases in self.bouncers.items() if databases
        }

    def repmgr_node(self, name: str) -> postgres.RepmgrNode | None:
        return next((node for node in self.repmgr if node.name == name), None)

    def repmgrd_members(self) -> list[str]:
        """Members whose repmgrd runs (paused or not): an operation pauses it on them, so that it
        cannot promote on its own while igops stops a primary or rewinds a node."""
        return [name for name, probe in self.probes.items() if probe.repmgrd in ("running", "paused")]


def cluster_members(fleet: Fleet, cluster: str) -> list[str]:
    clusters = fleet.model.postgres.clusters
    if cluster not in clusters:
        raise UsageError(
            f"unknown Postgres cluster {cluster!r}",
            inventory.unknown_name_hint(cluster, list(clusters), f"clusters in {fleet.source}"),
        )
    return [clusters[cluster].primary, *clusters[cluster].standbys]


def cluster_of(fleet: Fleet, node: str) -> str:
    fleet.host(node)
    for name, cluster in fleet.model.postgres.clusters.items():
        if node == cluster.primary or node in cluster.standbys:
            return name
    raise UsageError(f"{node} is in no Postgres cluster", "see [postgres.clusters.*] in the inventory")


# What a member looks like on its host: is a postmaster running, is the member fenced
# (standby.signal), and what its control file says (a clean shutdown or a crash).
_HOST_CHECK = (
    f'bin="$1"; data="$2"; {POSTMASTER_RUNNING}; echo "postmaster=$?"; '
    'if [ -e "$data/standby.signal" ]; then echo fenced=1; else echo fenced=0; fi; '
    '"$bin/pg_controldata" -D "$data" 2>/dev/null | sed -n "s/^Database cluster state: */control=/p"'
)


def _host_check(fleet: Fleet, probe: PgProbe) -> None:
    result = ssh(
        fleet,
        probe.host,
        postgres_sh(fleet, _HOST_CHECK, fleet.model.postgres.bin_dir, data_directory(fleet, probe.host)),
        timeout=20,
    )
    probe.host_reachable = result.reached
    if result.ok:
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        probe.postmaster_running = values.get("postmaster") == "0"
        probe.fenced = values.get("fenced") == "1"
        probe.control_state = values.get("control", "").strip() or None


def _probe_member(fleet: Fleet, name: str) -> PgProbe:
    host = fleet.host(name)
    try:
        connection = postgres.connect(fleet, host)
    except postgres.Unavailable as down:
        return PgProbe(host, None, down)
    try:
        server = postgres.server_state(connection)
        if server.in_recovery:
            server.timeline = standby_timeline(
                connection, server.timeline, server.receiver_status is not None, wal_received(server)
            )
        return PgProbe(host, server, None)
    except Exception as exc:  # noqa: BLE001 - a server that fails mid-probe is a finding
        return PgProbe(host, None, postgres.Unavailable(name, first_line(exc), "rejected"))
    finally:
        connection.close()


def _probe_repmgrd(fleet: Fleet, probe: PgProbe) -> None:
    try:
        connection = postgres.connect(fleet, probe.host, postgres.REPMGR_DATABASE)
        try:
            probe.repmgrd = postgres.repmgrd_state(connection)
        finally:
            connection.close()
    except Exception:  # noqa: BLE001 - unknown is shown as such
        probe.repmgrd = None


def pg_view(fleet: Fleet, cluster: str) -> PgView:
    members = cluster_members(fleet, cluster)
    bouncer_hosts = fleet.with_role("pgbouncer")
    addresses = {str(fleet.host(name).address): name for name in members} | {name: name for name in members}
    configured = fleet.model.postgres.clusters[cluster].pgbouncer_database

    def bouncer(host: Any) -> tuple[str, list[postgres.BouncerDatabase], str | None]:
        try:
            return (
                host.name,
                [
                    database
                    for database in postgres.Bouncer(fleet, host).databases()
                    if database.host in addresses or database.name == configured
                ],
                None,
            )
        except postgres.Unavailable as exc:
            return host.name, [], exc.detail

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="pg-probe") as pool:
        bouncer_futures = [pool.submit(bouncer, host) for host in bouncer_hosts]
        probes = dict(zip(members, pool.map(lambda name: _probe_member(fleet, name), members), strict=False))
        # Every member: a running primary can carry a fence a switchover cut short left behind.
        list(pool.map(lambda probe: _host_check(fleet, probe), probes.values()))
        list(pool.map(lambda probe: _probe_repmgrd(fleet, probe), [p for p in probes.values() if not p.down]))
        bouncer_results = [future.result() for future in bouncer_futures]
    bouncers = {name: databases for name, databases, _ in bouncer_results}
    bouncer_errors = {name: error for name, _, error in bouncer_results if error}
    repmgr_nodes: list[postgres.RepmgrNode] = []
    answering = sorted(
        (p for p in probes.values() if p.server), key=lambda p: p.server is not None and p.server.in_recovery
    )
    for probe in answering:
        try:
            connection = postgres.connect(fleet, probe.host, postgres.REPMGR_DATABASE)
            try:
                repmgr_nodes = postgres.repmgr_nodes(connection)
            finally:
                connection.close()
            break
        except Exception:  # noqa: BLE001 - repmgr's view is shown when available
            continue
    view = PgView(fleet, cluster, probes, bouncers, bouncer_errors, repmgr_nodes)
    view.state = _pg_report(view, addresses)
    return view


def _pg_report(view: PgView, addresses: dict[str, str]) -> PgClusterState:
    fleet = view.fleet
    writable = view.writable()
    primary = writable[0] if len(writable) == 1 else None
    primary_server = view.probes[primary].server if primary else None
    by_id: dict[int | None, postgres.RepmgrNode] = {node.node_id: node for node in view.repmgr}
    routes: dict[str, dict[str, str]] = {}
    paused: dict[str, list[str]] = {}
    for bouncer_host, databases in view.bouncers.items():
        routes[bouncer_host] = {
            database.name: addresses.get(database.host or "", database.host or "?") for database in databases
        }
        paused[bouncer_host] = [database.name for database in databases if database.paused]
    nodes = []
    for name, probe in view.probes.items():
        node = PgNode(name, str(probe.host.address), "unknown", "running", fenced=probe.fenced, repmgrd=probe.repmgrd)
        server = probe.server
        if server is None:
            node.state = _down_state(probe)
            node.control_state = probe.control_state
            node.detail = probe.down.detail if probe.down else None
        else:
            node.role = "standby" if server.in_recovery else "primary"
            node.timeline = server.timeline
            node.lsn = postgres.format_lsn(server.current_lsn) if server.current_lsn is not None else None
            if server.in_recovery:
                node.received_lsn = lsn_text(server.receive_lsn)
                node.replayed_lsn = lsn_text(server.replay_lsn)
                node.replay_paused = server.replay_paused
                if server.receiver_status == "streaming":
                    node.streaming_from = addresses.get(server.upstream_address or "", server.upstream_address)
                if primary_server and primary_server.current_lsn is not None and server.replay_lsn is not None:
                    node.lag_bytes = max(0, primary_server.current_lsn - server.replay_lsn)
                    replica = next((r for r in primary_server.replicas if r.name == name), None)
                    node.lag_s = 0.0 if node.lag_bytes == 0 else (replica.replay_lag_s if replica else None)
        record = view.repmgr_node(name)
        if record:
            upstream = by_id.get(record.upstream_id)
            node.repmgr = (
                f"{record.type}"
                + (f" of {upstream.name}" if upstream else "")
                + ("" if record.active else " (inactive)")
            )
        node.pgbouncer = [
            f"{bouncer_host}:{database}"
            for bouncer_host, table in routes.items()
            for database, target in table.items()
            if target == name
        ]
        nodes.append(node)
    state = PgClusterState(view.cluster, nodes, primary, routes, {k: v for k, v in paused.items() if v})
    state.problems = pg_problems(fleet, state, writable, view)
    return state


def lsn_text(value: int | None) -> str | None:
    return postgres.format_lsn(value) if value is not None else None


def _down_state(probe: PgProbe) -> str:
    if probe.host_reachable is False:
        return "host unreachable"
    if probe.down and probe.down.kind == "rejected":
        return "starting or stopping"
    if probe.postmaster_running:
        return "hung"
    return "stopped"


def pg_problems(fleet: Fleet, state: PgClusterState, writable: list[str], view: PgView) -> list[str]:
    """What is wrong, each with the command that resolves it in `state.fixes`."""
    problems = []
    cluster = state.cluster

    def problem(text: str, fix: str | None = None) -> None:
        problems.append(text)
        if fix:
            state.fixes[text] = fix

    interrupted = interrupted_switchover(view, state)
    if len(writable) > 1:
        routed = {target for table in state.pgbouncer.values() for target in table.values()}
        strays = [name for name in writable if name not in routed]
        problem(
            f"SPLIT BRAIN: {' and '.join(writable)} both accept writes",
            f"stop {strays[0]}, then `igops pg rejoin {strays[0]} --accept-risk` (it loses what it took alone)"
            if len(strays) == 1
            else None,
        )
    elif interrupted:
        standbys = [node.name for node in state.nodes if node.role == "standby"]
        problem(
            f"no primary: {interrupted} was stopped cleanly and fenced by a switchover cut short, and "
            "no member was promoted",
            " or ".join(
                [f"`igops pg switchover {cluster} --to {name}` finishes it" for name in standbys]
                + [f"`igops pg switchover {cluster} --to {interrupted}` rolls it back"]
            ),
        )
    elif not writable:
        settling = [node.name for node in state.nodes if node.state == "starting or stopping"]
        problem(
            "no primary: no member accepts writes",
            f"wait until {', '.join(settling)} has started or stopped, then `igops pg status {cluster}` again"
            if settling
            else f"`igops pg failover {cluster}`",
        )
    max_lag = fleet.model.postgres.max_lag_bytes
    finish = f"`igops pg switchover {cluster} --to {state.primary}` (finishes: repoints, resumes, registers)"
    for node in state.nodes:
        if node.role == "unknown":
            if node.name != interrupted:
                problem(
                    f"{node.name}: {node.state}" + (" (fenced)" if node.fenced else ""),
                    f"`igops pg rejoin {node.name}`" if state.primary else None,
                )
        elif node.role == "primary" and node.fenced and state.primary == node.name:
            problem(f"{node.name} accepts writes but holds standby.signal: a restart brings it back read-only", finish)
        elif node.role == "standby":
            not_following = state.primary and why_not_following(node, state.node(state.primary))
            if not_following:
                problem(f"{node.name} {not_following}", f"`igops pg rejoin {node.name}`")
            if node.replay_paused:
                problem(f"{node.name} has WAL replay paused", f"`SELECT pg_wal_replay_resume()` on {node.name}")
            if node.lag_bytes is not None and node.lag_bytes > max_lag:
                problem(
                    f"{node.name} lags {node.lag_bytes} bytes (threshold {max_lag})",
                    f"wait; if it keeps growing, see {node.name}'s Postgres log",
                )
    for bouncer_host, table in state.pgbouncer.items():
        for database, target in table.items():
            if target != state.primary:
                problem(
                    f"{bouncer_host}: {database} routes to {target}, which is not the primary",
                    finish if state.primary else None,
                )
    for bouncer_host, databases in state.paused.items():
        problem(f"{bouncer_host}: {', '.join(databases)} PAUSED", finish if state.primary else None)
    for bouncer_host, error in view.bouncer_errors.items():
        problem(f"PgBouncer on {bouncer_host} does not answer: {error}", f"start PgBouncer on {bouncer_host}")
    paused_repmgrd = [node.name for node in state.nodes if node.repmgrd == "paused"]
    if paused_repmgrd:
        problem(
            f"repmgrd is paused on {', '.join(paused_repmgrd)}: no automatic failover there",
            finish if state.primary else None,
        )
    primary_records = [node.name for node in view.repmgr if node.type == "primary" and node.active]
    if view.repmgr and state.primary and primary_records != [state.primary]:
        problem(f"repmgr records {', '.join(primary_records) or 'no'} primary, the primary is {state.primary}", finish)
    misrecorded = [
        node.name
        for node in state.nodes
        if state.follows_primary(node) and node.repmgr is not None and node.repmgr != f"standby of {state.primary}"
    ]
    if misrecorded:
        # repmgr's own checks (and its switchover) then refuse to work on them.
        problem(f"repmgr does not record {', '.join(misrecorded)} as the standby of {state.primary} it is", finish)
    if not writable and problems[0] in state.fixes:
        # With no primary, what makes one (a failover, or the switchover's finish or roll-back)
        # also repoints and resumes PgBouncer.
        for text in problems[1:]:
            state.fixes.setdefault(text, state.fixes[problems[0]])
    return problems


def interrupted_switchover(view: PgView, state: PgClusterState | None = None) -> str | None:
    """The member a switchover stopped before it was cut short: no member accepts writes, one
    was shut down cleanly as a primary (its control file says "shut down", a standby's would say
    "shut down in recovery"; a crashed primary's "in production"), and PgBouncer routes to it."""
    if view.writable():
        return None
    stopped = [
        name
        for name, probe in view.probes.items()
        if probe.server is None and probe.postmaster_running is False and probe.control_state == "shut down"
    ]
    report = state or view.state
    assert report is not None  # pg_view reports every view it makes
    routed = {target for table in report.pgbouncer.values() for target in table.values()}
    if len(stopped) == 1 and routed == set(stopped):
        return stopped[0]
    return None


def pg_status(fleet: Fleet, cluster: str) -> PgClusterState:
    state = pg_view(fleet, cluster).state
    assert state is not None  # pg_view reports every view it makes
    return state


def bouncer_text(databases: dict[str, list[str]]) -> str:
    return "; ".join(f"{host}: {', '.join(names)}" for host, names in databases.items())


def wal_received(server: postgres.ServerState) -> int:
    return max(server.receive_lsn or 0, server.replay_lsn or 0)


def describe_left_behind(state: PgClusterState) -> str:
    """One line for a failure's message: the primary, PgBouncer, and every other member."""
    routes = sorted({target for table in state.pgbouncer.values() for target in table.values()})
    parts = [
        f"{state.primary} is the primary" if state.primary else "NO member accepts writes",
        f"PgBouncer routes to {', '.join(routes) or 'nothing'}"
        + (f" with {bouncer_text(state.paused)} PAUSED" if state.paused else " and is not paused"),
    ]
    for node in state.nodes:
        if node.name != state.primary:
            parts.append(
                f"{node.name} is "
                + (node.role if node.role != "unknown" else node.state)
                + (f" ({node.control_state})" if node.control_state else "")
                + (", fenced" if node.fenced and node.role != "standby" else "")
            )
    return "; ".join(parts)
