"""PagerDuty change events (Events API v2, `/v2/change/enqueue`): the deploy and rollback
markers responders see on a service's timeline next to its incidents.

A marker must never hold up or fail the change it marks: attempts are few and bounded in time,
429 and 5xx and network errors are retried with backoff, any other 4xx is not (the same event
would be refused again), and the routing key never appears in what is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops.secrets import redact

if TYPE_CHECKING:
    from igops.http_json import Answer
    from igops.inventory import Fleet

PATH = "/v2/change/enqueue"
ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
REQUEST_TIMEOUT_S = 5.0
SUMMARY_LIMIT = 1024


def routing_key(fleet: Fleet) -> str | None:
    """The PagerDuty routing key change events go to, if the fleet has one (a secret)."""
    from igops.secrets import Secrets

    return Secrets(fleet.model.secrets.file).get("pagerduty_routing_key")


@dataclass
class ChangeEventResult:
    sent: bool
    attempts: int
    detail: str


def send_change(
    base_url: str,
    routing_key: str,
    summary: str,
    source: str,
    custom_details: dict[str, Any] | None = None,
    links: list[dict[str, Any]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ChangeEventResult:
    from igops.http_json import HttpFailure, JsonClient
    from igops.secrets import insecure_url_problem

    problem = insecure_url_problem(base_url)
    if problem:
        # The routing key would travel in the clear: the marker is not sent (it never fails a change).
        return ChangeEventResult(False, 0, f"not sent: {problem}")
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "payload": {
            "summary": summary[:SUMMARY_LIMIT],
            "source": source,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "custom_details": custom_details or {},
        },
    }
    if links:
        event["links"] = links
    url = base_url.rstrip("/") + PATH
    detail = "not sent"
    client = JsonClient()
    try:
        for attempt in range(1, ATTEMPTS + 1):
            retryable = True
            try:
                response = client.post(url, event, connect_timeout=REQUEST_TIMEOUT_S, timeout=REQUEST_TIMEOUT_S)
                if response.status == 202:
                    return ChangeEventResult(True, attempt, "accepted")
                detail = f"HTTP {response.status}: {_message(response)}"
                retryable = response.status == 429 or response.status >= 500
            except HttpFailure as exc:
                detail = str(exc)
            if not retryable:
                return ChangeEventResult(False, attempt, redact(detail))
            if attempt < ATTEMPTS:
                sleep(FIRST_BACKOFF_S * 2 ** (attempt - 1))
        return ChangeEventResult(False, ATTEMPTS, redact(detail))
    finally:
        client.close()


def _message(response: Answer) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    errors = body.get("errors") if isinstance(body, dict) else None
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    return f"{message}: {'; '.join(errors)}" if errors else str(message)[:200]
