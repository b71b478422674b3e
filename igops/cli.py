"""The root of the `igops` command: global options and the command groups."""

from __future__ import annotations

import typer
import typer.main

from igops import __version__
from igops.commands import check, fleet, lab, munin, pagerduty, pg, pingdom, snapshot, warm
from igops.commands import deploy as deploy_commands
from igops.commands import redis as redis_commands
from igops.commands import shard as shard_commands
from igops.commands.common import GlobalOptions

app = typer.Typer(
    name="igops",
    help="Operations for a photo-sharing fleet: snapshots, cache warming, failover, shard moves, "
    "deploys and checks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", metavar="FILE",
                               help="Inventory file (default: $IGOPS_CONFIG, then /etc/igops/igops.toml)."),
    json_output: bool = typer.Option(False, "--json", help="Only a JSON envelope on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    ctx.obj = GlobalOptions(config=config, json=json_output, verbose=verbose)


fleet.register(app)
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(lab.app, name="lab")
app.add_typer(warm.app, name="warm")
check.register(app)
app.add_typer(munin.app, name="munin")
app.add_typer(pingdom.app, name="pingdom")
app.add_typer(pagerduty.app, name="pagerduty")
app.add_typer(shard_commands.app, name="shard")
app.add_typer(deploy_commands.app, name="deploy")
app.add_typer(pg.app, name="pg")
app.add_typer(redis_commands.app, name="redis")


def _store_config(ctx: typer.Context, value: str | None) -> None:
    if value is not None:
        _global(ctx).config = value


def _store_verbose(ctx: typer.Context, value: bool) -> None:
    if value:
        _global(ctx).verbose = True


def _global(ctx: typer.Context) -> GlobalOptions:
    if not isinstance(ctx.obj, GlobalOptions):
        ctx.obj = GlobalOptions()
    return ctx.obj


def _global_option_params(config_names: list[str], verbose_names: list[str]) -> list:
    """-c/--config and -v/--verbose as options of a subcommand, built by typer itself from a
    command that carries them. They store into the same GlobalOptions as the root's."""
    carrier = typer.Typer()

    @carrier.command()
    def carry(
        config: str = typer.Option(None, *config_names, metavar="FILE", expose_value=False,
                                   callback=_store_config, help="Inventory file (also accepted before the command)."),
        verbose: bool = typer.Option(False, *verbose_names, expose_value=False, callback=_store_verbose,
                                     help="More detail on stderr (also accepted before the command)."),
    ) -> None:
        pass

    return [param for param in typer.main.get_command(carrier).params
            if set(param.opts) & set(config_names + verbose_names)]


def _accept_global_options_after_subcommands(group) -> None:
    """Give every subcommand -c/--config and -v/--verbose too, as every command has --json, so
    `igops hosts --config FILE` works like `igops --config FILE hosts`; a value given after the
    subcommand wins. A name a subcommand already uses for its own option keeps that meaning
    (`munin fetch --config` asks for plugin configs; -c still names the inventory there)."""
    for sub in getattr(group, "commands", {}).values():
        if getattr(sub, "commands", None) is not None:
            _accept_global_options_after_subcommands(sub)
            continue
        taken = {name for param in sub.params for name in [*param.opts, *param.secondary_opts]}
        config_names = [name for name in ("--config", "-c") if name not in taken]
        verbose_names = [name for name in ("--verbose", "-v") if name not in taken]
        sub.params.extend(_global_option_params(config_names, verbose_names))


def build_command():
    """The click command behind `igops`, global options accepted in both places."""
    command = typer.main.get_command(app)
    _accept_global_options_after_subcommands(command)
    return command


def main() -> None:
    build_command()()
