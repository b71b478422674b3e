"""The global options as every command sees them. Apart from commands/common.py, so that
igops.cli (and with it `igops --help`) imports them without the output boundary behind common."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# `--watch` without SECONDS (the command line gets this inserted: see igops.cli).
WATCH_DEFAULT_SECONDS = 2


class TableFormat(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member (its value, not Class.member)
    """How tables print: `table` ruled on a terminal, `plain` aligned columns without rules,
    `tsv` a header row and tab-separated rows, nothing else on stdout."""

    table = "table"
    plain = "plain"
    tsv = "tsv"


@dataclass
class GlobalOptions:
    config: str | None = None
    json: bool = False
    verbose: bool = False
    # Every mutating command's --reason (a ticket id or a sentence, kept in the journal and
    # audit) and --wait (seconds to wait for a held lease instead of exiting 4).
    reason: str | None = None
    wait: float = 0.0
    format: TableFormat = TableFormat.table
    wide: bool = False
