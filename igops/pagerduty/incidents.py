"""Paging through PagerDuty's Events API v2, with the `pagerduty` package's EventsApiV2Client.

Every (check, target) has a stable dedup key, so PagerDuty folds repeats into one alert. igops
also remembers which keys it has triggered (a small JSON file per fleet in its state dir, which
every inventory may share): a check that stays CRITICAL across cron runs is triggered once, and a
check that recovers is resolved. A trigger that fails is not remembered, so the next run tries
again; a resolve that fails stays remembered for the same reason. 429 and 5xx answers are retried
with growing pauses; a 400 (a malformed event) never is.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops.errors import NagiosStatus, UsageError
from igops.output import Reporter
from igops.safety import now

if TYPE_CHECKING:
    from pagerduty import EventsApiV2Client

    from igops.checks import Result
    from igops.inventory import Fleet

RETRIES = {429: 5, 500: 3, 502: 3, 503: 3, 504: 3}
FIRST_PAUSE = 0.25  # seconds; the client doubles it before every retry
REQUEST_TIMEOUT = 10.0
MAX_SUMMARY = 1024


def _clean(text: str) -> str:
    return re.sub(r"\s+", "_", text.strip())


def key_prefix(fleet_name: str) -> str:
    """How every dedup key of the fleet starts."""
    return f"igops/{_clean(fleet_name)}/"


def dedup_key(fleet_name: str, check: str, target: str) -> str:
    """Stable per (fleet, check, target): the same fault always maps to the same alert."""
    return f"{key_prefix(fleet_name)}{_clean(check)}/{_clean(target)}"[:255]


def state_file_name(fleet_name: str) -> str:
    """The fleet's name as a file name. A name that had to be changed for that (or shortened)
    gets a hash of the real one, so two fleets whose names read the same here keep two files."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", fleet_name)[:100]
    if safe == fleet_name and safe.strip("."):
        return safe
    return f"{safe}-{hashlib.sha256(fleet_name.encode()).hexdigest()[:12]}"


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (a directory, or a file created for the purpose), waited for."""
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, dict[str, Any]]) -> None:
    """Replace `path` whole, so a reader or a crash never meets half a file."""
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    temporary.replace(path)


class _ToReporter(logging.Handler):
    """The client's retry messages, shown on stderr through the output boundary (redacted)."""

    def __init__(self, reporter: Reporter):
        super().__init__(logging.INFO)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.log(f"PagerDuty: {record.getMessage()}")


def client(url: str, routing_key: str, reporter: Reporter) -> EventsApiV2Client:
    from pagerduty import EventsApiV2Client, UrlError

    from igops.secrets import insecure_url_problem

    class EventsClient(EventsApiV2Client):
        """The package insists on https. So does igops, except towards a loopback address: a
        local relay, or the lab's receiver, where TLS protects nothing."""

        _url: str  # set by the client's __init__, through the setter below

        @property
        def url(self) -> str:
            return self._url

        @url.setter
        def url(self, base_url: str) -> None:
            if insecure_url_problem(base_url):
                raise UrlError("the Events API URL must use https:// (plain http only to a loopback address)")
            self._url = base_url

    events = EventsClient(routing_key, base_url=url.rstrip("/"))
    events.retry = dict(RETRIES)
    events.sleep_timer = FIRST_PAUSE
    events.timeout = REQUEST_TIMEOUT  # type: ignore[assignment]  # typed int from its default of 60; any seconds work
    events.max_http_attempts = max(RETRIES.values()) + 1
    events.max_network_attempts = 2
    log = logging.getLogger("igops.pagerduty")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.handlers[:] = [_ToReporter(reporter)]
    events.log = log
    return events


def describe_failure(exc: Exception) -> str:
    """What went wrong, without echoing the request (which carries the routing key)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None and response is not None:
        try:
            body = response.json()
            detail = "; ".join(body.get("errors") or []) or body.get("message") or ""
        except ValueError:
            detail = ""
        return f"HTTP {status}" + (f": {detail}" if detail else "")
    from igops.secrets import redact

    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redact(text[0]) if text else ''}"[:300]


@dataclass
class PagingReport:
    triggered: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    still_open: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def acted(self) -> bool:
        return bool(self.triggered or self.resolved or self.failed)


class Pager:
    def __init__(self, fleet: Fleet, reporter: Reporter = Reporter()):
        from igops.secrets import Secrets

        self.fleet_name = fleet.model.fleet.name
        self.url = fleet.model.monitoring.pagerduty_url
        self._secrets = Secrets(fleet.model.secrets.file)
        self.reporter = reporter
        # One file per fleet: inventories share the default state dir, and one fleet's complete
        # run resolves every open key it does not check.
        self.state_path = fleet.state_dir / "pagerduty" / "open" / f"{state_file_name(self.fleet_name)}.json"
        # Where older versions kept every fleet's open incidents together.
        self.shared_path = fleet.state_dir / "pagerduty" / "open.json"
        self._client: EventsApiV2Client | None = None

    @property
    def routing_key(self) -> str:
        return self._secrets.require("pagerduty_routing_key")

    def prepare(self) -> None:
        """Fail before anything is checked or promised if paging cannot work: no routing key,
        or an Events API URL the client refuses."""
        from pagerduty import UrlError

        try:
            _ = self.events  # the property builds the client, which refuses a bad URL
        except UrlError as exc:
            raise UsageError(
                f"[monitoring] pagerduty_url {self.url!r}: {exc}", "use the Events API's https:// URL"
            ) from None

    @property
    def events(self) -> EventsApiV2Client:
        if self._client is None:
            self._client = client(self.url, self.routing_key, self.reporter)
        return self._client

    def open_incidents(self) -> dict[str, dict[str, Any]]:
        """This fleet's open incidents, with those its next run carries over from the shared file."""
        shared = self._read(self.shared_path, "its incidents are not listed") or {}
        own = self._read(self.state_path, "starting from no open incidents") or {}
        return {**{key: item for key, item in shared.items() if self._owns(key, item)}, **own}

    def _read(self, path: Path, consequence: str) -> dict[str, dict[str, Any]] | None:
        """The incidents in `path`: none if it is missing, None if it is not JSON."""
        try:
            incidents: dict[str, dict[str, Any]] = json.loads(path.read_text())
            return incidents
        except FileNotFoundError:
            return {}
        except ValueError:
            self.reporter.log(f"{path} is not valid JSON: {consequence} (fix or remove the file)")
            return None

    def _owns(self, key: str, incident: dict[str, Any]) -> bool:
        """Whether a key of the shared file is this fleet's. Its prefix alone would give a fleet
        `a` the keys of a fleet `a/b` too, so where the incident names its check and target, the
        key must be exactly the one they make."""
        check, target = incident.get("check"), incident.get("target")
        if isinstance(check, str) and isinstance(target, str):
            return key == dedup_key(self.fleet_name, check, target)
        return key.startswith(key_prefix(self.fleet_name))

    @contextmanager
    def _held(self) -> Iterator[dict[str, dict[str, Any]]]:
        """This fleet's open incidents, its file locked until the block ends: a run that overlaps
        this one waits for it rather than losing its keys (the check lock, which keeps two
        checks of a fleet apart, is the command's, not every caller's)."""
        self.state_path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_path.parent.mkdir(exist_ok=True, mode=0o700)
        with _flocked(self.state_path.with_suffix(".lock")):
            incidents = self._read(self.state_path, "starting from no open incidents") or {}
            self._carry_over(incidents)
            yield incidents

    def _carry_over(self, incidents: dict[str, dict[str, Any]]) -> None:
        """Move this fleet's keys out of the shared file into its own, so an upgrade neither pages
        again for them nor forgets to resolve them. Other fleets' keys stay for their own runs to
        move; the file goes once it holds none. Fleets do this under one lock, the directory's."""
        if not self.shared_path.exists():
            return
        with _flocked(self.shared_path.parent):
            shared = self._read(self.shared_path, "no open incidents carried over from it")
            if shared is None:
                return
            mine = {key: item for key, item in shared.items() if self._owns(key, item)}
            if mine:
                for key, item in mine.items():
                    incidents.setdefault(key, item)
                self._save(incidents)
            rest = {key: item for key, item in shared.items() if key not in mine}
            if not rest:
                self.shared_path.unlink(missing_ok=True)
            elif mine:
                _write_json(self.shared_path, rest)

    def _save(self, incidents: dict[str, dict[str, Any]]) -> None:
        _write_json(self.state_path, incidents)

    def trigger(
        self, check: str, target: str, summary: str, details: dict[str, Any] | None = None, severity: str = "critical"
    ) -> str:
        from igops.secrets import redact, redact_data

        key = dedup_key(self.fleet_name, check, target)
        summary = redact(summary)
        text = f"[{self.fleet_name}] {check} {target}: {summary}"[:MAX_SUMMARY]
        return self.events.trigger(
            text,
            source=target,
            dedup_key=key,
            severity=severity,
            payload={"component": check, "group": self.fleet_name, "class": check, "timestamp": now("seconds")},
            custom_details=redact_data(
                {
                    "fleet": self.fleet_name,
                    "check": check,
                    "target": target,
                    "detail": summary,
                    "from": socket.gethostname(),
                    **(details or {}),
                }
            ),
        )

    def resolve(self, key: str) -> None:
        self.events.resolve(key)

    def reconcile(self, results: Iterable[Result], complete_run: bool) -> PagingReport:
        """Trigger what became CRITICAL, resolve what recovered. A (check, target) that did not
        run this time keeps its incident, unless this was a run of every check on every host
        (then it is no longer checked at all, and is resolved). Only this fleet's incidents are
        in its file, so no run resolves another fleet's.

        Once PagerDuty is unreachable, or still throttling or failing after the retries, the
        remaining events of this run are not sent: each would wait out the same retries, and a
        run that outlasts cron's minute only makes the next one exit LOCKED."""
        with self._held() as incidents:
            return self._reconcile(incidents, results, complete_run)

    def _reconcile(
        self, incidents: dict[str, dict[str, Any]], results: Iterable[Result], complete_run: bool
    ) -> PagingReport:
        report = PagingReport()
        seen: set[str] = set()
        gave_up: list[str] = []

        def send(action: str, key: str, call: Callable[[], object]) -> bool:
            if gave_up:
                report.failed.append(
                    {
                        "action": action,
                        "dedup_key": key,
                        "error": f"not sent: PagerDuty failed earlier in this run ({gave_up[0]})",
                    }
                )
                return False
            try:
                call()
                return True
            except Exception as exc:  # noqa: BLE001 - kept for the next run to retry
                error = describe_failure(exc)
                report.failed.append({"action": action, "dedup_key": key, "error": error})
                if not (error.startswith("HTTP 4") and not error.startswith("HTTP 429")):
                    gave_up.append(error)
                return False

        def resolve(key: str) -> None:
            if send("resolve", key, lambda: self.resolve(key)):
                incidents.pop(key, None)
                report.resolved.append(key)
                self._save(incidents)

        for result in results:
            key = dedup_key(self.fleet_name, result.check, result.target)
            seen.add(key)
            if result.status == NagiosStatus.CRITICAL:
                if key in incidents:
                    report.still_open.append(key)
                elif send("trigger", key, functools.partial(self.trigger, result.check, result.target, result.summary)):
                    incidents[key] = {
                        "check": result.check,
                        "target": result.target,
                        "since": now("seconds"),
                        "summary": result.summary[:300],
                    }
                    report.triggered.append(key)
                    self._save(incidents)
            elif result.status != NagiosStatus.UNKNOWN and key in incidents:
                resolve(key)
        if complete_run:
            for key in [key for key in incidents if key not in seen]:
                resolve(key)
        return report
