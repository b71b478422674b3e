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
