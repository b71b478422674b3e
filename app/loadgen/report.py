"""Load-run and verification results, and the arithmetic behind them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction`
    of all values at or below it; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction}")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def longest_gap(times: Iterable[float], start: float, end: float) -> float:
    """The longest stretch within [start, end] with none of `times` in it, the
    window edges counting as boundaries: writes that stop being acknowledged
    before the end show up as a gap that reaches the end."""
    points = sorted(t for t in times if start <= t <= end)
    longest = 0.0
    previous = start
    for point in [*points, end]:
        longest = max(longest, point - previous)
        previous = point
    return longest


def longest_covered_interval(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the longest stretch covered without a break by the union of
    the intervals (each from a failed write's send to its failure)."""
    longest = 0.0
    current_start = current_end = None
    for begin, finish in sorted(intervals):
        if current_end is not None and begin <= current_end:
            current_end = max(current_end, finish)
            continue
        if current_end is not None:
            longest = max(longest, current_end - current_start)
        current_start, current_end = begin, finish
    if current_end is not None:
        longest = max(longest, current_end - current_start)
    return longest


@dataclass
class LatencySummary:
    count: int = 0
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, latencies_ms: Iterable[float]) -> LatencySummary:
        values = sorted(latencies_ms)
        if not values:
            return cls()
        return cls(
            count=len(values),
            mean_ms=round(sum(values) / len(values), 2),
            p50_ms=round(percentile(values, 0.50), 2),
            p95_ms=round(percentile(values, 0.95), 2),
            p99_ms=round(percentile(values, 0.99), 2),
            max_ms=round(values[-1], 2),
        )


@dataclass
class Report:
    """Counts cover the whole run, setup included; rates, latencies and the
    failure windows cover the timed phase, whose schedule is open-loop so a
    stall shows up as latency instead of as fewer requests."""

    url: str
    ledger: str
    target_rate: float
    duration_s: float
    setup_users: int
    setup_follows: int
    requests: int
    errors: int
    errors_by_kind: dict[str, int]
    writes_acked: int
    write_errors: int
    achieved_rate: float
    writes_per_s: float
    latency: LatencySummary
    write_latency: LatencySummary
    read_latency: LatencySummary
    longest_write_gap_s: float
    longest_write_failure_s: float
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MissingWrite:
    op: str
    record: dict[str, Any]
    missing: list[str]


@dataclass
class VerifyReport:
    ledger: str
    checked: dict[str, int]
    missing: dict[str, int]
    missing_writes: list[MissingWrite]
    # feed entries that were not checked: pushed out of the capped feed list
    feed_entries_beyond_cap: int = 0
    unparsable_lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing_writes

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **dataclasses.asdict(self)}


def _latency_line(name: str, summary: LatencySummary) -> str:
    return (
        f"  {name:<7} n={summary.count:<7} mean={summary.mean_ms:.1f}  p50={summary.p50_ms:.1f}  "
        f"p95={summary.p95_ms:.1f}  p99={summary.p99_ms:.1f}  max={summary.max_ms:.1f} ms"
    )


def format_report(report: Report) -> str:
    lines = [
        f"load run against {report.url}{' (interrupted)' if report.interrupted else ''}",
        f"  setup: {report.setup_users} users, {report.setup_follows} follows",
        f"  timed phase: {report.duration_s:.1f} s at target {report.target_rate:g} req/s, "
        f"achieved {report.achieved_rate:.1f} req/s",
        f"  requests {report.requests}, errors {report.errors}, acknowledged writes {report.writes_acked}, "
        f"write errors {report.write_errors}, {report.writes_per_s:.1f} writes/s",
    ]
    if report.errors_by_kind:
        lines.append(
            "  errors by kind: " + ", ".join(f"{kind}={count}" for kind, count in sorted(report.errors_by_kind.items()))
        )
    lines.append("  latency (from scheduled send):")
    lines += [
        _latency_line("all", report.latency),
        _latency_line("writes", report.write_latency),
        _latency_line("reads", report.read_latency),
    ]
    lines.append(
        f"  longest gap between write acknowledgements: {report.longest_write_gap_s:.3f} s; "
        f"longest span covered by failed writes: {report.longest_write_failure_s:.3f} s"
    )
    lines.append(
        "  per op: " + ", ".join(f"{op} {c['ok']} ok/{c['errors']} err" for op, c in sorted(report.ops.items()))
    )
    lines.append(f"  ledger: {report.ledger}")
    return "\n".join(lines)


def format_verify(report: VerifyReport) -> str:
    lines = [f"verify {report.ledger}: {'OK' if report.ok else 'MISSING WRITES'}"]
    for op in sorted(report.checked):
        lines.append(f"  {op:<7} checked {report.checked[op]:<7} missing {report.missing.get(op, 0)}")
    if report.feed_entries_beyond_cap:
        lines.append(f"  feed entries not checked (pushed past the feed cap): {report.feed_entries_beyond_cap}")
    if report.unparsable_lines:
        lines.append(f"  unparsable ledger lines skipped: {report.unparsable_lines}")
    for missing in report.missing_writes:
        lines.append(f"  MISSING {missing.op} {missing.record}: {', '.join(missing.missing)}")
    return "\n".join(lines)
