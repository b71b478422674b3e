"""Every verb's --help, through the real command line: examples, and metavars in words."""

import re
import shlex

import pytest

from igops.cli import build_command
from tests.conftest import run_igops


def verbs(group, path=()):
    for name, sub in group.commands.items():
        if getattr(sub, "commands", None) is not None:
            yield from verbs(sub, (*path, name))
        else:
            yield (*path, name)


VERBS = list(verbs(build_command()))
PYTHON_TYPES = re.compile(r"<[a-z][a-z \[\]]*>|\{[a-z_]+\}|\blist\[|\bint range\b|\bfloat range\b")


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
        command, rest = root, words[words.index("igops") + 1:]
        while getattr(command, "commands", None) is not None:
            # `igops deploy [REV]` is `igops deploy run [REV]`
            name = rest.pop(0) if rest and rest[0] in command.commands else "run"
            command = command.commands[name]
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
