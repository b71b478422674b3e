"""What the Postgres and Redis role changes (switchover, failover, rejoin) share: a refusal that
carries the state it was based on, `--accept-risk`, and how long their waits may take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from igops.errors import RefusedError

if TYPE_CHECKING:
    from igops.pg.cluster import PgClusterState
    from igops.redis_tier import RedisState

# Confirming a server is down: connection attempts, this far apart.
DOWN_PROBES = 2
DOWN_PROBE_INTERVAL = 0.5
# How long a standby (or a Redis replica) may take to stream from its new upstream.
STREAMING_TIMEOUT = 60.0


class Refused(RefusedError):
    """A refusal that carries the state it was based on, so the person sees why."""

    def __init__(self, state: PgClusterState | RedisState | None, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.state = state


def refuse_or_force(
    state: PgClusterState | RedisState | None, reasons: list[str], accept_risk: bool, plan_forced: list[str], hint: str
) -> None:
    if reasons and not accept_risk:
        raise Refused(state, "refused: " + "; ".join(reasons), hint)
    plan_forced.extend(reasons)
