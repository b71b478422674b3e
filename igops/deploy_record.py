"""What a deploy or rollback records about itself: `<state_dir>/deploy/<fleet>.json`, the record
of the fleet's last run, and who ran it. A run limited to some app servers (--hosts) keeps its
own record beside it (`<fleet>.hosts-<digest>.json`): two such runs may go on at once.

The record is what `igops deploy releases` reports, and, for a run that was interrupted, what a
rerun returns each of its hosts to if they fail (see `deploy_plan.inherit_releases_before`).
Whether its run was interrupted is judged as a lease's holder is (igops.process_identity).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops import process_identity, safety

if TYPE_CHECKING:
    from igops.deploy_plan import HostPlan, RolloutPlan
    from igops.deploy_survey import HostReleases
    from igops.inventory import Fleet


class LastRunRecord:
    """The one record per fleet of its latest deploy or rollback: its id, kind and target, the
    process running it, its batch, each host's state, and each rolled host's release before it.

    It is not an entry of the operation journal (`igops.operations.journal`), which keeps one
    record per operation id, redacted and in etcd when the fleet coordinates there: this one is
    found by fleet name alone, whichever operation wrote it last, and a rerun reads the `before`
    releases of the run it follows from it. Its file, its format and what reads it (`deploy
    releases`, the plans) stay as they were."""

    def __init__(self, fleet: Fleet, plan: RolloutPlan):
        limited = any(host.action == "outside" for host in plan.hosts)
        self.path = last_run_path(fleet, plan.scope() if limited else None)
        self.document: dict[str, Any] = {
            "deploy_id": plan.deploy_id,
            "kind": plan.kind,
            "target": plan.target,
            # The process running it, as igops.process_identity judges one: "host" is the
            # operator's host (IGOPS_OPERATOR_HOST, else the host name), which judge compares with
            # its own. "machine", the host name, is what an older igops judges by.
            "host": safety.operator_host(),
            "pid": os.getpid(),
            **process_identity.own(),
            "machine": socket.gethostname(),
            "user": deployer(),
            "started": safety.now("seconds"),
            "status": "running",
            "batch": None,
            "hosts": {},
            # What a rerun returns a failing host to if this run is interrupted.
            "before": {host.host: host.before for host in plan.hosts if host.action == "roll" and host.before},
        }
        self._lock = threading.Lock()

    def update(self, **changes: Any) -> None:
        with self._lock:
            self.document.update(changes)
            self.document["updated"] = safety.now("seconds")
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.path.with_name(self.path.name + f".{os.getpid()}")
            temporary.write_text(json.dumps(self.document, indent=2, default=str) + "\n")
            os.replace(temporary, self.path)

    def hosts(self, states: dict[str, str]) -> None:
        """Hosts' new states in one write: the file is the whole record, so a write per host made
        a batch of 1,000 hosts rewrite it 1,000 times (seconds of CPU, growing with the square)."""
        if states:
            self.update(hosts={**self.document["hosts"], **states})


def last_run_path(fleet: Fleet, scope: list[str] | None = None) -> Path:
    name = fleet.model.fleet.name
    if scope is None:
        return fleet.state_dir / "deploy" / f"{name}.json"
    digest = hashlib.sha256(",".join(sorted(scope)).encode()).hexdigest()[:10]
    return fleet.state_dir / "deploy" / f"{name}.hosts-{digest}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if document.get("status") == "running":
        verdict = process_identity.judge(document)
        # Set only where this machine can tell, from the process's identity: gone, or running.
        # A record it cannot judge (another host, boot or PID namespace; or an igops older than
        # the identity, which judged by host name and pid alone) gets none, as another machine's
        # record always had. That costs little: `deploy releases` calls the run neither running
        # nor interrupted (and still names the hosts it left drained), and a rerun, resume or
        # abort keeps a failing host on the release it runs, gated there, instead of returning
        # it to its release before that run. Guessing "interrupted" would cost more: a live
        # deploy in another container (its pid free here) would be called gone, to be rerun.
        # Whether a deploy may start is not this record's to say: the leases on its hosts are.
        if verdict is not process_identity.Verdict.UNKNOWN:
            document["interrupted"] = verdict is process_identity.Verdict.GONE
    return document


def read_last_runs(fleet: Fleet) -> list[dict[str, Any]]:
    """Every record of the fleet's runs (the whole fleet's, and those of --hosts runs), newest first."""
    directory = fleet.state_dir / "deploy"
    paths = [directory / f"{fleet.model.fleet.name}.json", *directory.glob(f"{fleet.model.fleet.name}.hosts-*.json")]
    found = [document for path in paths if (document := _read(path)) is not None]
    return sorted(found, key=lambda document: str(document.get("updated") or document.get("started")), reverse=True)


def read_last_run(fleet: Fleet) -> dict[str, Any] | None:
    """The newest record: what `igops deploy releases` reports."""
    runs = read_last_runs(fleet)
    return runs[0] if runs else None


def deployer() -> str:
    """`user@host` of whoever runs igops: the user behind sudo when there is one, and the
    operator's host as every record names it (safety.operator_host)."""
    return f"{os.environ.get('SUDO_USER') or safety.operator_user()}@{safety.operator_host()}"


def inherit_releases_before(
    hosts: list[HostPlan],
    surveys: dict[str, HostReleases],
    last_runs: dict[str, Any] | list[dict[str, Any]] | None,
) -> None:
    """A host that an interrupted run switched to its target returns, if its batch fails now,
    to the release it ran before that run, not to the interrupted run's target: that release
    never passed a health gate the run saw through. The interrupted run's record has it (the
    newest that names the host, when several runs left one)."""
    runs = [last_runs] if isinstance(last_runs, dict) else list(last_runs or [])
    for run in runs:
        if run.get("interrupted"):
            _inherit(surveys, run, [host for host in hosts if host.host in (run.get("before") or {})])
            hosts = [host for host in hosts if host.host not in (run.get("before") or {})]


def _inherit(surveys: dict[str, HostReleases], last_run: dict[str, Any], named: list[HostPlan]) -> None:
    earlier = last_run.get("before") or {}
    for host in named:
        release = earlier.get(host.host)
        if host.action != "roll" or not release or host.current != last_run.get("target") or release == host.current:
            continue
        if not surveys[host.host].has(release):
            host.detail = "; ".join(
                filter(
                    None,
                    [host.detail, f"{release}, its release before the interrupted {last_run.get('kind')}, is gone"],
                )
            )
            continue
        host.before = release
        host.detail = "; ".join(
            filter(
                None,
                [
                    host.detail,
                    f"returns to {release} if it fails (its release before "
                    f"the interrupted {last_run.get('kind')} "
                    f"{last_run.get('deploy_id')})",
                ],
            )
        )
