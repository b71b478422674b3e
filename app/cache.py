"""Memcached in front of user lookups.

The cache is an optimisation only: every failure reads as a miss, so a dead
memcached slows user reads down but never fails them.
"""

from __future__ import annotations

import json
from typing import Any

from pymemcache.client.hash import HashClient

from app.config import MemcachedConfig

TIMEOUT_SECONDS = 0.3


def user_key(user_id: int) -> str:
    return f"user:{user_id}"


class UserCache:
    def __init__(self, config: MemcachedConfig):
        self.ttl = config.ttl
        self._client = HashClient(
            [(server.host, server.port) for server in config.servers],
            connect_timeout=TIMEOUT_SECONDS,
            timeout=TIMEOUT_SECONDS,
            ignore_exc=True,
            # skip a dead server for a while instead of paying its timeout on every request
            retry_attempts=1,
            dead_timeout=10,
            use_pooling=False,
        )

    def get(self, user_id: int) -> dict[str, Any] | None:
        raw = self._client.get(user_key(user_id))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def set(self, user_id: int, user: dict[str, Any]) -> None:
        self._client.set(user_key(user_id), json.dumps(user).encode(), expire=self.ttl, noreply=True)
