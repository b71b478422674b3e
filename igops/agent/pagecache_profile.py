"""The page-cache profile, version 1: its format, defined once for the hosts (the agent
igops.agent.pagecache, which is sent this module ahead of itself: see igops.agent) and for igops.
Stdlib only, like every host program.

The profile is ASCII text, one record per line, every line ending in LF:
  igops-pagecache 1
  H<TAB>{header: host, fleet, postgres_cluster, cluster_id, page_size, captured_at,
         roots: [{path, base, within}]}
  F<TAB>ROOT<TAB>"relative/path"<TAB>SIZE<TAB>MTIME_NS<TAB>GAP+LENGTH,GAP+LENGTH,...
  T<TAB>FILES<TAB>PAGES<TAB>SCANNED_FILES<TAB>SCANNED_DIRS<TAB>SCANNED_PAGES<TAB>UNREADABLE<TAB>SHA256
Only files with resident pages get an F line. Runs are in pages: the first GAP counts from page 0,
each later one from the end of the previous run. SHA256 (hex) covers every byte before it, the T
line's own counts included, so a truncated or altered profile is refused; nothing may follow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import namedtuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import IO, Any, NamedTuple, Protocol

    Runs = tuple[tuple[int, int], ...]  # ((first page, pages), ...)

    class LineSource(Protocol):
        """What a Reader reads: a binary stream, or anything else with its readline(limit)."""

        def readline(self, limit: int, /) -> bytes: ...

    class FileEntry(NamedTuple):
        root: int
        path: str
        size: int
        mtime_ns: int
        runs: Runs

else:
    FileEntry = namedtuple("FileEntry", "root path size mtime_ns runs")  # runs: ((first page, pages), ...)


MAGIC = "igops-pagecache"
VERSION = 1
MAX_LINE = 64 << 20
MAX_ROOTS = 1024
HEADER_KEYS = {"host", "fleet", "postgres_cluster", "cluster_id", "page_size", "captured_at", "roots"}
TRAILER_COUNTS = ("files", "pages", "scanned_files", "scanned_dirs", "scanned_pages", "unreadable")
NUMBER = re.compile(r"[0-9]{1,20}")
SIGNED_NUMBER = re.compile(r"-?[0-9]{1,20}")
SHA256 = re.compile(r"[0-9a-f]{64}")
RUN = re.compile(r"([0-9]{1,20})\+([0-9]{1,20})")


class FormatError(ValueError):
    """A profile that is not exactly what a capture writes."""


def _json_line(tag: str, value: Any) -> str:
    return f"{tag}\t{json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=True)}\n"


def encode_runs(runs: Iterable[tuple[int, int]]) -> str:
    parts, end = [], 0
    for first, count in runs:
        parts.append(f"{first - end}+{count}")
        end = first + count
    return ",".join(parts)


def entry_line(entry: FileEntry) -> str:
    path = json.dumps(entry.path, ensure_ascii=True)
    return f"F\t{entry.root}\t{path}\t{entry.size}\t{entry.mtime_ns}\t{encode_runs(entry.runs)}\n"


class Writer:
    """Writes a profile to a binary stream, hashing as it goes."""

    def __init__(self, stream: IO[bytes], header: dict[str, Any]) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.files = 0
        self.pages = 0
        check_header(header)
        self._write(f"{MAGIC} {VERSION}\n")
        self._write(_json_line("H", header))

    def _write(self, text: str) -> None:
        data = text.encode("ascii")
        self._hash.update(data)
        self._stream.write(data)

    def add(self, entry: FileEntry) -> None:
        self._write(entry_line(entry))
        self.files += 1
        self.pages += sum(count for _, count in entry.runs)

    def finish(self, scanned_files: int, scanned_dirs: int, scanned_pages: int, unreadable: int) -> None:
        counts = (self.files, self.pages, scanned_files, scanned_dirs, scanned_pages, unreadable)
        self._write("T\t" + "".join(f"{count}\t" for count in counts))
        self._stream.write(self._hash.hexdigest().encode("ascii") + b"\n")
        self._stream.flush()


def safe_relative(path: object) -> bool:
    """A relative path that stays inside its root: no absolute, empty, '.' or '..' component."""
    return (
        isinstance(path, str)
        and path != ""
        and not path.startswith("/")
        and "\x00" not in path
        and all(part not in ("", ".", "..") for part in path.split("/"))
    )


def check_header(header: object) -> None:
    if not isinstance(header, dict):
        raise FormatError("the header is not a JSON object")
    missing, unknown = HEADER_KEYS - header.keys(), header.keys() - HEADER_KEYS
    if missing or unknown:
        raise FormatError(
            "header "
            + "; ".join(
                part
                for part in (
                    f"lacks {', '.join(sorted(missing))}" if missing else "",
                    f"has unknown {', '.join(sorted(unknown))}" if unknown else "",
                )
                if part
            )
        )
    for key in ("host", "fleet", "captured_at"):
        if not isinstance(header[key], str) or not header[key]:
            raise FormatError(f"header {key} is not a non-empty string")
    if header["postgres_cluster"] is not None and not isinstance(header["postgres_cluster"], str):
        raise FormatError("header postgres_cluster is neither null nor a string")
    cluster_id = header["cluster_id"]
    if cluster_id is not None and not (isinstance(cluster_id, str) and NUMBER.fullmatch(cluster_id)):
        raise FormatError("header cluster_id is neither null nor a decimal string")
    page_size = header["page_size"]
    if type(page_size) is not int or not 512 <= page_size <= 1 << 21 or page_size & (page_size - 1):
        raise FormatError("header page_size is not a power of two between 512 and 2 MiB")
    roots = header["roots"]
    if not isinstance(roots, list) or not 1 <= len(roots) <= MAX_ROOTS:
        raise FormatError(f"header roots is not a list of 1 to {MAX_ROOTS} roots")
    for index, root in enumerate(roots):
        if not isinstance(root, dict) or set(root) != {"path", "base", "within"}:
            raise FormatError(f"header root {index} is not an object with exactly path, base and within")
        if not isinstance(root["path"], str) or not root["path"].startswith("/") or "\x00" in root["path"]:
            raise FormatError(f"header root {index} path is not an absolute path")
        if not isinstance(root["base"], str) or not root["base"]:
            raise FormatError(f"header root {index} base is not a non-empty string")
        if root["within"] != "" and not safe_relative(root["within"]):
            raise FormatError(f"header root {index} within is not a relative path inside its base")
    if any(root["base"] == "postgres" for root in roots) and cluster_id is None:
        raise FormatError("header has a Postgres root but no cluster_id")


class Reader:
    """Reads a profile from a binary stream with readline(limit): the header at once, the file
    entries lazily, and the trailer's counts and checksum after the last entry."""

    def __init__(self, stream: LineSource) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._seen: set[tuple[int, str]] = set()
        self.line_number = 0
        self.trailer: dict[str, Any] | None = None
        magic = self._line("the first line")
        self._hash.update(self._last)
        name, _, version = magic.partition(" ")
        if name != MAGIC:
            raise FormatError("not an igops page-cache profile (its first line is not 'igops-pagecache N')")
        if not NUMBER.fullmatch(version):
            raise FormatError(f"bad format version {version[:20]!r}")
        if int(version) != VERSION:
            raise FormatError(f"profile format version {int(version)} is not supported (this reads {VERSION})")
        tag, _, text = self._line("the header").partition("\t")
        if tag != "H":
            raise FormatError(f"line {self.line_number}: expected the header (H), found {tag[:10]!r}")
        self._hash.update(self._last)
        header = self._json(text, "the header")
        check_header(header)
        self.header: dict[str, Any] = header
        self.page_size: int = header["page_size"]
        self.roots = len(header["roots"])

    def _line(self, what: str) -> str:
        raw = self._stream.readline(MAX_LINE + 1)
        self.line_number += 1
        if len(raw) > MAX_LINE:
            raise FormatError(f"line {self.line_number} is longer than {MAX_LINE} bytes")
        if not raw.endswith(b"\n"):
            raise FormatError(f"truncated: the profile ends at line {self.line_number}, in or before {what}")
        try:
            text = raw[:-1].decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"line {self.line_number} is not ASCII") from None
        self._last = raw
        return text

    def _json(self, text: str, what: str) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise FormatError(f"line {self.line_number}: {what} is not valid JSON") from None

    def entries(self) -> Iterator[FileEntry]:
        """Yield every FileEntry; check the trailer when it arrives. Stops at the trailer without
        reading further, so a live stream that stays open after it is not waited on."""
        files = pages = 0
        while True:
            text = self._line("the file entries or the trailer")
            tag, _, rest = text.partition("\t")
            if tag == "F":
                entry = self._entry(rest)
                self._hash.update(self._last)
                files += 1
                pages += sum(count for _, count in entry.runs)
                yield entry
            elif tag == "T":
                self._check_trailer(rest, files, pages)
                return
            else:
                raise FormatError(f"line {self.line_number}: unknown record {tag[:10]!r} (expected F or T)")

    def _entry(self, text: str) -> FileEntry:
        where = f"line {self.line_number}"
        fields = text.split("\t")
        if len(fields) != 5:
            raise FormatError(f"{where}: a file entry has 6 tab-separated fields, this has {len(fields) + 1}")
        root, path_text, size, mtime_ns, runs_text = fields
        if not NUMBER.fullmatch(root) or int(root) >= self.roots:
            raise FormatError(f"{where}: root {root[:20]!r} is not one of the header's {self.roots} roots")
        path = self._json(path_text, "the path")
        if not safe_relative(path):
            raise FormatError(f"{where}: path {path_text[:80]} is not a relative path inside its root")
        if (int(root), path) in self._seen:
            raise FormatError(f"{where}: {path_text[:80]} appears twice")
        if not NUMBER.fullmatch(size) or int(size) == 0:
            raise FormatError(f"{where}: size {size[:20]!r} is not a positive integer")
        if not SIGNED_NUMBER.fullmatch(mtime_ns):
            raise FormatError(f"{where}: mtime {mtime_ns[:20]!r} is not an integer")
        file_pages = -(-int(size) // self.page_size)
        runs: list[tuple[int, int]]
        runs, end = [], 0
        for token in runs_text.split(","):
            match = RUN.fullmatch(token)
            if not match:
                raise FormatError(f"{where}: run {token[:30]!r} is not GAP+LENGTH")
            gap, count = int(match.group(1)), int(match.group(2))
            if count == 0 or (runs and gap == 0):
                raise FormatError(f"{where}: runs must be non-empty and separated by at least one page")
            first = end + gap
            end = first + count
            if end > file_pages:
                raise FormatError(f"{where}: a run ends at page {end}, beyond the file's {file_pages} pages")
            runs.append((first, count))
        self._seen.add((int(root), path))
        return FileEntry(int(root), path, int(size), int(mtime_ns), tuple(runs))

    def _check_trailer(self, text: str, files: int, pages: int) -> None:
        where = f"line {self.line_number}"
        fields = text.split("\t")
        if (
            len(fields) != len(TRAILER_COUNTS) + 1
            or not all(NUMBER.fullmatch(f) for f in fields[:-1])
            or not SHA256.fullmatch(fields[-1])
        ):
            raise FormatError(f"{where}: the trailer is not T, {len(TRAILER_COUNTS)} counts and a sha256")
        self._hash.update(self._last[: -len(fields[-1]) - 1])
        if fields[-1] != self._hash.hexdigest():
            raise FormatError(f"{where}: checksum mismatch: the profile was altered or damaged")
        trailer = dict(zip(TRAILER_COUNTS, map(int, fields)), sha256=fields[-1])
        if (trailer["files"], trailer["pages"]) != (files, pages):
            raise FormatError(
                f"{where}: the trailer counts {trailer['files']} files and {trailer['pages']} "
                f"pages, the profile holds {files} and {pages}"
            )
        self.trailer = trailer
