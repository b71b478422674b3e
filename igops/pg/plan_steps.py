"""The step lists of Postgres switchovers, failovers and rejoins: what each step says (the
dry run prints these titles) and which action runs it, with its undo and release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from igops.operations.steps import Step
from igops.pg.cluster import bouncer_text
from igops.pg.timeouts import CATCH_UP_TIMEOUT, DEAD_SERVER_PAUSE_S

if TYPE_CHECKING:
    from igops.inventory import Fleet


# The promotion's second argument, True: repmgrd was paused while no member was a primary (a
# failover, or a switchover resumed after its stop), and it reads its pause flag only before it
# begins a failover of its own, so one under way then may promote another standby. The promotion
# then asks every other member first, and again once done.
_ALONE = (
    "; refused if another member accepts writes first (repmgrd, paused mid-way through a failover of its own, "
    "may have promoted one), a failure naming it if one does after"
)


def _watchdog_text(fleet: Fleet, databases: dict[str, list[str]]) -> str:
    return (
        f"arm a watchdog on {', '.join(databases)} (it RESUMEs them if igops is gone or silent for "
        f"{fleet.model.pgbouncer.watchdog_deadline:g} s)"
    )


def switchover_steps(
    fleet: Fleet,
    primary: str,
    candidate: str,
    siblings: list[str],
    databases: dict[str, list[str]],
    replay_paused: bool = False,
    stopped: bool = False,
    paused: dict[str, list[str]] | None = None,
) -> list[Step]:
    """The switchover's steps; `stopped`: an interrupted one already stopped the primary
    cleanly, `paused`: and left these PgBouncer databases paused (they stay paused)."""
    candidate_address = f"{fleet.host(candidate).address}:{fleet.model.postgres.port}"
    pause_timeout = fleet.model.pgbouncer.pause_timeout
    resume = Step(f"PgBouncer: RESUME {bouncer_text(databases)}", "resume", (databases,))
    watchdog = _watchdog_text(fleet, databases)
    steps = []
    if not stopped:
        steps.append(
            Step(
                f"{primary}: CHECKPOINT, so its clean shutdown is quick once writes are paused; log in over "
                f"SSH for that stop now, and connect to {candidate} for its steps inside the pause",
                "checkpoint_before_stop",
                (primary, candidate),
            )
        )
    steps.append(
        Step(
            f"PgBouncer: read the databases file on {', '.join(databases)}, and log in to the admin console "
            "for the RELOAD and the RESUME now",
            "read_databases_files",
            (databases,),
        )
    )
    if not paused:
        steps.append(
            Step(
                f"PgBouncer: {watchdog}, then PAUSE {bouncer_text(databases)} (writes wait; gives up and "
                f"resumes after {pause_timeout:g} s)",
                "pause",
                (databases,),
                release=resume,
            )
        )
    else:
        # Left paused by an interrupted run whose watchdog is gone: they get one again.
        steps.append(
            Step(
                f"PgBouncer: {_watchdog_text(fleet, paused)} over {bouncer_text(paused)} (left paused)",
                "watch",
                (paused,),
                release=resume,
            )
        )
    # Fenced before the stop, so that nothing the stop's remote script does after an interruption
    # (it outlives igops) can fence a primary that an undo started again.
    steps.append(
        Step(
            f"{primary}: fence it with standby.signal, "
            + (
                "(stopped already) "
                if stopped
                else "clean stop (a fast shutdown: SIGINT to its postmaster, then the service_stop_command "
                "repmgr node service --action=stop would run; on once its control file says shut down), "
            )
            + "read where its WAL ends",
            "stop_and_fence",
            (primary,),
            undo=Step(
                f"{primary}: remove standby.signal and start it again as the primary (only while it is "
                f"still stopped, and once no other member ({', '.join([candidate, *siblings])}) verifiably is "
                "or can become one), check it accepts writes",
                "unfence_and_start",
                (primary, (candidate,)),
            ),
            release=resume if paused else None,
        )
    )
    if replay_paused:
        steps.append(
            Step(f"{candidate}: resume WAL replay (it was paused; --accept-risk)", "resume_replay", (candidate,))
        )
    steps += [
        Step(
            f"{candidate}: wait until it has received all of {primary}'s WAL (at most {CATCH_UP_TIMEOUT:g} s)",
            "wait_received",
            (candidate,),
        ),
        _reserve_rejoin_wal_step(candidate, primary),
        # A failed promotion is undone (the old primary started again) only once the candidate is
        # verified stopped and still in recovery; once it is promoted, failures roll forward: the
        # probe asks before any undo runs, for the dropped slot of the old primary's rejoin too.
        Step(
            f"{candidate}: promote (pg_promote), wait until it accepts writes" + (_ALONE if stopped else ""),
            "promote",
            (candidate, True) if stopped else (candidate,),
            took_effect=Step(f"{candidate}: is it out of recovery?", "promoted", (candidate,)),
        ),
        Step(
            f"PgBouncer: point {bouncer_text(databases)} at {candidate} ({candidate_address}), RELOAD",
            "repoint",
            (databases, candidate),
            point_of_no_return=True,
        ),
        resume,
        Step(
            f"{candidate}: record it as the primary in repmgr's metadata (repmgr primary register --force)",
            "register_primary",
            (candidate,),
        ),
        *rejoin_steps(primary, candidate, running=False, archiving=fleet.model.archive is not None),
    ]
    steps += [
        Step(f"{sibling}: follow {candidate} (repmgr standby follow)", "follow", (sibling, candidate))
        for sibling in siblings
    ]
    steps += [
        Step(f"{node}: wait until it streams from {candidate}", "wait_streaming", (node, candidate))
        for node in siblings
    ]
    steps.append(release_switch_segment_step(candidate, [primary, *siblings]))
    return steps


def failover_steps(
    fleet: Fleet,
    old: str | None,
    chosen: str,
    siblings: list[str],
    databases: dict[str, list[str]],
    fence_on_disk: bool,
    stop_first: bool,
    replay_paused: bool = False,
) -> list[Step]:
    resume = Step(f"PgBouncer: RESUME {bouncer_text(databases)}", "resume", (databases,))
    steps = []
    if databases:
        steps.append(
            Step(
                f"PgBouncer: {_watchdog_text(fleet, databases)}, then hold {bouncer_text(databases)}: "
                "PAUSE (KILL if not paused within "
                f"{DEAD_SERVER_PAUSE_S:g} s), new queries wait",
                "hold",
                (databases,),
                release=resume,
            )
        )
    if fence_on_disk:
        steps.append(
            Step(
                f"{old}: fence: "
                + ("stop it (immediate), " if stop_first else "")
                + "write standby.signal so it can only start read-only",
                "fence",
                (old, stop_first),
            )
        )
    if databases:
        steps.append(
            Step(f"PgBouncer: point {bouncer_text(databases)} at {chosen}, RELOAD", "repoint", (databases, chosen))
        )
    if replay_paused:
        steps.append(Step(f"{chosen}: resume WAL replay (it was paused; --accept-risk)", "resume_replay", (chosen,)))
    steps.append(
        Step(
            f"{chosen}: promote (pg_promote), wait until it accepts writes" + _ALONE,
            "promote",
            (chosen, True),
            point_of_no_return=True,
        )
    )
    if databases:
        steps.append(resume)
    steps.append(
        Step(
            f"{chosen}: record it as the primary in repmgr's metadata (repmgr primary register --force)",
            "register_primary",
            (chosen,),
        )
    )
    steps += [
        Step(f"{sibling}: follow {chosen} (repmgr standby follow)", "follow", (sibling, chosen)) for sibling in siblings
    ]
    # No release of the promotion's segment here: the old primary has yet to rejoin, and pg_rewind
    # leaves it needing the new timeline's WAL from that segment on (`pg rejoin` releases it after).
    return steps


def rejoin_steps(node: str, primary: str, running: bool, archiving: bool = False) -> list[Step]:
    # pg_rewind (15) takes the source's timeline from its control file, which a freshly promoted
    # primary updates only at its next checkpoint: without one it rewinds to the wrong fork.
    steps = [Step(f"{primary}: CHECKPOINT, so pg_rewind reads its current timeline", "checkpoint", (primary,))]
    if running:
        steps.append(Step(f"{node}: stop (repmgr node service --action=stop)", "stop", (node,)))
    steps.append(
        Step(
            f"{node}: wait until its postmaster is gone (a stop hands its last WAL segment to "
            "archive_command after its shutdown checkpoint), remove timeline history files of timelines it "
            "never reached (an aborted promotion leaves one, which the new primary's timeline of that number is not)",
            "remove_stale_history",
            (node,),
        )
    )
    steps.append(
        Step(
            f"{node}: if it did not shut down cleanly, finish crash recovery first (a standby: as a "
            "standby; a primary: in single-user mode)",
            "ensure_clean_shutdown",
            (node,),
        )
    )
    steps += [
        Step(
            f"{node}: rejoin as a standby of {primary} (repmgr node rejoin --force-rewind: pg_rewind if its "
            "WAL diverged)",
            "rejoin",
            (node, primary),
        ),
    ]
    if archiving:
        # pg_rewind copies the source's postgresql.auto.conf, archive_command included: where the
        # pgBackRest configuration's path differs per host, that one names the source's file
        # (its data directory, spool and locks), and archiving fails once this node is promoted.
        steps.append(
            Step(
                f"{node}: its own archive_command again, if pg_rewind brought {primary}'s (ALTER SYSTEM, reload)",
                "restore_archive_command",
                (node,),
            )
        )
    steps.append(Step(f"{node}: wait until it streams from {primary}", "wait_streaming", (node, primary)))
    return steps


def _reserve_rejoin_wal_step(candidate: str, primary: str) -> Step:
    # From the promotion until repmgr creates the old primary's slot at its rejoin, nothing on
    # the new primary holds the WAL that rejoin starts from (wal_keep_size may be 0): the
    # rejoin's own CHECKPOINT could remove that segment once writes have resumed. Reserved while
    # the candidate is still a standby, the slot starts at its last restartpoint, before anything
    # the old primary can need; repmgr node rejoin then streams through that very slot. Not
    # before the pause: a run stopped there would leave the candidate an inactive slot, which
    # `repmgr node check` calls CRITICAL, and the switchover planned again would be refused.
    return Step(
        f"{candidate}: reserve the WAL {primary} needs to rejoin (a replication slot named as repmgr names "
        f"{primary}'s, from {candidate}'s last restartpoint on)",
        "reserve_rejoin_wal",
        (candidate, primary),
        undo=drop_rejoin_reservation_step(candidate, primary),
    )


def drop_rejoin_reservation_step(candidate: str, primary: str) -> Step:
    return Step(
        f"{candidate}: drop the slot reserved for {primary}'s rejoin, if no one streams through it",
        "drop_rejoin_reservation",
        (candidate, primary),
    )


def release_switch_segment_step(primary: str, standbys: list[str]) -> Step:
    return Step(
        f"{primary}: end its WAL segment, CHECKPOINT, then a restartpoint on "
        f"{', '.join(standbys) or 'no standby'} (so the old timelines' copies of the promotion's segment "
        "are removed)",
        "release_switch_segment",
        (primary, tuple(standbys)),
    )


def with_repmgrd_paused(steps: list[Step], on: str, members: tuple[str, ...]) -> list[Step]:
    """With repmgrd running, the standby's repmgrd takes a planned stop of the primary for a
    failure and may promote on its own mid-way (repmgr's own switchover pauses it too): pause it
    on every member first (from `on`, a running member), unpause it last, and on any failure
    (from the first of `members` that answers). Where repmgrd does not run, the pause only sets
    the flag it would read."""
    if not steps:
        return steps
    unpause = Step("repmgrd: unpause it on every member (repmgr service unpause)", "unpause_repmgrd", (members,))
    return [
        Step(
            f"repmgrd: pause it on every member (repmgr service pause, from {on}), so that none promotes or "
            "follows on its own mid-way",
            "pause_repmgrd",
            (on,),
            release=unpause,
        ),
        *steps,
        unpause,
    ]
