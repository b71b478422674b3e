"""Local stand-ins for PagerDuty's Events API v2 and Pingdom's API 3.1.

One process serves both, each on its own address. They validate requests the way the real
services document, record every request as a JSON line (and in memory for
GET /_lab/requests), and take injected faults (POST /_lab/faults {"status": 429, "count": 2})
so that monitoring code can be tested against retries and outages. The Pingdom stand-in
really probes its checks, but only on loopback addresses: no traffic leaves the machine.

Run: python -m igops.lab.receivers --pagerduty ADDR:PORT --pingdom ADDR:PORT --record-dir DIR
(tokens from IGOPS_PAGERDUTY_ROUTING_KEY and IGOPS_PINGDOM_TOKEN).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from datetime import datetime
from http import HTTPStatus
from http.client import HTTPConnection, HTTPSConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_REMEMBERED = 20_000


class Recorder:
    """Every request a receiver saw, in order, with what it answered."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.sequence = 0

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.sequence += 1
            entry = {"seq": self.sequence, **entry}
            self.entries.append(entry)
            del self.entries[:-MAX_REMEMBERED]
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")

    def since(self, sequence: int) -> list[dict[str, Any]]:
        with self.lock:
            return [entry for entry in self.entries if entry["seq"] > sequence]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


class Faults:
    """Injected failures, consumed one per request: {"status", "count", "delay_ms", "body"}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[dict[str, Any]] = []

    def add(self, spec: dict[str, Any]) -> dict[str, Any]:
        status = int(spec.get("status", 500))
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = {
            "status": status,
            "count": max(1, int(spec.get("count", 1))),
            "delay_ms": max(0, int(spec.get("delay_ms", 0))),
            "body": spec.get("body"),
        }
        with self.lock:
            self.queue.append(fault)
        return fault

    def take(self) -> dict[str, Any] | None:
        with self.lock:
            if not self.queue:
                return None
            fault = self.queue[0]
            fault["count"] -= 1
            if fault["count"] <= 0:
                self.queue.pop(0)
            return dict(fault)

    def clear(self) -> None:
        with self.lock:
            self.queue.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(fault) for fault in self.queue]


class Reply(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


class Receiver:
    """Routing, recording and fault injection shared by both services."""

    name = "receiver"

    def __init__(self, record_dir: Path):
        self.recorder = Recorder(record_dir / f"{self.name}.jsonl")
        self.faults = Faults()

    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/_lab/"):
            return self.lab(method, path, query, body)
        started = time.time()
        parsed_body = _parse_body(body, headers.get("content-type", ""))
        fault = self.faults.take()
        status: int
        reply: Any  # an injected fault's body is any JSON value
        extra: dict[str, str]
        if fault:
            time.sleep(fault["delay_ms"] / 1000)
        if fault and fault["status"] < 400:
            fault = None  # a pure delay: the request is then served normally
        if fault:
            status, reply, extra = fault["status"], fault["body"] or self.fault_body(fault["status"]), {}
        else:
            try:
                status, reply, extra = self.route(method, path, query, headers, parsed_body)
            except Reply as answer:
                status, reply, extra = answer.status, answer.body, answer.headers
        extra = {**self.common_headers(), **extra}
        self.recorder.add(
            {
                "time": started,
                "method": method,
                "path": path,
                "query": query,
                "headers": headers,
                "body": parsed_body,
                "status": status,
                "response": reply,
                "fault": bool(fault),
            }
        )
        return status, reply, extra

    def lab(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path == "/_lab/requests" and method == "GET":
            since = int(query.get("since", "0") or 0)
            return 200, {"requests": self.recorder.since(since)}, {}
        if path == "/_lab/requests" and method == "DELETE":
            self.recorder.clear()
            return 200, {"cleared": True}, {}
        if path == "/_lab/faults" and method == "POST":
            try:
                fault = self.faults.add(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:
                return 400, {"error": str(exc)}, {}
            return 200, {"fault": fault, "pending": self.faults.pending()}, {}
        if path == "/_lab/faults" and method == "GET":
            return 200, {"pending": self.faults.pending()}, {}
        if path == "/_lab/faults" and method == "DELETE":
            self.faults.clear()
            return 200, {"pending": []}, {}
        if path == "/_lab/state" and method == "GET":
            return 200, self.state(), {}
        return 404, {"error": f"no lab endpoint {method} {path}"}, {}

    def common_headers(self) -> dict[str, str]:
        return {}

    def fault_body(self, status: int) -> dict[str, Any]:
        return {
            "status": "error",
            "message": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "injected fault",
        }

    def route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        raise Reply(404, {"error": f"no resource {method} {path}"})

    def state(self) -> dict[str, Any]:
        return {}


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if "application/x-www-form-urlencoded" in content_type:
        return {key: values[-1] for key, values in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


# --- PagerDuty Events API v2 ---------------------------------------------------------------

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


# --- Pingdom API 3.1 -------------------------------------------------------------------------

PINGDOM_PREFIX = "/api/3.1"
CHECK_TYPES = ("http", "httpcustom", "tcp", "ping", "dns", "udp", "smtp", "pop3", "imap")
RESOLUTIONS = (1, 5, 15, 30, 60)
SHORT_LIMIT, SHORT_WINDOW = 1000, 3600
LONG_LIMIT, LONG_WINDOW = 100_000, 2_592_000
LAB_PROBE_ID = 1
MAX_RESULTS = 5000


class Pingdom(Receiver):
    name = "pingdom"

    def __init__(self, record_dir: Path, token: str | None, probe_interval: float):
        super().__init__(record_dir)
        self.token = token
        self.probe_interval = probe_interval
        self.lock = threading.Lock()
        self.checks: dict[int, dict[str, Any]] = {}
        self.results: dict[int, list[dict[str, Any]]] = {}
        self.maintenance: dict[int, dict[str, Any]] = {}
        self.next_id = 1_000_001
        self.short = [0, time.time()]
        self.long = [0, time.time()]

    # -- limits, auth and errors
    def common_headers(self) -> dict[str, str]:
        now = time.time()
        with self.lock:
            return {
                "Req-Limit-Short": _limit_header(SHORT_LIMIT - self.short[0], self.short[1] + SHORT_WINDOW - now),
                "Req-Limit-Long": _limit_header(LONG_LIMIT - self.long[0], self.long[1] + LONG_WINDOW - now),
            }

    def fault_body(self, status: int) -> dict[str, Any]:
        message = "Request limit exceeded, try again later" if status == 429 else "Injected fault"
        return _pingdom_error(status, message).body

    def _count_request(self) -> None:
        now = time.time()
        with self.lock:
            for counter, window in ((self.short, SHORT_WINDOW), (self.long, LONG_WINDOW)):
                if now - counter[1] >= window:
                    counter[:] = [0, now]
            if self.short[0] >= SHORT_LIMIT or self.long[0] >= LONG_LIMIT:
                raise _pingdom_error(429, "Request limit exceeded, try again later")
            self.short[0] += 1
            self.long[0] += 1

    def _authorise(self, headers: dict[str, str]) -> None:
        value = headers.get("authorization", "")
        scheme, _, credential = value.partition(" ")
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential).decode().split(":", 1)[0]
            except ValueError:
                credential = ""
        elif scheme.lower() != "bearer":
            credential = ""
        if not credential or (self.token and credential != self.token):
            raise _pingdom_error(401, "Invalid or missing API token")

    def route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if not path.startswith(PINGDOM_PREFIX + "/"):
            raise _pingdom_error(404, f"Unknown resource {path}")
        self._authorise(headers)
        self._count_request()
        resource = path[len(PINGDOM_PREFIX) :].rstrip("/")
        body = body if isinstance(body, dict) else {}
        if resource == "/checks":
            if method == "GET":
                return 200, self.list_checks(query), {}
            if method == "POST":
                return 200, self.create_check(body), {}
        match = re.fullmatch(r"/checks/(\d+)", resource)
        if match:
            check_id = int(match.group(1))
            if method == "GET":
                return 200, {"check": self._check(check_id, detailed=True)}, {}
            if method == "PUT":
                self.modify_check(check_id, body)
                return 200, {"message": "Modification of check was successful!"}, {}
            if method == "DELETE":
                with self.lock:
                    if self.checks.pop(check_id, None) is None:
                        raise _pingdom_error(404, f"Check {check_id} not found")
                    self.results.pop(check_id, None)
                return 200, {"message": "Deletion of check was successful!"}, {}
        match = re.fullmatch(r"/results/(\d+)", resource)
        if match and method == "GET":
            return 200, self.check_results(int(match.group(1)), query), {}
        match = re.fullmatch(r"/summary\.average/(\d+)", resource)
        if match and method == "GET":
            return 200, self.summary_average(int(match.group(1)), query), {}
        if resource == "/maintenance":
            if method == "POST":
                return 200, self.create_maintenance(body), {}
            if method == "GET":
                with self.lock:
                    return 200, {"maintenance": list(self.maintenance.values())}, {}
        raise _pingdom_error(404, f"Unknown resource {method} {resource}")

    # -- checks
    def create_check(self, body: dict[str, Any]) -> dict[str, Any]:
        missing = [field for field in ("name", "host", "type") if not body.get(field)]
        if missing:
            raise _pingdom_error(400, f"Missing required parameter(s): {', '.join(missing)}")
        if body["type"] not in CHECK_TYPES:
            raise _pingdom_error(400, f"Invalid check type {body['type']!r}")
        check = {
            "type": body["type"],
            "status": "unknown",
            "created": int(time.time()),
            "lasterrortime": None,
            "lasttesttime": None,
            "lastresponsetime": None,
            "lastdownstart": None,
            "lastdownend": None,
            "failures": 0,
        }
        self._apply(check, body, creating=True)
        with self.lock:
            check_id = self.next_id
            self.next_id += 1
            check["id"] = check_id
            self.checks[check_id] = check
            self.results[check_id] = []
        return {"check": {"id": check_id, "name": check["name"]}}

    def modify_check(self, check_id: int, body: dict[str, Any]) -> None:
        with self.lock:
            check = self.checks.get(check_id)
            if check is None:
                raise _pingdom_error(404, f"Check {check_id} not found")
            if "type" in body and body["type"] != check["type"]:
                raise _pingdom_error(400, "The type of a check cannot be changed")
            self._apply(check, body, creating=False)

    def _apply(self, check: dict[str, Any], body: dict[str, Any], creating: bool) -> None:
        if "resolution" in body or creating:
            resolution = _integer(body.get("resolution", 5), "resolution")
            if resolution not in RESOLUTIONS:
                raise _pingdom_error(400, f"Invalid resolution {resolution} (one of {RESOLUTIONS})")
            check["resolution"] = resolution
        for field in ("name", "host", "url", "shouldcontain", "shouldnotcontain"):
            if field in body:
                check["hostname" if field == "host" else field] = str(body[field])
        if body.get("shouldcontain") and body.get("shouldnotcontain"):
            raise _pingdom_error(400, "shouldcontain and shouldnotcontain cannot be used together")
        for field in ("port", "sendnotificationwhendown", "notifyagainevery"):
            if field in body:
                check[field] = _integer(body[field], field)
        for field in ("paused", "encryption", "notifywhenbackup", "ipv6"):
            if field in body:
                check[field] = _boolean(body[field])
        if creating:
            check.setdefault("paused", False)
            check.setdefault("encryption", False)
            check.setdefault("url", "/")
        if "tags" in body:
            check["tags"] = _tag_list(body["tags"])
        if "addtags" in body:
            check["tags"] = sorted(set(check.get("tags", [])) | set(_tag_list(body["addtags"])))
        check.setdefault("tags", [])
        if check.get("paused"):
            check["status"] = "paused"
        elif check.get("status") == "paused":
            check["status"] = "unknown"

    def _check(self, check_id: int, detailed: bool) -> dict[str, Any]:
        with self.lock:
            check = self.checks.get(check_id)
            if check is None:
                raise _pingdom_error(404, f"Check {check_id} not found")
            view = {key: value for key, value in check.items() if key != "failures" and value is not None}
        view["tags"] = [{"name": tag, "type": "u", "count": 1} for tag in check.get("tags", [])]
        if detailed:
            http = {
                key: view.pop(key)
                for key in ("url", "encryption", "port", "shouldcontain", "shouldnotcontain")
                if key in view
            }
            view["type"] = {view["type"]: http}
        return view

    def list_checks(self, query: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            ids = sorted(self.checks)
        views = [self._check(check_id, detailed=False) for check_id in ids]
        total = len(views)
        if query.get("tags"):
            wanted = set(query["tags"].split(","))
            views = [view for view in views if wanted & {tag["name"] for tag in view["tags"]}]
        limited = len(views)
        offset = int(query.get("offset", 0) or 0)
        limit = int(query.get("limit", 25000) or 25000)
        views = views[offset : offset + limit]
        if query.get("include_tags", "false").lower() != "true":
            for view in views:
                view.pop("tags", None)
        return {"checks": views, "counts": {"total": total, "limited": limited, "filtered": len(views)}}

    def check_results(self, check_id: int, query: dict[str, str]) -> dict[str, Any]:
        self._check(check_id, detailed=False)
        now = int(time.time())
        to = int(query.get("to", now))
        start = int(query.get("from", to - 86400))
        statuses = set(query["status"].split(",")) if query.get("status") else None
        limit = min(int(query.get("limit", 1000)), 1000)
        offset = int(query.get("offset", 0))
        with self.lock:
            results = [
                result
                for result in reversed(self.results.get(check_id, []))
                if start <= result["time"] <= to and (statuses is None or result["status"] in statuses)
            ]
        return {"results": results[offset : offset + limit], "activeprobes": [LAB_PROBE_ID] if results else []}

    def summary_average(self, check_id: int, query: dict[str, str]) -> dict[str, Any]:
        check = self._check(check_id, detailed=False)
        now = int(time.time())
        to = int(query.get("to", now))
        start = int(query.get("from", 0))
        with self.lock:
            results = [result for result in self.results.get(check_id, []) if start <= result["time"] <= to]
        answered = [result["responsetime"] for result in results if result["status"] == "up"]
        summary = {
            "responsetime": {
                "from": start,
                "to": to,
                "avgresponse": round(sum(answered) / len(answered)) if answered else 0,
            }
        }
        if str(query.get("includeuptime", "false")).lower() == "true":
            interval = self.probe_interval
            up = sum(interval for result in results if result["status"] == "up")
            down = sum(interval for result in results if result["status"] == "down")
            unknown = max(0, (to - max(start, check["created"])) - up - down) + max(0, check["created"] - start)
            summary["status"] = {"totalup": int(up), "totaldown": int(down), "totalunknown": int(unknown)}
        return {"summary": summary}

    def create_maintenance(self, body: dict[str, Any]) -> dict[str, Any]:
        missing = [field for field in ("description", "from", "to") if field not in body]
        if missing:
            raise _pingdom_error(400, f"Missing required parameter(s): {', '.join(missing)}")
        # As the 3.1 spec says: only future times, and 1 for "now". A client's own clock reading
        # of now has passed by the time the request arrives.
        now = int(time.time())
        start, end = (_future_time(body, field, now) for field in ("from", "to"))
        if end <= start:
            raise _pingdom_error(400, "'to' must be after 'from'")
        uptime_ids = body.get("uptimeids", [])
        if isinstance(uptime_ids, str):
            uptime_ids = [int(item) for item in uptime_ids.split(",") if item.strip()]
        with self.lock:
            unknown = [check_id for check_id in uptime_ids if check_id not in self.checks]
            if unknown:
                raise _pingdom_error(400, f"Unknown check ids: {', '.join(map(str, unknown))}")
            window_id = len(self.maintenance) + 1
            self.maintenance[window_id] = {
                "id": window_id,
                "description": str(body["description"]),
                "from": start,
                "to": end,
                "recurrencetype": body.get("recurrencetype", "none"),
                "checks": {"uptime": uptime_ids, "tms": body.get("tmsids", [])},
            }
        return {"maintenance": {"id": window_id}}

    # -- the prober
    def probe_forever(self) -> None:
        while True:
            started = time.monotonic()
            with self.lock:
                due = [dict(check) for check in self.checks.values() if not check.get("paused")]
            for check in due:
                self._record(check["id"], *probe(check))
            time.sleep(max(0.1, self.probe_interval - (time.monotonic() - started)))

    def _record(self, check_id: int, up: bool | None, response_ms: int, description: str) -> None:
        now = int(time.time())
        with self.lock:
            check = self.checks.get(check_id)
            if check is None or check.get("paused"):
                return
            if up is None:
                status, result_status = "unknown", "unknown"
            elif up:
                if check["status"] in ("down", "unconfirmed_down"):
                    check["lastdownend"] = now
                status, result_status, check["failures"] = "up", "up", 0
            else:
                check["failures"] += 1
                check["lasterrortime"] = now
                status = "unconfirmed_down" if check["failures"] == 1 else "down"
                result_status = "unconfirmed" if status == "unconfirmed_down" else "down"
                if check["failures"] == 1:
                    check["lastdownstart"] = now
            check.update(status=status, lasttesttime=now, lastresponsetime=response_ms)
            results = self.results.setdefault(check_id, [])
            results.append(
                {
                    "probeid": LAB_PROBE_ID,
                    "time": now,
                    "status": result_status,
                    "responsetime": response_ms,
                    "statusdesc": description,
                    "statusdesclong": description,
                }
            )
            del results[:-MAX_RESULTS]

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {"checks": list(self.checks.values()), "maintenance": list(self.maintenance.values())}


def _limit_header(remaining: float, reset: float) -> str:
    return f"Remaining: {max(0, remaining)} Time until reset: {max(0, int(reset))}"


def _pingdom_error(status: int, message: str) -> Reply:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return Reply(status, {"error": {"statuscode": status, "statusdesc": phrase, "errormessage": message}})


def _future_time(body: dict[str, Any], field: str, now: int) -> int:
    value = _integer(body[field], field)
    if value == 1:
        return now
    if value <= now:
        raise _pingdom_error(400, f"Only future times are allowed for '{field}' (use 1 for the current time)")
    return value


def _integer(value: Any, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _pingdom_error(400, f"Invalid value for {field}: {value!r}") from None


def _boolean(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")


def _tag_list(value: Any) -> list[str]:
    tags = value if isinstance(value, list) else str(value).split(",")
    return [str(tag).strip() for tag in tags if str(tag).strip()][:64]


def probe(check: dict[str, Any]) -> tuple[bool | None, int, str]:
    """One test of a check: (up, response time in ms, description); None when the lab cannot
    test it (a target off this machine, or a check type it does not probe)."""
    target = check.get("hostname", "")
    try:
        loopback = target == "localhost" or ipaddress.ip_address(target).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None, 0, "The lab probes only loopback targets"
    started = time.monotonic()
    try:
        if check["type"] in ("http", "httpcustom"):
            encryption = check.get("encryption", False)
            port = check.get("port") or (443 if encryption else 80)
            connection = (HTTPSConnection if encryption else HTTPConnection)(target, port, timeout=5)
            try:
                connection.request("GET", check.get("url") or "/")
                response = connection.getresponse()
                text = response.read(1 << 20).decode(errors="replace")
            finally:
                connection.close()
            elapsed = int((time.monotonic() - started) * 1000)
            if response.status >= 400:
                return False, elapsed, f"HTTP Error {response.status}"
            if check.get("shouldcontain") and check["shouldcontain"] not in text:
                return False, elapsed, "Did not contain the expected text"
            if check.get("shouldnotcontain") and check["shouldnotcontain"] in text:
                return False, elapsed, "Contained the unexpected text"
            return True, elapsed, "OK"
        if check["type"] == "tcp":
            with socket.create_connection((target, int(check.get("port") or 80)), timeout=5):
                return True, int((time.monotonic() - started) * 1000), "OK"
        return None, 0, f"The lab does not probe {check['type']} checks"
    except OSError as exc:
        return False, int((time.monotonic() - started) * 1000), f"Connection failed: {exc.strerror or exc}"


# --- the HTTP servers ------------------------------------------------------------------------


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"igops-lab-{receiver.name}"

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = {key: values[-1] for key, values in urllib.parse.parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {key.lower(): value for key, value in self.headers.items()}
            try:
                status, reply, extra = receiver.handle(self.command, url.path, query, headers, body)
            except Exception as exc:  # noqa: BLE001 - a receiver bug must answer 500, not hang
                status, reply, extra = 500, {"error": f"{type(exc).__name__}: {exc}"}, {}
            payload = json.dumps(reply, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m igops.lab.receivers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pagerduty", required=True, type=_address, metavar="ADDR:PORT")
    parser.add_argument("--pingdom", required=True, type=_address, metavar="ADDR:PORT")
    parser.add_argument("--record-dir", required=True, type=Path)
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=5.0,
        help="seconds between Pingdom probes of each check (the real service: minutes)",
    )
    args = parser.parse_args(argv)
    args.record_dir.mkdir(parents=True, exist_ok=True)
    pagerduty = PagerDuty(args.record_dir, os.environ.get("IGOPS_PAGERDUTY_ROUTING_KEY"))
    pingdom = Pingdom(args.record_dir, os.environ.get("IGOPS_PINGDOM_TOKEN"), args.probe_interval)
    servers = [
        ThreadingHTTPServer(args.pagerduty, handler_for(pagerduty)),
        ThreadingHTTPServer(args.pingdom, handler_for(pingdom)),
    ]
    for server in servers:
        server.daemon_threads = True
    threading.Thread(target=pingdom.probe_forever, name="pingdom-prober", daemon=True).start()
    threading.Thread(target=servers[0].serve_forever, name="pagerduty", daemon=True).start()
    servers[1].serve_forever()


if __name__ == "__main__":
    main()
