"""The result of a deploy or rollback, host by host: what each host runs now and why, the
summary its last line and the journal give, and its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from igops.deploy_canary import CanaryEvidence
from igops.deploy_plan import ALREADY, DEPLOYED, FAILED, NOT_STARTED, ROLLED_BACK, SKIPPED, UNKNOWN
from igops.errors import ExitCode, IgopsError
from igops.output import plural

SUMMARY_PROBLEMS = 3


@dataclass
class HostOutcome:
    host: str
    state: str
    release: str | None  # what `current` points at now; None when unknown
    before: str | None
    in_lb: bool | None
    batch: int | None = None
    detail: str | None = None
    # The load balancers that have the host out, when only some do (a drain they made, not
    # undone there after the others refused it); empty: all of them, or none.
    out_on: list[str] = field(default_factory=list)


@dataclass
class RolloutResult:
    kind: str
    deploy_id: str
    target: str
    hosts: list[HostOutcome]
    stopped: str | None = None
    change_event: str = "not configured"
    duration_s: float = 0.0
    canary: CanaryEvidence | None = None
    # Why the run stopped with its canary in place for a person to decide (exit 6), if it did.
    held: str | None = None
    # --canary-only, and the canary passed: the hosts after it were left on purpose.
    canary_only: bool = False
    # What changed since the release the fleet ran (igops.deploy_pending), for a deploy.
    pending: dict[str, Any] | None = None

    def count(self, *states: str) -> int:
        return sum(host.state in states for host in self.hosts)

    @property
    def ok(self) -> bool:
        left = () if self.canary_only else (NOT_STARTED,)
        return self.stopped is None and self.held is None and self.count(FAILED, ROLLED_BACK, UNKNOWN, *left) == 0

    @property
    def exit_code(self) -> ExitCode:
        if self.ok:
            return ExitCode.OK
        if self.held:
            return ExitCode.HELD
        # A host that was already on the release is on it, as the summary counts it: a rerun that
        # leaves some hosts there is partial, not a failure.
        if self.count(DEPLOYED, ALREADY) == 0:
            return ExitCode.FAILED
        return ExitCode.PARTIAL

    def problems(self) -> list[str]:
        return [
            f"{host.host} {host.state}: {host.detail}"
            for host in self.hosts
            if host.state in (FAILED, ROLLED_BACK, UNKNOWN)
        ]

    def summary(self) -> str:
        on_target = self.count(DEPLOYED, ALREADY)
        text = f"{self.kind} of {self.target}: {on_target} of {plural(len(self.hosts), 'host')} on it"
        problems = self.problems()
        if self.held:
            text += f"; held: {self.held}"
        if self.stopped:
            text += f"; stopped at {self.stopped}"
        if self.canary is not None:
            text += f"; {self.canary.summary()}"
        if self.canary_only:
            text += "; stopped after the canary (--canary-only): `igops deploy` of it again goes on from batch 2"
        if problems:
            shown = SUMMARY_PROBLEMS
            text += (
                "; "
                + "; ".join(problems[:shown])
                + (f"; and {len(problems) - shown} more (see the table)" if len(problems) > shown else "")
            )
        out = [
            host.host + (f" (on {', '.join(host.out_on)})" if host.out_on else "")
            for host in self.hosts
            if host.in_lb is False and host.state != SKIPPED
        ]
        if out:
            text += f"; out of the load balancer: {', '.join(out)} (rerun to finish)"
        return text


class RolloutFailed(IgopsError):
    def __init__(self, result: RolloutResult):
        hint = "the table above shows each host's release; `igops deploy releases` shows the fleet"
        if result.held:
            hint = (
                f"`igops deploy` of {result.target} again analyses the canary in place once more and goes on from "
                "batch 2 (with --analysis 0, without an analysis); `igops deploy rollback` returns the canary"
            )
        super().__init__(result.summary(), hint)
        self.result = result
        self.data = result
        self.exit_code = result.exit_code
        self.result_word = "held" if result.held else "failed"
        self.problems = result.problems()
