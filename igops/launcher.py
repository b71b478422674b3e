"""The `igops` program's entry point: the root's help and the version without importing typer.

`igops --help` is the first thing a newcomer runs, and typer (with the click it vendors) takes
about as long to import as Python takes to start. The root's help holds only what
igops.command_table lists, so it is laid out here as click lays out help; every other command
line goes to igops.cli. tests/unit/test_cli_help.py keeps the two layouts equal at every width.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

from igops.command_table import COMMANDS, ROOT_HELP, ROOT_OPTIONS

USAGE = "Usage: igops [OPTIONS] COMMAND [ARGS]..."
# click's layout: definition lists' first column at most 30 wide, 2 spaces after it; text at most
# 78 columns, at least 50; help of listed commands cut to what fits on one line.
FIRST_COLUMN_MAX = 30
COLUMN_SPACING = 2
MAX_WIDTH = 80
MIN_WIDTH = 50


def help_width() -> int:
    return max(min(shutil.get_terminal_size().columns, MAX_WIDTH) - 2, MIN_WIDTH)


def _wrap(text: str, width: int, indent: str = "") -> str:
    return textwrap.TextWrapper(width, initial_indent=indent, subsequent_indent=indent, replace_whitespace=False).fill(
        text
    )


def _definitions(rows: list[tuple[str, str]], width: int, indent: int) -> list[str]:
    first = min(max(len(name) for name, _ in rows), FIRST_COLUMN_MAX) + COLUMN_SPACING
    lines = []
    for name, text in rows:
        head = " " * indent + name
        if len(name) <= first - COLUMN_SPACING:
            head += " " * (first - len(name))
        else:
            lines.append(head)
            head = " " * (first + indent)
        wrapped = _wrap(text, max(width - first - 2, 10)).splitlines() or [""]
        lines.append(head + wrapped[0])
        lines += [" " * (first + indent) + line for line in wrapped[1:]]
    return lines


def short_help(text: str, limit: int) -> str:
    """A command's help cut to `limit` characters: whole up to the first sentence's end if that
    fits, else the words that fit followed by "..."."""
    words = text.split()
    length = 0
    for index, word in enumerate(words):
        length += len(word) + (index > 0)
        if length > limit:
            break
        if word.endswith("."):
            return " ".join(words[: index + 1])
        if length == limit and index != len(words) - 1:
            break
    else:
        return " ".join(words)
    length += len("...")
    while index > 0:
        length -= len(words[index]) + 1
        if length <= limit:
            break
        index -= 1
    return " ".join(words[:index]) + "..."


def _option_row(option_names: tuple[str, ...], metavar: str | None) -> str:
    # Short forms first, as click lists them.
    text = ", ".join(sorted(option_names, key=lambda name: len(name) - len(name.lstrip("-"))))
    return f"{text} {metavar}" if metavar else text


def root_help(width: int | None = None) -> str:
    width = help_width() if width is None else width
    options = [
        (
            _option_row(option.names, option.metavar),
            option.help + (f"  [default: {option.shown_default}]" if option.shown_default else ""),
        )
        for option in ROOT_OPTIONS.values()
    ]
    limit = width - 6 - max(len(name) for name in COMMANDS)
    commands = [(name, short_help(line, limit)) for name, (_, line) in COMMANDS.items()]
    lines = [
        USAGE,
        "",
        _wrap(ROOT_HELP, width, "  "),
        "",
        "Options:",
        *_definitions(options, width, 2),
        "",
        "Commands:",
        *_definitions(commands, width, 2),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    # Completion asks through the environment, and is typer's to answer.
    if not any(name.endswith("_COMPLETE") for name in os.environ):
        if argv in (["--help"], ["-h"]):
            sys.stdout.write(root_help())
            sys.exit(0)
        if not argv:
            sys.stderr.write(root_help())
            sys.exit(2)
        if argv == ["--version"]:
            from igops import __version__

            sys.stdout.write(f"igops {__version__}\n")
            sys.exit(0)
    from igops.cli import main as full_main

    full_main()
