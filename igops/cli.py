"""The root of the `igops` command: global options and the command groups."""

from __future__ import annotations

import re
import sys

import typer
import typer.main

# The click that typer vendors: its exceptions are the ones a bad command line raises.
from typer._click import exceptions as click

from igops import __version__
from igops.commands import (
    check,
    deploy as deploy_commands,
    fleet,
    lab,
    munin,
    ops,
    pagerduty,
    pg,
    pingdom,
    redis as redis_commands,
    shard as shard_commands,
    snapshot,
    warm,
)
from igops.commands.common import WATCH_DEFAULT_SECONDS, GlobalOptions, TableFormat

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


FORMAT_METAVAR = "|".join(item.value for item in TableFormat)
FORMAT_HELP = ("Tables as: table (ruled on a terminal), plain (aligned, no rules) or tsv (a header row, then "
               "tab-separated rows; nothing else on stdout).")
WIDE_HELP = "Every column of a table, even where the terminal is too narrow for them."


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
    table_format: TableFormat = typer.Option(TableFormat.table, "--format", metavar=FORMAT_METAVAR,
                                             help=FORMAT_HELP),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    ctx.obj = GlobalOptions(config=config, json=json_output, verbose=verbose, format=table_format, wide=wide)


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
app.add_typer(ops.app, name="ops")


def _store_config(ctx: typer.Context, value: str | None) -> None:
    if value is not None:
        _global(ctx).config = value


def _store_verbose(ctx: typer.Context, value: bool) -> None:
    if value:
        _global(ctx).verbose = True


def _store_reason(ctx: typer.Context, value: str | None) -> None:
    if value is not None:
        _global(ctx).reason = value


def _store_wait(ctx: typer.Context, value: float | None) -> None:
    if value is not None and value < 0:
        raise typer.BadParameter("SECONDS must be 0 or more")
    if value is not None:
        _global(ctx).wait = value


def _store_format(ctx: typer.Context, value: TableFormat | None) -> None:
    if value is not None:
        _global(ctx).format = value


def _store_wide(ctx: typer.Context, value: bool) -> None:
    if value:
        _global(ctx).wide = True


def _global(ctx: typer.Context) -> GlobalOptions:
    if not isinstance(ctx.obj, GlobalOptions):
        ctx.obj = GlobalOptions()
    return ctx.obj


def _global_option_params(names: dict[str, list[str]]) -> list:
    """The global options as options of a subcommand, built by typer itself from a command that
    carries them, under the `names` still free there. They store into the same GlobalOptions as
    the root's."""
    carrier = typer.Typer()

    @carrier.command()
    def carry(
        # Names of their own: click hands a parsed value to every parameter of the same name, so a
        # subcommand's own `config` (munin fetch --config) would reach _store_config too.
        global_config: str = typer.Option(None, *names["config"], metavar="FILE", expose_value=False,
                                          callback=_store_config,
                                          help="Inventory file (also accepted before the command)."),
        global_verbose: bool = typer.Option(False, *names["verbose"], expose_value=False, callback=_store_verbose,
                                            help="More detail on stderr (also accepted before the command)."),
        global_format: TableFormat = typer.Option(None, *names["format"], metavar=FORMAT_METAVAR, expose_value=False,
                                                  callback=_store_format, help=FORMAT_HELP),
        global_wide: bool = typer.Option(False, *names["wide"], expose_value=False, callback=_store_wide,
                                         help=WIDE_HELP),
    ) -> None:
        pass

    wanted = {name for given in names.values() for name in given}
    return [param for param in typer.main.get_command(carrier).params if set(param.opts) & wanted]


GLOBAL_OPTION_NAMES = {"config": ("--config", "-c"), "verbose": ("--verbose", "-v"), "format": ("--format",),
                       "wide": ("--wide",)}


def _operator_option_params() -> list:
    """--reason and --wait, which every mutating verb (one with --dry-run) takes: they reach the
    operation engine through the GlobalOptions, like -c."""
    carrier = typer.Typer()

    @carrier.command()
    def carry(
        operation_reason: str = typer.Option(None, "--reason", metavar="TEXT", expose_value=False,
                                             callback=_store_reason,
                                             help="Why: a ticket id or a sentence, kept in the journal and audit "
                                                  "trail and shown to anyone the operation blocks."),
        operation_wait: float = typer.Option(None, "--wait", metavar="SECONDS", expose_value=False,
                                             callback=_store_wait,
                                             help="Wait up to SECONDS for another operation's lease on the same "
                                                  "targets instead of exiting 4."),
    ) -> None:
        pass

    return [param for param in typer.main.get_command(carrier).params if param.opts[0] in ("--reason", "--wait")]


def _accept_global_options_after_subcommands(group) -> None:
    """Give every subcommand the global options too, as every command has --json, so
    `igops hosts --config FILE` works like `igops --config FILE hosts`; a value given after the
    subcommand wins. A name a subcommand already uses for its own option keeps that meaning
    (`munin fetch --config` asks for plugin configs; -c still names the inventory there)."""
    for sub in getattr(group, "commands", {}).values():
        if getattr(sub, "commands", None) is not None:
            _accept_global_options_after_subcommands(sub)
            continue
        taken = {name for param in sub.params for name in [*param.opts, *param.secondary_opts]}
        sub.params.extend(_global_option_params({key: [name for name in given if name not in taken]
                                                 for key, given in GLOBAL_OPTION_NAMES.items()}))
        if any("--dry-run" in param.opts for param in sub.params):
            sub.params.extend(_operator_option_params())


def _explain_verbs(group, path: tuple[str, ...] = ()) -> None:
    """Every verb's `--help`: metavars in words (never a Python type) and its examples."""
    from igops.commands import help_text

    for name, sub in getattr(group, "commands", {}).items():
        if getattr(sub, "commands", None) is not None:
            _explain_verbs(sub, (*path, name))
            continue
        verb = " ".join((*path, name))
        for param in sub.params:
            if not getattr(param, "is_flag", False):
                param.metavar = help_text.metavar_for(verb, param.name, param.metavar)
            if param.param_type_name == "argument":
                # typer prints an argument's Python type beside its name; the name says it.
                param.display_type_rich = lambda ctx: None
        sub.epilog = sub.epilog or help_text.examples_epilog(verb)


def build_command():
    """The click command behind `igops`, global options accepted in both places."""
    command = typer.main.get_command(app)
    _accept_global_options_after_subcommands(command)
    _explain_verbs(command)
    return command


def _command_name(exc: click.UsageError, argv: list[str]) -> str:
    """The verb as the JSON envelope names it ("shard move"): from the failed context, or, when
    the parser kept none, from the command names at the start of the line."""
    if exc.ctx is not None and exc.ctx.parent is not None:
        return " ".join(exc.ctx.command_path.split()[1:])
    group, words = build_command(), []
    for word in argv:
        if word.startswith("-"):
            continue
        sub = getattr(group, "commands", {}).get(word)
        if sub is None:
            break
        words.append(word)
        group = sub
    return " ".join(words) or "igops"


def _is_option(param) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _param_name(param) -> str:
    if param is None:
        return "a value"
    if _is_option(param):
        return max(param.opts, key=len)
    return (param.name or "argument").upper()


def usage_error_text(exc: click.UsageError, command: str) -> tuple[str, str]:
    """A click usage error as igops' own (message, hint): what was wrong and how to fix it."""
    help_hint = f"see `igops {command} --help` for its options and examples" if command != "igops" \
        else "see `igops --help` for the commands"
    if isinstance(exc, click.MissingParameter):
        name = _param_name(exc.param)
        kind = "option" if _is_option(exc.param) else "argument"
        metavar = exc.param.make_metavar(exc.ctx) if _is_option(exc.param) and exc.ctx else ""
        give = f"{name} {metavar}".strip() if kind == "option" else name
        return f"missing {kind} {name}", f"give {give}; {help_hint}"
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--force":
        return _force_refusal(exc, help_hint)
    if isinstance(exc, click.NoSuchOption):
        close = list(exc.possibilities or [])
        if close:
            return f"unknown option {exc.option_name}", f"did you mean {' or '.join(close)}? {help_hint}"
        return f"unknown option {exc.option_name}", help_hint
    if isinstance(exc, click.BadParameter):
        detail = _plain_words(exc) or exc.message.rstrip(".")
        return f"bad value for {_param_name(exc.param)}: {detail}", help_hint
    unknown = re.match(r"No such command '(.+?)'", exc.message)
    if unknown and exc.ctx is not None:
        return _unknown_verb(exc, unknown.group(1), help_hint)
    message = exc.format_message().rstrip(".")
    return message[:1].lower() + message[1:], help_hint


def _unknown_verb(exc: click.UsageError, word: str, help_hint: str) -> tuple[str, str]:
    """A word in a verb's place that is no verb: the close verbs, as whole command lines."""
    import difflib

    verbs = list(getattr(exc.ctx.command, "commands", {}))
    close = difflib.get_close_matches(word, verbs, n=3, cutoff=0.6)
    suggestion = ("did you mean: " + " or ".join(f"{exc.ctx.command_path} {verb}" for verb in close) + "? "
                  if close else "")
    also = getattr(exc, "igops_hint", None)
    return f"no such command {word!r}", f"{suggestion}{also + '; ' if also else ''}{help_hint}"


def _force_refusal(exc: click.NoSuchOption, help_hint: str) -> tuple[str, str]:
    """`--force` is refused by name: elsewhere it means "do not ask" (patronictl) as often as
    "override the safety checks", and igops will not guess which was meant."""
    message = "--force is not an igops option"
    verb = exc.ctx.command if exc.ctx is not None and exc.ctx.parent is not None else None
    if verb is None or getattr(verb, "commands", None) is not None:
        return message, ("to skip the confirmation prompt pass --yes; to override a command's safety checks "
                         f"pass --accept-risk (pg and redis switchover, failover, rejoin); {help_hint}")
    names = {name for param in verb.params for name in param.opts}
    meanings = []
    if "--yes" in names:
        meanings.append("--yes to skip the confirmation prompt")
    if "--accept-risk" in names:
        meanings.append("--accept-risk to override the safety checks (the plan names each risk accepted)")
    if not meanings:
        return message, f"drop it: this command neither asks for confirmation nor overrides a check; {help_hint}"
    if "--accept-risk" not in names:
        meanings[0] += " (this command has no safety override)"
    return message, f"pass {', or '.join(meanings)}; {help_hint}"


def _plain_words(exc: click.BadParameter) -> str | None:
    """What a typed argument's validator (pydantic, behind typer) rejected, in igops' words."""
    from igops.errors import validation_words

    errors = getattr(exc.__cause__, "errors", None)
    return validation_words(errors()[0]) if callable(errors) and errors() else None


def _watch_seconds_given(argv: list[str]) -> list[str]:
    """`--watch [SECONDS]`: the parser knows no option whose value may be left out, so a bare
    `--watch` gets the default here (before a `--`: after it, the words are a remote command's)."""
    end = argv.index("--") if "--" in argv else len(argv)
    given = []
    for index, word in enumerate(argv):
        given.append(word)
        following = argv[index + 1] if index + 1 < end else ""
        if index < end and word == "--watch" and not re.fullmatch(r"\d+(\.\d*)?|\.\d+", following):
            given.append(str(WATCH_DEFAULT_SECONDS))
    return given


def _wants_json(argv: list[str]) -> bool:
    """--json anywhere before a `--` (after it, the words belong to a remote command)."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in words


def _report_usage_error(exc: click.UsageError, argv: list[str]) -> int:
    from igops.errors import ExitCode
    from igops.output import Output

    command = _command_name(exc, argv)
    message, hint = usage_error_text(exc, command)
    Output(command, json_mode=_wants_json(argv)).fail(
        f"{message} — {hint}", ExitCode.USAGE, {"message": message, "hint": hint})
    return int(ExitCode.USAGE)


def main(argv: list[str] | None = None) -> None:
    """Run `igops`. Usage errors (a missing option, an unknown flag, a bad value) are reported
    like every other error: one igops line on stderr and, with --json, one envelope on stdout."""
    argv = _watch_seconds_given(list(sys.argv[1:] if argv is None else argv))
    command = build_command()
    try:
        code = command.main(args=argv, prog_name="igops", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:
        code = _report_usage_error(exc, argv)
    except typer.Abort:
        click.echo("aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
