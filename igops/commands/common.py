"""What every command shares: global options, error-to-exit-code handling, and the
confirm → lock → act → audit sequence of mutating commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from igops.commands.options import WATCH_DEFAULT_SECONDS, GlobalOptions, TableFormat
from igops.errors import ExitCode, IgopsError, UsageError
from igops.output import Output, Reporter

if TYPE_CHECKING:
    from typer._click.core import Context as ClickContext

    from igops.inventory import Fleet

T = TypeVar("T")

JSON_OPTION = typer.Option(False, "--json", help="Only a JSON envelope on stdout.")


def _shows_plan(ctx: typer.Context, value: bool) -> bool:
    """Every command with --dry-run shows a plan: mark it, so its steps are numbered as the plan."""
    ctx.meta["igops.shows_plan"] = True
    return value


DRY_RUN_OPTION = typer.Option(False, "--dry-run", callback=_shows_plan, help="Print the exact plan and change nothing.")
YES_OPTION = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (required when not on a terminal).")


WATCH_OPTION = typer.Option(
    None,
    "--watch",
    metavar="[SECONDS]",
    min=0.1,
    max=86400,
    help=f"Show it again every SECONDS (default {WATCH_DEFAULT_SECONDS}) until Ctrl-C; "
    "with --json, one envelope per line each time.",
)


def options(ctx: ClickContext) -> GlobalOptions:
    return ctx.obj if isinstance(ctx.obj, GlobalOptions) else GlobalOptions()


@contextmanager
def command(ctx: typer.Context, name: str, json_flag: bool = False, nagios: bool = False) -> Iterator[Output]:
    """Run a command body: IgopsErrors become a one-line message and their exit code. `nagios`:
    stdout is a Nagios status line (`check --nagios`)."""
    opts = options(ctx)
    out = Output(
        name,
        json_mode=opts.json or json_flag,
        verbose=opts.verbose,
        table_format=TableFormat(opts.format).value,
        wide=opts.wide,
        nagios=nagios,
    )
    out.shows_plan = bool(ctx.meta.get("igops.shows_plan"))
    try:
        yield out
    except IgopsError as exc:
        problems = [str(problem) for problem in getattr(exc, "problems", [])]
        if len(problems) > 1:
            for problem in problems:
                out.err.print(f"  {problem}", markup=False)
        code = exc.exit_code
        if code == ExitCode.FAILED and out.shows_plan and not out.plan_shown:
            # A mutating command changes nothing before its plan is shown: a failure while
            # planning (a host that does not answer, a state that cannot be read) left nothing
            # touched, which is what 3 says, not "ran and failed".
            code = ExitCode.REFUSED
        out.fail(exc.one_line(), code, {"message": exc.message, "hint": exc.hint, "problems": problems}, exc.data)
        raise typer.Exit(int(code)) from None
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        out.fail("interrupted", ExitCode.INTERRUPTED, {"message": "interrupted"})
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one line and an exit code
        import traceback

        if opts.verbose:
            out.err.print(traceback.format_exc(), markup=False)
        line = f"unexpected {type(exc).__name__}: {exc}"
        out.fail(
            line + ("" if opts.verbose else " (rerun with --verbose for the traceback)"),
            ExitCode.FAILED,
            {"message": line},
        )
        raise typer.Exit(int(ExitCode.FAILED)) from None


def present(out: Output, show: Callable[[], tuple[Any, int]], watch: float | None = None) -> None:
    """Run `show` (it prints, and returns the data and exit code for the envelope), finish and
    exit with its code; with --watch, again every `watch` seconds until Ctrl-C, which exits 0."""
    if watch is None:
        data, code = show()
        out.finish(data, code)
        exit_with(code)
    else:
        out.watch(watch, show)


def load_fleet(ctx: typer.Context) -> Fleet:
    from igops import inventory

    return inventory.load(options(ctx).config)


def mutate(
    out: Output,
    fleet: Fleet,
    *,
    kind: str | None,
    resources: list[tuple[str, str]],
    targets: list[str],
    title: str,
    steps: list[str],
    dry_run: bool,
    yes: bool,
    action: Callable[[Reporter], T],
    outcome: Callable[[T], tuple[str, int]] = lambda _: ("ok", 0),
    params: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> T | None:
    """Show the plan; stop there on --dry-run; otherwise confirm and run the action as an
    operation of `kind` (igops.operations.engine: lease, journal, audit), handing it the
    reporter its steps must go through. Returns the action's result, or None for a dry run. A
    declined confirmation is audited and exits 2. `kind=None` runs no operation: for an action
    that changes nothing igops keeps state about (`exec`), which is only audited. `resume` is the
    journal record of the interrupted operation this one continues (igops ops resume|abort).
    `notes` print under the numbered steps: rules the run follows, not steps of its own."""
    from igops.operations import engine

    out.plan(title, steps, is_result=dry_run, notes=notes)
    if dry_run:
        out.log("dry run: nothing was changed")
        return None
    opts = current_options()
    spec = engine.OperationSpec(kind, title, targets, resources, steps, params or {}) if kind else None
    if not safety_confirm(out, f"{title}?", yes):
        engine.declined(fleet, targets, opts.reason)
        raise UsageError(
            "not confirmed: nothing was changed", "answer y to go ahead, or pass --yes after reviewing the plan"
        )
    if spec is None:
        return engine.audited(fleet, targets, lambda: action(out), outcome, opts.reason)
    return engine.perform(
        fleet,
        spec,
        lambda operation: action(operation.reporter),
        out,
        outcome=outcome,
        reason=opts.reason,
        wait=opts.wait,
        resume=resume,
    )


def safety_confirm(out: Output, question: str, yes: bool) -> bool:
    from igops import safety

    return safety.confirm(question, yes, out.ask)


def current_options() -> GlobalOptions:
    """The global options of the command being run (--reason and --wait live there too)."""
    # The click that typer vendors keeps the contexts: the stand-alone click package knows none.
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return options(ctx) if ctx is not None else GlobalOptions()


def exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)
