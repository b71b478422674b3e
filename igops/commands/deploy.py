"""`igops deploy`: rolling, health-gated deploys of the app, rollbacks, and the fleet's releases."""

from __future__ import annotations

import difflib
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer._click.core import Context
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperGroup

from igops import deploy
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, exit_with, load_fleet, mutate
from igops.deploy import HealthGate
from igops.errors import ExitCode
from igops.operations import conflicts
from igops.output import Output, plural
from igops.tables import Column

if TYPE_CHECKING:
    from igops.deploy_agents import AppFleet
    from igops.deploy_canary import CanaryEvidence
    from igops.deploy_plan import RolloutPlan
    from igops.deploy_result import RolloutResult
    from igops.inventory import Fleet


class _MisspeltVerb(ClickUsageError):
    """A word in a verb's place that is no verb, with igops' hint (igops.cli reads `igops_hint`)."""

    def __init__(self, message: str, ctx: Context, igops_hint: str) -> None:
        super().__init__(message, ctx)
        self.igops_hint = igops_hint


class DeployGroup(TyperGroup):
    """`igops deploy [REV] …` runs `igops deploy run [REV] …`; the other subcommands keep their names."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            self._refuse_a_misspelt_verb(ctx, args[0])
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def _refuse_a_misspelt_verb(self, ctx: Context, word: str) -> None:
        """`igops deploy rollbak` is a typo of a verb before it is a git revision: refused, with
        the verb suggested (a revision so named is still `igops deploy run WORD`)."""

        # Not `run`: a short revision (a tag "run2") is nearer to it than any typo is.
        if difflib.get_close_matches(word, [name for name in self.commands if name != "run"], n=1, cutoff=0.75):
            raise _MisspeltVerb(
                f"No such command {word!r}.", ctx, f"a git revision so named deploys with `igops deploy run {word}`"
            )

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return ["[REV] [OPTIONS]", "|", "COMMAND [ARGS]..."]


# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(
    cls=DeployGroup,
    no_args_is_help=False,
    epilog="\b\n`igops deploy [REV] [OPTIONS]` is `igops deploy run [REV] [OPTIONS]`; its options: "
    "`igops deploy run --help`.\n\b\nExamples:\n  igops deploy v1.4.2 --dry-run\n"
    "  igops deploy --batch 1,50%\n  igops deploy pending",
)

BATCH_OPTION = typer.Option(
    "1,25%", "--batch", "-b", help="Batch sizes, hosts or percentages; the last repeats (Ansible's serial)."
)
MAX_FAIL_OPTION = typer.Option(
    None,
    "--max-fail",
    help="Hosts that may fail their gate before the rollout stops and the batch is switched back: a count, "
    "or a percentage of the hosts rolled, rounded down (default: [deploy] max_fail, 0).",
)
HOSTS_OPTION = typer.Option(
    None,
    "--hosts",
    help="Only these app servers (comma-separated, or the option repeated); only they are locked, so "
    "deploys to other servers may run at once.",
)


class OnInconclusive(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member
    hold = "hold"
    continue_ = "continue"
    rollback = "rollback"


HEALTH_TIMEOUT_OPTION = typer.Option(
    30.0, "--health-timeout", min=1, help="Seconds a switched host has to pass its health gate."
)
HEALTH_PASSES_OPTION = typer.Option(
    3, "--health-passes", min=1, max=50, help="Consecutive passing /health answers that open the gate."
)
PARALLEL_OPTION = typer.Option(
    None, "--parallel", "-p", min=1, help="At most N hosts at once for uploads and switches (default: [ssh] parallel)."
)


def _hosts(values: list[str] | None) -> list[str] | None:
    names = [name.strip() for value in values or [] for name in value.split(",") if name.strip()]
    return names or None


HOST_COLUMNS: list[Column | str] = [
    "host",
    "result",
    "release",
    Column("before", drop=2),
    Column("in LB", drop=1),
    Column("batch", drop=3),
    Column("detail", wrap=True),
]


def _check_rollout_options(batch: str, max_fail: str | None) -> None:
    """A --batch or --max-fail that does not parse is refused before anything is read or surveyed."""
    deploy.parse_batches(batch)
    if max_fail is not None:
        deploy.HostLimit.of(max_fail, "--max-fail")


def _gate(fleet: Fleet, passes: int, timeout: float) -> HealthGate:
    return HealthGate(fleet.model.app.health_path, fleet.model.app.port, passes, timeout)


def _host_rows(result: RolloutResult) -> list[list[Any]]:
    return [[h.host, h.state, h.release or "UNKNOWN", h.before, h.in_lb, h.batch, h.detail] for h in result.hosts]


def _canary_rows(evidence: CanaryEvidence) -> list[list[Any]]:
    """The evidence as a person reads it: the whole window, then each endpoint compared."""

    def p(value: float | None) -> str:
        return "-" if value is None else f"{value:.2g}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"x{value:.2f}"

    rows = []
    for name, found in [("all", evidence.overall), *((e.endpoint, e.comparison) for e in evidence.endpoints)]:
        ours, theirs = found.canary, found.baseline
        rows.append(
            [
                name,
                f"{ours.requests}/{theirs.requests}",
                f"{ours.error_rate * 100:.2f}%/{theirs.error_rate * 100:.2f}%",
                p(found.error_p),
                f"{ours.p50_ms or 0:.0f}/{theirs.p50_ms or 0:.0f} ms",
                f"{ours.p95_ms or 0:.0f}/{theirs.p95_ms or 0:.0f} ms",
                f"{ratio(found.p50_ratio)} {ratio(found.p95_ratio)}",
                p(found.latency_p),
                "; ".join(found.failed) or "ok",
            ]
        )
    return rows


def _show_result(out: Output, result: RolloutResult) -> None:
    out.table(None, HOST_COLUMNS, _host_rows(result))
    evidence = result.canary
    if evidence is None:
        return
    out.table(
        f"canary {evidence.verdict}: {', '.join(evidence.canary.hosts)} against {', '.join(evidence.baseline.hosts)}, "
        f"{evidence.window_s:.0f} s (canary/baseline)",
        [
            "endpoint",
            "requests",
            Column("5xx", drop=1),
            Column("5xx p", drop=2),
            Column("p50", drop=1),
            "p95",
            Column("ratio p50 p95", drop=2),
            Column("latency p", drop=2),
            Column("regression", wrap=True),
        ],
        _canary_rows(evidence),
    )
    restarts = {host: count for host, count in evidence.restarts.items() if count}
    if restarts:
        out.text("worker restarts in the window: " + ", ".join(f"{h} {n}" for h, n in sorted(restarts.items())))
    for note in evidence.notes:
        out.text(f"note: {note}")
    out.text(f"canary {evidence.verdict}" + (f": {'; '.join(evidence.reasons)}" if evidence.reasons else ""))


def _roll(
    out: Output,
    app: AppFleet,
    plan: RolloutPlan,
    dry_run: bool,
    yes: bool,
    title: str,
    tarball: bytes = b"",
    pending: dict[str, Any] | None = None,
) -> None:
    if plan.nothing_to_do:
        out.log(f"nothing to do: every reachable app host is on {plan.target}")
        out.table(
            None,
            ["host", "state", "release", Column("detail", wrap=True)],
            [[h.host, h.action, h.current, h.detail] for h in plan.hosts],
        )
        code = (
            ExitCode.OK if all(h.action in (deploy.ALREADY, deploy.OUTSIDE) for h in plan.hosts) else ExitCode.PARTIAL
        )
        out.finish({"dry_run": dry_run, "plan": plan}, code)
        exit_with(code)
        return
    try:
        result = mutate(
            out,
            app.fleet,
            kind="deploy" if plan.kind == "deploy" else "deploy-rollback",
            resources=[conflicts.app_server(name) for name in plan.scope()],
            targets=[h.host for h in plan.roll()],
            title=title,
            steps=plan.steps(),
            notes=plan.notes(),
            dry_run=dry_run,
            yes=yes,
            params=deploy.resume_params(plan),
            action=lambda reporter: deploy.execute(app, plan, reporter, tarball, pending),
            outcome=lambda r: (r.summary(), 0),
        )
    except deploy.RolloutFailed as failed:
        _show_result(out, failed.result)
        raise
    if result is None:
        out.finish({"dry_run": dry_run, "plan": plan, "pending": pending})
        return
    _show_result(out, result)
    out.text(result.summary())
    out.finish(result)


@app.command("run")
def run(
    ctx: typer.Context,
    rev: str | None = typer.Argument(
        None, metavar="REV", help="A git revision of the app (default: the working tree)."
    ),
    source: Path = typer.Option(
        Path("app"), "--source", "-s", help="The app package directory (with REV: its path in the git work tree)."
    ),
    batch: str = BATCH_OPTION,
    max_fail: str | None = MAX_FAIL_OPTION,
    hosts: list[str] | None = HOSTS_OPTION,
    analysis: int | None = typer.Option(
        None,
        "--analysis",
        min=0,
        max=3600,
        help="Seconds of canary analysis once the first batch takes traffic, against the servers still on "
        "the old release (default: [deploy.canary] window, 60); 0: the /health gate only.",
    ),
    on_inconclusive: OnInconclusive = typer.Option(
        OnInconclusive.hold,
        "--on-inconclusive",
        help="When the analysis saw too little traffic: hold (stop with the canary in place, exit 6), "
        "continue, or rollback (return the canary).",
    ),
    canary_only: bool = typer.Option(
        False,
        "--canary-only",
        help="Stop after a passing canary analysis; `igops deploy` of the same release again goes on from batch 2.",
    ),
    health_timeout: float = HEALTH_TIMEOUT_OPTION,
    health_passes: int = HEALTH_PASSES_OPTION,
    parallel: int | None = PARALLEL_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Build a release once, stage it on every app server, then switch batch by batch:
    out of nginx, switch `current`, reload gunicorn, health gate, back in; after the first
    batch, a canary analysis against the servers still on the old release."""

    with command(ctx, "deploy", json_flag) as out:
        fleet = load_fleet(ctx)
        _check_rollout_options(batch, max_fail)
        options = deploy.AnalysisOptions(analysis, on_inconclusive.value, canary_only)
        where = f"at git {rev} ({source}/)" if rev else f"from the working tree {source}/"
        with out.step(f"read the app {where}") as step:
            tree = deploy.read_source(source, rev)
            step.detail = f"{plural(len(tree.files), 'file')}, content {deploy.content_hash(tree.files)}"
        with deploy.AppFleet.of(fleet) as app:
            with out.step("survey the app servers and the load balancer") as step:
                plan, tarball = deploy.plan_deploy(
                    app,
                    tree,
                    batch,
                    max_fail,
                    _gate(fleet, health_passes, health_timeout),
                    parallel,
                    only=_hosts(hosts),
                    analysis=options,
                )
                step.detail = f"release {plan.target}: {len(plan.roll())} of {plural(len(plan.hosts), 'host')} to roll"
            pending = deploy.pending_for_deploy(app, source, rev, tree)
            _roll(
                out,
                app,
                plan,
                dry_run,
                yes,
                f"Deploy release {plan.target} ({plan.target_description}) to {plural(len(plan.roll()), 'app host')} "
                f"of {plan.fleet}, batches {batch}"
                + (", canary analysis" if plan.canary else "")
                + (" (--canary-only)" if plan.stop_after is not None else ""),
                tarball,
                pending,
            )


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    to: str | None = typer.Option(
        None, "--to", help="The release to return to (default: the one the fleet's newest release replaced)."
    ),
    batch: str = BATCH_OPTION,
    max_fail: str | None = MAX_FAIL_OPTION,
    hosts: list[str] | None = HOSTS_OPTION,
    health_timeout: float = HEALTH_TIMEOUT_OPTION,
    health_passes: int = HEALTH_PASSES_OPTION,
    parallel: int | None = PARALLEL_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Switch the app servers back to an earlier release, with the same batches and health gates."""

    with command(ctx, "deploy rollback", json_flag) as out:
        fleet = load_fleet(ctx)
        _check_rollout_options(batch, max_fail)
        with deploy.AppFleet.of(fleet) as app:
            with out.step("survey the app servers and the load balancer") as step:
                plan = deploy.plan_rollback(
                    app, to, batch, max_fail, _gate(fleet, health_passes, health_timeout), parallel, _hosts(hosts)
                )
                step.detail = f"back to {plan.target}: {len(plan.roll())} of {plural(len(plan.hosts), 'host')} to roll"
            _roll(
                out,
                app,
                plan,
                dry_run,
                yes,
                f"Roll back {plural(len(plan.roll()), 'app host')} of {plan.fleet} to release {plan.target} "
                f"({plan.target_description}), batches {batch}",
            )


@app.command("pending")
def pending(
    ctx: typer.Context,
    rev: str | None = typer.Argument(None, metavar="REV", help="A git revision of the app (default: HEAD)."),
    source: Path = typer.Option(Path("app"), "--source", "-s", help="The app package directory in the git work tree."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """The commits of the app between the release the fleet runs and REV (default HEAD), the files
    they change, and whether requirements.txt changed (a new virtualenv). Exit 5 when the fleet's
    release cannot be placed in git."""

    with command(ctx, "deploy pending", json_flag) as out:
        fleet = load_fleet(ctx)
        with deploy.AppFleet.of(fleet) as app:
            found = deploy.pending(app, source, rev or "HEAD")
        if found.commits:
            out.table(
                f"{found.fleet}: commits of {found.source}/ to deploy",
                ["commit", Column("date", drop=2), Column("author", drop=1), Column("subject", wrap=True)],
                [[c.sha[:12], c.date[:19], c.author, c.subject] for c in found.commits],
            )
        if found.behind:
            out.table(
                f"in the fleet's release, not in {found.rev}",
                ["commit", Column("date", drop=2), Column("author", drop=1), Column("subject", wrap=True)],
                [[c.sha[:12], c.date[:19], c.author, c.subject] for c in found.behind],
            )
        if found.files:
            out.table(None, ["status", Column("file", wrap=True)], [[status, path] for status, path in found.files])
        out.text(f"the fleet runs {found.deployed or 'no release'} on {', '.join(found.deployed_on) or 'no host'}")
        for release, hosts in sorted(found.others.items()):
            out.text(f"also in use: {release} on {', '.join(hosts)}")
        out.text(found.headline())
        code = ExitCode.OK if found.known else ExitCode.PROBLEMS_FOUND
        out.finish(found, code)
        exit_with(code)


@app.command("releases")
def releases(
    ctx: typer.Context,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Per app host: its releases, the current one, the one before it, whether it is in the load
    balancer; and whether the fleet agrees. Exit 5 when it does not, or a host needs attention."""

    with command(ctx, "deploy releases", json_flag) as out:
        fleet = load_fleet(ctx)
        with deploy.AppFleet.of(fleet) as app:
            report = deploy.fleet_releases(app)
        out.table(
            f"{report.fleet}: app releases",
            [
                "host",
                Column("current", wrap=True),
                Column("previous", drop=1),
                Column("load balancer", drop=2),
                Column("releases", wrap=True, drop=3),
            ],
            [
                [
                    row.host,
                    row.current if row.reachable else f"UNREACHABLE: {row.error}",
                    row.previous,
                    row.load_balancer,
                    ", ".join(row.releases),
                ]
                for row in report.hosts
            ],
        )
        if report.last_run:
            last = report.last_run
            out.text(
                f"last run: {last['kind']} {last['deploy_id']} to {last['target']} by {last['user']}, "
                f"{last['status']}{' (interrupted)' if last.get('interrupted') else ''}, "
                f"updated {last.get('updated')}"
            )
        out.text(
            "the fleet agrees: " + ", ".join(report.in_use)
            if report.agree and not report.problems
            else f"{plural(len(report.problems), 'problem')}: " + "; ".join(report.problems)
        )
        code = ExitCode.OK if not report.problems else ExitCode.PROBLEMS_FOUND
        out.finish(report, code)
        exit_with(code)
