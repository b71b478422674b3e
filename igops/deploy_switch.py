"""Switching a rollout's hosts: each batch to the plan's release, gated on its own /health,
and those that fail returned to the release they ran before (igops.deploy_rollout hands it the
batches; a canary that fails its analysis is returned the same way). The switch and the gate
themselves are switch_hosts and gate_hosts, which the abort of an interrupted deploy
(igops.deploy_abort) uses too, so that it returns and gates a host as a rollout does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from igops import ssh_loop
from igops.deploy_agents import HEALTH_PROBES_AT_ONCE, AgentAnswer, AppFleet
from igops.deploy_gate import GateResult, HealthGate, wait_healthy
from igops.deploy_plan import DEPLOYED, FAILED, ROLLED_BACK, UNKNOWN, RolloutPlan
from igops.deploy_record import LastRunRecord
from igops.deploy_result import HostOutcome

SWITCH_TIMEOUT_S = 90.0


def switch_hosts(
    app: AppFleet,
    releases: Mapping[str, str],
    before: Mapping[str, str | None],
    *,
    keep: int,
    action: str,
    deploy_id: str,
    parallel: int | None = None,
) -> dict[str, AgentAnswer]:
    """name -> its release agent's answer to switching it to its release in `releases`, at most
    `parallel` hosts at once (the SSH settings' without it). `action` ("deploy" or "rollback")
    and `deploy_id` go into the host's revisions.log. `before` is the release each host ran
    before the run: the one it returns to if it fails, so the agent's prune to `keep` releases
    spares it. Without an answer the switch may or may not have happened: only the host knows
    which release is current."""
    jobs = {}
    for name, release in releases.items():
        host = app.host(name)
        request = {
            "op": "switch",
            "id": release,
            "keep": keep,
            "reload": app.reload_command(host),
            "action": action,
            "deploy": deploy_id,
            "protect": [before[name]] if before[name] else [],
        }
        jobs[name] = (app.release_agent(host), request, b"")
    return app.request_each(jobs, SWITCH_TIMEOUT_S, parallel)


def gate_hosts(
    app: AppFleet, releases: Mapping[str, str], gate_of: Callable[[str, str], HealthGate]
) -> dict[str, GateResult]:
    """name -> the result of its health gate on its release in `releases`, `gate_of(name,
    release)` the gate it must pass there. Every host is gated at once, as coroutines on the SSH
    loop, with at most HEALTH_PROBES_AT_ONCE probes open: each holds a socket beside the run's
    agent sessions."""
    if not releases:
        return {}

    async def gate_all() -> list[GateResult]:
        probes = asyncio.Semaphore(HEALTH_PROBES_AT_ONCE)
        return await asyncio.gather(
            *(
                wait_healthy(str(app.host(name).address), gate_of(name, release), release, probes)
                for name, release in releases.items()
            )
        )

    return dict(zip(releases, ssh_loop.call(gate_all()), strict=True))


class HostSwitcher:
    """Switches a rollout's hosts to a release and gates each on its /health, and returns those
    that fail to the release they ran before. It keeps each host's outcome and its state in the
    last-run record, shared with the Rollout that hands it the batches."""

    def __init__(self, app: AppFleet, plan: RolloutPlan, outcomes: dict[str, HostOutcome], record: LastRunRecord):
        self.app = app
        self.plan = plan
        self.outcomes = outcomes
        self.record = record

    def switch_and_gate(self, batch: list[str], number: int) -> tuple[list[str], list[str]]:
        """Switch batch `number` to the plan's release and gate it; the hosts that fail go back
        to their release before. Returns (passed, failed)."""
        target = self.plan.target
        switched = self._switch(batch, lambda _: target, self.plan.kind)
        to_gate = []
        failed: list[str] = []
        states = {}
        for name in batch:
            answer, error, answered = switched[name]
            outcome = self.outcomes[name]
            outcome.batch = number
            if answer is None:
                if answered:
                    outcome.state, outcome.detail = FAILED, f"switch refused: {error}"
                else:
                    outcome.state, outcome.release = UNKNOWN, None
                    outcome.detail = (
                        f"unreachable during the switch ({error}): its current release is unknown, "
                        "so it stays out of the load balancer"
                    )
                failed.append(name)
            elif answer["reload_exit"] != 0:
                outcome.state, outcome.release = FAILED, target
                outcome.detail = f"reload failed (exit {answer['reload_exit']}): {answer['reload_output']}"
                failed.append(name)
            else:
                outcome.release = target
                to_gate.append(name)
            states[name] = f"switched to {target}" if answer else outcome.state
        self.record.hosts(states)
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
        self.switch_back(back, None)
        return passed, failed

    def switch_back(self, names: list[str], why: str | None) -> None:
        """Return hosts to the release they ran before this run, and gate them on it."""
        returnable = [
            name for name in names if self.outcomes[name].before and self.outcomes[name].before != self.plan.target
        ]
        for name in names:
            if name not in returnable:
                outcome = self.outcomes[name]
                outcome.detail = f"{outcome.detail}; it had no earlier release to return to" + (
                    "" if outcome.state == DEPLOYED else ", so it stays out of the load balancer"
                )
        if not returnable:
            return

        def before(name: str) -> str:
            release = self.outcomes[name].before
            assert release  # every returnable host has one
            return release

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
                outcome.detail = (
                    f"{reason}; switching back to {before(name)} failed: "
                    f"{error if answer is None else answer['reload_output']}"
                )
                continue
            outcome.release = before(name)
            to_gate.append(name)
        gates = self._gate(to_gate, before)
        states = {}
        for name in to_gate:
            outcome = self.outcomes[name]
            reason = why or outcome.detail
            outcome.state = ROLLED_BACK
            if gates[name].ok:
                outcome.detail = f"{reason}; back on {before(name)}"
            else:
                outcome.detail = f"{reason}; back on {before(name)} but unhealthy there too: {gates[name].detail}"
                outcome.state = FAILED
            states[name] = f"switched back to {before(name)}"
        self.record.hosts(states)

    def _switch(
        self, names: list[str], release_of: Callable[[str], str], action: str
    ) -> dict[str, tuple[dict[str, Any] | None, str | None, bool]]:
        """name -> (answer, error, whether the agent answered at all): switch_hosts with the
        plan's keep, deploy id and parallelism, each host sparing the release it ran before."""
        answers = switch_hosts(
            self.app,
            {name: release_of(name) for name in names},
            {name: self.outcomes[name].before for name in names},
            keep=self.plan.keep,
            action=action,
            deploy_id=self.plan.deploy_id,
            parallel=self.plan.parallel,
        )
        return {name: (answers[name].answer, answers[name].error, answers[name].answered) for name in names}

    def _gate(self, names: list[str], release_of: Callable[[str], str]) -> dict[str, GateResult]:
        """gate_hosts with the plan's gate for every host."""
        return gate_hosts(self.app, {name: release_of(name) for name in names}, lambda _name, _release: self.plan.gate)
