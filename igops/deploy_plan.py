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
from typing import Any, TypeVar

from igops.deploy_agents import AppFleet
from igops.deploy_gate import HealthGate, LbState
from igops.deploy_record import read_last_run
from igops.deploy_release import SHARED_LINKS, Release, SourceTree, content_hash, package, release_id
from igops.deploy_survey import HostReleases, survey_for_change
from igops.errors import RefusedError, UsageError
from igops.output import plural
from igops.pagerduty import changes as pagerduty_changes

T = TypeVar("T")

# The fewest upstream servers each load balancer must keep in service while a batch is out:
# a plan whose batch would leave fewer is refused.
MIN_SERVERS_IN_SERVICE = 1

# Per-host outcomes; a host plan's action is "roll" or one of ALREADY, SKIPPED and FAILED.
DEPLOYED = "deployed"
ALREADY = "already"
ROLLED_BACK = "rolled back"
FAILED = "failed"
UNKNOWN = "unknown"
NOT_STARTED = "not started"
SKIPPED = "skipped"


# --- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSize:
    """One entry of a batch list, like Ansible's `serial`: a host count or a percentage of
    all the hosts being rolled."""

    count: int | None = None
    percent: int | None = None

    def of(self, total: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None  # a size is a count or a percentage (parse_batches)
        return max(1, total * self.percent // 100)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent}%"


def parse_batches(spec: str) -> list[BatchSize]:
    """ "1,25%" -> [1, 25%]. The last size repeats until every host is in a batch."""
    sizes = []
    for part in spec.split(","):
        text = part.strip()
        try:
            if text.endswith("%"):
                percent = int(text[:-1])
                if not 1 <= percent <= 100:
                    raise ValueError
                sizes.append(BatchSize(percent=percent))
            else:
                count = int(text)
                if count < 1:
                    raise ValueError
                sizes.append(BatchSize(count=count))
        except ValueError:
            raise UsageError(
                f"bad batch size {text!r} in --batch {spec!r}",
                "use host counts and percentages, e.g. --batch 1,25% or --batch 50%",
            ) from None
    return sizes


def split_batches(items: Sequence[T], sizes: Sequence[BatchSize]) -> list[list[T]]:
    batches: list[list[T]] = []
    position, index = 0, 0
    while position < len(items):
        size = sizes[min(index, len(sizes) - 1)].of(len(items))
        batches.append(list(items[position : position + size]))
        position += size
        index += 1
    return batches


# --- plans ---------------------------------------------------------------------------------------


@dataclass
class HostPlan:
    host: str
    action: str  # "roll", ALREADY, SKIPPED, FAILED (unreachable)
    current: str | None
    in_lb: bool | None = None  # None: no load balancer, or it does not list the host
    upload: bool = False
    # The release a failing batch returns the host to: its current one, or, when an interrupted
    # run had already switched it, the one it ran before that run (see inherit_releases_before).
    before: str | None = None
    venv: str | None = None  # "reuse" / "build"
    detail: str | None = None


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
    # would leave fewer than MIN_SERVERS_IN_SERVICE; the run checks again before each batch).
    in_service: dict[str, list[str]] = field(default_factory=dict)

    def roll(self) -> list[HostPlan]:
        return [host for host in self.hosts if host.action == "roll"]

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
        # Each batch takes the one before it back into the load balancers as it takes itself out
        # (one reload for both); the last batch goes back in a step of its own.
        previous: list[str] = []
        for number, batch in enumerate(self.batches, 1):
            parts = [f"batch {number}/{len(self.batches)}: {', '.join(batch)}"]
            if lb:
                parts.append(
                    (f"put {', '.join(previous)} back, " if previous else "")
                    + f"mark down in {lb} (config test, reload, old workers done)"
                )
            parts.append(f"switch current to {self.target}, reload gunicorn")
            parts.append(f"gate: {self.gate.describe()} serving {self.target}")
            steps.append(" — ".join(parts))
            previous = batch
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
            f"(--max-fail {self.max_fail}) and switches that batch back; later batches keep their release"
        ]
        if self.kind == "deploy":
            notes.append(
                f"each switch keeps {self.keep} releases per host (never the current one or the one it replaced)"
            )
        staged = [host.host for host in self.roll() if not host.upload]
        if staged:
            notes.append(f"release {self.target} is already on {_names(staged)}")
        for host in self.hosts:
            if host.action != "roll":
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
    app: AppFleet, surveys: dict[str, HostReleases], lb: LbState, target: str, max_fail: int
) -> list[HostPlan]:
    plans = []
    unreachable = []
    for host in app.hosts:
        found = surveys[host.name]
        server = app.server(host)
        listed = any(item.server == server for item in lb.servers)
        in_lb = (not lb.drained_by_igops(server) and not lb.drained_by_others(server)) if listed else None
        if not found.reachable:
            plans.append(HostPlan(host.name, FAILED, None, in_lb, detail=f"unreachable: {found.error}"))
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
    app: AppFleet, hosts: list[HostPlan], batches: list[list[str]], lb: LbState, minimum: int = MIN_SERVERS_IN_SERVICE
) -> dict[str, list[str]]:
    """Refuse a plan with a batch that would leave a load balancer fewer than `minimum` servers
    in service. Servers marked down, and app hosts that did not answer the survey, serve
    nothing; a batch of servers already out takes nothing away. Returns, per load balancer,
    the servers in service now."""
    unavailable = {app.server(app.host(host.host)) for host in hosts if host.action == FAILED}
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
                raise RefusedError(
                    f"batch {number} ({', '.join(batches[number - 1])}) would leave {left} app servers in service "
                    f"in nginx on {lb_name}, fewer than the minimum of {minimum}; nothing was changed",
                    "use smaller batches (e.g. --batch 1,25%), or first bring the servers that are down or "
                    "unreachable back into service",
                )
    return serving


def inherit_releases_before(
    hosts: list[HostPlan], surveys: dict[str, HostReleases], last_run: dict[str, Any] | None
) -> None:
    """A host that an interrupted run switched to its target returns, if its batch fails now,
    to the release it ran before that run, not to the interrupted run's target: that release
    never passed a health gate the run saw through. The interrupted run's record has it."""
    if not last_run or not last_run.get("interrupted"):
        return
    earlier = last_run.get("before") or {}
    for host in hosts:
        release = earlier.get(host.host)
        if host.action != "roll" or not release or host.current != last_run.get("target") or release == host.current:
            continue
        if not surveys[host.host].has(release):
            host.detail = "; ".join(
                filter(
                    None,
                    [host.detail, f"{release}, its release before the interrupted {last_run.get('kind')}, is gone"],
                )
            )
            continue
        host.before = release
        host.detail = "; ".join(
            filter(
                None,
                [
                    host.detail,
                    f"returns to {release} if it fails (its release before "
                    f"the interrupted {last_run.get('kind')} "
                    f"{last_run.get('deploy_id')})",
                ],
            )
        )


def plan_deploy(
    app: AppFleet,
    tree: SourceTree,
    batch: str,
    max_fail: int,
    gate: HealthGate,
    parallel: int | None = None,
    now: datetime | None = None,
) -> tuple[RolloutPlan, bytes]:
    """Survey the app servers and the load balancer, and decide what a deploy of `tree` does.
    A release with the same content that is already on a host keeps its id, so a rerun
    continues the same release instead of making another."""
    sizes = parse_batches(batch)
    fleet = app.fleet
    deploy_id = _new_deploy_id()
    surveys, lb = survey_for_change(app, parallel)
    content = content_hash(tree.files)
    identifier = existing_release(surveys, content) or release_id(
        now or datetime.now(UTC), tree.revision[:7] if tree.revision else content[:7]
    )
    release, tarball = package(tree, identifier)
    hosts = host_plans(app, surveys, lb, identifier, max_fail)
    inherit_releases_before(hosts, surveys, read_last_run(fleet))
    for host in hosts:
        if host.action == "roll":
            host.venv = "reuse" if release.requirements in surveys[host.host].venvs else "build"
    rolling = [host.host for host in hosts if host.action == "roll"]
    batches = split_batches(rolling, sizes)
    in_service = refuse_draining_below_minimum(app, hosts, batches, lb)
    plan = RolloutPlan(
        "deploy",
        deploy_id,
        app.name,
        identifier,
        f"{release.source}, content {release.content}",
        hosts,
        batches,
        batch,
        max_fail,
        gate,
        [h.name for h in app.lbs],
        parallel or app.settings.parallel,
        fleet.model.app.keep_releases,
        pagerduty_changes.routing_key(fleet) is not None,
        release,
        in_service,
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
    app: AppFleet, to: str | None, batch: str, max_fail: int, gate: HealthGate, parallel: int | None = None
) -> RolloutPlan:
    """To `to`, or to the release the fleet's newest release replaced."""
    sizes = parse_batches(batch)
    fleet = app.fleet
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
    hosts = host_plans(app, surveys, lb, to, max_fail)
    inherit_releases_before(hosts, surveys, read_last_run(fleet))
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
    in_service = refuse_draining_below_minimum(app, hosts, batches, lb)
    return RolloutPlan(
        "rollback",
        deploy_id,
        app.name,
        to,
        description,
        hosts,
        batches,
        batch,
        max_fail,
        gate,
        [h.name for h in app.lbs],
        parallel or app.settings.parallel,
        fleet.model.app.keep_releases,
        pagerduty_changes.routing_key(fleet) is not None,
        in_service=in_service,
    )


def resume_params(plan: RolloutPlan) -> dict[str, Any]:
    """What `igops ops resume` needs to go on with a deploy or rollback: its release and how it
    rolls (the journal keeps it with the operation)."""
    return {
        "target": plan.target,
        "batch": plan.batch_spec,
        "max_fail": plan.max_fail,
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
            app, params["target"], params["batch"], int(params["max_fail"]), gate, params.get("parallel")
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
