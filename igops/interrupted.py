"""What `igops ops resume` and `igops ops abort` do with an interrupted operation.

Both start from the operation's journal record and run as operations themselves, under the
same id and lease (igops.operations.engine), and both refuse while the original holder is
alive: a resumed or aborted operation must never race the process that started it.

- resume plans the operation again from its recorded parameters: the planners of
  switchovers, failovers and rejoins read the live cluster and finish or roll back whatever
  an interrupted run left (igops.failover), so the plan is always the one for now.
- abort reads the journal: for every step that started, its release (RESUME a paused pooler)
  and, unless a step past the point of no return had started or a started step's probe finds
  it took effect (a promotion that completed after the run was cut off), its undo (start the
  stopped old primary again), run in reverse order by the kind's actions; it names each step
  it could not undo.
- a deploy or rollback resumes as a rollback to its release would; its abort puts back the hosts
  it left drained, each only once it passes the rollout's health gate (igops.deploy_abort).
- a shard move, or the move a rebalance was in, is finished or rolled back from the move's own
  journal in the directory database (igops.shards), whose id the operation journaled.
- a snapshot create cannot go on from where it stopped (its freeze, the point in time its
  snapshots share, ended with it; the host's thaw watchdog saw to that). Abort deletes the
  snapshots its group got; resume does that and takes a new group with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import failover
from igops.errors import AlreadyRunning, RefusedError
from igops.operations import conflicts, journal
from igops.operations.engine import OperationSpec
from igops.operations.steps import Step, execute, from_spec, took_effect
from igops.output import Reporter, plural

if TYPE_CHECKING:
    from igops.failover import PgClusterState, PgPlan, PgResult, RedisPlan, RedisResult, RedisState
    from igops.inventory import Fleet

RESUMABLE = ("pg-switchover", "pg-failover", "pg-rejoin", "redis-switchover", "redis-failover", "redis-rejoin")
SHARD_KINDS = ("shard-move", "shard-rebalance")
# Kinds whose own command continues an interrupted run: what ops resume tells the operator to run
# (for a snapshot or deploy whose record predates the parameters resume needs, too).
RERUN = {
    "deploy": "igops deploy {target}",
    "deploy-rollback": "igops deploy rollback",
    "snapshot-create": "igops snapshot create {host}",
    # Its plan is made from what each member has, so a rerun does only what is left.
    "pg-archive-setup": "igops pg archive setup {cluster}",
    # Its plan is made from what the host has: mounts already rebuilt from the group stay.
    "pg-rebuild": "igops snapshot restore {group} --onto {node} --in-place",
}


@dataclass
class Continuation:
    """A resume or an abort, planned: what the dry run prints and the apply runs."""

    spec: OperationSpec
    apply: Callable[[Reporter], Any]
    not_undone: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed under the plan's steps


def refuse_if_alive(store: journal.LocalJournal | journal.EtcdJournal, record: dict[str, Any]) -> None:
    status = journal.status_of(record, store.alive(record))
    if status == journal.RUNNING:
        raise AlreadyRunning(
            f"operation {record['id']} is still running: {record.get('user')}@{record.get('host')} "
            f"pid {record.get('pid')}",
            "wait for it, or for its lease to expire if that process is gone",
        )
    if status == "superseded":
        by = record.get("superseded_by") or "a rerun"
        raise RefusedError(
            f"operation {record['id']} was superseded by {by}, a rerun of it that took over its targets and what "
            "it left undone: there is nothing to continue here",
            f"see igops ops show {by}; if that one is interrupted, resume or abort it instead"
            if record.get("superseded_by")
            else "see igops ops show " + record["id"],
        )
    if status != journal.INTERRUPTED:
        raise RefusedError(
            f"operation {record['id']} has ended ({status}): there is nothing to continue",
            "see igops ops show " + record["id"],
        )


def plan_resume(fleet: Fleet, record: dict[str, Any], entries: list[dict[str, Any]]) -> Continuation:
    kind, params = record["kind"], record.get("params") or {}
    if kind == "snapshot-create" and params.get("group"):
        return _snapshot_continuation(fleet, record, resume=True)
    if kind in ("deploy", "deploy-rollback") and params.get("batch"):
        return _deploy_resume(fleet, record)
    if kind in SHARD_KINDS:
        return _shard_move_continuation(fleet, record, entries, resume=True)
    if kind not in RESUMABLE:
        rerun = RERUN.get(kind)
        raise RefusedError(
            f"{kind} is not resumed by igops ops resume",
            f"run {rerun.format(**params)}: it continues from where the interrupted run stopped"
            if rerun
            else "run its command again",
        )
    plan: PgPlan | RedisPlan
    if kind.startswith("pg-"):
        plan, _ = _pg_plan(fleet, kind, params)
        # A plan made from the live state cannot see a repmgrd pause (repmgr keeps it, with no
        # deadline, where repmgrd does not run yet); the journal can: the run's own unpause.
        planned = {step.action for step in plan.actions}
        plan.actions += [step for step in unreleased(entries, REPMGRD_UNPAUSE) if step.action not in planned]
        resources = [conflicts.pg_cluster(plan.cluster)]
    else:
        plan, _ = _redis_plan(fleet, kind, params, promoted_target(entries))
        resources = [conflicts.REDIS]
    spec = OperationSpec(
        kind, f"Resume {record['id']}: {plan.title}", record.get("targets") or [], resources, plan.steps(), params
    )

    def run(reporter: Reporter) -> PgResult | RedisResult:
        failover.check_unchanged(fleet, plan)
        if isinstance(plan, failover.RedisPlan):
            return failover.apply_redis(fleet, plan, reporter)
        return failover.apply_pg(fleet, plan, reporter)

    if not plan.actions:
        raise RefusedError(
            f"nothing to resume: {plan.notes[0] if plan.notes else plan.title}",
            "igops ops abort marks it ended if nothing is left to do",
        )
    return Continuation(spec, run)


def _pg_plan(fleet: Fleet, kind: str, params: dict[str, Any]) -> tuple[PgPlan, PgClusterState]:
    if kind == "pg-switchover":
        return failover.plan_pg_switchover(fleet, params["cluster"], params["to"], bool(params.get("accept_risk")))
    if kind == "pg-failover":
        return failover.plan_pg_failover(fleet, params["cluster"], params.get("to"), bool(params.get("accept_risk")))
    return failover.plan_pg_rejoin(fleet, params["node"], bool(params.get("accept_risk")))


def promoted_target(entries: list[dict[str, Any]]) -> bool:
    """Whether the journal shows this Redis switchover began promoting its target (a step whose
    undo makes the promoted node replicate again). Whether the old master was demoted after it
    the live state says (one master or two), not the journal: a run killed as it began the
    demotion journaled that step's intent, yet the demotion may never have run."""
    return any(
        (entry.get("undo") or {}).get("action") == "replicate" for entry in entries if entry.get("event") == "intent"
    )


def _redis_plan(
    fleet: Fleet, kind: str, params: dict[str, Any], promoted: bool = False
) -> tuple[RedisPlan, RedisState]:
    if kind == "redis-switchover":
        return failover.plan_redis_switchover(
            fleet, params["to"], bool(params.get("accept_risk")), promoted_by_interrupted_run=promoted
        )
    if kind == "redis-failover":
        return failover.plan_redis_failover(fleet, params.get("to"), bool(params.get("accept_risk")))
    return failover.plan_redis_rejoin(fleet, params["node"], bool(params.get("accept_risk")))


def recovery_steps(entries: list[dict[str, Any]], rolled_forward: bool = False) -> tuple[list[Step], list[str]]:
    """From a journal: the steps an abort runs (releases always, undos unless the operation
    had started a step past its point of no return, or a step's probe found it took effect:
    `rolled_forward`),
    newest first, and the titles of the steps that ran and that nothing undoes."""
    started = [entry for entry in entries if entry.get("event") == "intent" and entry.get("step")]
    past_no_return = rolled_forward or any(entry.get("point_of_no_return") for entry in started)
    undos: list[Step] = []
    releases: list[Step] = []
    not_undone: list[str] = []
    seen: set[str] = set()
    for entry in started:
        if entry["step"] in seen:  # a resumed run journals its own steps again
            continue
        seen.add(entry["step"])
        if entry.get("release"):
            releases.append(from_spec(entry["release"]))
        if entry.get("undo") and not past_no_return:
            undos.append(from_spec(entry["undo"]))
        elif not entry.get("release"):
            not_undone.append(f"[{entry['step']}] {entry.get('title')}")
    return [*reversed(undos), *reversed(releases)], not_undone


# The release a pg role change's first step holds until its last (igops.pg.plan_steps).
REPMGRD_UNPAUSE = "unpause_repmgrd"


def effect_probes(entries: list[dict[str, Any]]) -> list[tuple[str, Step]]:
    """The probes of the started steps that say whether they took effect (igops.operations.steps),
    each with the step it probes: whether such a step ended, failed or was cut off, its effect
    may have happened, and then an abort must roll forward."""
    probes: dict[str, tuple[str, Step]] = {}
    for entry in entries:
        if entry.get("event") == "intent" and entry.get("took_effect"):
            probe = from_spec(entry["took_effect"])
            probes.setdefault(repr(probe), (f"[{entry['step']}] {entry.get('title')}", probe))
    return list(probes.values())


def unreleased(entries: list[dict[str, Any]], action: str) -> list[Step]:
    """The releases named `action` of steps an interrupted run started, that no step of it (or of
    a resume) then ran to its end: what the run still holds."""
    held: dict[str, Step] = {}
    for entry in entries:
        if entry.get("event") == "intent" and (entry.get("release") or {}).get("action") == action:
            release = from_spec(entry["release"])
            held[release.title] = release
        elif entry.get("event") == "result" and entry.get("status") == "ok":
            held.pop(entry.get("title") or "", None)
    return list(held.values())


def move_of(record: dict[str, Any], entries: list[dict[str, Any]]) -> int | None:
    """The shard move an interrupted shard operation was in: the last one it journaled (a
    rebalance runs several in turn)."""
    journaled = [entry["move"] for entry in entries if entry.get("event") == "fact" and entry.get("move") is not None]
    # A resume or an abort of the move carries its id in its parameters.
    known = (
        (record.get("facts") or {}).get("move")
        or (journaled[-1] if journaled else None)
        or (record.get("params") or {}).get("move")
    )
    return int(known) if known is not None else None


def _shard_move_continuation(
    fleet: Fleet, record: dict[str, Any], entries: list[dict[str, Any]], resume: bool
) -> Continuation:
    """The move the operation was in, finished (igops.shards.resume_move) or rolled back
    (abort_move) from the move's own journal in the directory database, as `igops shard move
    --resume|--abort` would. A rebalance's finished moves stay where they went, and the moves it
    had not started are left to a new `igops shard rebalance`."""
    from igops import shards

    move_id = move_of(record, entries)
    if move_id is None and resume:
        raise RefusedError(
            f"{record['id']} stopped before it started a shard move: there is nothing to resume",
            f"igops ops abort {record['id']} marks it ended; igops shard moves lists every move",
        )
    if move_id is None:
        # Nothing of it to undo: the abort only ends it (a person, not a rerun of its command).
        resources = [tuple(resource) for resource in record.get("resources") or []]
        title = f"Abort {record['id']} ({record.get('title')}): it stopped before it started a shard move"
        spec = OperationSpec(
            record["kind"], title, record.get("targets") or [], resources, [], record.get("params") or {}
        )
        return Continuation(spec, lambda reporter: {"undone": [], "not_undone": []})
    rebalance = record["kind"] == "shard-rebalance"
    notes = (
        ["the rebalance's moves that finished stay where they went; igops shard rebalance plans the rest again"]
        if rebalance
        else []
    )
    apply: Callable[[Reporter], Any]
    if resume:
        plan, move = shards.plan_resume(fleet, move_id)
        title = (
            f"Resume {record['id']}: move {move_id} of shard {plan.shard} ({plan.source} -> {plan.target}) "
            f"after {move.step}"
        )
        steps, apply = plan.steps(), lambda reporter: shards.resume_move(fleet, move_id, reporter)
        shard, source, target = plan.shard, plan.source, plan.target
    else:
        aborting = shards.plan_abort(fleet, move_id)
        title = (
            f"Abort {record['id']}: move {move_id} of shard {aborting.shard} "
            f"({aborting.source} -> {aborting.target}, at {aborting.step})"
        )
        steps, apply = aborting.steps(), lambda reporter: shards.abort_move(fleet, aborting, reporter)
        shard, source, target = aborting.shard, aborting.source, aborting.target
    resources = (
        [tuple(resource) for resource in record.get("resources") or []]
        if rebalance
        else shards.move_resources(shard, source, target)
    )
    spec = OperationSpec(
        record["kind"],
        title,
        record.get("targets") or [],
        resources,
        steps,
        {**(record.get("params") or {}), "move": move_id},
    )
    return Continuation(spec, apply, notes=notes)


def _deploy_resume(fleet: Fleet, record: dict[str, Any]) -> Continuation:
    """The hosts not yet on the interrupted rollout's release switch to it, batch by batch
    (igops.deploy.plan_resume); those an igops deploy left drained come back as their batch does."""
    from igops import deploy

    canary = (record.get("facts") or {}).get("canary") or {}
    if record["params"].get("canary") and canary.get("verdict") not in ("pass", "inconclusive"):
        # ops resume switches the rest without an analysis: only once the canary has passed one.
        raise RefusedError(
            f"{record['id']} was interrupted before its canary analysis passed: resuming would switch the other "
            "hosts unanalysed",
            f"run the deploy again (igops deploy {record['params'].get('target')}): it analyses a canary first; "
            "or igops ops abort puts back the hosts it drained that pass their health gate",
        )
    with deploy.AppFleet.of(fleet) as app:
        plan = deploy.plan_resume(app, record["kind"], record["params"])
    if plan.nothing_to_do:
        raise RefusedError(
            f"nothing to resume: every reachable app host is on {plan.target}",
            "igops ops abort marks it ended (and puts back each drained host that passes its health gate)",
        )
    spec = OperationSpec(
        record["kind"],
        f"Resume {record['id']}: {record['kind']} of {plan.target} to {', '.join(h.host for h in plan.roll())}",
        [h.host for h in plan.roll()],
        [conflicts.app_server(name) for name in plan.scope()],
        plan.steps(),
        record["params"],
    )

    def run(reporter: Reporter) -> Any:
        with deploy.AppFleet.of(fleet) as app:
            return deploy.execute(app, plan, reporter)

    return Continuation(spec, run, notes=plan.notes())


def _plan_deploy_abort(fleet: Fleet, record: dict[str, Any]) -> Continuation:
    """An interrupted deploy or rollback: the hosts it left drained go back into rotation once
    they pass its health gate (igops.deploy_abort)."""
    from igops import deploy, deploy_abort

    with deploy.AppFleet.of(fleet) as app:
        aborting = deploy_abort.plan_deploy_abort(app, record)
    spec = OperationSpec(
        record["kind"],
        f"Abort {record['id']} ({record.get('title')})",
        record.get("targets") or [],
        [(str(kind), str(name)) for kind, name in record.get("resources") or []] or [conflicts.APP],
        aborting.steps(),
        record.get("params") or {},
    )

    def run(reporter: Reporter) -> dict[str, list[str]]:
        with deploy.AppFleet.of(fleet) as app:
            return aborting.run(app, reporter)

    return Continuation(spec, run, notes=aborting.notes())


def _snapshot_continuation(fleet: Fleet, record: dict[str, Any], resume: bool) -> Continuation:
    """Abort: delete what the interrupted group got. Resume: that, then a new group."""
    from igops import snapshot, snapshot_groups
    from igops.ebs import Ebs

    params = record["params"]
    ebs = Ebs(fleet)
    group = next((g for g in snapshot_groups.groups(ebs, params["host"]) if g.group_id == params["group"]), None)
    complete = group is not None and group.state in (snapshot_groups.STATE_COMPLETE, snapshot_groups.STATE_PENDING)
    partial = group if group is not None and not complete else None
    not_undone = (
        [
            f"group {params['group']} is complete (killed after tagging it): kept; "
            f"igops snapshot delete {params['group']} removes it"
        ]
        if complete
        else []
    )
    # A CreateSnapshots call in flight when igops was killed may still add to the group.
    not_undone.append(
        f"snapshots of group {params['group']} that AWS makes after this are left to "
        "`igops snapshot prune` (it deletes groups that never completed)"
    )
    if resume and complete:
        raise RefusedError(
            f"nothing to resume: snapshot group {params['group']} is complete", "igops ops abort marks it ended"
        )
    plan = None
    if resume:
        plan = snapshot.plan_create(
            fleet,
            params["host"],
            params.get("mounts"),
            deadline=params.get("deadline"),
            hook=params.get("hook", True),
            allow_primary=params.get("allow_primary", False),
        )
    deletes = snapshot_groups.delete_steps(partial, []) if partial else []
    verb = "Resume" if resume else "Abort"
    title = f"{verb} {record['id']}: " + (
        f"delete the {plural(len(deletes), 'snapshot')} of group {params['group']}"
        if deletes
        else f"group {params['group']} has no snapshots to delete"
    )
    if plan:
        title += f", then take group {plan.group_id}"
    spec = OperationSpec(
        "snapshot-create",
        title,
        [params["host"]],
        conflicts.for_host(fleet, params["host"]),
        [*deletes, *(plan.steps() if plan else [])],
        params,
    )

    def run(reporter: Reporter) -> dict[str, Any]:
        for line, found in zip(deletes, [*partial.snapshots, *partial.strays] if partial else [], strict=True):
            with reporter.step(line):
                ebs.delete_snapshot(found["SnapshotId"])
        created = snapshot.create(fleet, plan, reporter) if plan else None
        return {"undone": deletes, "not_undone": not_undone, "group": created.group_id if created else None}

    return Continuation(spec, run, [] if resume else not_undone)


def plan_abort(fleet: Fleet, record: dict[str, Any], entries: list[dict[str, Any]]) -> Continuation:
    kind = record["kind"]
    if kind in ("deploy", "deploy-rollback"):
        return _plan_deploy_abort(fleet, record)
    if kind == "snapshot-create" and (record.get("params") or {}).get("group"):
        return _snapshot_continuation(fleet, record, resume=False)
    if kind in SHARD_KINDS:
        return _shard_move_continuation(fleet, record, entries, resume=False)
    if kind.startswith("pg-"):
        actions_for: Callable[[], Any] | None = lambda: failover.PgActions(fleet)  # noqa: E731
        resources = [conflicts.pg_cluster(c) for c in _clusters(record)]
    elif kind.startswith("redis-"):
        actions_for = lambda: failover.RedisActions(fleet)  # noqa: E731
        resources = [conflicts.REDIS]
    else:
        actions_for = None
        resources = [tuple(resource) for resource in record.get("resources") or []]
    # Asked now, so that the plan (and its dry run) is the one that runs.
    effects = _effects_found(actions_for, effect_probes(entries)) if actions_for else []
    steps, not_undone = recovery_steps(entries, rolled_forward=bool(effects))
    not_undone = [*effects, *not_undone]
    if steps and actions_for is None:
        raise RefusedError(f"{kind} journals no undo igops can run", "see igops ops show " + record["id"])
    title = f"Abort {record['id']} ({record.get('title')})"
    spec = OperationSpec(
        kind, title, record.get("targets") or [], resources, [step.title for step in steps], record.get("params") or {}
    )

    def run(reporter: Reporter) -> dict[str, list[str]]:
        if not steps:
            return {"undone": [], "not_undone": not_undone}
        assert actions_for is not None  # refused above: steps and no actions to run them
        actions = actions_for()
        try:
            execute(steps, actions, reporter, "see igops ops show " + record["id"])
        finally:
            close = getattr(actions, "close", None)
            if close:
                close()
        return {"undone": [step.title for step in steps], "not_undone": not_undone}

    return Continuation(spec, run, not_undone)


def _effects_found(actions_for: Callable[[], Any], probes: list[tuple[str, Step]]) -> list[str]:
    if not probes:
        return []
    actions = actions_for()
    try:
        return [f"{step}: it took effect: {found}" for step, probe in probes if (found := took_effect(actions, probe))]
    finally:
        close = getattr(actions, "close", None)
        if close:
            close()


def _clusters(record: dict[str, Any]) -> list[str]:
    return [name for kind, name in (record.get("resources") or []) if kind == "pg"]
