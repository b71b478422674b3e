"""One numbering for plan and progress: the plan's step k is [k] on screen."""

from igops.output import Output


def run_planned(out: Output) -> None:
    with out.step("probe the cluster"):
        pass
    out.plan("Switch over", ["pause PgBouncer", "stop the primary", "promote the standby"])
    for title in ("pause PgBouncer", "stop the primary", "promote the standby"):
        with out.step(title):
            pass


def test_plan_step_k_is_progress_k(capsys):
    out = Output("pg switchover")
    out.shows_plan = True
    run_planned(out)
    err = capsys.readouterr().err
    assert "[pre] probe the cluster" in err
    assert "  2. stop the primary" in err and "[2] stop the primary" in err
    assert "[3] promote the standby" in err and "[4]" not in err
    assert [step.number for step in out.steps] == [0, 1, 2, 3]


def test_a_command_without_a_plan_numbers_from_one(capsys):
    out = Output("warm show")
    with out.step("read the page cache"):
        pass
    with out.step("count"):
        pass
    err = capsys.readouterr().err
    assert "[1] read the page cache" in err and "[2] count" in err


def test_dry_run_option_marks_the_command_as_planned(tmp_path):
    """Through the real CLI: a command with --dry-run gets the plan's numbering."""
    import typer
    from typer.testing import CliRunner

    from igops.commands.common import DRY_RUN_OPTION, command

    app = typer.Typer()

    @app.command()
    def act(ctx: typer.Context, dry_run: bool = DRY_RUN_OPTION) -> None:
        with command(ctx, "act") as out:
            typer.echo(f"shows_plan={out.shows_plan}")

    @app.command()
    def other(ctx: typer.Context) -> None:
        with command(ctx, "other") as out:
            typer.echo(f"shows_plan={out.shows_plan}")

    runner = CliRunner()
    assert "shows_plan=True" in runner.invoke(app, ["act"]).output
    assert "shows_plan=False" in runner.invoke(app, ["other"]).output
