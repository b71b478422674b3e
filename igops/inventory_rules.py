"""What the inventory's loader (igops.inventory) and its models (igops.inventory_model) both
know, kept apart so that neither imports the other at load time and the loader never imports
pydantic: the roles a host may have, the rule on a schema prefix, and the error a validator
raises with its fix."""

from __future__ import annotations

import re

ROLES = ("lb", "app", "postgres", "pgbouncer", "redis", "memcached", "munin")
# Schema names are built from it and reach SQL: only a plain identifier.
SCHEMA_PREFIX_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


class InvalidValue(ValueError):
    """A value the inventory refuses, with how to fix it (a model validator raises it)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def count_or_percent(value: object, what: str) -> tuple[int | None, int | None]:
    """A number of hosts as the inventory and the deploy options give it: a whole count (`2`) or
    a percentage of the hosts (`"25%"`). Returns (count, percent), one of them None."""
    if isinstance(value, bool):
        raise InvalidValue(f"{what} {value!r} is not a host count", 'use a whole number (2) or a percentage ("25%")')
    if isinstance(value, int):
        if value < 0:
            raise InvalidValue(f"{what} {value} is negative", "use 0 or more hosts, or a percentage")
        return value, None
    text = str(value).strip()
    if text.endswith("%") and text[:-1].strip().isdigit():
        percent = int(text[:-1])
        if percent > 100:
            raise InvalidValue(f"{what} {text} is above 100%", "use a percentage from 0% to 100%")
        return None, percent
    if text.isdigit():
        return int(text), None
    raise InvalidValue(f"{what} {value!r} is not a host count", 'use a whole number (2) or a percentage ("25%")')
