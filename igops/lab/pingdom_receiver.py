"""The lab's stand-in for Pingdom's API 3.1: checks, results, summaries, maintenance windows
and the request limits, with a prober that really tests its checks, but only on loopback
addresses: no traffic leaves the machine."""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import threading
import time
from http import HTTPStatus
from http.client import HTTPConnection, HTTPSConnection
from pathlib import Path
from typing import Any

from igops.lab.receiver_base import Receiver, Reply

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
        # Set when a check is created: the prober tests it at once, as Pingdom tests a new check
        # well within its first interval, instead of at its next round.
        self.created = threading.Event()
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
        self.created.set()
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
        """Every check once per probe interval (each result stands for that long in the uptime
        summary); a check created in between is tested at once, alone."""
        next_round = time.monotonic()
        while True:
            new_only = time.monotonic() < next_round
            if not new_only:
                next_round = time.monotonic() + self.probe_interval
            with self.lock:
                due = [
                    dict(check)
                    for check in self.checks.values()
                    if not check.get("paused") and not (new_only and self.results.get(check["id"]))
                ]
            for check in due:
                self._record(check["id"], *probe(check))
            self.created.wait(max(0.1, next_round - time.monotonic()))
            self.created.clear()

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
