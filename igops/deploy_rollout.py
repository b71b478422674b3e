"""Running a deploy or rollback plan: stage the release on the hosts that lack it, then roll
batch by batch (out of the load balancer, switch, health gate, back in), switching a failing
batch back; after the first batch of a deploy, the canary analysis, whose verdict goes on,
holds the rollout with the canary in place, or returns the canary to its release.

Every batch leaves rotation only under a rotation lease per server (igops.operations.rotation),
after a check that counts the servers other operations hold out: deploys to different hosts run
at once, and together keep [deploy] min_in_service.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

from igops import deploy_analysis
from igops.deploy_agents import AppFleet
from igops.deploy_canary_plan import CanaryPlan, fact
from igops.deploy_gate import LbChangeFailed, LbState, LoadBalancers
from igops.deploy_limits import too_many_failures
from igops.deploy_plan import ALREADY, DEPLOYED, FAILED, NOT_STARTED, OUTSIDE, ROLLED_BACK, RolloutPlan
from igops.deploy_record import LastRunRecord, deployer
from igops.deploy_release import SHARED_LINKS
from igops.deploy_result import HostOutcome, RolloutFailed, RolloutResult
from igops.deploy_switch import HostSwitcher
from igops.errors import RemoteError
from igops.operations import rotation
from igops.output import Reporter, plural
from igops.pagerduty import changes as pagerduty_changes

VENV_BUILD_TIMEOUT_S = 900.0


# --- running a rollout -----------------------------------------------------------------------------


class Rollout:
    """One run of a plan: stages, then hands batch after batch to its HostSwitcher between
    taking the batch out of the load balancers and putting it back; it stops where the failures
    pass --max-fail or a batch would drain a load balancer below its minimum."""

    def __init__(
        self,
        app: AppFleet,
        plan: RolloutPlan,
        reporter: Reporter,
        tarball: bytes,
        pending: dict[str, Any] | None = None,
    ):
        self.fleet = app.fleet
        self.plan = plan
        self.tarball = tarball
        self.reporter = reporter
        self.app = app
        self.lbs = LoadBalancers(self.app, f"{plan.kind} {plan.deploy_id} to {plan.target}")
        self.record = LastRunRecord(self.fleet, plan)
        self.outcomes: dict[str, HostOutcome] = {}
        for host in plan.hosts:
            if host.action == OUTSIDE:
                continue  # not this run's: no outcome, though counted in or out of service
            state = host.action if host.action != "roll" else NOT_STARTED
            self.outcomes[host.host] = HostOutcome(
                host.host, state, host.current, host.before or host.current, host.in_lb, detail=host.detail
            )
        self.failures = sum(host.action == FAILED for host in plan.hosts)
        self.switcher = HostSwitcher(app, plan, self.outcomes, self.record)
        self.rotation = rotation.of(reporter)
        # Servers that serve nothing whatever the load balancers say: unreachable at the survey.
        self.unavailable = {self._server(host.host) for host in plan.hosts if not host.reachable}
        self.result = RolloutResult(plan.kind, plan.deploy_id, plan.target, list(self.outcomes.values()))
        self.result.pending = pending

    def run(self) -> RolloutResult:
        started = time.monotonic()
        result = self.result
        self.record.update()
        if result.pending is not None:
            self.reporter.fact(pending=result.pending)
        try:
            if self.plan.release is not None:
                self._stage()
            result.stopped = self._roll()
        finally:
            self.rotation.release_all()
            result.duration_s = round(time.monotonic() - started, 1)
            status = "held" if result.held else "finished" if result.ok else "failed"
            self.record.update(status=status, stopped=result.stopped or result.held)
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
        if too_many_failures(self.failures, plan.max_fail):
            stopped = f"staging ({self.failures} failed, more than --max-fail {self._budget()}); nothing was switched"
        to_put_back: list[str] = []
        try:
            if stopped is None and plan.canary is not None and plan.canary.in_place:
                stopped = self._analyse()
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
        canary = plan.canary
        # A canary in place analysed again and held once more: no batch goes out.
        going_on = stopped is None and self.result.held is None
        for number, names in enumerate(plan.run_batches() if going_on else [], 1):
            batch = [name for name in names if self.outcomes[name].state == NOT_STARTED]
            if not batch:
                continue
            self.record.update(batch=number + plan.batch_offset)
            label = plan.batch_label(number)
            with self.reporter.step(f"{label}: {', '.join(batch)}") as step:
                too_few = self._take_out(batch, to_put_back)
                if too_few:
                    step.status, step.detail = "failed", too_few
                    stopped = f"{label.split('/')[0]}: {too_few}; nothing in it was switched"
                    break
                for name in to_put_back:
                    self.outcomes[name].in_lb = True
                self.rotation.release(to_put_back)
                to_put_back.clear()
                for name in batch:
                    self.outcomes[name].in_lb = False if self.app.lbs else None
                self.record.hosts(dict.fromkeys(batch, "drained"))
                passed, failed = self.switcher.switch_and_gate(batch, number + plan.batch_offset)
                self.failures += len(failed)
                if too_many_failures(self.failures, plan.max_fail):
                    stopped = (
                        f"{label.replace('/', ' of ')} ({self.failures} failed, "
                        f"more than --max-fail {self._budget()}); later batches keep their release"
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
            if number == 1 and canary is not None and not canary.in_place:
                # The canary takes traffic before the analysis watches it, in a step of its own
                # (even with nothing to put back: the plan numbers it).
                self._put_back(list(to_put_back), always=True, canary=canary)
                to_put_back.clear()
                stopped = self._analyse()
                if stopped or self.result.held:
                    break
        return stopped

    # rotation --------------------------------------------------------------------------------
    def _server(self, name: str) -> str:
        return self.app.server(self.app.host(name))

    def _budget(self) -> str:
        return self.plan.max_fail_spec or str(self.plan.max_fail)

    def _take_out(self, batch: list[str], back: list[str]) -> str | None:
        """Take `batch` out of the load balancers (and put `back` in, in the same reload) if
        that leaves enough servers in service, counting those other operations hold out: under
        the rotation check's lease, read the load balancers, check, lease each server of the
        batch, change nginx. Returns why not, or None once done."""
        refusal = self.rotation.take(batch, lambda others: self.below_minimum(batch, back, others, self._read_lbs()))
        if refusal:
            return refusal
        try:
            self._lb_change(down=batch, up=back)
        except LbChangeFailed as exc:
            return self._undo_drain(batch, exc)
        return None

    def _undo_drain(self, batch: list[str], failed: LbChangeFailed) -> str:
        """After a drain some load balancers refused, the others (and any that gave no answer, where
        it may have taken effect) take the batch back: it is out on all of them or on none. Where
        that fails too, its hosts stay out there: reported out of the load balancer, and leased
        until the run ends, so that other operations count them out. Returns why the batch was not
        taken out."""
        why = f"could not take {', '.join(batch)} out of the load balancer: {failed.message}"
        drained = [host.name for host in self.app.lbs if host.name not in failed.unchanged]
        try:
            self._lb_change(up=batch, on=drained)
        except LbChangeFailed as undo:
            out_on = sorted(undo.errors)
            for name in batch:
                self.outcomes[name].in_lb, self.outcomes[name].out_on = False, out_on
            self.record.hosts(dict.fromkeys(batch, "drained"))
            return f"{why}; still out of rotation on {', '.join(out_on)}, where putting it back failed: {undo.message}"
        self.rotation.release(batch)
        return why + (f"; put back in on {', '.join(drained)}, which had taken it out" if drained else "")

    def _read_lbs(self) -> LbState | None:
        """The load balancers as they are now (another operation may have changed them since the
        plan); None when one cannot be read, and the plan's view is used."""
        if not self.app.lbs:
            return None
        state = self.lbs.read()
        return None if state.errors else state

    def below_minimum(
        self, batch: list[str], back: list[str], others: dict[str, str] | None = None, now: LbState | None = None
    ) -> str | None:
        """Why taking `batch` out (while `back` comes back) would leave a load balancer fewer
        than min_in_service servers: earlier batches' failures stay out, and so do the servers
        other operations hold out of rotation (`others`, host -> holder). `now`: the load
        balancers as just read, else as planned."""
        returning = {self._server(name) for name in back}
        gone = {self._server(name) for name, item in self.outcomes.items() if item.in_lb is False and name not in back}
        held = {self._server(name) for name in others or {}}
        leaving = {self._server(name) for name in batch}
        minimum = self.plan.min_in_service
        for lb_name, servers in self.plan.in_service.items():
            base = set(servers)
            if now is not None:
                base = {item.server for item in now.servers if item.lb == lb_name and not item.down}
            serving = ((base - self.unavailable) | returning) - gone - held
            left = serving - leaving
            if serving & leaving and len(left) < minimum:
                elsewhere = [name for name in sorted(others or {}) if self._server(name) in base]
                return (
                    f"taking {', '.join(batch)} out would leave {len(left)} app servers in service in nginx on "
                    f"{lb_name}, fewer than the minimum of {minimum}"
                    + (f" (min_in_service {spec})" if (spec := self.plan.min_in_service_spec) != str(minimum) else "")
                    + (f"; out for other operations: {', '.join(rotation.describe(others or {}))}" if elsewhere else "")
                )
        return None

    # canary ----------------------------------------------------------------------------------
    def _analyse(self) -> str | None:
        """The canary analysis step, and what its verdict does: go on, hold (the canary stays on
        the release and in rotation; exit 6), or return the canary to its release before. Returns
        why the rollout stops, if it stops for a failure."""
        canary = self.plan.canary
        assert canary is not None  # called only for a plan with an analysis
        hosts = [name for name in canary.canary if self.outcomes[name].state in (DEPLOYED, ALREADY)]
        with self.reporter.step(
            f"canary analysis: {', '.join(hosts) or 'no canary'} against {', '.join(canary.baseline)}, "
            f"{canary.seconds} s" + (f" after a {canary.warmup} s warm-up" if canary.warmup else "")
        ) as step:
            if not hosts:
                step.status, step.detail = "skipped", "no canary host passed its gate: nothing to analyse"
                return None
            canary.canary = hosts
            if canary.in_place and canary.traffic_percent is not None:
                self._share(hosts, canary.traffic_percent, step)
            try:
                evidence = deploy_analysis.observe(self.app, canary, self.reporter)
            finally:
                if canary.traffic_percent is not None:
                    self._reset_weights()
            self.result.canary = evidence
            then = deploy_analysis.consequence(evidence.verdict, canary.on_inconclusive)
            in_place = then == deploy_analysis.STOP_HELD or (canary.canary_only and then == deploy_analysis.GO_ON)
            self.reporter.fact(canary=fact(canary, evidence.verdict, evidence.summary(), evidence.brief(), in_place))
            step.detail = evidence.summary()
            if then == deploy_analysis.GO_ON:
                self.result.canary_only = canary.canary_only
                return None
            if then == deploy_analysis.STOP_HELD:
                step.status = "held"
                self.result.held = f"canary analysis inconclusive: {'; '.join(evidence.reasons)}"
                return None
            step.status = "failed"
            self._return_canary(hosts, f"canary analysis {evidence.verdict}")
            return f"the canary analysis ({evidence.verdict}); the canary went back, later batches keep their release"

    def _return_canary(self, hosts: list[str], why: str) -> None:
        """The canary out of rotation, back to its release before, gated, and in again: the path
        a failing batch takes, for hosts that passed their gate and then their analysis did not."""
        canary = self.plan.canary
        assert canary is not None
        for name in hosts:
            outcome = self.outcomes[name]
            if canary.in_place and canary.before.get(name):
                outcome.before = canary.before[name]  # on the release since the held deploy
        refusal = self._take_out(hosts, [])
        if refusal:
            for name in hosts:
                self.outcomes[name].state, self.outcomes[name].detail = FAILED, f"{why}; not returned: {refusal}"
            return
        for name in hosts:
            self.outcomes[name].in_lb = False if self.app.lbs else None
        self.switcher.switch_back(hosts, why)
        back = [name for name in hosts if self.outcomes[name].state == ROLLED_BACK]
        try:
            self._lb_change(up=back)
        except RemoteError as exc:
            for name in back:
                self.outcomes[name].detail = f"{self.outcomes[name].detail}; could not be put back: {exc.message}"
            return
        for name in back:
            self.outcomes[name].in_lb = True
        self.rotation.release(back)

    def _share(self, hosts: list[str], percent: int, step: Any) -> None:
        """A canary already in rotation gets its share of the traffic for the analysis; if the
        load balancers refuse, the analysis watches it on its even share."""
        try:
            self._lb_change(share=(hosts, percent))
        except RemoteError as exc:
            step.detail = f"the canary keeps its even share: {exc.message}"

    def _reset_weights(self) -> None:
        """Every server's nginx weight back as it was before the canary's share. Not fatal if it
        fails: the next change of the load balancers (any deploy's) puts them back."""
        try:
            self._lb_change(reset_weights=True)
        except RemoteError as exc:
            self.reporter.log(f"the canary's share of the traffic was not undone (the next deploy does): {exc.message}")
            self.reporter.fact(weights_not_reset=exc.message)

    def _put_back(self, names: list[str], always: bool = False, canary: CanaryPlan | None = None) -> None:
        """Put `names` back in rotation; the canary (`canary`, its plan) with its share."""
        if not self.app.lbs or not (names or always):
            return
        if not names:
            with self.reporter.step("put the canary back in the load balancer") as step:
                step.detail = "no canary host passed its gate: nothing to put back"
            return
        label = canary.put_back_step(names) if canary else f"put {', '.join(names)} back in the load balancer"
        percent = canary.traffic_percent if canary else None
        with self.reporter.step(label) as step:
            try:
                self._lb_change(up=names, share=(names, percent) if percent is not None else None)
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
            self.record.hosts({name: self.outcomes[name].state for name in names})
            self.rotation.release(names)

    def _lb_change(
        self,
        down: Sequence[str] = (),
        up: Sequence[str] = (),
        share: tuple[Sequence[str], int] | None = None,
        reset_weights: bool = False,
        on: Sequence[str] | None = None,
    ) -> None:
        if not self.app.lbs or not (down or up or share or reset_weights):
            return

        def servers(names: Sequence[str]) -> list[str]:
            return [self.app.server(self.app.host(name)) for name in names]

        self.lbs.change(
            down=servers(down),
            up=servers(up),
            share=(servers(share[0]), share[1]) if share else None,
            reset_weights=reset_weights,
            on=on,
        )

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
            if result.canary is not None:
                details["canary"] = result.canary.brief()
            if result.held:
                details["result"] = "held"
            if result.pending is not None:
                details["pending"] = result.pending
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
        self.record.hosts({name: state})


def execute(
    app: AppFleet,
    plan: RolloutPlan,
    reporter: Reporter = Reporter(),
    tarball: bytes = b"",
    pending: dict[str, Any] | None = None,
) -> RolloutResult:
    """Run the plan (a deploy's with its release's tarball); raise RolloutFailed (carrying the
    result) unless every host ended on the plan's release (or, with --canary-only, the canary
    passed). `pending`: what the release changes (igops.deploy_pending), journaled with it."""
    result = Rollout(app, plan, reporter, tarball, pending).run()
    if not result.ok:
        raise RolloutFailed(result)
    return result
