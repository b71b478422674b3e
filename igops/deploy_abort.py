"""The abort of an interrupted deploy or rollback (`igops ops abort`): the hosts it left drained
go back into rotation, each only once it passes the health gate a rollout's batch passes; one that
fails returns to the release it ran before the interrupted run, as a rollout's failing batch does,
and is gated there. igops.interrupted plans and runs it under the operation engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops.errors import ExitCode, IgopsError
from igops.output import Reporter, plural

if TYPE_CHECKING:
    from igops.deploy import AppFleet, HealthGate, HostPlan, HostReleases


# The deploy command's --health-passes and --health-timeout: the gate of a deploy whose record
# predates them.
DEFAULT_HEALTH_PASSES = 3
DEFAULT_HEALTH_TIMEOUT_S = 30.0


@dataclass
class DeployAbort:
    """The abort of an interrupted deploy or rollback, planned: the hosts it left drained. None
    goes back into rotation unchecked (the run may have been killed while a host failed its
    gate): each is gated, as a rollout gates a batch, on the release it runs; one that fails
    returns, if the run had switched it, to the release it ran before that run, and is gated
    there, as a rollout's failing batch is (a rerun returns it to the same release). Only a host
    that passed a gate goes back; the others, and those that cannot be reached, stay out."""

    operation: str
    kind: str  # "deploy" or "rollback", as the last-run record and the plans name it
    rerun: str  # what finishes the interrupted run
    gate: HealthGate
    # Each drained host: "roll" to gate it, with `before` the release it returns to if that
    # differs from `current`; FAILED when it cannot be gated (`detail` says why).
    hosts: list[HostPlan]
    surveys: dict[str, HostReleases]

    def gated(self) -> list[HostPlan]:
        return [host for host in self.hosts if host.action == "roll"]

    def returnable(self) -> list[HostPlan]:
        return [host for host in self.gated() if host.before and host.before != host.current]

    def steps(self) -> list[str]:
        gated = self.gated()
        if not gated:
            return []
        steps = [
            "health gate "
            + ", ".join(f"{host.host} (on {host.current})" for host in gated)
            + f": {self.gate.describe()}, serving the release it runs"
        ]
        if self.returnable():
            steps.append(
                f"each of those that fails it and ran another release before the interrupted {self.kind} goes back "
                "to that release ("
                + ", ".join(f"{host.host} to {host.before}" for host in self.returnable())
                + f"): switch current, reload gunicorn, health gate: {self.gate.describe()}, serving that release"
            )
        steps.append(
            f"put back in the load balancer each of {', '.join(host.host for host in gated)} that passed a "
            "health gate; the others stay out of it"
        )
        return steps

    def notes(self) -> list[str]:
        if not self.hosts:
            return [
                "none of its hosts is out of the load balancer: the abort only ends it; hosts keep the release "
                "they run (igops deploy releases shows which)"
            ]
        notes = [
            "a host goes back into rotation only once it passes the health gate a rollout's batch passes; one "
            "that fails it stays out of the load balancer, named at the end, and the operation stays interrupted "
            f"(once the host is fixed, igops ops abort {self.operation} again gates it and puts it back)",
            "a host put back keeps the release it passed its gate on (igops deploy releases shows which)",
        ]
        notes += [f"{host.host}: {host.detail}" for host in self.gated() if host.detail]
        notes += [
            f"{host.host} stays out of the load balancer: {host.detail} (igops puts back only a host whose "
            "release it verified)"
            for host in self.hosts
            if host.action != "roll"
        ]
        return notes

    def run(self, app: AppFleet, reporter: Reporter) -> dict[str, list[str]]:
        from igops import deploy, deploy_switch

        steps = iter(self.steps())
        # What each host's gates saw, or why it cannot be gated: what the result and the error name.
        seen = {host.host: str(host.detail) for host in self.hosts if host.action != "roll"}
        passed: set[str] = set()
        gated = self.gated()
        if gated:
            with reporter.step(next(steps)) as step:
                gates = deploy_switch.gate_hosts(app, {host.host: str(host.current) for host in gated}, self._gate_for)
                for host in gated:
                    gate = gates[host.host]
                    seen[host.host] = gate.detail if gate.ok else f"failed its gate on {host.current}: {gate.detail}"
                    if gate.ok:
                        passed.add(host.host)
                step.detail = "; ".join(f"{host.host}: {seen[host.host]}" for host in gated)
                if len(passed) < len(gated):
                    step.status = "failed"
        if self.returnable():
            with reporter.step(next(steps)) as step:
                failing = [host for host in self.returnable() if host.host not in passed]
                returned = self._return(app, failing, seen)
                passed.update(returned)
                step.detail = "; ".join(f"{host.host}: {seen[host.host]}" for host in failing) or "none failed its gate"
                if len(returned) < len(failing):
                    step.status = "failed"
        back = [host.host for host in self.hosts if host.host in passed]
        left_out = {host.host: seen[host.host] for host in self.hosts if host.host not in passed}
        if gated:
            with reporter.step(next(steps)) as step:
                if back:
                    deploy.put_back(app, back, f"abort of {self.operation}")
                step.detail = f"back: {', '.join(back)}" if back else "none passed a gate: nothing was put back"
                if left_out:
                    step.detail += f"; left out: {', '.join(left_out)}"
        result = {
            "undone": [f"{name} back in the load balancer ({seen[name]})" for name in back],
            "not_undone": [f"{name} stays out of the load balancer: {why}" for name, why in left_out.items()],
        }
        if left_out:
            failed = IgopsError(
                f"{plural(len(left_out), 'app host')} left out of the load balancer: "
                + "; ".join(f"{name}: {why}" for name, why in left_out.items())
                + (f"; back in it: {', '.join(back)}" if back else ""),
                "igops puts back only a host that passes its health gate: fix each "
                f"(curl http://HOST:{self.gate.port}{self.gate.path}, the app's log), then igops ops abort "
                f"{self.operation} again, or {self.rerun}; igops deploy releases shows each host's release",
            )
            failed.exit_code = ExitCode.PARTIAL if back else ExitCode.FAILED
            failed.data = result
            raise failed
        return result

    def _gate_for(self, name: str, release: str) -> HealthGate:
        # A release igops did not build may not name itself in /health: gated on health alone, as
        # a rollback to it is (igops.deploy_plan.plan_rollback).
        built = (self.surveys[name].release_info(release) or {}).get("built_at")
        return dataclasses.replace(self.gate, require_release=bool(built))

    def _return(self, app: AppFleet, hosts: list[HostPlan], seen: dict[str, str]) -> list[str]:
        """Switch `hosts` to their release before the interrupted run and gate them there, as
        igops.deploy_switch.HostSwitcher.switch_back does; `seen` gets what each did. Returns
        those that passed."""
        from igops import deploy_switch

        releases = {plan.host: str(plan.before) for plan in hosts}
        answers = deploy_switch.switch_hosts(
            app,
            releases,
            # Each host ran that release before the interrupted run: named to spare from the prune,
            # as the rollout's switch back names it, so both send the same request.
            releases,
            keep=app.fleet.model.app.keep_releases,
            action="rollback",
            deploy_id=self.operation,
        )
        to_gate = {}
        for plan in hosts:
            answer, error = answers[plan.host].answer, answers[plan.host].error
            if answer is None or answer["reload_exit"] != 0:
                why = (
                    error
                    if answer is None
                    else f"reload failed (exit {answer['reload_exit']}): {answer['reload_output']}"
                )
                seen[plan.host] += f"; switching back to {plan.before} failed: {why}"
            else:
                to_gate[plan.host] = str(plan.before)
        gates = deploy_switch.gate_hosts(app, to_gate, self._gate_for)
        for name, release in to_gate.items():
            seen[name] += f"; back on {release}" + (
                "" if gates[name].ok else f" but unhealthy there too: {gates[name].detail}"
            )
        return [name for name in to_gate if gates[name].ok]


def plan_deploy_abort(app: AppFleet, record: dict[str, Any]) -> DeployAbort:
    """Which hosts the interrupted deploy or rollback `record` left drained, and how each is
    gated (DeployAbort); reads the load balancers, those hosts and the last-run records."""
    from igops import deploy

    params = record.get("params") or {}
    # Only its own hosts: another deploy, to other hosts, may be running and draining them.
    drained = [name for name in deploy.drained_by_igops(app) if name in (record.get("targets") or [])]
    # Only those hosts are asked, on the fleet's sessions.
    surveys = (
        deploy.survey_hosts(dataclasses.replace(app, hosts=[app.host(name) for name in drained])) if drained else {}
    )
    hosts = []
    for name in drained:
        found = surveys[name]
        if not found.reachable:
            hosts.append(
                deploy.HostPlan(name, deploy.FAILED, None, False, detail=f"unreachable: {found.error}", reachable=False)
            )
        elif found.current is None:
            hosts.append(deploy.HostPlan(name, deploy.FAILED, None, False, detail="it has no current release"))
        else:
            hosts.append(deploy.HostPlan(name, "roll", found.current, False, before=found.current))
    # The release a rerun would return the host to: the one it ran before the interrupted run.
    deploy.inherit_releases_before(hosts, surveys, deploy.read_last_runs(app.fleet))
    gate = deploy.HealthGate(
        app.fleet.model.app.health_path,
        app.fleet.model.app.port,
        int(params.get("health_passes", DEFAULT_HEALTH_PASSES)),
        float(params.get("health_timeout", DEFAULT_HEALTH_TIMEOUT_S)),
    )
    kind = "deploy" if record["kind"] == "deploy" else "rollback"
    rerun = "rerun the " + ("deploy (the same igops deploy command)" if kind == "deploy" else "rollback")
    return DeployAbort(record["id"], kind, rerun, gate, hosts, surveys)
