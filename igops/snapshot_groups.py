"""Snapshot groups as EBS holds them: the tags a create puts on every snapshot (a group is
nothing but the snapshots carrying them), the group they add up to (its members, any stray, its
state), and the functions that list, find, judge and delete groups and lease one while it is read.

Kept apart from igops.snapshot, which takes groups (freeze, snapshot, thaw, tag), because far more of
igops reads groups than takes them: restore, drill, in-place rebuild, prune, delete, keep and the
checks only read. A create needs only the tags from here: igops.snapshot imports this module,
never the reverse.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from igops import snapshot_wal
from igops.errors import RefusedError, UsageError
from igops.operations.conflicts import Resource

if TYPE_CHECKING:
    from igops.ebs import Ebs

# Every group already taken carries these names: a renamed tag leaves those groups unread.
TAG_GROUP = "igops:group"
TAG_HOST = "igops:host"
TAG_ROLE = "igops:role"
TAG_MOUNT = "igops:mount"
TAG_DEVICE = "igops:device"
TAG_FSTYPE = "igops:fstype"
TAG_RAID_INDEX = "igops:raid-index"
TAG_RAID_MEMBERS = "igops:raid-members"
TAG_RAID_LEVEL = "igops:raid-level"
TAG_GROUP_SIZE = "igops:group-size"
TAG_FREEZE_MS = "igops:freeze-ms"
TAG_STATE = "igops:state"
TAG_CREATED = "igops:created"
TAG_VERSION = "igops:version"
# Pinned with `igops snapshot keep`: prune never removes the group, delete refuses it. The value
# says when and by whom.
TAG_KEEP = "igops:keep"

STATE_COMPLETE = "complete"
STATE_FAILED = "failed"
STATE_PENDING = "pending"
STATE_TAKING = "taking"


def in_use(group_id: str) -> Resource:
    """The lease on a group: a restore, drill or in-place rebuild holds it for as long as it
    reads the group (its snapshots, then the archived WAL from its start); delete holds it, and
    prune while it deletes the group, leaving a group it finds held. A lease, not a tag, since it
    ends with its holder: a killed restore leaves no group pinned."""
    return ("snapshot-group", group_id)


# How far the clock of the machine that took a group may be from EC2's for its own reading of
# when it began the group to count (SnapshotGroup.taken_for): well past the skew NTP leaves. A
# machine further off has a clock to mend, and its groups count by EC2's clock.
MAX_CLOCK_SKEW = timedelta(minutes=5)


@dataclass
class SnapshotGroup:
    group_id: str
    host: str
    mounts: list[str]
    volumes: int
    expected: int
    state: str
    created: datetime
    size_gib: int
    freeze_ms: float | None
    snapshots: list[dict[str, Any]] = field(default_factory=list, repr=False)
    kept: str | None = None  # the igops:keep tag's value: pinned when and by whom
    wal: snapshot_wal.WalMark | None = None  # where in its cluster's WAL the group is consistent
    # Snapshots carrying the group's tag that are none of its members: a CreateSnapshot that EC2
    # made but whose answer was lost (the SDK's retry made another), or CreateSnapshots taking a
    # volume attached after the plan. The create deletes them; one it could not is only deleted
    # with the group, and never restored.
    strays: list[dict[str, Any]] = field(default_factory=list, repr=False)
    begun: datetime | None = None  # the igops:created tag: when the machine that took it began it

    @property
    def taken_for(self) -> datetime:
        """When the group counts as taken for a schedule: when the machine that took it began it
        by its own clock, the clock its `snapshot cron` judged the slot by. By EC2's clock
        (`created`) a group that a machine whose clock runs a minute fast took at its 12:00 was
        begun before 12:00, and a second machine running cron with a right clock took another
        for the same slot. A tag further than MAX_CLOCK_SKEW from EC2's clock, or none, is not
        trusted: a machine with a clock that wrong must not stop every other from taking groups."""
        if self.begun is not None and abs(self.begun - self.created) <= MAX_CLOCK_SKEW:
            return self.begun
        return self.created

    @property
    def complete(self) -> bool:
        """All the group's snapshots are there, tagged complete, and finished by EBS. A property
        so that igops.pg.archive_repository, which prune calls, asks the group and does not
        import this module back for STATE_COMPLETE."""
        return self.state == STATE_COMPLETE


def _begun(tags: list[dict[str, str]]) -> datetime | None:
    """The igops:created tag, read; None when it is missing or not a time."""
    text = next((t[TAG_CREATED] for t in tags if t.get(TAG_CREATED)), None)
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


# --- list, show ---------------------------------------------------------------------------------
def groups(ebs: Ebs, host: str | None = None, group_id: str | None = None) -> list[SnapshotGroup]:
    """Every group (of `host`, or only `group_id`), newest first."""
    from igops.ebs import tags_of

    filters: dict[str, str | None] = {TAG_GROUP: group_id} if host is None else {TAG_GROUP: group_id, TAG_HOST: host}
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for snapshot in ebs.snapshots(filters):
        by_group[tags_of(snapshot)[TAG_GROUP]].append(snapshot)
    found = []
    for group_id, found_in_group in by_group.items():
        expected = max(int(tags_of(snapshot).get(TAG_GROUP_SIZE, "0") or 0) for snapshot in found_in_group)
        members, strays = _members_and_strays(found_in_group, expected)
        tags = [tags_of(snapshot) for snapshot in members]
        states = {snapshot["State"] for snapshot in members}
        marked = {t.get(TAG_STATE) for t in tags}
        if STATE_FAILED in marked or "error" in states:
            state = STATE_FAILED
        elif marked == {STATE_COMPLETE} and len(members) == expected:
            state = STATE_COMPLETE if states == {"completed"} else STATE_PENDING
        else:
            state = STATE_TAKING if len(members) <= expected else STATE_FAILED
        created = min(snapshot["StartTime"] for snapshot in members)
        freeze = next((float(t[TAG_FREEZE_MS]) for t in tags if t.get(TAG_FREEZE_MS)), None)
        # Pinned if any member is: a keep interrupted half-way must still protect the group.
        kept = next((t[TAG_KEEP] for t in tags if t.get(TAG_KEEP)), None)
        found.append(
            SnapshotGroup(
                group_id,
                tags[0].get(TAG_HOST, "?"),
                sorted({t.get(TAG_MOUNT, "?") for t in tags}),
                len(members),
                expected,
                state,
                created if created.tzinfo else created.replace(tzinfo=UTC),
                sum(snapshot.get("VolumeSize", 0) for snapshot in members),
                freeze,
                sorted(members, key=lambda s: (tags_of(s).get(TAG_MOUNT, ""), int(tags_of(s).get(TAG_RAID_INDEX, 0)))),
                kept,
                snapshot_wal.from_tags(tags[0]),
                strays,
                _begun(tags),
            )
        )
    return sorted(found, key=lambda group: group.created, reverse=True)


def _members_and_strays(
    found: list[dict[str, Any]], expected: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A group's members and its strays. Once a create has tagged `expected` snapshots complete,
    they are the group: any other snapshot with its tag is a stray (see SnapshotGroup.strays).
    Before that nothing tells them apart, and every snapshot counts (more than expected: failed)."""
    from igops.ebs import tags_of

    marked = [snapshot for snapshot in found if tags_of(snapshot).get(TAG_STATE) == STATE_COMPLETE]
    if len(marked) != expected or len(marked) == len(found):
        return found, []
    return marked, [snapshot for snapshot in found if snapshot not in marked]


def find_group(ebs: Ebs, group_id: str) -> SnapshotGroup:
    for group in groups(ebs):
        if group.group_id == group_id:
            return group
    raise UsageError(f"no snapshot group {group_id!r}", "see `igops snapshot list`")


def snapshot_ids(group: SnapshotGroup) -> set[str]:
    return {snapshot["SnapshotId"] for snapshot in group.snapshots}


def changes_to(planned: SnapshotGroup, current: SnapshotGroup | None) -> list[str]:
    """What differs in a group since a plan read it (`current`: as it is now, None if gone): its
    snapshots, and its pin."""
    if current is None:
        return [f"group {planned.group_id} is gone"]
    changes = []
    if snapshot_ids(current) != snapshot_ids(planned):
        changes.append(f"group {planned.group_id} has other snapshots now")
    if current.kept != planned.kept:
        changes.append(
            f"group {planned.group_id} is kept now ({current.kept})"
            if current.kept
            else f"group {planned.group_id} was released"
        )
    return changes


def changed_since_plan(what: str, changes: list[str], nothing: str) -> RefusedError:
    """The refusal of a plan whose groups changed between the plan and its lease."""
    return RefusedError(
        f"refused: {what} changed since the plan was made ({'; '.join(changes)[:500]}): {nothing}",
        "run the command again to see the new plan",
    )


def check_readable(ebs: Ebs, group_id: str) -> None:
    """Under the group's lease (in_use), before reading it: refused unless it is still there and
    complete, since a prune or delete may have taken it between the plan and the lease."""
    current = next(iter(groups(ebs, group_id=group_id)), None)
    if current is None or current.state != STATE_COMPLETE:
        raise changed_since_plan(
            f"snapshot group {group_id}",
            [f"it is {current.state} now" if current else "it is gone"],
            "nothing was done",
        )


# --- prune, delete, keep ------------------------------------------------------------------------
def stale(group: SnapshotGroup, now: datetime, grace: timedelta) -> bool:
    """A group still taking, or failed, `grace` after it began: its create was killed (it never
    tagged the group complete) or gave up; nothing will finish it."""
    return group.state in (STATE_TAKING, STATE_FAILED) and now - group.created > grace


def delete_group(ebs: Ebs, group: SnapshotGroup) -> None:
    for snapshot in [*group.snapshots, *group.strays]:
        ebs.delete_snapshot(snapshot["SnapshotId"])


def delete_steps(group: SnapshotGroup, risks: list[str]) -> list[str]:
    from igops.ebs import tags_of

    steps = [f"RISK ACCEPTED: {risk}" for risk in risks]
    for snapshot in group.snapshots:
        tags = tags_of(snapshot)
        steps.append(
            f"DeleteSnapshot {snapshot['SnapshotId']} ({tags.get(TAG_MOUNT, '?')} "
            f"#{tags.get(TAG_RAID_INDEX, '0')}, volume {snapshot.get('VolumeId', '?')})"
        )
    steps += [
        f"DeleteSnapshot {snapshot['SnapshotId']} (a stray: volume {snapshot.get('VolumeId', '?')}, none of the "
        "group's members)"
        for snapshot in group.strays
    ]
    return steps
