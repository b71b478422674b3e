"""The root of the `igops` command: global options and the command groups."""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer
import typer.main

# The click that typer vendors: its exceptions are the ones a bad command line raises.
from typer._click import core as click_core, exceptions as click
from typer._click.utils import echo
from typer.core import TyperCommand, TyperGroup

from igops import __version__
from igops.commands.options import WATCH_DEFAULT_SECONDS, GlobalOptions, TableFormat

if TYPE_CHECKING:
    from typer._click.formatting import HelpFormatter
    from typer._click.shell_completion import CompletionItem

# Every command under `igops`, in the order `igops --help` lists them: the module of
# igops.commands that defines it, and its help in one line. A module is imported only when its
# command runs, completes or shows its own help, so `igops --help` reads the lines here. A
# group's line is its help (`igops snapshot --help` too); a single command's is the first
# paragraph of its docstring (tests/unit/test_cli_help.py keeps the two equal).
COMMANDS: dict[str, tuple[str, str]] = {
    "hosts": ("fleet", "List the inventory's hosts."),
    "exec": ("fleet", "Run a command on many hosts in parallel and summarise the results."),
    "status": ("fleet", "Fleet overview: every host's reachability, then every service's state."),
    "check": (
        "check",
        "Check the whole fleet at once under one deadline: SSH, health URLs, Postgres, PgBouncer, "
        "Redis, memcached, disks, frozen filesystems, munin-node, snapshots and Pingdom.",
    ),
    "snapshot": (
        "snapshot",
        "Consistent EBS snapshots of frozen XFS filesystems: create, list, keep, delete, prune, "
        "restore, and the scheduled `cron`.",
    ),
    "lab": ("lab", "Bring the lab fleet up or down on this machine's loopback addresses."),
    "warm": (
        "warm",
        "Page-cache warming: capture which pages are cached, warm exactly those elsewhere, compare two hosts.",
    ),
    "munin": ("munin", "Munin: install igops' plugins (app, Postgres, Redis, PgBouncer) and read munin-node."),
    "pingdom": (
        "pingdom",
        "Pingdom (API 3.1): keep the checks in step with the inventory, show them, open maintenance windows.",
    ),
    "pagerduty": ("pagerduty", "PagerDuty (Events API v2): test the paging path, list the incidents igops opened."),
    "shard": (
        "shard",
        "Logical shards: decode and encode ids, show the map, create the schemas, move shards "
        "between clusters online, verify copies, rebalance.",
    ),
    "deploy": ("deploy", "Rolling deploys of the app: `igops deploy [REV]`, `deploy rollback`, `deploy releases`."),
    "pg": (
        "pg",
        "Postgres clusters (repmgr behind PgBouncer): status, planned switchover, failover of a "
        "dead primary, rejoin of a former primary, WAL archiving (pg archive).",
    ),
    "redis": (
        "redis",
        "Redis master and replicas: status, planned switchover, failover of a dead master, rejoin of a former master.",
    ),
    "ops": ("ops", "Operations: what runs now, what was interrupted, their journals and the audit trail."),
}


class CommandTable(TyperGroup):
    """The root group: its commands are the entries of COMMANDS, each built from its module on
    first use (run, completed, or its own help shown) and given the global options and help
    texts then. Listing them (`igops --help`, completing a command name) imports nothing."""

    def list_commands(self, ctx: click_core.Context | None) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click_core.Context | None, cmd_name: str) -> click_core.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = _load(cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click_core.Context, formatter: HelpFormatter) -> None:
        listed = [(name, _listed(name)) for name in self.list_commands(ctx)]
        limit = formatter.width - 6 - max(len(name) for name, _ in listed)
        with formatter.section("Commands"):
            formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in listed])

    def shell_complete(self, ctx: click_core.Context, incomplete: str) -> list[CompletionItem]:
        from typer._click.shell_completion import CompletionItem

        names = [name for name in self.list_commands(ctx) if name.startswith(incomplete)]
        return [
            CompletionItem(name, help=_listed(name).get_short_help_str()) for name in names
        ] + click_core.Command.shell_complete(self, ctx, incomplete)


def _listed(name: str) -> TyperCommand:
    """What `igops --help` lists for a command: its name and one-line help, nothing imported."""
    return TyperCommand(name, help=COMMANDS[name][1], rich_markup_mode=None)


def _load(name: str) -> click_core.Command:
    """Build the click command `name` from its module in igops.commands, as the root's own: the
    global options after it, metavars in words, examples."""
    module = importlib.import_module(f"igops.commands.{COMMANDS[name][0]}")
    holder = typer.Typer(rich_markup_mode=None, add_completion=False)
    holder.callback()(lambda: None)  # a group, however many commands it holds
    if hasattr(module, "register"):
        module.register(holder)
    else:
        holder.add_typer(module.app, name=name, help=COMMANDS[name][1])
    group = typer.main.get_command(holder)
    assert isinstance(group, TyperGroup), "a Typer with a callback is a group"
    command = group.commands[name]
    _prepare(command, (name,))
    return command


app = typer.Typer(
    name="igops",
    cls=CommandTable,
    help="Operations for a photo-sharing fleet: snapshots, cache warming, failover, shard moves, deploys and checks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


FORMAT_METAVAR = "|".join(item.value for item in TableFormat)
FORMAT_HELP = (
    "Tables as: table (ruled on a terminal), plain (aligned, no rules) or tsv (a header row, then "
    "tab-separated rows; nothing else on stdout)."
)
WIDE_HELP = "Every column of a table, even where the terminal is too narrow for them."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: str = typer.Option(
        None,
        "--config",
        "-c",
        metavar="FILE",
        help="Inventory file (default: $IGOPS_CONFIG, then /etc/igops/igops.toml).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Only a JSON envelope on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
    table_format: TableFormat = typer.Option(TableFormat.table, "--format", metavar=FORMAT_METAVAR, help=FORMAT_HELP),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = GlobalOptions(config=config, json=json_output, verbose=verbose, format=table_format, wide=wide)


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


def _global_option_params(names: dict[str, list[str]]) -> list[click_core.Parameter]:
    """The global options as options of a subcommand, built by typer itself from a command that
    carries them, under the `names` still free there. They store into the same GlobalOptions as
    the root's."""
    carrier = typer.Typer(add_completion=False)

    @carrier.command()
    def carry(
        # Names of their own: click hands a parsed value to every parameter of the same name, so a
        # subcommand's own `config` (munin fetch --config) would reach _store_config too.
        global_config: str = typer.Option(
            None,
            *names["config"],
            metavar="FILE",
            expose_value=False,
            callback=_store_config,
            help="Inventory file (also accepted before the command).",
        ),
        global_verbose: bool = typer.Option(
            False,
            *names["verbose"],
            expose_value=False,
            callback=_store_verbose,
            help="More detail on stderr (also accepted before the command).",
        ),
        global_format: TableFormat = typer.Option(
            None, *names["format"], metavar=FORMAT_METAVAR, expose_value=False, callback=_store_format, help=FORMAT_HELP
        ),
        global_wide: bool = typer.Option(
            False, *names["wide"], expose_value=False, callback=_store_wide, help=WIDE_HELP
        ),
    ) -> None:
        pass

    wanted = {name for given in names.values() for name in given}
    return [param for param in typer.main.get_command(carrier).params if set(param.opts) & wanted]


GLOBAL_OPTION_NAMES = {
    "config": ("--config", "-c"),
    "verbose": ("--verbose", "-v"),
    "format": ("--format",),
    "wide": ("--wide",),
}


def _operator_option_params() -> list[click_core.Parameter]:
    """--reason and --wait, which every mutating verb (one with --dry-run) takes: they reach the
    operation engine through the GlobalOptions, like -c."""
    carrier = typer.Typer(add_completion=False)

    @carrier.command()
    def carry(
        operation_reason: str = typer.Option(
            None,
            "--reason",
            metavar="TEXT",
            expose_value=False,
            callback=_store_reason,
            help="Why: a ticket id or a sentence, kept in the journal and audit "
            "trail and shown to anyone the operation blocks.",
        ),
        operation_wait: float = typer.Option(
            None,
            "--wait",
            metavar="SECONDS",
            expose_value=False,
            callback=_store_wait,
            help="Wait up to SECONDS for another operation's lease on the same targets instead of exiting 4.",
        ),
    ) -> None:
        pass

    return [param for param in typer.main.get_command(carrier).params if param.opts[0] in ("--reason", "--wait")]


def _prepare(command: click_core.Command, path: tuple[str, ...]) -> None:
    """Give every verb under `command` (itself, if it is one) the global options and its help."""
    subcommands = getattr(command, "commands", None)
    if subcommands is not None:
        for name, sub in subcommands.items():
            _prepare(sub, (*path, name))
        return
    _accept_global_options(command)
    _explain_verb(command, " ".join(path))


def _accept_global_options(verb: click_core.Command) -> None:
    """Give the verb the global options too, as every command has --json, so
    `igops hosts --config FILE` works like `igops --config FILE hosts`; a value given after the
    subcommand wins. A name a subcommand already uses for its own option keeps that meaning
    (`munin fetch --config` asks for plugin configs; -c still names the inventory there)."""
    taken = {name for param in verb.params for name in [*param.opts, *param.secondary_opts]}
    verb.params.extend(
        _global_option_params(
            {key: [name for name in given if name not in taken] for key, given in GLOBAL_OPTION_NAMES.items()}
        )
    )
    if any("--dry-run" in param.opts for param in verb.params):
        verb.params.extend(_operator_option_params())


def _explain_verb(verb: click_core.Command, name: str) -> None:
    """The verb's `--help`: metavars in words (never a Python type) and its examples; and the
    completion of the inventory's names (hosts, roles, clusters, nodes, shards) for its values."""
    from igops.commands import completion, help_text

    for param in verb.params:
        if not getattr(param, "is_flag", False):
            param.metavar = help_text.metavar_for(name, param.name, param.metavar)
            complete = completion.completer_for(name, param.name)
            if complete is not None and param._custom_shell_complete is None:
                param._custom_shell_complete = complete
        if param.param_type_name == "argument":
            # typer prints an argument's Python type beside its name; the name says it.
            param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]  # typer's parameters have it
            # The usage line names it in words, `CLUSTER` (typer writes a required one `{CLUSTER}`).
            param.get_usage_pieces = functools.partial(_usage_pieces, param)  # type: ignore[method-assign]
        # A number's bounds are still checked, but not printed as click's `[0.1<=x<=86400]`.
        param._get_number_range_help_str = lambda: None  # type: ignore[attr-defined]  # typer's parameters have it
    verb.epilog = verb.epilog or help_text.examples_epilog(name)


def _usage_pieces(argument: click_core.Parameter, ctx: click_core.Context) -> list[str]:
    """An argument on a usage line: `CLUSTER` when required, `[CLUSTER]` when not, and `...` after
    it when it takes several (unless its metavar already says so, as `-- COMMAND [ARG...]`)."""
    name = argument.metavar or (argument.name or "argument").upper()
    if not argument.required:
        name = f"[{name}]"
    if argument.nargs != 1 and "..." not in name:
        name += "..."
    return [name]


def build_command() -> click_core.Command:
    """The click command behind `igops`: each command is built when first asked for
    (CommandTable), the global options accepted before and after it."""
    return typer.main.get_command(app)


def subcommand(group: click_core.Command, name: str) -> click_core.Command | None:
    """The command `name` under `group`, or None: built on demand under the root."""
    get = getattr(group, "get_command", None)
    found: click_core.Command | None = get(None, name) if get is not None else None
    return found


def subcommand_names(group: click_core.Command) -> list[str]:
    """The names of the commands under `group`, without building any (none for a verb)."""
    list_commands = getattr(group, "list_commands", None) if getattr(group, "commands", None) is not None else None
    names: list[str] = list_commands(None) if list_commands is not None else []
    return names


def verbs(
    group: click_core.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click_core.Command]]:
    """(path, verb) for every verb under `group`, e.g. (("shard", "id", "decode"), command):
    this builds every command, for the tests that walk them all."""
    for name in subcommand_names(group):
        sub = subcommand(group, name)
        assert sub is not None, "a group builds each command it lists"
        if getattr(sub, "commands", None) is not None:
            yield from verbs(sub, (*path, name))
        else:
            yield (*path, name), sub


def _command_name(exc: click.UsageError, argv: list[str]) -> str:
    """The verb as the JSON envelope names it ("shard move"): from the failed context, or, when
    the parser kept none, from the command names at the start of the line."""
    if exc.ctx is not None and exc.ctx.parent is not None:
        return " ".join(exc.ctx.command_path.split()[1:])
    group = build_command()
    words: list[str] = []
    for word in argv:
        if word.startswith("-"):
            continue
        sub = subcommand(group, word) if word in subcommand_names(group) else None
        if sub is None:
            break
        words.append(word)
        group = sub
    return " ".join(words) or "igops"


def _is_option(param: click_core.Parameter | None) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _param_name(param: click_core.Parameter | None) -> str:
    if param is None:
        return "a value"
    if _is_option(param):
        return max(param.opts, key=len)
    return (param.name or "argument").upper()


def usage_error_text(exc: click.UsageError, command: str) -> tuple[str, str]:
    """A click usage error as igops' own (message, hint): what was wrong and how to fix it."""
    help_hint = (
        f"see `igops {command} --help` for its options and examples"
        if command != "igops"
        else "see `igops --help` for the commands"
    )
    if isinstance(exc, click.MissingParameter):
        name = _param_name(exc.param)
        kind = "option" if _is_option(exc.param) else "argument"
        # The option's metavar as its --help shows it (typer's parameters have no make_metavar).
        metavar = (
            (exc.param.display_type_rich(exc.ctx) or "")
            if exc.param is not None and _is_option(exc.param) and exc.ctx
            else ""
        )
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

    assert exc.ctx is not None, "usage_error_text asks only with a context"
    verbs = subcommand_names(exc.ctx.command)
    close = difflib.get_close_matches(word, verbs, n=3, cutoff=0.6)
    suggestion = (
        "did you mean: " + " or ".join(f"{exc.ctx.command_path} {verb}" for verb in close) + "? " if close else ""
    )
    also = getattr(exc, "igops_hint", None)
    return f"no such command {word!r}", f"{suggestion}{also + '; ' if also else ''}{help_hint}"


def _force_refusal(exc: click.NoSuchOption, help_hint: str) -> tuple[str, str]:
    """`--force` is refused by name: elsewhere it means "do not ask" (patronictl) as often as
    "override the safety checks", and igops will not guess which was meant."""
    message = "--force is not an igops option"
    verb = exc.ctx.command if exc.ctx is not None and exc.ctx.parent is not None else None
    if verb is None or getattr(verb, "commands", None) is not None:
        return message, (
            "to skip the confirmation prompt pass --yes; to override a command's safety checks "
            f"pass --accept-risk (pg and redis switchover, failover, rejoin); {help_hint}"
        )
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
    words = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in words


def _report_usage_error(exc: click.UsageError, argv: list[str]) -> int:
    from igops.errors import ExitCode
    from igops.output import Output

    command = _command_name(exc, argv)
    message, hint = usage_error_text(exc, command)
    Output(command, json_mode=_wants_json(argv)).fail(
        f"{message} — {hint}", ExitCode.USAGE, {"message": message, "hint": hint}
    )
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
        echo("aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
