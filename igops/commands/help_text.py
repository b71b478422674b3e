"""What `--help` shows beyond each option's own text: metavars in words and real examples.

Kept in one table, applied to the built command tree by `igops.cli.build_command`, so every
verb gets both and a test can walk the tree to check it."""

from __future__ import annotations

# A parameter's metavar by its name; "verb:name" wins over the bare name.
METAVARS = {
    "pattern": "PATTERN",
    "role": "ROLE",
    "host": "HOST",
    "hook": "COMMAND",
    "mount": "PATH",
    "parallel": "N",
    "concurrency": "N",
    "top": "N",
    "count": "N",
    "limit": "N",
    "max_moves": "N",
    "max_fail": "N[%]",
    "health_passes": "N",
    "sequence": "N",
    "keep_last": "N",
    "keep_hourly": "N",
    "keep_daily": "N",
    "keep_weekly": "N",
    "keep_monthly": "N",
    "batch": "N[%]",
    "timeout": "SECONDS",
    "deadline": "SECONDS",
    "health_timeout": "SECONDS",
    "group": "GROUP",
    "at": "DIR",
    "paths": "DIR",
    "path": "DIR",
    "profile": "PROFILE",
    "source": "HOST",
    "target": "HOST",
    "to": "HOST",
    "match": "size|mtime|always",
    "plugin": "PLUGIN",
    "window": "DURATION",
    "duration": "DURATION",
    "description": "TEXT",
    "shard": "SHARD",
    "by": "count|bytes",
    "cluster": "CLUSTER",
    "node": "NODE",
    "rev": "REV",
    "shard move:to": "CLUSTER",
    "pg switchover:to": "NODE",
    "pg failover:to": "NODE",
    "redis switchover:to": "NODE",
    "redis failover:to": "NODE",
    "deploy rollback:to": "REV",
    "deploy run:source": "DIR",
    "deploy pending:source": "DIR",
    "hosts": "HOST,...",
    "analysis": "SECONDS",
    "on_inconclusive": "hold|continue|rollback",
    "shard id decode:ids": "ID",
}

EXAMPLES = {
    "hosts": ["igops hosts", "igops hosts 'db*' --role postgres", "igops hosts --json"],
    "exec": ["igops exec --role app -- uptime", "igops exec --host db1 --dry-run -- df -h /data"],
    "status": ["igops status", "igops status --role redis --json", "igops status --watch 5"],
    "check": ["igops check", "igops check --nagios --only snapshot", "igops check --quiet --page"],
    "snapshot create": ["igops snapshot create db2", "igops snapshot create db2 --dry-run"],
    "snapshot list": ["igops snapshot list", "igops snapshot list --host db2", "igops snapshot list --format tsv"],
    "snapshot show": ["igops snapshot show GROUP"],
    "snapshot prune": ["igops snapshot prune --keep-last 3 --keep-daily 7 --dry-run", "igops snapshot prune --dry-run"],
    "snapshot delete": ["igops snapshot delete GROUP --dry-run", "igops snapshot delete GROUP --accept-risk --yes"],
    "snapshot keep": ["igops snapshot keep GROUP --yes", "igops snapshot keep GROUP --release --yes"],
    "snapshot cron": ["igops snapshot cron --dry-run", "igops snapshot cron --yes -c /etc/igops/igops.toml"],
    "snapshot drill": ["igops snapshot drill main --onto db4 --dry-run", "igops snapshot drill main --onto db4 --yes"],
    "snapshot restore": [
        "igops snapshot restore GROUP --onto db3 --dry-run",
        "igops snapshot restore main --to '2026-12-04 14:02:00' --onto db3 --dry-run",
    ],
    "lab up": ["sudo igops lab up"],
    "lab down": ["sudo igops lab down"],
    "lab status": ["igops lab status", "igops lab status --json"],
    "warm capture": ["igops warm capture db1 --output db1.profile"],
    "warm apply": ["igops warm apply db1.profile --to db2"],
    "warm copy": ["igops warm copy db1 --to db2", "igops warm copy db1 --to db2 --dry-run"],
    "warm diff": ["igops warm diff db1 db2"],
    "warm show": ["igops warm show db2 /var/lib/postgresql", "igops warm show db2 /var/lib/postgresql --watch 10"],
    "munin install": ["igops munin install --dry-run", "igops munin install --role postgres --yes"],
    "munin fetch": ["igops munin fetch db1", "igops munin fetch db1 cpu"],
    "pingdom sync": ["igops pingdom sync --dry-run", "igops pingdom sync --yes"],
    "pingdom status": ["igops pingdom status", "igops pingdom status --window 7d"],
    "pingdom maintenance": ["igops pingdom maintenance --for 30m --description 'db switchover'"],
    "pagerduty test": ["igops pagerduty test"],
    "pagerduty open": ["igops pagerduty open", "igops pagerduty open --json"],
    "shard map": ["igops shard map", "igops shard map --shards"],
    "shard init": ["igops shard init --dry-run"],
    "shard move": ["igops shard move 17 --to c02 --dry-run", "igops shard move --resume 3"],
    "shard moves": ["igops shard moves", "igops shard moves --shard 17"],
    "shard verify": ["igops shard verify 17"],
    "shard rebalance": ["igops shard rebalance --by bytes --dry-run"],
    "shard id decode": ["igops shard id decode 1387263000609081345"],
    "shard id encode": ["igops shard id encode --time 2026-12-03T04:00:00 --shard 17 --seq 5"],
    "deploy run": ["igops deploy", "igops deploy v1.4.2 --dry-run", "igops deploy v1.4.2 --canary-only --analysis 300"],
    "deploy pending": ["igops deploy pending", "igops deploy pending v1.4.2 --json"],
    "deploy rollback": ["igops deploy rollback", "igops deploy rollback --to REV --dry-run"],
    "deploy releases": ["igops deploy releases"],
    "pg status": ["igops pg status", "igops pg status c01 --watch 1", "igops pg status --wide --format plain"],
    "pg switchover": [
        "igops pg switchover c01 --to db2 --dry-run",
        "igops pg switchover c01 --to db2 --yes --reason 'INC-1234: db1 kernel update'",
    ],
    "ops list": ["igops ops list", "igops ops list --watch 5", "igops ops list --all --json"],
    "ops show": ["igops ops show 20261203-071530-a3f9"],
    "ops history": ["igops ops history --since 24h", "igops ops history --target main --limit 20"],
    "ops resume": ["igops ops resume 20261203-071530-a3f9 --dry-run", "igops ops resume 20261203-071530-a3f9 --yes"],
    "ops abort": ["igops ops abort 20261203-071530-a3f9 --dry-run", "igops ops abort 20261203-071530-a3f9 --yes"],
    "ops kinds": ["igops ops kinds"],
    "pg failover": ["igops pg failover c01 --dry-run", "igops pg failover c01 --to db2"],
    "pg rejoin": ["igops pg rejoin db1 --dry-run", "igops pg rejoin db1"],
    "pg archive setup": [
        "igops pg archive setup c01 --dry-run",
        "igops pg archive setup c01 --restart-primary --yes --reason 'INC-1300: WAL archiving'",
    ],
    "pg archive status": ["igops pg archive status c01", "igops pg archive status c01 --json"],
    "redis status": ["igops redis status", "igops redis status --watch 5"],
    "redis switchover": ["igops redis switchover --to redis2 --dry-run"],
    "redis failover": ["igops redis failover --dry-run", "igops redis failover --to redis2"],
    "redis rejoin": ["igops redis rejoin redis1 --dry-run"],
}


def metavar_for(verb: str, name: str, declared: str | None = None) -> str:
    """The verb's own entry, else the metavar its declaration gives, else the name's entry."""
    return METAVARS.get(f"{verb}:{name}") or declared or METAVARS.get(name) or name.upper()


def examples_epilog(verb: str) -> str | None:
    examples = EXAMPLES.get(verb)
    if not examples:
        return None
    # \b keeps click from re-flowing the lines into one paragraph.
    return "\b\nExamples:\n" + "\n".join(f"  {example}" for example in examples)
