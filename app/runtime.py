"""The per-worker clients behind the API, built lazily after gunicorn forks.

Sync workers serve one request at a time, so one set of clients per thread is
one per worker, as the contract with PgBouncer requires (one connection per
worker and database); thread-local storage keeps that true under threaded
workers too.
"""

from __future__ import annotations

import os
import threading

from app.cache import UserCache
from app.config import AppConfig
from app.db import PgConnections
from app.directory import Directory
from app.health import HealthChecker
from app.redis_client import RedisMaster
from app.service import PhotoService
from app.stats import CounterStore, Stats
from app.storage import PhotoStore


class Runtime:
    def __init__(self, config: AppConfig):
        self.pid = os.getpid()
        self.pg = PgConnections(config.postgres)
        self.directory = Directory(self.pg, config.postgres.directory_database)
        self.stats = Stats(CounterStore(config.stats.path))
        self.redis = RedisMaster(
            config.redis,
            master_from_directory=lambda: self.directory.snapshot().redis_master,
            reload_directory=self.directory.refresh,
            count_retry=lambda: self.stats.bump("redis_retries"),
        )
        self.service = PhotoService(
            config=config,
            pg=self.pg,
            directory=self.directory,
            redis_master=self.redis,
            user_cache=UserCache(config.memcached),
            photo_store=PhotoStore(config.s3),
            stats=self.stats,
        )


_local = threading.local()
_health_lock = threading.Lock()
_health_checkers: dict[int, HealthChecker] = {}


def runtime(config: AppConfig) -> Runtime:
    current: Runtime | None = getattr(_local, "runtime", None)
    # a runtime inherited across fork (gunicorn --preload) shares sockets with the parent
    if current is None or current.pid != os.getpid():
        current = _local.runtime = Runtime(config)
    return current


def health_checker(config: AppConfig) -> HealthChecker:
    with _health_lock:
        checker = _health_checkers.get(os.getpid())
        if checker is None:
            checker = _health_checkers[os.getpid()] = HealthChecker(config)
        return checker
