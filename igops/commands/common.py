"""What every command shares: global options, error-to-exit-code handling, and the
confirm → lock → act → audit sequence of mutating commands."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import typer

from igops.errors import ExitCode, IgopsError, UsageError
from igops.output import Output

T = TypeVar("T")

JSON_OPTION = typer.Option(False, "--json", help="Only a JSON envelope on stdout.")
def _shows_plan(ctx: typer.Context, value: bool) -> bool:
    """Every command with --dry-run shows a plan: mark it, so its steps are numbered as the plan."""
    ctx.meta["igops.shows_plan"] = True
    return value


DRY_RUN_OPTION = typer.Option(False, "--dry-run", callback=_shows_plan,
                              help="Print the exact plan and change nothing.")
YES_OPTION = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (required when not on a terminal).")


@dataclass
class GlobalOptions:
    config: str | None = None
    json: bool = False
    verbose: bool = False


def options(ctx: typer.Context) -> GlobalOptions:
    return ctx.obj if isinstance(ctx.obj, GlobalOptions) else GlobalOptions()


@contextmanager
def command(ctx: typer.Context, name: str, json_flag: bool = False) -> Iterator[Output]:
    """Run a command body: IgopsErrors become a one-line message and their exit code."""
    opts = options(ctx)
    out = Output(name, json_mode=opts.json or json_flag, verbose=opts.verbose)
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
        out.fail(exc.one_line(), code, {"message": exc.message, "hint": exc.hint, "problems": problems})
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
        out.fail(line + ("" if opts.verbose else " (rerun with --verbose for the traceback)"),
                 ExitCode.FAILED, {"message": line})
        raise typer.Exit(int(ExitCode.FAILED)) from None


def load_fleet(ctx: typer.Context):
    from igops import inventory

    return inventory.load(options(ctx).config)


def mutate(out: Output, fleet, *, operation: str, target: str | None, targets: list[str], title: str,
           steps: list[str], dry_run: bool, yes: bool, action: Callable[[], T],
           outcome: Callable[[T], tuple[str, int]] = lambda _: ("ok", 0)) -> T | None:
    """Show the plan; stop there on --dry-run; otherwise confirm, take the lease on (operation,
    target), act, and write an audit record whatever happens. Leases and records live where
    the inventory's [coordination] says (igops.coordination). Returns the action's result, or
    None for a dry run. A declined confirmation is audited and exits 2 (UsageError).
    `target=None` takes no lease: for an action that changes nothing igops keeps state about
    (`exec`)."""
    from igops import coordination, safety

    out.plan(title, steps, is_result=dry_run)
    if dry_run:
        out.log("dry run: nothing was changed")
        return None
    backend = coordination.for_fleet(fleet)
    command_line = safety.redact_argv(["igops", *sys.argv[1:]])
    reason = coordination.reason()
    if not safety.confirm(f"{title}?", yes):
        backend.audit(command=command_line, targets=targets, result="declined",
                      exit_code=int(ExitCode.USAGE), duration_ms=0.0, reason=reason)
        raise UsageError("not confirmed: nothing was changed",
                         "answer y to go ahead, or pass --yes after reviewing the plan")
    started = time.monotonic()
    result_word, exit_code, detail = "failed", int(ExitCode.FAILED), None
    with (backend.lease(operation, target, command_line, reason) if target is not None
          else nullcontext()) as held:
        try:
            result = action()
            result_word, exit_code = outcome(result)
            return result
        except IgopsError as exc:
            exit_code, detail = int(exc.exit_code), exc.one_line()
            raise
        except BaseException as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            # One action is one step: a lease lost during it is reported, not undone. The step
            # engine checks `held.check()` between its steps instead.
            lost = held.lost() if held is not None else None
            if lost:
                out.log(f"warning: the lease on {operation} {target} was lost while the command worked "
                        f"({lost}); another operator may have started on it meanwhile")
                detail = "; ".join(part for part in (detail, f"lease lost: {lost}") if part)
            backend.audit(command=command_line, targets=targets, result=result_word, exit_code=exit_code,
                          duration_ms=safety.monotonic_ms(started), detail=detail, reason=reason)


def exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)
