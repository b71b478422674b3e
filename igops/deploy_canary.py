"""The canary analysis of a deploy: the first batch, on the new release, against the app servers
still on the old one, over the same window of traffic through the same load balancers.

Pure: it takes the requests each side answered (igops.deploy_accesslog records) and each host's
gunicorn worker restarts, and returns the evidence and a verdict:

- 5xx rate: Fisher's exact test on the 2x2 table of errors and other answers, one-sided (is the
  canary's error rate higher?);
- latency: the Mann-Whitney U test on the servers' response times, one-sided (does the canary
  answer slower?), with the ratios of the medians and of the 95th percentiles;
- per endpoint, where each side has enough requests, the same two tests at alpha divided by the
  number of endpoints tested (Bonferroni: twenty endpoints do not give twenty chances of a
  false alarm);
- worker restarts on a canary host beyond those of the baseline host with the most.

A test fails only when it is significant AND its effect is past its threshold (a rate increase,
a latency ratio and an increase in milliseconds): with thousands of requests a harmless 3%
slowdown is significant, and a good release must not fail under ordinary load. Too few requests
on either side is inconclusive, never a pass.

scipy is imported inside `analyse`, never when igops starts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from igops.output import plural

if TYPE_CHECKING:
    from igops.deploy_accesslog import Request
    from igops.inventory_model import DeployCanary

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
# A percentile below a millisecond (nginx's resolution) is taken as one, so that a ratio stays
# finite and means something.
LATENCY_FLOOR_S = 0.001


@dataclass(frozen=True)
class Thresholds:
    """What the analysis calls a regression: the inventory's [deploy.canary] (see its model for
    each key's meaning and default)."""

    alpha: float = 0.01
    min_requests: int = 200
    min_endpoint_requests: int = 50
    max_error_rate_increase: float = 0.01
    max_p50_ratio: float = 1.5
    max_p95_ratio: float = 2.0
    min_latency_increase_ms: float = 20.0
    max_worker_restarts: int = 0
    worst_endpoints: int = 3

    @classmethod
    def of(cls, section: DeployCanary) -> Thresholds:
        return cls(**{name: getattr(section, name) for name in cls.__dataclass_fields__})


@dataclass
class Side:
    """One side of the comparison over the window."""

    hosts: list[str]
    requests: int = 0
    errors: int = 0  # 5xx
    error_rate: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass
class Comparison:
    """The two tests on one slice of the traffic (all of it, or one endpoint)."""

    canary: Side
    baseline: Side
    error_p: float | None = None  # Fisher's exact, one-sided
    error_increase: float = 0.0  # canary's 5xx rate minus the baseline's
    latency_p: float | None = None  # Mann-Whitney U, one-sided
    p50_ratio: float | None = None
    p95_ratio: float | None = None
    failed: list[str] = field(default_factory=list)  # why, in words; empty: no regression

    def severity(self, limits: Thresholds) -> float:
        """How far past its thresholds the worst effect is (1.0: at a threshold)."""
        scores = [self.error_increase / limits.max_error_rate_increase if limits.max_error_rate_increase else 0.0]
        if self.p50_ratio is not None:
            scores.append(self.p50_ratio / limits.max_p50_ratio)
        if self.p95_ratio is not None:
            scores.append(self.p95_ratio / limits.max_p95_ratio)
        return max(scores)


@dataclass
class EndpointEvidence:
    endpoint: str
    comparison: Comparison


@dataclass
class CanaryEvidence:
    verdict: str  # PASS, FAIL or INCONCLUSIVE
    reasons: list[str]  # why the verdict, in words
    window_s: float
    overall: Comparison
    endpoints: list[EndpointEvidence]  # every endpoint compared, worst first
    worst_endpoints: list[str]  # the worst few, as one line each
    restarts: dict[str, int | None]  # worker restarts per host in the window (None: not exposed)
    notes: list[str]  # what the window's reading saw: a rotated log, a load balancer that failed
    thresholds: Thresholds

    @property
    def canary(self) -> Side:
        return self.overall.canary

    @property
    def baseline(self) -> Side:
        return self.overall.baseline

    def summary(self) -> str:
        """The verdict and its evidence in one line: the deploy's summary, the journal, PagerDuty."""
        canary, baseline = self.canary, self.baseline
        parts = [
            f"canary {self.verdict}"
            + (f" ({'; '.join(self.reasons)})" if self.reasons and self.verdict != PASS else ""),
            f"{plural(canary.requests, 'request')} on {', '.join(canary.hosts)} against {baseline.requests} "
            f"on {', '.join(baseline.hosts) or 'no baseline'} in {self.window_s:.0f} s",
            f"5xx {_percent(canary.error_rate)} vs {_percent(baseline.error_rate)}" + _p(self.overall.error_p),
        ]
        if canary.p50_ms is not None and baseline.p50_ms is not None:
            parts.append(
                f"p50 {canary.p50_ms:.0f} vs {baseline.p50_ms:.0f} ms, p95 {canary.p95_ms:.0f} vs "
                f"{baseline.p95_ms:.0f} ms" + _p(self.overall.latency_p)
            )
        # The endpoints that regressed are among the reasons; the worst few are in the evidence.
        return ", ".join(parts)

    def brief(self) -> dict[str, Any]:
        """What the journal and the PagerDuty change event keep of it."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "window_s": self.window_s,
            "canary": asdict(self.canary),
            "baseline": asdict(self.baseline),
            "error_p": self.overall.error_p,
            "latency_p": self.overall.latency_p,
            "p50_ratio": self.overall.p50_ratio,
            "p95_ratio": self.overall.p95_ratio,
            "worst_endpoints": self.worst_endpoints,
            "restarts": self.restarts,
        }


def _percent(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def _p(value: float | None) -> str:
    return "" if value is None else f" (p={value:.2g})"


def _percentile_ms(times: Sequence[float], q: float) -> float | None:
    import numpy

    return round(float(numpy.percentile(times, q)) * 1000, 1) if len(times) else None


def _side(hosts: list[str], records: Sequence[Request]) -> tuple[Side, list[float]]:
    times = [record.request_time for record in records]
    errors = sum(record.status >= 500 for record in records)
    side = Side(
        hosts,
        len(records),
        errors,
        errors / len(records) if records else 0.0,
        _percentile_ms(times, 50),
        _percentile_ms(times, 95),
    )
    return side, times


def compare(
    canary_hosts: list[str],
    canary: Sequence[Request],
    baseline_hosts: list[str],
    baseline: Sequence[Request],
    limits: Thresholds,
    alpha: float,
) -> Comparison:
    """Both tests on one slice of traffic, at `alpha`; `failed` says which regressed and how."""
    from scipy import stats

    canary_side, canary_times = _side(canary_hosts, canary)
    baseline_side, baseline_times = _side(baseline_hosts, baseline)
    result = Comparison(canary_side, baseline_side)
    if not canary or not baseline:
        return result
    table = [
        [canary_side.errors, canary_side.requests - canary_side.errors],
        [baseline_side.errors, baseline_side.requests - baseline_side.errors],
    ]
    result.error_p = float(stats.fisher_exact(table, alternative="greater")[1])
    result.error_increase = canary_side.error_rate - baseline_side.error_rate
    if result.error_p < alpha and result.error_increase > limits.max_error_rate_increase:
        result.failed.append(
            f"5xx {_percent(canary_side.error_rate)} against {_percent(baseline_side.error_rate)} "
            f"(+{result.error_increase * 100:.2f} points, more than {limits.max_error_rate_increase * 100:g};"
            f" p={result.error_p:.2g})"
        )
    # Identical samples (every time 0.000 on both sides) give no U statistic worth a test.
    if len(set(canary_times) | set(baseline_times)) > 1:
        result.latency_p = float(stats.mannwhitneyu(canary_times, baseline_times, alternative="greater").pvalue)
    assert canary_side.p50_ms is not None and baseline_side.p50_ms is not None  # both sides have requests
    assert canary_side.p95_ms is not None and baseline_side.p95_ms is not None
    floor_ms = LATENCY_FLOOR_S * 1000
    result.p50_ratio = round(canary_side.p50_ms / max(baseline_side.p50_ms, floor_ms), 3)
    result.p95_ratio = round(canary_side.p95_ms / max(baseline_side.p95_ms, floor_ms), 3)
    if result.latency_p is not None and result.latency_p < alpha:
        for name, ratio, most, ours, theirs in (
            ("p50", result.p50_ratio, limits.max_p50_ratio, canary_side.p50_ms, baseline_side.p50_ms),
            ("p95", result.p95_ratio, limits.max_p95_ratio, canary_side.p95_ms, baseline_side.p95_ms),
        ):
            if ratio > most and ours - theirs >= limits.min_latency_increase_ms:
                result.failed.append(
                    f"{name} {ours:.0f} ms against {theirs:.0f} ms (x{ratio:.2f}, more than x{most:g};"
                    f" p={result.latency_p:.2g})"
                )
    return result


def analyse(
    canary_hosts: list[str],
    baseline_hosts: list[str],
    records: dict[str, list[Request]],
    restarts: dict[str, int | None],
    limits: Thresholds,
    window_s: float,
    notes: Sequence[str] = (),
) -> CanaryEvidence:
    """The verdict on the canary hosts against the baseline hosts, from the requests each host
    answered in the window (`records`, by host name) and its worker restarts."""
    canary = [record for host in canary_hosts for record in records.get(host, [])]
    baseline = [record for host in baseline_hosts for record in records.get(host, [])]
    overall = compare(canary_hosts, canary, baseline_hosts, baseline, limits, limits.alpha)
    endpoints = _per_endpoint(canary_hosts, canary, baseline_hosts, baseline, limits)
    endpoints.sort(key=lambda item: (not item.comparison.failed, -item.comparison.severity(limits)))
    worst = [_endpoint_line(item) for item in endpoints[: limits.worst_endpoints]]
    reasons: list[str] = []
    failures = [*overall.failed]
    failures += [f"{item.endpoint}: {why}" for item in endpoints for why in item.comparison.failed]
    failures += _restart_failures(canary_hosts, baseline_hosts, restarts, limits)
    short = [
        f"{name} answered {plural(side.requests, 'request')}, fewer than min_requests {limits.min_requests}"
        for name, side in (("the canary", overall.canary), ("the baseline", overall.baseline))
        if side.requests < limits.min_requests
    ]
    if not baseline_hosts:
        short.insert(0, "no app server on the old release to compare with")
    if short:
        # Worker restarts do not wait for traffic: they fail a quiet canary too.
        restart_failures = _restart_failures(canary_hosts, baseline_hosts, restarts, limits)
        verdict, reasons = (FAIL, restart_failures) if restart_failures else (INCONCLUSIVE, short)
    elif failures:
        verdict, reasons = FAIL, failures
    else:
        verdict = PASS
    return CanaryEvidence(
        verdict, reasons, round(window_s, 1), overall, endpoints, worst, restarts, list(notes), limits
    )


def _per_endpoint(
    canary_hosts: list[str],
    canary: Sequence[Request],
    baseline_hosts: list[str],
    baseline: Sequence[Request],
    limits: Thresholds,
) -> list[EndpointEvidence]:
    by_endpoint: dict[str, tuple[list[Request], list[Request]]] = defaultdict(lambda: ([], []))
    for record in canary:
        by_endpoint[record.endpoint][0].append(record)
    for record in baseline:
        by_endpoint[record.endpoint][1].append(record)
    enough = {
        name: sides
        for name, sides in by_endpoint.items()
        if min(len(sides[0]), len(sides[1])) >= limits.min_endpoint_requests
    }
    alpha = limits.alpha / max(1, len(enough))
    return [
        EndpointEvidence(name, compare(canary_hosts, ours, baseline_hosts, theirs, limits, alpha))
        for name, (ours, theirs) in sorted(enough.items())
    ]


def _endpoint_line(item: EndpointEvidence) -> str:
    found = item.comparison
    text = (
        f"{item.endpoint}: {found.canary.requests}/{found.baseline.requests} requests, "
        f"5xx {_percent(found.canary.error_rate)} vs {_percent(found.baseline.error_rate)}"
    )
    if found.p95_ratio is not None:
        text += f", p95 x{found.p95_ratio:.2f}"
    if found.failed:
        text += " (regressed)"
    return text


def _restart_failures(
    canary_hosts: list[str], baseline_hosts: list[str], restarts: dict[str, int | None], limits: Thresholds
) -> list[str]:
    baseline = [count for host in baseline_hosts if (count := restarts.get(host)) is not None]
    allowed = limits.max_worker_restarts + (max(baseline) if baseline else 0)
    return [
        f"{host}: {plural(count, 'gunicorn worker restart')} in the window (allowed {allowed})"
        for host in canary_hosts
        if (count := restarts.get(host)) is not None and count > allowed
    ]
