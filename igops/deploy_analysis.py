"""Running a canary analysis step: the window (igops.deploy_window) over the traffic the canary
and the baseline answer, then the verdict on it (igops.deploy_canary). What the verdict does to
the rollout (go on, stop with the canary in place, return it) is igops.deploy_rollout's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from igops import deploy_window
from igops.deploy_agents import AppFleet
from igops.deploy_canary import FAIL, INCONCLUSIVE, PASS, CanaryEvidence, analyse
from igops.deploy_canary_plan import CONTINUE, HOLD, ROLLBACK, CanaryPlan
from igops.output import Reporter

# What a verdict makes of the rollout.
GO_ON, STOP_HELD, RETURN_CANARY = "go on", "hold", "return the canary"


def observe(
    app: AppFleet, plan: CanaryPlan, reporter: Reporter, sleep: Callable[[float], None] = time.sleep
) -> CanaryEvidence:
    """Watch the canary and the baseline for the plan's window, after the canary's warm-up, and
    judge the canary."""
    hosts = [*plan.canary, *plan.baseline]
    if plan.warmup:
        _wait(plan.warmup, "canary warm-up", reporter, sleep)
    start = deploy_window.begin(app, hosts)
    _wait(plan.seconds, "canary window", reporter, sleep)
    window = deploy_window.end(app, start, hosts, plan.max_log_bytes)
    notes = list(window.notes)
    if len(start.marks) and all(mark.error for mark in start.marks):
        notes.append("no load balancer's access log could be read: the analysis saw no traffic")
    return analyse(plan.canary, plan.baseline, window.records, window.restarts, plan.thresholds, window.seconds, notes)


def _wait(seconds: float, label: str, reporter: Reporter, sleep: Callable[[float], None]) -> None:
    deadline = time.monotonic() + seconds
    with reporter.progress(label, total=seconds, unit="") as advance:
        while (left := deadline - time.monotonic()) > 0:
            pause = min(1.0, left)
            sleep(pause)
            advance(pause)


def consequence(verdict: str, on_inconclusive: str) -> str:
    """GO_ON, STOP_HELD or RETURN_CANARY for a verdict, under --on-inconclusive."""
    if verdict == PASS:
        return GO_ON
    if verdict == FAIL:
        return RETURN_CANARY
    assert verdict == INCONCLUSIVE
    return {HOLD: STOP_HELD, CONTINUE: GO_ON, ROLLBACK: RETURN_CANARY}[on_inconclusive]
