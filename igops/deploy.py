"""Rolling deploys of the app: one release built once, staged on every app server in parallel,
then switched batch by batch behind the load balancer, each host gated on its own /health.

The layout on a host is Capistrano's (releases/<id>, an atomically switched `current`,
shared/); the work on hosts is done by the `release` and `upstream` agents. The state a rerun
needs lives where it is true: each host's `current` symlink and revisions.log, and a marker on
every upstream line igops took out of nginx. So a run that was killed, or that lost a host,
leaves nothing half-switched, and the next run finds what is left to do and does it.

This module is the capability's public entry: the commands, `ops resume|abort`, the checks,
bench/ and the tests call what it names. The pieces live in:

- `deploy_release`: the app's files (working tree or git) and the release tarball;
- `deploy_agents`: one SSH session per host for a whole run, and `AppFleet`;
- `deploy_gate`: the load balancers (drain, put back) and the /health gate;
- `deploy_survey`: what each host and load balancer holds now, and `deploy releases`' report;
- `deploy_plan`: batches, each host's part, the refusals, the plan's steps;
- `deploy_rollout`: running a plan; `deploy_switch`: switching a batch's hosts and back;
  `deploy_result`: the result, host by host;
- `deploy_record`: the record of the fleet's last run, which a rerun reads;
- `deploy_limits`: batches, max_fail and min_in_service as numbers of hosts;
- `deploy_accesslog`, `deploy_window`, `deploy_canary`, `deploy_canary_plan`, `deploy_analysis`:
  the canary analysis (the load balancers' log, its window, the statistics, the plan's step, its run);
- `deploy_pending`: the commits a deploy brings.
"""

from __future__ import annotations

from igops.deploy_agents import AppFleet
from igops.deploy_canary_plan import AnalysisOptions
from igops.deploy_gate import HealthGate, LbServer, LbState, drained_by_igops, put_back
from igops.deploy_limits import BatchSize, HostLimit, parse_batches, split_batches
from igops.deploy_pending import Pending, for_deploy as pending_for_deploy, pending
from igops.deploy_plan import (
    ALREADY,
    DEPLOYED,
    FAILED,
    NOT_STARTED,
    OUTSIDE,
    ROLLED_BACK,
    SKIPPED,
    UNKNOWN,
    HostPlan,
    ReleaseMissing,
    RolloutPlan,
    plan_deploy,
    plan_resume,
    plan_rollback,
    resume_params,
)
from igops.deploy_record import inherit_releases_before, read_last_runs
from igops.deploy_release import (
    SHARED_LINKS,
    Release,
    SourceTree,
    content_hash,
    package,
    read_source,
    release_id,
    requirements_hash,
)
from igops.deploy_result import HostOutcome, RolloutFailed, RolloutResult
from igops.deploy_rollout import execute
from igops.deploy_survey import FleetReleases, HostReleaseRow, HostReleases, fleet_releases, survey_hosts

__all__ = [
    "ALREADY",
    "AnalysisOptions",
    "DEPLOYED",
    "FAILED",
    "NOT_STARTED",
    "OUTSIDE",
    "ROLLED_BACK",
    "SHARED_LINKS",
    "SKIPPED",
    "UNKNOWN",
    "AppFleet",
    "BatchSize",
    "FleetReleases",
    "HealthGate",
    "HostLimit",
    "HostOutcome",
    "HostPlan",
    "HostReleaseRow",
    "HostReleases",
    "LbServer",
    "LbState",
    "Pending",
    "Release",
    "ReleaseMissing",
    "RolloutFailed",
    "RolloutPlan",
    "RolloutResult",
    "SourceTree",
    "content_hash",
    "drained_by_igops",
    "execute",
    "fleet_releases",
    "inherit_releases_before",
    "package",
    "parse_batches",
    "pending",
    "pending_for_deploy",
    "plan_deploy",
    "plan_resume",
    "plan_rollback",
    "put_back",
    "read_last_runs",
    "read_source",
    "release_id",
    "requirements_hash",
    "resume_params",
    "split_batches",
    "survey_hosts",
]
