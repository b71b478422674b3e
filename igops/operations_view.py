"""The read side of the operation engine: what `igops ops` and `igops check` show.

The list works without the coordinator's quorum too: a read etcd cannot answer within one
election is read again from one member's own copy (etcd's serializable read, which needs no
leader), and with no member up from this machine's cache of its last good read. Either is
marked stale, and says which it is, so an on-call engineer on any machine still sees what was
under way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops import coordination, etcd_gateway, safety
from igops.errors import RefusedError
from igops.operations import conflicts, journal

if TYPE_CHECKING:
    from igops.interrupted import Continuation
    from igops.inventory import Fleet

CACHE_NAME = "operations-cache.json"
# Where a list was read from: the coordinator itself, one etcd member's own copy, or the cache.
COORDINATOR, MEMBER_COPY, CACHED = "coordinator", "member copy", "cache"


@dataclass
class OperationsView:
    records: list[dict[str, Any]]
    backend: str
    stale: str | None = None  # why the coordinator itself could not be read
    read_at: str | None = None
    problems: list[str] = field(default_factory=list)
    read_from: str = COORDINATOR

    def stale_source(self) -> str:
        """What a stale list is, in words."""
        if self.read_from == MEMBER_COPY:
            # Whether a lease lives only a leader can say: another machine's run is shown running.
            return "the list as one etcd member holds it, which may lack the last writes"
        return f"the list as last read on this machine, at {self.read_at}"


def _store(
    fleet: Fleet,
) -> tuple[coordination.LocalCoordinator | coordination.EtcdCoordinator, journal.LocalJournal | journal.EtcdJournal]:
    backend = coordination.for_fleet(fleet)
    return backend, journal.for_coordinator(backend, fleet.state_dir)


def _with_status(store: journal.LocalJournal | journal.EtcdJournal, record: dict[str, Any]) -> dict[str, Any]:
    record = dict(record)
    record["status"] = journal.status_of(record, False if record.get("ended") else store.alive(record))
    return record


def list_operations(fleet: Fleet, include_ended: bool = False) -> OperationsView:
    backend, store = _store(fleet)
    cache = fleet.state_dir / CACHE_NAME
    try:
        # A list is read, not acted on: it waits for a leader no longer than one election.
        records = _read(store.for_reading(), include_ended)
    except etcd_gateway.EtcdError as exc:
        return _without_quorum(store, backend.name, exc.message, cache, include_ended)
    _write_cache(cache, records)
    return OperationsView(records, backend.name, read_at=safety.now())


def _without_quorum(
    store: journal.LocalJournal | journal.EtcdJournal, backend: str, why: str, cache: Path, include_ended: bool
) -> OperationsView:
    """The list as one member holds it; with no member up, as this machine last read it."""
    try:
        records = _read(store.for_reading(member_copy=True), include_ended)
        return OperationsView(records, backend, stale=why, read_at=safety.now(), read_from=MEMBER_COPY)
    except etcd_gateway.EtcdError:
        cached = _read_cache(cache)
    records = [r for r in cached.get("records", []) if include_ended or not r.get("ended")]
    return OperationsView(records, backend, stale=why, read_at=cached.get("read_at", "never"), read_from=CACHED)


def _read(store: journal.LocalJournal | journal.EtcdJournal, include_ended: bool) -> list[dict[str, Any]]:
    """The records, with their status, oldest first: with `include_ended`, every one."""
    records = [_with_status(store, record) for record in (store.records() if include_ended else store.open_records())]
    records.sort(key=lambda record: record.get("started") or "")
    return [r for r in records if include_ended or r["status"] in (journal.RUNNING, journal.INTERRUPTED)]


def show(fleet: Fleet, op_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    _, store = _store(fleet)
    record = store.record(op_id)
    if record is None:
        raise RefusedError(f"no operation {op_id!r} in the journal", "igops ops list --all lists them")
    return _with_status(store, record), store.entries(op_id)


def history(fleet: Fleet, since: datetime | None, target: str | None, limit: int) -> list[dict[str, Any]]:
    backend = coordination.for_fleet(fleet)
    if isinstance(backend, coordination.EtcdCoordinator):
        records = backend.audit_records()
    else:
        records = journal.read_json_lines(fleet.state_dir / "audit.log")
    if since is not None:
        records = [r for r in records if _time(r.get("time")) >= since]
    if target is not None:
        records = [r for r in records if target in (r.get("targets") or [])]
    return records[-limit:]


def _time(text: object) -> datetime:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def overdue(record: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds a running operation has held its lease beyond its kind's expected duration."""
    if record.get("status") != journal.RUNNING:
        return None
    try:
        expected = conflicts.kind(record["kind"]).expected_s
    except ValueError:
        return None
    held = ((now or datetime.now(UTC)) - _time(record.get("started"))).total_seconds()
    return held - expected if held > expected else None


def plan_continuation(fleet: Fleet, op_id: str, name: str) -> tuple[dict[str, Any], Continuation]:
    """The record of an interrupted operation and the resume or abort planned for it."""
    from igops import interrupted

    _, store = _store(fleet)
    record = store.record(op_id)
    if record is None:
        raise RefusedError(f"no operation {op_id!r} in the journal", "igops ops list shows the interrupted ones")
    interrupted.refuse_if_alive(store, record)
    if name == "resume":
        return record, interrupted.plan_resume(fleet, record, store.entries(op_id))
    return record, interrupted.plan_abort(fleet, record, store.entries(op_id))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cached: dict[str, Any] = json.loads(path.read_text())
        return cached
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, records: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"read_at": safety.now(), "records": records}))
        os.replace(temporary, path)
    except OSError:
        pass  # a cache that cannot be written only makes a later stale read older
