"""Running an operation: lease, write-ahead journal and audit around whatever it does.

`perform(fleet, spec, action, reporter)` takes the lease on the spec's resources (refusing with
exit 4, naming the holder and its current step, or waiting up to `wait` seconds), records the
operation, audits its start, runs `action(operation)`, and records and audits its end however
it ends. Every `reporter.step()` the action takes goes through the operation's reporter: an
intent entry before the step, a result entry after it, and a lease check before it, so an
operation whose lease was lost stops at its next step boundary. Library callers get all of
this by calling `perform`; commands only confirm first.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from igops import coordination, safety
from igops.errors import IgopsError, describe
from igops.operations import conflicts, journal
from igops.output import Reporter, StepRecord
from igops.secrets import redact

if TYPE_CHECKING:
    from igops.inventory import Fleet

T = TypeVar("T")
# Tries to journal an operation's end, a second apart, before it is left for `ops list` to
# show as interrupted.
END_ATTEMPTS = 3
Resource = conflicts.Resource


@dataclass
class OperationSpec:
    """What an operation is before it runs: the plan a dry run prints and the apply follows."""

    kind: str
    title: str
    targets: list[str]
    resources: list[Resource]
    steps: list[str]
    # What `igops ops resume` needs to plan the operation again (a cluster, a candidate, …).
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        conflicts.kind(self.kind)  # an unknown kind is a bug: fail before anything runs


class Operation:
    """A running operation: its id and record, its lease, and the reporter its steps go through."""

    def __init__(
        self,
        spec: OperationSpec,
        record: dict[str, Any],
        store: journal.Store,
        held: coordination.HeldLease,
        reporter: Reporter,
        backend: coordination.LocalCoordinator | coordination.EtcdCoordinator | None = None,
        holder: coordination.Holder | None = None,
    ):
        self.spec, self.record, self.store, self.held = spec, record, store, held
        self.backend, self.holder = backend, holder
        self.reporter = JournaledReporter(reporter, self)
        # Entries that go out with the next write (a step's result, with the next step's intent
        # or the operation's end): one store round per step, one Raft round with etcd.
        self._later: list[dict[str, Any]] = []
        self._later_lock = threading.Lock()
        # Whether this run is yet to supersede the interrupted runs it reruns (see take_over).
        self.supersedes = False

    @property
    def id(self) -> str:
        return str(self.record["id"])

    def check_lease(self) -> None:
        self.held.check()

    @contextmanager
    def lease(self, resources: list[Resource], wait: float = 0.0) -> Iterator[coordination.HeldLease]:
        """A lease taken while the operation runs, beside those it began with, in its name (a
        refusal names this operation and its step): for what it holds only part of the time,
        like an app server out of rotation (igops.operations.rotation). Released when the block
        ends, or with the operation."""
        assert self.backend is not None and self.holder is not None  # set by perform()
        with _leased(self.backend, self.store, resources, self.holder, wait) as held:
            yield held

    def holders(self, kind: str) -> list[tuple[Resource, coordination.Holder | None]]:
        """The resources of class `kind` leased now, by any operation, and who holds each."""
        assert self.backend is not None  # set by perform()
        return self.backend.holders(kind)

    def write(self, event: str, record: dict[str, Any] | None = None, **fields: Any) -> None:
        """A journal entry, after any left for later; with `record`, the operation's record
        updated in the same write."""
        with self._later_lock:
            entries = [*self._later, self._entry(event, fields)]
            self.store.append(self.id, entries, record)
            del self._later[: len(entries) - 1]

    def write_later(self, event: str, **fields: Any) -> None:
        """A journal entry that goes out with the next write. Only for what comes after the act
        it reports (a step's result): a run killed before that write leaves the step's intent
        without a result, which resume already reads as "may have acted"."""
        with self._later_lock:
            self._later.append(self._entry(event, fields))

    @staticmethod
    def _entry(event: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {"time": safety.now(), "event": event, "pid": os.getpid(), **fields}

    def step_started(self, number: int, title: str, **fields: Any) -> None:
        """The intent entry, and the record naming this step as the current one."""
        self.record["step"] = {"number": number, "title": title, "since": safety.now()}
        self.write("intent", self.record, step=number, title=title, **fields)
        self.take_over()

    def take_over(self) -> None:
        """The interrupted runs this one reruns end, superseded (see _supersede), once it has
        journaled its first step (with that step's undo: what it takes over from them), or ended
        well with none. A rerun stopped before either (refused under its lease, killed while it
        checked the state) took over nothing, and leaves them to be aborted or run again."""
        if self.supersedes:
            self.supersedes = False
            _supersede(self.store, self.record)


# The leases of the operations running in this process: what a heartbeat on the fleet (the
# PgBouncer pause watchdog) asks before it vouches for this process again.
_RUNNING: list[coordination.HeldLease] = []
_RUNNING_LOCK = threading.Lock()


def lease_lost() -> str | None:
    """Why a lease of an operation running in this process was lost, if one was."""
    with _RUNNING_LOCK:
        return next((why for held in _RUNNING if (why := held.lost())), None)


class JournaledReporter(Reporter):
    """The reporter an operation's steps see: the command's own, plus the journal."""

    def __init__(self, inner: Reporter, operation: Operation):
        self.inner, self.operation = inner, operation
        self._announced: dict[str, Any] = {}
        self._count = 0
        self._recovering = 0

    def announce(self, **fields: Any) -> None:
        """Extra fields for the next step's intent entry (its undo and release)."""
        self._announced = {key: value for key, value in fields.items() if value is not None}

    @contextmanager
    def step(self, title: str) -> Iterator[StepRecord]:
        operation = self.operation
        # Taken before the lease check: a step that cannot begin must not hand its undo and point
        # of no return to the recovery step journaled next.
        extra, self._announced = self._announced, {}
        if not self._recovering:
            operation.check_lease()
        started = time.monotonic()
        self._count += 1
        number = self._count  # the operation's own plan numbers its steps, whatever ran before it
        # Written before the step is shown and acts: a step on screen is a step in the journal,
        # and if the journal cannot take it, the step never runs (except a recovery step: below).
        self._journal(lambda: operation.step_started(number, redact(title), **extra))
        with self.inner.step(title) as record:
            try:
                yield record
            except BaseException as exc:
                operation.write_later(
                    "result",
                    step=number,
                    title=record.title,
                    status="failed",
                    duration_ms=_ms(started),
                    detail=record.detail or describe(exc),
                )
                raise
            operation.write_later(
                "result",
                step=number,
                title=record.title,
                status="ok" if record.status == "running" else record.status,
                duration_ms=_ms(started),
                detail=record.detail,
            )

    def _journal(self, write: Callable[[], None]) -> None:
        """A journal write. A recovery step (the one that leaves the fleet safe: a batch back in
        rotation, a pooler resumed) runs even when the journal cannot take it, with etcd lost,
        and says so; any other step stops."""
        if not self._recovering:
            write()
            return
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - whatever the store raised, safety first
            self.inner.log(
                f"warning: the journal did not record this recovery step ({describe(exc)}); "
                "it runs anyway, to leave the fleet safe"
            )

    def log(self, message: str) -> None:
        self.inner.log(message)

    def fact(self, **fields: Any) -> None:
        """Journaled at once and kept in the operation's record (`facts`), where `igops ops
        resume|abort` read it: a run killed right after learning it still leaves it behind."""
        operation = self.operation
        operation.record.setdefault("facts", {}).update(fields)
        self._journal(lambda: operation.write("fact", operation.record, **fields))

    @contextmanager
    def recovery(self) -> Iterator[None]:
        # A lost lease stops the operation's next step, never the steps that make it safe.
        self._recovering += 1
        try:
            yield
        finally:
            self._recovering -= 1

    def __getattr__(self, name: str) -> Any:
        # Anything else a command's reporter offers (its consoles, its step list) is the command's.
        return getattr(self.inner, name)

    @contextmanager
    def progress(
        self, description: str, total: float | None, unit: str = "", counts: Callable[[], str] | None = None
    ) -> Iterator[Any]:
        with self.inner.progress(description, total, unit, counts) as advance:
            yield advance


def perform(
    fleet: Fleet,
    spec: OperationSpec,
    action: Callable[[Operation], T],
    reporter: Reporter = Reporter(),
    *,
    outcome: Callable[[T], tuple[str, int]] = lambda _: ("ok", 0),
    reason: str | None = None,
    wait: float = 0.0,
    resume: dict[str, Any] | None = None,
) -> T:
    """Run `action` as an operation (see the module's docstring). `resume` is the record of an
    interrupted operation this run continues under the same id."""
    run = _Run(fleet, spec, reporter, reason or coordination.reason(), resume)
    try:
        return run.perform(action, outcome, wait)
    finally:
        if run.ended:
            _mark_change(fleet, spec, run.ended, reporter)


class _Run:
    """One run of an operation: what its lease, journal and audit records share."""

    def __init__(
        self, fleet: Fleet, spec: OperationSpec, reporter: Reporter, reason: str | None, resume: dict[str, Any] | None
    ):
        self.spec, self.reporter, self.reason, self.resume = spec, reporter, reason, resume
        self.backend = coordination.for_fleet(fleet)
        self.store = journal.for_coordinator(self.backend, fleet.state_dir)
        self.command_line = safety.redact_argv(["igops", *sys.argv[1:]])
        self.id = resume["id"] if resume else journal.new_id()
        self.holder = coordination.current_holder(
            spec.kind, ", ".join(spec.targets), self.command_line, reason, self.id
        )
        self.started = time.monotonic()
        self.ended: dict[str, Any] = {}

    def audit(self, result: str, exit_code: int | None, detail: str | None = None) -> None:
        self.backend.audit(
            command=self.command_line,
            targets=self.spec.targets,
            result=result,
            exit_code=exit_code,
            duration_ms=safety.monotonic_ms(self.started) if exit_code is not None else 0.0,
            detail=detail,
            reason=self.reason,
            operation_id=self.id,
        )

    def perform(self, action: Callable[[Operation], T], outcome: Callable[[T], tuple[str, int]], wait: float) -> T:
        with (
            _leased(self.backend, self.store, self.spec.resources, self.holder, wait) as held,
            self.store.hold(self.id),
        ):
            record = _begin(self.store, self.spec, self.holder, held, self.resume)
            operation = Operation(self.spec, record, self.store, held, self.reporter, self.backend, self.holder)
            operation.supersedes = self.resume is None
            with _RUNNING_LOCK:
                _RUNNING.append(held)
            # A continuation says which (igops ops resume or abort sets "continued_by").
            self.audit(f"{self.resume.get('continued_by', 'resume')} started" if self.resume else "started", None)
            ending = _Ending()
            try:
                return ending.run(lambda: action(operation), outcome)
            finally:
                with _RUNNING_LOCK:
                    _RUNNING.remove(held)
                word, code, detail = ending.word, ending.code, ending.detail
                lost = held.lost()
                if lost:
                    self.reporter.log(
                        f"warning: the lease of operation {self.id} was lost while it worked ({lost}); "
                        "another operator may have started on its targets meanwhile"
                    )
                    detail = "; ".join(part for part in (detail, f"lease lost: {lost}") if part)
                if code and self.resume and self.resume.get("continued_by") == "abort":
                    _abort_failed(self.store, operation, word, code, detail, self.reporter)
                else:
                    if not code:
                        _take_over_at_end(operation, self.reporter)
                    _end(self.store, operation, word, code, detail, self.reporter)
                self.ended = {
                    "id": self.id,
                    "result": word,
                    "exit_code": code,
                    "reason": self.reason,
                    "duration_s": round(time.monotonic() - self.started, 1),
                }
                self.audit(word, code, detail)


def declined(fleet: Fleet, targets: list[str], reason: str | None = None) -> None:
    """A person said no to the plan: nothing ran, and the audit trail says so."""
    coordination.for_fleet(fleet).audit(
        command=safety.redact_argv(["igops", *sys.argv[1:]]),
        targets=targets,
        result="declined",
        exit_code=2,
        duration_ms=0.0,
        reason=reason or coordination.reason(),
    )


def audited(
    fleet: Fleet,
    targets: list[str],
    action: Callable[[], T],
    outcome: Callable[[T], tuple[str, int]],
    reason: str | None = None,
) -> T:
    """An action that is no operation (nothing igops keeps state about, no lease): only its
    outcome is audited (`igops exec`)."""
    backend = coordination.for_fleet(fleet)
    command_line = safety.redact_argv(["igops", *sys.argv[1:]])
    reason = reason or coordination.reason()
    started = time.monotonic()
    ending = _Ending()
    try:
        return ending.run(action, outcome)
    finally:
        backend.audit(
            command=command_line,
            targets=targets,
            result=ending.word,
            exit_code=ending.code,
            duration_ms=safety.monotonic_ms(started),
            detail=ending.detail,
            reason=reason,
        )


class _Ending:
    """How an action ended, whatever it raised: the result word, exit code and detail that its
    journal and audit records carry."""

    def __init__(self) -> None:
        self.word, self.code = "failed", 1
        self.detail: str | None = None

    def run(self, action: Callable[[], T], outcome: Callable[[T], tuple[str, int]]) -> T:
        try:
            result = action()
            self.word, self.code = outcome(result)
            return result
        except IgopsError as exc:
            self.code, self.detail = int(exc.exit_code), exc.one_line()
            self.word = exc.result_word
            raise
        except BaseException as exc:
            self.word = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.detail = describe(exc)
            raise


@contextmanager
def _leased(
    backend: coordination.LocalCoordinator | coordination.EtcdCoordinator,
    store: journal.Store,
    resources: list[Resource],
    holder: coordination.Holder,
    wait: float,
) -> Iterator[coordination.HeldLease]:
    try:
        with backend.lease(resources, holder, wait) as held:
            yield held
    except coordination.Conflict as conflict:
        raise _named(conflict, store) from None


def _named(conflict: coordination.Conflict, store: journal.Store) -> coordination.Conflict:
    """The refusal names the holder's current step, read from its journal record."""
    holder = conflict.holder
    if holder is None or not holder.operation_id:
        return conflict
    try:
        record = store.record(holder.operation_id) or {}
    except (IgopsError, OSError, ValueError):
        record = {}
    step = record.get("step")
    if step:
        label = f"[{step['number']}]" if step.get("number") else "[pre]"
        where = f"{label} {step.get('title')} (since {step.get('since')})"
        conflict.message = f"{conflict.resource[0]} {conflict.resource[1]} is held by {holder.describe(where)}"
    return conflict


def _begin(
    store: journal.Store,
    spec: OperationSpec,
    holder: coordination.Holder,
    held: coordination.HeldLease,
    resume: dict[str, Any] | None,
) -> dict[str, Any]:
    lease_id = getattr(held, "lease_id", None)
    if resume:
        record = dict(resume)
        record.update(
            ended=None,
            result=None,
            exit_code=None,
            detail=None,
            abort_failed=None,  # this run's own, if it is an abort that fails too
            lease_id=lease_id,
            pid=holder.pid,
            resumed_by=f"{holder.user}@{holder.host}",
            **holder.identity(),  # the resumer's, None and all: `pid` is its pid now
        )
        resumed = {
            "time": holder.since,
            "event": "resume",
            "pid": holder.pid,
            "operator": f"{holder.user}@{holder.host}",
            "command": holder.command,
        }
        store.append(record["id"], [resumed], record)
        return record
    record = {
        "id": holder.operation_id,
        "kind": spec.kind,
        "title": redact(spec.title),
        "targets": spec.targets,
        "resources": [list(resource) for resource in spec.resources],
        "plan": spec.steps,
        "params": spec.params,
        "user": holder.user,
        "host": holder.host,
        "pid": holder.pid,
        **holder.identity(),
        "sudo_user": os.environ.get("SUDO_USER"),
        "command": holder.command,
        "reason": holder.reason,
        "started": holder.since,
        "ended": None,
        "result": None,
        "exit_code": None,
        "detail": None,
        "step": None,
        "lease_id": lease_id,
        "backend": store.name,
    }
    begun = {"time": holder.since, "event": "begin", "pid": holder.pid, "title": record["title"], "plan": spec.steps}
    store.append(record["id"], [begun], record)
    return record


def _take_over_at_end(operation: Operation, reporter: Reporter) -> None:
    """A rerun that ended well supersedes, if no step of it did (it found nothing left to do:
    Operation.take_over). One that cannot journal that is shown beside the runs it reran."""
    try:
        operation.take_over()
    except (IgopsError, OSError) as exc:
        reporter.log(f"warning: operation {operation.id} could not end the runs it reran ({describe(exc)})")


def _supersede(store: journal.Store, record: dict[str, Any]) -> None:
    """A rerun of an interrupted operation (same kind, same resources: `pg switchover main`
    again) finishes or rolls back what it left, as the planners do: the interrupted one ends,
    "superseded" by this one, rather than staying interrupted in `ops list` and `check`, and
    `ops abort` of it refuses, naming this one. So a planner of such a kind plans the undo of
    what the interrupted run left into the rerun (an in-place rebuild's volumes taken out, in
    its first step: igops.restore_in_place), and the rerun supersedes once it has journaled
    that (Operation.take_over). Any other interrupted operation stays for a person to resume or
    abort."""
    mine = sorted(map(tuple, record["resources"]))
    for other in store.open_records():
        if (
            other["id"] == record["id"]
            or other.get("kind") != record["kind"]
            or sorted(map(tuple, other.get("resources") or [])) != mine
        ):
            continue
        # This run holds the lease on those very resources: the other's holder is gone.
        other.update(
            ended=safety.now(),
            result="superseded",
            exit_code=None,
            detail=f"superseded by {record['id']}, a rerun that took over its targets",
            superseded_by=record["id"],
        )
        store.append(other["id"], [{"time": other["ended"], "event": "superseded", "by": record["id"]}], other)


def _end(
    store: journal.Store, operation: Operation, word: str, code: int, detail: str | None, reporter: Reporter
) -> None:
    """Record the end; a store that cannot take it (etcd gone) must not hide the outcome itself."""
    record = operation.record
    record.update(ended=safety.now(), result=word, exit_code=code, detail=redact(detail) if detail else None)
    for attempt in range(END_ATTEMPTS):
        try:
            operation.write("end", record, result=word, exit_code=code, detail=detail)
            return
        except (IgopsError, OSError) as exc:
            if attempt + 1 < END_ATTEMPTS:
                time.sleep(1.0)  # an etcd member restarting, a leader election: seconds
                continue
            reporter.log(
                f"warning: the end of operation {operation.id} could not be journaled "
                f"({describe(exc)}); `igops ops list` will show it as interrupted"
            )


def _abort_failed(
    store: journal.Store, operation: Operation, word: str, code: int, detail: str | None, reporter: Reporter
) -> None:
    """An abort that did not get to its end leaves the operation interrupted, not ended: what it
    could not undo is still to undo, so `ops list` and `igops check` keep showing it, and once
    what failed is fixed, `igops ops abort` plans from the journal again, as after an abort that
    was killed."""
    failure = {"time": safety.now(), "result": word, "exit_code": code, "detail": redact(detail) if detail else None}
    operation.record["abort_failed"] = failure
    try:
        operation.write("abort-failed", operation.record, result=word, exit_code=code, detail=failure["detail"])
    except (IgopsError, OSError) as exc:
        reporter.log(f"warning: the failed abort of operation {operation.id} could not be journaled ({describe(exc)})")
    reporter.log(
        f"operation {operation.id} stays interrupted: once what failed is fixed, "
        f"`igops ops abort {operation.id}` again (or `igops ops show {operation.id}`)"
    )


# Deploys and rollbacks send their own marker, with the release and every host's outcome; a
# PagerDuty test changes nothing on the fleet.
NO_CHANGE_EVENT = ("deploy", "deploy-rollback", "pagerduty-test")


def _mark_change(fleet: Fleet, spec: OperationSpec, ended: dict[str, Any], reporter: Reporter) -> None:
    """A PagerDuty change event for the operation that ended, once its lease is released: a
    marker never holds up or fails the operation it marks."""
    from igops.pagerduty import changes as pagerduty_changes

    if spec.kind in NO_CHANGE_EVENT:
        return
    key = pagerduty_changes.routing_key(fleet)
    if not key:
        return
    summary = f"{fleet.model.fleet.name}: {spec.title}: {ended['result']}"
    sent = pagerduty_changes.send_change(
        fleet.model.monitoring.pagerduty_url,
        key,
        summary,
        f"igops on {safety.operator_host()}",
        {
            "operation": ended["id"],
            "kind": spec.kind,
            "targets": spec.targets,
            "result": ended["result"],
            "exit_code": ended["exit_code"],
            "reason": ended["reason"],
            "duration_s": ended["duration_s"],
            "by": f"{safety.operator_user()}@{safety.operator_host()}",
        },
    )
    reporter.log(f"PagerDuty change event: {sent.detail}")


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
