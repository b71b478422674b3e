"""Logical shards: schemas on the physical Postgres clusters, placed by the directory. This
module is the capability's public entry: the plan and apply functions, and their types, that
`igops shard`, the lab, the tests and other callers use. Each lives in the module that owns it:

- `shard_ids`: the service's 64-bit ids (creation time, logical shard, sequence).
- `shard_init`: `plan_init` and `init_shards` create a fleet's directory and shard schemas from
  the service's own DDL, idempotently; an existing shard map is kept as it is.
- `shard_map`: `read_map`, which cluster holds each logical shard and how many bytes; the
  directory's connections; `check_shard`.
- `shard_schema`: a schema's shape and the differences between two; the shard DDL.
- `shard_verify`: `verify_in_place` and `verify_against`, two copies of a shard compared table by
  table (ordered checksums, or a cheaper order-free row hash while a move waits on it).
- `shard_move`: `plan_move`, `start_move`, `resume_move`, `plan_abort`, `abort_move`,
  `list_moves`. A shard is copied by logical replication, caught up, verified, cut over behind a
  brief write lock and switched in the map; every step is journaled in the directory
  (`shard_journal`, the `shard_moves` table) and idempotent, so a move killed at any point can be
  resumed or aborted. Its steps are described in `shard_move_steps` and done in `shard_copy`,
  `shard_replication`, `shard_locks` and `shard_cutover`, sharing a `shard_move_session`.
- `shard_rebalance`: `plan_rebalance`, the moves that even out shards or bytes across clusters,
  and `run_rebalance`.
"""

from __future__ import annotations

from igops.shard_ids import DecodedId, decode_id, encode_id, parse_time, shard_ranges
from igops.shard_init import InitPlan, ShardInitReport, init_shards, plan_init
from igops.shard_journal import MoveRecord
from igops.shard_map import ClusterLoad, ShardMap, ShardPlacement, check_shard, read_map
from igops.shard_move import (
    MoveResult,
    abort_move,
    list_moves,
    move_resources,
    plan_abort,
    plan_move,
    plan_resume,
    resume_move,
    start_move,
)
from igops.shard_move_steps import PAUSE_POINTS, STEPS, AbortPlan, MovePlan, TableSize, resume_point
from igops.shard_rebalance import (
    PlannedMove,
    RebalancePlan,
    RebalanceResult,
    plan_rebalance,
    rebalance_plan_for,
    run_rebalance,
)
from igops.shard_verify import ShapeReport, TableCheck, VerifyReport, verify_against, verify_in_place

__all__ = [
    "PAUSE_POINTS",
    "STEPS",
    "AbortPlan",
    "ClusterLoad",
    "DecodedId",
    "InitPlan",
    "MovePlan",
    "MoveRecord",
    "MoveResult",
    "PlannedMove",
    "RebalancePlan",
    "RebalanceResult",
    "ShapeReport",
    "ShardInitReport",
    "ShardMap",
    "ShardPlacement",
    "TableCheck",
    "TableSize",
    "VerifyReport",
    "abort_move",
    "check_shard",
    "decode_id",
    "encode_id",
    "init_shards",
    "list_moves",
    "move_resources",
    "parse_time",
    "plan_abort",
    "plan_init",
    "plan_move",
    "plan_rebalance",
    "plan_resume",
    "read_map",
    "rebalance_plan_for",
    "resume_move",
    "resume_point",
    "run_rebalance",
    "shard_ranges",
    "start_move",
    "verify_against",
    "verify_in_place",
]
