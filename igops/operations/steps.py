"""Plans of steps and their execution: undo before the point of no return, release always.

A step may carry an undo (run if a later step fails before the point of no return, e.g. start
the stopped old primary again) and a release (run on any failure once the step has run, e.g.
RESUME a paused PgBouncer): a failure leaves writes flowing and a report of where things stand.
Run under an operation (igops.operations.engine), each step's undo and release are journaled
with its intent, so that `igops ops abort` can run them from another process.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from igops.errors import IgopsError, describe
from igops.output import Reporter

SIGNALS_AS_INTERRUPT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Step:
    """One step of a plan: its title for people, and the action (a method of the operation's
    actions object) with its arguments."""

    title: str
    action: str
    args: tuple[Any, ...] = ()
    # Compensates if this or a later step fails before the point of no return; it must be safe
    # to run whether or not this step got to act.
    undo: Step | None = None
    # Runs on any failure from this step on (e.g. RESUME after PAUSE); it must be safe to run twice.
    release: Step | None = None
    # From the start of this step, failures roll forward, never back: an interrupted promotion may
    # still complete, so the old primary must never be started again.
    point_of_no_return: bool = False
    # Asked only when this step fails or is cut off short of its point of no return: an action
    # that says what shows the step took effect anyway (a promotion that completed after its wait
    # gave up), or '' if it did not. Once it did, failures roll forward as past that point: no
    # undo may start a second primary or drop what the promoted one keeps for the old one.
    took_effect: Step | None = None


@dataclass
class StepReport:
    title: str
    outcome: str  # 'ok', 'failed', 'took effect', 'undone', 'undo failed', 'released', 'release failed'
    detail: str | None = None


class StepFailed(IgopsError):
    """A step failed; what was undone or released is in `recovery`."""

    def __init__(
        self,
        step: Step,
        number: int,
        error: BaseException,
        recovery: list[StepReport],
        past_point_of_no_return: bool,
        hint: str,
        left_behind: str | None = None,
    ):
        recovered = (
            "; ".join(
                f"{item.title}: {item.outcome}" + (f" ({item.detail})" if item.detail else "") for item in recovery
            )
            or "nothing to undo"
        )
        super().__init__(
            f"step {number} ({step.title}) failed: {describe(error)} — {recovered}"
            + (f" — left: {left_behind}" if left_behind else ""),
            hint,
        )
        self.left_behind = left_behind
        self.step = step
        self.number = number
        self.recovery = recovery
        self.past_point_of_no_return = past_point_of_no_return


class _Interrupts:
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal) must undo and resume wherever they land: in
    a step, or between two. While the recovery runs, a further one is ignored (the operation is
    failing already), so that it cannot stop the recovery between two of its steps."""

    def __init__(self) -> None:
        self.recovering = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.recovering:
            raise KeyboardInterrupt

    @contextmanager
    def recovery(self) -> Iterator[None]:
        self.recovering = True
        try:
            yield
        finally:
            self.recovering = False


@contextmanager
def _signals_as_interrupt() -> Iterator[_Interrupts]:
    """Only the main thread can install handlers; elsewhere the handlers stay as they are."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {number: signal.signal(number, interrupts) for number in SIGNALS_AS_INTERRUPT}
    try:
        yield interrupts
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def execute(
    steps: list[Step], actions: Any, reporter: Reporter, failure_hint: str, left_behind: Callable[[], str] | None = None
) -> list[StepReport]:
    """Run the steps in order. On any failure or interrupt, whether it lands in a step or between
    two, run the undos (before the point of no return) and the releases of the steps reached,
    then raise StepFailed; `left_behind()`, if given, says where things stand afterwards."""
    done: list[StepReport] = []
    undos: list[Step] = []
    releases: list[Step] = []
    probes: list[tuple[str, Step]] = []  # (title, probe of its effect) of each step that began to act
    past_point_of_no_return = False
    number, step = 0, None
    with _signals_as_interrupt() as interrupts:
        try:
            for number, step in enumerate(steps, 1):  # noqa: B007 - `number` is read below: the step that failed
                if step.undo:
                    undos.append(step.undo)
                if step.release:
                    releases.append(step.release)
                announce = getattr(reporter, "announce", None)
                if announce:  # the journal's intent entry says how to undo and release this step
                    announce(
                        undo=spec(step.undo),
                        release=spec(step.release),
                        took_effect=spec(step.took_effect),
                        point_of_no_return=past_point_of_no_return or step.point_of_no_return,
                    )
                # A step that could not begin (its lease lost) is not past its point of no return.
                with reporter.step(step.title) as record:
                    past_point_of_no_return = past_point_of_no_return or step.point_of_no_return
                    if step.took_effect is not None:
                        probes.append((step.title, step.took_effect))
                    detail = getattr(actions, step.action)(*step.args)
                    if detail:
                        record.detail = detail
                done.append(StepReport(step.title, "ok", detail or None))
        except BaseException as error:  # noqa: BLE001 - Ctrl-C and signals must undo and resume too
            failed = step or Step("before the first step", "")
            with interrupts.recovery():
                # Every step that began may have taken effect: the one that failed, and one that
                # ended before the next could begin (its lease lost, its journal entry refused, a
                # signal between the two). Newest first; the first found rolls the run forward.
                taken = next(
                    (
                        StepReport(title, "took effect", found)
                        for title, probe in reversed([] if past_point_of_no_return else probes)
                        if (found := took_effect(actions, probe))
                    ),
                    None,
                )
                past_point_of_no_return = past_point_of_no_return or taken is not None
                recovery = _recover(actions, reporter, [] if past_point_of_no_return else undos, releases)
                if taken:  # why nothing was undone
                    recovery.insert(0, taken)
                state = _left_behind(left_behind) if left_behind else None
            raise StepFailed(failed, number, error, recovery, past_point_of_no_return, failure_hint, state) from error
    return done


def took_effect(actions: Any, probe: Step) -> str:
    """What the probe of a failed or cut-off step found it did, or '' if nothing. A probe that
    cannot tell counts as having found it did: rolling forward is what cannot make two primaries."""
    try:
        return str(getattr(actions, probe.action)(*probe.args) or "")
    except Exception as exc:  # noqa: BLE001 - unknown must not be read as "did not"
        return f"unknown whether it took effect ({describe(exc)})"


def _left_behind(left_behind: Callable[[], str]) -> str:
    try:
        return left_behind()
    except Exception as exc:  # noqa: BLE001 - the failure itself matters more
        return f"unknown ({describe(exc)})"


def _recover(actions: Any, reporter: Reporter, undos: list[Step], releases: list[Step]) -> list[StepReport]:
    with reporter.recovery():
        return _run_recovery(actions, reporter, undos, releases)


def _run_recovery(actions: Any, reporter: Reporter, undos: list[Step], releases: list[Step]) -> list[StepReport]:
    recovery = []
    for done, failed, steps in (("undone", "undo failed", undos), ("released", "release failed", releases)):
        for step in reversed(steps):
            try:
                with reporter.step(step.title) as record:
                    detail = getattr(actions, step.action)(*step.args)
                    if detail:
                        record.detail = detail
                recovery.append(StepReport(step.title, done, detail or None))
            except BaseException as error:  # noqa: BLE001 - a second Ctrl-C must not leave writes paused
                recovery.append(StepReport(step.title, failed, describe(error)))
    return recovery


def spec(step: Step | None) -> dict[str, Any] | None:
    """A step as the journal keeps it: enough for `igops ops abort` to run it again."""
    if step is None:
        return None
    return {"title": step.title, "action": step.action, "args": [_plain(arg) for arg in step.args]}


def from_spec(data: dict[str, Any]) -> Step:
    return Step(data["title"], data["action"], tuple(_restored(arg) for arg in data.get("args", [])))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_plain(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": {key: _plain(item) for key, item in value.items()}}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _restored(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_restored(item) for item in value["tuple"])
    if isinstance(value, dict) and set(value) == {"dict"}:
        return {key: _restored(item) for key, item in value["dict"].items()}
    if isinstance(value, list):
        return [_restored(item) for item in value]
    return value
