"""The window of traffic a canary analysis reads: where each load balancer's access log ended when
it began, and what each app server's /stats counted; at its end, the bytes appended to each log
since (read over the deploy's own session to that load balancer's `upstream` agent), parsed into
requests and charged to the app server that answered (its `address:port` is in the inventory),
and each server's gunicorn worker restarts in between.

Only the bytes appended since the window began cross the network, never the whole log.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from igops.deploy_accesslog import Request, complete_lines, parse_lines
from igops.deploy_agents import AppFleet

LOG_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 3.0
# The app's /stats counter of gunicorn worker boots (app/wsgi.py adds one per worker it loads).
WORKER_STARTS = "worker_starts"


@dataclass
class LogMark:
    """Where one load balancer's access log ended when the window began."""

    lb: str
    path: str
    inode: int | None = None
    size: int | None = None
    error: str | None = None


@dataclass
class WindowStart:
    started: float  # Unix time
    marks: list[LogMark]
    worker_starts: dict[str, int | None]  # app host -> its /stats counter then


@dataclass
class Window:
    """The requests each app host answered in the window, its worker restarts, and what the
    reading saw on the way (a load balancer that could not be read, a rotated log)."""

    seconds: float
    records: dict[str, list[Request]] = field(default_factory=dict)
    restarts: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unparsed: int = 0
    unattributed: int = 0


def fetch_worker_starts(address: str, port: int) -> int | None:
    """The app's count of gunicorn worker boots, from its /stats; None when it does not say
    (a release from before the counter, or no answer)."""
    connection = http.client.HTTPConnection(address, port, timeout=STATS_TIMEOUT_S)
    try:
        connection.request("GET", "/stats", headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    try:
        value = json.loads(body).get(WORKER_STARTS) if response.status == 200 else None
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) else None


def _worker_starts(app: AppFleet, hosts: Sequence[str]) -> dict[str, int | None]:
    if not hosts:
        return {}
    port = app.fleet.model.app.port
    with ThreadPoolExecutor(max_workers=min(len(hosts), 32), thread_name_prefix="stats") as pool:
        found = {name: pool.submit(fetch_worker_starts, str(app.host(name).address), port) for name in hosts}
        return {name: future.result() for name, future in found.items()}


def _log_path(app: AppFleet, lb: str) -> str:
    return app.fleet.path_for(app.fleet.model.lb.access_log, app.host(lb))


def begin(app: AppFleet, hosts: Sequence[str]) -> WindowStart:
    """Mark where every load balancer's access log ends now, and read the hosts' /stats."""
    started = time.time()
    answers = app.request_each(
        {lb.name: (app.upstream_agent(lb), {"log": {"path": _log_path(app, lb.name)}}, b"") for lb in app.lbs},
        LOG_TIMEOUT_S,
    )
    marks = []
    for lb in app.lbs:
        mark = LogMark(lb.name, _log_path(app, lb.name))
        answer = answers[lb.name].answer
        if answer is None:
            mark.error = answers[lb.name].error or "no answer from its agent"
        else:
            mark.inode, mark.size = answer["log"]["inode"], answer["log"]["size"]
        marks.append(mark)
    return WindowStart(started, marks, _worker_starts(app, hosts))


def server_names(app: AppFleet) -> dict[str, str]:
    """`address:port` as nginx logs an app server -> the host's name."""
    port = app.fleet.model.app.port
    names = {}
    for host in app.hosts:
        address = str(host.address)
        names[f"{address}:{port}"] = host.name
        names[f"[{address}]:{port}"] = host.name  # IPv6, as nginx writes it
    return names


def charge(records: Sequence[Request], names: dict[str, str]) -> dict[str, list[Request]]:
    """The records by the app host that answered; a server the inventory does not name is left
    out. The window is the log's bytes between two reads, not a span of timestamps: the load
    balancers' clocks need not agree with this machine's."""
    by_host: dict[str, list[Request]] = {}
    for record in records:
        host = names.get(record.upstream)
        if host is not None:
            by_host.setdefault(host, []).append(record)
    return by_host


def end(app: AppFleet, start: WindowStart, hosts: Sequence[str], max_bytes: int) -> Window:
    """Read what the load balancers logged since `start`, and the hosts' restarts meanwhile."""
    until = time.time()
    reading = {
        mark.lb: (
            app.upstream_agent(app.host(mark.lb)),
            {"log": {"path": mark.path, "inode": mark.inode, "offset": mark.size, "max_bytes": max_bytes}},
            b"",
        )
        for mark in start.marks
        if mark.error is None
    }
    answers = app.request_each(reading, LOG_TIMEOUT_S)
    window = Window(round(until - start.started, 1))
    window.notes += [
        f"{mark.lb}: its access log {mark.path} was not read: {mark.error}" for mark in start.marks if mark.error
    ]
    lines: list[str] = []
    for lb, answered in answers.items():
        if answered.answer is None:
            window.notes.append(f"{lb}: its access log was not read: {answered.error or 'no answer from its agent'}")
            continue
        found: dict[str, Any] = answered.answer["log"]
        lines += complete_lines(zlib.decompress(base64.b64decode(found.get("data") or "")))
        if found.get("rotated"):
            window.notes.append(f"{lb}: the access log was rotated in the window (read across the rotation)")
        if found.get("truncated"):
            window.notes.append(f"{lb}: more than {max_bytes >> 20} MiB logged in the window; only the first read")
    parsed = parse_lines(lines)
    window.unparsed, window.unattributed = parsed.unparsed, parsed.unattributed
    if parsed.unparsed:
        window.notes.append(
            f"{parsed.unparsed} log lines not in the `upstream` log_format (docs/deploy.md) were left out"
        )
    window.records = charge(parsed.records, server_names(app))
    after = _worker_starts(app, hosts)
    for host in hosts:
        before, now = start.worker_starts.get(host), after.get(host)
        # A counter that went down was reset (the counter file replaced): no restart count.
        window.restarts[host] = now - before if before is not None and now is not None and now >= before else None
    return window
