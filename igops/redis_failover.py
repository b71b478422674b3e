"""Redis switchover, failover and rejoin: the plans (read the tier, refuse what is unsafe, build
the steps) and `RedisActions`, which runs them. A switchover pauses writes on the old master,
promotes the replica once it is level, and demotes the old master before the app is pointed at
the new one; a failover fences the old master's config file first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import inventory, postgres, redisops
from igops.errors import IgopsError, UsageError
from igops.host_commands import parallel_map, read_file, replace_file, ssh
from igops.operations.steps import Step, StepReport, execute
from igops.output import Reporter, plural
from igops.redis_tier import RedisState, RedisView, directory_connection, redis_address, redis_members, redis_view
from igops.role_change import DOWN_PROBE_INTERVAL, DOWN_PROBES, STREAMING_TIMEOUT, Refused, refuse_or_force

if TYPE_CHECKING:
    from igops.inventory import Fleet

# A Redis switchover demotes the old master only while its write pause has at least this long
# left, so the pause cannot expire between the check and the demotion.
PAUSE_MARGIN = 1.0
# What the old master's write pause must have left when its demotion is checked: the check and
# the REPLICAOF are two commands on a connection already open.
DEMOTE_MARGIN = 0.2
# The replication stream's PING, which a master sends its replicas every repl-ping-replica-period
# (10 s) whether or not clients are paused: the only entry this short (any write carries a command
# and a key, FLUSHDB 17 bytes at the least), so an old master this much ahead took no write.
REPLICATION_PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass
class RedisPlan:
    operation: str
    title: str
    old_master: str | None
    new_master: str | None
    forced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actions: list[Step] = field(default_factory=list)
    failure_hint: str = "see `igops redis status` for where things stand"
    signature: tuple[Any, ...] = ()  # the state the plan was made for (see check_unchanged)
    settling: str | None = None  # a node whose link the plan waits for (left out of the signature)

    def steps(self) -> list[str]:
        return [step.title for step in self.actions]


@dataclass
class RedisResult:
    operation: str
    old_master: str | None
    new_master: str | None
    write_pause_ms: float | None
    endpoint_version: int | None
    steps: list[StepReport]


def plan_redis_switchover(
    fleet: Fleet, target: str, accept_risk: bool = False, promoted_by_interrupted_run: bool = False
) -> tuple[RedisPlan, RedisState]:
    """`promoted_by_interrupted_run`: the journal of the switchover being resumed shows it
    promoted `target` and never demoted the master the app uses (igops.interrupted)."""
    members = redis_members(fleet)
    if target not in members:
        raise UsageError(f"{target} is not a Redis node", inventory.unknown_name_hint(target, members, "nodes"))
    view = redis_view(fleet)
    state = view.state
    masters = view.masters()
    current = state.app_master if state.app_master in masters else (masters[0] if len(masters) == 1 else None)
    if current is None:
        raise Refused(
            state,
            "refused: "
            + (
                "no Redis master answers"
                if not masters
                else f"{plural(len(masters), 'master')} and the app uses none of them"
            ),
            "if the master is down use `igops redis failover`; see `igops redis status`",
        )
    node = state.node(target)
    if target == current:
        if state.app_master == target and len(masters) == 1:
            return signed(
                RedisPlan("switchover", f"Nothing to do: {target} is the master and the app uses it", target, target),
                view,
            ), state
        return signed(_plan_redis_finish(fleet, view, "switchover", target), view), state
    others = [name for name in members if name not in (current, target) and view.states[name] is not None]
    if node.role == "master" and promoted_by_interrupted_run and state.app_master == current:
        # The app wrote only to `current` (the directory never moved): `target`'s copy is the
        # older one, so it follows `current` again before the switchover runs from the start.
        plan = RedisPlan(
            "switchover",
            f"Finish the switchover from {current} to {target}, which an interrupted "
            f"run left with {target} promoted and {current} still the app's master",
            current,
            target,
        )
        plan.actions = [
            Step(
                f"{target}: REPLICAOF {current} again (the app kept writing to {current})",
                "replicate",
                (target, current),
            ),
            Step(f"{target}: wait until its link to {current} is up", "wait_link", (target,)),
            *redis_switchover_steps(fleet, current, target, others),
        ]
        return signed(plan, view), state
    if node.role != "replica":
        raise Refused(
            state,
            f"refused: {target} is not a replica ({node.state if node.role == 'unknown' else node.role})",
            "pick a running replica (igops redis status); if a switchover was interrupted after it "
            "promoted this node, `igops ops list` shows it: igops ops resume|abort ID",
        )
    plan = RedisPlan("switchover", f"Switch the Redis master from {current} to {target}", current, target)
    reasons = []
    if node.master != current or node.link != "up":
        reasons.append(f"{target} does not follow {current} over a live link ({node.master}, link {node.link})")
    current_state = view.states[current]
    assert current_state is not None  # a master that answered
    lag = current_state.offset - (node.offset or 0)
    if lag > fleet.model.redis.max_lag_bytes:
        reasons.append(f"{target} lags {lag} bytes (threshold {fleet.model.redis.max_lag_bytes})")
    if node.read_only is False:
        reasons.append(f"{target} accepts writes as a replica")
    refuse_or_force(
        state, reasons, accept_risk, plan.forced, "wait for it to catch up, pick another replica, or --accept-risk"
    )
    plan.actions = redis_switchover_steps(fleet, current, target, others)
    return signed(plan, view), state


def _plan_redis_finish(fleet: Fleet, view: RedisView, operation: str, master: str) -> RedisPlan:
    """`master` is the one master: finish what an interrupted operation left (a switchover killed
    after the demotion leaves the app pointed at the old master, now a replica, and the config
    files with the old roles): the others follow it, the directory names it, the files say so."""
    state = view.state
    plan = RedisPlan(
        operation, f"Finish: {master} is the master; point the app and the others at it", state.app_master, master
    )
    others = [
        name
        for name in redis_members(fleet)
        if name != master
        and view.states[name] is not None
        and not (state.node(name).role == "replica" and state.node(name).master == master)
    ]
    plan.actions = [Step(f"{name}: REPLICAOF {master}", "replicate", (name, master)) for name in others]
    if state.app_master != master:
        plan.actions.append(
            Step(f"directory: redis_master = {redis_address(fleet, master)} (version bump)", "point_app", (master,))
        )
    answering = tuple(name for name in redis_members(fleet) if view.states[name] is not None)
    plan.actions.append(
        Step(
            f"config files: {master} as master, {', '.join(n for n in answering if n != master)} "
            f"as replicas of {master}",
            "persist_roles",
            (master, answering),
        )
    )
    return plan


def redis_switchover_steps(fleet: Fleet, current: str, target: str, others: list[str]) -> list[Step]:
    pause = fleet.model.redis.pause_timeout
    unpause = Step(
        f"{current}: CLIENT UNPAUSE (paused writes are refused READONLY and retried on {target})", "unpause", (current,)
    )
    steps = [
        Step(
            f"{current}, {target}: connect now, so that no connection has to be set up while writes wait; lift "
            f"any write pause an interrupted run left on {target} (a paused replica applies none of its stream)",
            "hold_connections",
            (current, target),
        ),
        Step(
            f"{current}: CLIENT PAUSE WRITE (writes wait, reads go on; released by Redis itself after {pause:g} s)",
            "pause_writes",
            (current,),
            release=unpause,
        ),
        Step(
            f"{target}: wait until its offset reaches {current}'s (at most {pause / 2:g} s)",
            "wait_offset",
            (current, target),
        ),
        Step(
            f"{target}: REPLICAOF NO ONE (master now; first checks it is level with {current} and the pause has "
            f"over {PAUSE_MARGIN:g} s left)",
            "promote",
            (target, current),
            undo=Step(f"{target}: REPLICAOF {current} again", "replicate", (target, current)),
        ),
        # Not a point of no return of itself: a demotion refused because the pause lapsed (or cut
        # off before its REPLICAOF) leaves `current` the master the app writes to, and undoing the
        # promotion is what keeps one master. Its probe says when it did take effect.
        Step(
            f"{current}: REPLICAOF {target} (it can take no more writes; first checks its pause holds and no "
            "write reached it since)",
            "demote",
            (current, target),
            took_effect=Step(f"{current}: does it replicate from {target}?", "demoted", (current, target)),
        ),
    ]
    steps += [Step(f"{name}: REPLICAOF {target}", "replicate", (name, target)) for name in others]
    steps += [
        Step(
            f"directory: redis_master = {redis_address(fleet, target)} (version bump; the app follows within "
            "about 1 s, at once on READONLY)",
            "point_app",
            (target,),
        ),
        unpause,
        Step(
            f"config files: {target} as master, {', '.join([current, *others])} as replicas of {target} (a "
            "restart keeps the roles)",
            "persist_roles",
            (target, (target, current, *others)),
        ),
        Step(f"{current}: wait until its link to {target} is up", "wait_link", (current,)),
    ]
    return steps


def plan_redis_failover(
    fleet: Fleet, target: str | None = None, accept_risk: bool = False
) -> tuple[RedisPlan, RedisState]:
    members = redis_members(fleet)
    if target is not None and target not in members:
        raise UsageError(f"{target} is not a Redis node", inventory.unknown_name_hint(target, members, "nodes"))
    view = redis_view(fleet)
    state = view.state
    masters = view.masters()
    old = state.app_master
    if old is None:
        raise Refused(
            state,
            "refused: the directory names no Redis node as the master, so none can be down",
            "see `igops redis status`",
        )
    if old in masters:
        raise Refused(
            state,
            f"refused: {old} answers as the master: it is not down",
            "for a planned change use `igops redis switchover --to NODE`",
        )
    if view.states.get(old) is not None:
        # What a switchover killed between the demotion and the directory update leaves.
        if len(masters) == 1 and target in (None, masters[0]):
            return signed(_plan_redis_finish(fleet, view, "failover", masters[0]), view), state
        raise Refused(
            state,
            f"refused: the app's master {old} answers, as a replica of {state.node(old).master}"
            + (
                f"; {masters[0]} is the master, not {target}"
                if len(masters) == 1
                else f"; {plural(len(masters), 'node')} answer as masters"
            ),
            "see `igops redis status`; point the app at a master with `igops redis switchover --to NODE`",
        )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssh-check") as pool:
        ssh_check = pool.submit(ssh, fleet, fleet.host(old), ["true"], 20)
        _confirm_redis_down(fleet, state, old)
        reachable = ssh_check.result().reached
    plan = RedisPlan("failover", "", old, None)
    reasons = []
    following = [
        name
        for name in members
        if (answer := view.states[name])
        and answer.role == "replica"
        and state.node(name).master == old
        and state.node(name).link == "up"
    ]
    if following:
        raise Refused(
            state,
            f"refused: {old} is not down: {', '.join(following)} still have a live link to it",
            "igops cannot reach it but its replicas can: check the network",
        )
    if view.states.get(old) is None and view.down[old].kind == "timeout":
        reasons.append(
            f"{old} accepts connections but does not answer: hung, not down; it could come back as "
            "master with its writes (stop it first)"
        )
    replicas = {
        name: answer
        for name in members
        if name != old and (answer := view.states[name]) is not None and answer.role == "replica"
    }
    if masters:
        plan.notes.append(f"also master, but not used by the app: {', '.join(masters)}")
    if not replicas:
        raise Refused(state, "refused: no running replica to promote", "start one, or restore the master")
    chosen = target or best_replica(replicas)
    if chosen not in replicas:
        raise Refused(state, f"refused: {chosen} is not a running replica", f"running replicas: {', '.join(replicas)}")
    best = max(node.offset for node in replicas.values())
    if replicas[chosen].offset < best:
        reasons.append(f"{chosen} is {best - replicas[chosen].offset} bytes behind the most advanced replica")
    if not reachable:
        reasons.append(
            f"{old}'s host is unreachable over SSH: its config cannot be fenced; make sure it cannot "
            "come back (stop the instance) before forcing"
        )
    refuse_or_force(state, reasons, accept_risk, plan.forced, "restore the master if you can, or --accept-risk")
    plan.new_master = chosen
    plan.title = f"Fail the Redis master over from {old} (down) to {chosen}"
    steps = []
    if reachable:
        steps.append(
            Step(
                f"{old}: fence: its config file gets `replicaof {chosen}`, so a restart comes up as a "
                "read-only replica",
                "fence_config",
                (old, chosen),
            )
        )
    steps.append(
        Step(
            f"{chosen}: REPLICAOF NO ONE (master now, at offset {replicas[chosen].offset}; writes "
            f"{old} acknowledged after that are lost)",
            "promote",
            (chosen,),
            point_of_no_return=True,
        )
    )
    steps += [Step(f"{name}: REPLICAOF {chosen}", "replicate", (name, chosen)) for name in replicas if name != chosen]
    steps.append(
        Step(f"directory: redis_master = {redis_address(fleet, chosen)} (version bump)", "point_app", (chosen,))
    )
    steps.append(
        Step(
            f"config files: {chosen} as master, "
            f"{', '.join(n for n in replicas if n != chosen) or 'no other'} "
            f"replica follows {chosen}",
            "persist_roles",
            (chosen, tuple(name for name in replicas)),
        )
    )
    plan.actions = steps
    plan.notes.append(f"when {old} is back: `igops redis rejoin {old}`")
    return signed(plan, view), state


def _confirm_redis_down(fleet: Fleet, state: RedisState, name: str) -> None:
    """A restart looks like an outage for a moment: ask again before acting on it."""
    for _ in range(DOWN_PROBES - 1):
        time.sleep(DOWN_PROBE_INTERVAL)
        connection = redisops.client(fleet, fleet.host(name))
        try:
            redisops.node_state(connection)
        except postgres.Unavailable:
            continue
        finally:
            connection.close()
        raise Refused(state, f"refused: {name} answers again", "see `igops redis status`")


def best_replica(replicas: dict[str, redisops.NodeState]) -> str:
    """The most data first (Sentinel puts priority first, but a failover must lose as little as it
    can); then the lower replica-priority; never one with priority 0; then the run id."""
    eligible = {name: node for name, node in replicas.items() if node.priority != 0} or replicas
    return sorted(eligible, key=lambda name: (-eligible[name].offset, eligible[name].priority, eligible[name].run_id))[
        0
    ]


def plan_redis_rejoin(fleet: Fleet, node: str, accept_risk: bool = False) -> tuple[RedisPlan, RedisState]:
    members = redis_members(fleet)
    if node not in members:
        raise UsageError(f"{node} is not a Redis node", inventory.unknown_name_hint(node, members, "nodes"))
    view = redis_view(fleet)
    state = view.state
    master = state.app_master
    if master is None or (master_state := view.states.get(master)) is None or master_state.role != "master":
        raise Refused(
            state, "refused: the app's master (per the directory) is not a running master", "see `igops redis status`"
        )
    if node == master:
        raise Refused(state, f"refused: {node} is the app's master", "rejoin the other nodes to it")
    if view.states.get(node) is None:
        raise Refused(state, f"refused: {node} does not answer ({view.down[node].detail})", "start it first")
    host = fleet.host(node)
    config_path = fleet.path_for(fleet.model.redis.config_file, host)
    configured = redisops.configured_master(read_file(fleet, host, config_path))
    member = state.node(node)
    plan = RedisPlan("rejoin", f"Rejoin {node} as a replica of {master}", None, master)
    if member.role == "master":
        reasons = [f"{node} is a master: its own writes since it split off are discarded"]
        refuse_or_force(
            state, reasons, accept_risk, plan.forced, "make sure nothing on it is needed, then --accept-risk"
        )
    steps = []
    if not (member.role == "replica" and member.master == master):
        steps.append(Step(f"{node}: REPLICAOF {master}", "replicate", (node, master)))
    master_address = (str(fleet.host(master).address), fleet.model.redis.port)
    if configured != master_address:
        steps.append(Step(f"{node}: config file {config_path}: replicaof {master}", "persist_roles", (master, (node,))))
    if steps or member.link != "up":
        steps.append(Step(f"{node}: wait until its link to {master} is up", "wait_link", (node,)))
        # The plan waits for the link whichever way it goes meanwhile; a plan with nothing to do
        # is stale if the link drops.
        plan.settling = node
    else:
        plan.notes.append(f"nothing to do: {node} replicates from {master} and its config says so")
    plan.actions = steps
    return signed(plan, view), state


class RedisActions:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.paused_at: float | None = None
        self.unpaused_at: float | None = None
        self.master_offset: int | None = None
        self.promoted_offset: int | None = None  # all the promoted node holds of the old master's stream
        self.endpoint_version: int | None = None
        # Connections opened before writes are paused and used until the demotion: a connection
        # opened while paused could take longer to set up (2 s timeout) than the pause has left.
        self._held: dict[str, Any] = {}

    @contextmanager
    def _connection(self, name: str) -> Iterator[Any]:
        held = self._held.get(name)
        if held is not None:
            yield held
            return
        connection = redisops.client(self.fleet, self.fleet.host(name))
        try:
            yield connection
        finally:
            connection.close()

    def _master_of(self, name: str) -> tuple[str, int]:
        return str(self.fleet.host(name).address), self.fleet.model.redis.port

    def hold_connections(self, master: str, replica: str) -> None:
        for name in (master, replica):
            connection = redisops.client(self.fleet, self.fleet.host(name))
            self._held[name] = connection
            connection.ping()  # connects now; the client keeps the connection for the next commands
        # An old master demoted while paused (a switchover killed before its UNPAUSE) holds its
        # new master's stream until the pause ends; on a replica the pause guards nothing.
        redisops.unpause(self._held[replica])

    def close(self) -> None:
        for connection in self._held.values():
            connection.close()
        self._held.clear()

    def pause_writes(self, name: str) -> None:
        with self._connection(name) as connection:
            redisops.pause_writes(connection, int(self.fleet.model.redis.pause_timeout * 1000))
            self.paused_at = time.monotonic()
            self.master_offset = redisops.node_state(connection).offset

    def unpause(self, name: str) -> str | None:
        with self._connection(name) as connection:
            redisops.unpause(connection)
        if self.paused_at is not None and self.unpaused_at is None:
            self.unpaused_at = time.monotonic()
            return f"writes were paused {(self.unpaused_at - self.paused_at) * 1000:.0f} ms"
        return None

    def wait_offset(self, master: str, replica: str, deadline: float | None = None) -> str:
        with self._connection(master) as master_connection:
            self.master_offset = redisops.node_state(master_connection).offset
        with self._connection(replica) as connection:
            if deadline is None:
                deadline = (self.paused_at or time.monotonic()) + self.fleet.model.redis.pause_timeout / 2
            reached = redisops.wait_for_offset(connection, self.master_offset, deadline)
        return f"offset {reached}"

    def promote(self, name: str, paused_master: str | None = None) -> str | None:
        """REPLICAOF NO ONE. During a switchover, only while the old master's pause has time left
        for the demotion that follows, and once more level with it."""
        detail = None
        if paused_master is not None:
            left = (self.paused_at or 0) + self.fleet.model.redis.pause_timeout - time.monotonic()
            if left < PAUSE_MARGIN:
                raise IgopsError(
                    f"only {max(left, 0):.1f} s of {paused_master}'s write pause left: too late to "
                    "promote and demote safely"
                )
            detail = self.wait_offset(paused_master, name, deadline=time.monotonic() + left - PAUSE_MARGIN)
        with self._connection(name) as connection:
            redisops.replicate_from(connection, None)
            # Read once it no longer replicates: what it received up to the end, a PING after the
            # level check included. The app does not write to it before the directory names it.
            self.promoted_offset = redisops.node_state(connection).offset
        return detail

    def demote(self, name: str, new_master: str) -> None:
        """REPLICAOF `new_master`, only while `name`'s write pause holds. Once it lapses the app
        writes to `name` again (the directory still names it), and the resync from the promoted
        node would discard those acknowledged writes: its offset must still be the one the promoted
        node was level with, and the pause must have time left for the command."""
        if self.paused_at is not None and self.master_offset is not None:
            with self._connection(name) as connection:
                offset = redisops.node_state(connection).offset
            left = self.paused_at + self.fleet.model.redis.pause_timeout - time.monotonic()
            holds = self.promoted_offset if self.promoted_offset is not None else self.master_offset
            # Ahead by a PING alone: the stream's keep-alive, sent past the client pause.
            ahead = offset - holds
            took_nothing = ahead <= 0 or ahead == len(REPLICATION_PING)
            if not took_nothing or left < DEMOTE_MARGIN:
                raise IgopsError(
                    f"{name}'s write pause "
                    + (f"had {max(left, 0):.1f} s left" if took_nothing else "lapsed")
                    + f" before its demotion (offset {offset}; {new_master} holds its stream up to {holds}): "
                    f"not demoted, so no write it took is discarded",
                    f"{new_master} replicates from {name} again; run the switchover again (a slow etcd between "
                    "the steps uses up the pause: `igops check --only etcd`)",
                )
        self.replicate(name, new_master)

    def demoted(self, name: str, master: str) -> str:
        """The demotion's probe: what says `name` replicates from `master`, or '' if it does not."""
        with self._connection(name) as connection:
            state = redisops.node_state(connection)
        host, port = self._master_of(master)
        if state.role == "replica" and state.master_address == f"{host}:{port}":
            return f"{name} replicates from {master}"
        return ""

    def replicate(self, name: str, master: str) -> None:
        with self._connection(name) as connection:
            redisops.replicate_from(connection, self._master_of(master))

    def point_app(self, name: str) -> str:
        connection = directory_connection(self.fleet)
        try:
            self.endpoint_version = redisops.write_endpoint(connection, redis_address(self.fleet, name))
        finally:
            connection.close()
        return f"version {self.endpoint_version}"

    def persist_roles(self, master: str, members: tuple[str, ...]) -> str:
        fleet = self.fleet
        template = fleet.model.redis.config_file

        def one(name: str) -> str | None:
            host = fleet.host(name)
            path = fleet.path_for(template, host)
            result = ssh(fleet, host, ["cat", path], timeout=30)
            if not result.ok:
                return f"{name}: {result.error or result.stderr.strip()[-200:]}"
            wanted = redisops.with_replicaof(result.stdout, None if name == master else self._master_of(master))
            if wanted != result.stdout:
                replace_file(fleet, host, path, wanted)
            return None

        failed = [problem for problem in parallel_map(one, list(members)) if problem]
        if failed:
            raise IgopsError(
                "config files not updated: " + "; ".join(failed),
                "a restart of those nodes would take their old role; fix the files by hand",
            )
        return plural(len(members), "file")

    def fence_config(self, name: str, new_master: str) -> None:
        self.persist_roles(new_master, (name,))

    def wait_link(self, name: str) -> str:
        with self._connection(name) as connection:
            state = redisops.wait_for_link(connection, time.monotonic() + STREAMING_TIMEOUT)
        return f"link up, offset {state.offset}"


def apply_redis(fleet: Fleet, plan: RedisPlan, reporter: Reporter = Reporter()) -> RedisResult:
    actions = RedisActions(fleet)
    try:
        reports = execute(plan.actions, actions, reporter, plan.failure_hint)
    finally:
        actions.close()
    pause_ms = (
        (actions.unpaused_at - actions.paused_at) * 1000
        if actions.paused_at is not None and actions.unpaused_at is not None
        else None
    )
    return RedisResult(
        plan.operation,
        plan.old_master,
        plan.new_master,
        round(pause_ms, 1) if pause_ms is not None else None,
        actions.endpoint_version,
        reports,
    )


def signature(view: RedisView, settling: str | None = None) -> tuple[Any, ...]:
    """What a plan depends on: every node's role and state, who follows whom, and where the app is
    routed (the directory). Offsets and lag are left out: they move. So is the link of a
    `settling` node, whose link the plan waits for: a replica restarted a moment ago finishes its
    sync between a rejoin's plan and its run, and that does not make the plan stale."""
    state = view.state
    return (
        tuple((n.name, n.role, n.state, n.master, None if n.name == settling else n.link == "up") for n in state.nodes),
        state.app_master,
    )


def signed(plan: RedisPlan, view: RedisView) -> RedisPlan:
    plan.signature = signature(view, plan.settling)
    return plan
