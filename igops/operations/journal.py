"""The write-ahead journal of operations: where everyone sees what is running, what was
interrupted, and what each step did.

Each operation has a record (kind, targets, plan, operator, reason, current step, result) and a
list of entries, appended before each step (intent) and after it (result), and at its end.
Two stores behind one interface, chosen like the leases (igops.coordination):

- local: `<state_dir>/operations/<id>.json` (the record, replaced atomically), `<id>.journal`
  (JSON lines, appended with O_APPEND) and `<id>.lock`, flocked by the process running the
  operation, so that a reader can tell running from interrupted even after a SIGKILL;
- etcd: `<prefix>ops/<id>` (the record) and `<prefix>journal/<id>/<seq>` (the entries); the
  record names the etcd lease of the process running it, alive while that process renews it.

A record whose operation has not ended is "running" while its holder is alive, "interrupted"
once it is not.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets as random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops.errors import AlreadyRunning
from igops.secrets import redact_data

if TYPE_CHECKING:
    from igops.coordination import EtcdCoordinator, LocalCoordinator
    from igops.etcd_gateway import EtcdGateway

RUNNING, INTERRUPTED = "running", "interrupted"


def new_id(moment: datetime | None = None) -> str:
    """Sortable by start time, short enough to type: 20261203-071530-a3f9."""
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y%m%d-%H%M%S") + "-" + random.token_hex(2)


def status_of(record: dict[str, Any], alive: bool) -> str:
    """An ended operation's result; otherwise running or interrupted, by whether its holder lives."""
    if record.get("ended"):
        return str(record.get("result") or "ended")
    return RUNNING if alive else INTERRUPTED


def _clean(data: Any) -> Any:
    """What a store keeps: redacted, and JSON whatever the facts hold."""
    return redact_data(json.loads(json.dumps(data, default=str)))


class LocalJournal:
    name = "local"

    def __init__(self, state_dir: Path):
        self.directory = state_dir / "operations"

    def for_reading(self, member_copy: bool = False) -> LocalJournal:
        """The same journal: files are read whole, with no leader to wait for (EtcdJournal's)."""
        return self

    def _path(self, op_id: str, suffix: str) -> Path:
        if not op_id or "/" in op_id or op_id.startswith("."):
            raise ValueError(f"not an operation id: {op_id!r}")
        return self.directory / f"{op_id}{suffix}"

    @contextmanager
    def hold(self, op_id: str) -> Iterator[None]:
        """Mark the operation as running in this process until the block ends (or it dies)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path(op_id, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(
                    f"operation {op_id} is running in another process", "see igops ops show " + op_id
                ) from None
            yield
        finally:
            os.close(fd)

    def alive(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self._path(record["id"], ".lock"), os.O_RDONLY)
        except (OSError, ValueError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _put_record(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(record["id"], ".json")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(_clean(record), sort_keys=True))
        os.replace(temporary, path)

    def append(self, op_id: str, entries: list[dict[str, Any]], record: dict[str, Any] | None = None) -> None:
        """Entries, in order; with `record`, the operation's record is replaced too (after them)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = "".join(json.dumps(_clean(entry), sort_keys=True) + "\n" for entry in entries).encode()
        fd = os.open(self._path(op_id, ".journal"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines)  # one write: atomic with O_APPEND, so no reader sees half of them
        finally:
            os.close(fd)
        if record is not None:
            self._put_record(record)

    def record(self, op_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._path(op_id, ".json").read_text())
        except (OSError, ValueError):
            return None
        return record

    def records(self) -> list[dict[str, Any]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced this instant, or not ours
        return found

    def open_records(self) -> list[dict[str, Any]]:
        """The operations that have not ended: running, or interrupted."""
        return [record for record in self.records() if not record.get("ended")]

    def entries(self, op_id: str) -> list[dict[str, Any]]:
        return read_json_lines(self._path(op_id, ".journal"))


class EtcdJournal:
    name = "etcd"

    def __init__(self, coordinator: EtcdCoordinator, gateway: EtcdGateway | None = None):
        self.coordinator = coordinator
        self.gateway = gateway or coordinator.gateway
        self.prefix = coordinator.settings.prefix
        self._seq = 0
        self._seq_lock = threading.Lock()

    def for_reading(self, member_copy: bool = False) -> EtcdJournal:
        """This journal as a reading command reads it: no election waited out, and with
        `member_copy` from one member's own copy (etcd_gateway.EtcdGateway.for_reading)."""
        return EtcdJournal(self.coordinator, self.coordinator.gateway.for_reading(member_copy))

    @contextmanager
    def hold(self, op_id: str) -> Iterator[None]:
        # The lease taken on the operation's resources is its liveness: its id is in the record.
        yield

    def alive(self, record: dict[str, Any]) -> bool:
        from igops import process_identity
        from igops.etcd_gateway import EtcdError

        lease_id = record.get("lease_id")
        if not lease_id:
            return False
        # Its holder's process is gone, judged from here: interrupted now, not once the TTL runs
        # out (the same judgement coordination makes before it revokes such a lease). `pid` and
        # the identity are the latest holder's: after a resume, the resumer's, whose user@host
        # is in `resumed_by`.
        host = str(record.get("resumed_by") or "").rpartition("@")[2] or record.get("host")
        if process_identity.judge({**record, "host": host}) is process_identity.Verdict.GONE:
            return False
        if self.gateway.member_copy:
            return True  # only a leader knows whether a lease lives: unknown without one
        try:
            return self.coordinator.lease_alive(str(lease_id), self.gateway)
        except EtcdError:
            return True  # unknown: never call a live operation interrupted on a guess

    def _record_requests(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The record, and its marker under open/ while it has not ended: what `ops list` reads
        without reading every operation ever run."""
        from igops.etcd_gateway import b64

        record_put = {
            "request_put": {
                "key": b64(f"{self.prefix}ops/{record['id']}"),
                "value": b64(json.dumps(_clean(record), sort_keys=True)),
            }
        }
        marker = b64(f"{self.prefix}open/{record['id']}")
        if record.get("ended"):
            return [record_put, {"request_delete_range": {"key": marker}}]
        return [record_put, {"request_put": {"key": marker, "value": b64(record["id"])}}]

    def append(self, op_id: str, entries: list[dict[str, Any]], record: dict[str, Any] | None = None) -> None:
        """Entries, in order, and with `record` the record too: one transaction, one Raft round."""
        from igops.etcd_gateway import b64

        puts = []
        with self._seq_lock:
            for entry in entries:
                self._seq += 1
                # Unique across processes that resume the same operation: time first, then pid.
                key = f"{self.prefix}journal/{op_id}/{entry.get('time', '')}-{os.getpid()}-{self._seq:06d}"
                value = json.dumps(_clean(entry), sort_keys=True)
                puts.append({"request_put": {"key": b64(key), "value": b64(value)}})
        if record is not None:
            puts.extend(self._record_requests(record))
        self.gateway.call("/v3/kv/txn", {"success": puts})

    def record(self, op_id: str) -> dict[str, Any] | None:
        found = self.gateway.get_prefix(f"{self.prefix}ops/{op_id}")
        for key, value in found:
            if key == f"{self.prefix}ops/{op_id}":
                record: dict[str, Any] = json.loads(value)
                return record
        return None

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in self.gateway.get_prefix(f"{self.prefix}ops/")]

    def open_records(self) -> list[dict[str, Any]]:
        """The operations that have not ended: running, or interrupted."""
        found = [self.record(op_id) for _, op_id in self.gateway.get_prefix(f"{self.prefix}open/")]
        return [record for record in found if record is not None and not record.get("ended")]

    def entries(self, op_id: str) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in self.gateway.get_prefix(f"{self.prefix}journal/{op_id}/")]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a journal, the audit log); a line cut short by a full
    disk is skipped, not fatal."""
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def end_interrupted(coordinator: LocalCoordinator | EtcdCoordinator, state_dir: Path, why: str) -> list[str]:
    """End every interrupted operation as "superseded", saying why: for a rehearsal fleet whose
    start-up restores a known baseline (`igops lab up`), which resolves whatever they left."""
    from igops import safety

    store = for_coordinator(coordinator, state_dir)
    ended = []
    for record in store.open_records():
        if store.alive(record):
            continue
        record.update(ended=safety.now(), result="superseded", exit_code=None, detail=why)
        store.append(record["id"], [{"time": record["ended"], "event": "superseded", "by": why}], record)
        ended.append(record["id"])
    return ended


def for_coordinator(coordinator: LocalCoordinator | EtcdCoordinator, state_dir: Path) -> Store:
    from igops.coordination import EtcdCoordinator

    if isinstance(coordinator, EtcdCoordinator):
        return EtcdJournal(coordinator)
    return LocalJournal(state_dir)


# The journal an operation writes to: the one beside its lease (coordination.for_fleet).
Store = LocalJournal | EtcdJournal
