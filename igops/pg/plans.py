"""Planning a Postgres switchover: read the live cluster, refuse what is unsafe (or name the
risks `--accept-risk` takes), and build the plan from the step lists of igops.pg.plan_steps. A
switchover cut short is finished or rolled back from what the cluster shows, so a plan is always
the one for now. Also here: PgPlan, what every Postgres role change plans, the checks of a
standby's readiness, and a plan's signature. Failover and rejoin are planned in
igops.pg.failover_plans.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from igops import inventory
from igops.errors import UsageError
from igops.host_commands import failure_reason, ssh
from igops.operations.steps import Step
from igops.pg.cluster import (
    PgClusterState,
    PgNode,
    PgView,
    bouncer_text,
    cluster_members,
    follows,
    interrupted_switchover,
    pg_view,
    wal_received,
    why_not_following,
)
from igops.pg.hostcmd import data_directory, repmgr, wal_end_on_disk
from igops.pg.plan_steps import (
    drop_rejoin_reservation_step,
    rejoin_steps,
    switchover_steps,
    with_repmgrd_paused,
)
from igops.pg.timelines import cannot_follow, left_out_note, wal_lacked
from igops.pg.timeouts import STOP_TIMEOUT
from igops.role_change import Refused, refuse_or_force

if TYPE_CHECKING:
    from igops.inventory import Fleet


@dataclass
class PgPlan:
    operation: str  # 'switchover', 'failover', 'rejoin', 'rebuild'
    cluster: str
    title: str
    old_primary: str | None
    new_primary: str | None
    forced: list[str] = field(default_factory=list)  # refusals that --accept-risk overrode: the risks accepted
    notes: list[str] = field(default_factory=list)
    bytes_at_risk: int | None = None  # failover: WAL the old primary wrote that the candidate lacks
    # Running standbys the plan does not make follow the new primary, each with why they cannot
    # (igops.pg.timelines): `igops pg rejoin` them after.
    not_followed: dict[str, str] = field(default_factory=dict)
    actions: list[Step] = field(default_factory=list)
    failure_hint: str = ""
    signature: tuple[Any, ...] = ()  # the state the plan was made for (see check_unchanged)
    # A member whose start and catch-up the plan waits out, whatever it reached: its role, state
    # and upstream are left out of the signature (see signature).
    settling: str | None = None
    # A member the plan stops and rejoins, whatever it streams from: its upstream is left out of
    # the signature. A fenced old primary started again connects its walreceiver to the new
    # primary a moment later, which may fall between the plan and the check under the lock.
    rejoining: str | None = None

    def steps(self) -> list[str]:
        return [step.title for step in self.actions]


def plan_pg_switchover(
    fleet: Fleet, cluster: str, candidate: str, accept_risk: bool = False
) -> tuple[PgPlan, PgClusterState]:
    """A switchover, or, when an interrupted one left the cluster mid-way, the plan that finishes
    it (the candidate is a standby, or the primary already) or rolls it back (the candidate is the
    member it stopped)."""
    members = cluster_members(fleet, cluster)
    if candidate not in members:
        raise UsageError(
            f"{candidate} is not a member of cluster {cluster}",
            inventory.unknown_name_hint(candidate, members, "members"),
        )
    view = _settled_view(fleet, cluster)
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    writable = view.writable()
    if len(writable) > 1:
        raise Refused(
            state,
            f"refused: {' and '.join(writable)} both accept writes (split brain)",
            "stop the one PgBouncer does not route to, then `igops pg rejoin` it",
        )
    if view.bouncer_errors:
        raise Refused(
            state,
            "refused: PgBouncer does not answer on " + ", ".join(view.bouncer_errors),
            "a switchover pauses every PgBouncer; bring it back first",
        )
    if not writable:
        stopped = interrupted_switchover(view)
        if stopped is None:
            raise Refused(
                state,
                f"refused: cluster {cluster} has no primary to switch over from",
                f"if its primary is down, use `igops pg failover {cluster}`",
            )
        if candidate == stopped:
            return signed(plan_pg_roll_back(view, stopped), view), state
        return signed(_plan_pg_resume(view, stopped, candidate, accept_risk), view), state
    primary = writable[0]
    if primary == candidate:
        return signed(_plan_pg_finish(view, candidate), view), state
    probe = view.probes[candidate]
    node = state.node(candidate)
    if probe.server is None:
        raise Refused(
            state, f"refused: {candidate} is not a standby ({node.state})", "pick a running standby (igops pg status)"
        )
    not_following = why_not_following(node, state.node(primary))
    if not_following:
        raise Refused(
            state,
            f"refused: {candidate} {not_following}",
            f"fix its replication first (igops pg rejoin {candidate})",
        )
    databases = view.databases()
    if not databases:
        raise Refused(
            state,
            f"refused: no PgBouncer routes a database to cluster {cluster}",
            "check [pgbouncer] and the hosts with the pgbouncer role",
        )
    plan = PgPlan(
        "switchover",
        cluster,
        f"Switch cluster {cluster} over from {primary} to {candidate}",
        primary,
        candidate,
        failure_hint="see `igops pg status` for where things stand",
    )
    reasons = lag_reasons(fleet, node)
    check_reasons, check_notes = _repmgr_check(fleet, probe.host)
    reasons += check_reasons
    plan.notes += check_notes
    reasons += _free_space_reasons(fleet, probe.host)
    refuse_or_force(
        state,
        reasons,
        accept_risk,
        plan.forced,
        "wait for it to catch up, free space, pick another standby, or --accept-risk",
    )
    siblings = [name for name in members if name not in (primary, candidate) and view.probes[name].server]
    left = [name for name in members if name not in (primary, candidate) and not view.probes[name].server]
    if left:
        plan.notes.append(f"not running, left alone: {', '.join(left)} (igops pg rejoin it later)")
    # The candidate's new timeline forks where the primary's WAL ends, past any standby of it.
    leave_out_who_cannot_follow(plan, view, candidate, state.node(primary).timeline, None, siblings)
    followers = [name for name in siblings if name not in plan.not_followed]
    plan.actions = with_repmgrd_paused(
        switchover_steps(fleet, primary, candidate, followers, databases, replay_paused=node.replay_paused),
        on=primary,
        members=(candidate, primary, *siblings),
    )
    if state.paused:
        # The cluster's lock is free (it is taken before the plan runs), so no operation is under
        # way: an interrupted one left them paused. The switchover pauses them again itself.
        plan.notes.append(f"PgBouncer has {bouncer_text(state.paused)} paused: an interrupted operation left them so")
        plan.actions.insert(
            0,
            Step(
                f"PgBouncer: RESUME {bouncer_text(state.paused)} (left paused by an interrupted operation)",
                "resume",
                (state.paused,),
            ),
        )
    return signed(plan, view), state


def _settled_view(fleet: Fleet, cluster: str) -> PgView:
    """The cluster's state once no member is still shutting down: a switchover cut short during
    its stop leaves the remote stop running, and what to do depends on how it ends."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        view = pg_view(fleet, cluster)
        settling = [
            name
            for name, probe in view.probes.items()
            if probe.server is None and probe.postmaster_running and probe.down and probe.down.kind == "rejected"
        ]
        if view.writable() or not settling or time.monotonic() > deadline:
            return view
        time.sleep(0.5)


def _plan_pg_resume(view: PgView, stopped: str, candidate: str, accept_risk: bool) -> PgPlan:
    """A switchover cut short after it stopped the primary and before the promotion: carry on
    from the stop (fence again, make sure the candidate has all of the stopped primary's WAL,
    promote, and the rest)."""
    fleet, state, cluster = view.fleet, view.state, view.cluster
    assert state is not None  # pg_view reports every view it makes
    probe = view.probes[candidate]
    node = state.node(candidate)
    if probe.server is None or not probe.server.in_recovery:
        raise Refused(
            state,
            f"refused: {candidate} is not a running standby ({node.state})",
            f"roll the interrupted switchover back: `igops pg switchover {cluster} --to {stopped}`",
        )
    plan = PgPlan(
        "switchover",
        cluster,
        f"Finish the switchover of cluster {cluster} from {stopped} (stopped cleanly) to {candidate}",
        stopped,
        candidate,
        failure_hint="see `igops pg status` for where things stand",
    )
    plan.notes.append(f"{stopped} was stopped cleanly by a switchover cut short; no member accepts writes")
    reasons = []
    wal_end = wal_end_on_disk(fleet, view.probes[stopped].host)
    received = wal_received(probe.server)
    if wal_end is None:
        reasons.append(f"where {stopped}'s WAL ends is unknown")
    else:
        missing, uncounted = wal_lacked(fleet, stopped, wal_end, candidate, probe.server.timeline, received)
        if missing is None:
            reasons.append(uncounted)
        elif missing > 0:
            reasons.append(
                f"{candidate} lacks {missing} bytes of {stopped}'s WAL, which it cannot receive while "
                f"{stopped} is stopped (the promotion would be undone)"
            )
    if node.replay_paused:
        reasons.append(f"{candidate} has WAL replay paused")
    reasons += _free_space_reasons(fleet, probe.host)
    refuse_or_force(
        state,
        reasons,
        accept_risk,
        plan.forced,
        f"roll it back instead (`igops pg switchover {cluster} --to {stopped}`), or --accept-risk",
    )
    members = cluster_members(fleet, cluster)
    siblings = [name for name in members if name not in (stopped, candidate) and view.probes[name].server]
    left = [name for name in members if name not in (stopped, candidate) and not view.probes[name].server]
    if left:
        plan.notes.append(f"not running, left alone: {', '.join(left)} (igops pg rejoin it later)")
    # Nothing more reaches the candidate: its promotion forks where its WAL ends now.
    leave_out_who_cannot_follow(plan, view, candidate, probe.server.timeline, received, siblings)
    plan.actions = with_repmgrd_paused(
        switchover_steps(
            fleet,
            stopped,
            candidate,
            [name for name in siblings if name not in plan.not_followed],
            view.databases(),
            replay_paused=node.replay_paused,
            stopped=True,
            paused=state.paused or None,
        ),
        on=candidate,
        members=(candidate, *siblings, stopped),
    )
    return plan


def plan_pg_roll_back(view: PgView, stopped: str) -> PgPlan:
    """A switchover cut short after it stopped the primary: start that primary again, provided
    no other member can have been promoted, and resume PgBouncer, which still routes to it."""
    state, cluster = view.state, view.cluster
    assert state is not None  # pg_view reports every view it makes
    others = tuple(name for name in view.probes if name != stopped)
    plan = PgPlan(
        "switchover",
        cluster,
        f"Roll back the switchover of cluster {cluster} cut short: {stopped} the primary again",
        stopped,
        stopped,
        failure_hint="see `igops pg status` for where things stand",
    )
    plan.notes.append(f"{stopped} was stopped cleanly by a switchover cut short; no member accepts writes")
    plan.actions.append(
        Step(
            f"{stopped}: remove standby.signal and start it again as the primary (only once "
            f"{', '.join(others)} verifiably cannot be promoted), check it accepts writes",
            "unfence_and_start",
            (stopped, others),
        )
    )
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {bouncer_text(state.paused)}", "resume", (state.paused,)))
    for name in others:
        node = state.node(name)
        if node.role == "standby":
            plan.actions.append(
                Step(f"{name}: wait until it streams from {stopped}", "wait_streaming", (name, stopped))
            )
            plan.actions.append(drop_rejoin_reservation_step(name, stopped))
        else:
            plan.notes.append(f"{name}: {node.state}; rejoin it later (igops pg rejoin {name})")
    running = [name for name in others if state.node(name).role == "standby"]
    if running:
        plan.actions = with_repmgrd_paused(plan.actions, on=running[0], members=(stopped, *others))
    return plan


def leave_out_who_cannot_follow(
    plan: PgPlan, view: PgView, candidate: str, timeline: int | None, end: int | None, siblings: list[str]
) -> None:
    """The running `siblings` that cannot follow `candidate`, to be promoted or promoted already
    (igops.pg.timelines.cannot_follow: its `timeline`, and `end`, where its WAL on it ends for a
    follower), go into `plan.not_followed`, each with a note: repmgr's follow would fail them after
    the point of no return, and a switchover's release of the promotion's segment would wait for
    them in vain."""
    positions = {}
    for name in siblings:
        server = view.probes[name].server
        assert server is not None  # siblings are the members that answered
        positions[name] = (server.timeline, wal_received(server))
    plan.not_followed = cannot_follow(view.fleet, candidate, timeline, end, positions)
    plan.notes += [left_out_note(name, candidate, why) for name, why in plan.not_followed.items()]


def _free_space_reasons(fleet: Fleet, host: Any) -> list[str]:
    """A promotion writes a new timeline's first WAL segment and a checkpoint: on a full volume
    it PANICs, and in a switchover the old primary is stopped by then."""
    minimum = fleet.model.postgres.min_free_bytes
    data = data_directory(fleet, host)
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
            reasons.append(
                f"{node}'s {label} volume ({fields[5]}) has {available >> 20} MiB free "
                f"(threshold {minimum >> 20} MiB, [postgres] min_free_bytes)"
            )
    return reasons


def _plan_pg_finish(view: PgView, primary: str) -> PgPlan:
    """The candidate is primary already: finish what an interrupted operation left (PgBouncer
    routing or paused, repmgr's metadata, members that do not follow it)."""
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    plan = PgPlan(
        "switchover",
        view.cluster,
        f"Finish: {primary} is already the primary of {view.cluster}",
        None,
        primary,
        failure_hint="see `igops pg status` for where things stand",
    )
    elsewhere = {
        host: [database for database, target in table.items() if target != primary]
        for host, table in state.pgbouncer.items()
    }
    elsewhere = {host: names for host, names in elsewhere.items() if names}
    if elsewhere:
        plan.actions.append(
            Step(f"PgBouncer: point {bouncer_text(elsewhere)} at {primary}, RELOAD", "repoint", (elsewhere, primary))
        )
    if state.paused:
        plan.actions.append(Step(f"PgBouncer: RESUME {bouncer_text(state.paused)}", "resume", (state.paused,)))
    if state.node(primary).fenced:
        plan.actions.append(
            Step(
                f"{primary}: remove standby.signal (an interrupted switchover left it; a restart "
                "would bring the primary back read-only)",
                "unfence",
                (primary,),
            )
        )
    record = view.repmgr_node(primary)
    if record and (record.type != "primary" or not record.active):
        plan.actions.append(
            Step(f"{primary}: record it as the primary in repmgr's metadata", "register_primary", (primary,))
        )
    for node in state.nodes:
        if node.name == primary:
            continue
        if follows(node, state.node(primary)):
            # It follows the primary already; repmgr's record of it may still say otherwise (a
            # member that was the primary, rejoined before its record was rewritten).
            if node.repmgr != f"standby of {primary}":
                plan.actions.append(
                    Step(
                        f"{node.name}: record it as a standby of {primary} in repmgr's metadata (repmgr "
                        "standby register --force)",
                        "register_standby",
                        (node.name, primary),
                    )
                )
            continue
        if node.role == "unknown" and node.state == "host unreachable":
            plan.notes.append(f"{node.name}: host unreachable, rejoin it later (igops pg rejoin {node.name})")
            continue
        plan.actions += rejoin_steps(
            node.name, primary, running=node.role != "unknown", archiving=view.fleet.model.archive is not None
        )
    if not plan.actions:
        plan.notes.insert(
            0,
            f"nothing to do: {primary} is the primary of {view.cluster}, PgBouncer routes to it "
            "and every member follows it",
        )
    else:
        # A run killed after it reserved WAL on its candidate for the old primary's rejoin, and
        # rolled back, leaves that slot on a standby, named for the primary: nothing streams
        # through it, it holds WAL back, and repmgr's node check then refuses switchovers.
        plan.actions += [
            drop_rejoin_reservation_step(node.name, primary)
            for node in state.nodes
            if node.name != primary and node.state == "running"
        ]
    plan.actions = with_repmgrd_paused(
        plan.actions, on=primary, members=(primary, *(node.name for node in state.nodes if node.name != primary))
    )
    return plan


def lag_reasons(fleet: Fleet, node: PgNode) -> list[str]:
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


def _repmgr_check(fleet: Fleet, host: Any) -> tuple[list[str], list[str]]:
    """What `repmgr node check` on the candidate refuses, and what it only notes."""
    result = ssh(fleet, host, repmgr(fleet, host, "node", "check"), timeout=30)
    if result.ok:
        return [], []
    if not result.reached:
        return [f"{host.name}: {result.error}"], []
    failing, notes = node_check_findings(result.stdout)
    if not failing and not notes:
        failing = [result.stderr.strip()[-300:] or f"exit {result.exit_code}"]
    prefix = f"repmgr node check on {host.name}: "
    return ([prefix + "; ".join(failing)] if failing else []), [prefix + note for note in notes]


# WAL waiting to be archived on a standby is no reason to refuse it: a standby with
# archive_mode=on archives nothing (repmgr counts .ready files an old primary left), and once
# promoted it archives them. `igops pg archive status` is where an archive backlog is judged.
NOTED_CHECKS = ("WAL archiving",)


def node_check_findings(output: str) -> tuple[list[str], list[str]]:
    """`repmgr node check`'s lines that are not OK: (those that refuse, those only noted). Its
    header line ('Node "db2":') is neither."""
    failing: list[str] = []
    notes: list[str] = []
    for line in output.splitlines():
        name, _, verdict = line.strip().partition(":")
        if not verdict.strip() or verdict.strip().startswith("OK"):
            continue
        (notes if name.strip() in NOTED_CHECKS else failing).append(line.strip())
    return failing, notes


def signature(view: PgView, settling: str | None = None, rejoining: str | None = None) -> tuple[Any, ...]:
    """What a plan depends on: every member's role and state, who follows whom, and where the app
    is routed (PgBouncer). Positions and lag are left out: they move. So are the role, state and
    upstream of a `settling` member, whose start and catch-up the plan waits out: one that answers
    or streams by the time the plan runs does not make it stale. And so is the upstream of a
    `rejoining` member, which the plan stops and points at the primary whatever it streamed from."""
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    return (
        tuple(
            (n.name, n.fenced, n.repmgrd)
            if n.name == settling
            else (n.name, n.role, n.state, n.fenced, None if n.name == rejoining else n.streaming_from, n.repmgrd)
            for n in state.nodes
        ),
        tuple(sorted((host, tuple(sorted(table.items()))) for host, table in state.pgbouncer.items())),
        tuple(sorted((host, tuple(names)) for host, names in state.paused.items())),
    )


Signed = TypeVar("Signed", bound=PgPlan)  # a PgPlan, or a kind of it (igops.restore_in_place.RebuildPlan)


def signed(plan: Signed, view: PgView) -> Signed:
    plan.signature = signature(view, plan.settling, plan.rejoining)
    return plan
