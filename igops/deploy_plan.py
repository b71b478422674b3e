"""The plan of a deploy or rollback: the batches, what each app server does (roll, already
there, skipped, unreachable), the refusals made before anything changes, and the steps shown
to the operator. Planning reads the fleet (deploy_survey) and changes nothing.
"""

from __future__ import annotations

import dataclasses
import secrets as random_source
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from igops.deploy_agents import AppFleet
from igops.deploy_canary_plan import (
    AnalysisOptions,
    CanaryPlan,
    HeldCanary,
    find_held,
    held_notes,
    journal_records,
    plan_canary,
)
from igops.deploy_gate import HealthGate, LbState
from igops.deploy_limits import HostLimit, describe_budget, describe_minimum, parse_batches, split_batches
from igops.deploy_record import inherit_releases_before, read_last_runs
from igops.deploy_release import SHARED_LINKS, Release, SourceTree, content_hash, package, release_id
from igops.deploy_survey import HostReleases, survey_for_change
from igops.errors import RefusedError, UsageError
from igops.output import plural
from igops.pagerduty import changes as pagerduty_changes

# Per-host outcomes; a host plan's action is "roll" or one of ALREADY, SKIPPED, FAILED and OUTSIDE.
DEPLOYED = "deployed"
ALREADY = "already"
ROLLED_BACK = "rolled back"
FAILED = "failed"
UNKNOWN = "unknown"
NOT_STARTED = "not started"
SKIPPED = "skipped"
# Not among the hosts of --hosts: neither leased nor rolled, but still counted in service or not.
OUTSIDE = "outside"


# --- plans ---------------------------------------------------------------------------------------


@dataclass
class HostPlan:
    host: str
    action: str  # "roll", ALREADY, SKIPPED, FAILED (unreachable), OUTSIDE (not in --hosts)
    current: str | None
    in_lb: bool | None = None  # None: no load balancer, or it does not list the host
    upload: bool = False
    # The release a failing batch returns the host to: its current one, or, when an interrupted
    # run had already switched it, the one it ran before that run (see inherit_releases_before).
    before: str | None = None
    venv: str | None = None  # "reuse" / "build"
    detail: str | None = None
    reachable: bool = True


@dataclass
class RolloutPlan:
    kind: str  # "deploy" or "rollback"
    deploy_id: str
    fleet: str
    target: str
    target_description: str
    hosts: list[HostPlan]
    batches: list[list[str]]
    batch_spec: str
    max_fail: int
    gate: HealthGate
    lbs: list[str]
    parallel: int
    keep: int
    pagerduty: bool
    release: Release | None = None
    # Per load balancer, the servers in service when the plan was made (it is refused if a batch
    # would leave fewer than min_in_service; the run checks again before each batch, counting
    # the servers other operations hold out of rotation).
    in_service: dict[str, list[str]] = field(default_factory=dict)
    min_in_service: int = 1
    min_in_service_spec: str = "1"
    max_fail_spec: str | None = None  # as given ("25%"); max_fail is what it allows here
    canary: CanaryPlan | None = None
    canary_note: str | None = None  # why there is no canary analysis, when there is none
    held: HeldCanary | None = None  # the deploy whose canary in place this plan continues from
    stop_after: int | None = None  # --canary-only: the batches after this one are not run
    batch_offset: int = 0  # a plan that continues after a canary numbers its batches from 2

    def roll(self) -> list[HostPlan]:
        return [host for host in self.hosts if host.action == "roll"]

    def scope(self) -> list[str]:
        """The hosts the operation leases: those of --hosts, or every app server."""
        return [host.host for host in self.hosts if host.action != OUTSIDE]

    def run_batches(self) -> list[list[str]]:
        """The batches the run goes through: all of them, or up to --canary-only's stop."""
        return self.batches[: self.stop_after] if self.stop_after is not None else self.batches

    def batch_label(self, number: int) -> str:
        return f"batch {number + self.batch_offset}/{len(self.batches) + self.batch_offset}"

    @property
    def nothing_to_do(self) -> bool:
        return not self.roll()

    def steps(self) -> list[str]:
        """The steps the rollout runs, in its order and numbering (igops.deploy_rollout): when every
        batch passes, the run's progress lines are these."""
        steps: list[str] = []
        uploads = [host.host for host in self.roll() if host.upload]
        if self.release is not None and uploads:
            builds = [host.host for host in self.roll() if host.upload and host.venv == "build"]
            steps.append(
                f"upload release {self.target} ({self.release.size // 1024} KiB, sha256 {self.release.sha256[:12]}…) "
                f"to {_names(uploads)} ({self.parallel} at a time); verify, unpack into releases/{self.target}, "
                f"link shared {', '.join(SHARED_LINKS)}; virtualenv {self.release.requirements}: "
                + (f"BUILD (pip install) on {_names(builds)}" if builds else "reuse")
            )
        lb = f"nginx on {', '.join(self.lbs)}" if self.lbs else None
        canary = self.canary
        if canary is not None and canary.in_place:
            steps.append(canary.step(self.target))
        # Each batch takes the one before it back into the load balancers as it takes itself out
        # (one reload for both); the last batch goes back in a step of its own, and so does the
        # canary, which takes traffic before the next batch goes out.
        previous: list[str] = []
        for number, batch in enumerate(self.run_batches(), 1):
            parts = [f"{self.batch_label(number)}: {', '.join(batch)}"]
            if lb:
                parts.append(
                    (f"put {', '.join(previous)} back, " if previous else "")
                    + f"mark down in {lb} (config test, reload, old workers done)"
                )
            parts.append(f"switch current to {self.target}, reload gunicorn")
            parts.append(f"gate: {self.gate.describe()} serving {self.target}")
            steps.append(" — ".join(parts))
            previous = batch
            if number == 1 and canary is not None and not canary.in_place:
                steps.append(canary.put_back_step(batch))
                steps.append(canary.step(self.target))
                previous = []
        if lb and previous:
            steps.append(f"put {', '.join(previous)} back in the load balancer")
        if self.pagerduty:
            steps.append(f"PagerDuty change event for the {self.kind}")
        return steps

    def notes(self) -> list[str]:
        """What the plan's reader needs beside its steps: the rules the run follows and what it
        found on each host."""
        notes = [
            f"the run stops at the first batch that takes the failures past {self.max_fail} "
            f"(--max-fail {self.max_fail_spec or self.max_fail}) and switches that batch back; "
            "later batches keep their release",
            f"each batch goes out only if at least {self.min_in_service} app servers stay in service in every "
            f"load balancer (min_in_service {self.min_in_service_spec}), counting those other operations hold "
            "out of rotation",
        ]
        notes += held_notes(self.held)
        if self.canary_note:
            notes.append(self.canary_note)
        if self.stop_after is not None:
            notes.append(
                f"--canary-only: the run stops after a passing analysis; `igops deploy` of {self.target} "
                "again continues from batch 2"
            )
        if self.kind == "deploy":
            notes.append(
                f"each switch keeps {self.keep} releases per host (never the current one or the one it replaced)"
            )
        staged = [host.host for host in self.roll() if not host.upload]
        if staged:
            notes.append(f"release {self.target} is already on {_names(staged)}")
        outside = [host.host for host in self.hosts if host.action == OUTSIDE]
        if outside:
            notes.append(f"not in --hosts, left alone: {_names(outside)}")
        for host in self.hosts:
            if host.action not in ("roll", OUTSIDE):
                notes.append(f"{host.host}: {host.action} — {host.detail}")
            elif host.before and host.before != host.current:
                notes.append(f"{host.host}: {host.detail}")
        if not self.lbs:
            notes.append(
                "no host has the 'lb' role: app servers are switched without being taken out of a load balancer"
            )
        return notes


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])} and {len(names) - 5} more"


def _new_deploy_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{random_source.token_hex(2)}"


def host_plans(
    app: AppFleet,
    surveys: dict[str, HostReleases],
    lb: LbState,
    target: str,
    max_fail: int,
    only: Sequence[str] | None = None,
) -> list[HostPlan]:
    plans = []
    unreachable = []
    for host in app.hosts:
        found = surveys[host.name]
        server = app.server(host)
        listed = any(item.server == server for item in lb.servers)
        in_lb = (not lb.drained_by_igops(server) and not lb.drained_by_others(server)) if listed else None
        if only is not None and host.name not in only:
            # Not this run's to roll, but its state counts: a server down or unreachable is out.
            plans.append(
                HostPlan(
                    host.name,
                    OUTSIDE,
                    found.current,
                    in_lb,
                    detail="not in --hosts" + ("" if found.reachable else f"; unreachable: {found.error}"),
                    reachable=found.reachable,
                )
            )
        elif not found.reachable:
            plans.append(
                HostPlan(host.name, FAILED, None, in_lb, detail=f"unreachable: {found.error}", reachable=False)
            )
            unreachable.append(f"{host.name} ({found.error})")
        elif lb.drained_by_others(server):
            plans.append(
                HostPlan(
                    host.name,
                    SKIPPED,
                    found.current,
                    in_lb,
                    detail="taken out of the load balancer by someone else: left alone",
                )
            )
        elif found.current == target and not lb.drained_by_igops(server):
            plans.append(HostPlan(host.name, ALREADY, found.current, in_lb, detail=f"already on {target}"))
        else:
            plans.append(
                HostPlan(
                    host.name,
                    "roll",
                    found.current,
                    in_lb,
                    upload=not found.has(target),
                    detail=("drained by an earlier igops run" if lb.drained_by_igops(server) else None),
                )
            )
        plans[-1].before = plans[-1].current
    if len(unreachable) > max_fail:
        raise RefusedError(
            f"{plural(len(unreachable), 'app host')} unreachable: {'; '.join(unreachable)}; nothing was changed",
            f"fix them, or allow them with --max-fail {len(unreachable)} and deploy to the others",
        )
    unlisted = [
        f"{plan.host} ({app.server(app.host(plan.host))})"
        for plan in plans
        if app.lbs and plan.action == "roll" and plan.in_lb is None
    ]
    if unlisted:
        raise RefusedError(
            f"not in the load balancer's upstream file: {', '.join(unlisted)}; nothing was changed",
            "igops takes a host out of traffic before switching it: list it as "
            "`server ADDRESS:PORT` in [lb] upstream_file, or fix its address or [app] port",
        )
    return plans


def servers_left_in_service(in_service: set[str], batches: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """(batch number, servers still in service while it is out) for every batch that takes a
    server out of service, in order. `in_service` holds the servers a load balancer sends
    traffic to now; a batch's servers come back before the next batch goes out."""
    serving = set(in_service)
    left = []
    for number, batch in enumerate(batches, 1):
        if serving & set(batch):
            left.append((number, len(serving - set(batch))))
        serving |= set(batch)
    return left


def refuse_draining_below_minimum(
    app: AppFleet,
    hosts: list[HostPlan],
    batches: list[list[str]],
    lb: LbState,
    minimum: int = 1,
    described: str | None = None,
) -> dict[str, list[str]]:
    """Refuse a plan with a batch that would leave a load balancer fewer than `minimum` servers
    in service. Servers marked down, and app hosts that did not answer the survey, serve
    nothing; a batch of servers already out takes nothing away. Returns, per load balancer,
    the servers in service now."""
    unavailable = {app.server(app.host(host.host)) for host in hosts if not host.reachable}
    server_batches = [[app.server(app.host(name)) for name in batch] for batch in batches]
    serving: dict[str, list[str]] = {}
    for lb_name in dict.fromkeys(item.lb for item in lb.servers):
        in_service = {
            item.server
            for item in lb.servers
            if item.lb == lb_name and not item.down and item.server not in unavailable
        }
        serving[lb_name] = sorted(in_service)
        for number, left in servers_left_in_service(in_service, server_batches):
            if left < minimum:
                out = out_of_service(app, lb, lb_name, unavailable)
                raise RefusedError(
                    f"batch {number} ({', '.join(batches[number - 1])}) would leave {left} app servers in service "
                    f"in nginx on {lb_name}, fewer than the minimum of {minimum}"
                    + (f" (min_in_service {described})" if described and described != str(minimum) else "")
                    + (f"; out of service now: {', '.join(out)}" if out else "")
                    + "; nothing was changed",
                    "use smaller batches (e.g. --batch 1,25%), or first bring the servers that are down or "
                    "unreachable back into service, or lower [deploy] min_in_service",
                )
    return serving


def out_of_service(app: AppFleet, lb: LbState, lb_name: str, unavailable: set[str]) -> list[str]:
    """The servers `lb_name` sends nothing to now, each with why: the operation that drained it
    (the note igops leaves on the upstream line names it), someone else's mark, or no answer."""
    names = {app.server(host): host.name for host in app.hosts}
    out = []
    for item in lb.servers:
        if item.lb != lb_name or not (item.down or item.server in unavailable):
            continue
        name = names.get(item.server, item.server)
        if not item.down:
            out.append(f"{name} (did not answer)")
        else:
            out.append(f"{name} ({lb.describe(item.server)})")
    return out


def _limits(app: AppFleet, max_fail: int | str | None, only: Sequence[str] | None) -> dict[str, Any]:
    """--max-fail (or [deploy] max_fail) as hosts of this run's scope, and [deploy]
    min_in_service as servers of the fleet: the RolloutPlan fields they become."""
    section = app.fleet.model.deploy
    budget = HostLimit.of(section.max_fail if max_fail is None else max_fail, "--max-fail")
    scope = len(only) if only is not None else len(app.hosts)
    minimum = HostLimit.of(section.min_in_service)
    return {
        "max_fail": budget.allowed_failures(scope),
        "max_fail_spec": describe_budget(budget, scope),
        "min_in_service": minimum.at_least(len(app.hosts)),
        "min_in_service_spec": describe_minimum(minimum, len(app.hosts)),
    }


def scope_of(app: AppFleet, hosts: Sequence[str] | None) -> list[str] | None:
    """--hosts, checked: app servers of the inventory, in its order; None for all of them."""
    if not hosts:
        return None
    names = [host.name for host in app.hosts]
    for name in hosts:
        if name not in names:
            from igops.inventory import unknown_name_hint

            raise UsageError(
                f"--hosts: {name!r} is not an app server", unknown_name_hint(name, names, "app servers are")
            )
    return [name for name in names if name in hosts]


def plan_deploy(
    app: AppFleet,
    tree: SourceTree,
    batch: str,
    max_fail: int | str | None,
    gate: HealthGate,
    parallel: int | None = None,
    now: datetime | None = None,
    only: Sequence[str] | None = None,
    analysis: AnalysisOptions | None = None,
) -> tuple[RolloutPlan, bytes]:
    """Survey the app servers and the load balancer, and decide what a deploy of `tree` does.
    A release with the same content that is already on a host keeps its id, so a rerun
    continues the same release instead of making another; one whose canary an earlier deploy
    left in place (held, or --canary-only) continues from batch 2."""
    sizes = parse_batches(batch)
    fleet = app.fleet
    only = scope_of(app, only)
    limits = _limits(app, max_fail, only)
    surveys, lb = survey_for_change(app, parallel)
    content = content_hash(tree.files)
    identifier = existing_release(surveys, content) or release_id(
        now or datetime.now(UTC), tree.revision[:7] if tree.revision else content[:7]
    )
    release, tarball = package(tree, identifier)
    hosts = host_plans(app, surveys, lb, identifier, limits["max_fail"], only)
    inherit_releases_before(hosts, surveys, read_last_runs(fleet))
    for host in hosts:
        if host.action == "roll":
            host.venv = "reuse" if release.requirements in surveys[host.host].venvs else "build"
    held = find_held(journal_records(fleet), identifier, hosts) if analysis is not None else None
    rolling = [host.host for host in hosts if host.action == "roll"]
    # The canary in place was the first batch: what is left rolls with the sizes after it.
    batches = split_batches(rolling, sizes[1:] or sizes if held else sizes)
    in_service = refuse_draining_below_minimum(
        app, hosts, batches, lb, limits["min_in_service"], limits["min_in_service_spec"]
    )
    lbs = [h.name for h in app.lbs]
    canary, why_none = plan_canary(fleet, hosts, batches, lbs, analysis, held)
    if held is not None and analysis is not None and analysis.canary_only and canary is None:
        raise RefusedError(
            f"--canary-only: {held.describe()} already; nothing was changed",
            f"deploy {identifier} without --canary-only to go on from batch 2",
        )
    plan = RolloutPlan(
        "deploy",
        _new_deploy_id(),
        app.name,
        identifier,
        f"{release.source}, content {release.content}",
        hosts,
        batches,
        batch,
        limits["max_fail"],
        gate,
        lbs,
        parallel or app.settings.parallel,
        fleet.model.app.keep_releases,
        pagerduty_changes.routing_key(fleet) is not None,
        release,
        in_service,
        limits["min_in_service"],
        limits["min_in_service_spec"],
        limits["max_fail_spec"],
        canary,
        why_none,
        held,
        # --canary-only: the canary's batch, or (a canary in place analysed again) none at all.
        (0 if canary.in_place else 1) if canary is not None and canary.canary_only else None,
        1 if held else 0,
    )
    return plan, tarball


def existing_release(surveys: dict[str, HostReleases], content: str) -> str | None:
    """The id of a release with this content already on some host: the one most hosts run, else
    the newest."""
    candidates: dict[str, int] = {}
    for found in surveys.values():
        for item in found.releases:
            if item.get("content") == content:
                candidates[item["id"]] = candidates.get(item["id"], 0) + (found.current == item["id"])
    if not candidates:
        return None
    return max(candidates, key=lambda name: (candidates[name], name))


class ReleaseMissing(RefusedError):
    """A host still to switch lacks the release (pruned, or never staged there)."""


def plan_rollback(
    app: AppFleet,
    to: str | None,
    batch: str,
    max_fail: int | str | None,
    gate: HealthGate,
    parallel: int | None = None,
    only: Sequence[str] | None = None,
) -> RolloutPlan:
    """To `to`, or to the release the fleet's newest release replaced."""
    sizes = parse_batches(batch)
    fleet = app.fleet
    only = scope_of(app, only)
    limits = _limits(app, max_fail, only)
    deploy_id = _new_deploy_id()
    surveys, lb = survey_for_change(app, parallel)
    reachable = [found for found in surveys.values() if found.reachable]
    if to is None:
        newest = max((found.current for found in reachable if found.current), default=None)
        if newest is None:
            raise RefusedError("no app host has a current release", "nothing to roll back")
        previous = {found.previous for found in reachable if found.current == newest}
        if len(previous) != 1 or None in previous:
            shown = ", ".join(f"{f.host}: {f.previous or 'none'}" for f in reachable if f.current == newest)
            raise RefusedError(
                f"the hosts on {newest} do not agree on the release before it ({shown})",
                "choose one with --to RELEASE (see `igops deploy releases`)",
            )
        to = previous.pop()
        assert to is not None  # refused above when None is among them
        description = f"the release before {newest}"
    else:
        description = "chosen with --to"
    hosts = host_plans(app, surveys, lb, to, limits["max_fail"], only)
    inherit_releases_before(hosts, surveys, read_last_runs(fleet))
    lacking = [host.host for host in hosts if host.action == "roll" and not surveys[host.host].has(to)]
    if lacking:
        raise ReleaseMissing(
            f"release {to} is not on {', '.join(lacking)} (pruned, or never deployed there)",
            "choose a release every host has: see `igops deploy releases`",
        )
    built_by_igops = all((surveys[h.host].release_info(to) or {}).get("built_at") for h in hosts if h.action == "roll")
    gate = dataclasses.replace(gate, require_release=built_by_igops)
    rolling = [host.host for host in hosts if host.action == "roll"]
    batches = split_batches(rolling, sizes)
    in_service = refuse_draining_below_minimum(
        app, hosts, batches, lb, limits["min_in_service"], limits["min_in_service_spec"]
    )
    return RolloutPlan(
        "rollback",
        deploy_id,
        app.name,
        to,
        description,
        hosts,
        batches,
        batch,
        limits["max_fail"],
        gate,
        [h.name for h in app.lbs],
        parallel or app.settings.parallel,
        fleet.model.app.keep_releases,
        pagerduty_changes.routing_key(fleet) is not None,
        in_service=in_service,
        min_in_service=limits["min_in_service"],
        min_in_service_spec=limits["min_in_service_spec"],
        max_fail_spec=limits["max_fail_spec"],
    )


def resume_params(plan: RolloutPlan) -> dict[str, Any]:
    """What `igops ops resume` needs to go on with a deploy or rollback: its release and how it
    rolls (the journal keeps it with the operation)."""
    return {
        "target": plan.target,
        "batch": plan.batch_spec,
        # As given ("25%"), so that a resume counts it against its own hosts.
        "max_fail": (plan.max_fail_spec or str(plan.max_fail)).split(" ", 1)[0],
        "hosts": None if all(host.action != OUTSIDE for host in plan.hosts) else plan.scope(),
        # A resume switches without a canary analysis: it refuses one that had not passed it.
        "canary": plan.canary is not None,
        "health_passes": plan.gate.passes,
        "health_timeout": plan.gate.timeout,
        "parallel": plan.parallel,
    }


def plan_resume(app: AppFleet, kind: str, params: dict[str, Any]) -> RolloutPlan:
    """An interrupted deploy or rollback, planned again: the hosts not yet on its release switch
    to it, batch by batch, as a rollback to that release would. The release must be on every
    host still to switch: a deploy killed while it uploaded is continued by running it again."""
    gate = HealthGate(
        app.fleet.model.app.health_path,
        app.fleet.model.app.port,
        int(params["health_passes"]),
        float(params["health_timeout"]),
    )
    try:
        plan = plan_rollback(
            app,
            params["target"],
            params["batch"],
            params["max_fail"],
            gate,
            params.get("parallel"),
            params.get("hosts"),
        )
    except ReleaseMissing as refused:
        if kind != "deploy":
            raise
        raise RefusedError(
            f"the interrupted deploy had not staged release {params['target']} everywhere: " + refused.message,
            "run the deploy again (igops deploy REV): it stages, then switches",
        ) from None
    return dataclasses.replace(
        plan,
        kind="deploy" if kind == "deploy" else "rollback",
        target_description=f"resumed {kind} of {params['target']}",
    )
