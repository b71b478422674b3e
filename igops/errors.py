"""Exceptions and the exit codes they map to: the only place exit codes are defined.

Domain modules raise these; only the CLI layer turns them into a process exit status.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the operation ran and failed
    USAGE = 2  # bad arguments or inventory: nothing was done
    REFUSED = 3  # a safety check refused the operation: nothing was done
    LOCKED = 4  # the same operation on the same target is already running
    PARTIAL = 5  # some targets succeeded and some failed
    # The same code from a read-only command (status, pg/redis/lab status, deploy releases,
    # check without --nagios): it ran and found problems.
    PROBLEMS_FOUND = 5
    # Stopped on purpose, with the fleet safe and a decision left to a person: a deploy whose
    # canary analysis was inconclusive, the canary still in place (igops deploy REV goes on).
    HELD = 6
    INTERRUPTED = 130


class NagiosStatus(IntEnum):
    """Nagios plugin convention, used only by `check --nagios`."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


def validation_words(error: dict[str, Any]) -> str | None:
    """A pydantic validation error (one of `ValidationError.errors()`) in igops' words, for the
    kinds a person types wrong; None for the others."""
    value, kind = error.get("input"), error.get("type", "")
    limits = error.get("ctx") or {}
    if kind.startswith("int_"):
        return f"{value!r} is not a whole number"
    if kind.startswith("float_"):
        return f"{value!r} is not a number"
    if kind.startswith("bool_"):
        return f"{value!r} is not true or false"
    if kind.startswith("string_type"):
        return f"{value!r} is not text (quote it)"
    bounds = {
        "greater_than_equal": "at least",
        "greater_than": "more than",
        "less_than_equal": "at most",
        "less_than": "less than",
    }
    if kind in bounds:
        return f"{value!r} is out of range: it must be {bounds[kind]} {next(iter(limits.values()), '')}"
    return None


class IgopsError(Exception):
    exit_code: ExitCode = ExitCode.FAILED
    # What the operations journal and the audit trail call an operation that ends with it.
    result_word: str = "failed"
    # The command's result all the same (a deploy's hosts and canary evidence): the --json
    # envelope's data.
    data: object = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(IgopsError):
    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class ConfigProblem:
    where: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem} — {self.fix}"


class ConfigError(UsageError):
    """Every problem found in an inventory, reported together."""

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.source = source
        self.problems = problems
        count = len(problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{source}: {count} {noun} in the inventory")

    def one_line(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        return self.message


class SecretsError(UsageError):
    pass


class RefusedError(IgopsError):
    exit_code = ExitCode.REFUSED


class AlreadyRunning(IgopsError):
    exit_code = ExitCode.LOCKED
    # Set by igops.safety.lock on the refusal it raises: the (operation, target) held, and the
    # lock file's text (None when it could not be read).
    resource: tuple[str, str]
    holder_text: str | None


class RemoteError(IgopsError):
    """A host could not be reached or a remote step failed."""


class Unavailable(IgopsError):
    """A server (Postgres, PgBouncer, Redis) did not answer. `kind` tells a dead process from a
    hung one: 'refused' (nothing listens), 'timeout' (something accepts but does not answer, or
    the host is gone), 'rejected' (the server answered with an error, e.g. it is starting up or
    shutting down)."""

    def __init__(self, host: str, detail: str, kind: str):
        super().__init__(f"{host}: {detail}")
        self.host = host
        self.detail = detail
        self.kind = kind


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line only (its type's name when it has none): how a
    driver's error reads in a one-line detail."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """An exception in one line, for a journal entry or a step's detail: igops' own errors as
    they say themselves, an interrupt as such, anything else with its type."""
    if isinstance(exc, IgopsError):
        return exc.one_line()
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
