"""The facts `igops --help` shows, in a module that imports nothing heavy: the commands with
their one-line help, the root's help and its options. igops.cli builds the typer root from them;
igops.launcher renders the root's help from them without importing typer."""

from __future__ import annotations

from dataclasses import dataclass

from igops.commands.options import TableFormat

ROOT_HELP = "Operations for a photo-sharing fleet: snapshots, cache warming, failover, shard moves, deploys and checks."

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
    "deploy": (
        "deploy",
        "Rolling deploys of the app with a canary analysis: `igops deploy [REV]`, `deploy rollback`, "
        "`deploy releases`, `deploy pending`.",
    ),
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

FORMAT_METAVAR = "|".join(item.value for item in TableFormat)
FORMAT_HELP = (
    "Tables as: table (ruled on a terminal), plain (aligned, no rules) or tsv (a header row, then "
    "tab-separated rows; nothing else on stdout)."
)
WIDE_HELP = "Every column of a table, even where the terminal is too narrow for them."


@dataclass(frozen=True)
class RootOption:
    names: tuple[str, ...]
    help: str
    metavar: str | None = None  # a flag has none
    shown_default: str | None = None  # what the help shows as [default: …]


# The root's options in the order its help lists them. The last three are typer's and click's
# own (completion, help), listed as typer words them.
ROOT_OPTIONS: dict[str, RootOption] = {
    "config": RootOption(
        ("--config", "-c"), "Inventory file (default: $IGOPS_CONFIG, then /etc/igops/igops.toml).", "FILE"
    ),
    "json": RootOption(("--json",), "Only a JSON envelope on stdout."),
    "verbose": RootOption(("--verbose", "-v"), "More detail on stderr."),
    "format": RootOption(("--format",), FORMAT_HELP, FORMAT_METAVAR, TableFormat.table.value),
    "wide": RootOption(("--wide",), WIDE_HELP),
    "version": RootOption(("--version",), "Print the version and exit."),
    "install_completion": RootOption(("--install-completion",), "Install completion for the current shell."),
    "show_completion": RootOption(
        ("--show-completion",), "Show completion for the current shell, to copy it or customize the installation."
    ),
    "help": RootOption(("-h", "--help"), "Show this message and exit."),
}
