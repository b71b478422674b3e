"""`igops ops`: the operations the team runs, from any machine: running, interrupted, their
journals and the audit trail, and resume or abort of an interrupted one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from igops import operations_view
from igops.commands.common import (
    DRY_RUN_OPTION,
    JSON_OPTION,
    WATCH_OPTION,
    YES_OPTION,
    command,
    load_fleet,
    mutate,
    present,
)
from igops.errors import ExitCode, UsageError
from igops.operations import conflicts
from igops.output import Output
from igops.tables import Column

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)

ID_ARGUMENT = typer.Argument(..., metavar="ID", help="An operation id, as igops ops list shows it.")
# The id is what a person pastes; the rest gives way at 80 columns, the least needed first. A
# status or result is a sentence once the operation ended ("switchover: db2 is the primary of
# main"), so it wraps.
LIST_COLUMNS: list[Column | str] = [
    "id",
    "kind",
    Column("targets", wrap=True),
    Column("status", wrap=True),
    Column("step", wrap=True, drop=2),
    Column("operator", drop=3),
    Column("started", drop=4),
    Column("reason", wrap=True, drop=1),
]
HISTORY_COLUMNS: list[Column | str] = [
    "time",
    Column("operator", drop=3),
    Column("operation", drop=4),
    Column("command", wrap=True),
    Column("targets", wrap=True, drop=2),
    Column("result", wrap=True),
    Column("exit", drop=5),
    Column("reason", wrap=True, drop=1),
]
# What a kind leases is said in words ("host HOST, and pg CLUSTER or redis when HOST is a member").
KINDS_COLUMNS: list[Column | str] = ["kind", Column("leases", wrap=True), "expected"]


def list_row(r: dict[str, Any]) -> list[Any]:
    """An operation's row in the table LIST_COLUMNS heads."""
    return [
        r["id"],
        r["kind"],
        r.get("targets"),
        f"{r['status']} (its abort failed)" if r.get("abort_failed") and r["status"] == "interrupted" else r["status"],
        _step(r),
        _operator(r),
        r.get("started"),
        r.get("reason"),
    ]


def history_row(r: dict[str, Any]) -> list[Any]:
    """An audit record's row in the table HISTORY_COLUMNS heads."""
    return [
        r.get("time"),
        f"{r.get('user')}@{r.get('host')}",
        r.get("operation"),
        r.get("command"),
        r.get("targets"),
        r.get("result"),
        r.get("exit_code"),
        r.get("reason"),
    ]


def _operator(record: dict[str, Any]) -> str:
    return f"{record.get('user')}@{record.get('host')} pid {record.get('pid')}"


def _step(record: dict[str, Any]) -> str | None:
    step = record.get("step")
    if not step:
        return None
    return (f"[{step['number']}] " if step.get("number") else "[pre] ") + str(step.get("title"))


@app.command("list")
def list_operations(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", "-a", help="Ended operations too, newest last."),
    json_flag: bool = JSON_OPTION,
    watch: float | None = WATCH_OPTION,
) -> None:
    """Operations running now and those interrupted (their holder died or lost its lease before
    they ended), from every machine that shares the coordinator."""

    with command(ctx, "ops list", json_flag) as out:
        fleet = load_fleet(ctx)

        def show() -> tuple[operations_view.OperationsView, int]:
            view = operations_view.list_operations(fleet, include_ended=all_)
            if view.stale:
                out.log(f"warning: the coordinator did not answer ({view.stale}); this is {view.stale_source()}")
            out.table(None, LIST_COLUMNS, [list_row(r) for r in view.records])
            if not view.records:
                out.text("no operation is running or interrupted" if not all_ else "no operation recorded")
            return view, ExitCode.OK

        present(out, show, watch)


@app.command("show")
def show(ctx: typer.Context, op_id: str = ID_ARGUMENT, json_flag: bool = JSON_OPTION) -> None:
    """One operation: its plan, every journal entry with timings, the operator and the reason."""

    with command(ctx, "ops show", json_flag) as out:
        fleet = load_fleet(ctx)
        record, entries = operations_view.show(fleet, op_id)
        out.text(f"{record['id']}: {record.get('title')}")
        out.text(
            f"  {record['kind']} on {', '.join(record.get('targets') or [])} — {record['status']}"
            + (f" ({record.get('detail')})" if record.get("detail") else "")
        )
        out.text(
            f"  by {_operator(record)}, started {record.get('started')}"
            + (f", ended {record.get('ended')}" if record.get("ended") else "")
            + (f", reason: {record['reason']}" if record.get("reason") else "")
        )
        out.text(f"  command: {record.get('command')}")
        for number, line in enumerate(record.get("plan") or [], 1):
            out.text(f"  {number}. {line}")
        out.table(
            None,
            [
                Column("time", drop=2),
                "event",
                "step",
                Column("title", wrap=True),
                "status",
                Column("duration", drop=1),
                Column("detail", wrap=True, drop=3),
            ],
            [
                [
                    e.get("time"),
                    e.get("event"),
                    e.get("step"),
                    e.get("title"),
                    e.get("status") or e.get("result"),
                    f"{e['duration_ms']:.0f} ms" if e.get("duration_ms") is not None else None,
                    e.get("detail"),
                ]
                for e in entries
            ],
        )
        out.finish({"operation": record, "journal": entries})


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1] in units:
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration nor a time", "give e.g. 90m, 12h, 7d, or 2026-12-01T08:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command("history")
def history(
    ctx: typer.Context,
    since: str | None = typer.Option(
        None, "--since", metavar="WHEN", help="Only records since then: a duration back (90m, 12h, 7d) or a time."
    ),
    target: str | None = typer.Option(None, "--target", metavar="NAME", help="Only records naming this target."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many records, the newest."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """The team's audit trail: who ran what, when, why, and how it ended."""

    with command(ctx, "ops history", json_flag) as out:
        fleet = load_fleet(ctx)
        records = operations_view.history(fleet, _since(since), target, limit)
        out.table(None, HISTORY_COLUMNS, [history_row(r) for r in records])
        out.finish({"records": records})


def _continue(ctx: typer.Context, out: Output, name: str, op_id: str, dry_run: bool, yes: bool) -> None:
    fleet = load_fleet(ctx)
    with out.step(f"read operation {op_id} and plan its {name}"):
        record, continuation = operations_view.plan_continuation(fleet, op_id, name)
    for line in continuation.not_undone:
        out.log(f"not undone by the abort (no undo exists): {line}")
    result = mutate(
        out,
        fleet,
        kind=continuation.spec.kind,
        resources=continuation.spec.resources,
        targets=continuation.spec.targets,
        title=continuation.spec.title,
        steps=continuation.spec.steps,
        notes=continuation.notes,
        dry_run=dry_run,
        yes=yes,
        action=continuation.apply,
        params=continuation.spec.params,
        outcome=lambda _: ("resumed and ended" if name == "resume" else "aborted", 0),
        resume={**record, "continued_by": name},
    )
    out.finish(
        {
            "dry_run": dry_run,
            "operation": op_id,
            "plan": continuation.spec.steps,
            "not_undone": continuation.not_undone,
            "result": result,
        }
    )


@app.command("resume")
def resume(
    ctx: typer.Context,
    op_id: str = ID_ARGUMENT,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Continue an interrupted operation: plan it again from its journal and the live state, and
    run that plan under the same id. Refused while its original holder is alive."""
    with command(ctx, "ops resume", json_flag) as out:
        _continue(ctx, out, "resume", op_id, dry_run, yes)


@app.command("abort")
def abort(
    ctx: typer.Context,
    op_id: str = ID_ARGUMENT,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Undo an interrupted operation's undoable steps (release what it paused, undo what it
    changed before its point of no return) and name every step it could not undo."""
    with command(ctx, "ops abort", json_flag) as out:
        _continue(ctx, out, "abort", op_id, dry_run, yes)


@app.command("kinds")
def kinds(ctx: typer.Context, json_flag: bool = JSON_OPTION) -> None:
    """The conflict table: what each kind of operation leases (two conflict when they share a
    resource) and how long it is expected to take."""

    with command(ctx, "ops kinds", json_flag) as out:
        rows = conflicts.table_rows()
        out.table(None, KINDS_COLUMNS, [list(row) for row in rows])
        out.finish({"kinds": [{"kind": k, "leases": leases, "expected": e} for k, leases, e in rows]})
