"""`igops check`: every check across the fleet at once, for people, cron and Nagios."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import typer

from igops import checks, coordination, safety
from igops.checks import fleet as fleet_checks, munin, nagios as nagios_format
from igops.commands.common import JSON_OPTION, command, load_fleet, options
from igops.errors import AlreadyRunning, ExitCode, IgopsError, NagiosStatus, UsageError
from igops.output import Output, plural
from igops.pagerduty.incidents import Pager
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.pagerduty.incidents import PagingReport

ROLE_OPTION = typer.Option(None, "--role", "-r", help="Only hosts with this role (repeatable).")
STATUS_STYLE = {
    NagiosStatus.OK: "green",
    NagiosStatus.WARNING: "yellow",
    NagiosStatus.CRITICAL: "red",
    NagiosStatus.UNKNOWN: "magenta",
}

CHECK_COLUMNS: list[Column | str] = ["check", "target", "status", Column("detail", wrap=True), Column("time", drop=1)]


def result_row(r: checks.Result) -> list[str | None]:
    """A check's row in the table CHECK_COLUMNS heads."""
    return [
        r.check,
        _plain(r.target),
        f"[{STATUS_STYLE[r.status]}]{r.status.name}[/]",
        _plain(r.summary),
        f"{r.duration_ms:.0f} ms" if r.duration_ms is not None else None,
    ]


def register(app: typer.Typer) -> None:
    app.command("check")(check)


def check(
    ctx: typer.Context,
    role: list[str] | None = ROLE_OPTION,
    only: list[str] | None = typer.Option(
        None,
        "--only",
        metavar="CHECK",
        help="Only this check (repeatable): ssh, disk, frozen, http, postgres, "
        "pgbouncer, redis, memcached, munin, snapshot, pingdom.",
    ),
    nagios: bool = typer.Option(
        False, "--nagios", help="One line with perfdata; exit 0/1/2/3 (OK, WARNING, CRITICAL, UNKNOWN)."
    ),
    page: bool = typer.Option(False, "--page", help="Trigger PagerDuty for what is CRITICAL, resolve what recovered."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print nothing when all is well; only the problems otherwise (for cron)."
    ),
    timeout: float | None = typer.Option(
        None,
        "--timeout",
        "-t",
        min=0.5,
        max=300,
        help="One deadline for the whole run, in seconds (default: [check] timeout, 10).",
    ),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Check the whole fleet at once under one deadline: SSH, health URLs, Postgres, PgBouncer,
    Redis, memcached, disks, frozen filesystems, munin-node, snapshots and Pingdom.

    Exit 0 when every check is OK and 5 (problems found) otherwise, 1 when a page could not be
    sent, 4 when another check is running; with --nagios, 0/1/2/3 as Nagios expects. Runs are
    locked, so overlapping cron runs cannot double-page."""
    if nagios and (json_flag or options(ctx).json):
        with command(ctx, "check", json_flag):
            raise UsageError("--nagios and --json are two different outputs", "choose one")
    with command(ctx, "check", json_flag, nagios=nagios) as out:
        if not nagios:
            code = _run(ctx, out, role, only, False, page, quiet, timeout)
        else:
            try:
                code = _run(ctx, out, role, only, True, page, quiet, timeout)
            except IgopsError as exc:
                _nagios_unknown(out, exc.one_line())
            except Exception as exc:  # noqa: BLE001 - Nagios must get a status line, never a traceback
                _nagios_unknown(out, f"unexpected {type(exc).__name__}: {exc}")
        _exit(code)


def _nagios_unknown(out: Output, message: str) -> None:
    out.nagios_status(nagios_format.unknown(message))
    _exit(int(NagiosStatus.UNKNOWN))


def _exit(code: int) -> None:
    """Leave now. A probe still stuck past the deadline (a session to a hung host) must not keep
    the process, or cron's next run, waiting: once everything is printed, exit regardless."""

    sys.stdout.flush()
    sys.stderr.flush()
    if any(
        thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        os._exit(code)
    if code:
        raise typer.Exit(code)


def _run(
    ctx: typer.Context,
    out: Output,
    roles: list[str] | None,
    only: list[str] | None,
    nagios: bool,
    page: bool,
    quiet: bool,
    timeout: float | None,
) -> int:
    fleet = load_fleet(ctx)
    timeout = timeout or fleet.model.check.timeout
    only = fleet_checks.validate_groups(only)
    pager = None
    if page:
        pager = Pager(fleet, out)
        pager.prepare()
    command_line = safety.redact_argv(["igops", *sys.argv[1:]])
    with _CheckLock(fleet, command_line, patient=sys.stdin.isatty() and not nagios, timeout=timeout):
        samples = munin.Samples(fleet.state_dir / "check" / "munin-samples.json")
        started = time.monotonic()
        results = checks.run_all(fleet_checks.probes(fleet, roles, only, timeout, samples), timeout)
        duration = time.monotonic() - started
        samples.save()
        paging = None
        if pager:
            paging = pager.reconcile(results, complete_run=not roles and not only)
            if paging.acted:
                # The team's audit trail; the check lock itself stays local, so that `check`
                # still runs when etcd has lost quorum.
                coordination.for_fleet(fleet).audit(
                    command=command_line,
                    targets=paging.triggered + paging.resolved + [f["dedup_key"] for f in paging.failed],
                    result=f"paged: {len(paging.triggered)} triggered, {len(paging.resolved)} resolved, "
                    f"{len(paging.failed)} failed",
                    exit_code=1 if paging.failed else 0,
                    duration_ms=duration * 1000,
                )
    state = checks.overall(results)
    _report_paging(out, paging, quiet)
    if nagios:
        text, state = nagios_format.line(fleet.model.fleet.name, results, duration)
        out.nagios_status(text)
        return int(state)
    # Problems found exit 5, as from every read-only command; a page that could not be sent is
    # an action that failed (1). --nagios keeps Nagios' own codes (above).
    code = int(
        ExitCode.FAILED
        if paging and paging.failed
        else ExitCode.OK
        if state == NagiosStatus.OK
        else ExitCode.PROBLEMS_FOUND
    )
    shown = [result for result in results if result.status != NagiosStatus.OK] if quiet else results
    if shown:
        out.table(None, CHECK_COLUMNS, [result_row(r) for r in shown])
    tally = checks.counts(results)
    if not quiet or state != NagiosStatus.OK:
        problems = ", ".join(
            f"{tally[name]} {name.upper()}" for name in ("critical", "warning", "unknown") if tally[name]
        )
        out.text(
            f"{fleet.model.fleet.name}: {state.name} — {plural(len(results), 'check')}"
            + (f", {problems}" if problems else ", all OK")
            + f" ({duration:.2f} s)"
        )
    out.finish(
        {
            "fleet": fleet.model.fleet.name,
            "status": state.name,
            "nagios_status": int(state),
            "counts": tally,
            "duration_ms": round(duration * 1000, 1),
            "timeout": timeout,
            "results": [
                {
                    "check": r.check,
                    "target": r.target,
                    "status": r.status.name,
                    "summary": r.summary,
                    "duration_ms": r.duration_ms,
                    "perfdata": r.perfdata,
                }
                for r in results
            ],
            "paging": paging,
        },
        code,
    )
    return code


def _plain(text: str) -> str:
    return text.replace("[", r"\[")


def _report_paging(out: Output, paging: PagingReport | None, quiet: bool) -> None:
    if paging is None:
        return
    if not quiet:
        for key in paging.triggered:
            out.log(f"PagerDuty: triggered {key}")
        for key in paging.resolved:
            out.log(f"PagerDuty: resolved {key}")
    for failure in paging.failed:
        out.log(
            f"PagerDuty: {failure['action']} {failure['dedup_key']} failed: {failure['error']} (the next run retries)"
        )


class _CheckLock:
    """The fleet's check lock. Cron (and Nagios) must not queue up behind a running check, so
    they fail at once with LOCKED; a person at a terminal waits up to one check's length."""

    def __init__(self, fleet: Fleet, command_line: str, patient: bool, timeout: float):
        self.fleet, self.command_line, self.patient, self.timeout = fleet, command_line, patient, timeout
        self._held: AbstractContextManager[Path] | None = None

    def __enter__(self) -> _CheckLock:
        give_up = time.monotonic() + (self.timeout + 5 if self.patient else 0)
        while True:
            held = safety.lock(self.fleet.state_dir, "check", self.fleet.model.fleet.name, self.command_line)
            try:
                held.__enter__()
            except AlreadyRunning:
                if time.monotonic() >= give_up:
                    raise
                time.sleep(0.2)
                continue
            self._held = held
            return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._held is not None, "__exit__ follows a successful __enter__"
        return self._held.__exit__(exc_type, exc_value, traceback)
