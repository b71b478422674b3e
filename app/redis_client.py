"""The Redis master as named by the directory, followed through switchovers.

During a switchover the old master answers READONLY (or drops connections)
until igops repoints the directory; each such error reloads the directory at
once and the operation is retried within the retry budget, so the client sees
extra latency rather than an error. Operations passed to `execute` must be
safe to run twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import HostPort, RedisConfig
from app.errors import ServiceUnavailable
from app.retry import call_with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

SOCKET_TIMEOUT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 1.0
_RETRYABLE_REPLY_PREFIXES = ("READONLY", "LOADING", "MASTERDOWN")


def is_retryable(exc: BaseException) -> bool:
    if isinstance(
        exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)
    ):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_RETRYABLE_REPLY_PREFIXES)


def make_client(
    address: HostPort, socket_timeout: float = SOCKET_TIMEOUT_SECONDS, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
) -> redis.Redis:
    return redis.Redis(
        host=address.host,
        port=address.port,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        decode_responses=True,
        # retries belong to RedisMaster, which also re-reads the directory
        retry=Retry(NoBackoff(), 0),
    )


def discover_master(nodes: tuple[HostPort, ...], timeout: float = CONNECT_TIMEOUT_SECONDS) -> HostPort | None:
    """The one node that reports role master, for a directory without a
    redis_master endpoint; None when zero or several do, as guessing between
    two masters would split the writes."""
    masters = []
    for node in nodes:
        client = make_client(node, socket_timeout=timeout, connect_timeout=timeout)
        try:
            if client.role()[0] == "master":
                masters.append(node)
        except redis.exceptions.RedisError:
            continue
        finally:
            client.close()
    return masters[0] if len(masters) == 1 else None


class RedisMaster:
    def __init__(
        self,
        config: RedisConfig,
        master_from_directory: Callable[[], HostPort | None],
        reload_directory: Callable[[], object],
        count_retry: Callable[[], None],
    ):
        self.config = config
        self._master_from_directory = master_from_directory
        self._reload_directory = reload_directory
        self._count_retry = count_retry
        self._address: HostPort | None = None
        self._client: redis.Redis | None = None
        self._discovered: HostPort | None = None

    def _current_address(self) -> HostPort:
        address = self._master_from_directory()
        if address is not None:
            return address
        if self._discovered is None:
            self._discovered = discover_master(self.config.nodes)
        if self._discovered is None:
            # a ConnectionError so that it is retried like any unreachable master
            raise redis.exceptions.ConnectionError(
                "no Redis master: the directory has no redis_master endpoint and no single node reports role master"
            )
        return self._discovered

    def _current_client(self) -> redis.Redis:
        address = self._current_address()
        if address != self._address or self._client is None:
            if self._client is not None:
                log.info("redis master is now %s (was %s)", address, self._address)
                self._client.close()
            self._client = make_client(address)
            self._address = address
        return self._client

    def _prepare_retry(self, exc: BaseException) -> bool:
        log.warning("retrying Redis operation on %s after %s: %s", self._address, type(exc).__name__, exc)
        self._count_retry()
        self._discovered = None
        if (
            isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
            and self._client is not None
        ):
            # pooled sockets to a restarted or demoted node are all suspect
            self._client.connection_pool.disconnect()
        self._reload_directory()
        return self._master_from_directory() not in (None, self._address)

    def execute(self, operation: Callable[[redis.Redis], T]) -> T:
        try:
            return call_with_retries(
                lambda: operation(self._current_client()),
                is_retryable=is_retryable,
                before_retry=self._prepare_retry,
            )
        except redis.exceptions.RedisError as exc:
            raise ServiceUnavailable(f"Redis unavailable at {self._address}: {exc}") from exc
