"""Where the leases of mutating commands and the audit trail live.

Two backends behind one interface (`for_fleet(fleet)`):

- local (no `[coordination]` section): a flock per (operation, target) in the state directory
  and `<state_dir>/audit.log`, as `igops.safety` keeps them. Only processes that share that
  state directory see each other's locks.
- etcd (`[coordination] etcd = [...]`): one etcd lease with a TTL per held lock, kept alive by
  a background thread; the lock key is created in one transaction only if absent, attached to
  the lease, and holds the holder's record; audit records are keys under the fleet's prefix.
  Every machine pointed at the same etcd sees every lock and every record.

etcd is spoken to through its v3 HTTP/JSON gateway (igops.http_json). A lease etcd cannot grant
(quorum lost, unreachable) refuses the command (exit 3); a lease lost while the command works
is recorded on the held lease (`lost()`, `check()`) for the caller to stop at its next step
boundary.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops.errors import AlreadyRunning, IgopsError, RefusedError
from igops.etcd_gateway import EtcdError, EtcdGateway, EtcdSettings, b64, unb64
from igops.process_identity import FIELDS, Verdict, judge, own
from igops.secrets import redact, redact_data

if TYPE_CHECKING:
    from igops.inventory import Fleet

REASON_ENV = "IGOPS_REASON"


class LeaseLost(IgopsError):
    """The lease expired or could not be renewed while its command worked: another operator
    may already hold the same target."""


class CoordinatorUnavailable(RefusedError):
    """etcd cannot grant a lease: nothing was started."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what a refusal names. `operation` is the kind (pg-switchover, …),
    `operation_id` the engine's id of the run (see igops.operations). `boot_id`, `pid_namespace`
    and `process_start` tell which process `pid` is (igops.process_identity); a record written
    by an older igops has none of them."""

    operation: str
    target: str
    user: str
    host: str
    pid: int
    command: str
    since: str
    reason: str | None = None
    operation_id: str | None = None
    boot_id: str | None = None
    pid_namespace: int | None = None
    process_start: int | None = None

    def identity(self) -> dict[str, Any]:
        """The process's identity as a record keeps it, beside its host and pid."""
        return {key: getattr(self, key) for key in FIELDS}

    def describe(self, step: str | None = None) -> str:
        reason = f", reason: {self.reason}" if self.reason else ""
        ident = f" {self.operation_id}" if self.operation_id else ""
        at = f", at step {step}" if step else ""
        return (
            f"{self.operation}{ident} by {self.user}@{self.host} pid {self.pid} since {self.since}"
            f"{at}{reason}: {self.command}"
        )

    def to_json(self) -> str:
        return self._json

    @cached_property
    def _json(self) -> str:
        # Once per holder: a deploy leases each of its hosts in turn under the same holder.
        return json.dumps(redact_data(asdict(self)), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(**{key: data.get(key) for key in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError):
            return None


def current_holder(
    operation: str, target: str, command_line: str, reason: str | None, operation_id: str | None = None
) -> Holder:
    from igops import safety

    return Holder(
        operation,
        target,
        safety.operator_user(),
        safety.operator_host(),
        os.getpid(),
        redact(command_line),
        safety.now(),
        redact(reason) if reason else None,
        operation_id,
        **own(),
    )


class Conflict(AlreadyRunning):
    """A resource is leased by another operation: `holder` says whose (None if unreadable)."""

    def __init__(self, resource: Resource, holder: Holder | None, ttl: int | None):
        self.resource, self.holder = resource, holder
        name = f"{resource[0]} {resource[1]}"
        super().__init__(
            f"{name} is held" + (f" by {holder.describe()}" if holder else " by another operation"),
            "wait for it to finish, or pass --wait SECONDS; "
            + (
                f"its lease expires at most {ttl} s after that process dies"
                if ttl
                else "the lock is released when that process exits"
            )
            + " (igops ops list shows it)",
        )


Resource = tuple[str, str]
# How often a --wait for a lease asks again.
WAIT_POLL_S = 0.2


def lock_key(prefix: str, operation: str, target: str) -> str:
    """A lock's etcd key: the same name as the local lock file, so that exactly the same
    (operation, target) pairs conflict on both backends."""
    from igops import safety

    return f"{prefix}locks/{safety.lock_name(operation, target)}"


def audit_key(prefix: str, record: dict[str, Any]) -> str:
    """Sorted by time (lexical order of the key), unique per host and process."""
    moment = datetime.fromisoformat(record["time"]).astimezone(UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond:06d}Z"
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record.get("host")))
    return f"{prefix}audit/{stamp}-{host}-{record.get('pid', os.getpid())}-{next(_AUDIT_SEQUENCE)}"


# Two records of one process in the same microsecond still get two keys.
_AUDIT_SEQUENCE = itertools.count()


def default_prefix(fleet_name: str) -> str:
    return f"/igops/{fleet_name}/"


class HeldLease:
    """A lock this process holds. The local backend's never expires while the process lives."""

    def __init__(self, operation: str, target: str):
        self.operation, self.target = operation, target
        self._lost: str | None = None

    def lost(self) -> str | None:
        """Why the lease was lost, or None while it is held."""
        return self._lost

    def check(self) -> None:
        """Raise LeaseLost if the lease was lost: called at a step boundary, before the next step."""
        if self._lost:
            raise LeaseLost(
                f"the lease on {self.operation} {self.target} was lost ({self._lost}): "
                "another operator may now hold it, so nothing more was done",
                "check the target's state (igops status) and the audit trail, then run the command again",
            )

    def _mark_lost(self, why: str) -> None:
        if not self._lost:
            self._lost = why


class LocalCoordinator:
    """Today's flocks and audit.log in the state directory."""

    name = "local"

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    @contextmanager
    def lease(self, resources: list[Resource], holder: Holder, wait: float = 0.0) -> Iterator[HeldLease]:
        """flock every resource's file (in one order, so two takers cannot deadlock), or none."""
        from igops import safety

        give_up = time.monotonic() + wait
        while True:
            with ExitStack() as held:
                try:
                    for resource in sorted(set(resources)):
                        held.enter_context(safety.lock(self.state_dir, *resource, holder=holder.to_json()))
                except AlreadyRunning as exc:
                    if time.monotonic() < give_up:
                        held.close()
                        time.sleep(WAIT_POLL_S)
                        continue
                    raise Conflict(exc.resource, _local_holder(exc.holder_text), None) from None
                yield HeldLease(holder.operation, holder.target)
                return

    def holders(self, kind: str) -> list[tuple[Resource, Holder | None]]:
        """The resources of class `kind` some process holds now, and who. A lock file outlives
        its lock: it is held only while its flock is, so each is tried (shared, not waiting).
        Callers list under a lease of their own that every taker of `kind` holds too
        (igops.operations.rotation), so the try never makes a taker's own flock fail."""
        import fcntl

        from igops import safety

        prefix = safety.lock_name(kind, "")
        found: list[tuple[Resource, Holder | None]] = []
        for path in sorted((self.state_dir / "locks").glob(f"{prefix}*.lock")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # nobody holds it
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            found.append(((kind, path.name[len(prefix) : -len(".lock")]), _local_holder(_read(path))))
        return found

    def audit(self, **fields: Any) -> None:
        from igops import safety

        safety.audit(self.state_dir, **fields)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class EtcdLease(HeldLease):
    """An etcd lease, renewed by a daemon thread every third of its TTL. It counts as lost when
    etcd says it has expired, or once `expires` has passed: the TTL of etcd's last answer (to
    the grant or a renewal), counted from when that request was sent. etcd starts its own count
    somewhere between the request and its answer, so this one ends no later than etcd's: from
    then on etcd may have expired the lease unseen."""

    def __init__(self, gateway: EtcdGateway, lease_id: str, ttl: int, operation: str, target: str, expires: float):
        super().__init__(operation, target)
        self.lease_id, self.ttl = lease_id, ttl
        # A session of its own: the keepalive thread never shares a connection pool with the
        # command's own calls.
        self.gateway = EtcdGateway(gateway.settings)
        self._stop = threading.Event()
        self._expires = expires  # time.monotonic() past which etcd may have expired the lease
        self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{lease_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def lost(self) -> str | None:
        if not self._lost and time.monotonic() >= self._expires:
            self._mark_lost(f"not renewed for {self.ttl} s")
        return self._lost

    def _keep_alive(self) -> None:
        # Every member may be asked in one round; together they must answer within a third
        # of the TTL, so that two more rounds fit before the lease can expire.
        per_member = max(0.5, self.ttl / 3 / len(self.gateway.settings.endpoints))
        while not self._stop.wait(self.ttl / 3) and not self.lost():
            sent = time.monotonic()
            try:
                # No patience: this loop asks again itself, and must notice a TTL passing.
                answer = self.gateway.call("/v3/lease/keepalive", {"ID": self.lease_id}, timeout=per_member, patience=0)
                ttl = int((answer.get("result") or {}).get("TTL", 0))
            except (EtcdError, ValueError) as exc:
                if time.monotonic() >= self._expires:
                    why = exc.message if isinstance(exc, EtcdError) else str(exc)
                    self._mark_lost(f"not renewed for {self.ttl} s: {why}")
                continue
            if ttl <= 0:
                self._mark_lost(f"etcd expired lease {self.lease_id}")
                return
            self._expires = sent + ttl

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        try:
            self.gateway.call("/v3/lease/revoke", {"ID": self.lease_id})
        except EtcdError:
            pass  # the key goes when the lease's TTL runs out
        finally:
            self.gateway.close()


class EtcdCoordinator:
    name = "etcd"

    def __init__(self, settings: EtcdSettings, state_dir: Path):
        self.settings = settings
        self.state_dir = state_dir
        self.gateway = EtcdGateway(settings)

    @contextmanager
    def lease(self, resources: list[Resource], holder: Holder, wait: float = 0.0) -> Iterator[HeldLease]:
        """One etcd lease; every resource's key created in one transaction, only if none exists."""
        keys = [lock_key(self.settings.prefix, *resource) for resource in sorted(set(resources))]
        give_up = time.monotonic() + wait
        while True:
            lease_id, expires = self._grant()
            try:
                answer = self.gateway.call(
                    "/v3/kv/txn",
                    {
                        "compare": [
                            {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                            for key in keys
                        ],
                        "success": [
                            {"request_put": {"key": b64(key), "value": b64(holder.to_json()), "lease": lease_id}}
                            for key in keys
                        ],
                        "failure": [{"request_range": {"key": b64(key)}} for key in keys],
                    },
                )
            except EtcdError as exc:
                self._revoke(lease_id)
                raise CoordinatorUnavailable(
                    f"etcd could not take the locks {', '.join(keys)}: {exc.message}", self._fix()
                ) from None
            held_by = [
                (resource, kvs[0])
                for resource, response in zip(sorted(set(resources)), answer.get("responses") or [], strict=False)
                if (kvs := (response.get("response_range") or {}).get("kvs") or [])
            ]
            # Every key already under this very lease: an earlier try was applied, its answer
            # lost (a member that timed out, then another asked).
            if answer.get("succeeded") or (
                len(held_by) == len(keys) and all(str(kv.get("lease")) == lease_id for _, kv in held_by)
            ):
                break
            self._revoke(lease_id)
            if self._revoke_dead_holders([kv for _, kv in held_by]):
                continue  # their process is gone from this very machine: try again at once
            if time.monotonic() < give_up:
                time.sleep(WAIT_POLL_S)
                continue
            for resource, kv in held_by:
                raise Conflict(resource, Holder.from_json(unb64(kv.get("value", ""))), self.settings.lease_ttl)
            raise Conflict(sorted(set(resources))[0], None, self.settings.lease_ttl)
        held = EtcdLease(self.gateway, lease_id, self.settings.lease_ttl, holder.operation, holder.target, expires)
        held.start()
        try:
            yield held
        finally:
            held.release()

    def _revoke_dead_holders(self, kvs: list[dict[str, Any]]) -> bool:
        """Revoke the leases of holders whose process is gone, as judged from this machine
        (igops.process_identity): an operator who reruns a command right after killing it need
        not wait out the TTL, as with the local backend. A holder alive, or one this machine cannot
        judge (another machine, container or boot; a record without its process's identity), is
        left to its TTL: revoking a live holder's lease would let two operators hold one target."""
        revoked = False
        for kv in kvs:
            holder = Holder.from_json(unb64(kv.get("value", "")))
            if holder is None or not kv.get("lease") or judge(asdict(holder)) is not Verdict.GONE:
                continue
            self._revoke(str(kv["lease"]))
            revoked = True
        return revoked

    def holders(self, kind: str) -> list[tuple[Resource, Holder | None]]:
        """The resources of class `kind` leased now, and who: a lock's key lives only as long as
        its holder's etcd lease."""
        from igops import safety

        prefix = f"{self.settings.prefix}locks/{safety.lock_name(kind, '')}"
        return [((kind, key[len(prefix) :]), Holder.from_json(value)) for key, value in self.gateway.get_prefix(prefix)]

    def lease_alive(self, lease_id: str, gateway: EtcdGateway | None = None) -> bool:
        """Whether etcd still keeps this lease (its holder is alive and renewing it); asked through
        `gateway` (a reading one: etcd_gateway.EtcdGateway.for_reading) or this coordinator's."""
        answer = (gateway or self.gateway).call("/v3/lease/timetolive", {"ID": lease_id})
        return int(answer.get("TTL", -1)) > 0

    def _grant(self) -> tuple[str, float]:
        """A new lease's id, and the time.monotonic() past which etcd may have expired it: its TTL
        counted from before the first request, as an answer may come seconds after etcd granted
        it (a slow member, requests asked again while leaderless)."""
        sent = time.monotonic()
        try:
            answer = self.gateway.call("/v3/lease/grant", {"TTL": str(self.settings.lease_ttl)})
        except EtcdError as exc:
            raise CoordinatorUnavailable(
                f"etcd cannot grant a lease, so no mutating command may start: {exc.message}", self._fix()
            ) from None
        if not answer.get("ID"):
            raise CoordinatorUnavailable(f"etcd granted no lease: {answer.get('error') or answer}", self._fix())
        return str(answer["ID"]), sent + int(answer.get("TTL", self.settings.lease_ttl))

    def _revoke(self, lease_id: str) -> None:
        try:
            self.gateway.call("/v3/lease/revoke", {"ID": lease_id})
        except EtcdError:
            pass  # it expires on its own

    def _fix(self) -> str:
        return (
            f"bring a majority of the etcd members ({', '.join(self.settings.endpoints)}) back "
            "(`etcdctl endpoint health`); read-only commands still work meanwhile"
        )

    def audit(self, **fields: Any) -> None:
        """One record under <prefix>audit/. If etcd cannot take it, it goes to the local
        audit.log instead, marked so, rather than being lost."""
        from igops import safety

        record = safety.audit_record(**fields)
        try:
            self.gateway.put(audit_key(self.settings.prefix, record), json.dumps(record, sort_keys=True))
        except EtcdError as exc:
            record["coordination_error"] = redact(f"etcd did not take this record: {exc.message}")
            safety.append_audit(self.state_dir, record)

    def audit_records(self) -> list[dict[str, Any]]:
        """The fleet's audit trail in time order."""
        return [json.loads(value) for _, value in self.gateway.get_prefix(self.settings.prefix + "audit/")]


def settings_for(fleet: Fleet) -> EtcdSettings | None:
    """The etcd settings of an inventory, its password read from the secrets; None for the
    local backend."""
    section = fleet.model.coordination
    if section is None:
        return None
    password = None
    if section.user:
        from igops.secrets import Secrets

        password = Secrets(fleet.model.secrets.file).require("etcd_password")
    return EtcdSettings(
        endpoints=tuple(section.etcd),
        prefix=section.prefix or default_prefix(fleet.model.fleet.name),
        lease_ttl=section.lease_ttl,
        ca_file=str(fleet.resolve(section.ca_file)) if section.ca_file else None,
        cert_file=str(fleet.resolve(section.cert_file)) if section.cert_file else None,
        key_file=str(fleet.resolve(section.key_file)) if section.key_file else None,
        user=section.user,
        password=password,
    )


def _local_holder(text: str | None) -> Holder | None:
    return Holder.from_json(text) if text else None


def for_fleet(fleet: Fleet) -> LocalCoordinator | EtcdCoordinator:
    settings = settings_for(fleet)
    if settings is None:
        return LocalCoordinator(fleet.state_dir)
    return EtcdCoordinator(settings, fleet.state_dir)


def reason() -> str | None:
    """The operator's reason for a mutating command (a ticket id, a sentence), if given."""
    return os.environ.get(REASON_ENV) or None
