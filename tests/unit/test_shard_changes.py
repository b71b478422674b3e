"""Taking pgoutput (protocol 1) messages apart, as the cut-over's record of the rows written since
a verification reads them, and where a resumed move picks up."""

import struct

import pytest

from igops import shards
from igops.shard_changes import UNCHANGED, ProtocolError, parse_message


def row(*values):
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            data = str(value).encode()
            out += b"t" + struct.pack("!i", len(data)) + data
    return out


def test_a_relation_message_names_the_table_and_its_columns():
    columns = b"".join(
        bytes([flags]) + name + b"\0" + struct.pack("!ii", 20, -1)
        for flags, name in ((1, b"photo_id"), (1, b"user_id"), (0, b"created_at"))
    )
    message = b"R" + struct.pack("!i", 16384) + b"insta5\0likes\0d" + struct.pack("!h", 3) + columns
    assert parse_message(message) == ("relation", 16384, "likes", ["photo_id", "user_id", "created_at"])


def test_inserts_updates_and_deletes_give_their_rows():
    relid = struct.pack("!i", 7)
    assert parse_message(b"I" + relid + b"N" + row(1, "caf\u00e9", None)) == ("insert", 7, [["1", "caf\u00e9", None]])
    # An update that kept its key sends the new row only; one that changed it sends the old key first.
    assert parse_message(b"U" + relid + b"N" + row(1, UNCHANGED, "x")) == ("update", 7, [["1", UNCHANGED, "x"]])
    assert parse_message(b"U" + relid + b"K" + row(1, None, None) + b"N" + row(2, "b", "x")) == (
        "update",
        7,
        [["1", None, None], ["2", "b", "x"]],
    )
    assert parse_message(b"D" + relid + b"K" + row(3, None, None)) == ("delete", 7, [["3", None, None]])
    assert parse_message(b"T" + struct.pack("!i", 2) + b"\0" + struct.pack("!ii", 7, 8)) == ("truncate", [7, 8])


def test_messages_that_write_no_row_are_skipped_and_broken_ones_refused():
    assert parse_message(b"B" + struct.pack("!qqi", 1, 2, 3)) is None
    assert parse_message(b"C" + b"\0" + struct.pack("!qqq", 1, 2, 3)) is None
    with pytest.raises(ProtocolError):
        parse_message(b"I" + struct.pack("!i", 7) + b"N" + row(1)[:-1])
    with pytest.raises(ProtocolError):
        parse_message(b"D" + struct.pack("!i", 7) + b"N" + row(1))
    with pytest.raises(ProtocolError):
        parse_message(b"R" + struct.pack("!i", 7) + b"insta5")


def test_a_move_stopped_after_its_verification_verifies_again():
    assert shards.resume_point("verified") == "caught_up"
    assert [shards.resume_point(step) for step in ("copied", "caught_up", "switched")] == [
        "copied",
        "caught_up",
        "switched",
    ]
