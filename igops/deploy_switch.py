"""Switching a rollout's hosts: each batch to the plan's release, gated on its own /health,
and those that fail returned to the release they ran before (igops.deploy_rollout hands it the
batches; a canary that fails its analysis is returned the same way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from igops import ssh_loop
from igops.deploy_agents import HEALTH_PROBES_AT_ONCE, AppFleet
from igops.deploy_gate import GateResult, wait_healthy
from igops.deploy_plan import DEPLOYED, FAILED, ROLLED_BACK, UNKNOWN, RolloutPlan
from igops.deploy_record import LastRunRecord
from igops.deploy_result import HostOutcome

SWITCH_TIMEOUT_S = 90.0


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
        """name -> (answer, error, whether the agent answered at all). Without an answer the
        switch may or may not have happened: only the host knows which release is current."""
        jobs = {}
        for name in names:
            host = self.app.host(name)
            jobs[name] = (
                self.app.release_agent(host),
                {
                    "op": "switch",
                    "id": release_of(name),
                    "keep": self.plan.keep,
                    "reload": self.app.reload_command(host),
                    "action": action,
                    "deploy": self.plan.deploy_id,
                    "protect": [self.outcomes[name].before] if self.outcomes[name].before else [],
                },
                b"",
            )
        answers = self.app.request_each(jobs, SWITCH_TIMEOUT_S, self.plan.parallel)
        return {name: (answers[name].answer, answers[name].error, answers[name].answered) for name in names}

    def _gate(self, names: list[str], release_of: Callable[[str], str]) -> dict[str, GateResult]:
        """name -> its gate's result, every host gated at once as coroutines on the SSH loop."""
        if not names:
            return {}

        async def gate_all() -> list[GateResult]:
            probes = asyncio.Semaphore(HEALTH_PROBES_AT_ONCE)
            return await asyncio.gather(
                *(
                    wait_healthy(str(self.app.host(name).address), self.plan.gate, release_of(name), probes)
                    for name in names
                )
            )

        return dict(zip(names, ssh_loop.call(gate_all()), strict=True))
