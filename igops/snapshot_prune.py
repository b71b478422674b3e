"""Deleting and pinning snapshot groups: prune, delete and keep. Each runs under its lease, after
the confirmation, and first reads the groups again: a plan that no longer holds (another operator
pinned a group, deleted one, or a restore began to read one) changes nothing. A group a restore,
drill or in-place rebuild reads is leased by it (igops.snapshot_groups.in_use), and prune leaves
it."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from igops.errors import AlreadyRunning
from igops.output import Reporter, plural
from igops.snapshot_groups import TAG_KEEP, SnapshotGroup, changed_since_plan, changes_to, delete_group, groups, in_use

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet
    from igops.operations.engine import Operation
    from igops.snapshot_policy import DeletePlan, PrunePlan


@dataclass
class PruneResult:
    deleted: list[str] = field(default_factory=list)
    # Group id -> the operation reading it: left, with its cluster's WAL, for the next prune.
    in_use: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        left = f"; left {', '.join(self.in_use)}, in use" if self.in_use else ""
        return f"deleted {plural(len(self.deleted), 'group')}{left}"


def prune(fleet: Fleet, ebs: Ebs, plan: PrunePlan, reporter: Reporter = Reporter()) -> PruneResult:
    """Delete the groups of a prune plan (igops.snapshot_policy.plan_prune), oldest first, then
    the archived WAL that none of the groups left needs.

    Run under the prune's lease, after the confirmation: the groups are read and the plan made
    again first, and nothing is deleted (refused) if it no longer holds (see
    snapshot_policy.PrunePlan.changes). Each group is deleted under its lease (in_use): a group that
    a restore, drill or in-place rebuild holds is left, and so is its cluster's WAL."""
    from igops.pg import archive_repository

    _check_prune_unchanged(fleet, ebs, plan)
    operation = _operation(reporter)
    result = PruneResult()
    for group in plan.delete:
        with reporter.step(f"delete group {group.group_id}") as step, ExitStack() as held:
            if operation is not None:
                try:
                    held.enter_context(operation.lease([in_use(group.group_id)]))
                except AlreadyRunning as reading:
                    result.in_use[group.group_id] = reading.message
                    step.status, step.detail = "skipped", f"in use: {reading.message}"
                    continue
            delete_group(ebs, group)
            result.deleted.append(group.group_id)
    needed = {group.wal.cluster for group in plan.delete if group.group_id in result.in_use and group.wal}
    for expiry in plan.wal:
        if expiry.cluster not in needed:
            archive_repository.expire(fleet, [expiry], reporter)
            continue
        with reporter.step(f"expire WAL of {expiry.cluster} before {expiry.needed.segment}") as step:
            step.status, step.detail = "skipped", "a group left in use may need it"
    return result


def _check_prune_unchanged(fleet: Fleet, ebs: Ebs, plan: PrunePlan) -> None:
    from igops.pg import archive_repository

    current = groups(ebs)
    changes = plan.changes(plan.remade(current, datetime.now(UTC)), current)
    if not changes and plan.wal:
        # What the groups left once exactly the planned ones are gone need: the plan made again
        # may delete more, which this run does not.
        left = archive_repository.for_prune(fleet, current, replace(plan, keep={}, wal=[]))
        changes = plan.wal_changes(left.wal)
    if changes:
        raise changed_since_plan("the snapshot groups", changes, "nothing was deleted")


def _operation(reporter: Reporter) -> Operation | None:
    """The operation whose steps go through `reporter` (the engine's JournaledReporter); None for
    a caller outside one, which knows of no other operation."""
    from igops.operations.engine import JournaledReporter

    return reporter.operation if isinstance(reporter, JournaledReporter) else None


def delete(fleet: Fleet, ebs: Ebs, plan: DeletePlan) -> str:
    """Delete the group of a delete plan (igops.snapshot_policy.plan_delete). Run under its lease,
    after the confirmation: refused, nothing deleted, if the groups read again show the group
    gone or changed, or deleting it now risks what the plan did not accept (pinned since, or
    another delete took its set toward its minimum redundancy)."""
    changes = plan.changes(fleet, groups(ebs), datetime.now(UTC))
    if changes:
        raise changed_since_plan(f"snapshot group {plan.group.group_id}", changes, "nothing was deleted")
    delete_group(ebs, plan.group)
    return plan.group.group_id


def keep_value(user: str, now: datetime | None = None) -> str:
    moment = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return f"{moment} by {user}"


def set_keep(ebs: Ebs, group: SnapshotGroup, value: str | None) -> None:
    """Pin every snapshot of the group (`value` says when and by whom), or release it (None).
    Run under the lease, after the confirmation: refused, nothing tagged, if the group's
    snapshots or its pin changed since `group` was read (another keep or release, a delete)."""
    changes = changes_to(group, next(iter(groups(ebs, group_id=group.group_id)), None))
    if changes:
        raise changed_since_plan(f"snapshot group {group.group_id}", changes, "nothing was tagged")
    ids = [snapshot["SnapshotId"] for snapshot in group.snapshots]
    if value is None:
        ebs.untag(ids, [TAG_KEEP])
    else:
        ebs.tag(ids, {TAG_KEEP: value})
