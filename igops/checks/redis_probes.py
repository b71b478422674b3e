"""The Redis checks of `igops check`: the tier judged by live roles against the master the
app writes to (the directory's redis_master endpoint)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from igops.checks import Perf, Probe, Report, Result, level
from igops.checks.probe_context import Context, elapsed_ms, first_line_of, live_primary
from igops.errors import NagiosStatus
from igops.output import plural

if TYPE_CHECKING:
    from igops.inventory_model import Check
    from igops.redis_tier import RedisNode, RedisState

# --- Redis --------------------------------------------------------------------------------------


def redis_probes(context: Context) -> list[Probe]:
    model = context.fleet.model.redis
    members = ([model.master] if model.master else []) + list(model.replicas)
    if not members or not {host.name for host in context.hosts} & set(members):
        return []
    assert model.master is not None, "the inventory check refuses replicas without a master"
    expected = [("redis-master", model.master)] + [("redis-replica", name) for name in model.replicas]
    return [Probe("redis", expected, _redis_runner(context))]


def _redis_runner(context: Context) -> Callable[[Report], None]:
    """Judge the Redis tier by live roles against the master the app writes to (the directory's
    redis_master endpoint): a failover changes both and leaves the inventory as it was."""
    from igops import redis_tier, redisops

    fleet = context.fleet
    thresholds = fleet.model.check

    def run(report: Report) -> None:
        started = time.monotonic()
        members = redis_tier.redis_members(fleet)
        with ThreadPoolExecutor(max_workers=len(members) + 1, thread_name_prefix="check-redis") as pool:
            endpoint = pool.submit(_directory_redis_master, context)
            probed = list(pool.map(lambda name: redisops.probe(fleet, name, context.probe_timeout), members))
        address, version, directory_error = endpoint.result()
        states = {name: found for name, found, _ in probed}
        down = {name: error for name, _, error in probed if error}
        tier = redis_tier.redis_state_of(fleet, states, down, address, version, directory_error)
        for result in redis_results(tier, directory_error, thresholds, elapsed_ms(started)):
            report(result)

    return run


def _directory_redis_master(context: Context) -> tuple[str | None, int | None, str | None]:
    """(address, version, why it could not be read) of the directory's redis_master endpoint,
    read on the directory cluster's live primary."""
    from igops import postgres, redisops

    model = context.fleet.model
    cluster_name = context.fleet.directory_cluster
    if cluster_name is None:
        return None, None, "the inventory has no Postgres cluster for the directory"
    primary = live_primary(model.postgres.clusters[cluster_name], context.postgres_views(cluster_name))
    if primary is None:
        return None, None, f"no primary of cluster {cluster_name} answers: the directory cannot be read"
    try:
        connection = postgres.connect(
            context.fleet,
            context.fleet.host(primary),
            model.shards.directory_database,
            timeout=max(1, int(context.probe_timeout)),
            statement_timeout_ms=int(context.probe_timeout * 1000),
        )
        try:
            return (*redisops.read_endpoint(connection), None)
        finally:
            connection.close()
    except Exception as exc:  # noqa: BLE001
        return None, None, f"the directory on {primary}: {first_line_of(exc)}"


def redis_results(tier: RedisState, directory_error: str | None, thresholds: Check, duration_ms: float) -> list[Result]:
    """One result per Redis node, named by its live role. The reference master is the one the
    app writes to, or without a readable directory the only live master."""
    masters = [node.name for node in tier.nodes if node.role == "master"]
    reference = tier.app_master if tier.app_master in masters else masters[0] if len(masters) == 1 else None
    results = []
    for node in tier.nodes:
        if node.role == "unknown":
            check = "redis-master" if node.app_master else "redis-replica"
            results.append(
                Result(check, node.name, NagiosStatus.CRITICAL, f"{node.state}: {node.detail}", duration_ms=duration_ms)
            )
        elif node.role == "master":
            results.append(_redis_master_result(node, tier, reference, masters, directory_error, duration_ms))
        else:
            results.append(_redis_replica_result(node, tier, reference, thresholds, duration_ms))
    return results


def _redis_master_result(
    node: RedisNode,
    tier: RedisState,
    reference: str | None,
    masters: list[str],
    directory_error: str | None,
    duration_ms: float,
) -> Result:
    replicas = sum(1 for other in tier.nodes if other.role == "replica" and other.master == node.name)
    if node.name != reference:
        if tier.app_master in masters:
            why = f"a second master: the app writes to {tier.app_master}"
        else:
            why = f"one of {plural(len(masters), 'master')} ({', '.join(masters)}), and the app writes to none of them"
        return Result("redis-master", node.name, NagiosStatus.CRITICAL, why, duration_ms=duration_ms)
    if tier.app_master != node.name:
        if directory_error:
            elsewhere = directory_error
        elif tier.app_address is None:
            elsewhere = "the directory names no Redis master"
        elif tier.app_master is None:
            elsewhere = f"the directory names {tier.app_address}, no Redis node of the inventory"
        else:
            elsewhere = f"the directory names {tier.app_master}, which is {_redis_role_words(tier, tier.app_master)}"
        return Result(
            "redis-master",
            node.name,
            NagiosStatus.CRITICAL,
            f"master, {replicas} replica(s) linked; but the app does not write here: {elsewhere}",
            duration_ms=duration_ms,
        )
    return Result(
        "redis-master",
        node.name,
        NagiosStatus.OK,
        f"master the app writes to, {replicas} replica(s) linked",
        duration_ms=duration_ms,
    )


def _redis_role_words(tier: RedisState, name: str) -> str:
    found = tier.node(name)
    return "down" if found.role == "unknown" else f"a {found.role}"


def _redis_replica_result(
    node: RedisNode, tier: RedisState, reference: str | None, thresholds: Check, duration_ms: float
) -> Result:
    if reference is None:
        return Result(
            "redis-replica",
            node.name,
            NagiosStatus.CRITICAL,
            f"replica of {node.master}, but there is no master to follow",
            duration_ms=duration_ms,
        )
    if node.master != reference:
        return Result(
            "redis-replica",
            node.name,
            NagiosStatus.CRITICAL,
            f"replicates {node.master}, not the master {reference}",
            duration_ms=duration_ms,
        )
    if node.link != "up":
        return Result(
            "redis-replica",
            node.name,
            NagiosStatus.CRITICAL,
            f"link to {reference} is {node.link}",
            duration_ms=duration_ms,
        )
    if node.read_only is False:
        return Result(
            "redis-replica",
            node.name,
            NagiosStatus.CRITICAL,
            "accepts writes (replica-read-only no): a write there is lost at the next resync",
            duration_ms=duration_ms,
        )
    master_offset, offset = tier.node(reference).offset, node.offset
    assert master_offset is not None and offset is not None, "a node that answered has an offset"
    lag = max(0, master_offset - offset)
    state = level(lag, thresholds.replication_lag_warning_bytes, thresholds.replication_lag_critical_bytes)
    return Result(
        "redis-replica",
        node.name,
        state,
        f"linked to {reference}, offset lag {lag} bytes",
        [
            Perf(
                f"redis-lag {node.name}",
                lag,
                "B",
                thresholds.replication_lag_warning_bytes,
                thresholds.replication_lag_critical_bytes,
                0,
            )
        ],
        duration_ms=duration_ms,
    )
