"""`igops warm`: capture a host's page cache exactly, replay it on another, compare two hosts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING

import typer

from igops import profile as profiles, vmtouch
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
from igops.errors import ExitCode
from igops.operations import conflicts
from igops.output import Output, Reporter, human_bytes, plural
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


class Match(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member (its value, not Class.member)
    size = "size"
    mtime = "mtime"
    path = "path"


PATHS_ARGUMENT = typer.Argument(
    None, help="Directories under the host's data mounts (default: its Postgres data directory)."
)
CONCURRENCY_OPTION = typer.Option(
    8, "--concurrency", "-j", min=1, max=256, help="Reads in flight on the target (its I/O queue depth)."
)
RATE_OPTION = typer.Option(
    None, "--rate", metavar="BYTES/S", help="Read at most this fast on the target, e.g. 50M (K, M, G: powers of 1024)."
)
MATCH_OPTION = typer.Option(
    Match.size,
    "--match",
    help="When a target file takes the profile's pages: size (same path and size), "
    "mtime (and same mtime, for restored copies), path (any size: for busy Postgres "
    "standbys whose files grow under replay).",
)
TIMEOUT_OPTION = typer.Option(
    None,
    "--timeout",
    min=10,
    help="Give up after this many seconds (default 3600: twice the time to read 244 GiB "
    "at a gp2 volume's 128 MiB/s; raise it with a low --rate).",
)
TOP_OPTION = typer.Option(20, "--top", min=0, help="List this many files (all of them with --json).")


def _options(concurrency: int, rate: str | None, match: Match, timeout: float | None) -> vmtouch.WarmOptions:
    return vmtouch.WarmOptions(
        concurrency=concurrency,
        rate=vmtouch.parse_rate(rate) if rate else None,
        match=match.value,
        timeout=timeout or vmtouch.DEFAULT_TIMEOUT,
    )


def _warm_table(out: Output, result: vmtouch.WarmResult) -> None:
    out.table(
        None,
        [
            "target",
            "files",
            Column("pages profiled", drop=3),
            Column("pages read", drop=3),
            Column("skipped files", drop=2),
            Column("disk read", drop=4),
            "resident now",
            Column("time", drop=1),
        ],
        [
            [
                result.target,
                f"{result.warmed_files}/{result.files}",
                result.pages,
                result.warmed_pages,
                result.skipped_files,
                f"{human_bytes(result.read_bytes)} ({result.read_amplification or 0:.2f}x)",
                f"{result.hit_ratio:.1%}",
                f"{result.seconds:.2f} s" if result.seconds < 10 else f"{result.seconds:.0f} s",
            ]
        ],
    )
    if result.skipped_by_reason:
        out.table(
            "skipped files",
            [Column("reason", wrap=True), "files"],
            [[reason, count] for reason, count in sorted(result.skipped_by_reason.items())],
        )


def _warm_outcome(result: vmtouch.WarmResult) -> tuple[str, int]:
    return (
        f"warmed {result.warmed_pages} of {plural(result.pages, 'page')} on {result.target}, "
        f"{result.hit_ratio:.1%} resident, {plural(result.skipped_files, 'file')} skipped",
        0,
    )


def _warm(
    out: Output,
    fleet: Fleet,
    plan: vmtouch.WarmPlan,
    title: str,
    action: Callable[[Reporter], vmtouch.WarmResult],
    dry_run: bool,
    yes: bool,
) -> None:
    """`warm apply` and `warm copy` differ only in where the pages come from: one operation, its
    lease on the target, and one result table, whichever it is."""
    result = mutate(
        out,
        fleet,
        kind="warm",
        resources=[conflicts.warm(plan.target)],
        targets=[plan.target],
        title=title,
        steps=plan.steps(),
        dry_run=dry_run,
        yes=yes,
        action=action,
        outcome=_warm_outcome,
    )
    if result is None:
        out.finish({"dry_run": dry_run, "plan": plan})
        return
    _warm_table(out, result)
    out.finish(result)


@app.command("capture")
def capture(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host whose page cache to read."),
    paths: list[str] | None = PATHS_ARGUMENT,
    output: str | None = typer.Option(
        None,
        "--output",
        "-o",
        metavar="PROFILE",
        help="Write the profile here (default: HOST-TIME.pagecache.gz; gzipped when the name ends in .gz).",
    ),
    emit_vmtouch: bool = typer.Option(
        False,
        "--emit-vmtouch",
        help="Print the equivalent `vmtouch -t -p RANGE FILE` commands on stdout "
        "(root i is $ROOTi, defaulting to the captured path).",
    ),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Record exactly which pages of every file under the paths are in the host's page cache."""

    with command(ctx, "warm capture", json_flag) as out:
        fleet = load_fleet(ctx)
        destination = output or f"{host}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.pagecache.gz"
        with out.step(f"read the page cache of {host}") as step:
            result = vmtouch.record(fleet, host, paths, destination, emit_vmtouch)
            step.detail = (
                f"{plural(result.pages, 'page')} ({human_bytes(result.resident_bytes)}) "
                f"in {plural(result.files, 'file')}"
            )
        if result.vmtouch is not None:
            for line in result.vmtouch:
                out.text(line)
        else:
            out.table(
                None,
                [
                    "host",
                    Column("files cached/scanned", drop=2),
                    Column("pages cached/scanned", drop=3),
                    "cached",
                    "profile",
                    Column("size", drop=1),
                ],
                [
                    [
                        result.host,
                        f"{result.files}/{result.scanned_files}",
                        f"{result.pages}/{result.scanned_pages}",
                        human_bytes(result.resident_bytes),
                        result.output,
                        human_bytes(result.output_bytes),
                    ]
                ],
            )
        out.log(f"profile written to {result.output}")
        out.finish(result)


@app.command("apply")
def apply(
    ctx: typer.Context,
    profile: str = typer.Argument(..., help="A profile written by `igops warm capture`."),
    to: str = typer.Option(..., "--to", help="The host to warm."),
    concurrency: int = CONCURRENCY_OPTION,
    rate: str | None = RATE_OPTION,
    match: Match = MATCH_OPTION,
    timeout: float | None = TIMEOUT_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Read exactly the profile's pages on a host; files missing or changed there are skipped and counted."""

    with command(ctx, "warm apply", json_flag) as out:
        fleet = load_fleet(ctx)
        found, text = profiles.load(profile)
        plan = vmtouch.plan_apply(fleet, found, to, _options(concurrency, rate, match, timeout), profile)
        assert plan.pages is not None, "a plan from a profile counts its pages"
        _warm(
            out,
            fleet,
            plan,
            f"Warm {plan.target} with {plural(plan.pages, 'page')} ({human_bytes(plan.bytes)}) "
            f"captured on {plan.source}",
            lambda reporter: vmtouch.apply(fleet, plan, text, reporter),
            dry_run,
            yes,
        )


@app.command("copy")
def copy(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="The host whose page cache to copy."),
    to: str = typer.Option(..., "--to", help="The host to warm."),
    paths: list[str] | None = PATHS_ARGUMENT,
    concurrency: int = CONCURRENCY_OPTION,
    rate: str | None = RATE_OPTION,
    match: Match = MATCH_OPTION,
    timeout: float | None = TIMEOUT_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Capture on one host and warm another in one step, the profile streaming between them."""

    with command(ctx, "warm copy", json_flag) as out:
        fleet = load_fleet(ctx)
        plan = vmtouch.plan_copy(fleet, source, to, paths, _options(concurrency, rate, match, timeout))
        _warm(
            out,
            fleet,
            plan,
            f"Warm {plan.target} with the pages cached on {plan.source} under "
            f"{', '.join(root.path for root in plan.roots)}",
            lambda reporter: vmtouch.copy(fleet, plan, reporter),
            dry_run,
            yes,
        )


@app.command("diff")
def diff(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="The host whose cached pages count (e.g. the primary)."),
    target: str = typer.Argument(..., help="The host to compare (e.g. the standby about to be promoted)."),
    paths: list[str] | None = PATHS_ARGUMENT,
    top: int = TOP_OPTION,
    at_least: float | None = typer.Option(
        None,
        "--at-least",
        min=0,
        max=1,
        metavar="SHARE",
        help="Exit 5 when less than this share (0-1) of SOURCE's cached pages are cached on TARGET.",
    ),
    json_flag: bool = JSON_OPTION,
) -> None:
    """What share of SOURCE's cached pages are cached on TARGET, per file and in total. Read-only."""

    with command(ctx, "warm diff", json_flag) as out:
        fleet = load_fleet(ctx)
        result = vmtouch.diff(fleet, source, target, paths, out)
        page = result.page_size
        out.table(
            f"files with the most pages cold on {result.target}",
            [
                "file",
                Column(f"cached on {result.source}", drop=2),
                Column(f"also on {result.target}", drop=1),
                "share",
                Column("status", wrap=True),
            ],
            [
                [
                    item.path,
                    human_bytes(item.source_pages * page),
                    human_bytes(item.target_pages * page),
                    f"{item.share:.1%}",
                    item.status,
                ]
                for item in result.files[:top]
            ],
        )
        out.text(
            f"{result.share:.1%} of {result.source}'s cached pages ({result.target_pages} of "
            f"{result.source_pages}, {human_bytes(result.source_pages * page)}) are cached on "
            f"{result.target}"
        )
        code = ExitCode.PROBLEMS_FOUND if at_least is not None and result.share < at_least else ExitCode.OK
        out.finish(result, code)
        exit_with(code)


@app.command("show")
def show(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host to look at."),
    path: str = typer.Argument(..., help="A directory under its data mounts."),
    top: int = TOP_OPTION,
    json_flag: bool = JSON_OPTION,
    watch: float | None = WATCH_OPTION,
) -> None:
    """How much of a directory is in the host's page cache, like `vmtouch DIR`, exact to the page."""

    with command(ctx, "warm show", json_flag) as out:
        fleet = load_fleet(ctx)

        def show() -> tuple[vmtouch.ShowResult, int]:
            result = vmtouch.show(fleet, host, path, top)
            page = result.page_size
            if result.busiest:
                out.table(
                    None,
                    ["file", "cached", Column("size", drop=1), "share", Column("runs", drop=2)],
                    [
                        [
                            item["path"],
                            human_bytes(item["resident_pages"] * page),
                            human_bytes(item["pages"] * page),
                            f"{item['share']:.1%}",
                            item["runs"],
                        ]
                        for item in result.busiest
                    ],
                )
            out.text(f"           Files: {result.files}")
            out.text(f"     Directories: {result.directories}")
            out.text(
                f"  Resident Pages: {result.resident_pages}/{result.pages}  "
                f"{human_bytes(result.resident_pages * page)}/{human_bytes(result.pages * page)}  "
                f"{result.share:.3%}"
            )
            out.text(f"         Elapsed: {result.seconds:g} seconds")
            return result, ExitCode.OK

        present(out, show, watch)
