"""Bounded retries: a failover or switchover should cost latency, not an error."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

RETRY_BUDGET_SECONDS = 5.0
FIRST_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 0.5


def call_with_retries(
    attempt: Callable[[], T],
    *,
    is_retryable: Callable[[BaseException], bool],
    before_retry: Callable[[BaseException], bool],
    budget_seconds: float = RETRY_BUDGET_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `attempt` until it succeeds, fails with a non-retryable error, or
    the next try would start past the budget; then the last error propagates.
    `before_retry` prepares the next try and returns True when it found what
    had changed (e.g. a new master), so that try need not wait."""
    deadline = clock() + budget_seconds
    delay = FIRST_DELAY_SECONDS
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not is_retryable(exc) or clock() + delay > deadline:
                raise
            if not before_retry(exc):
                sleep(delay)
                delay = min(delay * 2, MAX_DELAY_SECONDS)
