"""Rebalancing: the moves that even out shards or bytes across the clusters (`plan_rebalance`,
a greedy planner that needs no fleet), planned from the live map, and run one at a time, each
a full online move."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from igops.errors import IgopsError, RefusedError, UsageError
from igops.output import Reporter, human_bytes
from igops.shard_journal import Journal
from igops.shard_map import directory_session, read_map
from igops.shard_move import MoveResult, plan_move, start_move

if TYPE_CHECKING:
    from igops.inventory import Fleet


@dataclass(frozen=True)
class PlannedMove:
    shard: int
    source: str
    target: str
    bytes: int


@dataclass
class RebalancePlan:
    by: str
    before: dict[str, int]  # cluster -> shards or bytes
    after: dict[str, int]
    moves: list[PlannedMove]

    def steps(self) -> list[str]:
        unit = (lambda value: f"{value} shards") if self.by == "shards" else human_bytes
        steps = [
            f"move shard {move.shard} ({human_bytes(move.bytes)}) from {move.source} to {move.target}"
            for move in self.moves
        ]
        return steps + [
            "then: "
            + ", ".join(
                f"{cluster} {unit(self.before[cluster])} -> {unit(self.after[cluster])}" for cluster in self.before
            )
        ]


def plan_rebalance(
    placement: dict[int, str],
    clusters: list[str],
    by: str = "shards",
    sizes: dict[int, int] | None = None,
    max_moves: int | None = None,
) -> RebalancePlan:
    """Greedy: while a move from the most to the least loaded cluster narrows the gap between
    them, make the one that narrows it most (ties: the smaller shard, then the lower id). Each
    move lowers the sum of squared loads, so this ends; each shard moves at most once."""
    if by not in ("shards", "bytes"):
        raise UsageError(f"cannot balance by {by!r}", "use --by shards or --by bytes")
    sizes = sizes or {}
    weight: Callable[[int], int] = (lambda shard: 1) if by == "shards" else (lambda shard: sizes.get(shard, 0))
    load = {cluster: 0 for cluster in clusters}
    members: dict[str, set[int]] = {cluster: set() for cluster in clusters}
    for shard, cluster in placement.items():
        load.setdefault(cluster, 0)
        members.setdefault(cluster, set()).add(shard)
        load[cluster] += weight(shard)
    before = dict(load)
    moves: list[PlannedMove] = []
    moved: set[int] = set()
    while clusters and (max_moves is None or len(moves) < max_moves):
        busiest = max(clusters, key=lambda cluster: (load[cluster], cluster))
        idlest = min(clusters, key=lambda cluster: (load[cluster], cluster))
        gap = load[busiest] - load[idlest]
        best = None
        for shard in members[busiest] - moved:
            amount = weight(shard)
            narrowed = abs((load[busiest] - amount) - (load[idlest] + amount))
            if amount > 0 and narrowed < gap:
                key = (narrowed, sizes.get(shard, 0), shard)
                if best is None or key < best[0]:
                    best = (key, shard, amount)
        if best is None:
            break
        _, shard, amount = best
        members[busiest].discard(shard)
        members[idlest].add(shard)
        load[busiest] -= amount
        load[idlest] += amount
        moved.add(shard)
        moves.append(PlannedMove(shard, busiest, idlest, sizes.get(shard, 0)))
    return RebalancePlan(by, before, dict(load), moves)


def rebalance_plan_for(fleet: Fleet, by: str = "shards", max_moves: int | None = None) -> RebalancePlan:
    with directory_session(fleet) as directory:
        active = Journal(directory).active()
    if active:
        raise RefusedError(
            "unfinished moves: " + ", ".join(f"{record.id} (shard {record.logical_shard})" for record in active),
            "finish them with --resume or --abort before rebalancing",
        )
    current = read_map(fleet, sizes=True)
    unreachable = [load.cluster for load in current.clusters if load.bytes is None]
    if unreachable:
        raise IgopsError(f"cannot measure {', '.join(unreachable)}", "every cluster must answer to plan a rebalance")
    return plan_rebalance(current.placement(), list(fleet.model.postgres.clusters), by, current.sizes(), max_moves)


@dataclass
class RebalanceResult:
    planned: int
    results: list[MoveResult]
    failed: str | None


def run_rebalance(fleet: Fleet, plan: RebalancePlan, reporter: Reporter | None = None) -> RebalanceResult:
    """The planned moves one at a time with the move code itself; stops at the first failure.
    Run as an operation, it leases every cluster, so no move of another operator overlaps it."""
    reporter = reporter or Reporter()
    results: list[MoveResult] = []
    for number, move in enumerate(plan.moves, 1):
        reporter.log(f"rebalance {number}/{len(plan.moves)}: shard {move.shard} {move.source} -> {move.target}")
        try:
            move_plan = plan_move(fleet, move.shard, move.target)
            results.append(start_move(fleet, move_plan, reporter))
        except IgopsError as exc:
            return RebalanceResult(len(plan.moves), results, f"shard {move.shard}: {exc.one_line()}")
    return RebalanceResult(len(plan.moves), results, None)
