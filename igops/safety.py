"""Locks, the audit trail and confirmation: the guard rails every mutating command passes.
The locks and audit log here are the local backend of igops.coordination, which decides
whether a fleet uses them or etcd.

Locks are `flock`s on one file per (operation, target): the kernel drops them when the holder
dies, even by SIGKILL, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from igops.errors import AlreadyRunning, UsageError
from igops.secrets import redact, redact_data

SECRET_OPTION = re.compile(r"^(--?[\w-]*(password|token|secret|key)[\w-]*)(=.*)?$", re.I)
# The operator's host name as records show it, when the machine's own name does not say which
# bastion or laptop it is (a container, a cloned VM).
OPERATOR_HOST_ENV = "IGOPS_OPERATOR_HOST"


@dataclass(frozen=True)
class LockHolder:
    pid: int
    user: str
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.user}@{self.host}, since {self.since}): {self.command}"


def lock_name(operation: str, target: str) -> str:
    """The one name of an (operation, target) lock: two locks conflict when their names match."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{operation}--{target}")


@contextmanager
def lock(
    state_dir: Path, operation: str, target: str, command_line: str = "", holder: str | None = None
) -> Iterator[Path]:
    """Hold the lock for `operation` on `target`, or raise AlreadyRunning naming the holder.
    `holder` is the record to leave in the lock file (JSON) instead of this process's own
    LockHolder; the AlreadyRunning carries the file's text as `holder_text` either way."""
    directory = state_dir / "locks"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / (lock_name(operation, target) + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_holder(path)
            refusal = AlreadyRunning(
                f"{operation} on {target} is already running" + (f": {other.describe()}" if other else ""),
                "wait for it to finish; the lock is released when that process exits",
            )
            refusal.resource = (operation, target)
            refusal.holder_text = _read_text(path)
            raise refusal from None
        if holder is None:
            holder = json.dumps(
                redact_data(
                    LockHolder(os.getpid(), operator_user(), operator_host(), redact(command_line), now()).__dict__
                )
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield path
    finally:
        os.close(fd)


def read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text())
        return LockHolder(**{key: data[key] for key in LockHolder.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def redact_argv(argv: list[str]) -> str:
    """The command line as the audit log records it: secret options and values hidden."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
            continue
        match = SECRET_OPTION.match(arg)
        if match and match.group(3):
            shown.append(f"{match.group(1)}=***")
        elif match:
            shown.append(arg)
            hide_next = True
        else:
            shown.append(arg)
    return redact(shlex.join(shown))


def audit(
    state_dir: Path,
    *,
    command: str,
    targets: list[str],
    result: str,
    exit_code: int | None,
    duration_ms: float,
    detail: str | None = None,
    reason: str | None = None,
    operation_id: str | None = None,
) -> None:
    """Append one record to the audit log. Appends of one line are atomic with O_APPEND."""
    append_audit(
        state_dir,
        audit_record(
            command=command,
            targets=targets,
            result=result,
            exit_code=exit_code,
            duration_ms=duration_ms,
            detail=detail,
            reason=reason,
            operation_id=operation_id,
        ),
    )


def audit_record(
    *,
    command: str,
    targets: list[str],
    result: str,
    exit_code: int | None,
    duration_ms: float,
    detail: str | None = None,
    reason: str | None = None,
    operation_id: str | None = None,
) -> dict[str, Any]:
    """One audit record, every string in it redacted: what every audit backend stores. An
    operation's start is recorded with no exit code; its end, under the same operation id,
    with one."""
    record: dict[str, Any] = {
        "time": now(),
        "user": operator_user(),
        "sudo_user": os.environ.get("SUDO_USER"),
        "host": operator_host(),
        "pid": os.getpid(),
        "command": redact(command),
        "targets": targets,
        "result": result,
        "exit_code": exit_code,
        "duration_ms": round(duration_ms, 1),
    }
    if detail:
        record["detail"] = redact(detail)[:2000]
    if reason:
        record["reason"] = redact(reason)[:500]
    if operation_id:
        record["operation"] = operation_id
    # Redacted before serialising, which would escape what a secret may hold.
    redacted: dict[str, Any] = redact_data(record)
    return redacted


def append_audit(state_dir: Path, record: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = (json.dumps(redact_data(record), sort_keys=True) + "\n").encode()
    fd = os.open(state_dir / "audit.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def confirm(question: str, assume_yes: bool, ask: Callable[[str], str]) -> bool:
    """Ask a person through `ask` (the output boundary's: igops.output.Output.ask), which shows
    the prompt and returns the line answered; refuse outright when nobody is there to answer."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(
            "refusing to act without confirmation: stdin is not a terminal",
            "review the plan with --dry-run, then pass --yes",
        )
    answer = ask(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def operator_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def operator_host() -> str:
    return os.environ.get(OPERATOR_HOST_ENV) or socket.gethostname()


def now(timespec: str = "milliseconds") -> str:
    """The time in UTC, ISO 8601, to the millisecond unless asked otherwise."""
    return datetime.now(UTC).isoformat(timespec=timespec)


def monotonic_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
