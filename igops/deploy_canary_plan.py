"""The canary analysis as a step of a deploy's plan: whether a plan has one, which hosts it
compares (the first batch against the servers that stay on the release it replaces), what its
verdicts do, and the deploy it continues when an earlier one left its canary in place (held,
or stopped by --canary-only), found in the operations journal.

The analysis itself is igops.deploy_canary; running the step, igops.deploy_analysis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.deploy_canary import INCONCLUSIVE, PASS, Thresholds
from igops.errors import RefusedError, UsageError
from igops.output import plural

if TYPE_CHECKING:
    from igops.deploy_plan import HostPlan
    from igops.inventory import Fleet

HOLD, CONTINUE, ROLLBACK = "hold", "continue", "rollback"
ON_INCONCLUSIVE = (HOLD, CONTINUE, ROLLBACK)


@dataclass(frozen=True)
class AnalysisOptions:
    """What `igops deploy` was asked: --analysis, --on-inconclusive, --canary-only."""

    seconds: int | None = None  # None: [deploy.canary] window; 0: no analysis (the /health gate only)
    on_inconclusive: str = HOLD
    canary_only: bool = False

    def __post_init__(self) -> None:
        if self.on_inconclusive not in ON_INCONCLUSIVE:
            raise UsageError(
                f"--on-inconclusive {self.on_inconclusive!r} is not one of {', '.join(ON_INCONCLUSIVE)}",
                "hold stops with the canary in place (exit 6), continue goes on, rollback returns the canary",
            )
        if self.canary_only and self.seconds == 0:
            raise UsageError(
                "--canary-only stops after a passing canary analysis, and --analysis 0 turns it off",
                "give --analysis SECONDS (or leave it to [deploy.canary] window) with --canary-only",
            )


@dataclass
class HeldCanary:
    """A deploy that left its canary on the release: held (inconclusive) or --canary-only
    (passed), from its journal record's `canary` fact."""

    operation: str
    verdict: str
    hosts: list[str]
    before: dict[str, str]  # each canary host's release before that deploy
    ended: str | None

    def describe(self) -> str:
        return (
            f"its canary {', '.join(self.hosts)} {'passed' if self.verdict == PASS else 'was inconclusive'} "
            f"in deploy {self.operation}"
        )


@dataclass
class CanaryPlan:
    """The analysis step of a plan."""

    seconds: int
    on_inconclusive: str
    canary_only: bool
    canary: list[str]
    baseline: list[str]
    baseline_release: str
    lbs: list[str]
    thresholds: Thresholds
    max_log_bytes: int
    # The operation whose canary, already on the release and in rotation, is analysed again
    # before the rollout goes on (no switch); None: the canary is this plan's batch 1.
    in_place: str | None = None
    before: dict[str, str] = field(default_factory=dict)  # a canary in place: what it returns to
    # [deploy.canary] traffic_percent: the canary's share of the requests while watched (None: even).
    traffic_percent: int | None = None
    # [deploy.canary] warmup: seconds in rotation before the window begins. None for a canary in
    # place, which has served since the deploy that left it there.
    warmup: int | None = None

    def share(self) -> str:
        """What the plan says of the canary's traffic while it is watched."""
        if self.traffic_percent is None:
            return "its even share of the traffic"
        return (
            f"at most {self.traffic_percent}% of the traffic (the other servers' nginx weights raised, "
            "put back when the analysis ends)"
        )

    def put_back_step(self, hosts: Sequence[str]) -> str:
        """The step that puts the canary's batch back in the load balancers before the analysis."""
        taking = "traffic" if self.traffic_percent is None else f"at most {self.traffic_percent}% of the traffic"
        return f"put {', '.join(hosts)} back in the load balancer: the canary takes {taking}"

    def step(self, target: str) -> str:
        limits = self.thresholds
        fail_action = f"{', '.join(self.canary)} back to {self.baseline_release}"
        inconclusive = {
            HOLD: "hold with the canary in place (exit 6)",
            CONTINUE: "continue",
            ROLLBACK: f"{fail_action}",
        }[self.on_inconclusive]
        return (
            f"canary analysis: {', '.join(self.canary)} on {target} against {', '.join(self.baseline)} on "
            f"{self.baseline_release}, {self.seconds} s of traffic through nginx on {', '.join(self.lbs)}"
            + (f" after a {self.warmup} s warm-up" if self.warmup else "")
            + ", "
            f"the canary with {self.share()}: "
            f"5xx rate (Fisher's exact), latency (Mann-Whitney U; p50 x{limits.max_p50_ratio:g}, "
            f"p95 x{limits.max_p95_ratio:g}), per endpoint, worker restarts (alpha {limits.alpha:g}, "
            f"at least {limits.min_requests} requests a side); fail: {fail_action}; inconclusive: {inconclusive}"
            + ("; pass: stop (--canary-only)" if self.canary_only else "")
        )


def canary_before(hosts: Sequence[HostPlan], canary: Sequence[str]) -> str | None:
    """The release the canary hosts ran before: the baseline runs it too."""
    found = Counter(host.before for host in hosts if host.host in canary and host.before)
    return found.most_common(1)[0][0] if found else None


def plan_canary(
    fleet: Fleet,
    hosts: Sequence[HostPlan],
    batches: Sequence[Sequence[str]],
    lbs: Sequence[str],
    options: AnalysisOptions | None,
    held: HeldCanary | None,
) -> tuple[CanaryPlan | None, str | None]:
    """The analysis step of a deploy's plan, or None and why there is none (a plan note)."""
    section = fleet.model.deploy.canary
    seconds = section.window if options is None or options.seconds is None else options.seconds
    if options is None or seconds == 0:
        return None, None if options is None else "no canary analysis (--analysis 0): the /health gate only"
    if held is not None and held.verdict == PASS:
        return None, f"no canary analysis: {held.describe()}; the rollout continues from batch 2"
    before: str | None
    if held is not None:
        canary, before = list(held.hosts), Counter(held.before.values()).most_common(1)[0][0]
    else:
        if len(batches) < 2:
            return _none(options, "one batch: no app server would stay on the old release to compare with")
        canary, before = list(batches[0]), canary_before(hosts, batches[0])
    if not lbs:
        return _none(options, "no host has the 'lb' role: there is no access log to read")
    baseline = [
        host.host
        for host in hosts
        if host.host not in canary and host.reachable and host.in_lb and host.current == before
    ]
    if not baseline or before is None:
        return _none(options, f"no app server in rotation stays on {before or 'the release the canary replaces'}")
    plan = CanaryPlan(
        seconds,
        options.on_inconclusive,
        options.canary_only,
        canary,
        baseline,
        before,
        list(lbs),
        Thresholds.of(section),
        section.max_log_bytes,
        held.operation if held else None,
        dict(held.before) if held else {},
        section.traffic_percent,
        None if held else section.warmup,
    )
    return plan, None


def _none(options: AnalysisOptions, why: str) -> tuple[None, str]:
    """No analysis is possible: a plan note, unless the command asked for one by name (a release
    someone wants judged must not ship to every host on the /health gate alone)."""
    if options.canary_only:
        raise RefusedError(
            f"--canary-only stops after a canary analysis, and this deploy can have none: {why}; nothing was changed",
            "deploy without --canary-only (the /health gate still holds every batch)",
        )
    if options.seconds:
        raise RefusedError(
            f"--analysis {options.seconds} asks for a canary analysis, and this deploy can have none: {why}; "
            "nothing was changed",
            "deploy without --analysis to go on with the /health gate alone (a plan note says there is no "
            "analysis), or with --analysis 0",
        )
    return None, f"no canary analysis: {why}"


def fact(plan: CanaryPlan, verdict: str, summary: str, brief: dict[str, Any], stopped_here: bool) -> dict[str, Any]:
    """What the journal keeps of an analysis: what a later deploy of the release reads
    (find_held) and what `igops ops show` shows."""
    return {
        "verdict": verdict,
        "hosts": plan.canary,
        "before": plan.before or dict.fromkeys(plan.canary, plan.baseline_release),
        "baseline": plan.baseline,
        "in_place": stopped_here,
        "summary": summary,
        "evidence": brief,
    }


def find_held(records: Sequence[dict[str, Any]], target: str, hosts: Sequence[HostPlan]) -> HeldCanary | None:
    """The newest deploy of `target` whose canary passed or was inconclusive and is still on
    `target` and in rotation (`hosts`: the plan's view of each host now)."""
    by_name = {host.host: host for host in hosts}
    for record in sorted(records, key=lambda r: str(r.get("started") or ""), reverse=True):
        found = (record.get("facts") or {}).get("canary")
        if record.get("kind") != "deploy" or (record.get("params") or {}).get("target") != target or not found:
            continue
        if found.get("verdict") not in (PASS, INCONCLUSIVE) or not found.get("hosts"):
            continue
        if all(
            name in by_name and by_name[name].current == target and by_name[name].in_lb is not False
            for name in found["hosts"]
        ):
            return HeldCanary(
                str(record["id"]),
                str(found["verdict"]),
                list(found["hosts"]),
                dict(found.get("before") or {}),
                record.get("ended"),
            )
        return None  # the newest analysis of this release is no longer in place
    return None


def held_notes(held: HeldCanary | None) -> list[str]:
    if held is None:
        return []
    return [
        f"continues deploy {held.operation}: {held.describe()}; batch 1 ({plural(len(held.hosts), 'host')}) "
        "is not run again"
    ]


def journal_records(fleet: Fleet) -> list[dict[str, Any]]:
    """Every deploy the operations journal holds, where find_held looks for a canary in place."""
    from igops import coordination
    from igops.operations import journal

    store = journal.for_coordinator(coordination.for_fleet(fleet), fleet.state_dir)
    return [record for record in store.records() if record.get("kind") == "deploy"]
