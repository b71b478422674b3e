"""How many hosts a rollout may lose, and how many must keep serving: `max_fail` and
`min_in_service`, each a host count or a percentage (the inventory's [deploy] section, and
`--max-fail`), made a number of hosts for a fleet of a given size.

The rounding is the safe one each way: a failure budget rounds down (Ansible's
max_fail_percentage: 25% of 4 hosts lets one fail, and the rollout stops at the second), a
minimum in service rounds up (50% of 5 servers keeps 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from igops.errors import UsageError
from igops.inventory_rules import InvalidValue, count_or_percent


@dataclass(frozen=True)
class HostLimit:
    count: int | None = None
    percent: int | None = None

    @classmethod
    def of(cls, value: int | str, option: str | None = None) -> HostLimit:
        """From the inventory's value, or an option's text (`option` names it in the error)."""
        what = option or "value"
        try:
            count, percent = count_or_percent(value, what)
        except InvalidValue as bad:
            hint = f"{bad.fix}: e.g. {option} 1 or {option} 25%" if option else bad.fix
            raise UsageError(bad.problem, hint) from None
        return cls(count, percent)

    def allowed_failures(self, total: int) -> int:
        """Hosts of `total` that may fail before the rollout stops: a percentage rounds down."""
        if self.count is not None:
            return self.count
        assert self.percent is not None  # one of the two (count_or_percent)
        return total * self.percent // 100

    def at_least(self, total: int) -> int:
        """Servers of `total` that must stay in service: a percentage rounds up."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return -(-total * self.percent // 100)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent}%"


def too_many_failures(failed: int, allowed: int) -> bool:
    """The rollout stops when MORE hosts than allowed have failed: with 1 allowed, the first
    failure is tolerated and the second stops it."""
    return failed > allowed


def describe_budget(limit: HostLimit, total: int) -> str:
    """ "25% (1 of 4 hosts)" or "0"."""
    allowed = limit.allowed_failures(total)
    return str(limit) if limit.count is not None else f"{limit} ({allowed} of {total} hosts)"


def describe_minimum(limit: HostLimit, total: int) -> str:
    needed = limit.at_least(total)
    return str(limit) if limit.count is not None else f"{limit} of {total} app servers: {needed}"
