"""`igops hosts`, `igops exec` and `igops status`: the fleet as a whole."""

from __future__ import annotations

import typer

from igops import fanout, remote, status as fleet_status
from igops.commands.common import (
    DRY_RUN_OPTION,
    JSON_OPTION,
    WATCH_OPTION,
    YES_OPTION,
    command,
    exit_with,
    load_fleet,
    mutate,
    present,
)
from igops.errors import ExitCode, UsageError
from igops.output import plural
from igops.tables import Column

ROLE_OPTION = typer.Option(None, "--role", "-r", help="Only hosts with this role (repeatable).")


def register(app: typer.Typer) -> None:
    app.command("hosts")(hosts)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_command)
    app.command("status")(status)


def hosts(
    ctx: typer.Context,
    pattern: str | None = typer.Argument(None, help="Shell-style host name pattern, e.g. 'db*'."),
    role: list[str] | None = ROLE_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """List the inventory's hosts."""
    with command(ctx, "hosts", json_flag) as out:
        fleet = load_fleet(ctx)
        selected = fleet.select(roles=role, pattern=pattern)
        rows = [
            [
                host.name,
                str(host.address),
                f"{fleet.ssh_user(host)}:{fleet.ssh_port(host)}",
                host.roles,
                host.instance_id,
                [mount.path for mount in host.mounts],
            ]
            for host in selected
        ]
        out.table(
            f"{fleet.model.fleet.name}: {plural(len(selected), 'host')}",
            [
                "host",
                "address",
                Column("ssh", drop=2),
                Column("roles", wrap=True),
                Column("instance", drop=1),
                Column("data mounts", wrap=True, drop=3),
            ],
            rows,
        )
        out.finish(
            {
                "fleet": fleet.model.fleet.name,
                "hosts": [
                    {
                        "name": host.name,
                        "address": str(host.address),
                        "ssh_user": fleet.ssh_user(host),
                        "ssh_port": fleet.ssh_port(host),
                        "roles": host.roles,
                        "instance_id": host.instance_id,
                        "mounts": [mount.model_dump() for mount in host.mounts],
                    }
                    for host in selected
                ],
            }
        )


def exec_command(
    ctx: typer.Context,
    argv: list[str] = typer.Argument(
        ...,
        metavar="-- COMMAND [ARG...]",
        help="The command; every argument reaches the host literally. For shell syntax use: -- sh -c '…'",
    ),
    role: list[str] | None = ROLE_OPTION,
    host: list[str] | None = typer.Option(None, "--host", "-H", help="A host by name (repeatable)."),
    parallel: int | None = typer.Option(None, "--parallel", "-p", min=1, help="At most N hosts at once."),
    timeout: float | None = typer.Option(
        None, "--timeout", "-t", min=0.1, help="Per-host command deadline in seconds."
    ),
    show_output: bool = typer.Option(True, "--output/--no-output", help="Print each host's output."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Run a command on many hosts in parallel and summarise the results."""

    with command(ctx, "exec", json_flag) as out:
        fleet = load_fleet(ctx)
        selected = fleet.select(roles=role, names=host)
        if not selected:
            raise UsageError("no hosts match", "check --role/--host against `igops hosts`")
        line = remote.quote_command(argv)
        settings = remote.settings_for(fleet)
        targets = remote.targets_for(fleet, selected)
        names = [target.name for target in targets]
        cap = parallel or settings.parallel
        tally = fanout.Tally(len(targets))

        def run_everywhere() -> list[remote.HostResult]:
            with out.progress("hosts", total=len(targets), counts=tally.counts) as advance:

                def done(result: remote.HostResult) -> None:
                    tally.finished(result.ok)
                    advance(1)
                    # Each host's result as it comes in, its output first: one print per host,
                    # so that two hosts' lines never interleave.
                    shown = fanout.output_lines(result) if show_output else []
                    out.text("\n".join([*shown, fanout.result_line(result)]))

                return remote.run(
                    targets,
                    line,
                    settings,
                    parallel=cap,
                    timeout=timeout,
                    on_start=lambda _: tally.started(),
                    on_done=done,
                )

        def outcome(results: list[remote.HostResult]) -> tuple[str, int]:
            code = fanout.summarise(results).exit_code
            return ("ok" if code == 0 else "failed on " + ", ".join(r.host for r in results if not r.ok)), code

        # No lock: exec changes nothing igops keeps state about, and a lock named after the host
        # set would only make unrelated runs block each other. The audit record stays.
        results = mutate(
            out,
            fleet,
            kind=None,
            resources=[],
            targets=names,
            title=f"Run `{line}` on {plural(len(names), 'host')} ({cap} at a time)",
            steps=[f"{target.name} ({target.user}@{target.address}:{target.port}): {line}" for target in targets],
            dry_run=dry_run,
            yes=yes,
            action=lambda _: run_everywhere(),
            outcome=outcome,
        )
        if results is None:
            out.finish({"dry_run": dry_run, "command": line, "hosts": names})
            return
        summary = fanout.summarise(results)
        # Every host's result was shown as it came in: the table repeats the failures, in the
        # inventory's order. TSV is for programs, which get every host's row.
        rows = results if out.table_format == "tsv" else [result for result in results if not result.ok]
        if rows:
            out.table(
                None if out.table_format == "tsv" else f"failed on {plural(len(rows), 'host')}",
                ["host", "exit", Column("time", drop=1), Column("result", wrap=True)],
                [
                    [r.host, r.exit_code, f"{r.duration_ms:.0f} ms", "ok" if r.ok else (r.error or "non-zero exit")]
                    for r in rows
                ],
            )
        out.text(summary.line())
        out.finish({"command": line, "hosts": results, **summary.counts()}, summary.exit_code)
        exit_with(summary.exit_code)


def status(
    ctx: typer.Context,
    role: list[str] | None = ROLE_OPTION,
    json_flag: bool = JSON_OPTION,
    watch: float | None = WATCH_OPTION,
) -> None:
    """Fleet overview: every host's reachability, then every service's state."""

    with command(ctx, "status", json_flag) as out:
        fleet = load_fleet(ctx)

        def show() -> tuple[fleet_status.StatusReport, int]:
            report = fleet_status.collect(fleet, roles=role)
            out.table(
                "hosts",
                [
                    "host",
                    Column("address", drop=1),
                    Column("roles", wrap=True, drop=2),
                    "ssh",
                    Column("load", drop=3),
                    Column("detail", wrap=True),
                ],
                [[h.host, h.address, h.roles, "ok" if h.reachable else "DOWN", h.load, h.detail] for h in report.hosts],
            )
            out.table(
                "services",
                ["service", "host", Column("endpoint", drop=1), "state", Column("detail", wrap=True)],
                [[s.service, s.host, s.endpoint, "ok" if s.ok else "DOWN", s.detail] for s in report.services],
            )
            problems = report.problems()
            out.text(
                "all hosts reachable, all services answering"
                if not problems
                else f"{plural(len(problems), 'problem')}: " + "; ".join(problems)
            )
            return report, ExitCode.OK if not problems else ExitCode.PROBLEMS_FOUND

        present(out, show, watch)
