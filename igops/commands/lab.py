"""`igops lab`: the rehearsal fleet on this machine."""

from __future__ import annotations

import typer

from igops import lab
from igops.commands.common import JSON_OPTION, command, exit_with
from igops.errors import ExitCode
from igops.lab import health
from igops.output import plural
from igops.tables import Column

# As `igops status` shows services: the endpoint (an address, a mount point) is the lab's
# fixed layout and gives way first at 80 columns; whether each answers, and why not, stays.
LAB_COLUMNS: list[Column | str] = [
    "component",
    "host",
    Column("endpoint", drop=1),
    "state",
    Column("detail", wrap=True),
]


def component_row(c: health.Component) -> list[str]:
    """A component's row in the table LAB_COLUMNS heads."""
    return [c.component, c.host, c.endpoint, "ok" if c.ok else "DOWN", c.detail]


# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


@app.command("up")
def up(
    ctx: typer.Context,
    repmgrd: bool = typer.Option(
        None,
        "--repmgrd/--no-repmgrd",
        help="Run repmgrd (automatic failover) on every Postgres node, or stop it. "
        "Default: as the last `lab up` left it (off at first).",
    ),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Build the lab, or repair and restart whatever part of it is missing (idempotent)."""

    with command(ctx, "lab up", json_flag) as out:
        report = lab.up(out, repmgrd=repmgrd)
        out.table(
            "lab",
            LAB_COLUMNS,
            [component_row(c) for c in report.components],
        )
        out.text(f"lab up in {report.duration_s:.1f} s; use it with:")
        out.text(f"export IGOPS_CONFIG={report.inventory}")
        out.finish(report)


@app.command("down")
def down(
    ctx: typer.Context,
    purge: bool = typer.Option(False, "--purge", help="Also delete the lab's state (volumes, keys, inventory)."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Stop every lab process, unmount its volumes and detach its loop devices."""

    with command(ctx, "lab down", json_flag) as out:
        report = lab.down(purge=purge, reporter=out)
        for problem in report.problems:
            out.text(f"problem: {problem}")
        out.text(
            f"lab down in {report.duration_s:.1f} s" + (" (state deleted)" if report.purged else "")
            if not report.problems
            else f"lab down left {plural(len(report.problems), 'problem')}"
        )
        code = ExitCode.FAILED if report.problems else ExitCode.OK
        out.finish(report, code)
        exit_with(code)


@app.command("status")
def status(ctx: typer.Context, json_flag: bool = JSON_OPTION) -> None:
    """Each lab component and whether it answers (changes nothing)."""

    with command(ctx, "lab status", json_flag) as out:
        report = health.status()
        out.table(
            f"lab at {report.state_dir}",
            LAB_COLUMNS,
            [component_row(c) for c in report.components],
        )
        problems = report.problems()
        if not report.running:
            out.text("the lab is down (igops lab up starts it)")
            code = ExitCode.PROBLEMS_FOUND
        elif problems:
            out.text(
                f"{len(problems)} of {plural(len(report.components), 'component')} "
                f"{'does' if len(problems) == 1 else 'do'} not answer"
            )
            code = ExitCode.PROBLEMS_FOUND
        else:
            out.text(
                f"{'the' if len(report.components) == 1 else 'all'} {plural(len(report.components), 'component')} "
                f"{'answers' if len(report.components) == 1 else 'answer'}; inventory: {report.inventory}"
            )
            code = ExitCode.OK
        out.finish(report, code)
        exit_with(code)
