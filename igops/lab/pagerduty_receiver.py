"""The lab's stand-in for PagerDuty's Events API v2 (alerts and change events): it validates
events the way the service documents and keeps the incidents they open, acknowledge and resolve."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from igops.lab.receiver_base import Receiver, Reply

SEVERITIES = ("critical", "error", "warning", "info")
ACTIONS = ("trigger", "acknowledge", "resolve")


class PagerDuty(Receiver):
    name = "pagerduty"

    def __init__(self, record_dir: Path, routing_key: str | None):
        super().__init__(record_dir)
        self.routing_key = routing_key
        self.lock = threading.Lock()
        self.incidents: dict[str, dict[str, Any]] = {}
        self.changes: list[dict[str, Any]] = []

    def fault_body(self, status: int) -> dict[str, Any]:
        if status == 429:
            return {
                "status": "throttle event",
                "message": "Requests for this service are arriving too quickly. Please retry later.",
            }
        return super().fault_body(status)

    def route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if method != "POST" or path not in ("/v2/enqueue", "/v2/change/enqueue"):
            raise Reply(404, {"status": "error", "message": "Not found"})
        if not isinstance(body, dict):
            raise Reply(400, _invalid(["Event object is invalid: the body must be a JSON object"]))
        if path == "/v2/enqueue":
            return self.enqueue(body)
        return self.change(body)

    def _routing_key_errors(self, event: dict[str, Any]) -> list[str]:
        key = event.get("routing_key")
        if not isinstance(key, str) or not key:
            return ["'routing_key' is missing or blank"]
        if len(key) != 32:
            return ["Length of 'routing_key' is incorrect (should be 32 characters)"]
        if self.routing_key and key != self.routing_key:
            return ["Invalid routing key"]
        return []

    def enqueue(self, event: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        errors = self._routing_key_errors(event)
        action: Any = event.get("event_action")  # checked below: one of ACTIONS, else refused
        if action not in ACTIONS:
            errors.append(
                "'event_action' is invalid (must be one of the following: 'trigger', 'acknowledge' or 'resolve')"
            )
        dedup_key = event.get("dedup_key")
        if dedup_key is not None and (not isinstance(dedup_key, str) or not dedup_key):
            errors.append("'dedup_key' must be a non-empty string")
        elif isinstance(dedup_key, str) and len(dedup_key) > 255:
            errors.append("'dedup_key' is too long (maximum is 255 characters)")
        if action in ("acknowledge", "resolve") and not dedup_key:
            errors.append("'dedup_key' is required for acknowledge and resolve events")
        if action == "trigger":
            errors += _payload_errors(event.get("payload"))
        for field in ("images", "links"):
            if field in event and not isinstance(event[field], list):
                errors.append(f"'{field}' must be an array")
        if errors:
            raise Reply(400, _invalid(errors))
        dedup_key = dedup_key or uuid.uuid4().hex
        with self.lock:
            incident = self.incidents.setdefault(
                dedup_key, {"dedup_key": dedup_key, "status": "triggered", "events": 0}
            )
            incident["events"] += 1
            incident["status"] = {
                "trigger": incident["status"] if incident["status"] != "resolved" else "triggered",
                "acknowledge": "acknowledged",
                "resolve": "resolved",
            }[action]
            if action == "trigger":
                incident.update(
                    summary=event["payload"]["summary"],
                    severity=event["payload"]["severity"],
                    source=event["payload"]["source"],
                )
        return 202, {"status": "success", "message": "Event processed", "dedup_key": dedup_key}, {}

    def change(self, event: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        errors = self._routing_key_errors(event)
        payload: Any = event.get("payload")  # checked below: an object, else refused
        if not isinstance(payload, dict):
            errors.append("'payload' is missing or not an object")
        else:
            summary = payload.get("summary")
            if not isinstance(summary, str) or not summary:
                errors.append("'payload.summary' is missing or blank")
            elif len(summary) > 1024:
                errors.append("'payload.summary' is too long (maximum is 1024 characters)")
            if "timestamp" in payload and not _iso8601(payload["timestamp"]):
                errors.append("'payload.timestamp' is not a valid ISO 8601 timestamp")
            if "custom_details" in payload and not isinstance(payload["custom_details"], dict):
                errors.append("'payload.custom_details' must be an object")
        if "links" in event and not isinstance(event["links"], list):
            errors.append("'links' must be an array")
        if errors:
            raise Reply(400, _invalid(errors))
        with self.lock:
            self.changes.append(payload)
        return 202, {"status": "success", "message": "Change event processed"}, {}

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {"incidents": list(self.incidents.values()), "changes": list(self.changes)}


def _invalid(errors: list[str]) -> dict[str, Any]:
    return {"status": "invalid event", "message": "Event object is invalid", "errors": errors}


def _payload_errors(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return ["'payload' is missing or not an object"]
    errors = []
    for field in ("summary", "source"):
        if not isinstance(payload.get(field), str) or not payload.get(field):
            errors.append(f"'payload.{field}' is missing or blank")
    if isinstance(payload.get("summary"), str) and len(payload["summary"]) > 1024:
        errors.append("'payload.summary' is too long (maximum is 1024 characters)")
    if payload.get("severity") not in SEVERITIES:
        errors.append(
            "'payload.severity' is invalid (must be one of the following: 'critical', 'warning', 'error' or 'info')"
        )
    if "timestamp" in payload and not _iso8601(payload["timestamp"]):
        errors.append("'payload.timestamp' is not a valid ISO 8601 timestamp")
    for field in ("component", "group", "class"):
        if field in payload and not isinstance(payload[field], str):
            errors.append(f"'payload.{field}' must be a string")
    if "custom_details" in payload and not isinstance(payload["custom_details"], (dict, str)):
        errors.append("'payload.custom_details' must be an object")
    return errors


def _iso8601(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False
