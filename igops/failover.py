"""Planned switchover and unplanned failover for Postgres (repmgr behind PgBouncer) and Redis.

Every operation reads the live state first (roles are whatever the servers say, never what the
inventory says: the inventory names members, a failover does not rewrite it), refuses what is
unsafe, and builds a plan: an ordered list of steps, each naming the action that runs it. The
dry run prints that list and the apply walks the same list, so what was shown is what runs.

A step may carry an undo (run if a later step fails before the point of no return, e.g. start
the stopped old primary again) and a release (run on any failure once the step has run, e.g.
RESUME a paused PgBouncer): a failure leaves writes flowing and a report of where things stand.

Split brain is what these operations exist to prevent: at no moment are two servers writable
for the app. A switchover stops the old primary before the candidate is promoted; a failover
fences the old one first: PgBouncer stops routing to it and, on its disk, a standby.signal
(Postgres) or a replicaof line (Redis) makes it come back read-only if it is ever restarted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from igops import inventory, postgres, redisops, remote
from igops.bouncer_watchdog import PauseWatchdogs
from igops.errors import IgopsError, RemoteError, UsageError
from igops.host_commands import failure_reason, parallel_map, read_file, replace_file, ssh, ssh_ok
from igops.operations.steps import Step, StepReport, execute
from igops.output import Reporter, plural
from igops.role_change import DOWN_PROBE_INTERVAL, DOWN_PROBES, STREAMING_TIMEOUT, Refused, refuse_or_force

# While writes wait: how long the old primary's clean stop may take, and its last WAL to reach
# the candidate, before the switchover is undone.
STOP_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 10.0
PROMOTE_TIMEOUT = 60
REJOIN_TIMEOUT = 300.0
# repmgrd re-registers with a restarted Postgres once it reconnects: within reconnect_attempts x
# reconnect_interval plus a monitoring interval (6 s + 2 s in the lab, tens of seconds at most).
REPMGRD_RECONNECT_TIMEOUT = 30.0
# How long PgBouncer may take to pause the databases of a dead primary before igops KILLs them.
DEAD_SERVER_PAUSE_S = 2.0
# A Redis switchover demotes the old master only while its write pause has at least this long
# left, so the pause cannot expire between the check and the demotion.
PAUSE_MARGIN = 1.0


# ==================================================================================================
# Postgres
# ==================================================================================================
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


@dataclass
class _PgProbe:
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
class _PgView:
    fleet: Any
    cluster: str
    probes: dict[str, _PgProbe]
    bouncers: dict[str, list[postgres.BouncerDatabase]]  # PgBouncer host -> this cluster's databases
    bouncer_errors: dict[str, str]
    repmgr: list[postgres.RepmgrNode]
    state: PgClusterState | None = None  # the report of the above, for people

    def writable(self) -> list[str]:
        return [name for name, probe in self.probes.items() if probe.server and not probe.server.in_recovery]

    def databases(self) -> dict[str, list[str]]:
        return {host: [database.name for database in databases] for host, databases in self.bouncers.items()
                if databases}

    def repmgr_node(self, name: str) -> postgres.RepmgrNode | None:
        return next((node for node in self.repmgr if node.name == name), None)

    def repmgrd_members(self) -> list[str]:
        """Members whose repmgrd runs (paused or not): an operation pauses it on them, so that it
        cannot promote on its own while igops stops a primary or rewinds a node."""
        return [name for name, probe in self.probes.items() if probe.repmgrd in ("running", "paused")]


def cluster_members(fleet, cluster: str) -> list[str]:
    clusters = fleet.model.postgres.clusters
    if cluster not in clusters:
        raise UsageError(f"unknown Postgres cluster {cluster!r}",
                         inventory.unknown_name_hint(cluster, list(clusters), f"clusters in {fleet.source}"))
    return [clusters[cluster].primary, *clusters[cluster].standbys]


def cluster_of(fleet, node: str) -> str:
    fleet.host(node)
    for name, cluster in fleet.model.postgres.clusters.items():
        if node == cluster.primary or node in cluster.standbys:
            return name
    raise UsageError(f"{node} is in no Postgres cluster", "see [postgres.clusters.*] in the inventory")


def _data_directory(fleet, host) -> str:
    return fleet.path_for(fleet.model.postgres.data_directory, host)


def _as_postgres(fleet, argv: list[str]) -> list[str]:
    # From /, because the SSH user's home is usually closed to the postgres user.
    return ["runuser", "-u", fleet.model.postgres.os_user, "--", "env", "-C", "/", *argv]


def _bin(fleet, program: str) -> str:
    return f"{fleet.model.postgres.bin_dir.rstrip('/')}/{program}"


def _repmgr_argv(fleet, host, *args: str) -> list[str]:
    return [_bin(fleet, "repmgr"), "-f", fleet.path_for(fleet.model.postgres.repmgr_config, host), *args]


def _repmgr(fleet, host, *args: str) -> list[str]:
    return _as_postgres(fleet, _repmgr_argv(fleet, host, *args))


# What a member looks like on its host: is a postmaster running, is the member fenced
# (standby.signal), and what its control file says (a clean shutdown or a crash).
_HOST_CHECK = ('"$1/pg_ctl" status -D "$2" >/dev/null 2>&1; echo "postmaster=$?"; '
               'if [ -e "$2/standby.signal" ]; then echo fenced=1; else echo fenced=0; fi; '
               '"$1/pg_controldata" -D "$2" 2>/dev/null | sed -n "s/^Database cluster state: */control=/p"')


def _host_check(fleet, probe: _PgProbe) -> None:
    result = ssh(fleet, probe.host, _as_postgres(fleet, ["sh", "-c", _HOST_CHECK, "sh", fleet.model.postgres.bin_dir,
                                                         _data_directory(fleet, probe.host)]), timeout=20)
    probe.host_reachable = result.reached
    if result.ok:
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        probe.postmaster_running = values.get("postmaster") == "0"
        probe.fenced = values.get("fenced") == "1"
        probe.control_state = values.get("control", "").strip() or None


def _probe_member(fleet, name: str) -> _PgProbe:
    host = fleet.host(name)
    try:
        connection = postgres.connect(fleet, host)
    except postgres.Unavailable as down:
        return _PgProbe(host, None, down)
    try:
        return _PgProbe(host, postgres.server_state(connection), None)
    except Exception as exc:  # noqa: BLE001 - a server that fails mid-probe is a finding
        return _PgProbe(host, None, postgres.Unavailable(name, postgres.first_line(exc), "rejected"))
    finally:
        connection.close()


def _probe_repmgrd(fleet, probe: _PgProbe) -> None:
    try:
        connection = postgres.connect(fleet, probe.host, postgres.REPMGR_DATABASE)
        try:
            probe.repmgrd = postgres.repmgrd_state(connection)
        finally:
            connection.close()
    except Exception:  # noqa: BLE001 - unknown is shown as such
        probe.repmgrd = None


def _pg_view(fleet, cluster: str) -> _PgView:
    members = cluster_members(fleet, cluster)
    bouncer_hosts = fleet.with_role("pgbouncer")
    addresses = {str(fleet.host(name).address): name for name in members} | {name: name for name in members}
    configured = fleet.model.postgres.clusters[cluster].pgbouncer_database

    def bouncer(host):
        try:
            return host.name, [database for database in postgres.Bouncer(fleet, host).databases()
                               if database.host in addresses or database.name == configured], None
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
    answering = sorted((p for p in probes.values() if p.server), key=lambda p: p.server.in_recovery)
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
    view = _PgView(fleet, cluster, probes, bouncers, bouncer_errors, repmgr_nodes)
    view.state = _pg_report(view, addresses)
    return view


def _pg_report(view: _PgView, addresses: dict[str, str]) -> PgClusterState:
    fleet = view.fleet
    writable = view.writable()
    primary = writable[0] if len(writable) == 1 else None
    primary_server = view.probes[primary].server if primary else None
    by_id = {node.node_id: node for node in view.repmgr}
    routes: dict[str, dict[str, str]] = {}
    paused: dict[str, list[str]] = {}
    for bouncer_host, databases in view.bouncers.items():
        routes[bouncer_host] = {database.name: addresses.get(database.host or "", database.host or "?")
                                for database in databases}
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
                node.received_lsn = _lsn_text(server.receive_lsn)
                node.replayed_lsn = _lsn_text(server.replay_lsn)
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
            node.repmgr = (f"{record.type}" + (f" of {upstream.name}" if upstream else "")
                           + ("" if record.active else " (inactive)"))
        node.pgbouncer = [f"{bouncer_host}:{database}" for bouncer_host, table in routes.items()
                          for database, target in table.items() if target == name]
        nodes.append(node)
    state = PgClusterState(view.cluster, nodes, primary, routes, {k: v for k, v in paused.items() if v})
    state.problems = _pg_problems(fleet, state, writable, view)
    return state


def _lsn_text(value: int | None) -> str | None:
    return postgres.format_lsn(value) if value is not None else None


def _down_state(probe: _PgProbe) -> str:
    if probe.host_reachable is False:
        return "host unreachable"
    if probe.down and probe.down.kind == "rejected":
        return "starting or stopping"
    if probe.postmaster_running:
        return "hung"
    return "stopped"


def _pg_problems(fleet, state: PgClusterState, writable: list[str], view: _PgView) -> list[str]:
    """What is wrong, each with the command that resolves it in `state.fixes`."""
    problems = []
    cluster = state.cluster

    def problem(text: str, fix: str | None = None) -> None:
        problems.append(text)
        if fix:
            state.fixes[text] = fix

    interrupted = _interrupted_switchover(view, state)
    if len(writable) > 1:
        routed = {target for table in state.pgbouncer.values() for target in table.values()}
        strays = [name for name in writable if name not in routed]
        problem(f"SPLIT BRAIN: {' and '.join(writable)} both accept writes",
                f"stop {strays[0]}, then `igops pg rejoin {strays[0]} --accept-risk` (it loses what it took alone)"
                if len(strays) == 1 else None)
    elif interrupted:
        standbys = [node.name for node in state.nodes if node.role == "standby"]
        problem(f"no primary: {interrupted} was stopped cleanly and fenced by a switchover cut short, and "
                "no member was promoted",
                " or ".join([f"`igops pg switchover {cluster} --to {name}` finishes it" for name in standbys]
                            + [f"`igops pg switchover {cluster} --to {interrupted}` rolls it back"]))
    elif not writable:
        settling = [node.name for node in state.nodes if node.state == "starting or stopping"]
        problem("no primary: no member accepts writes",
                f"wait until {', '.join(settling)} has started or stopped, then `igops pg status {cluster}` again"
                if settling else f"`igops pg failover {cluster}`")
    max_lag = fleet.model.postgres.max_lag_bytes
    finish = f"`igops pg switchover {cluster} --to {state.primary}` (finishes: repoints, resumes, registers)"
    for node in state.nodes:
        if node.role == "unknown":
            if node.name != interrupted:
                problem(f"{node.name}: {node.state}" + (" (fenced)" if node.fenced else ""),
                        f"`igops pg rejoin {node.name}`" if state.primary else None)
        elif node.role == "primary" and node.fenced and state.primary == node.name:
            problem(f"{node.name} accepts writes but holds standby.signal: a restart brings it back read-only",
                    finish)
        elif node.role == "standby":
            if state.primary and node.streaming_from != state.primary:
                problem(f"{node.name} does not stream from {state.primary}"
                        + (f" (it streams from {node.streaming_from})" if node.streaming_from else ""),
                        f"`igops pg rejoin {node.name}`")
            if node.replay_paused:
                problem(f"{node.name} has WAL replay paused", f"`SELECT pg_wal_replay_resume()` on {node.name}")
            if node.lag_bytes is not None and node.lag_bytes > max_lag:
                problem(f"{node.name} lags {node.lag_bytes} bytes (threshold {max_lag})",
                        f"wait; if it keeps growing, see {node.name}'s Postgres log")
    for bouncer_host, table in state.pgbouncer.items():
        for database, target in table.items():
            if target != state.primary:
                problem(f"{bouncer_host}: {database} routes to {target}, which is not the primary",
                        finish if state.primary else None)
    for bouncer_host, databases in state.paused.items():
        problem(f"{bouncer_host}: {', '.join(databases)} PAUSED", finish if state.primary else None)
    for bouncer_host, error in view.bouncer_errors.items():
        problem(f"PgBouncer on {bouncer_host} does not answer: {error}", f"start PgBouncer on {bouncer_host}")
    paused_repmgrd = [node.name for node in state.nodes if node.repmgrd == "paused"]
    if paused_repmgrd:
        problem(f"repmgrd is paused on {', '.join(paused_repmgrd)}: no automatic failover there",
                finish if state.primary else None)
    primary_records = [node.name for node in view.repmgr if node.type == "primary" and node.active]
    if view.repmgr and state.primary and primary_records != [state.primary]:
        problem(f"repmgr records {', '.join(primary_records) or 'no'} primary, the primary is {state.primary}",
                finish)
    if not writable and problems[0] in state.fixes:
        # With no primary, what makes one (a failover, or the switchover's finish or roll-back)
        # also repoints and resumes PgBouncer.
        for text in problems[1:]:
            state.fixes.setdefault(text, state.fixes[problems[0]])
    return problems


def _interrupted_switchover(view: _PgView, state: PgClusterState | None = None) -> str | None:
    """The member a switchover stopped before it was cut short: no member accepts writes, one
    was shut down cleanly as a primary (its control file says "shut down", a standby's would say
    "shut down in recovery"; a crashed primary's "in production"), and PgBouncer routes to it."""
    if view.writable():
        return None
    stopped = [name for name, probe in view.probes.items()
               if probe.server is None and probe.postmaster_running is False and probe.control_state == "shut down"]
    routed = {target for table in (state or view.state).pgbouncer.values() for target in table.values()}
    if len(stopped) == 1 and routed == set(stopped):
        return stopped[0]
    return None


def pg_status(fleet, cluster: str) -> PgClusterState:
    return _pg_view(fleet, cluster).state


# --- the plans -----------------------------------------------------------------------------------
@dataclass
class PgPlan:
    operation: str  # 'switchover', 'failover', 'rejoin'
    cluster: str
    title: str
    old_primary: str | None
    new_primary: str | None
    forced: list[str] = field(default_factory=list)  # refusals that --accept-risk overrode: the risks accepted
    notes: list[str] = field(default_factory=list)
    bytes_at_risk: int | None = None  # failover: WAL the old primary wrote that the candidate lacks
    actions: list[Step] = field(default_factory=list)
    failure_hint: str = ""
    signature: tuple = ()  # the state the plan was made for (see check_unchanged)

    def steps(self) -> list[str]:
        return [step.title for step in self.actions]


@dataclass
class PgResult:
    operation: str
    cluster: str
    old_primary: str | None
    new_primary: str | None
    write_pause_ms: float | None  # from PgBouncer pausing the cluster's databases to resuming them
    bytes_at_risk: int | None
    steps: list[StepReport]


def _bouncer_text(databases: dict[str, list[str]]) -> str:
    return "; ".join(f"{host}: {', '.join(names)}" for host, names in databases.items())


def plan_pg_switchover(fleet, cluster: str, candidate: str, accept_risk: bool = False) -> tuple[PgPlan, PgClusterState]:
    """A switchover, or, when an interrupted one left the cluster mid-way, the plan that finishes
    it (the candidate is a standby, or the primary already) or rolls it back (the candidate is the
    member it stopped)."""
    members = cluster_members(fleet, cluster)
    if candidate not in members:
        raise UsageError(f"{candidate} is not a member of cluster {cluster}",
                         inventory.unknown_name_hint(candidate, members, "members"))
    view = _settled_view(fleet, cluster)
    state = view.state
    writable = view.writable()
    if len(writable) > 1:
        raise Refused(state, f"refused: {' and '.join(writable)} both accept writes (split brain)",
                      "stop the one PgBouncer does not route to, then `igops pg rejoin` it")
    if view.bouncer_errors:
        raise Refused(state, "refused: PgBouncer does not answer on " + ", ".join(view.bouncer_errors),
                      "a switchover pauses every PgBouncer; bring it back first")
    if not writable:
        stopped = _interrupted_switchover(view)
        if stopped is None:
            raise Refused(state, f"refused: cluster {cluster} has no primary to switch over from",
                          f"if its primary is down, use `igops pg failover {cluster}`")
        if candidate == stopped:
            return _signed(_plan_pg_roll_back(view, stopped), view), state
        return _signed(_plan_pg_resume(view, stopped, candidate, accept_risk), view), state
    primary = writable[0]
    if primary == candidate:
        return _signed(_plan_pg_finish(view, candidate), view), state
    probe = view.probes[candidate]
    node = state.node(candidate)
    if probe.server is None:
        raise Refused(state, f"refused: {candidate} is not a standby ({node.state})",
                      "pick a running standby (igops pg status)")
    if node.streaming_from != primary:
        raise Refused(state, f"refused: {candidate} does not stream from {primary}",
                      f"fix its replication first (igops pg rejoin {candidate})")
    databases = view.databases()
    if not databases:
        raise Refused(state, f"refused: no PgBouncer routes a database to cluster {cluster}",
                      "check [pgbouncer] and the hosts with the pgbouncer role")
    plan = PgPlan("switchover", cluster, f"Switch cluster {cluster} over from {primary} to {candidate}",
                  primary, candidate, failure_hint="see `igops pg status` for where things stand")
    reasons = _lag_reasons(fleet, node)
    reasons += _repmgr_check(fleet, probe.host)
    reasons += _free_space_reasons(fleet, probe.host)
    refuse_or_force(state, reasons, accept_risk, plan.forced,
                    "wait for it to catch up, free space, pick another standby, or --accept-risk")
    siblings = [name for name in members if name not in (primary, candidate) and view.probes[name].server]
    stopped = [name for name in members if name not in (primary, candidate) and not view.probes[name].server]
    if stopped:
        plan.notes.append(f"not running, left alone: {', '.join(stopped)} (igops pg rejoin it later)")
    plan.actions = with_repmgrd_paused(
        switchover_steps(fleet, primary, candidate, siblings, databases, replay_paused=node.replay_paused),
        on=primary, members=(candidate, primary, *siblings))
    if state.paused:
        # The cluster's lock is free (it is taken before the plan runs), so no operation is under
        # way: an interrupted one left them paused. The switchover pauses them again itself.
        plan.notes.append(f"PgBouncer has {_bouncer_text(state.paused)} paused: an interrupted operation left "
                          "them so")
        plan.actions.insert(0, Step(f"PgBouncer: RESUME {_bouncer_text(state.paused)} (left paused by an "
                                    "interrupted operation)", "resume", (state.paused,)))
    return _signed(plan, view), state


def _settled_view(fleet, cluster: str) -> _PgView:
    """The cluster's state once no member is still shutting down: a switchover cut short during
    its stop leaves the remote stop running, and what to do depends on how it ends."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        view = _pg_view(fleet, cluster)
        settling = [name for name, probe in view.probes.items()
                    if probe.server is None and probe.postmaster_running and probe.down
                    and probe.down.kind == "rejected"]
        if view.writable() or not settling or time.monotonic() > deadline:
            return view
        time.sleep(0.5)


def _plan_pg_resume(view: _PgView, stopped: str, candidate: str, accept_risk: bool) -> PgPlan:
    """A switchover cut short after it stopped the primary and before the promotion: carry on
    from the stop (fence again, make sure the candidate has all of the stopped primary's WAL,
    promote, and the rest)."""
    fleet, state, cluster = view.fleet, view.state, view.cluster
    probe = view.probes[candidate]
    node = state.node(candidate)
    if probe.server is None or not probe.server.in_recovery:
        raise Refused(state, f"refused: {candidate} is not a running standby ({node.state})",
                      f"roll the interrupted switchover back: `igops pg switchover {cluster} --to {stopped}`")
    plan = PgPlan("switchover", cluster, f"Finish the switchover of cluster {cluster} from {stopped} (stopped "
                  f"cleanly) to {candidate}", stopped, candidate,
                  failure_hint="see `igops pg status` for where things stand")
    plan.notes.append(f"{stopped} was stopped cleanly by a switchover cut short; no member accepts writes")
    reasons = []
    wal_end = _wal_end(fleet, view.probes[stopped].host)
    if wal_end is None:
        reasons.append(f"where {stopped}'s WAL ends is unknown")
    else:
        missing = wal_end - _received(probe.server)
        if missing > 0:
            reasons.append(f"{candidate} lacks {missing} bytes of {stopped}'s WAL, which it cannot receive while "
                           f"{stopped} is stopped (the promotion would be undone)")
    if node.replay_paused:
        reasons.append(f"{candidate} has WAL replay paused")
    reasons += _free_space_reasons(fleet, probe.host)
    refuse_or_force(state, reasons, accept_risk, plan.forced,
                    f"roll it back instead (`igops pg switchover {cluster} --to {stopped}`), or --accept-risk")
    members = cluster_members(fleet, cluster)
    siblings = [name for name in members if name not in (stopped, candidate) and view.probes[name].server]
    left = [name for name in members if name not in (stopped, candidate) and not view.probes[name].server]
    if left:
        plan.notes.append(f"not running, left alone: {', '.join(left)} (igops pg rejoin it later)")
    plan.actions = with_repmgrd_paused(
        switchover_steps(fleet, stopped, candidate, siblings, view.databases(), replay_paused=node.replay_paused,
                         stopped=True, paused=state.paused or None),
        on=candidate, members=(candidate, *siblings, stopped))
    return plan


def _plan_pg_roll_back(view: _PgView, stopped: str) -> PgPlan:
    """A switchover cut short after it stopped the primary: start that primary again, provided
    no other member can have been promoted, and resume PgBouncer, which still routes to it."""
    state, cluster = view.state, view.cluster
    others = tuple(name for name in view.probes if name != stopped)
    plan = PgPlan("switchover", cluster, f"Roll back the switchover of cluster {cluster} cut short: {stopped} "
                  "the primary again", stopped, stopped, failure_hint="see `igops pg status` for where things stand")
    plan.notes.append(f"{stopped} was stopped cleanly by a switchover cut short; no member accepts writes")
    plan.actions.append(Step(f"{stopped}: remove standby.signal and start it again as the primary (only once "
                             f"{', '.join(others)} verifiably cannot be promoted), check it accepts writes",
                             "unfence_and_start", (stopped, others)))
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {_bouncer_text(state.paused)}", "resume", (state.paused,)))
    for name in others:
        node = state.node(name)
        if node.role == "standby":
            plan.actions.append(Step(f"{name}: wait until it streams from {stopped}", "wait_streaming",
                                     (name, stopped)))
            plan.actions.append(_drop_rejoin_reservation_step(name, stopped))
        else:
            plan.notes.append(f"{name}: {node.state}; rejoin it later (igops pg rejoin {name})")
    running = [name for name in others if state.node(name).role == "standby"]
    if running:
        plan.actions = with_repmgrd_paused(plan.actions, on=running[0], members=(stopped, *others))
    return plan


def _free_space_reasons(fleet, host) -> list[str]:
    """A promotion writes a new timeline's first WAL segment and a checkpoint: on a full volume
    it PANICs, and in a switchover the old primary is stopped by then."""
    minimum = fleet.model.postgres.min_free_bytes
    data = _data_directory(fleet, host)
    # The trailing slash follows a pg_wal symlink to the WAL volume.
    result = ssh(fleet, host, ["df", "-P", "-B1", data, f"{data}/pg_wal/"], timeout=20)
    if not result.ok:
        return [f"{host.name}: free space unknown: {failure_reason(result)}"]
    return free_space_reasons(host.name, result.stdout, minimum)


def free_space_reasons(node: str, df_output: str, minimum: int) -> list[str]:
    """`df -P -B1 DATA DATA/pg_wal/`'s lines: a reason for each volume with less than `minimum` free."""
    reasons = []
    for label, line in zip(("data", "WAL"), df_output.strip().splitlines()[1:], strict=False):
        fields = line.split()
        available = int(fields[3])
        if available < minimum:
            reasons.append(f"{node}'s {label} volume ({fields[5]}) has {available >> 20} MiB free "
                           f"(threshold {minimum >> 20} MiB, [postgres] min_free_bytes)")
    return reasons


def _watchdog_text(fleet, databases: dict[str, list[str]]) -> str:
    return (f"arm a watchdog on {', '.join(databases)} (it RESUMEs them if igops is gone or silent for "
            f"{fleet.model.pgbouncer.watchdog_deadline:g} s)")


def switchover_steps(fleet, primary: str, candidate: str, siblings: list[str], databases: dict[str, list[str]],
                     replay_paused: bool = False, stopped: bool = False,
                     paused: dict[str, list[str]] | None = None) -> list[Step]:
    """The switchover's steps; `stopped`: an interrupted one already stopped the primary
    cleanly, `paused`: and left these PgBouncer databases paused (they stay paused)."""
    candidate_address = f"{fleet.host(candidate).address}:{fleet.model.postgres.port}"
    pause_timeout = fleet.model.pgbouncer.pause_timeout
    resume = Step(f"PgBouncer: RESUME {_bouncer_text(databases)}", "resume", (databases,))
    watchdog = _watchdog_text(fleet, databases)
    steps = []
    if not stopped:
        steps.append(Step(f"{primary}: CHECKPOINT, so its clean shutdown is quick once writes are paused",
                          "checkpoint", (primary,)))
    steps.append(Step(f"PgBouncer: read the databases file on {', '.join(databases)}", "read_databases_files",
                      (databases,)))
    if not paused:
        steps.append(Step(f"PgBouncer: {watchdog}, then PAUSE {_bouncer_text(databases)} (writes wait; gives up and "
                          f"resumes after {pause_timeout:g} s)", "pause", (databases,), release=resume))
    else:
        # Left paused by an interrupted run whose watchdog is gone: they get one again.
        steps.append(Step(f"PgBouncer: {_watchdog_text(fleet, paused)} over {_bouncer_text(paused)} (left paused)",
                          "watch", (paused,), release=resume))
    # Fenced before the stop, so that nothing the stop's remote script does after an interruption
    # (it outlives igops) can fence a primary that an undo started again.
    steps.append(Step(f"{primary}: fence it with standby.signal, "
                      + ("(stopped already) " if stopped else "clean stop (repmgr node service --action=stop), ")
                      + "read where its WAL ends", "stop_and_fence", (primary,),
                      undo=Step(f"{primary}: remove standby.signal and start it again as the primary (only once "
                                f"{candidate} verifiably is not and cannot become one), check it accepts writes",
                                "unfence_and_start", (primary, (candidate,))),
                      release=resume if paused else None))
    if replay_paused:
        steps.append(Step(f"{candidate}: resume WAL replay (it was paused; --accept-risk)", "resume_replay",
                          (candidate,)))
    steps += [
        Step(f"{candidate}: wait until it has received all of {primary}'s WAL (at most {CATCH_UP_TIMEOUT:g} s)",
             "wait_received", (candidate,)),
        _reserve_rejoin_wal_step(candidate, primary),
        # A failed promotion is undone (the old primary started again) only once the candidate is
        # verified stopped and still in recovery; once it is promoted, failures roll forward.
        Step(f"{candidate}: promote (pg_promote), wait until it accepts writes", "promote", (candidate,)),
        Step(f"PgBouncer: point {_bouncer_text(databases)} at {candidate} ({candidate_address}), RELOAD",
             "repoint", (databases, candidate), point_of_no_return=True),
        resume,
        Step(f"{candidate}: record it as the primary in repmgr's metadata (repmgr primary register --force)",
             "register_primary", (candidate,)),
        *_rejoin_steps(primary, candidate, running=False),
    ]
    steps += [Step(f"{sibling}: follow {candidate} (repmgr standby follow)", "follow", (sibling, candidate))
              for sibling in siblings]
    steps += [Step(f"{node}: wait until it streams from {candidate}", "wait_streaming", (node, candidate))
              for node in siblings]
    steps.append(_release_switch_segment_step(candidate, [primary, *siblings]))
    return steps


def _plan_pg_finish(view: _PgView, primary: str) -> PgPlan:
    """The candidate is primary already: finish what an interrupted operation left (PgBouncer
    routing or paused, repmgr's metadata, members that do not follow it)."""
    state = view.state
    plan = PgPlan("switchover", view.cluster, f"Finish: {primary} is already the primary of {view.cluster}",
                  None, primary, failure_hint="see `igops pg status` for where things stand")
    elsewhere = {host: [database for database, target in table.items() if target != primary]
                 for host, table in state.pgbouncer.items()}
    elsewhere = {host: names for host, names in elsewhere.items() if names}
    if elsewhere:
        plan.actions.append(Step(f"PgBouncer: point {_bouncer_text(elsewhere)} at {primary}, RELOAD", "repoint",
                                 (elsewhere, primary)))
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {_bouncer_text(state.paused)}", "resume", (state.paused,)))
    if state.node(primary).fenced:
        plan.actions.append(Step(f"{primary}: remove standby.signal (an interrupted switchover left it; a restart "
                                 "would bring the primary back read-only)", "unfence", (primary,)))
    record = view.repmgr_node(primary)
    if record and (record.type != "primary" or not record.active):
        plan.actions.append(Step(f"{primary}: record it as the primary in repmgr's metadata", "register_primary",
                                 (primary,)))
    for node in state.nodes:
        if node.name == primary or node.streaming_from == primary:
            continue
        if node.role == "unknown" and node.state == "host unreachable":
            plan.notes.append(f"{node.name}: host unreachable, rejoin it later (igops pg rejoin {node.name})")
            continue
        plan.actions += _rejoin_steps(node.name, primary, running=node.role != "unknown")
    if not plan.actions:
        plan.notes.insert(0, f"nothing to do: {primary} is the primary of {view.cluster}, PgBouncer routes to it "
                             "and every member follows it")
    plan.actions = with_repmgrd_paused(plan.actions, on=primary,
                                       members=(primary, *(node.name for node in state.nodes if node.name != primary)))
    return plan


def _lag_reasons(fleet, node: PgNode) -> list[str]:
    reasons = []
    limits = fleet.model.postgres
    if node.replay_paused:
        reasons.append(f"{node.name} has WAL replay paused")
    if node.lag_bytes is None:
        reasons.append(f"{node.name}'s lag is unknown")
    elif node.lag_bytes > limits.max_lag_bytes:
        reasons.append(f"{node.name} lags {node.lag_bytes} bytes (threshold {limits.max_lag_bytes})")
    if node.lag_s is not None and node.lag_s > limits.max_lag_seconds:
        reasons.append(f"{node.name} lags {node.lag_s:.1f} s (threshold {limits.max_lag_seconds:g} s)")
    return reasons


def _repmgr_check(fleet, host) -> list[str]:
    result = ssh(fleet, host, _repmgr(fleet, host, "node", "check"), timeout=30)
    if result.ok:
        return []
    if not result.reached:
        return [f"{host.name}: {result.error}"]
    failing = [line.strip() for line in result.stdout.splitlines() if ":" in line and "OK" not in line.split(":", 1)[1]]
    return [f"repmgr node check on {host.name}: " + ("; ".join(failing) or result.stderr.strip()[-300:]
                                                     or f"exit {result.exit_code}")]


def plan_pg_failover(fleet, cluster: str, candidate: str | None = None,
                     accept_risk: bool = False) -> tuple[PgPlan, PgClusterState]:
    members = cluster_members(fleet, cluster)
    if candidate is not None and candidate not in members:
        raise UsageError(f"{candidate} is not a member of cluster {cluster}",
                         inventory.unknown_name_hint(candidate, members, "members"))
    view = _pg_view(fleet, cluster)
    state = view.state
    writable = view.writable()
    if len(writable) == 1 and (finish := _plan_pg_promoted(view, writable[0])):
        return _signed(finish, view), state
    if writable:
        raise Refused(state, f"refused: {', '.join(writable)} accepts writes: cluster {cluster} has a primary",
                      f"for a planned change use `igops pg switchover {cluster} --to NODE`")
    if view.bouncer_errors:
        raise Refused(state, "refused: PgBouncer does not answer on " + ", ".join(view.bouncer_errors),
                      "a failover repoints every PgBouncer; bring it back first")
    old = _presumed_primary(view)
    plan = PgPlan("failover", cluster, "", old, None,
                  failure_hint=f"see `igops pg status {cluster}`; PgBouncer was resumed")
    reasons: list[str] = []
    stop_first = False
    old_probe = view.probes[old] if old else None
    wal_end = None
    if old_probe:
        # Asking the server again and reading its WAL over SSH overlap: both take about a second.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-end") as pool:
            reading = pool.submit(_wal_end, fleet, old_probe.host) if old_probe.host_reachable else None
            _confirm_pg_down(fleet, state, old)
            wal_end = reading.result() if reading else None
        streaming = [name for name, probe in view.probes.items()
                     if probe.server and probe.server.receiver_status == "streaming"
                     and probe.server.upstream_address in (str(old_probe.host.address), old)]
        if streaming:
            raise Refused(state, f"refused: {old} is not down: {', '.join(streaming)} still stream from it",
                          "igops cannot reach it but its standbys can: check the network between them")
        if old_probe.host_reachable is False:
            reasons.append(f"{old}'s host is unreachable over SSH: it cannot be fenced on disk; make sure it cannot "
                           "come back (stop the instance) before forcing")
        elif old_probe.down.kind == "rejected":
            reasons.append(f"{old} answers ({old_probe.down.detail}): it is starting or stopping, not down")
            stop_first = True
        elif old_probe.postmaster_running:
            reasons.append(f"{old}'s postmaster runs but does not answer: hung, not down (--accept-risk stops it)")
            stop_first = True
    else:
        plan.notes.append(f"every member of {cluster} runs as a standby: no old primary to fence")
    standbys = {name: probe for name, probe in view.probes.items() if name != old and probe.server}
    if not standbys:
        raise Refused(state, f"refused: no running standby in cluster {cluster} to promote",
                      "start one, or restore the primary")
    chosen = candidate or _best_standby(view, standbys)
    if chosen not in standbys:
        raise Refused(state, f"refused: {chosen} is not a running standby ({state.node(chosen).state})",
                      f"running standbys: {', '.join(standbys)}")
    received = _received(standbys[chosen].server)
    best = max(_received(probe.server) for probe in standbys.values())
    if received < best:
        reasons.append(f"{chosen} has {best - received} bytes less WAL than the most advanced standby")
    if old_probe is None:
        plan.bytes_at_risk = best - received
    elif old_probe.host_reachable:
        if wal_end is None:
            reasons.append(f"where {old}'s WAL ends is unknown, so the bytes at risk are")
        else:
            plan.bytes_at_risk = max(0, wal_end - received)
            if plan.bytes_at_risk > fleet.model.postgres.max_lag_bytes:
                reasons.append(f"{chosen} lacks {plan.bytes_at_risk} bytes of {old}'s WAL "
                               f"(threshold {fleet.model.postgres.max_lag_bytes}): a failover loses them")
    if standbys[chosen].server.replay_paused:
        reasons.append(f"{chosen} has WAL replay paused")
    refuse_or_force(state, reasons, accept_risk, plan.forced,
                    "restore the old primary if you can, or --accept-risk")
    plan.new_primary = chosen
    plan.title = (f"Fail cluster {cluster} over from {old} (down) to {chosen}" if old
                  else f"Promote {chosen}: cluster {cluster} has no primary")
    siblings = [name for name in standbys if name != chosen]
    plan.actions = failover_steps(fleet, old, chosen, siblings, view.databases(),
                                  fence_on_disk=bool(old_probe and old_probe.host_reachable), stop_first=stop_first,
                                  replay_paused=standbys[chosen].server.replay_paused)
    if [name for name in view.repmgrd_members() if name != old]:
        # Where repmgrd runs it may promote a standby of its own choosing meanwhile: pause it. Where
        # it does not, a failover spends no time on it.
        plan.actions = with_repmgrd_paused(plan.actions, on=chosen, members=(chosen, *siblings))
    if old:
        plan.notes.append(f"afterwards: `igops pg rejoin {old}` makes {old} a standby of {chosen}")
    return _signed(plan, view), state


def failover_steps(fleet, old: str | None, chosen: str, siblings: list[str], databases: dict[str, list[str]],
                   fence_on_disk: bool, stop_first: bool, replay_paused: bool = False) -> list[Step]:
    resume = Step(f"PgBouncer: RESUME {_bouncer_text(databases)}", "resume", (databases,))
    steps = []
    if databases:
        steps.append(Step(f"PgBouncer: {_watchdog_text(fleet, databases)}, then hold {_bouncer_text(databases)}: "
                          "PAUSE (KILL if not paused within "
                          f"{DEAD_SERVER_PAUSE_S:g} s), new queries wait", "hold", (databases,), release=resume))
    if fence_on_disk:
        steps.append(Step(f"{old}: fence: " + ("stop it (immediate), " if stop_first else "")
                          + "write standby.signal so it can only start read-only", "fence", (old, stop_first)))
    if databases:
        steps.append(Step(f"PgBouncer: point {_bouncer_text(databases)} at {chosen}, RELOAD", "repoint",
                          (databases, chosen)))
    if replay_paused:
        steps.append(Step(f"{chosen}: resume WAL replay (it was paused; --accept-risk)", "resume_replay", (chosen,)))
    steps.append(Step(f"{chosen}: promote (pg_promote), wait until it accepts writes", "promote", (chosen,),
                      point_of_no_return=True))
    if databases:
        steps.append(resume)
    steps.append(Step(f"{chosen}: record it as the primary in repmgr's metadata (repmgr primary register --force)",
                      "register_primary", (chosen,)))
    steps += [Step(f"{sibling}: follow {chosen} (repmgr standby follow)", "follow", (sibling, chosen))
              for sibling in siblings]
    # No release of the promotion's segment here: the old primary has yet to rejoin, and pg_rewind
    # leaves it needing the new timeline's WAL from that segment on (`pg rejoin` releases it after).
    return steps


def _plan_pg_promoted(view: _PgView, new: str) -> PgPlan | None:
    """A standby that something else promoted (repmgrd's automatic failover, or a person) while
    PgBouncer still routes to the old primary, now down: finish that failover rather than
    promote a second standby. None when no PgBouncer route points at a member that is down."""
    state = view.state
    down = {name for name, probe in view.probes.items() if not probe.server}
    stale = {host: [database for database, target in table.items() if target in down]
             for host, table in state.pgbouncer.items()}
    stale = {host: names for host, names in stale.items() if names}
    if not stale:
        return None
    olds = sorted({state.pgbouncer[host][database] for host, names in stale.items() for database in names})
    plan = PgPlan("failover", view.cluster, f"Finish the failover of {view.cluster}: {new} was promoted already "
                  f"(repmgrd?), PgBouncer still routes to {', '.join(olds)}", olds[0], new,
                  failure_hint=f"see `igops pg status {view.cluster}`")
    for old in olds:
        probe = view.probes[old]
        if probe.host_reachable and not probe.fenced:
            plan.actions.append(Step(f"{old}: fence: " + ("stop it (immediate), " if probe.postmaster_running else "")
                                     + "write standby.signal so it can only start read-only", "fence",
                                     (old, bool(probe.postmaster_running))))
        elif not probe.host_reachable:
            plan.notes.append(f"{old}'s host is unreachable over SSH: it is not fenced; make sure it cannot come back")
    plan.actions.append(Step(f"PgBouncer: point {_bouncer_text(stale)} at {new}, RELOAD", "repoint", (stale, new)))
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {_bouncer_text(state.paused)}", "resume", (state.paused,)))
    record = view.repmgr_node(new)
    if record is None or record.type != "primary" or not record.active:
        plan.actions.append(Step(f"{new}: record it as the primary in repmgr's metadata (repmgr primary register "
                                 "--force)", "register_primary", (new,)))
    for node in state.nodes:
        if node.role == "standby" and node.streaming_from != new:
            plan.actions.append(Step(f"{node.name}: follow {new} (repmgr standby follow)", "follow", (node.name, new)))
    plan.notes += [f"afterwards: `igops pg rejoin {old}` makes {old} a standby of {new}" for old in olds]
    return plan


def _confirm_pg_down(fleet, state, name: str) -> None:
    """A restart looks like an outage for a moment: ask again before acting on it."""
    for _ in range(DOWN_PROBES - 1):
        time.sleep(DOWN_PROBE_INTERVAL)
        try:
            connection = postgres.connect(fleet, fleet.host(name))
        except postgres.Unavailable:
            continue
        connection.close()
        raise Refused(state, f"refused: {name} answers again", "see `igops pg status`")


def _received(server: postgres.ServerState) -> int:
    return max(server.receive_lsn or 0, server.replay_lsn or 0)


def _best_standby(view: _PgView, standbys: dict[str, _PgProbe]) -> str:
    """The most WAL received; then repmgr's priority (higher first; 0 never); then the name."""
    def priority(name: str) -> int:
        record = view.repmgr_node(name)
        return record.priority if record else 100

    eligible = [name for name in standbys if priority(name) > 0] or list(standbys)
    return sorted(eligible, key=lambda name: (-_received(standbys[name].server), -priority(name), name))[0]


def _presumed_primary(view: _PgView) -> str | None:
    """The member that was primary: the one PgBouncer routes to, else repmgr's record, else the
    only member that does not answer; None when every member answers (as a standby)."""
    state = view.state
    down = [name for name, probe in view.probes.items() if not probe.server]
    if not down:
        return None
    routed = {target for table in view.state.pgbouncer.values() for target in table.values()}
    candidates = [name for name in down if name in routed]
    if len(candidates) != 1:
        candidates = [node.name for node in view.repmgr if node.type == "primary" and node.active and node.name in down]
    if len(candidates) != 1 and len(down) == 1:
        candidates = down
    if len(candidates) != 1:
        raise Refused(state, f"refused: cannot tell which of {', '.join(down)} was the primary",
                      "check PgBouncer's databases file and `igops pg status`")
    return candidates[0]


_WAL_LISTING = ('"$1" -D "$2"; echo "-- pg_wal"; ls "$2/pg_wal"')


def _wal_end(fleet, host) -> int | None:
    """Where the WAL on a stopped server's disk ends (pg_waldump from its last checkpoint)."""
    data = _data_directory(fleet, host)
    listing = ssh(fleet, host, _as_postgres(fleet, ["sh", "-c", _WAL_LISTING, "sh", _bin(fleet, "pg_controldata"),
                                                      data]), timeout=30)
    if not listing.ok:
        return None
    control_text, _, files = listing.stdout.partition("-- pg_wal")
    control = postgres.parse_controldata(control_text)
    try:
        segment_size = int(control.get("Bytes per WAL segment", 16 << 20))
        redo = postgres.parse_lsn(control["Latest checkpoint's REDO location"])
        redo_timeline = int(control["Latest checkpoint's TimeLineID"])
    except (KeyError, ValueError):
        return None
    segments = [name for name in files.split() if len(name) == 24 and all(c in "0123456789ABCDEF" for c in name)]
    timeline = max([int(name[:8], 16) for name in segments] + [redo_timeline])
    start = redo if timeline == redo_timeline else min(
        postgres.segment_start(name, segment_size)[1] for name in segments if int(name[:8], 16) == timeline)
    dump = ssh(fleet, host, _as_postgres(fleet, ["sh", "-c", 'bin="$1"; data="$2"; tli="$3"; at="$4"; '
                                                 + postgres.WALDUMP_TO_END, "sh", fleet.model.postgres.bin_dir,
                                                 data, str(timeline), postgres.format_lsn(start)]), timeout=60)
    if not dump.reached:
        return None
    return postgres.wal_end_from_waldump(dump.stderr + dump.stdout, segment_size)


def plan_pg_rejoin(fleet, node: str, accept_risk: bool = False) -> tuple[PgPlan, PgClusterState]:
    cluster = cluster_of(fleet, node)
    view = _pg_view(fleet, cluster)
    state = view.state
    member = state.node(node)
    probe = view.probes[node]
    if member.role == "primary" and member.pgbouncer:
        raise Refused(state, f"refused: {node} accepts writes and PgBouncer routes {', '.join(member.pgbouncer)} "
                             "to it: it is the live primary",
                      f"to make it a standby, switch over first (igops pg switchover {cluster} --to NODE)")
    writable = [name for name in view.writable() if name != node]
    if len(writable) != 1:
        raise Refused(state, f"refused: cluster {cluster} has {plural(len(writable), 'primary', 'primaries')} "
                             f"besides {node}",
                      "a node rejoins a cluster with exactly one primary: see `igops pg status`")
    primary = writable[0]
    plan = PgPlan("rejoin", cluster, f"Rejoin {node} to cluster {cluster} as a standby of {primary}", None, primary,
                  failure_hint=f"see `igops pg status {cluster}` and {node}'s Postgres log")
    if member.state == "host unreachable":
        raise RemoteError(f"{node}: host unreachable over SSH", "rejoin needs the host")
    if member.streaming_from == primary:
        record = view.repmgr_node(node)
        if record and record.type == "standby" and record.active and member.repmgr == f"standby of {primary}":
            plan.notes.append(f"nothing to do: {node} already streams from {primary}")
        else:
            plan.actions = [Step(f"{node}: record it as a standby of {primary} in repmgr's metadata (repmgr standby "
                                 "register --force)", "register_standby", (node, primary))]
        return _signed(plan, view), state
    reasons = []
    if member.role == "primary":
        reasons.append(f"{node} accepts writes: rejoining discards whatever it took after the timelines forked")
    if member.state == "hung":
        reasons.append(f"{node}'s postmaster runs but does not answer")
    refuse_or_force(state, reasons, accept_risk, plan.forced,
                    "make sure nothing on it is needed, then --accept-risk")
    plan.actions = with_repmgrd_paused(
        [*_rejoin_steps(node, primary, running=probe.server is not None or bool(probe.postmaster_running)),
         # pg_rewind copied the primary's segments, those of the promotion among them.
         _release_switch_segment_step(primary, [node])],
        on=primary, members=(primary, node))
    return _signed(plan, view), state


def _rejoin_steps(node: str, primary: str, running: bool) -> list[Step]:
    # pg_rewind (15) takes the source's timeline from its control file, which a freshly promoted
    # primary updates only at its next checkpoint: without one it rewinds to the wrong fork.
    steps = [Step(f"{primary}: CHECKPOINT, so pg_rewind reads its current timeline", "checkpoint", (primary,))]
    if running:
        steps.append(Step(f"{node}: stop (repmgr node service --action=stop)", "stop", (node,)))
    steps.append(Step(f"{node}: remove timeline history files of timelines it never reached (an aborted "
                      "promotion leaves one, which the new primary's timeline of that number is not)",
                      "remove_stale_history", (node,)))
    steps.append(Step(f"{node}: if it did not shut down cleanly, finish crash recovery first (a standby: as a "
                      "standby; a primary: in single-user mode)", "ensure_clean_shutdown", (node,)))
    steps += [
        Step(f"{node}: rejoin as a standby of {primary} (repmgr node rejoin --force-rewind: pg_rewind if its "
             "WAL diverged)", "rejoin", (node, primary)),
        Step(f"{node}: wait until it streams from {primary}", "wait_streaming", (node, primary)),
    ]
    return steps


def _reserve_rejoin_wal_step(candidate: str, primary: str) -> Step:
    # From the promotion until repmgr creates the old primary's slot at its rejoin, nothing on
    # the new primary holds the WAL that rejoin starts from (wal_keep_size may be 0): the
    # rejoin's own CHECKPOINT could remove that segment once writes have resumed. Reserved while
    # the candidate is still a standby, the slot starts at its last restartpoint, before anything
    # the old primary can need; repmgr node rejoin then streams through that very slot.
    return Step(f"{candidate}: reserve the WAL {primary} needs to rejoin (a replication slot named as repmgr names "
                f"{primary}'s, from {candidate}'s last restartpoint on)", "reserve_rejoin_wal", (candidate, primary),
                undo=_drop_rejoin_reservation_step(candidate, primary))


def _drop_rejoin_reservation_step(candidate: str, primary: str) -> Step:
    return Step(f"{candidate}: drop the slot reserved for {primary}'s rejoin, if no one streams through it",
                "drop_rejoin_reservation", (candidate, primary))


def _release_switch_segment_step(primary: str, standbys: list[str]) -> Step:
    return Step(f"{primary}: end its WAL segment, CHECKPOINT, then a restartpoint on "
                f"{', '.join(standbys) or 'no standby'} (so the old timelines' copies of the promotion's segment "
                "are removed)", "release_switch_segment", (primary, tuple(standbys)))


def with_repmgrd_paused(steps: list[Step], on: str, members: tuple[str, ...]) -> list[Step]:
    """With repmgrd running, the standby's repmgrd takes a planned stop of the primary for a
    failure and may promote on its own mid-way (repmgr's own switchover pauses it too): pause it
    on every member first (from `on`, a running member), unpause it last, and on any failure
    (from the first of `members` that answers). Where repmgrd does not run, the pause only sets
    the flag it would read."""
    if not steps:
        return steps
    unpause = Step("repmgrd: unpause it on every member (repmgr service unpause)", "unpause_repmgrd", (members,))
    return [Step(f"repmgrd: pause it on every member (repmgr service pause, from {on}), so that none promotes or "
                 "follows on its own mid-way", "pause_repmgrd", (on,), release=unpause), *steps, unpause]


def repmgrd_pause_outcome(output: str, pause: bool) -> tuple[list[str], list[str]]:
    """`repmgr service pause|unpause`'s NOTICE and WARNING lines: the nodes it reached, and those
    it did not (by name, or "node N" when it could not connect)."""
    done = "paused" if pause else "unpaused"
    reached, missed = [], []
    for line in output.splitlines():
        if match := re.search(r"node \d+ \((.+?)\) (not )?" + done + r"\b", line):
            (missed if match.group(2) else reached).append(match.group(1))
        elif match := re.search(r"unable to connect to node (\d+)", line):
            missed.append(f"node {match.group(1)}")
    return reached, missed


def repmgrd_not_back(states: dict[str, str | None]) -> list[str]:
    """The members whose repmgrd is not (yet) running unpaused, given each one's repmgrd state
    (None: its Postgres did not answer, so it is not waited for). A fleet runs repmgrd on every
    member or on none: where no member reports one, none is waited for."""
    if not any(state in ("running", "paused") for state in states.values()):
        return []
    return [node for node, state in states.items() if state in ("not running", "paused")]


def candidate_verdict(node: str, cluster: str, in_recovery: bool | None, asked: bool,
                      checked: dict[str, str] | None, error: str | None) -> str:
    """Whether a switchover's undo may start the old primary again, as far as `node` (a member
    that may have been promoted) goes: only if it verifiably is not a primary and cannot become
    one. `in_recovery`: what it answered (None: it did not); `asked`: a promotion was or may have
    been requested; `checked`: what the host said once its postmaster was stopped (None: not
    checked, `error` says why). Returns how it was verified; raises IgopsError otherwise."""
    if in_recovery is False:
        raise IgopsError(f"{node} accepts writes: it was promoted",
                         f"finish with `igops pg switchover {cluster} --to {node}`")
    if in_recovery and not asked:
        return f"{node} is a standby nobody asked to promote"
    if checked is None:
        # Unreachable is unknown, never "still a standby": it may have been promoted.
        raise IgopsError(f"cannot tell whether {node} was promoted: {error or 'its host was not asked'}",
                         f"when {node}'s host answers: `igops pg status {cluster}`, then `igops pg switchover "
                         f"{cluster} --to NODE` finishes or rolls back")
    if "postmaster" in checked:
        raise IgopsError(f"cannot tell whether {node} was promoted: its postmaster did not stop",
                         f"stop it, then `igops pg status {cluster}`")
    control = checked.get("control", "").strip()
    stopped = "stopped" in checked
    if control not in ("in archive recovery", "shut down in recovery"):
        raise IgopsError(f"{node} is not verifiably a standby: its control file says {control or 'nothing'!r}"
                         + (" (igops stopped it)" if stopped else ""),
                         f"if it was promoted, start it and finish with `igops pg switchover {cluster} --to {node}`")
    return f"{node} " + ("stopped by igops" if stopped else "is down") + f", {control}, fenced"


# --- applying ------------------------------------------------------------------------------------------
class PgActions:
    """The actions a Postgres plan's steps name, with what they learn along the way."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.wal_end: int | None = None
        self.promote_requested: set[str] = set()  # members asked to promote: only a stopped one is known not to
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        # PgBouncer host -> its databases file, read before writes are paused so that the pause
        # holds only the write
        self.databases_files: dict[str, str] = {}
        # Armed before every PAUSE, released by the RESUME: a pause never outlives igops by more
        # than [pgbouncer] watchdog_deadline (igops/bouncer_watchdog.py).
        self.watchdogs = PauseWatchdogs(fleet)

    def _databases_file(self, host) -> str:
        return self.fleet.path_for(self.fleet.model.pgbouncer.databases_file, host)

    def read_databases_files(self, databases: dict[str, list[str]]) -> None:
        def one(host_name: str) -> tuple[str, str]:
            host = self._host(host_name)
            return host_name, read_file(self.fleet, host, self._databases_file(host))

        self.databases_files.update(parallel_map(one, list(databases)))

    def _host(self, name: str):
        return self.fleet.host(name)

    def _cluster_of(self, name: str) -> str:
        return cluster_of(self.fleet, name)

    def _bouncers(self, databases: dict[str, list[str]], method: str, *args) -> None:
        def one(item):
            host_name, names = item
            getattr(postgres.Bouncer(self.fleet, self._host(host_name)), method)(names, *args)

        parallel_map(one, list(databases.items()))

    def checkpoint(self, node: str) -> None:
        connection = postgres.connect(self.fleet, self._host(node), statement_timeout_ms=None)
        try:
            with connection.cursor() as cursor:
                cursor.execute("CHECKPOINT")
        finally:
            connection.close()

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

        def one(item):
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
            bouncer = postgres.Bouncer(fleet, host)
            bouncer.reload()
            wrong = [database.name for database in bouncer.databases()
                     if database.name in names and database.host != str(target.address)]
            if wrong:
                raise IgopsError(f"{host_name}: after RELOAD, {', '.join(wrong)} still route elsewhere",
                                 f"check {path} and PgBouncer's log")

        parallel_map(one, list(databases.items()))
        return f"{_bouncer_text(databases)} -> {target.address}:{port}"

    def stop_and_fence(self, node: str) -> str:
        fleet = self.fleet
        host = self._host(node)
        data = _data_directory(fleet, host)
        script = ('set -e; bin="$1"; data="$2"; shift 2; touch "$data/standby.signal"; '
                  'if "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then "$@"; fi; '
                  '"$bin/pg_controldata" -D "$data"; echo "-- waldump"; '
                  'at=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Latest checkpoint location: *//p"); '
                  'tli=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Latest checkpoint.s TimeLineID: *//p"); '
                  + postgres.WALDUMP_TO_END)
        stop = _repmgr_argv(fleet, host, "node", "service", "--action=stop")
        output = ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", script, "sh", fleet.model.postgres.bin_dir, data,
                                                          *stop]), "clean stop", timeout=STOP_TIMEOUT)
        control_text, _, dump = output.partition("-- waldump")
        control = postgres.parse_controldata(control_text)
        if control.get("Database cluster state") != "shut down":
            raise IgopsError(f"{node} did not shut down cleanly: "
                             f"{control.get('Database cluster state', 'state unknown')}")
        self.wal_end = postgres.wal_end_from_waldump(dump, int(control.get("Bytes per WAL segment", 16 << 20)))
        if self.wal_end is None:
            raise IgopsError(f"cannot tell where {node}'s WAL ends: {dump.strip()[-200:]}")
        return f"shut down; WAL ends at {postgres.format_lsn(self.wal_end)}"

    # A candidate that does not answer as a primary: its postmaster is stopped (a promotion under
    # way dies with it), then its control file tells whether it was promoted. One still in
    # recovery is fenced and its promote request removed, so it can only come back a standby.
    _STOP_AND_READ_CONTROL = ('bin="$1"; data="$2"; '
                              'if "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then '
                              '"$bin/pg_ctl" stop -D "$data" -m immediate -w -t 30 >/dev/null 2>&1 || '
                              '{ echo "postmaster=still running"; exit 0; }; echo stopped=1; fi; '
                              'state=$("$bin/pg_controldata" -D "$data" | sed -n "s/^Database cluster state: *//p"); '
                              'echo "control=$state"; case "$state" in "in archive recovery"|"shut down in recovery") '
                              'touch "$data/standby.signal"; rm -f "$data/promote";; esac')

    def _verify_not_promoted(self, node: str) -> str:
        """Raise unless `node` verifiably is not a primary and cannot become one; say how."""
        fleet = self.fleet
        host = self._host(node)
        data = _data_directory(fleet, host)
        try:
            connection = postgres.connect(fleet, host)
            try:
                in_recovery = postgres.server_state(connection).in_recovery
            finally:
                connection.close()
        except postgres.Unavailable:
            in_recovery = None
        asked = node in self.promote_requested
        if in_recovery and not asked:
            # An interrupted run may have asked: pg_promote leaves a promote file until the
            # startup process takes it. Unknown counts as asked.
            asked = ssh(fleet, host, ["test", "-e", f"{data}/promote"], timeout=20).exit_code != 1
        checked, error = None, None
        if in_recovery is not False and (asked or not in_recovery):
            result = ssh(fleet, host, _as_postgres(fleet, ["sh", "-c", self._STOP_AND_READ_CONTROL, "sh",
                                                           fleet.model.postgres.bin_dir, data]), timeout=60)
            if result.ok:
                checked = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
            else:
                error = failure_reason(result)
        return candidate_verdict(node, self._cluster_of(node), in_recovery, asked, checked, error)

    def unfence_and_start(self, node: str, others: tuple[str, ...]) -> str:
        """Start the old primary again, only once no other member is or can become a primary, and
        only after a shutdown still under way (a stop cut off at its timeout) has finished."""
        fleet = self.fleet
        host = self._host(node)
        verified = [self._verify_not_promoted(other) for other in others]
        socket = fleet.path_for(fleet.model.postgres.socket_dir, host)
        script = ('bin="$1"; data="$2"; socket="$3"; port="$4"; wait="$5"; shift 5; rm -f "$data/standby.signal"; '
                  'while "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; do '
                  '"$bin/pg_isready" -q -h "$socket" -p "$port" && { echo running; exit 0; }; '
                  '[ "$wait" -le 0 ] && { echo "still shutting down" >&2; exit 1; }; wait=$((wait - 1)); sleep 1; '
                  'done; exec "$@"')
        ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", script, "sh", fleet.model.postgres.bin_dir,
                                                 _data_directory(fleet, host), socket, str(fleet.model.postgres.port),
                                                 str(int(STOP_TIMEOUT) * 2),
                                                 *_repmgr_argv(fleet, host, "node", "service", "--action=start")]),
               "start", timeout=STOP_TIMEOUT * 2 + 90)
        return "; ".join([*verified, self._wait_writable(node)])

    def _wait_writable(self, node: str) -> str:
        """A started primary must take a write (an xid), not merely answer."""
        deadline = time.monotonic() + STREAMING_TIMEOUT
        last = "not tried"
        while time.monotonic() < deadline:
            try:
                connection = postgres.connect(self.fleet, self._host(node))
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_is_in_recovery()")
                        if cursor.fetchone()[0]:
                            last = "it is in recovery (read-only)"
                        else:
                            cursor.execute("SELECT txid_current()")
                            return f"{node} accepts writes"
                finally:
                    connection.close()
            except postgres.Unavailable as exc:
                last = exc.detail
            time.sleep(0.2)
        raise IgopsError(f"{node} was started but does not accept writes after {STREAMING_TIMEOUT:g} s: {last}",
                         f"see {node}'s Postgres log")

    # repmgr's exit code when it could not pause or unpause every node (ERR_REPMGRD_PAUSE).
    _SOME_NODES_MISSED = 26

    def _repmgrd(self, node: str, pause: bool) -> remote.HostResult:
        host = self._host(node)
        return ssh(self.fleet, host, _repmgr(self.fleet, host, "service", "pause" if pause else "unpause"),
                   timeout=60)

    def pause_repmgrd(self, on: str) -> str:
        result = self._repmgrd(on, True)
        if result.exit_code not in (0, self._SOME_NODES_MISSED):
            raise RemoteError(f"{on}: repmgr service pause failed: {failure_reason(result)}")
        reached, missed = repmgrd_pause_outcome(result.stdout + result.stderr, True)
        # A member whose Postgres is down cannot be reached; its repmgrd cannot promote it meanwhile.
        return f"paused on {', '.join(reached) or 'no member'}" + (f"; not on {', '.join(missed)}" if missed else "")

    def unpause_repmgrd(self, members: tuple[str, ...]) -> str:
        failures = []
        for node in members:
            result = self._repmgrd(node, False)
            if result.exit_code in (0, self._SOME_NODES_MISSED):
                reached, missed = repmgrd_pause_outcome(result.stdout + result.stderr, False)
                return (f"unpaused on {', '.join(reached) or 'no member'}"
                        + (f"; not on {', '.join(missed)} (repmgr keeps the pause across a restart: unpause it "
                           "once it runs, e.g. by `igops pg rejoin` it)" if missed else "")
                        + self._await_repmgrd(members))
            failures.append(f"{node}: {failure_reason(result)}")
        raise RemoteError("repmgr service unpause failed everywhere: " + "; ".join(failures),
                          "run `repmgr service unpause` on a running member")

    def _await_repmgrd(self, members: tuple[str, ...]) -> str:
        """A member whose Postgres restarted (the old primary, a rejoined node) knows its repmgrd
        again only once the daemon reconnects, and that repmgrd reads back a pause the unpause
        did not reach: the run ends when every repmgrd is seen running and unpaused, so that
        the state shown after it is the one that lasts."""
        deadline = time.monotonic() + REPMGRD_RECONNECT_TIMEOUT
        while True:
            states = {node: self._repmgrd_state(node) for node in members}
            behind = repmgrd_not_back(states)
            for node in (name for name in behind if states[name] == "paused"):
                self._repmgrd(node, False)
            if not behind:
                return ""
            if time.monotonic() > deadline:
                return (f"; repmgrd not back on {', '.join(behind)} after {REPMGRD_RECONNECT_TIMEOUT:g} s "
                        "(see its log; `repmgr service status` shows it)")
            time.sleep(0.5)

    def _repmgrd_state(self, node: str) -> str | None:
        try:
            connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        except postgres.Unavailable:
            return None
        try:
            return postgres.repmgrd_state(connection)
        finally:
            connection.close()

    def unfence(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(self.fleet, host, _as_postgres(self.fleet, ["rm", "-f", f"{_data_directory(self.fleet, host)}/"
                                                                    "standby.signal"]), "removing standby.signal")

    def fence(self, node: str, stop_first: bool) -> str:
        fleet = self.fleet
        host = self._host(node)
        data = _data_directory(fleet, host)
        if stop_first:
            ssh_ok(fleet, host, _as_postgres(fleet, [_bin(fleet, "pg_ctl"), "stop", "-D", data, "-m", "immediate",
                                                     "-w", "-t", "30"]), "immediate stop", timeout=60)
        ssh_ok(fleet, host, _as_postgres(fleet, ["touch", f"{data}/standby.signal"]), "writing standby.signal")
        return f"{data}/standby.signal"

    def resume_replay(self, node: str) -> None:
        connection = postgres.connect(self.fleet, self._host(node))
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_wal_replay_resume()")
        finally:
            connection.close()

    def wait_received(self, node: str) -> str:
        connection = postgres.connect(self.fleet, self._host(node))
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        try:
            while True:
                # Replayed counts too: a standby restarted since reports nothing received.
                received = _received(postgres.server_state(connection))
                if self.wal_end is not None and received >= self.wal_end:
                    return f"received up to {postgres.format_lsn(received)}"
                if time.monotonic() > deadline:
                    raise IgopsError(f"{node} received WAL only up to {postgres.format_lsn(received)}, the old "
                                     f"primary's ends at {postgres.format_lsn(self.wal_end or 0)}")
                time.sleep(0.01)
        finally:
            connection.close()

    def promote(self, node: str) -> str:
        import psycopg2

        self.promote_requested.add(node)
        started = time.monotonic()
        try:
            connection = postgres.connect(self.fleet, self._host(node), statement_timeout_ms=None)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_promote(true, %s)", (PROMOTE_TIMEOUT,))
                    promoted = cursor.fetchone()[0]
            finally:
                connection.close()
        except (postgres.Unavailable, psycopg2.Error) as exc:
            raise IgopsError(f"{node} did not promote: {postgres.first_line(exc)}; {self.log_cause(node)}",
                             f"see {node}'s Postgres log") from None
        if not promoted:
            raise IgopsError(f"{node} did not finish promoting within {PROMOTE_TIMEOUT} s; {self.log_cause(node)}",
                             f"see {node}'s Postgres log")
        return f"promoted in {(time.monotonic() - started) * 1000:.0f} ms"

    def log_cause(self, node: str) -> str:
        """The last PANIC, FATAL or ERROR in a member's Postgres log, and where that log is: the
        `-l` file of repmgr's service_start_command, else the newest file of the logging collector."""
        fleet = self.fleet
        host = self._host(node)
        data = _data_directory(fleet, host)
        try:
            path = postgres.log_file_of(read_file(fleet, host, fleet.path_for(fleet.model.postgres.repmgr_config,
                                                                                host)))
            script = ('if [ -n "$1" ]; then log="$1"; else log=$(ls -t "$2"/log/* "$2"/pg_log/* 2>/dev/null '
                      '| head -n 1); fi; [ -n "$log" ] || exit 3; echo "$log"; tail -n 300 "$log"')
            output = ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", script, "sh", path or "", data]),
                            "reading its log", timeout=30)
        except IgopsError as exc:
            return f"its log could not be read ({exc.one_line()})"
        path, _, text = output.partition("\n")
        cause = postgres.log_cause(text, since="received promote request")
        return f"its log ({path}) says: {cause}" if cause else f"its log ({path}) names no error"

    def register_primary(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(self.fleet, host, _repmgr(self.fleet, host, "primary", "register", "--force"),
               "repmgr primary register")

    def register_standby(self, node: str, primary: str) -> None:
        host = self._host(node)
        upstream = self._repmgr_record(primary)
        ssh_ok(self.fleet, host, _repmgr(self.fleet, host, "standby", "register", "--force",
                                         f"--upstream-node-id={upstream.node_id}"), "repmgr standby register")

    def stop(self, node: str) -> None:
        host = self._host(node)
        ssh_ok(self.fleet, host, _repmgr(self.fleet, host, "node", "service", "--action=stop"), "stop", timeout=90)

    # Single-user mode refuses standby mode, so standby.signal steps aside for the run and comes
    # back whatever happens (pg_rewind does the same when it recovers a target itself).
    _SINGLE_USER = ('set -e; data="$1"; shift; hidden=; '
                    'if [ -e "$data/standby.signal" ]; then mv "$data/standby.signal" "$data/standby.signal.igops"; '
                    'hidden=1; fi; '
                    'restore() { if [ -n "$hidden" ]; then '
                    'mv "$data/standby.signal.igops" "$data/standby.signal"; fi; }; '
                    'trap restore EXIT; "$@" </dev/null')

    def ensure_clean_shutdown(self, node: str) -> str:
        """pg_rewind needs a cleanly shut down target. A crashed one is recovered the way pg_rewind
        would, but with the server's own configuration, which may live outside the data directory
        (Debian's /etc/postgresql) where pg_rewind's own recovery cannot find it."""
        fleet = self.fleet
        host = self._host(node)
        data = _data_directory(fleet, host)
        script = '"$1" -D "$2"; echo "-- postmaster.opts"; cat "$2/postmaster.opts" 2>/dev/null || true'
        output = ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", script, "sh", _bin(fleet, "pg_controldata"),
                                                          data]), "pg_controldata")
        control_text, _, opts = output.partition("-- postmaster.opts")
        state = postgres.parse_controldata(control_text).get("Database cluster state", "unknown")
        if state in ("shut down", "shut down in recovery"):
            return f"{state} cleanly already"
        if state == "in archive recovery":
            # A standby that crashed (or whose promotion died): recovering it outside standby mode
            # would write a checkpoint of its own on the primary's timeline, where the primary's
            # later WAL differs and pg_rewind sees no fork. It starts as the standby it is instead.
            for action in ("start", "stop"):
                ssh_ok(fleet, host, _repmgr(fleet, host, "node", "service", f"--action={action}"),
                       f"{action} as a standby", timeout=REJOIN_TIMEOUT)
            return f"was {state}: started as a standby and stopped cleanly"
        single_user = [_bin(fleet, "postgres"), "--single", "-F", *postgres.server_arguments(opts.strip(), data),
                       "template1"]
        ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", self._SINGLE_USER, "sh", data, *single_user]),
               "single-user crash recovery", timeout=REJOIN_TIMEOUT)
        return f"was {state}: crash recovery done"

    # History files of timelines past the node's own (its last checkpoint's, or the one its
    # recovery reached): it never was on them, so they are leftovers, e.g. of a promotion that
    # died after it chose its new timeline. A standby takes the history of a timeline it does not
    # have from its primary, so one of the same number made elsewhere must go.
    _STALE_HISTORY = ('set -e; bin="$1"; data="$2"; control=$("$bin/pg_controldata" -D "$data"); '
                      'own=$(printf "%s\\n" "$control" | sed -n "s/^Latest checkpoint.s TimeLineID: *//p"); '
                      'reached=$(printf "%s\\n" "$control" | sed -n "s/^Min recovery ending loc.s timeline: *//p"); '
                      '[ "${reached:-0}" -gt "$own" ] && own=$reached; '
                      'for file in "$data"/pg_wal/*.history; do [ -e "$file" ] || continue; '
                      'name=$(basename "$file" .history); [ $((0x$name)) -gt "$own" ] || continue; '
                      'rm -f "$file" "$data/pg_wal/archive_status/$name.history.ready" '
                      '"$data/pg_wal/archive_status/$name.history.done"; echo "$name.history"; done')

    def remove_stale_history(self, node: str) -> str:
        fleet = self.fleet
        host = self._host(node)
        output = ssh_ok(fleet, host, _as_postgres(fleet, ["sh", "-c", self._STALE_HISTORY, "sh",
                                                          fleet.model.postgres.bin_dir, _data_directory(fleet, host)]),
                        "removing stale timeline history files")
        removed = output.split()
        return f"removed {', '.join(removed)}" if removed else "none"

    def _repmgr_record(self, node: str) -> postgres.RepmgrNode:
        """A node's record in repmgr's metadata, as the node itself has it."""
        connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        try:
            record = next((n for n in postgres.repmgr_nodes(connection) if n.name == node), None)
        finally:
            connection.close()
        if record is None:
            raise IgopsError(f"{node} is not in repmgr's metadata", "register it with repmgr first")
        return record

    def rejoin(self, node: str, primary: str) -> str:
        host = self._host(node)
        output = ssh_ok(self.fleet, host, _repmgr(self.fleet, host, "node", "rejoin", "-d",
                                                  self._repmgr_record(primary).conninfo,
                                                  "--force-rewind", "--verbose"),
                        "repmgr node rejoin", timeout=REJOIN_TIMEOUT)
        rewound = "rewinding from last common checkpoint" in output or "servers diverged" in output
        return "pg_rewind rewound it" if rewound else "no rewind needed"

    def follow(self, node: str, primary: str) -> None:
        host = self._host(node)
        upstream = self._repmgr_record(primary)
        ssh_ok(self.fleet, host, _repmgr(self.fleet, host, "standby", "follow",
                                         f"--upstream-node-id={upstream.node_id}"), "repmgr standby follow",
               timeout=REJOIN_TIMEOUT)

    def wait_streaming(self, node: str, primary: str) -> str:
        deadline = time.monotonic() + STREAMING_TIMEOUT
        address = str(self._host(node).address)
        while True:
            try:
                connection = postgres.connect(self.fleet, self._host(primary))
                try:
                    replicas = postgres.server_state(connection).replicas
                finally:
                    connection.close()
                streaming = [r for r in replicas if r.state == "streaming" and (r.name == node or r.address == address)]
                if streaming:
                    return f"streaming, replayed up to {_lsn_text(streaming[0].replay_lsn)}"
            except postgres.Unavailable:
                pass
            if time.monotonic() > deadline:
                raise IgopsError(f"{node} does not stream from {primary} after {STREAMING_TIMEOUT:g} s",
                                 f"see {node}'s Postgres log")
            time.sleep(0.2)

    def _slot_of(self, cursor, node: str) -> str:
        cursor.execute("SELECT slot_name FROM repmgr.nodes WHERE node_name = %s", (node,))
        row = cursor.fetchone()
        if not row or not row[0]:
            raise IgopsError(f"repmgr's metadata names no replication slot for {node}",
                             "set use_replication_slots in repmgr.conf and re-register the member")
        return row[0]

    def reserve_rejoin_wal(self, node: str, for_node: str) -> str:
        connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        try:
            with connection.cursor() as cursor:
                slot = self._slot_of(cursor, for_node)
                cursor.execute("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                row = cursor.fetchone()
                if row is None:
                    cursor.execute("SELECT lsn::text FROM pg_create_physical_replication_slot(%s, true)",
                                   (slot,))
                    return f"{slot} holds WAL from {cursor.fetchone()[0]}"
                return f"{slot} exists already (from {row[0] or 'no position'})"
        finally:
            connection.close()

    def drop_rejoin_reservation(self, node: str, for_node: str) -> str:
        connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        try:
            with connection.cursor() as cursor:
                slot = self._slot_of(cursor, for_node)
                cursor.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                               "WHERE slot_name = %s AND NOT active", (slot,))
                return f"dropped {slot}" if cursor.rowcount else f"{slot}: none inactive"
        finally:
            connection.close()

    def release_switch_segment(self, primary: str, standbys: tuple = ()) -> str:
        """A promotion copies the segment it happened in onto the new timeline, and Postgres
        removes segments by number whatever their timeline: while the WAL stays in that segment
        (an idle cluster), checkpoints keep every timeline's copy, 16 MB per promotion on each
        member. So: end the segment; wait until the standbys' slots have moved past it (a slot
        holds back what its standby has not flushed); CHECKPOINT; then a restartpoint on each
        standby once it has replayed that checkpoint. `wal_keep_size` keeps every timeline's
        copies of its last segments as well: the copies go when the WAL moves past it."""
        deadline = time.monotonic() + STREAMING_TIMEOUT
        connection = postgres.connect(self.fleet, self._host(primary), statement_timeout_ms=None)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_switch_wal()")
                cursor.execute("SELECT pg_current_wal_lsn()::text")
                _wait_until(cursor, "SELECT NOT EXISTS (SELECT FROM pg_replication_slots WHERE active AND "
                            "slot_type = 'physical' AND restart_lsn < %s::pg_lsn)", cursor.fetchone()[0], deadline,
                            f"the standbys' slots on {primary} did not move past the switched segment")
                cursor.execute("CHECKPOINT")
                cursor.execute("SELECT pg_current_wal_lsn()::text")
                checkpointed = cursor.fetchone()[0]
                counts = [f"{primary} {_wal_segments(cursor)}"]
        finally:
            connection.close()
        for standby in standbys:
            connection = postgres.connect(self.fleet, self._host(standby), statement_timeout_ms=None)
            try:
                with connection.cursor() as cursor:
                    _wait_until(cursor, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", checkpointed, deadline,
                                f"{standby} did not replay {primary}'s checkpoint")
                    cursor.execute("CHECKPOINT")
                    counts.append(f"{standby} {_wal_segments(cursor)}")
            finally:
                connection.close()
        return "WAL segments left: " + ", ".join(counts)


def _wait_until(cursor, query: str, position: str, deadline: float, what: str) -> None:
    while True:
        cursor.execute(query, (position,))
        if cursor.fetchone()[0]:
            return
        if time.monotonic() > deadline:
            raise IgopsError(f"{what} ({position}) within {STREAMING_TIMEOUT:g} s",
                             "see `igops pg status`; the old timelines' segments go once the WAL moves on")
        time.sleep(0.1)


def _wal_segments(cursor) -> int:
    cursor.execute("SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'")
    return cursor.fetchone()[0]


def apply_pg(fleet, plan: PgPlan, reporter: Reporter = Reporter()) -> PgResult:
    actions = PgActions(fleet)
    reports = execute(plan.actions, actions, reporter, plan.failure_hint,
                      left_behind=lambda: describe_left_behind(pg_status(fleet, plan.cluster)))
    pause_ms = ((actions.resumed_at - actions.paused_at) * 1000
                if actions.paused_at is not None and actions.resumed_at is not None else None)
    return PgResult(plan.operation, plan.cluster, plan.old_primary, plan.new_primary,
                    round(pause_ms, 1) if pause_ms is not None else None, plan.bytes_at_risk, reports)


def describe_left_behind(state: PgClusterState) -> str:
    """One line for a failure's message: the primary, PgBouncer, and every other member."""
    routes = sorted({target for table in state.pgbouncer.values() for target in table.values()})
    parts = [f"{state.primary} is the primary" if state.primary else "NO member accepts writes",
             f"PgBouncer routes to {', '.join(routes) or 'nothing'}"
             + (f" with {_bouncer_text(state.paused)} PAUSED" if state.paused else " and is not paused")]
    for node in state.nodes:
        if node.name != state.primary:
            parts.append(f"{node.name} is " + (node.role if node.role != "unknown" else node.state)
                         + (f" ({node.control_state})" if node.control_state else "")
                         + (", fenced" if node.fenced and node.role != "standby" else ""))
    return "; ".join(parts)


# ==================================================================================================
# Redis
# ==================================================================================================
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
class _RedisView:
    fleet: Any
    states: dict[str, redisops.NodeState | None]
    down: dict[str, postgres.Unavailable]
    state: RedisState

    def masters(self) -> list[str]:
        return [name for name, node in self.states.items() if node and node.role == "master"]


def redis_members(fleet) -> list[str]:
    redis = fleet.model.redis
    if not redis.master:
        raise UsageError("the inventory has no Redis nodes", "set [redis] master and replicas")
    return [redis.master, *redis.replicas]


def _redis_address(fleet, name: str) -> str:
    return f"{fleet.host(name).address}:{fleet.model.redis.port}"


def directory_connection(fleet):
    """A connection to the directory database on its cluster's live primary."""
    shards = fleet.model.shards
    cluster = shards.directory_cluster or next(iter(fleet.model.postgres.clusters), None)
    if cluster is None:
        raise UsageError("the inventory has no Postgres cluster for the directory", "set [shards] directory_cluster")
    for name in cluster_members(fleet, cluster):
        try:
            connection = postgres.connect(fleet, fleet.host(name), shards.directory_database)
        except postgres.Unavailable:
            continue
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery()")
            if not cursor.fetchone()[0]:
                return connection
        connection.close()
    raise IgopsError(f"no primary of cluster {cluster} answers: the directory cannot be read or changed",
                     f"see `igops pg status {cluster}`")


def _redis_view(fleet) -> _RedisView:
    members = redis_members(fleet)

    def endpoint():
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
    return _RedisView(fleet, states, down, redis_state_of(fleet, states, down, address, version, directory_error))


def redis_state_of(fleet, states: dict[str, redisops.NodeState | None], down: dict[str, postgres.Unavailable],
                   address: str | None, version: int | None, directory_error: str | None) -> RedisState:
    """The Redis tier from what each node said of itself (None and an entry in `down` for one
    that did not answer) and the directory's redis_master endpoint (or why it could not be read)."""
    members = redis_members(fleet)
    by_address = {_redis_address(fleet, name): name for name in members}
    app_master = by_address.get(address) if address else None
    nodes = []
    for name in members:
        node_state = states.get(name)
        node = RedisNode(name, _redis_address(fleet, name), "unknown", "running", app_master=name == app_master)
        if node_state is None:
            node.state = "hung" if down[name].kind == "timeout" else "down"
            node.detail = down[name].detail
        else:
            node.role = node_state.role
            node.offset = node_state.offset
            node.priority = node_state.priority
            if node_state.role == "replica":
                node.master = by_address.get(node_state.master_address, node_state.master_address)
                node.link = "up" if node_state.link_up else "down" if node_state.link_down_s is None \
                    else f"down ({node_state.link_down_s} s)"
                node.read_only = node_state.read_only
        nodes.append(node)
    reference = states.get(app_master) if app_master else None
    for node in nodes:
        if reference and reference.role == "master" and node.offset is not None and node.name != app_master:
            node.lag_bytes = max(0, reference.offset - node.offset)
    state = RedisState(nodes, app_master, address, version)
    state.problems = _redis_problems(fleet, state, directory_error)
    return state


def _redis_problems(fleet, state: RedisState, directory_error: str | None) -> list[str]:
    problems = []
    masters = [node.name for node in state.nodes if node.role == "master"]
    if directory_error:
        problems.append(directory_error)
    elif state.app_address is None:
        problems.append("the directory names no Redis master")
    elif state.app_master is None:
        problems.append(f"the directory's Redis master {state.app_address} is not a Redis node of the inventory")
    elif state.node(state.app_master).role != "master":
        problems.append(f"the app writes to {state.app_master}, which is "
                        + ("down" if state.node(state.app_master).role == "unknown" else "a replica"))
    if len(masters) > 1:
        problems.append(f"{plural(len(masters), 'master')}: {', '.join(masters)}"
                        + (f" (the app uses {state.app_master})" if state.app_master in masters else ""))
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


def redis_status(fleet) -> RedisState:
    return _redis_view(fleet).state


@dataclass
class RedisPlan:
    operation: str
    title: str
    old_master: str | None
    new_master: str | None
    forced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actions: list[Step] = field(default_factory=list)
    failure_hint: str = "see `igops redis status` for where things stand"
    signature: tuple = ()  # the state the plan was made for (see check_unchanged)

    def steps(self) -> list[str]:
        return [step.title for step in self.actions]


@dataclass
class RedisResult:
    operation: str
    old_master: str | None
    new_master: str | None
    write_pause_ms: float | None
    endpoint_version: int | None
    steps: list[StepReport]


def plan_redis_switchover(fleet, target: str, accept_risk: bool = False,
                          promoted_by_interrupted_run: bool = False) -> tuple[RedisPlan, RedisState]:
    """`promoted_by_interrupted_run`: the journal of the switchover being resumed shows it
    promoted `target` and never demoted the master the app uses (igops.interrupted)."""
    members = redis_members(fleet)
    if target not in members:
        raise UsageError(f"{target} is not a Redis node", inventory.unknown_name_hint(target, members, "nodes"))
    view = _redis_view(fleet)
    state = view.state
    masters = view.masters()
    current = state.app_master if state.app_master in masters else (masters[0] if len(masters) == 1 else None)
    if current is None:
        raise Refused(state, "refused: " + ("no Redis master answers" if not masters else
                                          f"{plural(len(masters), 'master')} and the app uses none of them"),
                      "if the master is down use `igops redis failover`; see `igops redis status`")
    node = state.node(target)
    if target == current:
        if state.app_master == target and len(masters) == 1:
            return _signed(RedisPlan("switchover", f"Nothing to do: {target} is the master and the app uses it",
                                     target, target), view), state
        return _signed(_plan_redis_finish(fleet, view, "switchover", target), view), state
    others = [name for name in members if name not in (current, target) and view.states[name] is not None]
    if node.role == "master" and promoted_by_interrupted_run and state.app_master == current:
        # The app wrote only to `current` (the directory never moved): `target`'s copy is the
        # older one, so it follows `current` again before the switchover runs from the start.
        plan = RedisPlan("switchover", f"Finish the switchover from {current} to {target}, which an interrupted "
                                       f"run left with {target} promoted and {current} still the app's master",
                         current, target)
        plan.actions = [Step(f"{target}: REPLICAOF {current} again (the app kept writing to {current})", "replicate",
                             (target, current)),
                        Step(f"{target}: wait until its link to {current} is up", "wait_link", (target,)),
                        *redis_switchover_steps(fleet, current, target, others)]
        return _signed(plan, view), state
    if node.role != "replica":
        raise Refused(state, f"refused: {target} is not a replica "
                             f"({node.state if node.role == 'unknown' else node.role})",
                      "pick a running replica (igops redis status); if a switchover was interrupted after it "
                      "promoted this node, `igops ops list` shows it: igops ops resume|abort ID")
    plan = RedisPlan("switchover", f"Switch the Redis master from {current} to {target}", current, target)
    reasons = []
    if node.master != current or node.link != "up":
        reasons.append(f"{target} does not follow {current} over a live link ({node.master}, link {node.link})")
    lag = view.states[current].offset - (node.offset or 0)
    if lag > fleet.model.redis.max_lag_bytes:
        reasons.append(f"{target} lags {lag} bytes (threshold {fleet.model.redis.max_lag_bytes})")
    if node.read_only is False:
        reasons.append(f"{target} accepts writes as a replica")
    refuse_or_force(state, reasons, accept_risk, plan.forced,
                    "wait for it to catch up, pick another replica, or --accept-risk")
    plan.actions = redis_switchover_steps(fleet, current, target, others)
    return _signed(plan, view), state


def _plan_redis_finish(fleet, view: _RedisView, operation: str, master: str) -> RedisPlan:
    """`master` is the one master: finish what an interrupted operation left (a switchover killed
    after the demotion leaves the app pointed at the old master, now a replica, and the config
    files with the old roles): the others follow it, the directory names it, the files say so."""
    state = view.state
    plan = RedisPlan(operation, f"Finish: {master} is the master; point the app and the others at it",
                     state.app_master, master)
    others = [name for name in redis_members(fleet) if name != master and view.states[name] is not None
              and not (state.node(name).role == "replica" and state.node(name).master == master)]
    plan.actions = [Step(f"{name}: REPLICAOF {master}", "replicate", (name, master)) for name in others]
    if state.app_master != master:
        plan.actions.append(Step(f"directory: redis_master = {_redis_address(fleet, master)} (version bump)",
                                 "point_app", (master,)))
    answering = tuple(name for name in redis_members(fleet) if view.states[name] is not None)
    plan.actions.append(Step(f"config files: {master} as master, {', '.join(n for n in answering if n != master)} "
                             f"as replicas of {master}", "persist_roles", (master, answering)))
    return plan


def redis_switchover_steps(fleet, current: str, target: str, others: list[str]) -> list[Step]:
    pause = fleet.model.redis.pause_timeout
    unpause = Step(f"{current}: CLIENT UNPAUSE (paused writes are refused READONLY and retried on {target})",
                   "unpause", (current,))
    steps = [
        Step(f"{current}, {target}: connect now, so that no connection has to be set up while writes wait",
             "hold_connections", (current, target)),
        Step(f"{current}: CLIENT PAUSE WRITE (writes wait, reads go on; released by Redis itself after {pause:g} s)",
             "pause_writes", (current,), release=unpause),
        Step(f"{target}: wait until its offset reaches {current}'s (at most {pause / 2:g} s)", "wait_offset",
             (current, target)),
        Step(f"{target}: REPLICAOF NO ONE (master now; first checks it is level with {current} and the pause has "
             f"over {PAUSE_MARGIN:g} s left)", "promote", (target, current),
             undo=Step(f"{target}: REPLICAOF {current} again", "replicate", (target, current))),
        Step(f"{current}: REPLICAOF {target} (it can take no more writes)", "demote", (current, target),
             point_of_no_return=True),
    ]
    steps += [Step(f"{name}: REPLICAOF {target}", "replicate", (name, target)) for name in others]
    steps += [
        Step(f"directory: redis_master = {_redis_address(fleet, target)} (version bump; the app follows within "
             "about 1 s, at once on READONLY)", "point_app", (target,)),
        unpause,
        Step(f"config files: {target} as master, {', '.join([current, *others])} as replicas of {target} (a "
             "restart keeps the roles)", "persist_roles", (target, (target, current, *others))),
        Step(f"{current}: wait until its link to {target} is up", "wait_link", (current,)),
    ]
    return steps


def plan_redis_failover(fleet, target: str | None = None, accept_risk: bool = False) -> tuple[RedisPlan, RedisState]:
    members = redis_members(fleet)
    if target is not None and target not in members:
        raise UsageError(f"{target} is not a Redis node", inventory.unknown_name_hint(target, members, "nodes"))
    view = _redis_view(fleet)
    state = view.state
    masters = view.masters()
    old = state.app_master
    if old is None:
        raise Refused(state, "refused: the directory names no Redis node as the master, so none can be down",
                      "see `igops redis status`")
    if old in masters:
        raise Refused(state, f"refused: {old} answers as the master: it is not down",
                      "for a planned change use `igops redis switchover --to NODE`")
    if view.states.get(old) is not None:
        # What a switchover killed between the demotion and the directory update leaves.
        if len(masters) == 1 and target in (None, masters[0]):
            return _signed(_plan_redis_finish(fleet, view, "failover", masters[0]), view), state
        raise Refused(state, f"refused: the app's master {old} answers, as a replica of {state.node(old).master}"
                             + (f"; {masters[0]} is the master, not {target}" if len(masters) == 1 else
                                f"; {plural(len(masters), 'node')} answer as masters"),
                      "see `igops redis status`; point the app at a master with `igops redis switchover --to NODE`")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssh-check") as pool:
        ssh_check = pool.submit(ssh, fleet, fleet.host(old), ["true"], 20)
        _confirm_redis_down(fleet, state, old)
        reachable = ssh_check.result().reached
    plan = RedisPlan("failover", "", old, None)
    reasons = []
    following = [name for name in members if view.states[name] and view.states[name].role == "replica"
                 and state.node(name).master == old and state.node(name).link == "up"]
    if following:
        raise Refused(state, f"refused: {old} is not down: {', '.join(following)} still have a live link to it",
                      "igops cannot reach it but its replicas can: check the network")
    if view.states.get(old) is None and view.down[old].kind == "timeout":
        reasons.append(f"{old} accepts connections but does not answer: hung, not down; it could come back as "
                       "master with its writes (stop it first)")
    replicas = {name: view.states[name] for name in members
                if name != old and view.states[name] is not None and view.states[name].role == "replica"}
    if masters:
        plan.notes.append(f"also master, but not used by the app: {', '.join(masters)}")
    if not replicas:
        raise Refused(state, "refused: no running replica to promote", "start one, or restore the master")
    chosen = target or _best_replica(replicas)
    if chosen not in replicas:
        raise Refused(state, f"refused: {chosen} is not a running replica", f"running replicas: {', '.join(replicas)}")
    best = max(node.offset for node in replicas.values())
    if replicas[chosen].offset < best:
        reasons.append(f"{chosen} is {best - replicas[chosen].offset} bytes behind the most advanced replica")
    if not reachable:
        reasons.append(f"{old}'s host is unreachable over SSH: its config cannot be fenced; make sure it cannot "
                       "come back (stop the instance) before forcing")
    refuse_or_force(state, reasons, accept_risk, plan.forced, "restore the master if you can, or --accept-risk")
    plan.new_master = chosen
    plan.title = f"Fail the Redis master over from {old} (down) to {chosen}"
    steps = []
    if reachable:
        steps.append(Step(f"{old}: fence: its config file gets `replicaof {chosen}`, so a restart comes up as a "
                          "read-only replica", "fence_config", (old, chosen)))
    steps.append(Step(f"{chosen}: REPLICAOF NO ONE (master now, at offset {replicas[chosen].offset}; writes "
                      f"{old} acknowledged after that are lost)", "promote", (chosen,), point_of_no_return=True))
    steps += [Step(f"{name}: REPLICAOF {chosen}", "replicate", (name, chosen)) for name in replicas if name != chosen]
    steps.append(Step(f"directory: redis_master = {_redis_address(fleet, chosen)} (version bump)", "point_app",
                      (chosen,)))
    steps.append(Step(f"config files: {chosen} as master, "
                      f"{', '.join(n for n in replicas if n != chosen) or 'no other'} "
                      f"replica follows {chosen}", "persist_roles", (chosen, tuple(name for name in replicas))))
    plan.actions = steps
    plan.notes.append(f"when {old} is back: `igops redis rejoin {old}`")
    return _signed(plan, view), state


def _confirm_redis_down(fleet, state, name: str) -> None:
    """A restart looks like an outage for a moment: ask again before acting on it."""
    for _ in range(DOWN_PROBES - 1):
        time.sleep(DOWN_PROBE_INTERVAL)
        connection = redisops.client(fleet, fleet.host(name))
        try:
            redisops.node_state(connection)
        except postgres.Unavailable:
            continue
        finally:
            connection.close()
        raise Refused(state, f"refused: {name} answers again", "see `igops redis status`")


def _best_replica(replicas: dict[str, redisops.NodeState]) -> str:
    """The most data first (Sentinel puts priority first, but a failover must lose as little as it
    can); then the lower replica-priority; never one with priority 0; then the run id."""
    eligible = {name: node for name, node in replicas.items() if node.priority != 0} or replicas
    return sorted(eligible, key=lambda name: (-eligible[name].offset, eligible[name].priority,
                                              eligible[name].run_id))[0]


def plan_redis_rejoin(fleet, node: str, accept_risk: bool = False) -> tuple[RedisPlan, RedisState]:
    members = redis_members(fleet)
    if node not in members:
        raise UsageError(f"{node} is not a Redis node", inventory.unknown_name_hint(node, members, "nodes"))
    view = _redis_view(fleet)
    state = view.state
    master = state.app_master
    if master is None or view.states.get(master) is None or view.states[master].role != "master":
        raise Refused(state, "refused: the app's master (per the directory) is not a running master",
                      "see `igops redis status`")
    if node == master:
        raise Refused(state, f"refused: {node} is the app's master", "rejoin the other nodes to it")
    if view.states.get(node) is None:
        raise Refused(state, f"refused: {node} does not answer ({view.down[node].detail})", "start it first")
    host = fleet.host(node)
    config_path = fleet.path_for(fleet.model.redis.config_file, host)
    configured = redisops.configured_master(read_file(fleet, host, config_path))
    member = state.node(node)
    plan = RedisPlan("rejoin", f"Rejoin {node} as a replica of {master}", None, master)
    if member.role == "master":
        reasons = [f"{node} is a master: its own writes since it split off are discarded"]
        refuse_or_force(state, reasons, accept_risk, plan.forced,
                        "make sure nothing on it is needed, then --accept-risk")
    steps = []
    if not (member.role == "replica" and member.master == master):
        steps.append(Step(f"{node}: REPLICAOF {master}", "replicate", (node, master)))
    master_address = (str(fleet.host(master).address), fleet.model.redis.port)
    if configured != master_address:
        steps.append(Step(f"{node}: config file {config_path}: replicaof {master}", "persist_roles",
                          (master, (node,))))
    if steps or member.link != "up":
        steps.append(Step(f"{node}: wait until its link to {master} is up", "wait_link", (node,)))
    else:
        plan.notes.append(f"nothing to do: {node} replicates from {master} and its config says so")
    plan.actions = steps
    return _signed(plan, view), state


class RedisActions:
    def __init__(self, fleet):
        self.fleet = fleet
        self.paused_at: float | None = None
        self.unpaused_at: float | None = None
        self.master_offset: int | None = None
        self.endpoint_version: int | None = None
        # Connections opened before writes are paused and used until the demotion: a connection
        # opened while paused could take longer to set up (2 s timeout) than the pause has left.
        self._held: dict[str, Any] = {}

    @contextmanager
    def _connection(self, name: str) -> Iterator[Any]:
        held = self._held.get(name)
        if held is not None:
            yield held
            return
        connection = redisops.client(self.fleet, self.fleet.host(name))
        try:
            yield connection
        finally:
            connection.close()

    def _master_of(self, name: str) -> tuple[str, int]:
        return str(self.fleet.host(name).address), self.fleet.model.redis.port

    def hold_connections(self, *names: str) -> None:
        for name in names:
            connection = redisops.client(self.fleet, self.fleet.host(name))
            self._held[name] = connection
            connection.ping()  # connects now; the client keeps the connection for the next commands

    def close(self) -> None:
        for connection in self._held.values():
            connection.close()
        self._held.clear()

    def pause_writes(self, name: str) -> None:
        with self._connection(name) as connection:
            redisops.pause_writes(connection, int(self.fleet.model.redis.pause_timeout * 1000))
            self.paused_at = time.monotonic()
            self.master_offset = redisops.node_state(connection).offset

    def unpause(self, name: str) -> str | None:
        with self._connection(name) as connection:
            redisops.unpause(connection)
        if self.paused_at is not None and self.unpaused_at is None:
            self.unpaused_at = time.monotonic()
            return f"writes were paused {(self.unpaused_at - self.paused_at) * 1000:.0f} ms"
        return None

    def wait_offset(self, master: str, replica: str, deadline: float | None = None) -> str:
        with self._connection(master) as master_connection:
            self.master_offset = redisops.node_state(master_connection).offset
        with self._connection(replica) as connection:
            if deadline is None:
                deadline = (self.paused_at or time.monotonic()) + self.fleet.model.redis.pause_timeout / 2
            reached = redisops.wait_for_offset(connection, self.master_offset, deadline)
        return f"offset {reached}"

    def promote(self, name: str, paused_master: str | None = None) -> str | None:
        """REPLICAOF NO ONE. During a switchover, only while the old master's pause has time left
        for the demotion that follows, and once more level with it."""
        detail = None
        if paused_master is not None:
            left = (self.paused_at or 0) + self.fleet.model.redis.pause_timeout - time.monotonic()
            if left < PAUSE_MARGIN:
                raise IgopsError(f"only {max(left, 0):.1f} s of {paused_master}'s write pause left: too late to "
                                 "promote and demote safely")
            detail = self.wait_offset(paused_master, name, deadline=time.monotonic() + left - PAUSE_MARGIN)
        with self._connection(name) as connection:
            redisops.replicate_from(connection, None)
        return detail

    def demote(self, name: str, new_master: str) -> None:
        self.replicate(name, new_master)

    def replicate(self, name: str, master: str) -> None:
        with self._connection(name) as connection:
            redisops.replicate_from(connection, self._master_of(master))

    def point_app(self, name: str) -> str:
        connection = directory_connection(self.fleet)
        try:
            self.endpoint_version = redisops.write_endpoint(connection, _redis_address(self.fleet, name))
        finally:
            connection.close()
        return f"version {self.endpoint_version}"

    def persist_roles(self, master: str, members: tuple) -> str:
        fleet = self.fleet
        template = fleet.model.redis.config_file

        def one(name: str) -> str | None:
            host = fleet.host(name)
            path = fleet.path_for(template, host)
            result = ssh(fleet, host, ["cat", path], timeout=30)
            if not result.ok:
                return f"{name}: {result.error or result.stderr.strip()[-200:]}"
            wanted = redisops.with_replicaof(result.stdout, None if name == master else self._master_of(master))
            if wanted != result.stdout:
                replace_file(fleet, host, path, wanted)
            return None

        failed = [problem for problem in parallel_map(one, list(members)) if problem]
        if failed:
            raise IgopsError("config files not updated: " + "; ".join(failed),
                             "a restart of those nodes would take their old role; fix the files by hand")
        return plural(len(members), "file")

    def fence_config(self, name: str, new_master: str) -> None:
        self.persist_roles(new_master, (name,))

    def wait_link(self, name: str) -> str:
        with self._connection(name) as connection:
            state = redisops.wait_for_link(connection, time.monotonic() + STREAMING_TIMEOUT)
        return f"link up, offset {state.offset}"


def apply_redis(fleet, plan: RedisPlan, reporter: Reporter = Reporter()) -> RedisResult:
    actions = RedisActions(fleet)
    try:
        reports = execute(plan.actions, actions, reporter, plan.failure_hint)
    finally:
        actions.close()
    pause_ms = ((actions.unpaused_at - actions.paused_at) * 1000
                if actions.paused_at is not None and actions.unpaused_at is not None else None)
    return RedisResult(plan.operation, plan.old_master, plan.new_master,
                       round(pause_ms, 1) if pause_ms is not None else None, actions.endpoint_version, reports)


def _signature(view: _PgView | _RedisView) -> tuple:
    """What a plan depends on: every member's role and state, who follows whom, and where the app
    is routed (PgBouncer, or the directory for Redis). Positions and lag are left out: they move."""
    state = view.state
    if isinstance(view, _PgView):
        return (tuple((n.name, n.role, n.state, n.fenced, n.streaming_from, n.repmgrd) for n in state.nodes),
                tuple(sorted((host, tuple(sorted(table.items()))) for host, table in state.pgbouncer.items())),
                tuple(sorted((host, tuple(names)) for host, names in state.paused.items())))
    return (tuple((n.name, n.role, n.state, n.master, n.link == "up") for n in state.nodes), state.app_master)


def _signed(plan, view):
    plan.signature = _signature(view)
    return plan


def check_unchanged(fleet, plan: PgPlan | RedisPlan) -> None:
    """Under the lock, after the confirmation: refuse if the state the plan was made for has
    changed (another operation, a node that came back), instead of acting on a stale plan."""
    view = _redis_view(fleet) if isinstance(plan, RedisPlan) else _pg_view(fleet, plan.cluster)
    if _signature(view) != plan.signature:
        raise Refused(view.state, "refused: the state changed since the plan was made",
                      "run the command again to see the new plan")


def describe_plan(plan: PgPlan | RedisPlan) -> dict:
    """The plan as data for --json: everything but the actions' internals."""
    data = {key: value for key, value in plan.__dict__.items()
            if key not in ("actions", "failure_hint", "signature")}
    data["steps"] = plan.steps()
    return data

