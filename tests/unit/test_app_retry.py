import pytest

from app.retry import call_with_retries


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class Transient(Exception):
    pass


def test_succeeds_after_transient_failures_with_growing_delays():
    clock = FakeClock()
    outcomes = [Transient(), Transient(), Transient(), "done"]
    seen = []

    def note(exc):
        seen.append(exc)
        return False

    def attempt():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    result = call_with_retries(
        attempt, is_retryable=lambda e: isinstance(e, Transient), before_retry=note, clock=clock, sleep=clock.sleep
    )
    assert result == "done"
    assert len(seen) == 3
    assert clock.sleeps == [0.05, 0.1, 0.2]


def test_gives_up_within_the_budget():
    clock = FakeClock()

    def attempt():
        raise Transient()

    with pytest.raises(Transient):
        call_with_retries(
            attempt,
            is_retryable=lambda e: True,
            before_retry=lambda e: False,
            budget_seconds=5.0,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now <= 5.0
    assert clock.now > 4.0
    assert max(clock.sleeps) == 0.5


def test_non_retryable_errors_propagate_at_once():
    clock = FakeClock()
    calls = []

    def attempt():
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call_with_retries(
            attempt, is_retryable=lambda e: False, before_retry=lambda e: False, clock=clock, sleep=clock.sleep
        )
    assert calls == [1]
    assert clock.sleeps == []


def test_a_found_change_is_retried_without_waiting():
    clock = FakeClock()
    outcomes = [Transient(), Transient(), "done"]

    def attempt():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    changes = iter([True, False])
    result = call_with_retries(
        attempt, is_retryable=lambda e: True, before_retry=lambda e: next(changes), clock=clock, sleep=clock.sleep
    )
    assert result == "done"
    assert clock.sleeps == [0.05]
