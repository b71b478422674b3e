"""Rotation leases: which app servers are out of the load balancers' rotation, and for which
operation, so that operations running at once never take the fleet below its minimum in service.

An operation that takes app servers out of rotation (a deploy's batch, a rollback's) leases
("rotation", HOST) for each of them first, and holds it until the server is back. Before it
takes a batch out it checks how many servers would be left, counting those other operations
hold out: each deploy locks only its own hosts (two deploys to different hosts run at once),
and this is what keeps them, together, above `[deploy] min_in_service`.

The check and the lease are one step under the ("rotation-check", "all") lease, which every
taker holds for that step alone: two operations cannot both see three servers in service and
each take one of the last two out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Protocol

from igops.errors import AlreadyRunning
from igops.operations.conflicts import Resource

if TYPE_CHECKING:
    from igops.coordination import HeldLease, Holder
    from igops.output import Reporter

ROTATION = "rotation"
CHECK: Resource = ("rotation-check", "all")
# How long a batch waits for another operation's check to end (a read of the load balancers):
# seconds at most.
CHECK_WAIT_S = 90.0


def rotation(host: str) -> Resource:
    return (ROTATION, host)


class Leaser(Protocol):
    """What an operation offers (igops.operations.engine.Operation): leases in its own name, and
    who holds the resources of a class."""

    @property
    def id(self) -> str: ...

    def lease(self, resources: list[Resource], wait: float = 0.0) -> AbstractContextManager[HeldLease]: ...

    def holders(self, kind: str) -> list[tuple[Resource, Holder | None]]: ...


class RotationLeases:
    """An operation's rotation leases: taken as a batch leaves rotation, released as each server
    returns (a server that failed stays out, leased, until the operation ends)."""

    def __init__(self, operation: Leaser | None):
        # None: not run as an operation (a library caller, a test): no other operation is known.
        self.operation = operation
        self._held: dict[str, ExitStack] = {}

    def others_out(self) -> dict[str, str]:
        """Hosts another operation holds out of rotation -> who ("deploy 2026…-a3f9 by …")."""
        if self.operation is None:
            return {}
        mine = self.operation.id
        return {
            name: (holder.describe() if holder else "another operation")
            for (_, name), holder in self.operation.holders(ROTATION)
            if holder is None or holder.operation_id != mine
        }

    def take(self, hosts: list[str], check: Callable[[dict[str, str]], str | None]) -> str | None:
        """Lease `hosts` out of rotation if `check`, given the hosts other operations hold out,
        finds no reason not to (it returns the reason). Returns the reason, or None once leased."""
        if self.operation is None:
            return check({})
        with self.operation.lease([CHECK], CHECK_WAIT_S):
            refusal = check(self.others_out())
            if refusal:
                return refusal
            for host in hosts:
                if host in self._held:
                    continue  # out since an earlier batch (failed there): still ours
                stack = ExitStack()
                try:
                    stack.enter_context(self.operation.lease([rotation(host)]))
                except AlreadyRunning as held:
                    stack.close()
                    return f"{host} is out of rotation for another operation: {held.message}"
                self._held[host] = stack
        return None

    def release(self, hosts: list[str]) -> None:
        for host in hosts:
            stack = self._held.pop(host, None)
            if stack is not None:
                stack.close()

    def release_all(self) -> None:
        self.release(list(self._held))

    @property
    def held(self) -> list[str]:
        return sorted(self._held)


def of(reporter: Reporter) -> RotationLeases:
    """The rotation leases of the operation whose steps go through `reporter` (the engine's
    JournaledReporter); without one, leases that know of no other operation."""
    from igops.operations.engine import JournaledReporter

    return RotationLeases(reporter.operation if isinstance(reporter, JournaledReporter) else None)


def describe(others: dict[str, str]) -> Iterator[str]:
    for host, holder in sorted(others.items()):
        yield f"{host} (out for {holder})"
