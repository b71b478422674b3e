"""Page-cache profiles as igops handles them: loaded, checked and typed.

The format itself is defined once, in `igops.agent.pagecache_profile`, because hosts write it
(capture) and read it (apply) too; see that module's docstring. Here every problem
becomes a ProfileError naming what is wrong, and profiles on disk may be gzipped.
"""

from __future__ import annotations

import gzip
import io
import os
import shlex
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igops.agent import pagecache_profile
from igops.errors import UsageError

GZIP_MAGIC = b"\x1f\x8b"
REFRESH_HINT = "capture a fresh profile with `igops warm capture`"


class ProfileError(UsageError):
    """A profile that cannot be used: nothing was warmed."""

    def __init__(self, message: str, hint: str | None = REFRESH_HINT):
        super().__init__(message, hint)


@dataclass(frozen=True)
class Root:
    """A captured directory: its path on the source host, and how to find the same directory on
    another host ("postgres": the Postgres data directory; "mount:PURPOSE": the data mount with
    that purpose; "path": the same absolute path), `within` being the part below that base."""

    path: str
    base: str
    within: str


@dataclass
class Profile:
    host: str
    fleet: str
    postgres_cluster: str | None
    cluster_id: str | None
    page_size: int
    captured_at: str
    roots: list[Root]
    files: list[pagecache_profile.FileEntry] = field(repr=False)
    scanned_files: int
    scanned_dirs: int
    scanned_pages: int
    unreadable: int
    sha256: str

    @property
    def pages(self) -> int:
        return sum(count for entry in self.files for _, count in entry.runs)

    @property
    def resident_bytes(self) -> int:
        return self.pages * self.page_size

    def summary(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "fleet": self.fleet,
            "postgres_cluster": self.postgres_cluster,
            "cluster_id": self.cluster_id,
            "captured_at": self.captured_at,
            "page_size": self.page_size,
            "roots": [root.path for root in self.roots],
            "files": len(self.files),
            "pages": self.pages,
            "resident_bytes": self.resident_bytes,
            "scanned_files": self.scanned_files,
            "scanned_dirs": self.scanned_dirs,
            "scanned_pages": self.scanned_pages,
            "unreadable": self.unreadable,
        }


def from_reader(reader: pagecache_profile.Reader, entries: list[pagecache_profile.FileEntry]) -> Profile:
    header, trailer = reader.header, reader.trailer
    assert trailer is not None, "the entries were read to the end, so the trailer is in"
    return Profile(
        host=header["host"],
        fleet=header["fleet"],
        postgres_cluster=header["postgres_cluster"],
        cluster_id=header["cluster_id"],
        page_size=header["page_size"],
        captured_at=header["captured_at"],
        roots=[Root(root["path"], root["base"], root["within"]) for root in header["roots"]],
        files=entries,
        scanned_files=trailer["scanned_files"],
        scanned_dirs=trailer["scanned_dirs"],
        scanned_pages=trailer["scanned_pages"],
        unreadable=trailer["unreadable"],
        sha256=trailer["sha256"],
    )


def plain(data: bytes, source: str) -> bytes:
    """The profile's text, whether or not it was gzipped."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ProfileError(f"{source}: damaged or truncated gzip data ({exc})") from None


def parse(data: bytes, source: str = "profile") -> Profile:
    """A whole profile, checked down to its last byte."""
    stream = io.BytesIO(plain(data, source))
    try:
        reader = pagecache_profile.Reader(stream)
        entries = list(reader.entries())
    except pagecache_profile.FormatError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    if stream.read(1):
        raise ProfileError(f"{source}: line {reader.line_number + 1}: data after the trailer")
    return from_reader(reader, entries)


def load(path: str | Path) -> tuple[Profile, bytes]:
    """The profile at `path` and its plain text, as sent to a host."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(
            f"cannot read profile {path}: {exc.strerror or exc}", "pass the file `igops warm capture -o` wrote"
        ) from None
    text = plain(data, str(path))
    return parse(text, str(path)), text


def save(path: str | Path, text: bytes) -> int:
    """Write a profile (gzipped when the name ends in .gz) atomically; returns the bytes written."""
    path = Path(path)
    data = gzip.compress(text, mtime=0) if path.name.endswith(".gz") else text
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UsageError(f"cannot write profile {path}: {exc.strerror or exc}", "choose another -o path") from None
    return len(data)


def vmtouch_script(profile: Profile) -> list[str]:
    """`vmtouch -t -p RANGE FILE` for every run, for replaying a profile with vmtouch itself.
    Root i is $ROOTi, defaulting to the captured path, so the script can be pointed at another
    host's layout. vmtouch touches pages through a mapping, so the kernel's readahead will
    read more than the ranges."""
    lines = [f": ${{ROOT{index}:={shlex.quote(root.path)}}}" for index, root in enumerate(profile.roots)]
    for entry in profile.files:
        target = f'"$ROOT{entry.root}"/{shlex.quote(entry.path)}'
        for first, count in entry.runs:
            start = first * profile.page_size
            end = min((first + count) * profile.page_size, entry.size)
            lines.append(f"vmtouch -t -p {start}-{end} {target}")
    return lines
