"""The page-cache profile format: what a capture writes reads back exactly, and anything else —
truncated, altered, hostile or random — is refused with a message, never a crash."""

import gzip
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from igops import profile
from igops.agent import pagecache_profile
from igops.agent.pagecache_profile import FileEntry
from igops.errors import UsageError

HEADER = {
    "host": "db1",
    "fleet": "prod",
    "postgres_cluster": "main",
    "cluster_id": "7312345678901234567",
    "page_size": 4096,
    "captured_at": "2026-11-23T05:00:00Z",
    "roots": [
        {"path": "/var/lib/postgresql/15/main", "base": "postgres", "within": ""},
        {"path": "/data/photos", "base": "mount:data", "within": "photos"},
    ],
}
ENTRIES = [
    FileEntry(0, "base/16384/2619", 8 << 20, 1_700_000_000_123_456_789, ((0, 12), (30, 4), (2000, 48))),
    FileEntry(0, "global/pg_control", 8192, 1_700_000_000_000_000_000, ((0, 2),)),
    FileEntry(1, "a dir/with\ttab and ünïcode", 5000, -1, ((1, 1),)),
]


def write(header=HEADER, entries=ENTRIES, scanned=(40, 8, 9000, 1)) -> bytes:
    stream = io.BytesIO()
    writer = pagecache_profile.Writer(stream, header)
    for entry in entries:
        writer.add(entry)
    writer.finish(*scanned)
    return stream.getvalue()


VALID = write()


def test_round_trip_is_exact():
    found = profile.parse(VALID)
    assert found.files == ENTRIES
    assert (found.host, found.fleet, found.postgres_cluster, found.cluster_id) == (
        "db1",
        "prod",
        "main",
        "7312345678901234567",
    )
    assert found.roots == [
        profile.Root("/var/lib/postgresql/15/main", "postgres", ""),
        profile.Root("/data/photos", "mount:data", "photos"),
    ]
    assert found.pages == 12 + 4 + 48 + 2 + 1 and found.resident_bytes == found.pages * 4096
    assert (found.scanned_files, found.scanned_dirs, found.scanned_pages, found.unreadable) == (40, 8, 9000, 1)


def test_layout_is_the_documented_one():
    lines = VALID.decode("ascii").splitlines()
    assert lines[0] == "igops-pagecache 1"
    assert lines[1].startswith("H\t{")
    assert lines[2] == 'F\t0\t"base/16384/2619"\t8388608\t1700000000123456789\t0+12,18+4,1966+48'
    assert lines[-1].startswith("T\t3\t67\t40\t8\t9000\t1\t") and len(lines) == 6


def test_gzipped_profiles_read_the_same(tmp_path):
    path = tmp_path / "db1.pagecache.gz"
    profile.save(path, VALID)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    found, text = profile.load(path)
    assert text == VALID and found.files == ENTRIES


def test_every_truncation_is_refused():
    for length in range(len(VALID)):
        with pytest.raises(profile.ProfileError):
            profile.parse(VALID[:length])


def test_truncated_gzip_is_refused():
    packed = gzip.compress(VALID)
    with pytest.raises(profile.ProfileError, match="damaged or truncated gzip"):
        profile.parse(packed[:-9])


def test_errors_are_usage_errors_with_a_hint():
    with pytest.raises(UsageError) as caught:
        profile.parse(b"")
    assert "truncated" in caught.value.message and "igops warm capture" in caught.value.hint


def replace_line(number: int, new: str) -> bytes:
    lines = VALID.decode("ascii").split("\n")
    lines[number] = new
    return "\n".join(lines).encode()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"PK\x03\x04 zip file\n", "not an igops page-cache profile"),
        (VALID.replace(b"igops-pagecache 1", b"igops-pagecache 2", 1), "version 2 is not supported"),
        (replace_line(2, 'F\t0\t"../../etc/shadow"\t8388608\t1\t0+1'), "not a relative path inside its root"),
        (replace_line(2, 'F\t0\t"/etc/shadow"\t8388608\t1\t0+1'), "not a relative path inside its root"),
        (replace_line(2, 'F\t0\t"base//x"\t8388608\t1\t0+1'), "not a relative path inside its root"),
        (replace_line(2, 'F\t7\t"base/1"\t8388608\t1\t0+1'), "not one of the header's 2 roots"),
        (replace_line(2, 'F\t0\t"base/1"\t8192\t1\t0+3'), "beyond the file's 2 pages"),
        (replace_line(2, 'F\t0\t"base/1"\t8192\t1\t0+1,0+1'), "separated by at least one page"),
        (replace_line(2, 'F\t0\t"base/1"\t8192\t1\t0+0'), "non-empty"),
        (replace_line(2, 'F\t0\t"base/1"\t٣\t1\t0+1'), "not ASCII"),
        (replace_line(2, 'F\t0\t"base/1"\t1_000\t1\t0+1'), "size '1_000' is not a positive integer"),
        (replace_line(2, 'F\t0\t"base/1"\t8192\t1\t0-1'), "is not GAP\\+LENGTH"),
        (replace_line(2, 'F\t0\t"global/pg_control"\t8192\t1\t0+1'), "appears twice"),
        (replace_line(2, "X\tsomething"), "unknown record"),
        (
            replace_line(2, 'F\t0\t"base/16384/2619"\t8388608\t1700000000123456789\t0+12,18+4,1966+47'),
            "checksum mismatch",
        ),
        (VALID + b"more\n", "data after the trailer"),
    ],
)
def test_malformed_profiles_are_refused_with_a_message(data, message):
    with pytest.raises(profile.ProfileError, match=message):
        profile.parse(data)


def header_with(**changes) -> bytes:
    return write(header={**HEADER, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"page_size": 4000}, "page_size is not a power of two"),
        ({"page_size": True}, "page_size is not a power of two"),
        ({"cluster_id": None}, "Postgres root but no cluster_id"),
        ({"cluster_id": "x1"}, "cluster_id is neither null nor a decimal string"),
        ({"roots": []}, "roots is not a list of 1 to"),
        ({"roots": [{"path": "relative", "base": "path", "within": ""}]}, "not an absolute path"),
        ({"roots": [{"path": "/d", "base": "mount:data", "within": "../x"}]}, "within is not a relative path"),
        ({"host": ""}, "host is not a non-empty string"),
    ],
)
def test_bad_headers_are_refused(changes, message):
    with pytest.raises(pagecache_profile.FormatError, match=message):
        header_with(**changes)


def test_unknown_header_keys_are_refused():
    line = "H\t" + json.dumps({**HEADER, "extra": 1}) + "\n"
    data = b"igops-pagecache 1\n" + line.encode()
    with pytest.raises(profile.ProfileError, match="has unknown extra"):
        profile.parse(data)


def test_the_reader_stops_at_the_trailer_of_a_live_stream():
    class Endless(io.BytesIO):
        def readline(self, limit=-1):
            line = super().readline(limit)
            if not line:
                raise AssertionError("read past the trailer")
            return line

    reader = pagecache_profile.Reader(Endless(VALID))
    assert list(reader.entries()) == ENTRIES and reader.trailer["files"] == 3


def test_vmtouch_script_replays_each_run_by_byte_range():
    script = profile.vmtouch_script(profile.parse(VALID))
    assert script[0] == ": ${ROOT0:=/var/lib/postgresql/15/main}"
    assert script[2] == 'vmtouch -t -p 0-49152 "$ROOT0"/base/16384/2619'
    assert script[4] == 'vmtouch -t -p 8192000-8388608 "$ROOT0"/base/16384/2619'
    assert script[-1] == "vmtouch -t -p 4096-5000 \"$ROOT1\"/'a dir/with\ttab and ünïcode'"
    assert len(script) == 2 + 5


# --- fuzzing ------------------------------------------------------------------------------------
def parse_or_refuse(data: bytes) -> None:
    try:
        profile.parse(data)
    except profile.ProfileError as exc:
        assert exc.message and exc.exit_code == 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data):
    parse_or_refuse(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_after_a_valid_start_never_crash(tail):
    parse_or_refuse(VALID[: VALID.index(b"\nF") + 1] + tail)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_profiles_are_refused_or_unchanged(data):
    mutated = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            mutated[position] ^= data.draw(st.integers(1, 255))
        elif action == "delete":
            del mutated[position]
        else:
            mutated.insert(position, data.draw(st.integers(0, 255)))
    if bytes(mutated) == VALID:
        return
    with pytest.raises(profile.ProfileError):
        profile.parse(bytes(mutated))


field_text = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=30)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(field_text, st.integers(-10, 10**25).map(str)), min_size=0, max_size=8))
def test_entry_lines_of_random_fields_never_crash(fields):
    body = VALID.decode("ascii").split("\n")
    body[2] = "F\t" + "\t".join(fields)
    parse_or_refuse("\n".join(body).encode())


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )
)
def test_random_json_headers_and_trailers_never_crash(value):
    text = json.dumps(value)
    parse_or_refuse(b"igops-pagecache 1\nH\t" + text.encode() + b"\n")
    parse_or_refuse(VALID[: VALID.rindex(b"T\t")] + b"T\t" + text.encode() + b"\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(field_text, st.integers(-10, 10**25).map(str)), max_size=9))
def test_trailers_of_random_fields_never_crash(fields):
    parse_or_refuse(VALID[: VALID.rindex(b"T\t")] + ("T\t" + "\t".join(fields) + "\n").encode())


def test_deeply_nested_json_is_refused_not_a_recursion_crash():
    parse_or_refuse(b"igops-pagecache 1\nH\t" + b"[" * 100_000 + b"\n")
