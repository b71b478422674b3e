"""The steps of an online shard move, as the journal records them and plans show them: `STEPS`,
the points where `--pause-after` may stop, the `MovePlan` of a new or resumed move with each
step's description, where a resumed move picks up, and the `AbortPlan` of an abort. The figures
a plan states (tables copied at once, the sequences' margin) are defined here, and the steps
that act on them import them from here."""

from __future__ import annotations

from dataclasses import dataclass

from igops.output import human_bytes

STEPS = ("planned", "target_ready", "published", "copied", "subscribed", "caught_up", "verified", "switched", "cleaned")
# Where `--pause-after` may stop a move: after each journaled step, and inside the cut-over
# after the lock is taken and after the source is fenced (before the map flips).
PAUSE_POINTS = (
    "planned",
    "target_ready",
    "published",
    "copied",
    "subscribed",
    "caught_up",
    "verified",
    "locked",
    "fenced",
    "switched",
)


# The target's sequences start this far past the source's: half the 10-bit sequence space, so
# ids minted on either side around the cut-over differ in their low bits even if the two
# servers' clocks disagree by a few milliseconds.
SEQUENCE_MARGIN = 512
COPY_PARALLEL = 3  # tables copied (and indexed) at once
# The longest the copy, or the verification, waits for its logical replication slot to be made
# (igops.shard_slot_wait): Postgres makes one only once every transaction that held a
# transaction id when it began has ended (a read-only report has none). The app's end within a
# second; a batch job's may take minutes, worth waiting for, as the wait holds nothing but the WAL
# and catalog rows the slot being made keeps (bounded by max_slot_wal_keep_size), and no writes. A session
# left idle in its transaction never ends by itself: 5 minutes lets a batch finish and still
# stops the move, saying which session to end, while its operator is watching.
SLOT_WAIT_LIMIT_S = 300.0


@dataclass(frozen=True)
class TableSize:
    name: str
    rows: int
    bytes: int


@dataclass
class MovePlan:
    shard: int
    schema: str
    source: str
    target: str
    source_primary: str
    target_primary: str
    database: str
    tables: list[TableSize]
    max_lag_bytes: int
    move_id: int | None = None
    resume_after: str | None = None  # the last step a resumed move had completed

    @property
    def slot(self) -> str:
        return f"igops_move_{self.move_id if self.move_id is not None else '<id>'}"

    @property
    def fenced_schema(self) -> str:
        return f"{self.schema}_moved_{self.move_id if self.move_id is not None else '<id>'}"

    def remaining(self) -> list[str]:
        start = STEPS.index(self.resume_after) + 1 if self.resume_after else 0
        return list(STEPS[start:])

    def steps(self) -> list[str]:
        return [describe_step(self, step) for step in self.remaining()]


def describe_step(plan: MovePlan, step: str) -> str:
    rows = sum(table.rows for table in plan.tables)
    size = sum(table.bytes for table in plan.tables)
    src = f"{plan.source} ({plan.source_primary})"
    dst = f"{plan.target} ({plan.target_primary})"
    slot_wait = f"{SLOT_WAIT_LIMIT_S / 60:g} min"
    return {
        "planned": f"journal the move of shard {plan.shard} ({plan.schema}) from {plan.source} to {plan.target} "
        "in the directory's shard_moves",
        "target_ready": f"on {dst}: create schema {plan.schema} from the shard DDL (tables, sequence, next_id()) "
        f"and check it matches {plan.source}'s",
        "published": f"on {src}: publication {plan.slot} FOR TABLES IN SCHEMA {plan.schema}",
        "copied": f"on {src}: logical replication slot {plan.slot} exporting its snapshot (made once the transactions "
        f"open there have ended: those still open after a few seconds are named, and past {slot_wait} the step "
        f"fails); COPY {len(plan.tables)} "
        f"tables (~{rows:,} rows, {human_bytes(size)}; binary within one major version) under that snapshot "
        f"into {dst}, each emptied in its COPY's transaction and loaded frozen, {COPY_PARALLEL} at a time, "
        "then build their keys and indexes",
        "subscribed": f"on {dst}: subscription {plan.slot} streaming from the slot (no copy of its own)",
        "caught_up": f"wait until {plan.target} is within {human_bytes(plan.max_lag_bytes)} of {plan.source}'s WAL",
        "verified": f"on {src}: temporary slot {plan.slot}_changes to track the keys written from now on (the same "
        f"wait, at most {slot_wait}); pause "
        f"writes to {plan.schema} for an instant to snapshot both copies at one point, then "
        "compare per-table row counts and row hashes (a mismatch is located by ordered md5 chunks), "
        "sequences and the schema",
        "switched": f"cut over: LOCK {plan.schema}'s tables IN EXCLUSIVE MODE on {plan.source} (writes wait, reads "
        f"go on); final catch-up (applied and flushed on {plan.target}); the rows written since the "
        "verification equal on both; "
        f"{plan.schema} sequences on {plan.target} set {SEQUENCE_MARGIN} past {plan.source}'s; rename "
        f"{plan.schema} to {plan.fenced_schema} on {plan.source} (waiting writers fail and retry); "
        f"commit; shard map: shard {plan.shard} -> {plan.target}, version + 1",
        "cleaned": f"once {plan.target} has flushed the shard's last changes (the slot's confirmed_flush_lsn), "
        f"drop subscription, slot and publication {plan.slot} and the old copy {plan.fenced_schema} "
        f"on {plan.source}",
    }[step]


def resume_point(step: str) -> str:
    """The last step a resumed move takes as done. The rows written since a verification are
    known only to the igops that verified (its temporary slot went with it): a move stopped
    after its verification, or during its cut-over, verifies again."""
    return "caught_up" if step == "verified" else step


@dataclass
class AbortPlan:
    move_id: int
    shard: int
    schema: str
    source: str
    target: str
    step: str
    slot: str
    fenced_schema: str

    def steps(self) -> list[str]:
        return [
            f"on {self.source}: if the cut-over fenced it, rename {self.fenced_schema} back to {self.schema}",
            f"on {self.target}: drop subscription {self.slot} and the partial copy {self.schema} "
            f"(if {self.target} does not accept writes, both are left for another --abort {self.move_id}, "
            "and the abort goes on)",
            f"on {self.source}: drop slot and publication {self.slot} (whether or not the step before succeeded: "
            "the slot holds WAL on the source)",
            f"journal: move {self.move_id} aborted (the shard map still places shard {self.shard} on {self.source}); "
            f"or, when {self.target}'s copy was left, the move stays unfinished, failed with what is left there",
        ]

    def left_on_target(self) -> list[str]:
        """What the move may have made on the target, by its last journaled step: the
        subscription is created after the copy, the copy's schema from the start."""
        made = [f"the partial copy (schema {self.schema})"]
        if STEPS.index(self.step) >= STEPS.index("copied"):
            made.insert(0, f"subscription {self.slot}")
        return made
