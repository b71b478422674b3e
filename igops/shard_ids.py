"""The service's 64-bit ids, as each shard's next_id() mints them: 41 bits of milliseconds since
2011-08-24 21:07:01.721 UTC, 13 bits of logical shard and 10 of sequence; and the short form of a
list of shard numbers ("0-3, 7, 9-10")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from igops.errors import UsageError

ID_EPOCH_MS = 1314220021721  # 2011-08-24 21:07:01.721 UTC
SHARD_BITS, SEQUENCE_BITS = 13, 10  # below 41 bits of milliseconds
MAX_SHARD = (1 << SHARD_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
# Ids live in a signed bigint: the time field's top bit would make them negative, so the
# usable range ends 2^40 ms after the epoch (in 2046).
MAX_ID = (1 << 63) - 1
MAX_ID_MS = ID_EPOCH_MS + (MAX_ID >> (SHARD_BITS + SEQUENCE_BITS))


@dataclass(frozen=True)
class DecodedId:
    id: int
    time: str  # ISO 8601, UTC, milliseconds
    unix_ms: int
    shard: int
    sequence: int


def decode_id(value: int) -> DecodedId:
    if not 0 <= value <= MAX_ID:
        raise UsageError(f"{value} is not a 64-bit id of this scheme", f"ids lie in 0..{MAX_ID}")
    unix_ms = (value >> (SHARD_BITS + SEQUENCE_BITS)) + ID_EPOCH_MS
    return DecodedId(value, format_ms(unix_ms), unix_ms, (value >> SEQUENCE_BITS) & MAX_SHARD, value & MAX_SEQUENCE)


def encode_id(unix_ms: int, shard: int, sequence: int) -> int:
    if not ID_EPOCH_MS <= unix_ms <= MAX_ID_MS:
        raise UsageError(
            f"time {format_ms(unix_ms) if unix_ms >= 0 else unix_ms} is outside the id range",
            f"ids cover {format_ms(ID_EPOCH_MS)} to {format_ms(MAX_ID_MS)}",
        )
    if not 0 <= shard <= MAX_SHARD:
        raise UsageError(f"logical shard {shard} does not fit in {SHARD_BITS} bits", f"use 0..{MAX_SHARD}")
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise UsageError(
            f"sequence {sequence} does not fit in {SEQUENCE_BITS} bits",
            f"use 0..{MAX_SEQUENCE} (next_id() keeps nextval % {MAX_SEQUENCE + 1})",
        )
    return ((unix_ms - ID_EPOCH_MS) << (SHARD_BITS + SEQUENCE_BITS)) | (shard << SEQUENCE_BITS) | sequence


def parse_time(text: str) -> int:
    """Unix milliseconds from ISO 8601 (no zone means UTC) or from an integer of Unix ms."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00") if stripped.endswith("Z") else stripped)
    except ValueError:
        raise UsageError(
            f"cannot read time {text!r}", "use ISO 8601, e.g. 2024-05-01T12:00:00.250Z, or Unix milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def format_ms(unix_ms: int) -> str:
    moment = datetime.fromtimestamp(unix_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shard_ranges(shards: list[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0-3, 7, 9-10": thousands of shards stay readable."""
    parts: list[str] = []
    ordered = sorted(shards)
    start: int | None = None
    previous: int | None = None
    for shard in [*ordered, None]:
        if start is not None and previous is not None and shard == previous + 1:
            previous = shard
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = shard
    return ", ".join(parts)
