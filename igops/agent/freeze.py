"""Freeze filesystems for a snapshot, and guarantee they are thawed.

Usage: freeze.py DEADLINE_SECONDS MOUNT [MOUNT ...]; then, on stdin, the line "thaw".

A watchdog in its own session is started BEFORE anything is frozen. It thaws every mount the
moment this process dies (its pipe reaches EOF: SIGKILL, OOM, a dropped SSH session) and in any
case at the hard deadline. The foreground process also thaws on EOF of stdin or at the deadline,
and on its way out whatever ended it (a closed channel it could not report to).
Everything is imported and every mount point opened before the freeze, and nothing is written,
logged or executed on a frozen filesystem: output goes only to the SSH channel.
Output: JSON lines on stdout ("frozen", then "thawed"), or one "error" line and exit 2/3.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from typing import Any, NoReturn

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
HOST_LOCK = "/run/igops-freeze.lock"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps(dict(event=event, **fields)) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> NoReturn:
    emit("error", message=message)
    sys.exit(code)


def thaw(fds: list[tuple[str, int]]) -> list[str]:
    """Thaw in reverse order; a mount that is not frozen (EINVAL) is fine."""
    thawed = []
    for path, fd in reversed(fds):
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            thawed.append(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                thawed.append(f"{path}: {exc.strerror}")
    return thawed


def release_watchdog(pipe_write: int) -> None:
    """Tell the watchdog the thaw is done. It may be gone already: at the deadline it thaws and
    exits, and racing it there must not kill this process before it reports the thaw."""
    try:
        os.write(pipe_write, b"done")
    except BrokenPipeError:
        pass


def watchdog(fds: list[tuple[str, int]], pipe_read: int, deadline: float) -> NoReturn:
    """Runs in its own session: thaws at the deadline, thaws on EOF, exits on "done" or EOF.

    It stays after the deadline's thaw until the freezing process is done or gone. A freeze
    still waiting for its filesystem's writes at the deadline (a volume that stopped answering)
    is not frozen yet, so that thaw finds nothing; the freeze can complete later, and if its
    process then dies, the EOF is the only thing left to thaw it."""
    os.setsid()
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(null, stream)
    remaining: float | None = deadline - time.monotonic()
    while True:
        if remaining is not None and remaining <= 0:
            thaw(fds)
            remaining = None  # from here on, wait for the process alone
        ready, _, _ = select.select([pipe_read], [], [], remaining)
        if ready:
            if os.read(pipe_read, 16) == b"done":
                os._exit(0)
            thaw(fds)  # EOF: the process holding the freeze is gone
            os._exit(0)
        remaining = deadline - time.monotonic()


def main() -> None:
    if len(sys.argv) < 3:
        fail("usage: freeze DEADLINE MOUNT [MOUNT ...]")
    try:
        seconds = float(sys.argv[1])
    except ValueError:
        fail(f"bad deadline {sys.argv[1]!r}")
    mounts = sys.argv[2:]
    os.chdir("/")
    fds = []
    for path in mounts:
        real = os.path.realpath(path)
        if real == "/":
            fail("refusing to freeze /", 3)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            fail(f"cannot open {path}: {exc.strerror}")
        if not os.path.ismount(real):
            fail(f"{path} is not a mount point", 3)
        fds.append((path, fd))

    lock = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail("another freeze is in progress on this host", 4)

    started = time.monotonic()
    deadline = started + seconds
    pipe_read, pipe_write = os.pipe()
    if os.fork() == 0:
        os.close(pipe_write)
        os.close(lock)
        if os.fork() == 0:  # the grandchild is re-parented to init, outliving this session
            watchdog(fds, pipe_read, deadline)
        os._exit(0)
    os.wait()
    os.close(pipe_read)

    os.sync()
    # Each FIFREEZE flushes its filesystem's log and waits: freezing in parallel keeps the
    # window flat as volumes are added. The ioctl releases the GIL.
    outcomes: list[str | None] = [None] * len(fds)

    def freeze_one(index: int) -> None:
        try:
            fcntl.ioctl(fds[index][1], FIFREEZE, 0)
            outcomes[index] = "frozen"
        except OSError as exc:
            outcomes[index] = "already frozen" if exc.errno == errno.EBUSY else exc.strerror

    freeze_started = time.monotonic()
    threads = [threading.Thread(target=freeze_one, args=(index,)) for index in range(len(fds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    frozen = [entry for entry, outcome in zip(fds, outcomes) if outcome == "frozen"]
    failed = [(path, outcome) for (path, _), outcome in zip(fds, outcomes) if outcome != "frozen"]
    if failed:
        thaw(frozen)
        release_watchdog(pipe_write)
        fail("cannot freeze " + ", ".join(f"{path}: {why}" for path, why in failed) + "; nothing is left frozen", 3)
    frozen_at = time.monotonic()
    # A freeze that completed after the deadline finds igops gone as often as not (it stops
    # waiting then and closes the channel): the report of it must not be what leaves it frozen.
    try:
        emit(
            "frozen",
            mounts=[path for path, _ in frozen],
            freeze_ms=round((frozen_at - freeze_started) * 1000, 2),
            deadline_ms=round((deadline - frozen_at) * 1000),
        )
        reason = wait_for_thaw(deadline)
    finally:
        thawed = thaw(frozen)
        thawed_at = time.monotonic()
        release_watchdog(pipe_write)
    emit("thawed", mounts=thawed, reason=reason, window_ms=round((thawed_at - freeze_started) * 1000, 2))


def wait_for_thaw(deadline: float) -> str:
    """Why the thaw comes: "request" (the line "thaw"), "eof" (the channel closed) or "deadline"."""
    stdin = sys.stdin.buffer
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "deadline"
        ready, _, _ = select.select([stdin], [], [], remaining)
        if ready:
            line = stdin.readline()
            if not line:
                return "eof"
            if line.strip() == b"thaw":
                return "request"


if __name__ == "__main__":
    main()
