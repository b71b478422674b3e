import json

import pytest

from app.loadgen.ledger import Ledger, read_ledger
from app.loadgen.report import (
    LatencySummary,
    MissingWrite,
    VerifyReport,
    format_verify,
    longest_covered_interval,
    longest_gap,
    percentile,
)


def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_latency_summary():
    summary = LatencySummary.of([30.0, 10.0, 20.0, 40.0])
    assert summary.count == 4
    assert summary.mean_ms == 25.0
    assert summary.p50_ms == 20.0
    assert summary.max_ms == 40.0
    assert LatencySummary.of([]) == LatencySummary()


def test_longest_gap_counts_the_window_edges():
    assert longest_gap([1.0, 2.0, 2.5], start=0.0, end=10.0) == 7.5
    assert longest_gap([], start=0.0, end=3.0) == 3.0
    assert longest_gap([1.0, 5.0, 6.0], start=0.5, end=6.0) == 4.0
    # acknowledgements outside the window do not shorten gaps inside it
    assert longest_gap([-1.0, 11.0], start=0.0, end=10.0) == 10.0


def test_longest_covered_interval_merges_overlapping_failures():
    assert longest_covered_interval([]) == 0.0
    assert longest_covered_interval([(1.0, 2.0)]) == 1.0
    # 1-3 and 2-5 overlap into 1-5; 7-7.5 stands alone
    assert longest_covered_interval([(2.0, 5.0), (7.0, 7.5), (1.0, 3.0)]) == 4.0
    # touching intervals join
    assert longest_covered_interval([(0.0, 1.0), (1.0, 2.0)]) == 2.0
    # a short failure inside a long one adds nothing
    assert longest_covered_interval([(0.0, 10.0), (2.0, 3.0), (11.0, 12.0)]) == 10.0


def test_ledger_lines_are_complete_json_after_each_write(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.record("signup", 1.0, 1.25, user_id=5, username="ann")
    # visible before close: a killed run keeps what it acknowledged
    line = json.loads(path.read_text().splitlines()[0])
    assert line == {"op": "signup", "user_id": 5, "username": "ann", "sent": 1.0, "acked": 1.25}
    ledger.record("like", 2.0, 2.5, photo_id=9, user_id=5)
    ledger.close()
    with open(path, "a") as handle:
        handle.write('{"op": "post", "photo_id": 1')  # cut short by a kill
    records, unparsable = read_ledger(path)
    assert [r["op"] for r in records] == ["signup", "like"]
    assert unparsable == 1


def test_ledger_appends_across_runs(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for user_id in (1, 2):
        ledger = Ledger(path)
        ledger.record("signup", 0.0, 0.1, user_id=user_id, username=f"u{user_id}")
        ledger.close()
    assert [r["user_id"] for r in read_ledger(path)[0]] == [1, 2]


def test_verify_report_is_ok_only_without_missing_writes():
    clean = VerifyReport(ledger="l", checked={"post": 3}, missing={"post": 0}, missing_writes=[])
    assert clean.ok
    assert clean.to_dict()["ok"] is True
    lost = MissingWrite(op="post", record={"photo_id": 1}, missing=["photos row"])
    broken = VerifyReport(ledger="l", checked={"post": 3}, missing={"post": 1}, missing_writes=[lost])
    assert not broken.ok
    assert "MISSING post" in format_verify(broken)
    assert json.loads(json.dumps(broken.to_dict()))["missing_writes"][0]["missing"] == ["photos row"]
