"""`igops shard`: Instagram ids, the logical shard map, and online shard moves."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

import typer

from igops import shards
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, exit_with, load_fleet, mutate
from igops.errors import ExitCode, UsageError
from igops.operations import conflicts
from igops.output import human_bytes, plural
from igops.tables import Column

if TYPE_CHECKING:
    from igops.shard_move import MoveResult
    from igops.shard_verify import ShapeReport, VerifyReport

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)
id_app = typer.Typer(
    help="The 64-bit ids: 41 bits of ms since 2011-08-24 21:07:01.721 UTC, 13 of logical shard, 10 of sequence.",
    no_args_is_help=True,
)
app.add_typer(id_app, name="id")


class Balance(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member (its value, not Class.member)
    shards = "shards"
    bytes = "bytes"


# The points a move can stop at (--pause-after), as shards.PAUSE_POINTS names them: a value each.
PausePoint = Enum("PausePoint", {point: point for point in shards.PAUSE_POINTS}, type=str)  # type: ignore[misc]  # members from a tuple mypy cannot read


# Built once from the enum, so that the help names every point the move can stop at.
PAUSE_AFTER_HELP = (
    "Runbook rehearsal: stop after STEP and wait to be killed, to practise --resume and --abort. "
    "STEP: " + ", ".join(point.value for point in PausePoint) + "."
)


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f} ms"


# --- ids --------------------------------------------------------------------------------------
@id_app.command("decode")
def id_decode(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(..., metavar="ID...", help="One or more ids."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Time (UTC), logical shard and sequence of each id."""

    with command(ctx, "shard id decode", json_flag) as out:
        decoded = [shards.decode_id(value) for value in ids]
        out.table(
            None,
            ["id", "time (UTC)", "shard", "sequence"],
            [[item.id, item.time, item.shard, item.sequence] for item in decoded],
        )
        out.finish({"ids": decoded})


@id_app.command("encode")
def id_encode(
    ctx: typer.Context,
    time_text: str = typer.Option(
        ..., "--time", "-t", metavar="T", help="ISO 8601 (no zone means UTC) or Unix milliseconds."
    ),
    shard: int = typer.Option(..., "--shard", "-s", help="Logical shard, 0..8191."),
    sequence: int = typer.Option(0, "--seq", "-n", help="Sequence, 0..1023 (next_id() keeps nextval % 1024)."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """The id that a shard's next_id() returns at time T with sequence N."""

    with command(ctx, "shard id encode", json_flag) as out:
        value = shards.encode_id(shards.parse_time(time_text), shard, sequence)
        decoded = shards.decode_id(value)
        out.text(str(value))
        out.finish(decoded)


# --- the map ----------------------------------------------------------------------------------
@app.command("map")
def show_map(
    ctx: typer.Context,
    every_shard: bool = typer.Option(False, "--shards", help="Also list every shard with its bytes."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Logical -> physical: the map's version, and shards and bytes per cluster."""

    with command(ctx, "shard map", json_flag) as out:
        fleet = load_fleet(ctx)
        current = shards.read_map(fleet)
        out.table(
            f"shard map version {current.version} (updated {current.updated_at})",
            [
                "cluster",
                "primary",
                Column("pgbouncer db", drop=2),
                Column("shards", drop=3),
                Column("logical shards", wrap=True),
                Column("bytes", drop=1),
                Column("problem", wrap=True),
            ],
            [
                [
                    load.cluster,
                    load.primary,
                    load.pgbouncer_database,
                    len(load.shards),
                    shards.shard_ranges(load.shards),
                    human_bytes(load.bytes) if load.bytes is not None else None,
                    load.error,
                ]
                for load in current.clusters
            ],
        )
        missing = [item for item in current.shards if item.present is False]
        if every_shard:
            out.table(
                None,
                ["shard", "schema", "cluster", "bytes"],
                [
                    [item.shard, item.schema, item.cluster, human_bytes(item.bytes) if item.present else "MISSING"]
                    for item in current.shards
                ],
            )
        if missing:
            out.text(
                f"{plural(len(missing), 'shard')} {'has' if len(missing) == 1 else 'have'} no schema "
                "where the map places them: " + ", ".join(f"{item.schema} on {item.cluster}" for item in missing)
            )
        problems = missing or any(load.error for load in current.clusters)
        code = ExitCode.PROBLEMS_FOUND if problems else ExitCode.OK
        out.finish(current, code)
        exit_with(code)


@app.command("init")
def init(
    ctx: typer.Context,
    count: int | None = typer.Option(
        None, "--count", min=1, max=8192, help="Logical shards (default: [shards] count in the inventory)."
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Create the directory and every logical shard's schema (tables, sequence, next_id()) on the
    cluster the map assigns it; seed an even map if there is none. Idempotent."""

    with command(ctx, "shard init", json_flag) as out:
        fleet = load_fleet(ctx)
        with out.step("read the clusters and the directory"):
            plan = shards.plan_init(fleet, count)
        report = mutate(
            out,
            fleet,
            kind="shard-init",
            resources=conflicts.every_cluster(fleet),
            targets=list(fleet.model.postgres.clusters),
            title=f"Initialise {plan.count} logical shards",
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: shards.init_shards(fleet, reporter, plan.count),
            outcome=lambda r: (f"shard map version {r.map_version}", 0),
        )
        if report is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(
            None,
            ["cluster", "shards", Column("logical shards", wrap=True)],
            [[name, len(ids), shards.shard_ranges(ids)] for name, ids in report.shards_by_cluster.items()],
        )
        out.finish(report)


# --- moves ------------------------------------------------------------------------------------
def _move_row(result: MoveResult) -> list[Any]:
    return [
        result.move_id,
        result.shard,
        f"{result.source} -> {result.target}",
        result.status,
        f"{result.rows_copied:,}" if result.rows_copied is not None else None,
        human_bytes(result.bytes_copied),
        _ms(result.verify_pause_ms),
        _ms(result.write_block_ms),
        result.map_version,
        f"{result.duration_ms / 1000:.1f} s",
    ]


MOVE_COLUMNS: list[Column | str] = [
    "move",
    "shard",
    "from -> to",
    Column("status", wrap=True),
    Column("rows", drop=3),
    Column("bytes", drop=4),
    Column("verify pause", drop=5),
    Column("writes blocked", drop=2),
    Column("map version", drop=6),
    Column("time", drop=1),
]


@app.command("move")
def move(
    ctx: typer.Context,
    shard: int | None = typer.Argument(None, min=0, help="The logical shard to move."),
    to: str | None = typer.Option(None, "--to", help="The cluster to move it to."),
    resume: int | None = typer.Option(None, "--resume", metavar="ID", help="Finish an interrupted move."),
    abort: int | None = typer.Option(
        None, "--abort", metavar="ID", help="Roll back a move that has not switched the map."
    ),
    pause_after: PausePoint | None = typer.Option(None, "--pause-after", metavar="STEP", help=PAUSE_AFTER_HELP),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Move a shard online: copy by logical replication, catch up, verify, cut over behind a brief
    write lock, switch the map, fence and drop the old copy. Journaled: see `igops shard moves`."""

    with command(ctx, "shard move", json_flag) as out:
        chosen = [
            name
            for name, value in (
                ("SHARD --to", shard is not None or to is not None),
                ("--resume", resume is not None),
                ("--abort", abort is not None),
            )
            if value
        ]
        if len(chosen) != 1:
            raise UsageError("give SHARD --to CLUSTER, or --resume ID, or --abort ID", "exactly one of them")
        fleet = load_fleet(ctx)
        pause = pause_after.value if pause_after else None
        if abort is not None:
            abort_plan = shards.plan_abort(fleet, abort)
            record = mutate(
                out,
                fleet,
                kind="shard-move",
                resources=shards.move_resources(abort_plan.shard, abort_plan.source, abort_plan.target),
                targets=[f"shard {abort_plan.shard}", abort_plan.source, abort_plan.target],
                title=f"Abort move {abort_plan.move_id} of shard {abort_plan.shard} "
                f"({abort_plan.source} -> {abort_plan.target}, at {abort_plan.step})",
                steps=abort_plan.steps(),
                dry_run=dry_run,
                yes=yes,
                action=lambda reporter: shards.abort_move(fleet, abort_plan, reporter),
                outcome=lambda r: (f"move {r.id} aborted", 0),
                params={"move": abort},
            )
            if record is None:
                out.finish({"dry_run": dry_run, "plan": abort_plan})
                return
            out.text(f"move {record.id} aborted: shard {record.logical_shard} stays on {record.source}")
            out.finish(record)
            return
        if resume is not None:
            plan, record = shards.plan_resume(fleet, resume)
            title = (
                f"Resume move {record.id} of shard {record.logical_shard} ({record.source} -> {record.target}) "
                f"after {record.step}"
            )
            action = lambda reporter: shards.resume_move(fleet, resume, reporter, pause)  # noqa: E731
        else:
            if to is None or shard is None:
                raise UsageError("a move needs SHARD and --to CLUSTER")
            with out.step(f"check shard {shard}, {to} and the way between them"):
                plan = shards.plan_move(fleet, shard, to)
            title = f"Move shard {plan.shard} ({plan.schema}) from {plan.source} to {plan.target}"
            action = lambda reporter: shards.start_move(fleet, plan, reporter, pause)  # noqa: E731
        result = mutate(
            out,
            fleet,
            kind="shard-move",
            resources=shards.move_resources(plan.shard, plan.source, plan.target),
            targets=[f"shard {plan.shard}", plan.source, plan.target],
            title=title,
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=action,
            params={"move": resume} if resume is not None else {},
            outcome=lambda r: (f"move {r.move_id} {r.status}, writes blocked {r.write_block_ms} ms", 0),
        )
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(None, MOVE_COLUMNS, [_move_row(result)])
        out.finish(result)


@app.command("moves")
def moves(
    ctx: typer.Context,
    shard: int | None = typer.Option(None, "--shard", min=0, help="Only this shard's moves."),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many, newest first."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """The move journal: every move's step, state and timings; unfinished ones first to act on."""

    with command(ctx, "shard moves", json_flag) as out:
        fleet = load_fleet(ctx)
        records = shards.list_moves(fleet, limit, shard)
        out.table(
            f"{len(records)} shard moves",
            [
                "move",
                "shard",
                "from -> to",
                "state",
                Column("step", wrap=True),
                Column("started (UTC)", drop=1),
                Column("updated", drop=4),
                Column("writes blocked", drop=3),
                Column("map version", drop=5),
                Column("WAL held", drop=2),
                Column("error", wrap=True),
            ],
            [
                [
                    r.id,
                    r.logical_shard,
                    f"{r.source} -> {r.target}",
                    r.state,
                    r.step,
                    r.started_at,
                    r.updated_at,
                    _ms(r.write_block_ms),
                    r.map_version,
                    human_bytes(r.retained_wal_bytes) if r.retained_wal_bytes is not None else None,
                    r.error,
                ]
                for r in records
            ],
        )
        stuck = [r for r in records if r.state in ("interrupted", "failed")]
        for record in stuck:
            out.text(
                f"move {record.id} is {record.state} at {record.step}: igops shard move --resume {record.id} "
                f"(or --abort {record.id})"
            )
        out.finish({"moves": records})


@app.command("verify")
def verify(
    ctx: typer.Context,
    shard: int = typer.Argument(..., min=0, help="The logical shard."),
    against: str | None = typer.Option(
        None,
        "--against",
        metavar="CLUSTER",
        help="Compare with the copy on this cluster (during a move, both are read at one point of the stream).",
    ),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Per-table row counts and ordered checksums, sequence values and a schema diff: against the
    shard DDL, or against another copy."""

    with command(ctx, "shard verify", json_flag) as out:
        fleet = load_fleet(ctx)
        report: ShapeReport | VerifyReport
        if against is None:
            report = shards.verify_in_place(fleet, shard)
            out.table(
                f"shard {shard}: {report.copy}",
                ["table", "rows", "md5"],
                [[check.table, check.rows[report.copy], check.checksum[report.copy]] for check in report.tables],
            )
            out.table(None, ["sequence", "last value"], [[name, value] for name, value in report.sequences.items()])
        else:
            with out.step(f"compare shard {shard} with its copy on {against}"):
                report = shards.verify_against(fleet, shard, against, out)
            left, right = report.copies
            out.table(
                f"shard {shard}: {left} vs {right}" + ("" if report.consistent else " (read as they are)"),
                ["table", f"rows {left}", f"rows {right}", "equal", Column("first difference", wrap=True)],
                [
                    [check.table, check.rows[left], check.rows[right], check.equal, check.first_difference]
                    for check in report.tables
                ],
            )
            out.table(
                None,
                ["copy", Column("sequences", wrap=True)],
                [
                    [copy, ", ".join(f"{name} {value}" for name, value in seqs.items())]
                    for copy, seqs in report.sequences.items()
                ],
            )
        for line in report.schema_diff:
            out.text(f"schema: {line}")
        out.text("equal" if report.equal else "DIFFERENT")
        code = ExitCode.OK if report.equal else ExitCode.PROBLEMS_FOUND
        out.finish(report, code)
        exit_with(code)


@app.command("rebalance")
def rebalance(
    ctx: typer.Context,
    by: Balance = typer.Option(Balance.shards, "--by", help="Even out the number of shards or their bytes."),
    max_moves: int | None = typer.Option(None, "--max-moves", min=1, help="Plan at most this many moves."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Plan the moves that even out the clusters, then run them one at a time (each one a full
    online move); stops at the first failure."""

    with command(ctx, "shard rebalance", json_flag) as out:
        fleet = load_fleet(ctx)
        with out.step(f"measure the clusters and plan by {by.value}"):
            plan = shards.rebalance_plan_for(fleet, by.value, max_moves)
        if not plan.moves:
            out.text("balanced: nothing to move")
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        # Every cluster is leased for the whole rebalance, so no single move needs a lease of its own.
        result = mutate(
            out,
            fleet,
            kind="shard-rebalance",
            resources=conflicts.every_cluster(fleet),
            targets=list(plan.before),
            title=f"Rebalance by {by.value}: {plural(len(plan.moves), 'move')}",
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: shards.run_rebalance(fleet, plan, reporter),
            outcome=lambda r: (
                f"{len(r.results)} of {plural(r.planned, 'move')} done" + (f"; {r.failed}" if r.failed else ""),
                0 if not r.failed else int(ExitCode.PARTIAL if r.results else ExitCode.FAILED),
            ),
        )
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(None, MOVE_COLUMNS, [_move_row(item) for item in result.results])
        if result.failed:
            out.text(f"stopped: {result.failed}")
        code = ExitCode.OK if not result.failed else (ExitCode.PARTIAL if result.results else ExitCode.FAILED)
        out.finish(result, code)
        exit_with(code)
