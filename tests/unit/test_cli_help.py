"""Every verb's --help, through the real command line: examples, and metavars in words."""

import re
import shlex

import pytest

from igops.cli import COMMANDS, build_command, subcommand, verbs
from tests.conftest import run_igops

VERBS = [path for path, _ in verbs(build_command())]
# Python types (`<str>`, `<list[str]>`, `list[`, `int range`), typer's braces around a parameter
# (`{host}`, `{CLUSTER}`, `{-- COMMAND [ARG...]}`) and click's range notation (`[0.1<=x<=86400]`,
# `[x>=1]`): none is in words.
PYTHON_TYPES = re.compile(
    r"<[a-z][a-z \[\]]*>|\{[A-Za-z_ .\[\]-]+\}|\blist\[|\bint range\b|\bfloat range\b|[<>]=x\b|\bx[<>]="
)


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_verb_help_has_an_example_and_no_python_type(verb):
    result = run_igops(*verb, "--help")
    assert result.returncode == 0, result.stderr
    assert "Examples:\n" in result.stdout
    examples = result.stdout.split("Examples:\n", 1)[1].strip().splitlines()
    assert 1 <= len(examples) <= 3 and all(line.strip().startswith(("igops ", "sudo igops ")) for line in examples)
    assert not PYTHON_TYPES.search(result.stdout), PYTHON_TYPES.search(result.stdout).group()


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_example_parses(verb):
    """An example that the parser refuses would teach the wrong thing."""
    from igops.commands.help_text import EXAMPLES

    root = build_command()
    for example in EXAMPLES[" ".join(verb)]:
        words = shlex.split(example)
        rest = words[words.index("igops") + 1 :]
        name, rest = rest[0], rest[1:]
        command = subcommand(root, name)
        while getattr(command, "commands", None) is not None:
            # `igops deploy [REV]` is `igops deploy run [REV]`
            name = rest.pop(0) if rest and rest[0] in command.commands else "run"
            command = subcommand(command, name)
        command.make_context(name, rest)  # raises on a usage error


def test_rejoin_accept_risk_has_its_own_text():
    for cluster_kind in ("pg", "redis"):
        text = run_igops(cluster_kind, "rejoin", "--help").stdout
        switchover = run_igops(cluster_kind, "switchover", "--help").stdout
        force = " ".join(text.split("--accept-risk", 1)[1].split("--dry-run", 1)[0].split())
        assert "discarded" in force
        assert force not in " ".join(switchover.split())


def test_deploy_help_shows_the_rev_form():
    assert "igops deploy [REV]" in run_igops("deploy", "--help").stdout


def test_the_verbs_are_all_there():
    """The walk above builds the commands on demand: it must still find every verb."""
    assert len(VERBS) >= 50 and ("shard", "id", "decode") in VERBS and ("hosts",) in VERBS


@pytest.mark.parametrize("name", COMMANDS)
def test_the_listed_help_is_the_commands_own(name):
    """`igops --help` lists each command's line from igops.command_table.COMMANDS without importing it:
    that line is the group's help, or a single command's first paragraph."""
    command = subcommand(build_command(), name)
    first_paragraph = " ".join(command.help.split("\n\n")[0].split())
    assert first_paragraph == " ".join(COMMANDS[name][1].split())


def test_help_lists_every_command_without_importing_one():
    code = (
        "import sys; sys.argv = ['igops', '--help']\n"
        "from igops.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('igops.commands.') "
        "and m != 'igops.commands.options'))"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOADED []" in result.stdout, result.stdout
    assert all(f"  {name} " in result.stdout for name in COMMANDS)


@pytest.mark.parametrize("width", [50, 51, 60, 72, 78, 100, 160])
def test_the_launchers_root_help_is_typers_at_every_width(width):
    """igops.launcher answers `igops --help` without typer: its layout must be the one typer
    gives, byte for byte, whatever the terminal's width."""
    import typer._click.core as click_core

    from igops.launcher import root_help

    root = build_command()
    with click_core.Context(root, info_name="igops", terminal_width=width, **root.context_settings) as ctx:
        assert root_help(width) == root.get_help(ctx) + "\n"


def test_the_launcher_answers_help_and_version_without_typer_and_hands_on_the_rest():
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['igops'] + sys.argv[1:]\n"
        "from igops.launcher import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('TYPER', any(m == 'typer' or m.startswith('typer.') for m in sys.modules), code, file=sys.stderr)"
    )

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)

    for argv in (["--help"], ["-h"], ["--version"]):
        result = run(*argv)
        assert "TYPER False 0" in result.stderr and result.stdout, (argv, result.stderr)
    bare = run()
    assert "TYPER False 2" in bare.stderr and "Commands:" in bare.stderr and not bare.stdout
    # Anything else is igops.cli's: a group's help, a usage error.
    assert "TYPER True 0" in run("hosts", "--help").stderr
    assert "TYPER True 2" in run("--no-such-option").stderr
