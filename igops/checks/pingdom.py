"""Pingdom API 3.1: a client that respects the account's request limits, and checks as code.

Every response carries Req-Limit-Short and Req-Limit-Long ("Remaining: N Time until reset: S").
The client remembers them: with nothing left it waits for the reset if that is short, and
otherwise refuses at once rather than earn a 429. A 429 is retried with growing pauses.

The checks igops manages carry the tag `igops-<fleet>`; checks without it are never touched.
`plan_sync` compares the checks the inventory implies with those in Pingdom and yields the
creates, updates and pauses that make Pingdom match (a check is paused, not deleted, so its
history survives a mistaken inventory edit).
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, UsageError
from igops.output import Reporter

if TYPE_CHECKING:
    import requests

    from igops.inventory import Fleet

LIMIT_HEADER = re.compile(r"Remaining:\s*(\d+)\s*Time until reset:\s*(\d+)", re.I)
RESOLUTION = 1  # minutes between tests
MAX_LIMIT_WAIT = 30.0  # wait out an exhausted limit only if it resets this soon
BACKOFF = (1.0, 2.0, 4.0, 8.0)  # pauses before the retries of a 429 (or a 5xx on a safe method)
IDEMPOTENT = ("GET", "PUT", "DELETE")
# A maintenance window's `from` meaning "now": the API accepts only future times, and the
# client's reading of its clock is already past when the request arrives.
NOW = 1


class PingdomError(IgopsError):
    pass


@dataclass(frozen=True)
class RateLimit:
    remaining: int
    reset_seconds: int


def parse_limit(header: str | None) -> RateLimit | None:
    match = LIMIT_HEADER.search(header or "")
    return RateLimit(int(match.group(1)), int(match.group(2))) if match else None


class Pingdom:
    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        reporter: Reporter = Reporter(),
        sleep: Callable[[float], None] = time.sleep,
    ):
        import requests

        from igops.secrets import insecure_url_problem

        problem = insecure_url_problem(base_url)
        if problem:
            raise UsageError(f"[monitoring] pingdom_url: {problem}", "use Pingdom's https:// API URL")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.reporter = reporter
        self.sleep = sleep
        self.limits: dict[str, RateLimit] = {}
        self._limits_seen_at = time.monotonic()
        self._session = requests.Session()
        self._session.headers.update(
            {"Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": "igops"}
        )

    @classmethod
    def for_fleet(cls, fleet: Fleet, reporter: Reporter = Reporter(), timeout: float = 10.0) -> Pingdom:
        from igops.secrets import Secrets

        token = Secrets(fleet.model.secrets.file).require("pingdom_token")
        return cls(fleet.model.monitoring.pingdom_url, token, timeout=timeout, reporter=reporter)

    def close(self) -> None:
        self._session.close()

    # --- requests -------------------------------------------------------------------------
    def _respect_limits(self) -> None:
        elapsed = time.monotonic() - self._limits_seen_at
        for name, limit in self.limits.items():
            if limit.remaining > 0:
                continue
            wait = limit.reset_seconds - elapsed
            if wait <= 0:
                continue
            if wait > MAX_LIMIT_WAIT:
                raise PingdomError(
                    f"Pingdom's {name} request limit is used up; it resets in {wait:.0f} s", "try again after the reset"
                )
            self.reporter.log(f"Pingdom's {name} request limit is used up: waiting {wait:.0f} s for the reset")
            self.sleep(wait)

    def _remember_limits(self, headers: Mapping[str, str]) -> None:
        parsed = {name: parse_limit(headers.get(f"Req-Limit-{name.capitalize()}")) for name in ("short", "long")}
        found = {name: limit for name, limit in parsed.items() if limit}
        if found:
            self.limits.update(found)
            self._limits_seen_at = time.monotonic()

    def request(
        self, method: str, path: str, params: dict[str, Any] | None = None, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        import requests

        url = f"{self.base_url}/{path.lstrip('/')}"
        for attempt in range(len(BACKOFF) + 1):
            self._respect_limits()
            try:
                response = self._session.request(method, url, params=params, json=body, timeout=self.timeout)
            except requests.RequestException as exc:
                if method in IDEMPOTENT and attempt < len(BACKOFF):
                    self._pause(attempt, f"{method} {path}: {type(exc).__name__}")
                    continue
                raise PingdomError(
                    f"Pingdom API at {self.base_url} unreachable: {type(exc).__name__}",
                    "check [monitoring] pingdom_url and the network",
                ) from None
            self._remember_limits(response.headers)
            retryable = response.status_code == 429 or (response.status_code >= 500 and method in IDEMPOTENT)
            if retryable and attempt < len(BACKOFF):
                self._pause(
                    attempt, f"{method} {path}: HTTP {response.status_code}", response.headers.get("Retry-After")
                )
                continue
            if response.status_code >= 400:
                raise PingdomError(f"Pingdom {method} {path}: HTTP {response.status_code}: {_error_message(response)}")
            answer: dict[str, Any] = response.json() if response.content else {}
            return answer
        raise AssertionError("unreachable")

    def _pause(self, attempt: int, what: str, retry_after: str | None = None) -> None:
        wait = BACKOFF[attempt]
        if retry_after and retry_after.isdigit():
            wait = max(wait, min(float(retry_after), MAX_LIMIT_WAIT))
        self.reporter.log(f"{what}; retrying in {wait:g} s")
        self.sleep(wait)

    # --- resources ------------------------------------------------------------------------
    def checks(self, tag: str | None = None) -> list[dict[str, Any]]:
        params = {"include_tags": "true"}
        if tag:
            params["tags"] = tag
        checks: list[dict[str, Any]] = self.request("GET", "/checks", params=params).get("checks", [])
        return checks

    def check(self, check_id: int) -> dict[str, Any]:
        check: dict[str, Any] = self.request("GET", f"/checks/{check_id}")["check"]
        return check

    def create_check(self, body: dict[str, Any]) -> int:
        return int(self.request("POST", "/checks", body=body)["check"]["id"])

    def modify_check(self, check_id: int, body: dict[str, Any]) -> None:
        self.request("PUT", f"/checks/{check_id}", body=body)

    def summary(self, check_id: int, start: int, end: int) -> dict[str, Any]:
        summary: dict[str, Any] = self.request(
            "GET", f"/summary.average/{check_id}", params={"from": start, "to": end, "includeuptime": "true"}
        )["summary"]
        return summary

    def create_maintenance(self, description: str, start: int, end: int, check_ids: list[int]) -> int:
        """A window from `start` (a future UNIX time, or NOW) to `end` (a future UNIX time)."""
        body = {"description": description, "from": start, "to": end, "uptimeids": check_ids}
        return int(self.request("POST", "/maintenance", body=body)["maintenance"]["id"])

    def open_maintenance(self, description: str, seconds: int, check_ids: list[int]) -> tuple[int, int]:
        """A window starting now and lasting `seconds`: its id and its end (UNIX time)."""
        end = int(time.time()) + seconds
        return self.create_maintenance(description, NOW, end, check_ids), end


def _error_message(response: requests.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("errormessage") or error.get("statusdesc") or response.reason)[:200]
    except ValueError:
        return (response.text or response.reason or "")[:200]


# --- checks as code ---------------------------------------------------------------------------


def fleet_tag(fleet: Fleet) -> str:
    return f"igops-{fleet.model.fleet.name}"[:64]


@dataclass(frozen=True)
class DesiredCheck:
    name: str
    host: str
    url: str
    port: int
    encryption: bool

    def body(self, tag: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "type": "http",
            "url": self.url,
            "port": self.port,
            "encryption": self.encryption,
            "resolution": RESOLUTION,
            "paused": False,
            "tags": [tag],
        }

    def describe(self) -> str:
        scheme = "https" if self.encryption else "http"
        return f"{scheme}://{self.host}:{self.port}{self.url}"


def desired_checks(fleet: Fleet) -> list[DesiredCheck]:
    model = fleet.model
    name = model.fleet.name
    found = [
        DesiredCheck(f"{name} {host.name} health", str(host.address), model.lb.health_path, model.lb.port, False)
        for host in fleet.with_role("lb")
    ]
    for url in model.monitoring.public_urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"monitoring.public_urls: {url!r} is not an http(s) URL", "write it as https://host/path")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        encryption = parts.scheme == "https"
        found.append(
            DesiredCheck(
                f"{name} {url}"[:128], parts.hostname, path, parts.port or (443 if encryption else 80), encryption
            )
        )
    return found


@dataclass
class Change:
    action: str  # create, update, pause
    name: str
    check_id: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.action == "create":
            return f"+ create {self.name!r}: {self.differences[0]}"
        if self.action == "pause":
            return f"- pause {self.name!r} (#{self.check_id}): no longer in the inventory"
        return f"~ update {self.name!r} (#{self.check_id}): {'; '.join(self.differences)}"


@dataclass
class SyncPlan:
    tag: str
    changes: list[Change]
    unchanged: list[str]

    def steps(self) -> list[str]:
        return [change.describe() for change in self.changes]


def current_settings(detail: dict[str, Any]) -> dict[str, Any]:
    """A check's detail (GET /checks/{id}) as the fields a DesiredCheck sets."""
    kind = detail.get("type")
    http = kind.get("http", {}) if isinstance(kind, dict) else {}
    return {
        "host": detail.get("hostname"),
        "url": http.get("url", detail.get("url")),
        "port": http.get("port", detail.get("port")),
        "encryption": http.get("encryption", detail.get("encryption")),
        "resolution": detail.get("resolution"),
        "paused": detail.get("status") == "paused",
        "type": "http" if isinstance(kind, dict) and "http" in kind else kind,
    }


def plan_sync(client: Pingdom, fleet: Fleet) -> SyncPlan:
    tag = fleet_tag(fleet)
    desired = {check.name: check for check in desired_checks(fleet)}
    existing = {check["name"]: check for check in client.checks(tag)}
    changes, unchanged = [], []
    for name, want in desired.items():
        have = existing.get(name)
        if have is None:
            changes.append(Change("create", name, body=want.body(tag), differences=[want.describe()]))
            continue
        current = current_settings(client.check(int(have["id"])))
        if current.get("type") != "http":
            raise UsageError(
                f"Pingdom check {name!r} (#{have['id']}) is a {current.get('type')} check, "
                "and a check's type cannot be changed",
                "delete it in Pingdom; the next sync creates it as an HTTP check",
            )
        target = {
            "host": want.host,
            "url": want.url,
            "port": want.port,
            "encryption": want.encryption,
            "resolution": RESOLUTION,
            "paused": False,
        }
        differences = [
            f"{key} {current.get(key)!r} → {value!r}" for key, value in target.items() if current.get(key) != value
        ]
        if differences:
            changes.append(
                Change(
                    "update",
                    name,
                    int(have["id"]),
                    {key: value for key, value in target.items() if current.get(key) != value},
                    differences,
                )
            )
        else:
            unchanged.append(name)
    for name, have in existing.items():
        if name not in desired and have.get("status") != "paused":
            changes.append(Change("pause", name, int(have["id"]), {"paused": True}))
    return SyncPlan(tag, changes, unchanged)


def apply_sync(client: Pingdom, plan: SyncPlan, reporter: Reporter = Reporter()) -> list[dict[str, Any]]:
    done = []
    for change in plan.changes:
        with reporter.step(change.describe()):
            if change.action == "create":
                change.check_id = client.create_check(change.body)
            else:
                assert change.check_id is not None, "plan_sync names the check it updates or pauses"
                client.modify_check(change.check_id, change.body)
        done.append({"action": change.action, "name": change.name, "id": change.check_id})
    return done


@dataclass
class CheckStatus:
    id: int
    name: str
    target: str
    status: str
    last_response_ms: int | None
    last_test: int | None
    uptime_percent: float | None


def statuses(client: Pingdom, fleet: Fleet, window_seconds: int, include_all: bool = False) -> list[CheckStatus]:
    now = int(time.time())
    found = []
    for check in client.checks(None if include_all else fleet_tag(fleet)):
        summary = client.summary(int(check["id"]), now - window_seconds, now).get("status", {})
        up, down = summary.get("totalup", 0), summary.get("totaldown", 0)
        found.append(
            CheckStatus(
                int(check["id"]),
                check["name"],
                check.get("hostname", ""),
                check.get("status", "unknown"),
                check.get("lastresponsetime"),
                check.get("lasttesttime"),
                round(100.0 * up / (up + down), 3) if up + down else None,
            )
        )
    return found


def parse_duration(text: str) -> int:
    """'90s', '10m', '2h', '1d' (or plain seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text or "")
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"bad duration {text!r}", "use e.g. 90s, 10m, 2h or 1d")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
