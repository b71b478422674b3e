"""What `igops pg` and `igops redis` share: planning with the state shown on refusal, and the
show state -> plan -> confirm -> lock -> check unchanged -> act -> show state sequence."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from igops import failover
from igops.commands.common import mutate
from igops.errors import RefusedError
from igops.operations.steps import StepFailed
from igops.output import Output, Reporter

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.pg.plans import PgPlan
    from igops.redis_failover import RedisPlan

P = TypeVar("P", bound="PgPlan | RedisPlan")  # a plan
S = TypeVar("S")  # the state a plan is made from, and shown
R = TypeVar("R")  # what applying a plan returns


def planned(
    out: Output, step_title: str, planner: Callable[[], tuple[P, S]], show_state: Callable[[Output, S], None]
) -> tuple[P, S]:
    """Run a planner; a refusal shows the state it was based on before its one-line error."""
    with out.step(step_title):
        try:
            return planner()
        except RefusedError as refusal:
            state = getattr(refusal, "state", None)
            if state is not None:
                show_state(out, state)
            raise


def run_plan(
    out: Output,
    fleet: Fleet,
    plan: P,
    before: S,
    *,
    dry_run: bool,
    yes: bool,
    show_state: Callable[[Output, S], None],
    read_state: Callable[[], S],
    apply: Callable[[Fleet, P, Reporter], R],
    kind: str,
    resources: list[tuple[str, str]],
    members: list[str],
    params: dict[str, Any],
    outcome: Callable[[R], tuple[str, int]],
    summary: Callable[[R], str],
    nothing_to_do: str,
) -> None:
    """Show the state and the plan, then confirm, lock, check under the lock that the state is still
    the one the plan was made for, apply it, and show the state again."""

    def state_after() -> S | None:
        try:
            return read_state()
        except Exception as exc:  # noqa: BLE001 - the operation's own outcome matters more
            out.log(f"could not read the state afterwards: {exc}")
            return None

    show_state(out, before)
    for note in plan.notes:
        out.log(f"note: {note}")
    if not plan.actions:
        out.text(plan.notes[0] if plan.notes else nothing_to_do)
        out.finish({"plan": failover.describe_plan(plan), "before": before})
        return

    def act(reporter: Reporter) -> R:
        failover.check_unchanged(fleet, plan)
        return apply(fleet, plan, reporter)

    try:
        result = mutate(
            out,
            fleet,
            kind=kind,
            resources=resources,
            targets=members,
            title=_title(plan),
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=act,
            outcome=outcome,
            params=params,
        )
    except StepFailed:
        after = state_after()
        if after:
            out.log("where things stand now:")
            show_state(out, after)
        raise
    if result is None:
        out.finish({"dry_run": dry_run, "plan": failover.describe_plan(plan), "before": before})
        return
    after = state_after()
    if after:
        show_state(out, after)
    out.text(summary(result))
    out.finish({"plan": failover.describe_plan(plan), "before": before, "result": result, "after": after})


def _title(plan: PgPlan | RedisPlan) -> str:
    """The plan's title, naming each risk --accept-risk accepts: it heads the plan (stdout for a
    dry run, so `--dry-run > plan.txt` keeps them) and is the question confirmed."""
    if not plan.forced:
        return plan.title
    return f"{plan.title}, accepting the risks that " + "; that ".join(plan.forced)
