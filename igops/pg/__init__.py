"""Postgres cluster knowledge: the members of a repmgr cluster behind PgBouncer, what they say
of themselves, and how igops changes their roles.

- `hostcmd`: Postgres and repmgr tools run on a member over SSH (as the postgres user).
- `cluster`: members, the probed view of a cluster (`PgClusterState`) and its problems.
- `timeouts`: how long each wait of a switchover, failover or rejoin may take.
- `plans`: switchover planning (and the finish or roll-back of an interrupted one), `PgPlan`,
  the standby readiness checks and a plan's signature; `failover_plans`: failover (and the
  finish of one begun elsewhere) and rejoin planning; `plan_steps`: the step lists they are
  made of.
- `actions`: `PgActions`, the step implementations, composed of `bouncer_actions` (PgBouncer
  pause and repoint), `primary_actions` (fencing and promotion), `standby_actions` (rejoin and
  WAL retention) and `repmgrd` (pausing repmgrd around a plan).

`igops.failover` is the entry the commands call; `igops.postgres` talks to the servers.
"""
