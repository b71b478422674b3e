"""What a deploy or rollback records about itself: `<state_dir>/deploy/<fleet>.json`, the record
of the fleet's last run, and who ran it.

The record is what `igops deploy releases` reports, and, for a run that was interrupted, what a
rerun returns each of its hosts to if they fail (see `deploy_plan.inherit_releases_before`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops import safety

if TYPE_CHECKING:
    from igops.deploy_plan import RolloutPlan
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
        self.path = last_run_path(fleet)
        self.document: dict[str, Any] = {
            "deploy_id": plan.deploy_id,
            "kind": plan.kind,
            "target": plan.target,
            "pid": os.getpid(),
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

    def host(self, name: str, state: str) -> None:
        hosts = dict(self.document["hosts"])
        hosts[name] = state
        self.update(hosts=hosts)


def last_run_path(fleet: Fleet) -> Path:
    return fleet.state_dir / "deploy" / f"{fleet.model.fleet.name}.json"


def read_last_run(fleet: Fleet) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(last_run_path(fleet).read_text())
    except (OSError, ValueError):
        return None
    if document.get("status") == "running" and document.get("machine") == socket.gethostname():
        from igops.coordination import process_alive

        document["interrupted"] = not process_alive(int(document.get("pid", 0)))
    return document


def deployer() -> str:
    """`user@host` of whoever runs igops: the user behind sudo when there is one. The host is the
    machine's name, as in the record's `machine`, which tells whether its process still lives."""
    return f"{os.environ.get('SUDO_USER') or safety.operator_user()}@{socket.gethostname()}"
