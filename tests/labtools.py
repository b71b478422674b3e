"""Helpers shared by the lab-backed tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

from igops.lab import aws, state


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Ask `predicate` until it answers truthy or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def verify_lab_ledger(ledger: Path, app_host: str = "app1"):
    """Check a load generator's ledger against the lab's Postgres, Redis and S3, reading the
    stores' addresses from `app_host`'s app config."""
    # Not app.loadgen.verify: once the submodule of that name is imported, it shadows the function.
    from app.loadgen.verify import verify_ledger

    config = state.paths().app_root(app_host) / "shared" / "app.toml"
    previous = {key: os.environ.get(key) for key in aws.AWS_ENV}
    os.environ.update(aws.AWS_ENV)
    try:
        return verify_ledger(ledger, config)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
