"""Rolling deploys of the app: one release built once, staged on every app server in parallel,
then switched batch by batch behind the load balancer, each host gated on its own /health.

The layout on a host is Capistrano's (releases/<id>, an atomically switched `current`,
shared/); the work on hosts is done by the `release` and `upstream` agents. The state a rerun
needs lives where it is true: each host's `current` symlink and revisions.log, and a marker on
every upstream line igops took out of nginx. So a run that was killed, or that lost a host,
leaves nothing half-switched, and the next run finds what is left to do and does it.
"""

from __future__ import annotations

import dataclasses
import secrets as random_source
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from igops import pagerduty_changes
from igops.deploy_agents import AppFleet
from igops.deploy_gate import (
    GateResult,
    HealthGate,
    LbServer,
    LbState,
    LoadBalancers,
    drained_by_igops,
    put_back,
    wait_healthy,
)
from igops.deploy_record import LastRunRecord, deployer, read_last_run
from igops.deploy_release import (
    SHARED_LINKS,
    Release,
    SourceTree,
    content_hash,
    package,
    read_source,
    release_id,
    requirements_hash,
)
from igops.deploy_survey import HostReleases, fleet_releases, survey_for_change
from igops.errors import ExitCode, IgopsError, RefusedError, RemoteError, UsageError
from igops.output import Reporter, plural

T = TypeVar("T")

SWITCH_TIMEOUT_S = 90.0
VENV_BUILD_TIMEOUT_S = 900.0
SUMMARY_PROBLEMS = 3
# The fewest upstream servers each load balancer must keep in service while a batch is out:
# a plan whose batch would leave fewer is refused.
MIN_SERVERS_IN_SERVICE = 1

# Per-host outcomes.
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
        return max(1, total * self.percent // 100)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent}%"


def parse_batches(spec: str) -> list[BatchSize]:
    """"1,25%" -> [1, 25%]. The last size repeats until every host is in a batch."""
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
            raise UsageError(f"bad batch size {text!r} in --batch {spec!r}",
                             "use host counts and percentages, e.g. --batch 1,25% or --batch 50%") from None
    return sizes


def split_batches(items: Sequence[T], sizes: Sequence[BatchSize]) -> list[list[T]]:
    batches: list[list[T]] = []
    position, index = 0, 0
    while position < len(items):
        size = sizes[min(index, len(sizes) - 1)].of(len(items))
        batches.append(list(items[position:position + size]))
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
        steps: list[str] = []
        uploads = [host.host for host in self.roll() if host.upload]
        if self.release is not None and uploads:
            builds = [host.host for host in self.roll() if host.upload and host.venv == "build"]
            steps.append(
                f"upload release {self.target} ({self.release.size // 1024} KiB, sha256 {self.release.sha256[:12]}…) "
                f"to {_names(uploads)} ({self.parallel} at a time); verify, unpack into releases/{self.target}, "
                f"link shared {', '.join(SHARED_LINKS)}; virtualenv {self.release.requirements}: "
                + (f"BUILD (pip install) on {_names(builds)}" if builds else "reuse"))
        staged = [host.host for host in self.roll() if not host.upload]
        if staged:
            steps.append(f"release {self.target} is already on {_names(staged)}")
        lb = f"nginx on {', '.join(self.lbs)}" if self.lbs else None
        for number, batch in enumerate(self.batches, 1):
            parts = [f"batch {number}/{len(self.batches)}: {', '.join(batch)}"]
            if lb:
                parts.append(f"mark down in {lb} (config test, reload, old workers done)")
            parts.append(f"switch current to {self.target}, reload gunicorn")
            parts.append(f"gate: {self.gate.describe()} serving {self.target}")
            if lb:
                parts.append("put back")
            steps.append(" — ".join(parts))
        steps.append(f"stop at the first batch that takes the failures past {self.max_fail} "
                     f"(--max-fail {self.max_fail}) and switch that batch back; later batches keep their release")
        if self.kind == "deploy":
            steps.append(f"keep {self.keep} releases per host (never the current one or the one it replaced)")
        if self.pagerduty:
            steps.append(f"PagerDuty change event for the {self.kind}")
        for host in self.hosts:
            if host.action != "roll":
                steps.append(f"{host.host}: {host.action} — {host.detail}")
            elif host.before and host.before != host.current:
                steps.append(f"{host.host}: {host.detail}")
        if not self.lbs:
            steps.append("no host has the 'lb' role: app servers are switched without being taken out of a "
                         "load balancer")
        return steps


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])} and {len(names) - 5} more"


def _new_deploy_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{random_source.token_hex(2)}"


def _host_plans(app: AppFleet, surveys: dict[str, HostReleases], lb: LbState, target: str,
                max_fail: int) -> list[HostPlan]:
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
            plans.append(HostPlan(host.name, SKIPPED, found.current, in_lb,
                                  detail="taken out of the load balancer by someone else: left alone"))
        elif found.current == target and not lb.drained_by_igops(server):
            plans.append(HostPlan(host.name, ALREADY, found.current, in_lb, detail=f"already on {target}"))
        else:
            plans.append(HostPlan(host.name, "roll", found.current, in_lb, upload=not found.has(target),
                                  detail=("drained by an earlier igops run" if lb.drained_by_igops(server) else None)))
        plans[-1].before = plans[-1].current
    if len(unreachable) > max_fail:
        raise RefusedError(f"{plural(len(unreachable), 'app host')} unreachable: {'; '.join(unreachable)}; "
                           "nothing was changed",
                           f"fix them, or allow them with --max-fail {len(unreachable)} and deploy to the others")
    unlisted = [f"{plan.host} ({app.server(app.host(plan.host))})" for plan in plans
                if app.lbs and plan.action == "roll" and plan.in_lb is None]
    if unlisted:
        raise RefusedError(f"not in the load balancer's upstream file: {', '.join(unlisted)}; nothing was changed",
                           "igops takes a host out of traffic before switching it: list it as "
                           "`server ADDRESS:PORT` in [lb] upstream_file, or fix its address or [app] port")
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


def refuse_draining_below_minimum(app: AppFleet, hosts: list[HostPlan], batches: list[list[str]], lb: LbState,
                                  minimum: int = MIN_SERVERS_IN_SERVICE) -> dict[str, list[str]]:
    """Refuse a plan with a batch that would leave a load balancer fewer than `minimum` servers
    in service. Servers marked down, and app hosts that did not answer the survey, serve
    nothing; a batch of servers already out takes nothing away. Returns, per load balancer,
    the servers in service now."""
    unavailable = {app.server(app.host(host.host)) for host in hosts if host.action == FAILED}
    server_batches = [[app.server(app.host(name)) for name in batch] for batch in batches]
    serving: dict[str, list[str]] = {}
    for lb_name in dict.fromkeys(item.lb for item in lb.servers):
        in_service = {item.server for item in lb.servers
                      if item.lb == lb_name and not item.down and item.server not in unavailable}
        serving[lb_name] = sorted(in_service)
        for number, left in servers_left_in_service(in_service, server_batches):
            if left < minimum:
                raise RefusedError(
                    f"batch {number} ({', '.join(batches[number - 1])}) would leave {left} app servers in service "
                    f"in nginx on {lb_name}, fewer than the minimum of {minimum}; nothing was changed",
                    "use smaller batches (e.g. --batch 1,25%), or first bring the servers that are down or "
                    "unreachable back into service")
    return serving


def inherit_releases_before(hosts: list[HostPlan], surveys: dict[str, HostReleases], last_run: dict | None) -> None:
    """A host that an interrupted run switched to its target returns, if its batch fails now,
    to the release it ran before that run, not to the interrupted run's target: that release
    never passed a health gate the run saw through. The interrupted run's journal has it."""
    if not last_run or not last_run.get("interrupted"):
        return
    earlier = last_run.get("before") or {}
    for host in hosts:
        release = earlier.get(host.host)
        if host.action != "roll" or not release or host.current != last_run.get("target") or release == host.current:
            continue
        if not surveys[host.host].has(release):
            host.detail = "; ".join(filter(None, [host.detail, f"{release}, its release before the interrupted "
                                                                f"{last_run.get('kind')}, is gone"]))
            continue
        host.before = release
        host.detail = "; ".join(filter(None, [host.detail, f"returns to {release} if it fails (its release before "
                                                            f"the interrupted {last_run.get('kind')} "
                                                            f"{last_run.get('deploy_id')})"]))


def plan_deploy(app: AppFleet, tree: SourceTree, batch: str, max_fail: int, gate: HealthGate,
                parallel: int | None = None, now: datetime | None = None) -> tuple[RolloutPlan, bytes]:
    """Survey the app servers and the load balancer, and decide what a deploy of `tree` does.
    A release with the same content that is already on a host keeps its id, so a rerun
    continues the same release instead of making another."""
    sizes = parse_batches(batch)
    fleet = app.fleet
    deploy_id = _new_deploy_id()
    surveys, lb = survey_for_change(app, parallel)
    content = content_hash(tree.files)
    identifier = _existing_release(surveys, content) or release_id(
        now or datetime.now(UTC), tree.revision[:7] if tree.revision else content[:7])
    release, tarball = package(tree, identifier)
    hosts = _host_plans(app, surveys, lb, identifier, max_fail)
    inherit_releases_before(hosts, surveys, read_last_run(fleet))
    for host in hosts:
        if host.action == "roll":
            host.venv = "reuse" if release.requirements in surveys[host.host].venvs else "build"
    rolling = [host.host for host in hosts if host.action == "roll"]
    batches = split_batches(rolling, sizes)
    in_service = refuse_draining_below_minimum(app, hosts, batches, lb)
    plan = RolloutPlan("deploy", deploy_id, app.name, identifier, f"{release.source}, content {release.content}",
                       hosts, batches, batch, max_fail, gate, [h.name for h in app.lbs],
                       parallel or app.settings.parallel, fleet.model.app.keep_releases,
                       pagerduty_changes.routing_key(fleet) is not None,
                       release, in_service)
    return plan, tarball


def _existing_release(surveys: dict[str, HostReleases], content: str) -> str | None:
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


def plan_rollback(app: AppFleet, to: str | None, batch: str, max_fail: int, gate: HealthGate,
                  parallel: int | None = None) -> RolloutPlan:
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
            raise RefusedError(f"the hosts on {newest} do not agree on the release before it ({shown})",
                               "choose one with --to RELEASE (see `igops deploy releases`)")
        to = previous.pop()
        description = f"the release before {newest}"
    else:
        description = "chosen with --to"
    hosts = _host_plans(app, surveys, lb, to, max_fail)
    inherit_releases_before(hosts, surveys, read_last_run(fleet))
    lacking = [host.host for host in hosts if host.action == "roll" and not surveys[host.host].has(to)]
    if lacking:
        raise ReleaseMissing(f"release {to} is not on {', '.join(lacking)} (pruned, or never deployed there)",
                           "choose a release every host has: see `igops deploy releases`")
    built_by_igops = all((surveys[h.host].release_info(to) or {}).get("built_at") for h in hosts if h.action == "roll")
    gate = dataclasses.replace(gate, require_release=built_by_igops)
    rolling = [host.host for host in hosts if host.action == "roll"]
    batches = split_batches(rolling, sizes)
    in_service = refuse_draining_below_minimum(app, hosts, batches, lb)
    return RolloutPlan("rollback", deploy_id, app.name, to, description, hosts, batches, batch,
                       max_fail, gate, [h.name for h in app.lbs], parallel or app.settings.parallel,
                       fleet.model.app.keep_releases, pagerduty_changes.routing_key(fleet) is not None,
                       in_service=in_service)


def resume_params(plan: RolloutPlan) -> dict:
    """What `igops ops resume` needs to go on with a deploy or rollback: its release and how it
    rolls (the journal keeps it with the operation)."""
    return {"target": plan.target, "batch": plan.batch_spec, "max_fail": plan.max_fail,
            "health_passes": plan.gate.passes, "health_timeout": plan.gate.timeout, "parallel": plan.parallel}


def plan_resume(app: AppFleet, kind: str, params: dict) -> RolloutPlan:
    """An interrupted deploy or rollback, planned again: the hosts not yet on its release switch
    to it, batch by batch, as a rollback to that release would. The release must be on every
    host still to switch: a deploy killed while it uploaded is continued by running it again."""
    gate = HealthGate(app.fleet.model.app.health_path, app.fleet.model.app.port, int(params["health_passes"]),
                      float(params["health_timeout"]))
    try:
        plan = plan_rollback(app, params["target"], params["batch"], int(params["max_fail"]), gate,
                             params.get("parallel"))
    except ReleaseMissing as refused:
        if kind != "deploy":
            raise
        raise RefusedError(f"the interrupted deploy had not staged release {params['target']} everywhere: "
                           + refused.message,
                           "run the deploy again (igops deploy REV): it stages, then switches") from None
    return dataclasses.replace(plan, kind="deploy" if kind == "deploy" else "rollback",
                               target_description=f"resumed {kind} of {params['target']}")


# --- results -------------------------------------------------------------------------------------

@dataclass
class HostOutcome:
    host: str
    state: str
    release: str | None  # what `current` points at now; None when unknown
    before: str | None
    in_lb: bool | None
    batch: int | None = None
    detail: str | None = None


@dataclass
class RolloutResult:
    kind: str
    deploy_id: str
    target: str
    hosts: list[HostOutcome]
    stopped: str | None = None
    change_event: str = "not configured"
    duration_s: float = 0.0

    def count(self, *states: str) -> int:
        return sum(host.state in states for host in self.hosts)

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.count(FAILED, ROLLED_BACK, UNKNOWN, NOT_STARTED) == 0

    @property
    def exit_code(self) -> ExitCode:
        if self.ok:
            return ExitCode.OK
        if self.count(DEPLOYED) == 0:
            return ExitCode.FAILED
        return ExitCode.PARTIAL

    def problems(self) -> list[str]:
        return [f"{host.host} {host.state}: {host.detail}" for host in self.hosts
                if host.state in (FAILED, ROLLED_BACK, UNKNOWN)]

    def summary(self) -> str:
        on_target = self.count(DEPLOYED, ALREADY)
        text = f"{self.kind} of {self.target}: {on_target} of {plural(len(self.hosts), 'host')} on it"
        problems = self.problems()
        if self.stopped:
            text += f"; stopped at {self.stopped}"
        if problems:
            shown = SUMMARY_PROBLEMS
            text += "; " + "; ".join(problems[:shown]) + (
                f"; and {len(problems) - shown} more (see the table)" if len(problems) > shown else "")
        out = [host.host for host in self.hosts if host.in_lb is False and host.state != SKIPPED]
        if out:
            text += f"; out of the load balancer: {', '.join(out)} (rerun to finish)"
        return text


class RolloutFailed(IgopsError):
    def __init__(self, result: RolloutResult):
        super().__init__(result.summary(), "the table above shows each host's release; "
                                           "`igops deploy releases` shows the fleet")
        self.result = result
        self.exit_code = result.exit_code
        self.problems = result.problems()


# --- running a rollout -----------------------------------------------------------------------------

class Rollout:
    def __init__(self, app: AppFleet, plan: RolloutPlan, reporter: Reporter, tarball: bytes):
        self.fleet = app.fleet
        self.plan = plan
        self.tarball = tarball
        self.reporter = reporter
        self.app = app
        self.lbs = LoadBalancers(self.app, f"{plan.kind} {plan.deploy_id} to {plan.target}")
        self.record = LastRunRecord(self.fleet, plan)
        self.outcomes: dict[str, HostOutcome] = {}
        for host in plan.hosts:
            state = host.action if host.action != "roll" else NOT_STARTED
            self.outcomes[host.host] = HostOutcome(host.host, state, host.current, host.before or host.current,
                                                   host.in_lb, detail=host.detail)
        self.failures = sum(host.action == FAILED for host in plan.hosts)

    def run(self) -> RolloutResult:
        started = time.monotonic()
        result = RolloutResult(self.plan.kind, self.plan.deploy_id, self.plan.target, list(self.outcomes.values()))
        self.record.update()
        try:
            if self.plan.release is not None:
                self._stage()
            result.stopped = self._roll()
        finally:
            result.duration_s = round(time.monotonic() - started, 1)
            self.record.update(status="finished" if result.ok else "failed", stopped=result.stopped)
        result.change_event = self._mark(result)
        return result

    # stage -----------------------------------------------------------------------------------
    def _stage(self) -> None:
        release = self.plan.release
        uploads = [host for host in self.plan.roll() if host.upload]
        if not uploads:
            return
        request = {"op": "stage", "id": release.id, "sha256": release.sha256, "size": release.size,
                   "shared": list(SHARED_LINKS)}
        jobs = {host_plan.host: (self.app.release_agent(self.app.host(host_plan.host)), request, self.tarball)
                for host_plan in uploads}
        timeout = VENV_BUILD_TIMEOUT_S if any(h.venv == "build" for h in uploads) else self.app.settings.command_timeout
        with self.reporter.step(f"upload and unpack release {release.id} on {plural(len(jobs), 'host')}") as step:
            with self.reporter.progress("hosts", total=len(jobs)) as advance:
                answers = self.app.request_each(jobs, timeout, self.plan.parallel, on_done=lambda: advance(1))
            failed = []
            built = 0
            for host_plan in uploads:
                answer, error = answers[host_plan.host].answer, answers[host_plan.host].error
                if answer is None:
                    failed.append(host_plan.host)
                    self._outcome(host_plan.host, FAILED, detail=f"staging failed: {error}")
                else:
                    built += answer.get("venv") == "built"
            step.detail = (f"{len(jobs) - len(failed)} staged" + (f", virtualenv built on {built}" if built else "")
                           + (f"; failed on {', '.join(failed)}" if failed else ""))
            if failed:
                step.status = "failed"
            self.failures += len(failed)

    # roll ------------------------------------------------------------------------------------
    def _roll(self) -> str | None:
        plan = self.plan
        stopped = None
        if self.failures > plan.max_fail:
            stopped = f"staging ({self.failures} failed, more than --max-fail {plan.max_fail}); nothing was switched"
        to_put_back: list[str] = []
        try:
            stopped = self._batches(stopped, to_put_back)
        except BaseException:
            # Interrupted or its lease lost between batches: the last batch that passed its gate
            # goes back into traffic before the operation stops.
            with self.reporter.recovery():
                self._put_back(to_put_back)
            raise
        self._put_back(to_put_back)
        for outcome in self.outcomes.values():
            if outcome.state == NOT_STARTED:
                outcome.detail = "; ".join(filter(None, [outcome.detail, f"not reached: still on {outcome.release}"]))
        return stopped

    def _batches(self, stopped: str | None, to_put_back: list[str]) -> str | None:
        """Roll batch after batch; `to_put_back` holds, at any moment, the hosts of the last
        batch that passed its gate and still wait to go back into the load balancer."""
        plan = self.plan
        for number, names in enumerate(plan.batches if stopped is None else [], 1):
            batch = [name for name in names if self.outcomes[name].state == NOT_STARTED]
            if not batch:
                continue
            self.record.update(batch=number)
            with self.reporter.step(f"batch {number}/{len(plan.batches)}: {', '.join(batch)}") as step:
                too_few = self.below_minimum(batch, to_put_back)
                if too_few:
                    step.status, step.detail = "failed", too_few
                    stopped = f"batch {number}: {too_few}; nothing in it was switched"
                    break
                try:
                    self._lb_change(down=batch, up=to_put_back)
                except RemoteError as exc:
                    step.status, step.detail = "failed", str(exc)
                    stopped = f"batch {number}: could not take {', '.join(batch)} out of the load balancer"
                    break
                for name in to_put_back:
                    self.outcomes[name].in_lb = True
                to_put_back.clear()
                for name in batch:
                    self.outcomes[name].in_lb = False if self.app.lbs else None
                    self.record.host(name, "drained")
                passed, failed = self._switch_and_gate(batch, number)
                self.failures += len(failed)
                if self.failures > plan.max_fail:
                    stopped = (f"batch {number} of {len(plan.batches)} ({self.failures} failed, "
                               f"more than --max-fail {plan.max_fail}); later batches keep their release")
                    self._switch_back(passed, "the batch was rolled back because the rollout stopped")
                    step.status = "failed"
                    step.detail = stopped
                else:
                    step.detail = "; ".join(f"{n}: {self.outcomes[n].state}" for n in batch)
                    if failed:
                        step.status = "failed"
                # Only a host that just passed a health gate goes back into traffic.
                to_put_back.extend(name for name in batch if self.outcomes[name].state in (DEPLOYED, ROLLED_BACK))
            if stopped:
                break
        return stopped

    def below_minimum(self, batch: list[str], back: list[str]) -> str | None:
        """Why taking `batch` out (while `back` comes back) would leave a load balancer fewer
        than MIN_SERVERS_IN_SERVICE servers, now that earlier batches' failures stay out."""
        server = lambda name: self.app.server(self.app.host(name))  # noqa: E731
        returning = {server(name) for name in back}
        gone = {server(name) for name, outcome in self.outcomes.items() if outcome.in_lb is False and name not in back}
        leaving = {server(name) for name in batch}
        for lb_name, servers in self.plan.in_service.items():
            serving = (set(servers) | returning) - gone
            left = serving - leaving
            if serving & leaving and len(left) < MIN_SERVERS_IN_SERVICE:
                return (f"taking {', '.join(batch)} out would leave {len(left)} app servers in service in nginx on "
                        f"{lb_name}, fewer than the minimum of {MIN_SERVERS_IN_SERVICE}")
        return None

    def _put_back(self, names: list[str]) -> None:
        if not names or not self.app.lbs:
            return
        with self.reporter.step(f"put {', '.join(names)} back in the load balancer") as step:
            try:
                self._lb_change(up=names)
            except RemoteError as exc:
                step.status, step.detail = "failed", str(exc)
                for name in names:
                    outcome = self.outcomes[name]
                    outcome.detail = (f"{outcome.detail + '; ' if outcome.detail else ''}"
                                      f"could not be put back: {exc.message}")
                return
            for name in names:
                self.outcomes[name].in_lb = True
                self.record.host(name, self.outcomes[name].state)

    def _lb_change(self, down: list[str] = (), up: list[str] = ()) -> None:
        if not self.app.lbs or not (down or up):
            return
        server = lambda name: self.app.server(self.app.host(name))  # noqa: E731
        self.lbs.change(down=[server(n) for n in down], up=[server(n) for n in up])

    def _switch(self, names: list[str], release_of: Callable[[str], str],
                action: str) -> dict[str, tuple[dict | None, str | None, bool]]:
        """name -> (answer, error, whether the agent answered at all). Without an answer the
        switch may or may not have happened: only the host knows which release is current."""
        jobs = {}
        for name in names:
            host = self.app.host(name)
            jobs[name] = (self.app.release_agent(host), {
                "op": "switch", "id": release_of(name), "keep": self.plan.keep, "reload": self.app.reload_command(host),
                "action": action, "deploy": self.plan.deploy_id,
                "protect": [self.outcomes[name].before] if self.outcomes[name].before else []}, b"")
        answers = self.app.request_each(jobs, SWITCH_TIMEOUT_S, self.plan.parallel)
        return {name: (answers[name].answer, answers[name].error, answers[name].answered) for name in names}

    def _gate(self, names: list[str], release_of: Callable[[str], str]) -> dict[str, GateResult]:
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(len(names), 128), thread_name_prefix="gate") as pool:
            futures = {name: pool.submit(wait_healthy, str(self.app.host(name).address), self.plan.gate,
                                         release_of(name)) for name in names}
            return {name: future.result() for name, future in futures.items()}

    def _switch_and_gate(self, batch: list[str], number: int) -> tuple[list[str], list[str]]:
        target = self.plan.target
        switched = self._switch(batch, lambda _: target, self.plan.kind)
        to_gate = []
        failed: list[str] = []
        for name in batch:
            answer, error, answered = switched[name]
            outcome = self.outcomes[name]
            outcome.batch = number
            if answer is None:
                if answered:
                    outcome.state, outcome.detail = FAILED, f"switch refused: {error}"
                else:
                    outcome.state, outcome.release = UNKNOWN, None
                    outcome.detail = (f"unreachable during the switch ({error}): its current release is unknown, "
                                      "so it stays out of the load balancer")
                failed.append(name)
            elif answer["reload_exit"] != 0:
                outcome.state, outcome.release = FAILED, target
                outcome.detail = f"reload failed (exit {answer['reload_exit']}): {answer['reload_output']}"
                failed.append(name)
            else:
                outcome.release = target
                to_gate.append(name)
            self.record.host(name, f"switched to {target}" if answer else outcome.state)
        gates = self._gate(to_gate, lambda _: target)
        passed = []
        for name in to_gate:
            if gates[name].ok:
                self.outcomes[name].state, self.outcomes[name].detail = DEPLOYED, gates[name].detail
                passed.append(name)
            else:
                self.outcomes[name].state, self.outcomes[name].detail = FAILED, gates[name].detail
                failed.append(name)
        back = [name for name in failed if self.outcomes[name].state == FAILED]
        self._switch_back(back, None)
        return passed, failed

    def _switch_back(self, names: list[str], why: str | None) -> None:
        """Return hosts to the release they ran before this run, and gate them on it."""
        returnable = [name for name in names if self.outcomes[name].before
                      and self.outcomes[name].before != self.plan.target]
        for name in names:
            if name not in returnable:
                outcome = self.outcomes[name]
                outcome.detail = f"{outcome.detail}; it had no earlier release to return to" + (
                    "" if outcome.state == DEPLOYED else ", so it stays out of the load balancer")
        if not returnable:
            return
        before = lambda name: self.outcomes[name].before  # noqa: E731
        switched = self._switch(returnable, before, "rollback")
        to_gate = []
        for name in returnable:
            answer, error, answered = switched[name]
            outcome = self.outcomes[name]
            reason = why or outcome.detail
            if answer is None or answer["reload_exit"] != 0:
                outcome.state = FAILED if answered else UNKNOWN
                if answer is not None:
                    outcome.release = before(name)
                elif not answered:
                    outcome.release = None
                outcome.detail = (f"{reason}; switching back to {before(name)} failed: "
                                  f"{error or answer['reload_output']}")
                continue
            outcome.release = before(name)
            to_gate.append(name)
        gates = self._gate(to_gate, before)
        for name in to_gate:
            outcome = self.outcomes[name]
            reason = why or outcome.detail
            outcome.state = ROLLED_BACK
            if gates[name].ok:
                outcome.detail = f"{reason}; back on {before(name)}"
            else:
                outcome.detail = f"{reason}; back on {before(name)} but unhealthy there too: {gates[name].detail}"
                outcome.state = FAILED
            self.record.host(name, f"switched back to {before(name)}")

    # PagerDuty -------------------------------------------------------------------------------
    def _mark(self, result: RolloutResult) -> str:
        key = pagerduty_changes.routing_key(self.fleet)
        if not key:
            return "not configured"
        with self.reporter.step(f"PagerDuty change event for the {self.plan.kind}") as step:
            release = self.plan.release
            details = {"fleet": self.app.name, "deploy_id": result.deploy_id, "release": result.target,
                       "result": "ok" if result.ok else ("stopped" if result.stopped else "partial"),
                       "hosts": {host.host: host.state for host in result.hosts}, "by": deployer(),
                       "duration_s": result.duration_s}
            if release is not None:
                details.update(source=release.source, content=release.content, revision=release.revision)
            sent = pagerduty_changes.send_change(self.fleet.model.monitoring.pagerduty_url, key,
                                                 f"{self.app.name}: {result.summary()}",
                               f"igops on {socket.gethostname()}", details)
            step.detail = sent.detail + (f" after {sent.attempts} attempts" if sent.attempts > 1 else "")
            if not sent.sent:
                step.status = "failed"
            return "sent" if sent.sent else f"failed: {sent.detail}"

    def _outcome(self, name: str, state: str, detail: str | None = None) -> None:
        self.outcomes[name].state = state
        self.outcomes[name].detail = detail
        self.record.host(name, state)


def execute(app: AppFleet, plan: RolloutPlan, reporter: Reporter = Reporter(), tarball: bytes = b"") -> RolloutResult:
    """Run the plan (a deploy's with its release's tarball); raise RolloutFailed (carrying the
    result) unless every host ended on the plan's release."""
    result = Rollout(app, plan, reporter, tarball).run()
    if not result.ok:
        raise RolloutFailed(result)
    return result


# Reached through igops.deploy by its users while the module is split up.
__all__ = [
    "AppFleet", "HealthGate", "HostReleases", "LbServer", "LbState", "SHARED_LINKS", "SourceTree", "content_hash",
    "drained_by_igops", "fleet_releases", "package", "put_back", "read_source", "release_id", "requirements_hash",
]
