"""Running a deploy or rollback plan: stage the release on the hosts that lack it, then roll
batch by batch (out of the load balancer, switch, health gate, back in), switching a failing
batch back; and the result, host by host.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

from igops.deploy_agents import AppFleet
from igops.deploy_gate import LoadBalancers
from igops.deploy_plan import (
    DEPLOYED,
    FAILED,
    MIN_SERVERS_IN_SERVICE,
    NOT_STARTED,
    ROLLED_BACK,
    RolloutPlan,
)
from igops.deploy_record import LastRunRecord, deployer
from igops.deploy_release import SHARED_LINKS
from igops.deploy_result import HostOutcome, RolloutFailed, RolloutResult
from igops.deploy_switch import HostSwitcher
from igops.errors import RemoteError
from igops.output import Reporter, plural
from igops.pagerduty import changes as pagerduty_changes

VENV_BUILD_TIMEOUT_S = 900.0


# --- running a rollout -----------------------------------------------------------------------------


class Rollout:
    """One run of a plan: stages, then hands batch after batch to its HostSwitcher between
    taking the batch out of the load balancers and putting it back; it stops where the failures
    pass --max-fail or a batch would drain a load balancer below its minimum."""

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
            self.outcomes[host.host] = HostOutcome(
                host.host, state, host.current, host.before or host.current, host.in_lb, detail=host.detail
            )
        self.failures = sum(host.action == FAILED for host in plan.hosts)
        self.switcher = HostSwitcher(app, plan, self.outcomes, self.record)

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
        assert release is not None  # run() stages only a plan with a release
        uploads = [host for host in self.plan.roll() if host.upload]
        if not uploads:
            return
        request = {
            "op": "stage",
            "id": release.id,
            "sha256": release.sha256,
            "size": release.size,
            "shared": list(SHARED_LINKS),
        }
        jobs = {
            host_plan.host: (self.app.release_agent(self.app.host(host_plan.host)), request, self.tarball)
            for host_plan in uploads
        }
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
            step.detail = (
                f"{len(jobs) - len(failed)} staged"
                + (f", virtualenv built on {built}" if built else "")
                + (f"; failed on {', '.join(failed)}" if failed else "")
            )
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
                passed, failed = self.switcher.switch_and_gate(batch, number)
                self.failures += len(failed)
                if self.failures > plan.max_fail:
                    stopped = (
                        f"batch {number} of {len(plan.batches)} ({self.failures} failed, "
                        f"more than --max-fail {plan.max_fail}); later batches keep their release"
                    )
                    self.switcher.switch_back(passed, "the batch was rolled back because the rollout stopped")
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

        def server(name: str) -> str:
            return self.app.server(self.app.host(name))

        returning = {server(name) for name in back}
        gone = {server(name) for name, outcome in self.outcomes.items() if outcome.in_lb is False and name not in back}
        leaving = {server(name) for name in batch}
        for lb_name, servers in self.plan.in_service.items():
            serving = (set(servers) | returning) - gone
            left = serving - leaving
            if serving & leaving and len(left) < MIN_SERVERS_IN_SERVICE:
                return (
                    f"taking {', '.join(batch)} out would leave {len(left)} app servers in service in nginx on "
                    f"{lb_name}, fewer than the minimum of {MIN_SERVERS_IN_SERVICE}"
                )
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
                    outcome.detail = (
                        f"{outcome.detail + '; ' if outcome.detail else ''}could not be put back: {exc.message}"
                    )
                return
            for name in names:
                self.outcomes[name].in_lb = True
                self.record.host(name, self.outcomes[name].state)

    def _lb_change(self, down: Sequence[str] = (), up: Sequence[str] = ()) -> None:
        if not self.app.lbs or not (down or up):
            return

        def server(name: str) -> str:
            return self.app.server(self.app.host(name))

        self.lbs.change(down=[server(n) for n in down], up=[server(n) for n in up])

    # PagerDuty -------------------------------------------------------------------------------
    def _mark(self, result: RolloutResult) -> str:
        key = pagerduty_changes.routing_key(self.fleet)
        if not key:
            return "not configured"
        with self.reporter.step(f"PagerDuty change event for the {self.plan.kind}") as step:
            release = self.plan.release
            details: dict[str, Any] = {
                "fleet": self.app.name,
                "deploy_id": result.deploy_id,
                "release": result.target,
                "result": "ok" if result.ok else ("stopped" if result.stopped else "partial"),
                "hosts": {host.host: host.state for host in result.hosts},
                "by": deployer(),
                "duration_s": result.duration_s,
            }
            if release is not None:
                details.update(source=release.source, content=release.content, revision=release.revision)
            sent = pagerduty_changes.send_change(
                self.fleet.model.monitoring.pagerduty_url,
                key,
                f"{self.app.name}: {result.summary()}",
                f"igops on {socket.gethostname()}",
                details,
            )
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
