"""The WAL archive check's verdicts (pure: the primary's pg_stat_archiver and .ready files, and
the repository, as igops.pg.archive_status reads them)."""

from igops.checks.archive import verdict
from igops.errors import NagiosStatus
from igops.pg.archive_status import ArchiverStats

TIMEOUT = 60


def archiver(age=30.0, failed_age=None, mode="on"):
    return ArchiverStats(
        mode,
        10,
        "000000010000000000000009" if age is not None else None,
        "2026-12-04 06:00:00+00" if age is not None else None,
        age,
        1 if failed_age is not None else 0,
        "00000001000000000000000A" if failed_age is not None else None,
        "2026-12-04 06:01:00+00" if failed_age is not None else None,
        failed_age,
        "00000001000000000000000B",
    )


def test_an_archive_keeping_up_is_ok_and_an_idle_one_too():
    assert verdict(archiver(age=30), 0, None, TIMEOUT)[0] == NagiosStatus.OK
    status, summary = verdict(archiver(age=86_400), 0, None, TIMEOUT)  # nothing written for a day
    assert status == NagiosStatus.OK and "last archived 000000010000000000000009" in summary


def test_waiting_wal_is_warning_past_twice_the_timeout_and_critical_past_ten_times():
    assert verdict(archiver(age=100), 3, 100, TIMEOUT)[0] == NagiosStatus.OK
    status, summary = verdict(archiver(age=121), 3, 121, TIMEOUT)
    assert status == NagiosStatus.WARNING and "3 segments wait, the oldest for 121 s" in summary
    assert "critical past 600 s" in summary
    assert verdict(archiver(age=601), 3, 601, TIMEOUT)[0] == NagiosStatus.CRITICAL
    assert verdict(archiver(age=None), 1, 601, TIMEOUT)[0] == NagiosStatus.CRITICAL  # never archived


def test_the_wait_is_the_oldest_segments_not_the_time_since_the_last_archive():
    # A day of quiet, then a segment handed to the archiver 2 s ago: it has waited 2 s, not a day.
    status, summary = verdict(archiver(age=86_400), 1, 2, TIMEOUT)
    assert status == NagiosStatus.OK and "1 segments wait, the oldest for 2 s" in summary
    # Without the segments' time, the last archive's age stands in (the longest the wait can be).
    assert verdict(archiver(age=601), 1, None, TIMEOUT)[0] == NagiosStatus.CRITICAL
    assert verdict(archiver(age=None), 1, None, TIMEOUT)[0] == NagiosStatus.CRITICAL


def test_a_failing_archive_warns_at_once_and_is_critical_once_the_wal_it_holds_is_old():
    status, summary = verdict(archiver(age=90, failed_age=5), 2, 4, TIMEOUT)
    assert status == NagiosStatus.WARNING and summary.startswith("archiving fails: 00000001000000000000000A")
    assert verdict(archiver(age=700, failed_age=5), 9, 650, TIMEOUT)[0] == NagiosStatus.CRITICAL
    status, summary = verdict(archiver(age=5, failed_age=50), 0, None, TIMEOUT)  # failed, then worked
    assert status == NagiosStatus.OK and "then worked" in summary
    assert verdict(archiver(age=5, failed_age=500), 0, None, TIMEOUT)[0] == NagiosStatus.OK


def test_archiving_off_is_critical():
    status, summary = verdict(archiver(mode="off"), 0, None, TIMEOUT)
    assert status == NagiosStatus.CRITICAL and "igops pg archive setup" in summary
