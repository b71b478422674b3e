"""Shard planning without a fleet: the rebalance planner (property-tested), the move's steps and
where a resumed move picks up, journal states, schema differences and the initial layout."""

import pytest
from hypothesis import given, settings, strategies as st

from igops import shard_init, shard_schema, shards
from igops.commands.shard import PausePoint
from igops.errors import UsageError
from igops.output import human_bytes


@st.composite
def layouts(draw):
    clusters = draw(st.lists(st.sampled_from(["main", "pg2", "pg3", "pg4"]), min_size=1, max_size=4, unique=True))
    count = draw(st.integers(min_value=0, max_value=64))
    placement = {shard: draw(st.sampled_from(clusters)) for shard in range(count)}
    sizes = {shard: draw(st.integers(min_value=0, max_value=10_000_000)) for shard in range(count)}
    return clusters, placement, sizes


def apply(placement, moves):
    result = dict(placement)
    for move in moves:
        assert result[move.shard] == move.source
        result[move.shard] = move.target
    return result


def counts(placement, clusters):
    return {cluster: sum(1 for where in placement.values() if where == cluster) for cluster in clusters}


@given(layouts())
@settings(max_examples=300)
def test_by_shards_evens_out_to_one_and_moves_each_shard_once(layout):
    clusters, placement, _ = layout
    plan = shards.plan_rebalance(placement, clusters, "shards")
    after = apply(placement, plan.moves)
    loads = counts(after, clusters)
    assert max(loads.values()) - min(loads.values()) <= 1
    assert loads == plan.after and counts(placement, clusters) == plan.before
    moved = [move.shard for move in plan.moves]
    assert len(moved) == len(set(moved))
    assert all(move.source != move.target for move in plan.moves)
    assert shards.plan_rebalance(after, clusters, "shards").moves == []


@given(layouts())
@settings(max_examples=300)
def test_by_bytes_never_widens_the_gap_and_stops_where_no_move_helps(layout):
    clusters, placement, sizes = layout
    plan = shards.plan_rebalance(placement, clusters, "bytes", sizes)
    after = apply(placement, plan.moves)

    def load(where):
        return {cluster: sum(sizes[s] for s, c in where.items() if c == cluster) for cluster in clusters}

    before_gap = max(load(placement).values()) - min(load(placement).values())
    after_loads = load(after)
    assert after_loads == plan.after
    assert max(after_loads.values()) - min(after_loads.values()) <= before_gap
    assert sum(after_loads.values()) == sum(load(placement).values())
    busiest = max(clusters, key=lambda c: (after_loads[c], c))
    idlest = min(clusters, key=lambda c: (after_loads[c], c))
    gap = after_loads[busiest] - after_loads[idlest]
    moved = {move.shard for move in plan.moves}
    for shard, cluster in after.items():
        if cluster == busiest and shard not in moved and sizes[shard] > 0:
            assert abs(gap - 2 * sizes[shard]) >= gap


def test_lab_layout_after_one_move_plans_one_move_back():
    placement = shard_init.even_placement(["main", "pg2"], 16)
    assert placement == {**{s: "main" for s in range(8)}, **{s: "pg2" for s in range(8, 16)}}
    placement[3] = "pg2"
    plan = shards.plan_rebalance(placement, ["main", "pg2"], "shards", {s: 1000 + s for s in range(16)})
    assert [(m.source, m.target) for m in plan.moves] == [("pg2", "main")]
    assert plan.moves[0].shard == 3  # the smallest shard that evens it out
    assert plan.steps()[-1] == "then: main 7 shards -> 8 shards, pg2 9 shards -> 8 shards"
    assert shards.plan_rebalance(placement, ["main", "pg2"], "shards", max_moves=0).moves == []
    with pytest.raises(UsageError):
        shards.plan_rebalance(placement, ["main", "pg2"], "rows")


def plan(resume_after=None, move_id=None):
    return shards.MovePlan(
        5,
        "insta5",
        "main",
        "pg2",
        "db1",
        "db3",
        "instagram",
        [shards.TableSize("photos", 1000, 81920), shards.TableSize("users", 10, 8192)],
        1 << 20,
        move_id,
        resume_after,
    )


def test_a_new_move_plans_every_step_in_order():
    fresh = plan()
    assert fresh.remaining() == list(shards.STEPS)
    steps = fresh.steps()
    assert len(steps) == len(shards.STEPS)
    assert "igops_move_<id>" in steps[2] and "FOR TABLES IN SCHEMA insta5" in steps[2]
    assert "~1,010 rows, 88.0 KiB" in steps[3]
    assert "IN EXCLUSIVE MODE" in steps[7] and "512 past" in steps[7] and "insta5_moved_<id>" in steps[7]
    assert "version + 1" in steps[7]


@pytest.mark.parametrize("done", shards.STEPS[:-1])
def test_a_resumed_move_picks_up_after_its_last_step(done):
    resumed = plan(resume_after=done, move_id=42)
    remaining = resumed.remaining()
    assert remaining == list(shards.STEPS[shards.STEPS.index(done) + 1 :])
    assert remaining[-1] == "cleaned"
    assert all("<id>" not in step for step in resumed.steps())
    assert "igops_move_42" in resumed.steps()[-1] and "insta5_moved_42" in resumed.steps()[-1]


def test_pause_points_cover_every_step_and_both_cut_over_moments():
    assert [point.value for point in PausePoint] == list(shards.PAUSE_POINTS)
    assert set(shards.STEPS[:-1]) <= set(shards.PAUSE_POINTS)
    order = shards.PAUSE_POINTS
    assert order.index("verified") < order.index("locked") < order.index("fenced") < order.index("switched")


def record(**changes):
    values = dict(
        id=7,
        logical_shard=5,
        schema_name="insta5",
        source="main",
        target="pg2",
        step="copied",
        status="active",
        started_at="",
        updated_at="",
        finished_at=None,
        started_by="",
        source_lsn=None,
        source_sequence=None,
        target_sequence=None,
        map_version=None,
        rows_copied=None,
        bytes_copied=None,
        verify_pause_ms=None,
        lock_wait_ms=None,
        write_block_ms=None,
        error=None,
        history=[],
    )
    values.update(changes)
    return shards.MoveRecord(**values)


def test_journal_states_read_from_status_lock_and_error():
    assert record(running=True).state == "running"
    assert record(running=False).state == "interrupted"
    assert record(running=False, error="boom").state == "failed"
    assert record(status="done", running=False).state == "done"
    assert record(status="aborted").state == "aborted"
    assert record().slot == "igops_move_7" and record().fenced_schema == "insta5_moved_7"


def shape(tables, sequences=("table_id_seq",), functions=("next_id()",)):
    return shard_schema.SchemaShape(
        {
            name: shard_schema.TableShape(name, tuple(columns), tuple(key), tuple(indexes))
            for name, (columns, key, indexes) in tables.items()
        },
        sequences,
        functions,
    )


USERS = ([("id", "bigint", True), ("username", "text", True)], ["id"], ["CREATE UNIQUE INDEX users_pkey ON users"])


def test_schema_diff_names_every_difference():
    source = shape({"users": USERS, "extra": ([("id", "bigint", True)], ["id"], [])})
    target = shape(
        {"users": ([("id", "bigint", True), ("username", "character varying", True)], ["id"], [])},
        sequences=(),
        functions=("next_id()",),
    )
    diff = shard_schema.schema_diff(source, target, "main", "pg2")
    assert "pg2 lacks table extra" in diff
    assert any(line.startswith("users: columns differ") and "character varying" in line for line in diff)
    assert "pg2 lacks index on users: CREATE UNIQUE INDEX users_pkey ON users" in diff
    assert "pg2 lacks sequence table_id_seq" in diff
    assert shard_schema.schema_diff(source, source, "main", "pg2") == []


def test_init_plan_describes_seeding_or_keeping_the_map():
    placement = shard_init.even_placement(["main", "pg2"], 16)
    seeding = shards.InitPlan(
        "main/directory", 16, ["pg2/instagram"], None, placement, {"main": [], "pg2": list(range(8, 16))}
    )
    steps = seeding.steps()
    assert steps[0] == "create database pg2/instagram"
    assert "seed the shard map with 16 shards (main: 0-7; pg2: 8-15) as version 1" in steps
    assert steps[-1].endswith("new: 8-15")
    keeping = shards.InitPlan("main/directory", 16, [], 4, placement, {"main": [], "pg2": []})
    assert any(step.startswith("keep the shard map (version 4") for step in keeping.steps())


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_bytes(None) == "-"
