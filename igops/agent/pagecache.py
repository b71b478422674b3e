"""Page-cache residency of files, exactly: capture it with mincore(2), warm it back with reads,
and count it, in profiles of igops.agent.pagecache_profile's format (which igops.agent sends
ahead of this program: a host has no igops package to import it from).

Usage:
  pagecache.py capture --header JSON [--cluster-dir DIR] [--within PREFIX ...]
      Walks the roots named in the header and streams a profile to stdout.
  pagecache.py apply ROOT [ROOT ...] [--concurrency N] [--rate BYTES_PER_SECOND]
                     [--match size|mtime|path] [--cluster-dir DIR] [--within PREFIX ...]
      Reads a profile on stdin (ROOT i here stands for the profile's root i) and reads exactly its
      pages. Prints {"event": "progress", "bytes": N} lines, then one "summary" line.
  pagecache.py residency ROOT [ROOT ...] [--within PREFIX ...]
      Reads a profile on stdin; prints one "residency" line: per file, how many of its profiled
      pages are resident here (pages are matched by path; beyond this file's end counts as cold).
Any refusal or failure is one {"event": "error", "message": ..., "refused": bool} line and exit 2.

Readahead is switched off (POSIX_FADV_RANDOM) on every file warmed, so the pages read are the
profiled pages and no others.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import queue
import re
import stat
import struct
import sys
import threading
import time

from igops.agent.pagecache_profile import FileEntry, FormatError, Reader, Writer, check_header

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import IO, Any, Protocol

    from igops.agent.pagecache_profile import Runs

    class Emit(Protocol):
        """An Emitter, or a stand-in for one."""

        def __call__(self, event: str, **fields: Any) -> None: ...


SCAN_WINDOW = 1 << 30
CHUNK = 1 << 20
OPEN_FILES = 256
PROGRESS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 5.0
SKIPPED_LISTED = 50
MATCH_MODES = ("size", "mtime", "path")
RESIDENT_RUN = re.compile(rb"\x01+")
LOW_BIT = bytes(value & 1 for value in range(256))


class Refused(Exception):
    """Input that must not be acted on at all: nothing has been read or warmed."""


def read_cluster_id(data_directory: str) -> str:
    """A Postgres cluster's system identifier: the first 8 bytes of global/pg_control, which
    Postgres writes in the host's byte order."""
    with open(os.path.join(data_directory, "global", "pg_control"), "rb") as handle:
        head = handle.read(8)
    if len(head) != 8:
        raise OSError(f"{data_directory}/global/pg_control is shorter than 8 bytes")
    return str(struct.unpack("=Q", head)[0])


# --- residency ------------------------------------------------------------------------------------
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
        lib.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        _libc = lib
    return _libc


def resident_map(fd: int, size: int, page_size: int) -> bytes:
    """One byte per page of the file, 1 if the page is in the page cache. A read-only shared
    mapping is never touched, so asking faults nothing in."""
    lib = libc()
    parts = []
    for offset in range(0, size, SCAN_WINDOW):
        length = min(SCAN_WINDOW, size - offset)
        address = lib.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        try:
            vector = ctypes.create_string_buffer(-(-length // page_size))
            if lib.mincore(address, length, vector) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            parts.append(vector.raw.translate(LOW_BIT))
        finally:
            lib.munmap(address, length)
    return b"".join(parts)


def runs_of(bitmap: bytes) -> Runs:
    return tuple((match.start(), match.end() - match.start()) for match in RESIDENT_RUN.finditer(bitmap))


def resident_in(bitmap: bytes, runs: Iterable[tuple[int, int]]) -> int:
    return sum(bitmap[first : first + count].count(1) for first, count in runs)


def open_file(path: str) -> int:
    """A read-only descriptor that neither follows a final symlink, nor waits on a FIFO, nor
    updates the access time."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(path, flags)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def check_roots(roots: list[str], within: list[str]) -> None:
    """Every root must exist and, symlinks resolved, lie under one of the allowed prefixes."""
    allowed = [os.path.realpath(prefix) for prefix in within]
    for root in roots:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise Refused(f"{root} is not a directory on this host")
        if allowed and not any(_under(real, prefix) for prefix in allowed):
            raise Refused(f"{root} resolves to {real}, outside {', '.join(within)}")


# --- capture --------------------------------------------------------------------------------------
class Scan:
    def __init__(self) -> None:
        self.files = self.dirs = self.pages = self.unreadable = 0

    def walk(self, root: str) -> Iterator[str]:
        """Regular files under `root`, depth first in name order; symlinks are not followed."""
        pending = [root]
        while pending:
            directory = pending.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda item: item.name)
            except FileNotFoundError:
                continue
            except OSError:
                self.unreadable += 1
                continue
            self.dirs += 1
            subdirectories = []
            for item in entries:
                try:
                    if item.is_dir(follow_symlinks=False):
                        subdirectories.append(item.path)
                    elif item.is_file(follow_symlinks=False):
                        yield item.path
                except OSError:
                    self.unreadable += 1
            pending.extend(reversed(subdirectories))

    def residency(self, path: str, page_size: int) -> tuple[int, int, bytes] | None:
        """(size, mtime_ns, resident map) of a regular file, or None when it is empty, gone or
        unreadable."""
        try:
            fd = open_file(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP):
                self.unreadable += 1
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                return None
            bitmap = resident_map(fd, info.st_size, page_size)
        except OSError:
            self.unreadable += 1
            return None
        finally:
            os.close(fd)
        self.files += 1
        self.pages += len(bitmap)
        return info.st_size, info.st_mtime_ns, bitmap


def capture(header: dict[str, Any], cluster_dir: str | None, within: list[str], out: IO[bytes]) -> None:
    page_size = mmap.PAGESIZE
    header = dict(
        header, page_size=page_size, cluster_id=None, captured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    if cluster_dir:
        try:
            header["cluster_id"] = read_cluster_id(cluster_dir)
        except OSError as exc:
            raise Refused(f"cannot read the Postgres cluster's identity in {cluster_dir}: {exc}") from None
    check_header(header)
    roots = [root["path"] for root in header["roots"]]
    check_roots(roots, within)
    writer = Writer(out, header)
    scan = Scan()
    for index, root in enumerate(roots):
        for path in scan.walk(root):
            found = scan.residency(path, page_size)
            if found:
                size, mtime_ns, bitmap = found
                runs = runs_of(bitmap)
                if runs:
                    writer.add(FileEntry(index, os.path.relpath(path, root), size, mtime_ns, runs))
    writer.finish(scan.files, scan.dirs, scan.pages, scan.unreadable)


# --- apply and residency --------------------------------------------------------------------------
class Emitter:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        with self._lock:
            try:
                self._stream.write(json.dumps(dict(event=event, **fields)) + "\n")
                self._stream.flush()
            except BrokenPipeError:
                os._exit(3)  # igops is gone: nobody is waiting for the rest of the reads


def check_header_here(header: dict[str, Any], roots: list[str], cluster_dir: str | None) -> None:
    """Refuse a profile this host cannot honour, before anything is read."""
    if header["page_size"] != mmap.PAGESIZE:
        raise Refused(f"the profile's page size is {header['page_size']}, this host's is {mmap.PAGESIZE}")
    if len(roots) != len(header["roots"]):
        profiled = len(header["roots"])
        raise Refused(
            f"the profile has {profiled} {'root' if profiled == 1 else 'roots'}, {len(roots)} "
            f"{'was' if len(roots) == 1 else 'were'} given"
        )
    if header["cluster_id"] is not None:
        if not cluster_dir:
            raise Refused("the profile is of a Postgres cluster, and no data directory was given to check")
        try:
            here = read_cluster_id(cluster_dir)
        except OSError as exc:
            raise Refused(f"cannot read the Postgres cluster's identity in {cluster_dir}: {exc}") from None
        if here != header["cluster_id"]:
            raise Refused(
                f"the profile is of Postgres cluster {header['cluster_id']} "
                f"(captured on {header['host']}); this host's cluster is {here}"
            )


def locate(entry: FileEntry, roots: list[str], real_roots: list[str]) -> tuple[str, str | None]:
    """The entry's path on this host, or a reason to skip it (a symlinked directory must not
    lead a profile's path out of its root)."""
    path = os.path.join(roots[entry.root], entry.path)
    real_parent = os.path.realpath(os.path.dirname(path))
    if not _under(real_parent, real_roots[entry.root]):
        return path, "outside its root"
    return path, None


def examine(fd: int, entry: FileEntry, match: str) -> str | None:
    """Why this host's file cannot take the entry's pages, or None."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if match != "path" and info.st_size != entry.size:
        return "size differs"
    if match == "mtime" and info.st_mtime_ns != entry.mtime_ns:
        return "mtime differs"
    return None


def clip(runs: Iterable[tuple[int, int]], size: int, page_size: int) -> Runs:
    """The runs inside a file of `size` bytes."""
    last = -(-size // page_size)
    return tuple((first, min(count, last - first)) for first, count in runs if first < last)


class TokenBucket:
    """At most `rate` bytes a second on average, across every reader."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(CHUNK)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, amount: int) -> None:
        """Readers run into debt and sleep it off, so the long-run rate holds however many wait."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(float(CHUNK), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= amount
            debt = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if debt:
            time.sleep(debt)


def disk_read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (all its threads)."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


class OpenFile:
    def __init__(self, entry: FileEntry, path: str, fd: int, runs: Runs) -> None:
        self.entry, self.path, self.fd, self.runs = entry, path, fd, runs
        self.pending = 0
        self.error: str | None = None
        self.lock = threading.Lock()


class Warmer:
    """Reads profiled pages with a pool of threads: the profile is parsed as it arrives, files are
    opened by one dispatcher (at most OPEN_FILES at a time), and 1 MiB reads go to the pool."""

    def __init__(self, roots: list[str], match: str, concurrency: int, rate: int, emit: Emit) -> None:
        self.roots = roots
        self.real_roots = [os.path.realpath(root) for root in roots]
        self.match = match
        self.concurrency = concurrency
        self.bucket = TokenBucket(rate) if rate else None
        self.emit = emit
        self.page_size = mmap.PAGESIZE
        self.entries: queue.Queue[FileEntry | None] = queue.Queue()
        self.chunks: queue.Queue[tuple[OpenFile, int, int] | None] = queue.Queue(maxsize=concurrency * 4)
        self.open_slots = threading.BoundedSemaphore(OPEN_FILES)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done_bytes = 0
        self.files = self.pages = 0
        self.warmed: list[tuple[str, Runs]] = []  # (path, runs) of files read without error
        self.warmed_pages = 0
        self.clipped_pages = 0
        self.skipped: dict[str, int] = {}
        self.skipped_pages = 0
        self.skipped_listed: list[dict[str, Any]] = []

    def skip(self, entry: FileEntry, reason: str, pages: int) -> None:
        with self.lock:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            self.skipped_pages += pages
            if len(self.skipped_listed) < SKIPPED_LISTED:
                self.skipped_listed.append({"root": entry.root, "path": entry.path, "reason": reason})

    def dispatch(self) -> None:
        while True:
            entry = self.entries.get()
            if entry is None or self.stop.is_set():
                break
            handle = self.open_entry(entry)
            if handle is None:
                continue
            self.open_slots.acquire()
            pieces = [
                (first * self.page_size + offset, min(CHUNK, count * self.page_size - offset))
                for first, count in handle.runs
                for offset in range(0, count * self.page_size, CHUNK)
            ]
            handle.pending = len(pieces)
            for offset, length in pieces:
                self.chunks.put((handle, offset, length))
        for _ in range(self.concurrency):
            self.chunks.put(None)

    def open_entry(self, entry: FileEntry) -> OpenFile | None:
        """The entry's file here, ready to read with readahead off, or None (skipped, counted)."""
        pages = sum(count for _, count in entry.runs)
        path, reason = locate(entry, self.roots, self.real_roots)
        if reason:
            self.skip(entry, reason, pages)
            return None
        try:
            fd = open_file(path)
        except FileNotFoundError:
            self.skip(entry, "missing", pages)
            return None
        except OSError as exc:
            self.skip(entry, exc.strerror or "cannot open", pages)
            return None
        try:
            reason = examine(fd, entry, self.match)
            runs = clip(entry.runs, os.fstat(fd).st_size, self.page_size) if not reason else ()
            if not reason and not runs:
                reason = "shorter than the profiled pages"
            if not reason:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError as exc:
            reason = exc.strerror or "cannot read its status"
        if reason:
            os.close(fd)
            self.skip(entry, reason, pages)
            return None
        with self.lock:
            self.clipped_pages += pages - sum(count for _, count in runs)
        return OpenFile(entry, path, fd, runs)

    def read(self) -> None:
        buffer = memoryview(bytearray(CHUNK))
        while True:
            work = self.chunks.get()
            if work is None:
                return
            handle, offset, length = work
            if not self.stop.is_set() and handle.error is None:
                if self.bucket:
                    self.bucket.take(length)
                try:
                    got = os.preadv(handle.fd, [buffer[:length]], offset)
                except OSError as exc:
                    handle.error = f"read error: {exc.strerror or exc}"
                    got = 0
                with self.lock:
                    self.done_bytes += got
            with handle.lock:
                handle.pending -= 1
                last = handle.pending == 0
            if last:
                self.close(handle)

    def close(self, handle: OpenFile) -> None:
        os.close(handle.fd)
        self.open_slots.release()
        pages = sum(count for _, count in handle.runs)
        if handle.error or self.stop.is_set():
            self.skip(handle.entry, handle.error or "stopped", pages)
            return
        with self.lock:
            self.warmed.append((handle.path, handle.runs))
            self.warmed_pages += pages

    def report_progress(self, finished: threading.Event) -> None:
        last_bytes, last_time = -1, 0.0
        while not finished.wait(PROGRESS_INTERVAL):
            now = time.monotonic()
            if self.done_bytes != last_bytes or now - last_time >= HEARTBEAT_INTERVAL:
                last_bytes, last_time = self.done_bytes, now
                self.emit("progress", bytes=self.done_bytes)

    def run(self, reader: Reader) -> int:
        started, read_before = time.monotonic(), disk_read_bytes()
        finished = threading.Event()
        threads = [threading.Thread(target=self.dispatch, name="dispatch")]
        threads += [threading.Thread(target=self.read, name=f"read-{n}") for n in range(self.concurrency)]
        reporter = threading.Thread(target=self.report_progress, args=(finished,), name="progress")
        for thread in threads + [reporter]:
            thread.start()
        failure: str | None = None
        try:
            for entry in reader.entries():
                self.files += 1
                self.pages += sum(count for _, count in entry.runs)
                self.entries.put(entry)
        except FormatError as exc:
            failure = f"profile: {exc}"
            self.stop.set()
        finally:
            self.entries.put(None)
            for thread in threads:
                thread.join()
            finished.set()
            reporter.join()
        seconds = time.monotonic() - started
        resident = sum(resident_pages_of(path, runs, self.page_size) for path, runs in self.warmed)
        summary = {
            "files": self.files,
            "pages": self.pages,
            "page_size": self.page_size,
            "warmed_files": len(self.warmed),
            "warmed_pages": self.warmed_pages,
            "warmed_bytes": self.done_bytes,
            "skipped_files": sum(self.skipped.values()),
            "skipped_pages": self.skipped_pages + self.clipped_pages,
            "skipped_by_reason": self.skipped,
            "skipped": self.skipped_listed,
            "read_bytes": disk_read_bytes() - read_before,
            "resident_pages": resident,
            "seconds": round(seconds, 3),
            "concurrency": self.concurrency,
        }
        self.emit("progress", bytes=self.done_bytes)
        if failure:
            self.emit("error", message=failure, refused=False, summary=summary)
            return 2
        self.emit("summary", **summary)
        return 0


def resident_pages_of(path: str, runs: Iterable[tuple[int, int]], page_size: int) -> int:
    try:
        fd = open_file(path)
    except OSError:
        return 0
    try:
        return resident_in(resident_map(fd, os.fstat(fd).st_size, page_size), runs)
    except OSError:
        return 0
    finally:
        os.close(fd)


def residency(reader: Reader, roots: list[str], emit: Emit) -> None:
    real_roots = [os.path.realpath(root) for root in roots]
    files = []
    for entry in reader.entries():
        profiled = sum(count for _, count in entry.runs)
        path, reason = locate(entry, roots, real_roots)
        resident = 0
        if not reason:
            try:
                fd = open_file(path)
            except FileNotFoundError:
                reason = "missing"
            except OSError as exc:
                reason = exc.strerror or "cannot open"
            else:
                try:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        reason = "not a regular file"
                    else:
                        reason = "ok" if info.st_size == entry.size else "size differs"
                        if reason == "ok" and info.st_mtime_ns != entry.mtime_ns:
                            reason = "mtime differs"
                        if info.st_size:
                            bitmap = resident_map(fd, info.st_size, mmap.PAGESIZE)
                            resident = resident_in(bitmap, clip(entry.runs, info.st_size, mmap.PAGESIZE))
                finally:
                    os.close(fd)
        files.append([entry.root, entry.path, profiled, resident, reason])
    emit("residency", files=files)


# --- command line ---------------------------------------------------------------------------------
def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagecache")
    modes = parser.add_subparsers(dest="mode", required=True)
    capture_mode = modes.add_parser("capture")
    capture_mode.add_argument("--header", required=True)
    capture_mode.add_argument("--cluster-dir")
    capture_mode.add_argument("--within", action="append", default=[])
    apply_mode = modes.add_parser("apply")
    apply_mode.add_argument("roots", nargs="+")
    apply_mode.add_argument("--concurrency", type=int, default=8)
    apply_mode.add_argument("--rate", type=int, default=0)
    apply_mode.add_argument("--match", choices=MATCH_MODES, default="size")
    apply_mode.add_argument("--cluster-dir")
    apply_mode.add_argument("--within", action="append", default=[])
    residency_mode = modes.add_parser("residency")
    residency_mode.add_argument("roots", nargs="+")
    residency_mode.add_argument("--within", action="append", default=[])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(sys.argv[1:] if argv is None else argv)
    emit = Emitter(sys.stdout)
    os.chdir("/")
    try:
        if args.mode == "capture":
            try:
                header = json.loads(args.header)
            except ValueError:
                header = None
            if not isinstance(header, dict):
                raise Refused("--header is not a JSON object")
            capture(header, args.cluster_dir, args.within, sys.stdout.buffer)
            return 0
        reader = Reader(sys.stdin.buffer)
        check_roots(args.roots, args.within)
        if args.mode == "residency":
            if reader.page_size != mmap.PAGESIZE:
                raise Refused(f"the profile's page size is {reader.page_size}, this host's is {mmap.PAGESIZE}")
            residency(reader, args.roots, emit)
            return 0
        if args.concurrency < 1 or args.rate < 0:
            raise Refused("--concurrency must be at least 1 and --rate not negative")
        check_header_here(reader.header, args.roots, args.cluster_dir)
        return Warmer(args.roots, args.match, args.concurrency, args.rate, emit).run(reader)
    except Refused as exc:
        emit("error", message=str(exc), refused=True)
    except FormatError as exc:
        emit("error", message=f"profile: {exc}", refused=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
