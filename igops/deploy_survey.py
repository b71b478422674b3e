"""What the fleet holds now: each app server's releases (asked of its release agent) and each
load balancer's servers, read together; and the report of `igops deploy releases`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from igops.deploy_agents import AppFleet
from igops.deploy_gate import LbState, LoadBalancers
from igops.deploy_record import read_last_run
from igops.errors import RemoteError

SURVEY_TIMEOUT_S = 30.0


@dataclass
class HostReleases:
    host: str
    address: str
    root: str
    reachable: bool
    error: str | None = None
    current: str | None = None
    previous: str | None = None
    releases: list[dict[str, Any]] = field(default_factory=list)
    venvs: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def has(self, release: str) -> bool:
        return any(item["id"] == release for item in self.releases)

    def release_info(self, release: str | None) -> dict[str, Any] | None:
        return next((item for item in self.releases if item["id"] == release), None)


def survey_hosts(app: AppFleet, parallel: int | None = None) -> dict[str, HostReleases]:
    answers = app.request_each(
        {host.name: (app.release_agent(host), {"op": "survey"}, b"") for host in app.hosts}, SURVEY_TIMEOUT_S, parallel
    )
    found = {}
    for host in app.hosts:
        answer, error = answers[host.name].answer, answers[host.name].error
        if answer is None:
            found[host.name] = HostReleases(host.name, str(host.address), app.root(host), False, error)
        else:
            found[host.name] = HostReleases(
                host.name,
                str(host.address),
                app.root(host),
                True,
                None,
                answer["current"],
                answer["previous"],
                answer["releases"],
                answer["venvs"],
                answer["history"],
            )
    return found


def survey(app: AppFleet, parallel: int | None = None) -> tuple[dict[str, HostReleases], LbState]:
    """The app servers' releases and the load balancers' servers, asked at the same time."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lb") as pool:
        lb = pool.submit(LoadBalancers(app, "survey").read)
        return survey_hosts(app, parallel), lb.result()


def survey_for_change(app: AppFleet, parallel: int | None) -> tuple[dict[str, HostReleases], LbState]:
    surveys, lb = survey(app, parallel)
    if lb.errors:
        raise RemoteError(
            "cannot read the load balancer: " + "; ".join(f"{n}: {e}" for n, e in lb.errors.items()),
            "nothing was changed; igops never switches a host it cannot take out of traffic",
        )
    return surveys, lb


# --- the fleet's releases: `igops deploy releases` ------------------------------------------------


@dataclass
class HostReleaseRow:
    host: str
    reachable: bool
    current: str | None
    previous: str | None
    releases: list[str]
    load_balancer: str
    error: str | None = None


@dataclass
class FleetReleases:
    fleet: str
    hosts: list[HostReleaseRow]
    agree: bool
    in_use: dict[str, list[str]]
    last_run: dict[str, Any] | None
    problems: list[str]


def fleet_releases(app: AppFleet) -> FleetReleases:
    fleet = app.fleet
    last = read_last_run(fleet)
    running = bool(last and last.get("status") == "running" and last.get("interrupted") is False)
    surveys, lb = survey(app)
    rows: list[HostReleaseRow] = []
    in_use: dict[str, list[str]] = {}
    problems: list[str] = []
    for host in app.hosts:
        found = surveys[host.name]
        where = lb.describe(app.server(host))
        rows.append(
            HostReleaseRow(
                host.name,
                found.reachable,
                found.current,
                found.previous,
                [item["id"] for item in found.releases],
                where,
                found.error,
            )
        )
        if not found.reachable:
            problems.append(f"{host.name} unreachable: {found.error}")
            continue
        in_use.setdefault(found.current or "none", []).append(host.name)
        if where.startswith("drained by igops") and not running:
            problems.append(f"{host.name} is out of the load balancer since an igops run that did not finish")
    for name, error in lb.errors.items():
        problems.append(f"load balancer {name}: {error}")
    if len(in_use) > 1 and not running:
        problems.append(
            "the fleet disagrees: "
            + "; ".join(f"{release} on {', '.join(hosts)}" for release, hosts in sorted(in_use.items()))
        )
    if running and last is not None:
        problems.append(
            f"the {last['kind']} {last['deploy_id']} to {last['target']} is running "
            f"(pid {last['pid']} on {last['host']}, by {last['user']})"
        )
    if last and last.get("status") == "held":
        problems.append(
            f"the {last['kind']} {last['deploy_id']} to {last['target']} is held with its canary in place "
            f"({last.get('stopped')}): `igops deploy` of it again goes on, `igops deploy rollback` returns the canary"
        )
    if last and last.get("interrupted"):
        problems.append(
            f"the {last['kind']} {last['deploy_id']} to {last['target']} was interrupted "
            f"(pid {last['pid']} is gone): rerun it to finish"
        )
    return FleetReleases(
        app.name, rows, len(in_use) <= 1 and all(row.reachable for row in rows), in_use, last, problems
    )
