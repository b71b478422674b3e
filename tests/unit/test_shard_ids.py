"""The 64-bit ids: the layout the service's next_id() uses, round trips and ordering, property-tested."""

import pytest
from hypothesis import given, strategies as st

from igops import shard_ids
from igops.errors import UsageError
from tests.conftest import run_igops

times = st.integers(min_value=shard_ids.ID_EPOCH_MS, max_value=shard_ids.MAX_ID_MS)
logical_shards = st.integers(min_value=0, max_value=shard_ids.MAX_SHARD)
sequences = st.integers(min_value=0, max_value=shard_ids.MAX_SEQUENCE)


@given(times, logical_shards, sequences)
def test_encode_decode_round_trip(unix_ms, shard, sequence):
    value = shard_ids.encode_id(unix_ms, shard, sequence)
    assert 0 <= value <= shard_ids.MAX_ID < 2**63
    decoded = shard_ids.decode_id(value)
    assert (decoded.unix_ms, decoded.shard, decoded.sequence) == (unix_ms, shard, sequence)


@given(st.integers(min_value=0, max_value=shard_ids.MAX_ID))
def test_every_id_decodes_and_encodes_back(value):
    decoded = shard_ids.decode_id(value)
    assert shard_ids.encode_id(decoded.unix_ms, decoded.shard, decoded.sequence) == value


@given(times, times, logical_shards, logical_shards, sequences, sequences)
def test_ids_sort_by_time_whatever_their_shard_and_sequence(t1, t2, shard1, shard2, seq1, seq2):
    first, second = shard_ids.encode_id(t1, shard1, seq1), shard_ids.encode_id(t2, shard2, seq2)
    if t1 < t2:
        assert first < second
    elif t1 > t2:
        assert first > second


@given(times, logical_shards, sequences)
def test_the_layout_is_the_published_one(unix_ms, shard, sequence):
    value = shard_ids.encode_id(unix_ms, shard, sequence)
    assert value >> 23 == unix_ms - 1314220021721
    assert (value >> 10) & 8191 == shard
    assert value & 1023 == sequence


def test_known_id_and_time_text():
    decoded = shard_ids.decode_id(shard_ids.encode_id(shard_ids.parse_time("2011-08-24T21:07:01.721Z"), 5, 0))
    assert decoded.id == 5 << 10 and decoded.time == "2011-08-24T21:07:01.721Z"
    assert (
        shard_ids.parse_time("2024-01-01T00:00:00")
        == shard_ids.parse_time("2024-01-01T00:00:00+00:00")
        == shard_ids.parse_time("1704067200000")
        == 1704067200000
    )
    assert shard_ids.parse_time("2024-01-01T01:00:00+01:00") == 1704067200000


@pytest.mark.parametrize(
    "args",
    [
        (shard_ids.ID_EPOCH_MS - 1, 0, 0),
        (shard_ids.MAX_ID_MS + 1, 0, 0),
        (shard_ids.ID_EPOCH_MS, 8192, 0),
        (shard_ids.ID_EPOCH_MS, -1, 0),
        (shard_ids.ID_EPOCH_MS, 0, 1024),
    ],
)
def test_out_of_range_parts_are_refused(args):
    with pytest.raises(UsageError):
        shard_ids.encode_id(*args)


def test_bad_ids_and_times_are_refused():
    for value in (-1, 1 << 63):
        with pytest.raises(UsageError):
            shard_ids.decode_id(value)
    with pytest.raises(UsageError, match="cannot read time"):
        shard_ids.parse_time("yesterday")


def test_shard_ranges_stay_readable():
    assert shard_ids.shard_ranges([]) == ""
    assert shard_ids.shard_ranges([3]) == "3"
    assert shard_ids.shard_ranges([7, 0, 1, 2, 3, 9, 10]) == "0-3, 7, 9-10"


def test_cli_decode_and_encode():
    import json

    encoded = run_igops(
        "shard", "id", "encode", "--time", "2024-05-01T12:00:00.250Z", "--shard", "4097", "--seq", "1023", "--json"
    )
    assert encoded.returncode == 0, encoded.stderr
    data = json.loads(encoded.stdout)["data"]
    decoded = run_igops("shard", "id", "decode", str(data["id"]), "--json")
    assert json.loads(decoded.stdout)["data"]["ids"] == [
        {
            "id": data["id"],
            "time": "2024-05-01T12:00:00.250Z",
            "unix_ms": 1714564800250,
            "shard": 4097,
            "sequence": 1023,
        }
    ]
    refused = run_igops("shard", "id", "encode", "--time", "2024-05-01", "--shard", "9000")
    assert refused.returncode == 2 and "does not fit in 13 bits" in refused.stderr
