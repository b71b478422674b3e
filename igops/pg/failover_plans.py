"""Planning a Postgres failover or rejoin: read the live cluster, refuse what is unsafe (or
name the risks `--accept-risk` takes), choose the standby to promote (or finish a failover that
something else began by promoting one), and build the plan from the step lists of
igops.pg.plan_steps. A rejoin makes a former primary, or any member that does not follow the
primary, its standby again. Switchovers, and the PgPlan all three build, are in igops.pg.plans.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from igops import inventory, postgres
from igops.errors import RemoteError, UsageError
from igops.operations.steps import Step
from igops.output import plural
from igops.pg.cluster import (
    PgClusterState,
    PgProbe,
    PgView,
    bouncer_text,
    cluster_members,
    cluster_of,
    follows,
    pg_view,
    wal_received,
)
from igops.pg.hostcmd import WalEnd, wal_end_on_disk
from igops.pg.plan_steps import (
    failover_steps,
    rejoin_steps,
    release_switch_segment_step,
    with_repmgrd_paused,
)
from igops.pg.plans import PgPlan, leave_out_who_cannot_follow, signed
from igops.pg.timelines import wal_lacked
from igops.role_change import DOWN_PROBE_INTERVAL, DOWN_PROBES, Refused, refuse_or_force

if TYPE_CHECKING:
    from igops.inventory import Fleet


def plan_pg_failover(
    fleet: Fleet, cluster: str, candidate: str | None = None, accept_risk: bool = False
) -> tuple[PgPlan, PgClusterState]:
    members = cluster_members(fleet, cluster)
    if candidate is not None and candidate not in members:
        raise UsageError(
            f"{candidate} is not a member of cluster {cluster}",
            inventory.unknown_name_hint(candidate, members, "members"),
        )
    view = pg_view(fleet, cluster)
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    writable = view.writable()
    if len(writable) == 1 and (finish := _plan_pg_promoted(fleet, view, writable[0], accept_risk)):
        return signed(finish, view), state
    if writable:
        raise Refused(
            state,
            f"refused: {', '.join(writable)} accepts writes: cluster {cluster} has a primary",
            f"for a planned change use `igops pg switchover {cluster} --to NODE`",
        )
    if view.bouncer_errors:
        raise Refused(
            state,
            "refused: PgBouncer does not answer on " + ", ".join(view.bouncer_errors),
            "a failover repoints every PgBouncer; bring it back first",
        )
    old = _presumed_primary(view)
    plan = PgPlan(
        "failover", cluster, "", old, None, failure_hint=f"see `igops pg status {cluster}`; PgBouncer was resumed"
    )
    found = _check_old_primary(fleet, view, old, read_wal_end=True) if old else OldPrimaryCheck()
    reasons = found.reasons
    if not old:
        plan.notes.append(f"every member of {cluster} runs as a standby: no old primary to fence")
    old_probe = view.probes[old] if old else None
    standbys = {name: probe for name, probe in view.probes.items() if name != old and probe.server}
    if not standbys:
        raise Refused(
            state, f"refused: no running standby in cluster {cluster} to promote", "start one, or restore the primary"
        )
    chosen = candidate or best_standby(view, standbys)
    if chosen not in standbys:
        raise Refused(
            state,
            f"refused: {chosen} is not a running standby ({state.node(chosen).state})",
            f"running standbys: {', '.join(standbys)}",
        )
    # LSNs compare only within one timeline: a standby on an older one (a fenced old primary from
    # an earlier failover, say) may hold more WAL by LSN, on a history the newest timeline left.
    newest, current = _on_newest_timeline(standbys)
    received = wal_received(_answering(standbys[chosen]))
    timeline = _answering(standbys[chosen]).timeline
    hint = "restore the old primary if you can, or --accept-risk"
    if chosen not in current:
        # Neither the WAL it lacks nor the bytes at risk can be counted across timelines.
        newer = f"{', '.join(current)} on timeline {newest}"
        reasons.append(
            f"{chosen} is on timeline {timeline}, {newer}: promoting {chosen} loses what was written on "
            f"timeline {newest} (how much cannot be told)"
            if timeline is not None
            else f"{chosen}'s timeline is unknown, {newer}: whether {chosen} has what was written on timeline "
            f"{newest} cannot be told"
        )
    else:
        best = max(wal_received(_answering(standbys[name])) for name in current)
        if received < best:
            reasons.append(f"{chosen} has {best - received} bytes less WAL than the most advanced standby")
        if not old:
            plan.bytes_at_risk = best - received
        elif view.probes[old].host_reachable:
            if found.wal_end is None:
                reasons.append(f"where {old}'s WAL ends is unknown, so the bytes at risk are")
            else:
                plan.bytes_at_risk, uncounted = wal_lacked(fleet, old, found.wal_end, chosen, timeline, received)
                if plan.bytes_at_risk is None:
                    reasons.append(uncounted)
                    if timeline is None or found.wal_end.timeline > timeline:
                        hint = (
                            f"fail over to a member that holds {old}'s timeline {found.wal_end.timeline} if one "
                            f"can be started (TL in `igops pg status {cluster}`), or restore {old}; else --accept-risk"
                        )
                elif plan.bytes_at_risk > fleet.model.postgres.max_lag_bytes:
                    reasons.append(
                        f"{chosen} lacks {plan.bytes_at_risk} bytes of {old}'s WAL "
                        f"(threshold {fleet.model.postgres.max_lag_bytes}): a failover loses them"
                    )
    if _answering(standbys[chosen]).replay_paused:
        reasons.append(f"{chosen} has WAL replay paused")
    refuse_or_force(state, reasons, accept_risk, plan.forced, hint)
    plan.new_primary = chosen
    plan.title = (
        f"Fail cluster {cluster} over from {old} (down) to {chosen}"
        if old
        else f"Promote {chosen}: cluster {cluster} has no primary"
    )
    if old:
        plan.notes.append(f"afterwards: `igops pg rejoin {old}` makes {old} a standby of {chosen}")
    siblings = [name for name in standbys if name != chosen]
    # The promotion forks a new timeline off the candidate's where its WAL ends: at least what it
    # has now. A member whose WAL is not on that history cannot follow it, and repmgr's follow,
    # after the point of no return, would fail: it is left to `igops pg rejoin`.
    leave_out_who_cannot_follow(plan, view, chosen, timeline, received, siblings)
    plan.actions = failover_steps(
        fleet,
        old,
        chosen,
        [name for name in siblings if name not in plan.not_followed],
        view.databases(),
        fence_on_disk=bool(old_probe and old_probe.host_reachable),
        stop_first=found.stop_first,
        replay_paused=_answering(standbys[chosen]).replay_paused,
    )
    if [name for name in view.repmgrd_members() if name != old]:
        # Where repmgrd runs it may promote a standby of its own choosing meanwhile: pause it. Where
        # it does not, a failover spends no time on it.
        plan.actions = with_repmgrd_paused(plan.actions, on=chosen, members=(chosen, *siblings))
    return signed(plan, view), state


def _plan_pg_promoted(fleet: Fleet, view: PgView, new: str, accept_risk: bool) -> PgPlan | None:
    """A standby that something else promoted (repmgrd's automatic failover, or a person) while
    PgBouncer still routes to the old primary, now down: finish that failover rather than
    promote a second standby. None when no PgBouncer route points at a member that is down.
    Each old primary is checked as a failover checks it (`_check_old_primary`): repmgrd decided
    it was down from where it runs, and a network split there is no failure of the old primary."""
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    down = {name for name, probe in view.probes.items() if not probe.server}
    stale = {
        host: [database for database, target in table.items() if target in down]
        for host, table in state.pgbouncer.items()
    }
    stale = {host: names for host, names in stale.items() if names}
    if not stale:
        return None
    olds = sorted({state.pgbouncer[host][database] for host, names in stale.items() for database in names})
    plan = PgPlan(
        "failover",
        view.cluster,
        f"Finish the failover of {view.cluster}: {new} was promoted already "
        f"(repmgrd?), PgBouncer still routes to {', '.join(olds)}",
        olds[0],
        new,
        failure_hint=f"see `igops pg status {view.cluster}`",
    )
    checks = {old: _check_old_primary(fleet, view, old, promoted=new) for old in olds}
    refuse_or_force(
        state,
        [reason for found in checks.values() for reason in found.reasons],
        accept_risk,
        plan.forced,
        f"make sure {', '.join(olds)} is down for good (see `igops pg status {view.cluster}`), then --accept-risk",
    )
    for old in olds:
        probe = view.probes[old]
        # A postmaster that runs is stopped even where the fence is on disk already: standby.signal
        # counts only at a start, and a hung primary that recovers would take writes again.
        stop_first = checks[old].stop_first or bool(probe.postmaster_running)
        if probe.host_reachable and (stop_first or not probe.fenced):
            plan.actions.append(
                Step(
                    f"{old}: fence: "
                    + ("stop it (immediate), " if stop_first else "")
                    + "write standby.signal so it can only start read-only",
                    "fence",
                    (old, stop_first),
                )
            )
    plan.actions.append(Step(f"PgBouncer: point {bouncer_text(stale)} at {new}, RELOAD", "repoint", (stale, new)))
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {bouncer_text(state.paused)}", "resume", (state.paused,)))
    record = view.repmgr_node(new)
    if record is None or record.type != "primary" or not record.active:
        plan.actions.append(
            Step(
                f"{new}: record it as the primary in repmgr's metadata (repmgr primary register --force)",
                "register_primary",
                (new,),
            )
        )
    plan.notes += [f"afterwards: `igops pg rejoin {old}` makes {old} a standby of {new}" for old in olds]
    primary = state.node(new)
    behind = [node.name for node in state.nodes if node.role == "standby" and not follows(node, primary)]
    leave_out_who_cannot_follow(plan, view, new, primary.timeline, None, behind)
    plan.actions += [
        Step(f"{name}: follow {new} (repmgr standby follow)", "follow", (name, new))
        for name in behind
        if name not in plan.not_followed
    ]
    return plan


@dataclass
class OldPrimaryCheck:
    """What `_check_old_primary` found: the risks `--accept-risk` takes, whether the fence must
    stop the old primary first, and where its WAL on disk ends (None: not read, or unreadable)."""

    reasons: list[str] = field(default_factory=list)
    stop_first: bool = False
    wal_end: WalEnd | None = None


def _check_old_primary(
    fleet: Fleet, view: PgView, old: str, read_wal_end: bool = False, promoted: str | None = None
) -> OldPrimaryCheck:
    """The checks of a primary presumed down before a failover acts on it, whether igops promotes
    a standby or finishes the failover repmgrd began by promoting `promoted`: ask it again
    (`_confirm_pg_down`); refuse, whatever `--accept-risk`, when a standby still streams from it
    (it lives, and only igops cannot reach it); and name what `--accept-risk` takes: a host SSH
    cannot reach (no fence on disk), a postmaster that is starting or stopping, or hung."""
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    probe = view.probes[old]
    found = OldPrimaryCheck()
    # Asking the server again and reading its WAL over SSH overlap: both take about a second.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-end") as pool:
        reading = pool.submit(wal_end_on_disk, fleet, probe.host) if read_wal_end and probe.host_reachable else None
        _confirm_pg_down(fleet, state, old)
        found.wal_end = reading.result() if reading else None
    streaming = [
        name
        for name, other in view.probes.items()
        if other.server
        and other.server.receiver_status == "streaming"
        and other.server.upstream_address in (str(probe.host.address), old)
    ]
    if streaming:
        raise Refused(
            state,
            f"refused: {old} is not down: {', '.join(streaming)} still stream from it",
            "igops cannot reach it but its standbys can: check the network between them"
            + (
                f"; {promoted} was promoted meanwhile, so two members may take writes: find which one the app "
                "wrote to before anything else"
                if promoted
                else ""
            ),
        )
    if probe.host_reachable is False:
        found.reasons.append(
            f"{old}'s host is unreachable over SSH: it cannot be fenced on disk; make sure it cannot "
            "come back (stop the instance) before forcing"
        )
    elif probe.down is not None and probe.down.kind == "rejected":
        found.reasons.append(f"{old} answers ({probe.down.detail}): it is starting or stopping, not down")
        found.stop_first = True
    elif probe.postmaster_running:
        found.reasons.append(f"{old}'s postmaster runs but does not answer: hung, not down (--accept-risk stops it)")
        found.stop_first = True
    return found


def _confirm_pg_down(fleet: Fleet, state: PgClusterState, name: str) -> None:
    """A restart looks like an outage for a moment: ask again before acting on it."""
    for _ in range(DOWN_PROBES - 1):
        time.sleep(DOWN_PROBE_INTERVAL)
        try:
            connection = postgres.connect(fleet, fleet.host(name))
        except postgres.Unavailable:
            continue
        connection.close()
        raise Refused(state, f"refused: {name} answers again", "see `igops pg status`")


def _on_newest_timeline(standbys: dict[str, PgProbe]) -> tuple[int | None, list[str]]:
    """The highest timeline among `standbys` (None when none of them says), and the standbys on it.

    A standby whose timeline is unknown (None) counts as older than any known one: it cannot be
    shown to be on the newest timeline, and its LSN means nothing beside one on another
    timeline, so it never wins over a standby known to be on a timeline by holding more WAL, and
    promoting it by name takes --accept-risk. Only when no standby's timeline is known are their
    LSNs compared as they are: nothing better is known then. (In practice it is known:
    `postgres.server_state` reads it from the WAL receiver, else from the last checkpoint, which
    lags a timeline switch replayed since: that errs towards older, never newer.)"""
    newest = max(
        (_answering(probe).timeline for probe in standbys.values()),
        default=None,
        key=lambda timeline: -1 if timeline is None else timeline,
    )
    return newest, [name for name, probe in standbys.items() if _answering(probe).timeline == newest]


def best_standby(view: PgView, standbys: dict[str, PgProbe]) -> str:
    """A standby on the newest timeline among them (see `_on_newest_timeline`): one on an older
    timeline, or whose timeline is unknown while another's is known, never, whatever its LSN or
    priority. Among those, the most WAL received; then repmgr's priority (higher first; 0 never,
    unless all are 0); then the name."""

    def priority(name: str) -> int:
        record = view.repmgr_node(name)
        return record.priority if record else 100

    _, current = _on_newest_timeline(standbys)
    eligible = [name for name in current if priority(name) > 0] or current
    return sorted(eligible, key=lambda name: (-wal_received(_answering(standbys[name])), -priority(name), name))[0]


def _answering(probe: PgProbe) -> postgres.ServerState:
    """The server of a member that answered: the standbys a failover chooses from."""
    assert probe.server is not None  # only members that answered are standbys to choose from
    return probe.server


def _presumed_primary(view: PgView) -> str | None:
    """The member that was primary: the one PgBouncer routes to, else repmgr's record, else the
    only member that does not answer; None when every member answers (as a standby)."""
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    down = [name for name, probe in view.probes.items() if not probe.server]
    if not down:
        return None
    routed = {target for table in state.pgbouncer.values() for target in table.values()}
    candidates = [name for name in down if name in routed]
    if len(candidates) != 1:
        candidates = [node.name for node in view.repmgr if node.type == "primary" and node.active and node.name in down]
    if len(candidates) != 1 and len(down) == 1:
        candidates = down
    if len(candidates) != 1:
        raise Refused(
            state,
            f"refused: cannot tell which of {', '.join(down)} was the primary",
            "check PgBouncer's databases file and `igops pg status`",
        )
    return candidates[0]


def sole_primary(view: PgView, node: str, what: str) -> str:
    """The one member besides `node` that accepts writes; refused when there are none or several
    (`what` needs exactly one, e.g. "a node rejoins")."""
    writable = [name for name in view.writable() if name != node]
    if len(writable) != 1:
        raise Refused(
            view.state,
            f"refused: cluster {view.cluster} has {plural(len(writable), 'primary', 'primaries')} besides {node}",
            f"{what} a cluster with exactly one primary: see `igops pg status`",
        )
    return writable[0]


def plan_pg_rejoin(fleet: Fleet, node: str, accept_risk: bool = False) -> tuple[PgPlan, PgClusterState]:
    cluster = cluster_of(fleet, node)
    view = pg_view(fleet, cluster)
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    member = state.node(node)
    probe = view.probes[node]
    if member.role == "primary" and member.pgbouncer:
        raise Refused(
            state,
            f"refused: {node} accepts writes and PgBouncer routes {', '.join(member.pgbouncer)} "
            "to it: it is the live primary",
            f"to make it a standby, switch over first (igops pg switchover {cluster} --to NODE)",
        )
    primary = sole_primary(view, node, "a node rejoins")
    plan = PgPlan(
        "rejoin",
        cluster,
        f"Rejoin {node} to cluster {cluster} as a standby of {primary}",
        None,
        primary,
        failure_hint=f"see `igops pg status {cluster}` and {node}'s Postgres log",
    )
    if member.state == "host unreachable":
        raise RemoteError(f"{node}: host unreachable over SSH", "rejoin needs the host")
    if follows(member, state.node(primary)):
        record = view.repmgr_node(node)
        if record and record.type == "standby" and record.active and member.repmgr == f"standby of {primary}":
            plan.notes.append(f"nothing to do: {node} already streams from {primary}")
        else:
            plan.actions = [
                Step(
                    f"{node}: record it as a standby of {primary} in repmgr's metadata (repmgr standby "
                    "register --force)",
                    "register_standby",
                    (node, primary),
                )
            ]
        return signed(plan, view), state
    reasons = []
    if member.role == "primary":
        reasons.append(f"{node} accepts writes: rejoining discards whatever it took after the timelines forked")
    if member.state == "hung":
        reasons.append(f"{node}'s postmaster runs but does not answer")
    refuse_or_force(state, reasons, accept_risk, plan.forced, "make sure nothing on it is needed, then --accept-risk")
    # repmgr node rejoin connects to the primary repmgr's metadata names: after a promotion
    # whose run ended before it registered the new primary, that is the node rejoining.
    primary_records = [record.name for record in view.repmgr if record.type == "primary" and record.active]
    register = (
        [
            Step(
                f"{primary}: record it as the primary in repmgr's metadata (repmgr primary register --force; "
                f"it records {', '.join(primary_records) or 'none'})",
                "register_primary",
                (primary,),
            )
        ]
        if view.repmgr and primary_records != [primary]
        else []
    )
    plan.actions = with_repmgrd_paused(
        [
            *register,
            *rejoin_steps(
                node,
                primary,
                running=probe.server is not None or bool(probe.postmaster_running),
                archiving=fleet.model.archive is not None,
            ),
            # pg_rewind copied the primary's segments, those of the promotion among them.
            release_switch_segment_step(primary, [node]),
        ],
        on=primary,
        members=(primary, node),
    )
    plan.rejoining = node
    return signed(plan, view), state
