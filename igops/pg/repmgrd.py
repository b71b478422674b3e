"""repmgrd during a role change: what `repmgr service pause|unpause` reached, and the actions
that pause it on every member before a plan and unpause it after, waiting until every repmgrd
is back (the plan's steps are wrapped by igops.pg.plan_steps.with_repmgrd_paused).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from igops import postgres, remote
from igops.errors import RemoteError
from igops.host_commands import failure_reason, ssh
from igops.pg.hostcmd import repmgr
from igops.pg.timeouts import REPMGRD_RECONNECT_TIMEOUT

if TYPE_CHECKING:
    from igops.inventory import Fleet


def repmgrd_pause_outcome(output: str, pause: bool) -> tuple[list[str], list[str]]:
    """`repmgr service pause|unpause`'s NOTICE and WARNING lines: the nodes it reached, and those
    it did not (by name, or "node N" when it could not connect)."""
    done = "paused" if pause else "unpaused"
    reached: list[str] = []
    missed: list[str] = []
    for line in output.splitlines():
        if match := re.search(r"node \d+ \((.+?)\) (not )?" + done + r"\b", line):
            (missed if match.group(2) else reached).append(match.group(1))
        elif match := re.search(r"unable to connect to node (\d+)", line):
            missed.append(f"node {match.group(1)}")
    return reached, missed


def repmgrd_not_back(states: dict[str, str | None]) -> list[str]:
    """The members whose repmgrd is not (yet) running unpaused, given each one's repmgrd state
    (None: its Postgres did not answer, so it is not waited for). A fleet runs repmgrd on every
    member or on none: where no member reports one, none is waited for."""
    if not any(state in ("running", "paused") for state in states.values()):
        return []
    return [node for node, state in states.items() if state in ("not running", "paused")]


class RepmgrdActions:
    """The repmgrd steps of igops.pg.actions.PgActions (mixed in: `fleet` and `_host` are
    PgActions')."""

    fleet: Fleet

    if TYPE_CHECKING:  # PgActions' own

        def _host(self, name: str) -> Any: ...

    # repmgr's exit code when it could not pause or unpause every node (ERR_REPMGRD_PAUSE).
    _SOME_NODES_MISSED = 26

    def _repmgrd(self, node: str, pause: bool) -> remote.HostResult:
        host = self._host(node)
        return ssh(self.fleet, host, repmgr(self.fleet, host, "service", "pause" if pause else "unpause"), timeout=60)

    def pause_repmgrd(self, on: str) -> str:
        result = self._repmgrd(on, True)
        if result.exit_code not in (0, self._SOME_NODES_MISSED):
            raise RemoteError(f"{on}: repmgr service pause failed: {failure_reason(result)}")
        reached, missed = repmgrd_pause_outcome(result.stdout + result.stderr, True)
        # A member whose Postgres is down cannot be reached; its repmgrd cannot promote it meanwhile.
        return f"paused on {', '.join(reached) or 'no member'}" + (f"; not on {', '.join(missed)}" if missed else "")

    def unpause_repmgrd(self, members: tuple[str, ...]) -> str:
        failures = []
        for node in members:
            result = self._repmgrd(node, False)
            if result.exit_code in (0, self._SOME_NODES_MISSED):
                reached, missed = repmgrd_pause_outcome(result.stdout + result.stderr, False)
                return (
                    f"unpaused on {', '.join(reached) or 'no member'}"
                    + (
                        f"; not on {', '.join(missed)} (repmgr keeps the pause across a restart: unpause it "
                        "once it runs, e.g. by `igops pg rejoin` it)"
                        if missed
                        else ""
                    )
                    + self._await_repmgrd(members)
                )
            failures.append(f"{node}: {failure_reason(result)}")
        raise RemoteError(
            "repmgr service unpause failed everywhere: " + "; ".join(failures),
            "run `repmgr service unpause` on a running member",
        )

    def _await_repmgrd(self, members: tuple[str, ...]) -> str:
        """A member whose Postgres restarted (the old primary, a rejoined node) knows its repmgrd
        again only once the daemon reconnects, and that repmgrd reads back a pause the unpause
        did not reach: the run ends when every repmgrd is seen running and unpaused, so that
        the state shown after it is the one that lasts."""
        deadline = time.monotonic() + REPMGRD_RECONNECT_TIMEOUT
        while True:
            states = {node: self._repmgrd_state(node) for node in members}
            behind = repmgrd_not_back(states)
            for node in (name for name in behind if states[name] == "paused"):
                self._repmgrd(node, False)
            if not behind:
                return ""
            if time.monotonic() > deadline:
                return (
                    f"; repmgrd not back on {', '.join(behind)} after {REPMGRD_RECONNECT_TIMEOUT:g} s "
                    "(see its log; `repmgr service status` shows it)"
                )
            time.sleep(0.5)

    def _repmgrd_state(self, node: str) -> str | None:
        try:
            connection = postgres.connect(self.fleet, self._host(node), postgres.REPMGR_DATABASE)
        except postgres.Unavailable:
            return None
        try:
            return postgres.repmgrd_state(connection)
        finally:
            connection.close()
