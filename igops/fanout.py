"""One command on many hosts, counted: the live counts a run shows while it goes (done, failed,
running) and its summary once every host has answered (what `igops exec` prints and puts in
its JSON). Kept apart from SSH and from rendering, so that both are checked without a fleet."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from igops.errors import ExitCode
from igops.output import plural
from igops.remote import HostResult


@dataclass
class Tally:
    """A run's hosts by state as it goes. The pool's threads report each host's start and end;
    `counts()` may be read from any thread (the progress bar's refresh) at any time."""

    total: int
    running: int = 0
    ok: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def started(self) -> None:
        with self._lock:
            self.running += 1

    def finished(self, ok: bool) -> None:
        with self._lock:
            self.running -= 1
            if ok:
                self.ok += 1
            else:
                self.failed += 1

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def counts(self) -> str:
        """ "630 ok, 10 failed, 100 running": what a progress bar shows beside done/total."""
        with self._lock:
            return f"{self.ok} ok, {self.failed} failed, {self.running} running"


@dataclass(frozen=True)
class Summary:
    """Every host's result of one run, counted: ok, exited non-zero, timed out, and unreachable
    (no exit status: not connected, refused by its host key or authentication, or its session
    lost). Exact at any size: it counts the results, not what was shown as they came."""

    hosts: int
    ok: int
    exited_nonzero: int
    timed_out: int
    unreachable: int

    @property
    def failed(self) -> int:
        return self.hosts - self.ok

    @property
    def exit_code(self) -> int:
        """0 when every host succeeded, 1 when none did, 5 (partial) otherwise."""
        if not self.failed:
            return ExitCode.OK
        return ExitCode.FAILED if self.failed == self.hosts else ExitCode.PARTIAL

    def line(self) -> str:
        """ "997 of 1000 hosts ok; 3 failed: 1 exited non-zero, 1 timed out, 1 unreachable" """
        text = f"{self.ok} of {plural(self.hosts, 'host')} ok"
        if not self.failed:
            return text
        kinds = [
            f"{count} {what}"
            for count, what in (
                (self.exited_nonzero, "exited non-zero"),
                (self.timed_out, "timed out"),
                (self.unreachable, "unreachable"),
            )
            if count
        ]
        return f"{text}; {self.failed} failed: {', '.join(kinds)}"

    def counts(self) -> dict[str, int]:
        """The counts as --json gives them."""
        return {
            "ok": self.ok,
            "failed": self.failed,
            "exited_nonzero": self.exited_nonzero,
            "timed_out": self.timed_out,
            "unreachable": self.unreachable,
        }


def summarise(results: Sequence[HostResult]) -> Summary:
    ok = sum(result.ok for result in results)
    timed_out = sum(not result.ok and result.timed_out for result in results)
    exited_nonzero = sum(not result.ok and not result.timed_out and result.reached for result in results)
    return Summary(len(results), ok, exited_nonzero, timed_out, len(results) - ok - exited_nonzero - timed_out)


def result_line(result: HostResult) -> str:
    """One host's result as it comes in: "app12: ok, exit 0 in 85 ms",
    "app13: FAILED, exit 3 in 90 ms", "app14: FAILED, connection refused by …"."""
    if result.ok:
        return f"{result.host}: ok, exit 0 in {result.duration_ms:.0f} ms"
    if result.error:
        return f"{result.host}: FAILED, {result.error}"
    return f"{result.host}: FAILED, exit {result.exit_code} in {result.duration_ms:.0f} ms"


def output_lines(result: HostResult) -> list[str]:
    """A host's stdout, then its stderr, each line after the host's name."""
    return [f"{result.host}: {line}" for stream in (result.stdout, result.stderr) for line in stream.splitlines()]
