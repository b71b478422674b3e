"""The WAL archive check's verdicts and perfdata (pure: the primary's pg_stat_archiver and .ready files, and
the repository, as igops.pg.archive_status reads them)."""

from igops.checks import Perf
from igops.checks.archive import archive_perf, verdict
from igops.errors import NagiosStatus
from igops.pg.archive_status import ArchiverStats, Backlog

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


def waiting(ready_files, oldest_ready_age_s=None):
    return Backlog(ready_files, oldest_ready_age_s, 0)


def test_an_archive_keeping_up_is_ok_and_an_idle_one_too():
    assert verdict(archiver(age=30), waiting(0), TIMEOUT)[0] == NagiosStatus.OK
    status, summary = verdict(archiver(age=86_400), waiting(0), TIMEOUT)  # nothing written for a day
    assert status == NagiosStatus.OK and "last archived 000000010000000000000009" in summary


def test_waiting_wal_is_warning_past_twice_the_timeout_and_critical_past_ten_times():
    assert verdict(archiver(age=100), waiting(3, 100), TIMEOUT)[0] == NagiosStatus.OK
    status, summary = verdict(archiver(age=121), waiting(3, 121), TIMEOUT)
    assert status == NagiosStatus.WARNING and "3 segments wait, the oldest for 121 s" in summary
    assert "critical past 600 s" in summary
    assert verdict(archiver(age=601), waiting(3, 601), TIMEOUT)[0] == NagiosStatus.CRITICAL
    assert verdict(archiver(age=None), waiting(1, 601), TIMEOUT)[0] == NagiosStatus.CRITICAL  # never archived


def test_the_wait_is_the_oldest_segments_not_the_time_since_the_last_archive():
    # A day of quiet, then a segment handed to the archiver 2 s ago: it has waited 2 s, not a day.
    status, summary = verdict(archiver(age=86_400), waiting(1, 2), TIMEOUT)
    assert status == NagiosStatus.OK and "1 segments wait, the oldest for 2 s" in summary
    # Without the segments' time, the last archive's age stands in (the longest the wait can be).
    assert verdict(archiver(age=601), waiting(1), TIMEOUT)[0] == NagiosStatus.CRITICAL
    assert verdict(archiver(age=None), waiting(1), TIMEOUT)[0] == NagiosStatus.CRITICAL


def test_a_failing_archive_warns_at_once_and_is_critical_once_the_wal_it_holds_is_old():
    status, summary = verdict(archiver(age=90, failed_age=5), waiting(2, 4), TIMEOUT)
    assert status == NagiosStatus.WARNING and summary.startswith("archiving fails: 00000001000000000000000A")
    assert verdict(archiver(age=700, failed_age=5), waiting(9, 650), TIMEOUT)[0] == NagiosStatus.CRITICAL
    status, summary = verdict(archiver(age=5, failed_age=50), waiting(0), TIMEOUT)  # failed, then worked
    assert status == NagiosStatus.OK and "then worked" in summary
    assert verdict(archiver(age=5, failed_age=500), waiting(0), TIMEOUT)[0] == NagiosStatus.OK


def test_archiving_off_is_critical():
    status, summary = verdict(archiver(mode="off"), waiting(0), TIMEOUT)
    assert status == NagiosStatus.CRITICAL and "igops pg archive setup" in summary


def perf_of(archiver_, backlog):
    return {perf.label: perf for perf in archive_perf("main", archiver_, backlog, TIMEOUT)}


def test_the_thresholds_go_with_the_oldest_segments_wait_not_the_last_archives_age():
    perf = perf_of(archiver(age=86_400), waiting(3, 121))
    assert perf["ready-age main"] == Perf("ready-age main", 121, "s", 120, 600, 0)
    assert perf["archive-age main"] == Perf("archive-age main", 86_400, "s", minimum=0)
    assert perf["ready main"] == Perf("ready main", 3, minimum=0)


def test_the_ready_age_is_zero_while_none_waits_and_the_last_archives_without_the_segments_time():
    perf = perf_of(archiver(age=None), waiting(0))
    assert perf["ready-age main"].value == 0 and "archive-age main" not in perf
    assert perf_of(archiver(age=650), waiting(2))["ready-age main"].value == 650
    # Nothing to stand in: no number (the verdict says CRITICAL), the count still.
    assert list(perf_of(archiver(age=None), waiting(2))) == ["ready main"]
