"""Free space and write-ability of a host's data filesystems, without ever blocking.

Usage: hostprobe.py STALL_SECONDS [MOUNT ...]. Prints one JSON object and exits 0.

A write to a frozen filesystem sleeps uninterruptibly until the thaw, so the write is made by a
child in its own session that this program never waits on for longer than STALL_SECONDS. The
child holds a per-mount flock for as long as its write is blocked, and records in the lock file
when its write began, its pid, and when the write ended: a later run that finds the lock held by
a writer still alive whose write began more than STALL_SECONDS ago reports the mount frozen at
once and starts no new writer, so repeated runs (cron) leave at most one stuck process per frozen
mount. The kernel drops the lock when that writer finally finishes. statvfs and reads do not
block while frozen.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from typing import Any, NoReturn

PROBE_FILE = ".igops-write-check"
# How long a probe waits its turn behind others that keep the lock changing hands, in stalls.
QUEUE_STALLS = 10
# The lock file's record, padded so that each write replaces the whole of the one before.
RECORD_BYTES = 64


def lock_dir() -> str | None:
    for candidate in ("/run/igops-check", os.path.join("/tmp", f"igops-check-{os.getuid()}")):
        try:
            os.makedirs(candidate, mode=0o700, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    return None


def space(mount: str) -> dict[str, int | bool]:
    stats = os.statvfs(mount)
    return {
        "bytes_total": stats.f_blocks * stats.f_frsize,
        "bytes_free": stats.f_bfree * stats.f_frsize,
        "bytes_available": stats.f_bavail * stats.f_frsize,
        "inodes_total": stats.f_files,
        "inodes_free": stats.f_ffree,
        "read_only": bool(stats.f_flag & os.ST_RDONLY),
    }


def writer(mount: str, lock_fd: int, report_fd: int, start: float) -> NoReturn:
    """The child: one small write at the mount's root, recorded in the lock file before and after
    (a failed write's end is negative: no probe takes it for a healthy one); its outcome goes down
    the pipe."""
    pid = os.getpid()
    write_record(lock_fd, start, 0, pid)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(null, stream)
    try:
        fd = os.open(os.path.join(mount, PROBE_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{time.time():.3f}\n".encode())
        finally:
            os.close(fd)
        outcome = "ok"
        write_record(lock_fd, start, time.time(), pid)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno is not None else None
        outcome = f"error {code} {exc.strerror}"
        write_record(lock_fd, start, -time.time(), pid)
    try:
        os.write(report_fd, outcome.encode())
    except OSError:
        pass
    os._exit(0)


def lock_path(locks: str, mount: str) -> str:
    return os.path.join(locks, hashlib.sha1(mount.encode()).hexdigest()[:16] + ".lock")


def write_record(lock_fd: int, start: float, ended: float, pid: int) -> None:
    os.pwrite(lock_fd, f"{start:.3f} {ended:.3f} {pid}".ljust(RECORD_BYTES).encode(), 0)


def lock_record(lock_fd: int) -> tuple[float | None, float | None, int | None]:
    """(start, ended, writer's pid) of the last write made under the lock: `ended` is 0 while the
    write is under way and negative when it failed; any may be None (an older or partial record)."""
    try:
        fields = os.pread(lock_fd, RECORD_BYTES, 0).decode().split()
        start = float(fields[0]) if fields else None
        ended = float(fields[1]) if len(fields) > 1 else None
        pid = int(fields[2]) if len(fields) > 2 else None
    except ValueError:
        return None, None, None
    return start, ended, pid


def still_writing(pid: int) -> bool:
    """Whether the writer `pid` lives (a zombie has let go of the lock already)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def writable(mount: str, stall: float, locks: str | None) -> tuple[bool | None, str | None]:
    """(True, None) when a write completed within `stall` seconds; (False, detail) when not.

    Probes of one mount that overlap (a cron run and a person's, or many hosts sharing one
    kernel) take turns on the lock, and one that finds a write completed less than `stall`
    seconds ago takes that write as its answer: waiting behind a healthy writer is not a stall.
    """
    if locks is None:
        return None, "no writable directory for the probe's lock"
    lock_fd = os.open(lock_path(locks, mount), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        give_up = time.monotonic() + QUEUE_STALLS * stall
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                start, ended, pid = lock_record(lock_fd)
                # Only a write under way can be blocked, and only while its writer lives. Any other
                # record is the last write's: its holder is about to let go, or has just taken the
                # lock and not yet started a writer (a record left by a probe that gave up on a
                # slow writer read as a write blocked for minutes: false CRITICALs at 1,000 hosts).
                if start and ended == 0 and pid and still_writing(pid) and time.time() - start > stall:
                    return False, f"a write has been blocked for {time.time() - start:.1f} s"
                if time.monotonic() > give_up:
                    return None, f"other probes of this mount held its lock for {QUEUE_STALLS * stall:g} s"
                time.sleep(0.01)
        _, ended, _ = lock_record(lock_fd)
        if ended and 0 <= time.time() - ended < stall:
            return True, None
        start = time.time()
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read_end)
            writer(mount, lock_fd, write_end, start)
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], stall)
            if not ready:
                return False, f"a write did not complete within {stall:g} s"
            outcome = os.read(read_end, 200).decode(errors="replace")
            os.waitpid(child, 0)
            if outcome == "ok":
                return True, None
            return False, outcome or "the writer died"
        finally:
            os.close(read_end)
    finally:
        os.close(lock_fd)


def main(argv: list[str]) -> None:
    stall = float(argv[0])
    locks = lock_dir()
    mounts = []
    for mount in argv[1:]:
        entry: dict[str, Any] = {"mount": mount, "mounted": os.path.ismount(mount)}
        if entry["mounted"]:
            entry.update(space(mount))
            if entry["read_only"]:
                entry["writable"], entry["detail"] = False, "mounted read-only"
            else:
                entry["writable"], entry["detail"] = writable(mount, stall, locks)
        mounts.append(entry)
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    sys.stdout.write(json.dumps({"mounts": mounts, "load": load}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
