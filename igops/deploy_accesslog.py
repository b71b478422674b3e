"""The load balancers' access log as records: which app server answered each request, how, and
how fast. Pure functions: the canary analysis (igops.deploy_canary) reads what these return.

The lines are nginx's `upstream` log_format, which igops installs in the lab and which
docs/deploy.md gives for production:

    $remote_addr [$time_local] "$request" $status $body_bytes_sent
    upstream=$upstream_addr rt=$request_time urt=$upstream_response_time ts=$msec ust=$upstream_status

The key=value fields after `$body_bytes_sent` are read by name, in any order, so a format that
adds fields of its own still parses; lines of the older format (no `ts`, no `ust`) parse too,
timed to the second from `$time_local`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

# The routes of app/urls.py, as Django's path() writes them: a `<…>` segment is an id (a user
# or photo reference), collapsed to `:id` so that every request to one view is one endpoint.
# tests/unit/test_deploy_accesslog.py keeps this list equal to app/urls.py's.
APP_ROUTES = (
    "api/users",
    "api/users/<user_ref>",
    "api/follow",
    "api/photos",
    "api/photos/<photo_ref>",
    "api/photos/<photo_ref>/image",
    "api/photos/<photo_ref>/like",
    "api/feed",
    "health",
    "stats",
)
# Outside the routes, a path segment that looks like an id (digits, a long hex string, a UUID)
# still collapses: a mistyped or probed path must not make an endpoint per id.
ID_SEGMENT = re.compile(r"^(\d+|[0-9a-fA-F]{16,}|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27})$")
MAX_PATH_SEGMENTS = 8

LINE = re.compile(
    r'^(?P<remote>\S+) \[(?P<local>[^\]]*)\] "(?P<request>(?:[^"\\]|\\.)*)" '
    r"(?P<status>\d{3}) (?P<bytes>\S+)(?P<fields>(?: .*)?)$"
)
# `key=value`: a value runs to the next ` key=` (values hold ", " and " : " between the attempts
# of one request), or to the end of the line.
FIELD = re.compile(r"(?:^| )(\w+)=(.*?)(?= \w+=|$)")
# Between the upstream attempts of one request: ", " for the next server, " : " after an
# internal redirect to another upstream group.
ATTEMPTS = re.compile(r", | : ")
# A request nginx failed over after an error of this server: the server's own status is not in
# a line of the older format, only the client's.
FAILED_ATTEMPT_STATUS = 502


@dataclass(frozen=True, slots=True)
class Request:
    """One answer of one app server to the load balancer: a request nginx retried on another
    server after this one failed is two records, one per server."""

    time: float  # Unix time the load balancer logged the request ($msec)
    upstream: str  # address:port of the app server, as nginx names it
    status: int  # that server's HTTP status ($upstream_status), or nginx's own
    request_time: float  # seconds that server took ($upstream_response_time), or the request's
    endpoint: str  # "GET /api/photos/:id"


@dataclass
class Parsed:
    """What a read of an access log gave: the records, and how many lines were not understood
    (another format, a request line nginx could not parse) or named no app server."""

    records: list[Request]
    unparsed: int = 0
    unattributed: int = 0


def normalise_path(target: str) -> str:
    """The endpoint a request target belongs to: no query string, ids collapsed.
    "/api/users/123?x=1" -> "/api/users/:id"."""
    path = target.split("?", 1)[0].split("#", 1)[0] or "/"
    if not path.startswith("/"):
        # An absolute-form target ("http://host/path") or garbage: the path part, if any.
        found = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*(/.*)?$", path)
        path = (found.group(1) or "/") if found else "/" + path
    segments = [segment for segment in path.strip("/").split("/") if segment]
    route = _route_of(segments)
    if route is not None:
        return route
    collapsed = [":id" if ID_SEGMENT.match(segment) else segment for segment in segments[:MAX_PATH_SEGMENTS]]
    if len(segments) > MAX_PATH_SEGMENTS:
        collapsed.append("…")
    return "/" + "/".join(collapsed)


def _compiled_routes() -> list[tuple[list[str | None], str]]:
    routes = []
    for route in APP_ROUTES:
        parts: list[str | None] = [None if part.startswith("<") else part for part in route.split("/")]
        template = "/" + "/".join(":id" if part is None else part for part in parts)
        routes.append((parts, template))
    return routes


_ROUTES = _compiled_routes()


def _route_of(segments: list[str]) -> str | None:
    for parts, template in _ROUTES:
        if len(parts) == len(segments) and all(
            part is None or part == seg for part, seg in zip(parts, segments, strict=True)
        ):
            return template
    return None


def endpoint_of(request_line: str) -> str | None:
    """ "GET /api/users/12 HTTP/1.1" -> "GET /api/users/:id"; None for a line that names no
    method and target (nginx logs a bad request's bytes as they came)."""
    words = request_line.split(" ")
    if len(words) < 2 or not re.fullmatch(r"[A-Z]{3,10}", words[0]):
        return None
    return f"{words[0]} {normalise_path(words[1])}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _status(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _local_time(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        return None


def parse_line(line: str) -> list[Request] | None:
    """The records of one access-log line: one per app server that answered (nginx's retries
    after an error give several); [] for a request no app server answered (nginx's own 502
    "no live upstreams", a static answer); None for a line not in the format."""
    match = LINE.match(line.rstrip("\r\n"))
    if not match:
        return None
    endpoint = endpoint_of(match.group("request"))
    if endpoint is None:
        return None
    fields = {key: value for key, value in FIELD.findall(match.group("fields").strip())}
    moment = _number(fields.get("ts", "")) or _local_time(match.group("local"))
    total = _number(fields.get("rt", ""))
    if moment is None or total is None:
        return None
    final_status = int(match.group("status"))
    addresses = ATTEMPTS.split(fields.get("upstream", "-"))
    statuses = ATTEMPTS.split(fields["ust"]) if "ust" in fields else []
    times = ATTEMPTS.split(fields.get("urt", "-"))
    records = []
    for index, address in enumerate(addresses):
        # An address names a server (host:port); nginx puts the group's name there when no
        # server was tried, and "-" when the request never went upstream.
        if ":" not in address or address.startswith("unix:"):
            continue
        last = index == len(addresses) - 1
        status = _status(statuses[index]) if index < len(statuses) else None
        if status is None:
            status = final_status if last else FAILED_ATTEMPT_STATUS
        took = _number(times[index]) if index < len(times) else None
        records.append(Request(moment, address, status, total if took is None else took, endpoint))
    return records


def parse_lines(lines: Iterable[str]) -> Parsed:
    parsed = Parsed([])
    for line in lines:
        if not line.strip():
            continue
        records = parse_line(line)
        if records is None:
            parsed.unparsed += 1
        elif not records:
            parsed.unattributed += 1
        else:
            parsed.records.extend(records)
    return parsed


def complete_lines(data: bytes) -> list[str]:
    """The whole lines of a chunk read from a log that nginx may be writing to: a last line
    without its newline is still being written, and is left out."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    return lines[:-1]
