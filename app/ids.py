"""Instagram-style 64-bit ids: 41 bits of milliseconds, 13 of logical shard, 10 of sequence.

The database generates them (`<schema>.next_id()` in sql/shard.sql); this module
decodes them, because every id names the logical shard that holds its row.
"""

from __future__ import annotations

EPOCH_MS = 1314220021721
SHARD_BITS = 13
SEQUENCE_BITS = 10
TIMESTAMP_BITS = 41
MAX_SHARD = (1 << SHARD_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_ID = (1 << 63) - 1


def compose_id(unix_millis: int, logical_shard: int, sequence: int) -> int:
    elapsed = unix_millis - EPOCH_MS
    if not 0 <= elapsed < (1 << TIMESTAMP_BITS):
        raise ValueError(f"timestamp {unix_millis} is outside the id epoch")
    if not 0 <= logical_shard <= MAX_SHARD:
        raise ValueError(f"logical shard {logical_shard} does not fit in {SHARD_BITS} bits")
    return (
        (elapsed << (SHARD_BITS + SEQUENCE_BITS)) | (logical_shard << SEQUENCE_BITS) | (sequence % (MAX_SEQUENCE + 1))
    )


def shard_of(object_id: int) -> int:
    return (object_id >> SEQUENCE_BITS) & MAX_SHARD


def unix_millis_of(object_id: int) -> int:
    return (object_id >> (SHARD_BITS + SEQUENCE_BITS)) + EPOCH_MS


def sequence_of(object_id: int) -> int:
    return object_id & MAX_SEQUENCE
