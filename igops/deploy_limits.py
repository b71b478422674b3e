"""How many hosts at a time, how many a rollout may lose, and how many must keep serving: the
batches (`--batch`, Ansible's `serial`), and `max_fail` and `min_in_service`, each a host count
or a percentage (the inventory's [deploy] section, and `--max-fail`), made a number of hosts for
a fleet of a given size.

The rounding is the safe one each way: a failure budget rounds down (Ansible's
max_fail_percentage: 25% of 4 hosts lets one fail, and the rollout stops at the second), a
minimum in service rounds up (50% of 5 servers keeps 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from igops.errors import UsageError
from igops.inventory_rules import InvalidValue, count_or_percent

T = TypeVar("T")


@dataclass(frozen=True)
class BatchSize:
    """One entry of a batch list, like Ansible's `serial`: a host count or a percentage of
    all the hosts being rolled."""

    count: int | None = None
    percent: int | None = None

    def of(self, total: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None  # a size is a count or a percentage (parse_batches)
        return max(1, total * self.percent // 100)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent}%"


def parse_batches(spec: str) -> list[BatchSize]:
    """ "1,25%" -> [1, 25%]. The last size repeats until every host is in a batch."""
    sizes = []
    for part in spec.split(","):
        text = part.strip()
        try:
            if text.endswith("%"):
                percent = int(text[:-1])
                if not 1 <= percent <= 100:
                    raise ValueError
                sizes.append(BatchSize(percent=percent))
            else:
                count = int(text)
                if count < 1:
                    raise ValueError
                sizes.append(BatchSize(count=count))
        except ValueError:
            raise UsageError(
                f"bad batch size {text!r} in --batch {spec!r}",
                "use host counts and percentages, e.g. --batch 1,25% or --batch 50%",
            ) from None
    return sizes


def split_batches(items: Sequence[T], sizes: Sequence[BatchSize]) -> list[list[T]]:
    batches: list[list[T]] = []
    position, index = 0, 0
    while position < len(items):
        size = sizes[min(index, len(sizes) - 1)].of(len(items))
        batches.append(list(items[position : position + size]))
        position += size
        index += 1
    return batches


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
