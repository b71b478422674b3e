import pytest
from hypothesis import given, strategies as st

from app.ids import EPOCH_MS, MAX_SHARD, compose_id, sequence_of, shard_of, unix_millis_of


def test_layout_matches_the_published_scheme():
    # 41 bits of time, 13 of shard, 10 of sequence, as in Instagram's sharding post
    object_id = compose_id(EPOCH_MS + 1, 5, 3)
    assert object_id == (1 << 23) | (5 << 10) | 3


def test_known_id_decodes():
    object_id = 4036529094379175937
    assert shard_of(object_id) == (object_id >> 10) & 8191
    assert unix_millis_of(object_id) == (object_id >> 23) + EPOCH_MS


@given(
    millis=st.integers(min_value=EPOCH_MS, max_value=EPOCH_MS + (1 << 41) - 1),
    shard=st.integers(min_value=0, max_value=MAX_SHARD),
    sequence=st.integers(min_value=0, max_value=1023),
)
def test_round_trip(millis, shard, sequence):
    object_id = compose_id(millis, shard, sequence)
    assert 0 <= object_id < 1 << 64
    assert shard_of(object_id) == shard
    assert unix_millis_of(object_id) == millis
    assert sequence_of(object_id) == sequence


def test_sequence_wraps_like_the_sql_modulo():
    assert sequence_of(compose_id(EPOCH_MS, 1, 1024 + 7)) == 7


def test_ids_sort_by_time_across_shards():
    assert compose_id(EPOCH_MS + 10, 8191, 1023) < compose_id(EPOCH_MS + 11, 0, 0)


@pytest.mark.parametrize(
    "millis,shard", [(EPOCH_MS - 1, 0), (EPOCH_MS + (1 << 41), 0), (EPOCH_MS, 8192), (EPOCH_MS, -1)]
)
def test_out_of_range_parts_are_rejected(millis, shard):
    with pytest.raises(ValueError):
        compose_id(millis, shard, 0)
